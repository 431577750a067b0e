#!/usr/bin/env bash
# Makes a demo PKI with the openssl command: one CA, a certificate per KME and per SAE.
# Usage: examples/pki.sh OUTDIR [NAME ...]
#   Default names: alice-kme bob-kme alice bob mallory.
#   Every certificate has CN=<name>, SANs localhost and 127.0.0.1, and both serverAuth and
#   clientAuth, so a KME certificate serves HTTPS and authenticates to its peer KME, and an
#   SAE certificate authenticates to its KME and can also serve a TLS application.
# Keys are EC P-256, owner-only (0600). Existing files are kept (idempotent).
set -euo pipefail
out=${1:?usage: $0 OUTDIR [NAME ...]}
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(alice-kme bob-kme alice bob mallory)
mkdir -p "$out"
cd "$out"
umask 077
if [ ! -f ca.crt ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout ca.key -out ca.crt -days 3650 -subj "/CN=qkd-demo-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
fi
for n in "${names[@]}"; do
  [ -f "$n.crt" ] && continue
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$n.key" -out "$n.csr" -subj "/CN=$n" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" > "$n.ext"
  openssl x509 -req -in "$n.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile "$n.ext" -out "$n.crt" 2>/dev/null
  rm -f "$n.csr" "$n.ext"
done
chmod 644 ./*.crt
