#!/usr/bin/env bash
# First start of an empty data directory only: the Odoo role, and a
# password-authenticated replication line for the backup CronJob (which
# connects over the network; sidecars use the pod's Unix socket).
set -euo pipefail
: "${ODOO_DB_USER:?}" "${ODOO_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username postgres --dbname postgres \
  --set=role="$ODOO_DB_USER" --set=password="$ODOO_DB_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN CREATEDB PASSWORD %L', :'role', :'password') \gexec
-- The Odoo entrypoint's restore point before each module update; nothing
-- else of the superuser's.
SELECT format('GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO %I', :'role') \gexec
SQL
if [ -n "${KEYCLOAK_DB_PASSWORD:-}" ]; then
  psql -v ON_ERROR_STOP=1 --username postgres --dbname postgres \
    --set=password="$KEYCLOAK_DB_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE keycloak LOGIN PASSWORD %L', :'password') \gexec
CREATE DATABASE keycloak OWNER keycloak;
SQL
  echo "initdb: role and database keycloak created"
fi
# The backup CronJob's role (Kubernetes sets PITR_BACKUP_PASSWORD; the
# compose stack's agent uses the Unix socket): replication and the
# monitoring views, no superuser (docs/security.md names the grants).
if [ -n "${PITR_BACKUP_PASSWORD:-}" ]; then
  psql -v ON_ERROR_STOP=1 --username postgres --dbname postgres \
    --set=password="$PITR_BACKUP_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE pitr_backup LOGIN REPLICATION PASSWORD %L', :'password') \gexec
GRANT pg_monitor TO pitr_backup;
SQL
  cat >> "$PGDATA/pg_hba.conf" <<'HBA'
host replication pitr_backup all scram-sha-256
host postgres    pitr_backup all scram-sha-256
HBA
  echo "initdb: role pitr_backup created; the backup job connects as it with a password"
fi
echo "initdb: role $ODOO_DB_USER created"
