#!/bin/sh
# Creates the certificates config/examples/mtls-gateway.toml uses, with openssl (ECDSA P-256):
#
#   ca.pem                            root of trust domain example.test (the trust bundle)
#   server.pem, server-key.pem        gateway.example.test, signed by ca.pem
#   client.pem, client-key.pem        X509-SVID spiffe://example.test/client, signed by ca.pem
#   other-ca.pem                      root of trust domain other.test
#   wrong-client.pem, wrong-client-key.pem
#                                     X509-SVID spiffe://other.test/client (refused by the gateway)
#
# Usage: make.sh [OUTPUT_DIR]   (default: the directory of this script)
# The files are not committed (see .gitignore); run this again to renew them (valid 30 days).
set -eu

out=${1:-$(dirname "$0")}
mkdir -p "$out"
cd "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
umask 077

key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

# ca NAME TRUST_DOMAIN
ca() {
    key "$tmp/$1-key.pem"
    cat >"$tmp/$1.cnf" <<CNF
[req]
distinguished_name = dn
prompt = no
x509_extensions = ext
[dn]
O = $2
CN = $2 root
[ext]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
subjectAltName = URI:spiffe://$2
CNF
    openssl req -x509 -new -key "$tmp/$1-key.pem" -days 30 -sha256 \
        -config "$tmp/$1.cnf" -out "$1.pem"
}

# leaf NAME CA SAN EKU
leaf() {
    key "$1-key.pem"
    cat >"$tmp/$1.cnf" <<CNF
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = $4
subjectAltName = $3
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
    openssl req -new -key "$1-key.pem" -subj "/O=meshgate example" -out "$tmp/$1.csr"
    openssl x509 -req -in "$tmp/$1.csr" -CA "$2.pem" -CAkey "$tmp/$2-key.pem" \
        -CAcreateserial -CAserial "$tmp/$2.srl" -days 30 -sha256 \
        -extfile "$tmp/$1.cnf" -out "$1.pem" 2>/dev/null
}

ca ca example.test
ca other-ca other.test
leaf server ca "DNS:gateway.example.test" "serverAuth"
leaf client ca "URI:spiffe://example.test/client" "clientAuth, serverAuth"
leaf wrong-client other-ca "URI:spiffe://other.test/client" "clientAuth, serverAuth"
chmod 0644 ./*.pem
chmod 0600 ./*-key.pem
echo "wrote ca.pem server.pem client.pem wrong-client.pem (and keys) to $(pwd)"
