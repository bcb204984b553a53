"""`odoo -c CONF [-d DB -u MODULES --stop-after-init --no-http]`.

Reads the [options] of CONF as Odoo does and, unless --stop-after-init,
serves /web/health on http_port: 200 {"status": "pass"}; with
?db_server_status=1 it connects to the database first and answers 500 when
it cannot, as Odoo 17 does. SIGTERM stops it cleanly.
"""

import argparse
import configparser
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import psycopg2


def main() -> int:
    parser = argparse.ArgumentParser(prog="odoo")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("-d", "--database")
    parser.add_argument("-u", "--update")
    parser.add_argument("--stop-after-init", action="store_true")
    parser.add_argument("--no-http", action="store_true")
    args, _ = parser.parse_known_args()
    conf = configparser.ConfigParser(interpolation=None)
    if not conf.read(args.config):
        print(f"odoo: cannot read {args.config}", file=sys.stderr)
        return 1
    opts = conf["options"]

    def connect():
        return psycopg2.connect(
            host=opts["db_host"],
            port=int(opts["db_port"]),
            user=opts["db_user"],
            password=opts["db_password"],
            dbname=args.database or "postgres",
            connect_timeout=3,
        )

    if args.stop_after_init:
        connect().close()
        print(f"odoo: updated {args.update} in {args.database}", flush=True)
        return 0

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            if url.path != "/web/health":
                self.send_error(404)
                return
            body, code = {"status": "pass"}, 200
            if parse_qs(url.query).get("db_server_status") == ["1"]:
                try:
                    connect().close()
                    body["db_server_status"] = True
                except psycopg2.OperationalError:
                    body, code = {"status": "fail", "db_server_status": False}, 500
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("0.0.0.0", int(opts.get("http_port", "8069"))), Health)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(
        f"odoo: serving on {server.server_address[1]} as uid {os.getuid()}, "
        f"data_dir {opts.get('data_dir')}",
        flush=True,
    )
    server.serve_forever()
    print("odoo: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
