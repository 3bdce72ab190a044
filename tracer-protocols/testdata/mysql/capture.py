#!/usr/bin/env python3
"""Re-record the MySQL/MariaDB protocol captures in this folder.

Starts a throwaway MariaDB server (Debian `mariadb-server`) in a temporary datadir on
127.0.0.1:13306 (TLS enabled with a fresh self-signed certificate), creates a test
user, database, table and procedure over its Unix socket, then records sessions of the
`mariadb` command-line client, PyMySQL and mysql-connector-python through a TCP proxy
on 127.0.0.1:13307. Loopback only; the test password is not a secret.

Each NAME.cap file (the format of ../README.md) holds one connection, both
directions, one record per proxy `recv()` (so chunk boundaries are real reads), in the
order they happened:

    c <ns since accept> <length>\n<length raw bytes>\n   client -> server
    s <ns since accept> <length>\n<length raw bytes>\n   server -> client

Needs a Python with PyMySQL and mysql-connector-python (pure Python implementation):

    python3 -m venv /tmp/my-venv && /tmp/my-venv/bin/pip install PyMySQL mysql-connector-python
    /tmp/my-venv/bin/python capture.py      # rewrites the *.cap files beside this script

Connection ids, salts, timestamps and server versions change from run to run; the
tests depend only on the statements, error numbers, row counts and status flags.
"""

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

OUT = os.path.dirname(os.path.abspath(__file__))
SERVER_PORT = 13306
PROXY_PORT = 13307
USER = "tracer"
PASSWORD = "tracerpw"
DB = "tracer_test"
RECV_SIZE = 16384


def wait_port(port, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


class Server:
    """A MariaDB server in a temporary datadir."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mysql-capture-")
        self.datadir = os.path.join(self.dir, "data")
        self.sock = os.path.join(self.dir, "mysqld.sock")
        self.proc = None

    def start(self):
        subprocess.run(
            ["mariadb-install-db", "--user=root", f"--datadir={self.datadir}",
             "--auth-root-authentication-method=normal"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        key = os.path.join(self.dir, "key.pem")
        cert = os.path.join(self.dir, "cert.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.log = open(os.path.join(self.dir, "server.log"), "wb")
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", "--user=root", f"--datadir={self.datadir}",
             f"--port={SERVER_PORT}", "--bind-address=127.0.0.1", f"--socket={self.sock}",
             "--skip-name-resolve", "--innodb-buffer-pool-size=32M",
             "--performance-schema=OFF", "--local-infile=1",
             f"--ssl-cert={cert}", f"--ssl-key={key}"],
            stdout=self.log, stderr=self.log)
        wait_port(SERVER_PORT)
        self.admin(f"""
            CREATE DATABASE {DB};
            CREATE DATABASE tracer_other;
            CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';
            GRANT ALL ON {DB}.* TO '{USER}'@'127.0.0.1';
            GRANT ALL ON tracer_other.* TO '{USER}'@'127.0.0.1';
            USE {DB};
            CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(64), payload TEXT);
            CREATE TABLE loaded (id INT, name VARCHAR(64));
            DELIMITER $$
            CREATE PROCEDURE two_results()
            BEGIN
              SELECT id, name FROM items WHERE id <= 3 ORDER BY id;
              SELECT COUNT(*) AS n FROM items;
            END$$
            DELIMITER ;
        """)
        rows = ",".join(
            f"({i}, 'item-{i}', REPEAT('x{i % 10}', 250))" for i in range(1, 201))
        self.admin(f"USE {DB}; INSERT INTO items VALUES {rows};")

    def admin(self, sql):
        subprocess.run(["mariadb", "--no-defaults", f"--socket={self.sock}", "-uroot"],
                       input=sql.encode(), check=True)

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


class RecordingProxy:
    """Accepts one connection per capture and records both directions in order."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", PROXY_PORT))
        self.listener.listen(8)

    def record(self, name, client):
        done = threading.Event()

        def serve():
            conn, _ = self.listener.accept()
            up = socket.create_connection(("127.0.0.1", SERVER_PORT))
            out = open(os.path.join(OUT, name + ".cap"), "wb")
            out.write(b"# mysql capture %s, recorded by capture.py\n" % name.encode())
            out.write(b"# records: c|s <ns since accept> <len>, newline, <len> bytes, newline\n")
            lock = threading.Lock()
            t0 = time.monotonic_ns()

            def pump(src, dst, direction):
                while True:
                    try:
                        data = src.recv(RECV_SIZE)
                    except OSError:
                        data = b""
                    if not data:
                        break
                    with lock:
                        ts = time.monotonic_ns() - t0
                        out.write(b"%s %d %d\n" % (direction, ts, len(data)) + data + b"\n")
                        out.flush()
                    try:
                        dst.sendall(data)
                    except OSError:
                        break
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            t1 = threading.Thread(target=pump, args=(conn, up, b"c"))
            t2 = threading.Thread(target=pump, args=(up, conn, b"s"))
            t1.start()
            t2.start()
            t1.join(60)
            t2.join(60)
            out.close()
            conn.close()
            up.close()
            done.set()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        client()
        if not done.wait(60):
            raise RuntimeError(f"capture {name} did not finish")
        print(f"captured {name}")


def cli(sql, *extra, database=DB):
    """The mariadb command-line client in batch mode, over TCP through the proxy.
    Plaintext unless `--ssl` is among `extra`."""

    def run():
        argv = ["mariadb", "--no-defaults", "--protocol=tcp", "-h", "127.0.0.1",
                "-P", str(PROXY_PORT), f"-u{USER}", f"-p{PASSWORD}", *extra]
        if "--ssl" not in extra:
            argv.append("--skip-ssl")
        if database:
            argv.append(database)
        subprocess.run(argv, input=sql.encode(), check=False, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    return run


def connector_prepared():
    import mysql.connector

    conn = mysql.connector.connect(
        host="127.0.0.1", port=PROXY_PORT, user=USER, password=PASSWORD, database=DB,
        ssl_disabled=True, use_pure=True, autocommit=True)
    cur = conn.cursor(prepared=True)
    for i in (7, 42):
        cur.execute("SELECT id, name FROM items WHERE id = ?", (i,))
        cur.fetchall()
    try:
        cur.execute("SELECT no_such_column FROM items WHERE id = ?", (1,))
        cur.fetchall()
    except mysql.connector.Error:
        pass
    try:
        cur.execute("INSERT INTO items (id, name) VALUES (?, ?)", (1, "duplicate"))
    except mysql.connector.Error:
        pass
    cur.execute("SELECT id, name, payload FROM items WHERE id <= ? ORDER BY id", (150,))
    cur.fetchall()
    cur.close()
    conn.close()


def pymysql_text():
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=PROXY_PORT, user=USER,
                           password=PASSWORD, database=DB, autocommit=True,
                           ssl_disabled=True)
    with conn.cursor() as cur:
        cur.execute("SELECT id, payload FROM items ORDER BY id")
        cur.fetchall()
        try:
            cur.execute("SELECT * FROM missing_table")
        except pymysql.MySQLError:
            pass
        cur.execute("UPDATE items SET name = name WHERE id < 10")
        cur.execute("CALL two_results()")
        while cur.nextset():
            pass
        cur.execute("USE tracer_other")
        cur.execute("SELECT DATABASE()")
    conn.close()


class RawClient:
    """A minimal client that negotiates what the stock clients here do not:
    CLIENT_DEPRECATE_EOF, CLIENT_SESSION_TRACK, server-side cursors (COM_STMT_FETCH),
    COM_STATISTICS, COM_RESET_CONNECTION and two pipelined commands. It does not parse
    responses: it reads until the server has been quiet for a moment."""

    CAPS = (0x00000001 | 0x00000004 | 0x00000008 | 0x00000200 | 0x00002000
            | 0x00008000 | 0x00010000 | 0x00020000 | 0x00040000 | 0x00080000
            | 0x00200000 | 0x00800000 | 0x01000000)

    def __init__(self, port):
        import hashlib
        self.s = socket.create_connection(("127.0.0.1", port))
        greeting = self.read_quiet()
        payload = greeting[4:]
        end = payload.index(b"\0", 1)
        salt1 = payload[end + 5:end + 13]
        rest = payload[end + 14 + 2 + 1 + 2 + 2 + 1 + 10:]
        salt = salt1 + rest[:12]
        sha = hashlib.sha1
        stage1 = sha(PASSWORD.encode()).digest()
        token = bytes(a ^ b for a, b in zip(stage1, sha(salt + sha(stage1).digest()).digest()))
        body = (struct.pack("<IIB", self.CAPS, 1 << 24, 45) + b"\0" * 23
                + USER.encode() + b"\0" + bytes([len(token)]) + token
                + DB.encode() + b"\0" + b"mysql_native_password\0")
        self.send(body, seq=1)
        self.read_quiet()

    def send(self, payload, seq=0):
        self.s.sendall(self.packet(payload, seq))

    @staticmethod
    def packet(payload, seq=0):
        return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload

    def read_quiet(self, quiet=0.15):
        data = b""
        self.s.settimeout(5)
        data += self.s.recv(65536)
        self.s.settimeout(quiet)
        while True:
            try:
                more = self.s.recv(65536)
            except socket.timeout:
                return data
            if not more:
                return data
            data += more

    def command(self, payload):
        self.send(payload)
        return self.read_quiet()

    def query(self, sql):
        return self.command(b"\x03" + sql.encode())

    def close(self):
        self.send(b"\x01")
        self.s.close()


def raw_deprecate_eof():
    c = RawClient(PROXY_PORT)
    c.query("SELECT id, name FROM items WHERE id <= 3 ORDER BY id")
    c.query("SELECT id FROM items WHERE id < 0")
    c.query("SELECT * FROM no_such_table")
    c.query("BEGIN")
    c.query("UPDATE items SET name = 'again' WHERE id BETWEEN 10 AND 12")
    c.query("COMMIT")
    c.query("CALL two_results()")
    c.query("USE tracer_other")
    c.query("SELECT DATABASE()")
    c.command(b"\x02" + DB.encode())
    prepared = c.command(b"\x16SELECT id, name FROM items WHERE id >= ? ORDER BY id")
    stmt_id = struct.unpack_from("<I", prepared, 5)[0]
    for first in (198, 199):
        # COM_STMT_EXECUTE: no cursor, one iteration, one INT parameter.
        c.command(b"\x17" + struct.pack("<IBI", stmt_id, 0, 1) + b"\x00\x01\x03\x00"
                  + struct.pack("<i", first))
    # With a read-only cursor, then two COM_STMT_FETCH of 2 rows each.
    c.command(b"\x17" + struct.pack("<IBI", stmt_id, 1, 1) + b"\x00\x01\x03\x00"
              + struct.pack("<i", 197))
    for _ in range(2):
        c.command(b"\x1c" + struct.pack("<II", stmt_id, 2))
    c.command(b"\x1a" + struct.pack("<I", stmt_id))
    c.send(b"\x19" + struct.pack("<I", stmt_id))
    c.command(b"\x0e")
    c.command(b"\x09")
    # Two commands in one write: the responses come back in order.
    c.s.sendall(c.packet(b"\x03SELECT 1") + c.packet(b"\x03SELECT 2"))
    c.read_quiet()
    c.command(b"\x1f")
    c.query("SELECT DATABASE()")
    c.close()


def sessions(infile):
    return [
        ("cli_select", cli("SELECT 1 + 1 AS two;\nSELECT id, name FROM items WHERE id <= 3;\n")),
        ("cli_error", cli("SELECT * FROM no_such_table;\n", "--force")),
        ("cli_transaction", cli(
            "BEGIN;\nUPDATE items SET name = 'renamed' WHERE id = 5;\n"
            "SELECT name FROM items WHERE id = 5;\nCOMMIT;\n")),
        ("cli_init_db", cli("use tracer_other\nSELECT DATABASE();\n")),
        ("cli_multi_result", cli("CALL two_results();\n")),
        ("cli_local_infile", cli(
            f"LOAD DATA LOCAL INFILE '{infile}' INTO TABLE loaded FIELDS TERMINATED BY ',';\n"
            "SELECT COUNT(*) FROM loaded;\n", "--local-infile=1")),
        ("cli_tls", cli("SELECT 1;\n", "--ssl")),
        ("cli_compressed", cli("SELECT 1;\n", "--compress")),
        ("connector_prepared", connector_prepared),
        ("pymysql_text", pymysql_text),
        ("raw_deprecate_eof", raw_deprecate_eof),
    ]


def main():
    # A fixed path: it is part of the recorded SQL text the tests expect.
    infile = os.path.join(tempfile.gettempdir(), "tracer_mysql_capture_rows.csv")
    with open(infile, "w") as f:
        f.write("".join(f"{i},row-{i}\n" for i in range(1, 101)))
    server = Server()
    try:
        server.start()
        proxy = RecordingProxy()
        for name, client in sessions(infile):
            proxy.record(name, client)
    finally:
        server.stop()
        os.unlink(infile)


if __name__ == "__main__":
    sys.exit(main())
