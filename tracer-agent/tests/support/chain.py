"""A chain of real services whose true call tree is known by construction.

Every request carries its id in the path (/r/<id>) through every hop, and the last
hop's database query names it in a column alias (SELECT ... AS r_<id>), which
survives literal obfuscation. So for each id the expected tree is:

  load CLIENT /r/id -> A SERVER -> A CLIENT -> B SERVER -> B CLIENT -> ... -> last SERVER -> DB CLIENT

With --calls 2 an asyncio hop makes a second call, /r2/<id>, after the answer to
its first: the next hop serves it as a second subtree (its query aliased r2_<id>).

usage:
  chain.py serve PORT [--next URL] [--pg PORT] [--model threaded|asyncio] [--calls N] [--propagate]
  chain.py load URL COUNT CONCURRENCY [--header]
"""
import argparse
import asyncio
import http.client
import http.server
import os
import secrets
import sys
import threading
import urllib.parse

local = threading.local()


def traceparent_from(headers):
    """A child traceparent for an outgoing call, as an instrumented app would make."""
    tp = headers.get("traceparent")
    if not tp:
        return None
    parts = tp.split("-")
    if len(parts) != 4:
        return None
    return f"00-{parts[1]}-{secrets.token_hex(8)}-01"


def downstream(next_url, rid, tp):
    """GET next/r/<id> on this thread's keep-alive connection."""
    url = urllib.parse.urlsplit(next_url)
    conn = getattr(local, "conn", None)
    if conn is None:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        local.conn = conn
    headers = {"traceparent": tp} if tp else {}
    conn.request("GET", f"/r/{rid}", headers=headers)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def query(pg_port, rid, leg):
    import psycopg

    conn = getattr(local, "pg", None)
    if conn is None:
        conn = psycopg.connect(host="127.0.0.1", port=pg_port, user="postgres", dbname="postgres", autocommit=True)
        local.pg = conn
    alias = "r" if leg == 1 else f"r{leg}"
    with conn.cursor() as cur:
        cur.execute(f"SELECT 1 AS {alias}_{int(rid)}")
        cur.fetchone()


def leg_of(path):
    """/r/<id> is a request's first call into a hop, /r2/<id> its second."""
    prefix = path.split("/")[1] if path.count("/") >= 2 else "r"
    return int(prefix[1:]) if prefix[1:].isdigit() else 1


def serve_threaded(args):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            rid = self.path.rsplit("/", 1)[-1]
            tp = traceparent_from(self.headers) if args.propagate else None
            if args.next:
                downstream(args.next, rid, tp)
            if args.pg:
                query(args.pg, rid, leg_of(self.path))
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


async def serve_asyncio(args):
    nxt = urllib.parse.urlsplit(args.next) if args.next else None

    async def call_next(rid, tp, leg):
        reader, writer = await asyncio.open_connection(nxt.hostname, nxt.port)
        extra = f"traceparent: {tp}\r\n" if tp else ""
        prefix = "r" if leg == 1 else f"r{leg}"
        writer.write(f"GET /{prefix}/{rid} HTTP/1.1\r\nHost: next\r\n{extra}Connection: close\r\n\r\n".encode())
        await writer.drain()
        await reader.read()
        writer.close()

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                rid = path.rsplit("/", 1)[-1]
                tp = traceparent_from(headers) if args.propagate else None
                if nxt:
                    for leg in range(1, args.calls + 1):
                        await call_next(rid, tp, leg)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def load(args):
    ids = list(range(1, args.count + 1))
    lock = threading.Lock()
    url = urllib.parse.urlsplit(args.url)
    errors = []

    def worker():
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        while True:
            with lock:
                if not ids:
                    break
                rid = ids.pop(0)
            headers = {}
            if args.header:
                headers["traceparent"] = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
            conn.request("GET", f"/r/{rid}", headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(rid)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("done", args.count, "errors", len(errors), "pid", os.getpid(), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    s.add_argument("--next")
    s.add_argument("--pg", type=int)
    s.add_argument("--model", default="threaded", choices=["threaded", "asyncio"])
    s.add_argument("--calls", type=int, default=1, help="calls per request (asyncio model)")
    s.add_argument("--propagate", action="store_true")
    l = sub.add_parser("load")
    l.add_argument("url")
    l.add_argument("count", type=int)
    l.add_argument("concurrency", type=int)
    l.add_argument("--header", action="store_true")
    args = p.parse_args()
    if args.cmd == "serve":
        if args.model == "asyncio":
            asyncio.run(serve_asyncio(args))
        else:
            serve_threaded(args)
    else:
        load(args)


if __name__ == "__main__":
    sys.exit(main())
