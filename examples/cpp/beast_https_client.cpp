// beast-https-client: a minimal HTTPS client on Boost.Beast + Asio + OpenSSL. It knows
// nothing of QKD: its TLS context has default settings, so the key exchange groups (and the
// providers that implement them) come from openssl.cnf, e.g.
//   export OPENSSL_CONF=examples/alice-provider.cnf QKD_DEMO_DIR=$PWD
//   build/bin/beast-https-client --host localhost --port 4433 --cafile ca.crt
// Verifies the server's certificate and host name, prints
// "client: group=NAME protocol=TLSv1.3 ...", the HTTP status and the body. Exit 0 on a 200.
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/version.hpp>

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
  std::cerr << "usage: beast-https-client --cafile FILE [--host NAME] [--port N] "
               "[--target PATH]\n";
  return 2;
}
}  // namespace

int main(int argc, char** argv) {
  std::string host = "localhost", port = "4433", cafile, target = "/";
  if (!example::parse_flags(argc, argv, {{"--host", &host}, {"--port", &port},
                                         {"--cafile", &cafile}, {"--target", &target}}) ||
      cafile.empty()) {
    return usage();
  }
  try {
    ssl::context ctx = example::client_context(cafile);

    asio::io_context io;
    beast::ssl_stream<beast::tcp_stream> stream(io, ctx);
    SSL_set_tlsext_host_name(stream.native_handle(), host.c_str());  // SNI
    stream.set_verify_callback(ssl::host_name_verification(host));
    stream.next_layer().expires_after(std::chrono::seconds(30));
    stream.next_layer().connect(tcp::resolver(io).resolve(host, port));
    stream.handshake(ssl::stream_base::client);
    std::cout << "client: " << example::tls_report(stream.native_handle()) << std::endl;

    http::request<http::empty_body> req{http::verb::get, target, 11};
    req.set(http::field::host, host);
    req.set(http::field::user_agent, BOOST_BEAST_VERSION_STRING);
    http::write(stream, req);
    beast::flat_buffer buf;
    http::response<http::string_body> res;
    http::read(stream, buf, res);
    std::cout << "client: HTTP " << res.result_int() << "\n" << res.body() << std::flush;

    beast::error_code ec;
    stream.shutdown(ec);  // a peer that closes without close_notify is not an error here
    return res.result() == http::status::ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "client: " << e.what() << "\n";
    return 1;
  }
}
