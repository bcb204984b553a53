#!/usr/bin/env bash
# Runs inside the pitr-agent image (`make images`), as its own user, with a
# host directory mounted at /wal_archive: PostgreSQL archives into it with
# `pitr-agent wal-push %p`, `pitr-agent backup` stores a base backup, and
# `pgrestore` brings the cluster back to a second between two inserts.
set -euo pipefail
say() { printf 'agent-image: %s\n' "$*"; }
[ "$(id -u)" != 0 ] || { echo "agent-image: runs as root, not as the image's user" >&2; exit 1; }
pitr-agent --version
pgrestore --version
work=$(mktemp -d)
export PGDATA=$work/data PGHOST=$work PGPORT=5432 PGUSER=postgres
initdb -D "$PGDATA" -U postgres --auth=trust >/dev/null
cat >> "$PGDATA/postgresql.auto.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$work'
archive_mode = on
archive_command = 'pitr-agent wal-push %p'
CONF
pitr-agent init --pgdata "$PGDATA"
pg_ctl -D "$PGDATA" -l "$work/server.log" -w start >/dev/null
q() { psql -X -A -t -q -v ON_ERROR_STOP=1 -c "$1"; }
archived() {
  local seg
  seg=$(q "SELECT pg_walfile_name(pg_switch_wal())")
  for _ in $(seq 1 300); do
    [ "$(q "SELECT last_archived_wal >= '$seg' FROM pg_stat_archiver")" = t ] && return 0
    sleep 0.1
  done
  echo "agent-image: $seg was not archived; server log:" >&2
  tail -20 "$work/server.log" >&2
  exit 1
}
q "CREATE TABLE t AS SELECT generate_series(1, 1000) AS id"
pitr-agent backup
q "INSERT INTO t SELECT generate_series(1001, 2000)"
archived
sleep 1.1
target=$(q "SELECT now()")
sleep 1.1
q "INSERT INTO t SELECT generate_series(2001, 3000)"
archived
pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
say "archived into /wal_archive: $(find /wal_archive/wal -name '*.gz' | wc -l) WAL objects"
pitr-agent list
pgrestore --target-time "$target" --pgdata "$work/restored" --port 5433 --socket-dir "$work" \
  --start --target-action promote
rows=$(PGPORT=5433 q "SELECT count(*) FROM t")
pg_ctl -D "$work/restored" -m fast -w stop >/dev/null
[ "$rows" = 2000 ] || { echo "agent-image: restored $rows rows, want 2000" >&2; exit 1; }
say "restored to $target: $rows rows, as before the third insert"
