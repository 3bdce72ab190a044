#!/usr/bin/env python3
"""Re-record the HTTP/1.x captures in this folder.

Starts servers on free 127.0.0.1 ports (`python3 -m http.server`, nginx, and a small
HTTP/1.1 server below), puts a TCP proxy in front of them that records every recv() of
each direction of one connection, in order, to NAME.cap (the format of ../README.md),
and drives them with curl and raw sockets. Loopback only.

    c <ns since accept> <length>\n<length raw bytes>\n   client -> server
    s <ns since accept> <length>\n<length raw bytes>\n   server -> client

    python3 capture.py            # rewrites the *.cap files beside this script

Dates, ETags and nginx versions inside the captures change from run to run; the tests
only depend on framing, status codes, methods and targets.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OUT = os.path.dirname(os.path.abspath(__file__))
HELLO = b"Hello from the tracer test file.\n" * 4


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


class RecordingProxy:
    """Accepts one connection per capture and records both directions."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]

    def record(self, name, client):
        """Runs `client(port)`, recording the single connection it makes."""
        done = threading.Event()
        result = {}

        def serve():
            conn, _ = self.listener.accept()
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            t0 = time.monotonic_ns()
            lock = threading.Lock()
            out = open(os.path.join(OUT, name + ".cap"), "wb")
            out.write(b"# http1 capture %s, recorded by capture.py\n" % name.encode())
            out.write(b"# records: c|s <ns since accept> <len>, newline, <len> bytes, newline\n")

            def pump(src, dst, tag):
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    with lock:
                        ts = time.monotonic_ns() - t0
                        out.write(b"%s %d %d\n" % (tag, ts, len(data)) + data + b"\n")
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
            t1.join(20)
            t2.join(20)
            out.close()
            conn.close()
            up.close()
            done.set()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        result["client"] = client(self.port)
        if not done.wait(20):
            raise RuntimeError(f"capture {name} did not finish")
        print(f"captured {name}")
        return result["client"]


def curl(*args):
    def run(port):
        argv = ["curl", "-sS", "-o", "/dev/null", "--noproxy", "*"]
        argv += [a.replace("PORT", str(port)) for a in args]
        subprocess.run(argv, check=True, timeout=20)

    return run


def raw(payload, read_until_close=True, pause=0.3):
    """Sends `payload` (bytes, or a list of bytes sent with pauses) in raw writes."""

    def run(port):
        s = socket.create_connection(("127.0.0.1", port))
        parts = payload if isinstance(payload, list) else [payload]
        for i, p in enumerate(parts):
            if i:
                time.sleep(pause)
            s.sendall(p.replace(b"PORT", str(port).encode()))
        time.sleep(pause)
        s.shutdown(socket.SHUT_WR)
        if read_until_close:
            s.settimeout(10)
            while s.recv(65536):
                pass
        s.close()

    return run


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 server for what the stock servers cannot show."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_POST(self):
        body = self.read_body()
        out = b"got %d bytes\n" % len(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        if self.path == "/nocontent":
            self.send_response(204)
            self.end_headers()
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Checksum")
            self.end_headers()
            self.wfile.write(b"1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n")
            self.wfile.flush()
            self.wfile.write(b"A\r\n0123456789\r\n")
            self.wfile.write(b"0\r\nX-Checksum: 42\r\n\r\n")
        elif self.path == "/close-delimited":
            # No Content-Length, no chunking: the body ends when the server closes.
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"part one\n")
            self.wfile.flush()
            time.sleep(0.1)
            self.wfile.write(b"part two\n")
            self.close_connection = True
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


def main():
    work = tempfile.mkdtemp(prefix="http1-capture-")
    procs = []
    try:
        docroot = os.path.join(work, "www")
        os.makedirs(docroot)
        with open(os.path.join(docroot, "hello.txt"), "wb") as f:
            f.write(HELLO)
        os.utime(os.path.join(docroot, "hello.txt"), (1700000000, 1700000000))

        # python3 -m http.server (HTTP/1.0 responses, closes after each)
        py_port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "http.server", str(py_port), "--bind", "127.0.0.1",
             "--directory", docroot],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(py_port)
        py = RecordingProxy(py_port)
        py.record("pyserver_get_200", curl("http://127.0.0.1:PORT/hello.txt"))
        py.record("pyserver_get_404", curl("http://127.0.0.1:PORT/missing?x=1&y=2"))
        py.record("pyserver_post_501", curl("-H", "Authorization: Bearer s3cr3t-token",
                                             "-H", "Cookie: session=abcdef",
                                             "-d", "name=tracer&kind=test",
                                             "http://127.0.0.1:PORT/submit"))
        py.record("pyserver_head", curl("-I", "http://127.0.0.1:PORT/hello.txt"))

        # nginx: keep-alive, pipelining, chunked (gzip), 204, 304, HEAD
        ng_port = free_port()
        ng = os.path.join(work, "nginx")
        os.makedirs(os.path.join(ng, "logs"))
        with open(os.path.join(ng, "nginx.conf"), "w") as f:
            f.write(f"""
daemon off;
master_process off;
worker_processes 1;
error_log {ng}/logs/error.log;
pid {ng}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {ng}/body;
    proxy_temp_path {ng}/proxy;
    fastcgi_temp_path {ng}/fastcgi;
    uwsgi_temp_path {ng}/uwsgi;
    scgi_temp_path {ng}/scgi;
    types {{ text/plain txt; }}
    gzip on;
    gzip_min_length 1;
    gzip_types text/plain;
    server {{
        listen 127.0.0.1:{ng_port};
        root {docroot};
        location = /nocontent {{ return 204; }}
    }}
}}
""")
        procs.append(subprocess.Popen(["nginx", "-p", ng, "-c", os.path.join(ng, "nginx.conf")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(ng_port)
        nx = RecordingProxy(ng_port)
        nx.record("nginx_keepalive", curl("http://127.0.0.1:PORT/hello.txt",
                                          "-o", "/dev/null", "http://127.0.0.1:PORT/missing"))
        nx.record("nginx_chunked_gzip", curl("-H", "Accept-Encoding: gzip",
                                             "http://127.0.0.1:PORT/hello.txt"))
        nx.record("nginx_head", curl("-I", "http://127.0.0.1:PORT/hello.txt"))
        nx.record("nginx_204", curl("http://127.0.0.1:PORT/nocontent"))
        nx.record("nginx_304", curl("-H", "If-Modified-Since: Tue, 14 Nov 2023 22:13:20 GMT",
                                    "http://127.0.0.1:PORT/hello.txt"))
        nx.record("nginx_pipelined", raw(
            b"GET /hello.txt HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n"
            b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n"
            b"HEAD /hello.txt HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n\r\n"
            b"GET /nocontent HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\nConnection: close\r\n\r\n"))

        # A small HTTP/1.1 server: 100-continue, chunked request and response with
        # extensions and trailers, 204 on a keep-alive connection.
        own = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=own.serve_forever, daemon=True).start()
        ow = RecordingProxy(own.server_address[1])
        ow.record("pyhttp11_expect_100", curl("-H", "Expect: 100-continue",
                                              "--data-binary", "x" * 2000,
                                              "http://127.0.0.1:PORT/upload"))
        ow.record("pyhttp11_chunked_request", curl("-H", "Transfer-Encoding: chunked",
                                                   "--data-binary", "y" * 100,
                                                   "http://127.0.0.1:PORT/upload"))
        ow.record("pyhttp11_chunked_response", curl("http://127.0.0.1:PORT/chunked",
                                                    "-o", "/dev/null",
                                                    "http://127.0.0.1:PORT/nocontent"))
        ow.record("pyhttp11_close_delimited", curl("http://127.0.0.1:PORT/close-delimited"))
        own.shutdown()
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
