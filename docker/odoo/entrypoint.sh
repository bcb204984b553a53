#!/usr/bin/env bash
# Entrypoint of the Loomworks ERP image.
#   1. writes odoo.conf from the environment (no credential is baked into the
#      image or printed);
#   2. waits for PostgreSQL with exponential backoff, up to DB_WAIT_TIMEOUT
#      (60 s), and fails with a clear message;
#   3. applies module updates to the databases in ODOO_DB when the image
#      version changed, after a restore point that undoes them
#      (ODOO_UPGRADE_RESTORE_POINT=off skips it), and logs what it did;
#   4. runs Odoo and, on SIGTERM, lets it finish in-flight requests for up to
#      ODOO_STOP_TIMEOUT (30 s) before it is killed.
# Any other command (bash, odoo shell ...) runs as given, without these steps.
set -euo pipefail

log() { printf 'entrypoint: %s\n' "$*"; }
die() { printf 'entrypoint: error: %s\n' "$*" >&2; exit 1; }

if [ "${1:-odoo}" != odoo ]; then
  exec "$@"
fi
shift || true

: "${DB_HOST:=postgres}" "${DB_PORT:=5432}" "${DB_USER:=odoo}"
: "${PROXY_MODE:=True}" "${ODOO_WORKERS:=2}" "${ODOO_DBFILTER:=^%d$}"
: "${ODOO_DATA_DIR:=/var/lib/odoo}" "${ODOO_STOP_TIMEOUT:=30}"
: "${ODOO_RC:=/tmp/odoo/odoo.conf}" "${ODOO_LIST_DB:=False}"
: "${ODOO_IMAGE_VERSION:=unknown}" "${ODOO_UPDATE:=all}"
if [ -n "${DB_PASSWORD_FILE:-}" ]; then
  [ -r "$DB_PASSWORD_FILE" ] || die "DB_PASSWORD_FILE=$DB_PASSWORD_FILE is not readable"
  DB_PASSWORD="$(cat "$DB_PASSWORD_FILE")"
fi
[ -n "${DB_PASSWORD:-}" ] || die "DB_PASSWORD (or DB_PASSWORD_FILE) is not set; Odoo needs the database password"
export DB_HOST DB_PORT DB_USER DB_PASSWORD
for value in "$DB_PASSWORD" "${ODOO_ADMIN_PASSWD:-}"; do
  case "$value" in *$'\n'*) die "a password contains a newline, which odoo.conf cannot hold" ;; esac
done

# 1. odoo.conf, readable by this user only.
umask 077
mkdir -p "$(dirname "$ODOO_RC")"
{
  echo "[options]"
  echo "db_host = $DB_HOST"
  echo "db_port = $DB_PORT"
  echo "db_user = $DB_USER"
  echo "db_password = $DB_PASSWORD"
  if [ -n "${ODOO_ADMIN_PASSWD:-}" ]; then echo "admin_passwd = $ODOO_ADMIN_PASSWD"; fi
  echo "proxy_mode = $PROXY_MODE"
  echo "workers = $ODOO_WORKERS"
  echo "max_cron_threads = ${ODOO_MAX_CRON_THREADS:-1}"
  echo "http_port = 8069"
  echo "gevent_port = 8072"
  echo "data_dir = $ODOO_DATA_DIR"
  echo "addons_path = ${ODOO_ADDONS_PATH:-/opt/odoo/addons}"
  echo "dbfilter = $ODOO_DBFILTER"
  echo "list_db = $ODOO_LIST_DB"
  echo "limit_time_cpu = ${ODOO_LIMIT_TIME_CPU:-600}"
  echo "limit_time_real = ${ODOO_LIMIT_TIME_REAL:-1200}"
  echo "limit_memory_soft = ${ODOO_LIMIT_MEMORY_SOFT:-2147483648}"
  echo "limit_memory_hard = ${ODOO_LIMIT_MEMORY_HARD:-2684354560}"
  echo "log_level = ${ODOO_LOG_LEVEL:-info}"
} > "$ODOO_RC"
umask 022
[ -n "${ODOO_ADMIN_PASSWD:-}" ] || log "ODOO_ADMIN_PASSWD is not set: the database manager is locked (list_db = $ODOO_LIST_DB)"
log "odoo.conf written to $ODOO_RC (workers=$ODOO_WORKERS, proxy_mode=$PROXY_MODE, dbfilter=$ODOO_DBFILTER)"

# 2. The database.
python3 "$(dirname "$0")/wait_for_db.py" || exit 1

# 3. Module updates, once per image version and database.
if [ -n "${ODOO_DB:-}" ]; then
  IFS=',' read -r -a databases <<< "$ODOO_DB"
  for db in "${databases[@]}"; do
    marker="$ODOO_DATA_DIR/.image-version.$db"
    current="$(cat "$marker" 2>/dev/null || echo none)"
    if [ "$current" = "$ODOO_IMAGE_VERSION" ]; then
      log "migrations: database $db is up to date (image $ODOO_IMAGE_VERSION)"
      continue
    fi
    log "migrations: database $db: updating modules '$ODOO_UPDATE' ($current -> $ODOO_IMAGE_VERSION)"
    started=$(date +%s)
    # The undo point: pgrestore --target-name brings database and filestore
    # back to the moment before the update.
    if [ "${ODOO_UPGRADE_RESTORE_POINT:-on}" != off ]; then
      python3 "$(dirname "$0")/restore_point.py" "$db" "$current" "$ODOO_IMAGE_VERSION" ||
        die "migrations: no restore point, so database $db was not updated (see the line above)"
    fi
    # One replica at a time: the lock lives on the shared filestore.
    if ! flock "$ODOO_DATA_DIR/.migrate.lock" \
        odoo -c "$ODOO_RC" -d "$db" -u "$ODOO_UPDATE" --stop-after-init --no-http; then
      die "migrations: updating database $db failed (see the log above); the previous image still matches it"
    fi
    echo "$ODOO_IMAGE_VERSION" > "$marker"
    log "migrations: database $db updated in $(( $(date +%s) - started )) s"
  done
else
  log "migrations: ODOO_DB is not set; no database updated (set ODOO_DB=db1,db2 to update modules on start)"
fi

# 4. Odoo, with SIGTERM forwarded and bounded.
odoo_pid=""
killer=""
stopping=0
# shellcheck disable=SC2317  # called by the trap
stop() {
  stopping=1
  log "SIGTERM: Odoo finishes in-flight requests (up to ${ODOO_STOP_TIMEOUT} s)"
  if [ -n "$odoo_pid" ]; then kill -TERM "$odoo_pid" 2>/dev/null || true; fi
  ( sleep "$ODOO_STOP_TIMEOUT"; kill -KILL "$odoo_pid" 2>/dev/null ) &
  killer=$!
}
trap stop TERM INT
if [ "${ODOO_DEBUGPY:-0}" = 1 ]; then
  # Development only (docker-compose.dev.yml): attach an IDE on port 5678.
  log "debugpy listening on 0.0.0.0:5678"
  python3 -m debugpy --listen 0.0.0.0:5678 "$(command -v odoo)" -c "$ODOO_RC" "$@" &
else
  odoo -c "$ODOO_RC" "$@" &
fi
odoo_pid=$!
status=0
while :; do
  wait "$odoo_pid" && status=0 || status=$?
  kill -0 "$odoo_pid" 2>/dev/null || break
done
if [ -n "$killer" ]; then kill "$killer" 2>/dev/null || true; fi
if [ "$stopping" = 1 ]; then
  log "Odoo stopped (status $status)"
  exit 0
fi
exit "$status"
