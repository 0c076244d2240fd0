#!/usr/bin/env bash
# Certificates and keys for a fedprompt deployment (docs/deployment.md), made with openssl and ssh-keygen.
#
#   scripts/make-certs.sh DIR [--supernodes N] [--superlink-san LIST] [--service-san LIST]
#
# LIST is comma-separated subjectAltName entries, e.g. "DNS:link.example.org,IP:10.0.0.5".
# Every certificate also covers localhost, 127.0.0.1 and ::1. Writes into DIR (mode 700):
#
#   ca.crt ca.key                   the private CA; ca.crt goes to every host, ca.key stays with whoever signs
#   superlink.crt superlink.key     the SuperLink's server certificate (Fleet, Control and Runtime APIs)
#   service.crt service.key         the black-box service's (`fedprompt serve`) server certificate
#   runtime.crt runtime.key         loopback only: each SuperNode's Runtime API towards its own ClientApps
#   supernode-<i> supernode-<i>.pub SuperNode i's authentication key pair (EC P-384, OpenSSH format);
#                                   the private key stays on that node, the .pub is registered on the SuperLink
#
# Files that exist are kept (re-running adds what is missing, e.g. keys for more SuperNodes); delete DIR to
# start over. Keep DIR out of version control (certs/ and .certs/ are in .gitignore).
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
DIR=$1; shift
SUPERNODES=0; LINK_SAN=""; SERVICE_SAN=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --supernodes) SUPERNODES=$2; shift 2 ;;
    --superlink-san) LINK_SAN=$2; shift 2 ;;
    --service-san) SERVICE_SAN=$2; shift 2 ;;
    *) usage ;;
  esac
done
[[ $SUPERNODES =~ ^[0-9]+$ ]] || { echo "make-certs.sh: --supernodes needs a number, got '$SUPERNODES'" >&2; exit 2; }
command -v openssl >/dev/null || { echo "make-certs.sh: openssl not found" >&2; exit 1; }

mkdir -p "$DIR"; chmod 700 "$DIR"; cd "$DIR"
umask 077
DAYS=825  # the longest validity that common TLS clients accept for a server certificate
LOCAL_SAN="DNS:localhost,IP:127.0.0.1,IP:0:0:0:0:0:0:0:1"

if [[ ! -f ca.crt ]]; then
  openssl req -x509 -newkey rsa:4096 -sha256 -days "$DAYS" -nodes -keyout ca.key -out ca.crt \
    -subj "/CN=fedprompt deployment CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

server_cert() {  # NAME EXTRA_SAN
  local name=$1 san=$LOCAL_SAN${2:+,$2}
  [[ -f $name.crt ]] && return
  openssl req -newkey rsa:2048 -sha256 -nodes -keyout "$name.key" -out "$name.csr" -subj "/CN=fedprompt $name" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" -sha256 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
server_cert superlink "$LINK_SAN"
server_cert service "$SERVICE_SAN"
server_cert runtime ""

# SuperNode keys: Flower reads OpenSSH-format EC keys on a NIST curve.
for ((i = 0; i < SUPERNODES; i++)); do
  [[ -f supernode-$i ]] && continue
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedprompt-supernode-$i" -f "supernode-$i"
  else  # no OpenSSH client: the same key through Python's cryptography (a Flower dependency)
    "${PYTHON:-python3}" - "supernode-$i" <<'EOF'
import sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
open(sys.argv[1], "wb").write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
open(sys.argv[1] + ".pub", "wb").write(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + b"\n")
EOF
  fi
done
chmod 600 ./*.key supernode-* 2>/dev/null || true
chmod 644 ./*.crt ./*.pub 2>/dev/null || true
echo "make-certs.sh: CA, superlink, service, runtime certificates and $SUPERNODES SuperNode key pair(s) in $(pwd)"
