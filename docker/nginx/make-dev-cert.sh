#!/usr/bin/env bash
# Makes a self-signed certificate for local use of the compose stack:
# docker/nginx/certs/tls.{crt,key}, valid for localhost and *.loomworks.app.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/certs"
domain="${1:-loomworks.app}"
mkdir -p "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -days 365 \
  -subj "/CN=$domain" \
  -addext "subjectAltName=DNS:localhost,DNS:$domain,DNS:*.$domain" \
  -keyout "$dir/tls.key" -out "$dir/tls.crt"
chmod 600 "$dir/tls.key"
echo "wrote $dir/tls.crt and $dir/tls.key (self-signed, 365 days)"
