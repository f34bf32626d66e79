#!/usr/bin/env sh
# Make a private CA, the SuperLink's TLS certificate and SuperNode auth keys for a Flower deployment.
# Usage: cluster/flower/make-certs.sh [OUT=cluster/flower/secrets] [CLIENTS=2] [--host NAME ...] [--force]
# Keeps an existing CA/server certificate and keys (a restart must not lock out registered SuperNodes).
# Writes OUT/certs/{ca.crt,server.pem,server.key} and OUT/keys/client_<i>{,.pub} (OpenSSH ECDSA P-384).
# Thin wrapper: the work is in orchard.federated.certs (Python `cryptography`), so the same code runs
# in a container that has orchard installed and on a host without openssl.
set -eu
OUT="${1:-cluster/flower/secrets}"
CLIENTS="${2:-2}"
[ $# -ge 2 ] && shift 2 || shift $#
exec "${PYTHON:-python}" -m orchard.federated.certs "$OUT" --clients "$CLIENTS" "$@"
