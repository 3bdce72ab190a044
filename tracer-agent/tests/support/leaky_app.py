"""A small web app with real connection pools, some of whose endpoints leak.

PostgreSQL through psycopg_pool (a FIFO pool), MariaDB through SQLAlchemy's
QueuePool (PyMySQL driver). Leaked connections are kept referenced in LEAKED, as a
buggy app would keep them in a request-scoped object stored somewhere global.

  /pg/ok, /my/ok     borrow, query, give back (healthy)
  /pg/leak, /my/leak borrow, query, never give back (never_returned)
  /pg/tx, /my/tx     borrow, open a transaction, query, never give back
                     (idle_in_transaction)
  /release           close every leaked connection

Leaking endpoints answer with the local port of the connection they leaked.

usage: leaky_app.py PORT PG_PORT MARIADB_PORT [PG_SSLMODE]

PG_SSLMODE is libpq's sslmode for the PostgreSQL pool (default prefer).
"""
import http.server
import os
import socket
import sys
import threading

from psycopg_pool import ConnectionPool
from sqlalchemy import create_engine, text

LEAKED = []
LOCK = threading.Lock()


def pg_port_of(conn):
    s = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        return s.getsockname()[1]
    finally:
        s.close()


def my_port_of(conn):
    return conn.connection.dbapi_connection._sock.getsockname()[1]


def main():
    port, pg_port, my_port = (int(a) for a in sys.argv[1:4])
    sslmode = sys.argv[4] if len(sys.argv) > 4 else "prefer"
    pg = ConnectionPool(
        f"host=127.0.0.1 port={pg_port} user=postgres dbname=postgres sslmode={sslmode}",
        min_size=2,
        max_size=10,
        kwargs={"autocommit": True},
        open=True,
    )
    pg.wait(timeout=30)
    engine = create_engine(
        f"mysql+pymysql://root@127.0.0.1:{my_port}/mysql",
        pool_size=2,
        max_overflow=10,
        isolation_level="AUTOCOMMIT",
    )

    def pg_ok():
        with pg.connection() as c:
            c.execute("SELECT 1 AS healthy").fetchone()
        return "ok"

    def keep(c, port_of):
        """Holds on to a connection (never given back) and answers its local port."""
        with LOCK:
            LEAKED.append(c)
        return str(port_of(c))

    def pg_leak():
        c = pg.getconn()
        c.execute("SELECT count(*) FROM pg_class WHERE relname = 'orders'").fetchone()
        return keep(c, pg_port_of)

    def pg_tx():
        c = pg.getconn()
        c.execute("BEGIN")
        c.execute("SELECT 2 AS held").fetchone()
        return keep(c, pg_port_of)

    def my_ok():
        with engine.connect() as c:
            c.execute(text("SELECT 1 AS healthy")).fetchone()
        return "ok"

    def my_leak():
        c = engine.connect()
        c.execute(text("SELECT 3 AS leaked")).fetchone()
        return keep(c, my_port_of)

    def my_tx():
        c = engine.connect()
        c.exec_driver_sql("START TRANSACTION")
        c.exec_driver_sql("SELECT 4 AS held").fetchone()
        return keep(c, my_port_of)

    def release():
        with LOCK:
            for c in LEAKED:
                c.close()
            n = len(LEAKED)
            LEAKED.clear()
        return str(n)

    routes = {
        "/pg/ok": pg_ok,
        "/pg/leak": pg_leak,
        "/pg/tx": pg_tx,
        "/my/ok": my_ok,
        "/my/leak": my_leak,
        "/my/tx": my_tx,
        "/release": release,
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            body = (route() + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
