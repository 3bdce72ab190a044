#!/usr/bin/env python3
"""Re-record the PostgreSQL captures in this folder.

Starts a throwaway PostgreSQL cluster (trust auth, 127.0.0.1:15432, no password is
ever sent), puts a TCP proxy on 127.0.0.1:15433 in front of it and drives it with
psql and psycopg 3. Each session's connection is written to NAME.cap (the format of
../README.md): one record per socket read the proxy made, in the order the proxy
forwarded them (a record is written before its bytes are forwarded, so a response
never precedes its request):

    c <ns since the session started> <length>\n<length raw bytes>\n   client -> server
    s <ns since the session started> <length>\n<length raw bytes>\n   server -> client

Needs the Debian postgresql-15 binaries and psycopg 3 in the Python that runs it:

    python3 -m venv /tmp/pgvenv && /tmp/pgvenv/bin/pip install "psycopg[binary]"
    /tmp/pgvenv/bin/python capture.py      # rewrites the *.cap files beside it

If something already listens on 127.0.0.1:15432 it is used as is (it must have a
role `tracer` owning a database `shop`, with trust auth); otherwise a cluster is
created in a temporary folder (as the `postgres` user when run as root) and removed
afterwards. Backend pids, secret keys, OIDs and timings change from run to run; the
tests depend only on the message flow, SQL texts, tags and SQLSTATEs.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

OUT = os.path.dirname(os.path.abspath(__file__))
PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")
PG_PORT = 15432
PROXY_PORT = 15433
HOST = "127.0.0.1"


def listening(port):
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def as_postgres(argv):
    """Runs a server binary, as the postgres user when we are root."""
    if os.geteuid() == 0:
        argv = ["su", "postgres", "-c", " ".join(f"'{a}'" for a in argv)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=120)


class Cluster:
    """A temporary cluster on PG_PORT, unless one already runs there."""

    def __init__(self):
        self.dir = None

    def __enter__(self):
        if listening(PG_PORT):
            print(f"using the server already on {HOST}:{PG_PORT}")
        else:
            self.dir = tempfile.mkdtemp(prefix="pgcapture-")
            if os.geteuid() == 0:
                shutil.chown(self.dir, "postgres", "postgres")
            data = os.path.join(self.dir, "data")
            as_postgres([f"{PGBIN}/initdb", "-D", data, "--auth=trust", "-U", "postgres"])
            as_postgres([f"{PGBIN}/pg_ctl", "-D", data, "-l", os.path.join(self.dir, "log"),
                         "-o", f"-p {PG_PORT} -k {self.dir} -c listen_addresses={HOST}",
                         "-w", "start"])
            admin("CREATE ROLE tracer LOGIN", "CREATE DATABASE shop OWNER tracer")
        return self

    def __exit__(self, *exc):
        if self.dir:
            as_postgres([f"{PGBIN}/pg_ctl", "-D", os.path.join(self.dir, "data"),
                         "-m", "fast", "-w", "stop"])
            shutil.rmtree(self.dir, ignore_errors=True)


def admin(*sql, db="postgres", user="postgres"):
    """Unrecorded statements straight to the server."""
    argv = ["psql", "-X", "-q", f"host={HOST} port={PG_PORT} user={user} dbname={db} "
            "sslmode=disable", "-v", "ON_ERROR_STOP=1"]
    for s in sql:
        argv += ["-c", s]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=60)


def reset_table():
    admin("DROP TABLE IF EXISTS items",
          "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)",
          "INSERT INTO items VALUES (1, 'one'), (2, 'two'), (3, 'three')",
          db="shop", user="tracer")


class RecordingProxy:
    """Accepts one connection per capture and records both directions in order."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, PROXY_PORT))
        self.listener.listen(8)

    def record(self, name, client):
        reset_table()
        done = threading.Event()
        out = open(os.path.join(OUT, name + ".cap"), "wb")
        out.write(b"# postgres capture %s, recorded by capture.py\n" % name.encode())
        out.write(b"# records: c|s <ns since the session started> <len>, newline, "
                  b"<len> bytes, newline\n")
        lock = threading.Lock()
        start = time.monotonic_ns()

        def serve():
            conn, _ = self.listener.accept()
            up = socket.create_connection((HOST, PG_PORT))

            def pump(src, dst, side):
                while True:
                    try:
                        data = src.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        break
                    with lock:
                        ts = time.monotonic_ns() - start
                        out.write(b"%s %d %d\n" % (side, ts, len(data)) + data + b"\n")
                        out.flush()
                        dst.sendall(data)
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            t1 = threading.Thread(target=pump, args=(conn, up, b"c"))
            t2 = threading.Thread(target=pump, args=(up, conn, b"s"))
            t1.start()
            t2.start()
            t1.join(30)
            t2.join(30)
            conn.close()
            up.close()
            done.set()

        threading.Thread(target=serve, daemon=True).start()
        client()
        if not done.wait(30):
            raise RuntimeError(f"capture {name} did not finish")
        out.close()
        print(f"captured {name}")


def conninfo(sslmode="disable"):
    return (f"host={HOST} port={PROXY_PORT} user=tracer dbname=shop sslmode={sslmode} "
            "gssencmode=disable application_name=capture")


def psql(*commands, sslmode="disable", stdin=None):
    def run():
        argv = ["psql", "-X", conninfo(sslmode)]
        for c in commands:
            argv += ["-c", c]
        subprocess.run(argv, input=stdin, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)

    return run


def psycopg_session(body):
    def run():
        import psycopg

        with psycopg.connect(conninfo(), autocommit=body.autocommit) as conn:
            body(conn)

    return run


def autocommit(flag):
    def wrap(f):
        f.autocommit = flag
        return f

    return wrap


@autocommit(True)
def pg3_simple(conn):
    conn.execute("SELECT id, name FROM items WHERE id = %s", (1,)).fetchall()
    conn.execute("SELECT 42").fetchall()


@autocommit(True)
def pg3_prepared(conn):
    cur = conn.cursor()
    for i in (1, 2, 3):
        cur.execute("SELECT name FROM items WHERE id = %s", (i,), prepare=True)
        cur.fetchall()


@autocommit(True)
def pg3_error(conn):
    import psycopg

    for sql, params in (("SELECT 1 / %s", (0,)), ("SELECT * FROM missing_table", None)):
        try:
            conn.execute(sql, params)
        except psycopg.Error:
            pass
    conn.execute("SELECT 1").fetchall()


@autocommit(False)
def pg3_open_tx(conn):
    conn.execute("INSERT INTO items (id, name) VALUES (%s, %s)", (4, "four"))
    conn.execute("SELECT count(*) FROM items").fetchall()
    # Closed without commit: the transaction is still open when the connection ends.
    conn.close()


@autocommit(True)
def pg3_pipeline(conn):
    import psycopg

    try:
        with conn.pipeline():
            conn.execute("INSERT INTO items (id, name) VALUES (%s, %s)", (5, "five"))
            conn.execute("SELECT 1 / %s", (0,))
            conn.execute("SELECT count(*) FROM items")
    except psycopg.Error:
        pass
    with conn.pipeline():
        conn.cursor().executemany("INSERT INTO items (id, name) VALUES (%s, %s)",
                                  [(6, "six"), (7, "seven"), (8, "eight")])
    conn.execute("SELECT count(*) FROM items").fetchall()


@autocommit(True)
def pg3_copy(conn):
    cur = conn.cursor()
    with cur.copy("COPY items (id, name) FROM STDIN") as copy:
        for row in ((30, "thirty"), (31, "thirty-one")):
            copy.write_row(row)
    with cur.copy("COPY items TO STDOUT") as copy:
        for _ in copy:
            pass
    conn.execute("SELECT count(*) FROM items").fetchall()


@autocommit(True)
def pg3_large(conn):
    conn.execute("SELECT g, repeat('x', 2000) FROM generate_series(1, 40) g").fetchall()
    conn.execute("SELECT 1").fetchall()


def main():
    with Cluster():
        proxy = RecordingProxy()
        proxy.record("psql_simple", psql("SELECT id, name FROM items ORDER BY id"))
        proxy.record("psql_sslrequest", psql("SELECT count(*) FROM items", sslmode="prefer"))
        proxy.record("psql_error", psql("SELECT 1/0"))
        proxy.record("psql_transaction", psql(
            "BEGIN",
            "INSERT INTO items (id, name) VALUES (10, 'ten')",
            "SELECT * FROM missing_table",
            "ROLLBACK",
            "BEGIN",
            "UPDATE items SET name = 'uno' WHERE id = 1",
            "COMMIT"))
        proxy.record("psql_misc", psql(
            "WITH t AS (SELECT id FROM items) SELECT count(*) FROM t",
            "SELECT 1 AS a; UPDATE items SET name = name WHERE id <= 2",
            "SET application_name = 'tracer-test'",
            "DO $$BEGIN RAISE NOTICE 'hello'; END$$",
            "LISTEN ch",
            "NOTIFY ch, 'payload'",
            "COPY items TO STDOUT",
            "SELECT g, repeat('x', 300) FROM generate_series(1, 30) g"))
        proxy.record("psql_copy_in", psql("COPY items (id, name) FROM STDIN",
                                          stdin=b"20\ttwenty\n21\ttwenty-one\n"))
        lo = os.path.join(tempfile.gettempdir(), "pgcapture-lo.txt")
        with open(lo, "w") as f:
            f.write("large object\n")
        proxy.record("psql_large_object", psql(
            f"\\lo_import {lo}",
            "SELECT count(lo_unlink(oid)) FROM pg_largeobject_metadata"))
        os.unlink(lo)
        for name, body in (("psycopg_simple", pg3_simple),
                           ("psycopg_prepared", pg3_prepared),
                           ("psycopg_error", pg3_error),
                           ("psycopg_open_tx", pg3_open_tx),
                           ("psycopg_pipeline", pg3_pipeline),
                           ("psycopg_copy", pg3_copy),
                           ("psycopg_large", pg3_large)):
            proxy.record(name, psycopg_session(body))


if __name__ == "__main__":
    sys.exit(main())
