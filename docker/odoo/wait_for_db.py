"""Waits for PostgreSQL to accept connections, with exponential backoff.

Exit 0 once a connection succeeds; exit 1 after DB_WAIT_TIMEOUT seconds
(default 60) with the last error and what to check. Reads DB_HOST, DB_PORT,
DB_USER, DB_PASSWORD; the password is never printed.
"""

import os
import sys
import time

import psycopg2


def main() -> int:
    host = os.environ.get("DB_HOST", "postgres")
    port = int(os.environ.get("DB_PORT", "5432"))
    user = os.environ.get("DB_USER", "odoo")
    timeout = float(os.environ.get("DB_WAIT_TIMEOUT", "60"))
    deadline = time.monotonic() + timeout
    delay, attempt, last = 1.0, 0, "no attempt made"
    while True:
        attempt += 1
        try:
            psycopg2.connect(
                host=host,
                port=port,
                user=user,
                password=os.environ.get("DB_PASSWORD", ""),
                dbname="postgres",
                connect_timeout=5,
            ).close()
            print(f"entrypoint: PostgreSQL at {host}:{port} is up (attempt {attempt})", flush=True)
            return 0
        except psycopg2.OperationalError as e:
            last = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        wait = min(delay, left)
        print(
            f"entrypoint: PostgreSQL at {host}:{port} not ready ({last}); retry in {wait:.0f} s",
            flush=True,
        )
        time.sleep(wait)
        delay = min(delay * 2, 30.0)
    print(
        f"entrypoint: error: PostgreSQL at {host}:{port} did not accept connections as "
        f"{user!r} within {timeout:.0f} s after {attempt} attempts: {last}. "
        "Check DB_HOST, DB_PORT, DB_USER and DB_PASSWORD, and that the database is running.",
        file=sys.stderr,
        flush=True,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
