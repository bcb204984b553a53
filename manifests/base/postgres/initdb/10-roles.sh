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
echo "host replication postgres all scram-sha-256" >> "$PGDATA/pg_hba.conf"
echo "initdb: role $ODOO_DB_USER created; replication for the backup job allowed with a password"
