"""Creates the restore point before a module update (the entrypoint's
migration step), so that `pgrestore --target-name NAME` undoes a failed
upgrade to the moment before it, filestore included.

python3 restore_point.py DB FROM TO: prints the name and its WAL position;
exit 1, with what to grant, when the role may not create restore points.
Reads DB_HOST, DB_PORT, DB_USER, DB_PASSWORD; the password is never printed.
"""

import datetime
import os
import sys

import psycopg2

# PostgreSQL keeps at most 63 bytes of a restore point's name.
MAX_NAME = 63


def name_for(db: str, old: str, new: str, now: datetime.datetime) -> str:
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    tail = f" {old}->{new} {stamp}"
    room = MAX_NAME - len("odoo-upgrade ") - len(tail.encode())
    short = db.encode()[: max(room, 1)].decode(errors="ignore")
    return f"odoo-upgrade {short}{tail}"[:MAX_NAME]


def main() -> int:
    db, old, new = sys.argv[1:4]
    name = name_for(db, old, new, datetime.datetime.now(datetime.timezone.utc))
    try:
        with psycopg2.connect(
            host=os.environ.get("DB_HOST", "postgres"),
            port=int(os.environ.get("DB_PORT", "5432")),
            user=os.environ.get("DB_USER", "odoo"),
            password=os.environ.get("DB_PASSWORD", ""),
            dbname="postgres",
            connect_timeout=10,
        ) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_create_restore_point(%s)::text", (name,))
            lsn = cur.fetchone()[0]
    except psycopg2.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        print(
            f"entrypoint: error: cannot create the restore point before updating {db}: {first}. "
            f"Grant it once as a superuser: GRANT EXECUTE ON FUNCTION "
            f"pg_create_restore_point(text) TO {os.environ.get('DB_USER', 'odoo')}; "
            "or set ODOO_UPGRADE_RESTORE_POINT=off to update without one",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(
        f"entrypoint: migrations: restore point '{name}' at {lsn}; undo this upgrade with "
        f"pgrestore --target-name '{name}' --filestore DIR",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
