// beast-https-server: a minimal HTTPS server on Boost.Beast + Asio + OpenSSL. It knows
// nothing of QKD: its TLS context has default settings, so the key exchange groups (and the
// providers that implement them) come from openssl.cnf, e.g.
//   export OPENSSL_CONF=examples/bob-provider.cnf QKD_DEMO_DIR=$PWD
//   build/bin/beast-https-server --port 4433 --cert bob.crt --key bob.key
// For each connection it logs "server: group=NAME protocol=TLSv1.3 ..." and answers any
// request with "hello from beast, group=NAME". Prints "listening on PORT" when ready.
//   --count N   exit after N connections (default: run until killed)
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/version.hpp>

#include <cstdlib>
#include <iostream>
#include <string>
#include <string_view>

#include "tls_report.hpp"

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;

namespace {

int usage() {
  std::cerr << "usage: beast-https-server --cert FILE --key FILE [--host ADDR] [--port N] "
               "[--count N]\n";
  return 2;
}

void serve_one(tcp::socket sock, ssl::context& ctx) {
  beast::ssl_stream<beast::tcp_stream> stream(std::move(sock), ctx);
  stream.next_layer().expires_after(std::chrono::seconds(30));
  stream.handshake(ssl::stream_base::server);
  const std::string group = example::negotiated_group(stream.native_handle());
  std::cout << "server: " << example::tls_report(stream.native_handle()) << std::endl;

  beast::flat_buffer buf;
  http::request<http::string_body> req;
  http::read(stream, buf, req);
  http::response<http::string_body> res{http::status::ok, req.version()};
  res.set(http::field::server, BOOST_BEAST_VERSION_STRING);
  res.set(http::field::content_type, "text/plain");
  res.keep_alive(false);
  res.body() = "hello from beast, group=" + group + "\n";
  res.prepare_payload();
  http::write(stream, res);
  std::cout << "server: answered " << req.method_string() << " " << req.target() << std::endl;

  beast::error_code ec;
  stream.shutdown(ec);  // the peer may close first: not an error here
}

}  // namespace

int main(int argc, char** argv) {
  std::string host = "127.0.0.1", cert, key;
  unsigned short port = 4433;
  long count = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (i + 1 >= argc) return usage();
    if (a == "--host") host = argv[++i];
    else if (a == "--port") port = static_cast<unsigned short>(std::atoi(argv[++i]));
    else if (a == "--cert") cert = argv[++i];
    else if (a == "--key") key = argv[++i];
    else if (a == "--count") count = std::atol(argv[++i]);
    else return usage();
  }
  if (cert.empty() || key.empty()) return usage();
  if (!example::init_openssl()) {
    std::cerr << "server: OpenSSL initialisation (openssl.cnf) failed\n";
    return 1;
  }
  try {
    // tls_server (not tlsv12: that pins TLS 1.2), TLS 1.3 minimum so a TLS 1.3 group is used.
    ssl::context ctx(ssl::context::tls_server);
    SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_3_VERSION);
    ctx.use_certificate_chain_file(cert);
    ctx.use_private_key_file(key, ssl::context::pem);

    asio::io_context io;
    tcp::acceptor acceptor(io, tcp::endpoint(asio::ip::make_address(host), port));
    std::cout << "listening on " << acceptor.local_endpoint().port() << std::endl;
    for (long n = 0; count < 0 || n < count; ++n) {
      tcp::socket sock(io);
      acceptor.accept(sock);
      try {
        serve_one(std::move(sock), ctx);
      } catch (const std::exception& e) {
        std::cout << "server: connection failed: " << e.what() << std::endl;
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "server: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
