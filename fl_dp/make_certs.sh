#!/usr/bin/env bash
# Generate what a TLS federation with SuperNode authentication needs: a private CA, the SuperLink's
# server certificate and one ECDSA P-384 OpenSSH key pair per SuperNode. Needs only openssl and ssh-keygen.
#
#   fl-dp certs [--out DIR] [--clients N] [--san DNS:name|IP:addr ...] [--days D] [--force]
#
# DIR (default outputs/deploy/certs) gets:
#   ca.crt                 the CA certificate: give it to every SuperNode and every `flwr` CLI user
#   ca.key                 the CA's private key: keep it offline, no service needs it
#   server.pem server.key  the SuperLink's certificate and key (SANs: localhost, 127.0.0.1, ::1,
#                          superlink (the compose service name), and every --san you add)
#   client-<i>.key         SuperNode i's private key (stays on client machine i)
#   client-<i>.pub         its public key: register it with `flwr supernode register client-<i>.pub CONN`
#
# Add a --san for every name or address SuperNodes and CLI users dial, e.g. for separate machines:
#   fl-dp certs --san DNS:fl.example.org --san IP:203.0.113.10
# Existing files are kept (a second run only adds missing clients) unless --force is given.
set -euo pipefail

OUT="outputs/deploy/certs"
CLIENTS=3
DAYS=365
FORCE=0
SANS=("DNS:localhost" "IP:127.0.0.1" "IP:::1" "DNS:superlink")

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while (($#)); do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --san) SANS+=("$2"); shift 2 ;;
        --days) DAYS="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done
for san in "${SANS[@]}"; do
    [[ "$san" =~ ^(DNS|IP): ]] || { echo "--san must look like DNS:name or IP:address, got '$san'" >&2; exit 2; }
done
[[ "$CLIENTS" =~ ^[0-9]+$ ]] || { echo "--clients must be a whole number" >&2; exit 2; }

command -v openssl >/dev/null || { echo "openssl is required" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "ssh-keygen is required (package openssh-client)" >&2; exit 1; }

mkdir -p "$OUT"
cd "$OUT"
umask 077

if ((FORCE)); then
    rm -f ca.crt ca.key ca.srl server.pem server.key server.sans client-*.key client-*.pub
fi

if [[ ! -s ca.key || ! -s ca.crt ]]; then
    openssl req -x509 -new -nodes -newkey rsa:3072 -sha256 -days "$DAYS" \
        -keyout ca.key -out ca.crt -subj "/CN=fl-dp federation CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    rm -f server.pem server.key  # a new CA needs a new server certificate
    echo "created CA: $OUT/ca.crt"
fi

san_line="$(IFS=,; echo "${SANS[*]}")"
if [[ -s server.pem && -s server.key && "$(cat server.sans 2>/dev/null)" == "$san_line" ]]; then
    :  # up to date
else
    ext="$(mktemp)"
    trap 'rm -f "$ext" server.csr' EXIT
    cat >"$ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san_line
EOF
    openssl req -new -nodes -newkey rsa:3072 -sha256 -keyout server.key -out server.csr \
        -subj "/CN=superlink" 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" -sha256 \
        -extfile "$ext" -out server.pem 2>/dev/null
    rm -f server.csr "$ext"
    echo "$san_line" >server.sans
    trap - EXIT
    echo "created server certificate: $OUT/server.pem (SANs: $san_line)"
fi

for ((i = 0; i < CLIENTS; i++)); do
    if [[ ! -s "client-$i.key" ]]; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fl-dp-client-$i" -f "client-$i.key"
        mv "client-$i.key.pub" "client-$i.pub"
        echo "created SuperNode key pair: $OUT/client-$i.key (+ .pub)"
    fi
done

chmod 644 ca.crt server.pem server.sans client-*.pub 2>/dev/null || true
openssl verify -CAfile ca.crt server.pem >/dev/null
