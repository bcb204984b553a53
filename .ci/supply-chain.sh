#!/usr/bin/env bash
# Supply chain: licenses, banned crates (no OpenSSL) and sources with
# cargo-deny (deny.toml), offline; then known vulnerabilities with
# cargo-deny's advisories and cargo-audit when the RustSec database can be
# fetched. Where it cannot (a machine that reaches only package
# registries), the advisory checks are skipped and say so.
set -euo pipefail
cd "$(dirname "$0")/.."
echo ">> cargo deny check licenses bans sources (offline)"
cargo deny --offline check licenses bans sources
db=https://github.com/rustsec/advisory-db
if timeout 15 git ls-remote --heads "$db" >/dev/null 2>&1; then
  echo ">> cargo deny check advisories; cargo audit"
  cargo deny check advisories
  cargo audit --deny warnings
else
  echo ">> advisories SKIPPED: the RustSec database ($db) cannot be fetched from this machine;"
  echo "   run .ci/supply-chain.sh where GitHub is reachable before a release"
fi
