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
#include "tls_setup.hpp"

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
  std::string host = "127.0.0.1", cert, key, port_text = "4433", count_text = "-1";
  if (!example::parse_flags(argc, argv, {{"--host", &host}, {"--port", &port_text},
                                         {"--cert", &cert}, {"--key", &key},
                                         {"--count", &count_text}}) ||
      cert.empty() || key.empty()) {
    return usage();
  }
  const auto port = static_cast<unsigned short>(std::atoi(port_text.c_str()));
  const long count = std::atol(count_text.c_str());
  try {
    ssl::context ctx = example::server_context(cert, key);

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
