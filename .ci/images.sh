#!/usr/bin/env bash
# `make images`: builds both images without a Docker engine and runs them.
#
#  1. Stand-in bases from Debian's mirror (mmdebstrap), each holding only
#     what the production base provides: postgres:<major>-bookworm becomes
#     Debian's postgresql-15 with the postgres user at uid 999;
#     python:3.11-slim-bookworm becomes Debian's python3 (3.11) with venv and
#     headers. The Rust stage is replaced by the binaries cargo built here
#     (BINARIES=prebuilt).
#  2. Both images with `buildah bud --pull=never` (vfs storage, chroot
#     isolation), Odoo from a stand-in source tarball served on loopback
#     (nightly.odoo.com is out of reach): a wrong ODOO_SHA256 must fail the
#     build, the right one must pass.
#  3. Each image's size, failing above 1 GB (seed 003).
#  4. Inside the images: the binaries run as the image's non-root user;
#     PostgreSQL archives with `pitr-agent wal-push %p` into a mounted
#     directory and pgrestore brings it back to a second; the Odoo
#     entrypoint runs as uid 1000 against a PostgreSQL on the host's
#     loopback; each image's HEALTHCHECK passes against a live server and
#     fails once it is gone.
#
# Runs as root (buildah's chroot isolation, mmdebstrap --mode=root).
# PITR_IMAGES_DIR (default /var/tmp/pitr-images) keeps the bases between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
say() { printf '== images: %s\n' "$*"; }
die() { printf 'images: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root: buildah's chroot isolation and mmdebstrap --mode=root need it"

export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
work=${PITR_IMAGES_DIR:-/var/tmp/pitr-images}
limit=1000000000
mkdir -p "$work"

missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

# The binaries: release by default; PITR_IMAGES_PROFILE=debug takes the
# ones `make test` built (CI), which run the same code, only slower.
profile=${PITR_IMAGES_PROFILE:-release}
say "building the binaries (cargo build, $profile profile)"
if [ "$profile" = release ]; then
  cargo build --release --locked -q -p pitr-agent -p pgrestore
else
  # The selection `make test` builds with, so that nothing is rebuilt.
  cargo build --locked -q --workspace --all-targets
fi
bin_dir=target/image-bin
rm -rf "$bin_dir"
mkdir -p "$bin_dir"
for b in pitr-agent pgrestore; do
  strip -o "$bin_dir/$b" "target/$profile/$b"
done

# Builds (once) a stand-in base image NAME from Debian packages.
standin() {
  local name=$1 tar=$2 packages=$3 hook=$4 path=$5
  shift 5
  if buildah inspect --type image "$name" >/dev/null 2>&1; then
    say "stand-in base $name is there"
    return
  fi
  say "stand-in base $name: mmdebstrap bookworm with $packages"
  mmdebstrap --quiet --variant=minbase --mode=root --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="$hook" bookworm "$work/$tar"
  local c
  c=$(buildah from scratch)
  buildah add "$c" "$work/$tar" / >/dev/null
  buildah config --env PATH="$path" --env LANG=C.UTF-8 "$@" "$c"
  buildah commit -q --rm "$c" "$name" >/dev/null
  rm -f "$work/$tar"
}
pg_base=localhost/standin/postgres:15-bookworm
py_base=localhost/standin/python:3.11-slim-bookworm
sys_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# shellcheck disable=SC2016  # $1 is mmdebstrap's, expanded in its hook
standin "$pg_base" pg.tar postgresql-15,ca-certificates \
  'chroot "$1" sh -c "pg_dropcluster 15 main; groupmod -g 999 postgres && usermod -u 999 postgres && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql /var/log/postgresql"' \
  "$sys_path:/usr/lib/postgresql/15/bin" --env PG_MAJOR=15
standin "$py_base" py.tar python3,python3-venv,python-is-python3,libpython3.11-dev,ca-certificates \
  'true' "$sys_path"

# This machine may reach PyPI through a TLS proxy whose CA only the host
# trusts: lend the host's CA bundle and pip settings to the build's RUNs.
lend=()
[ -f /etc/ssl/certs/ca-certificates.crt ] &&
  lend+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
[ -f /etc/pip.conf ] && lend+=(-v /etc/pip.conf:/etc/pip.conf:ro)

say "buildah bud pitr-agent (docker/pitr-agent/Dockerfile)"
buildah bud --quiet --pull=never --format docker --layers=false \
  -f docker/pitr-agent/Dockerfile \
  --build-arg PG_MAJOR=15 --build-arg BASE_IMAGE="$pg_base" --build-arg BINARIES=prebuilt \
  --build-arg PREBUILT_DIR="$bin_dir" \
  -t localhost/pitr-agent:ci . >/dev/null

# The stand-in Odoo source, served on loopback for the Dockerfile's download.
tarball=$work/serve/odoo-standin.tar.gz
mkdir -p "$work/serve"
tar czf "$tarball" -C docker/tests standin-odoo
sha=$(sha256sum "$tarball" | cut -d' ' -f1)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work/serve" >/dev/null 2>&1 &
http_pid=$!
pg_dir=""
cleanup() {
  kill "$http_pid" 2>/dev/null || true
  for c in $(buildah containers -q 2>/dev/null); do buildah rm "$c" >/dev/null 2>&1 || true; done
  if [ -n "$pg_dir" ] && [ -f "$pg_dir/data/postmaster.pid" ]; then
    runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ -n "$pg_dir" ]; then rm -rf "$pg_dir"; fi
}
trap cleanup EXIT
odoo_build() {
  buildah bud --quiet --pull=never --format docker --layers=false "${lend[@]}" \
    --build-arg BASE_IMAGE="$py_base" \
    --build-arg ODOO_URL="http://127.0.0.1:$port/odoo-standin.tar.gz" \
    --build-arg ODOO_SHA256="$1" -t localhost/odoo:ci docker/odoo
}
say "buildah bud odoo with a wrong ODOO_SHA256: must fail at the download"
if out=$(odoo_build "$(printf '0%.0s' $(seq 64))" 2>&1); then
  die "the Odoo image built with a wrong ODOO_SHA256"
fi
grep -q "fetch_odoo: error: .* has sha256 $sha, but ODOO_SHA256 is 0000" <<<"$out" ||
  die "the wrong-digest build failed for another reason: $out"
say "buildah bud odoo (docker/odoo/Dockerfile) with the stand-in tarball's sha256"
odoo_build "$sha" >/dev/null
buildah rmi --prune >/dev/null 2>&1 || true

# Size: the unpacked root file system, as `docker images` reports it.
for image in localhost/pitr-agent:ci localhost/odoo:ci; do
  c=$(buildah from --pull-never "$image")
  bytes=$(du -s -B1 --apparent-size "$(buildah mount "$c")" | cut -f1)
  buildah umount "$c" >/dev/null
  buildah rm "$c" >/dev/null
  say "$image: $((bytes / 1000000)) MB (limit 1000 MB)"
  [ "$bytes" -le "$limit" ] || die "$image is $bytes bytes, above seed 003's 1 GB"
done

# The image's HEALTHCHECK command, run in container $2.
healthcheck() {
  local image=$1 c=$2
  local -a test
  mapfile -d '' -t test < <(buildah inspect --type image "$image" | python3 -c '
import json, sys
t = json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"]
assert t[0] == "CMD", t
sys.stdout.write("\0".join(t[1:]))')
  [ ${#test[@]} -gt 0 ] || die "$image has no HEALTHCHECK"
  timeout 20 buildah run "$c" -- "${test[@]}" >/dev/null 2>&1
}
# Waits for "$2" in file $1, or dies naming what it waited for.
wait_for_line() {
  for _ in $(seq 1 200); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  die "no \"$2\" in $1: $(cat "$1")"
}

say "in pitr-agent:ci: archive, back up and restore PostgreSQL as the image's user"
run=$(mktemp -d "$work/run.XXXXXX")
mkdir -p "$run/wal"
chown 999:999 "$run/wal"
c=$(buildah from --pull-never localhost/pitr-agent:ci)
buildah run -v "$run/wal:/wal_archive" -v "$root/docker/tests:/tests:ro" "$c" -- /tests/agent-image.sh
say "in pitr-agent:ci: the HEALTHCHECK against the daemon"
python3 -c 'import socket; socket.socket().bind(("127.0.0.1", 9188))' 2>/dev/null ||
  die "port 9188 is taken; the image's HEALTHCHECK probes it"
# shellcheck disable=SC2016  # $$ is the container shell's
buildah run -v "$run/wal:/wal_archive" --env PITR_LISTEN=127.0.0.1:9188 \
  --env PITR_REHEARSE_SCHEDULE= "$c" -- \
  sh -c 'echo $$ > /wal_archive/daemon.pid; exec pitr-agent daemon' >"$run/daemon.log" 2>&1 &
daemon_job=$!
for _ in $(seq 1 100); do healthcheck localhost/pitr-agent:ci "$c" && break; sleep 0.2; done
healthcheck localhost/pitr-agent:ci "$c" || die "the agent's HEALTHCHECK fails against a running daemon: $(cat "$run/daemon.log")"
kill -TERM "$(cat "$run/wal/daemon.pid")"
wait "$daemon_job" || true
if healthcheck localhost/pitr-agent:ci "$c"; then die "the agent's HEALTHCHECK passes with no daemon"; fi
buildah rm "$c" >/dev/null

say "in odoo:ci: the entrypoint as uid 1000 against PostgreSQL on the host's loopback"
pg_dir=$(mktemp -d)
chown postgres: "$pg_dir"
pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D "$pg_dir/data" -U postgres \
  --auth-local=trust --auth-host=scram-sha-256 >/dev/null
runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$pg_dir/data" -l "$pg_dir/log" -w \
  -o "-p $pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$pg_dir" start >/dev/null
runuser -u postgres -- /usr/lib/postgresql/15/bin/psql -h "$pg_dir" -p "$pg_port" -X -q \
  -c "CREATE ROLE odoo LOGIN CREATEDB PASSWORD 'odoo-ci-secret'" -c "CREATE DATABASE odoo OWNER odoo" \
  -c "GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO odoo"
c=$(buildah from --pull-never localhost/odoo:ci)
mkdir -p "$run/pid"
chmod 0777 "$run/pid"
# shellcheck disable=SC2016  # $$ is the container shell's
buildah run -v "$run/pid:/ci-pid" --env DB_HOST=127.0.0.1 --env DB_PORT="$pg_port" --env DB_USER=odoo \
  --env DB_PASSWORD=odoo-ci-secret --env ODOO_DB=odoo --env ODOO_ADMIN_PASSWD=ci "$c" -- \
  sh -c 'echo $$ > /ci-pid/entrypoint; exec /usr/local/bin/entrypoint.sh odoo' >"$run/odoo.log" 2>&1 &
odoo_job=$!
wait_for_line "$run/odoo.log" "odoo: serving on 8069 as uid 1000"
grep -q "migrations: restore point 'odoo-upgrade odoo " "$run/odoo.log" ||
  die "no restore point before the update: $(cat "$run/odoo.log")"
grep -q "migrations: database odoo updated" "$run/odoo.log" || die "no migration step: $(cat "$run/odoo.log")"
if grep -q "odoo-ci-secret" "$run/odoo.log"; then die "the entrypoint printed the password"; fi
healthcheck localhost/odoo:ci "$c" || die "Odoo's HEALTHCHECK fails with the database up: $(cat "$run/odoo.log")"
say "in odoo:ci: the database goes away; the HEALTHCHECK must fail"
runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$pg_dir/data" -m fast -w stop >/dev/null
if healthcheck localhost/odoo:ci "$c"; then die "Odoo's HEALTHCHECK passes with the database gone"; fi
say "in odoo:ci: SIGTERM stops Odoo cleanly"
kill -TERM "$(cat "$run/pid/entrypoint")"
status=0
wait "$odoo_job" || status=$?
if [ "$status" != 0 ] || ! grep -q "Odoo stopped" "$run/odoo.log"; then
  die "the entrypoint exited $status on SIGTERM: $(cat "$run/odoo.log")"
fi
rm -rf "$run"
say "both images built, sized and run"
