#!/usr/bin/python3
"""A plain HTTPS server on Python's http.server + ssl: it knows nothing of QKD.

The key exchange group comes from openssl.cnf ([system_default_sect] Groups = qkd:X25519):

    OPENSSL_CONF=examples/bob-provider.cnf QKD_DEMO_DIR=$PWD \
        /usr/bin/python3 examples/python/https_server.py --port 4433 --cert C --key K

Answers every GET with "hello from python <TLS version>". Prints "listening on PORT" when
ready. Use Debian's /usr/bin/python3, linked against the system OpenSSL 3.
"""
import argparse
import http.server
import ssl
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = f"hello from python {self.connection.version()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("request: " + fmt % args + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=4433)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    args = ap.parse_args()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    srv = http.server.HTTPServer((args.host, args.port), Handler)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"listening on {srv.server_address[1]} ({ssl.OPENSSL_VERSION})", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
