#!/usr/bin/python3
"""A plain HTTPS client on Python's ssl module: it knows nothing of QKD.

The key exchange group comes from openssl.cnf ([system_default_sect] Groups = qkd:X25519),
which OpenSSL reads when Python's ssl module creates its first context:

    OPENSSL_CONF=examples/alice-provider.cnf QKD_DEMO_DIR=$PWD \
        /usr/bin/python3 examples/python/https_client.py https://localhost:4433/ --cafile CA

Python 3.11 cannot name the negotiated group (ssl has no API for it) and
SSLContext.set_ecdh_curve('qkd') raises ValueError: set groups through openssl.cnf and check
the group on the server side (openssl s_server -www prints "Shared groups: qkd").
Use Debian's /usr/bin/python3, linked against the system OpenSSL 3.
"""
import argparse
import ssl
import sys
import urllib.parse
import socket


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--timeout", type=float, default=15.0)
    args = ap.parse_args()
    u = urllib.parse.urlsplit(args.url)
    host, port = u.hostname, u.port or 443
    ctx = ssl.create_default_context(cafile=args.cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with socket.create_connection((host, port), timeout=args.timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            print(f"# {ssl.OPENSSL_VERSION}, {s.version()}, {s.cipher()[0]}", file=sys.stderr)
            req = f"GET {u.path or '/'} HTTP/1.0\r\nHost: {host}\r\n\r\n"
            s.sendall(req.encode())
            chunks = []
            while True:
                try:
                    b = s.recv(65536)
                except (ssl.SSLEOFError, ConnectionResetError):
                    break
                if not b:
                    break
                chunks.append(b)
    sys.stdout.write(b"".join(chunks).decode(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
