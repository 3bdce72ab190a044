#!/usr/bin/env python3
"""Re-record the Redis captures in this folder.

Talks to a redis-server on 127.0.0.1:16379 (started here if nothing listens there,
stopped again at the end) through a TCP proxy on 127.0.0.1:16380 that records every
recv() of each direction of one connection, in order, to NAME.cap (the format of
../README.md):

    # comment lines first
    c <ns since the connection was accepted> <length>\\n<length raw bytes>\\n   client -> server
    s <ns since the connection was accepted> <length>\\n<length raw bytes>\\n   server -> client

One record is one recv() on the proxy, i.e. one chunk as the tracer would see it. The
clients are redis-cli (Debian's redis-tools), raw sockets, and redis-py, which must be
importable (e.g. `python3 -m venv /tmp/redis-venv && /tmp/redis-venv/bin/pip install
redis`, then run this script with /tmp/redis-venv/bin/python). Loopback only.

    /tmp/redis-venv/bin/python capture.py      # rewrites the *.cap files beside this

The server version, redis-py's version (CLIENT SETINFO) and timings change from run to
run; the tests only depend on commands, reply types and framing.
"""

import os
import socket
import subprocess
import threading
import time

import redis

OUT = os.path.dirname(os.path.abspath(__file__))
SERVER_PORT = 16379
PROXY_PORT = 16380


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def direct():
    """A client straight to the server (not recorded): setup and the other side of
    pub/sub and client tracking."""
    return redis.Redis(host="127.0.0.1", port=SERVER_PORT)


class RecordingProxy:
    """Accepts one connection per capture and records both directions."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", PROXY_PORT))
        self.listener.listen(8)

    def record(self, name, client, note):
        direct().flushall()
        done = threading.Event()

        def serve():
            conn, _ = self.listener.accept()
            up = socket.create_connection(("127.0.0.1", SERVER_PORT))
            t0 = time.monotonic_ns()
            lock = threading.Lock()
            out = open(os.path.join(OUT, name + ".cap"), "wb")
            out.write(b"# redis capture " + name.encode() + b": " + note.encode() + b"\n")
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
            t1.join(30)
            t2.join(30)
            out.close()
            conn.close()
            up.close()
            done.set()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        client()
        if not done.wait(30):
            raise RuntimeError(f"capture {name} did not finish")
        print(f"captured {name}")


def cli(*args, stdin=""):
    def run():
        subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(PROXY_PORT), *args],
                       input=stdin.encode(), check=True, timeout=30,
                       stdout=subprocess.DEVNULL)

    return run


def raw(steps, pause=0.05):
    """Sends each step (bytes, or a callable run between writes) and waits `pause`
    for the replies after each write."""

    def run():
        s = socket.create_connection(("127.0.0.1", PROXY_PORT))
        s.settimeout(0.2)
        for step in steps:
            if callable(step):
                step()
            else:
                s.sendall(step)
            time.sleep(pause)
            try:
                while s.recv(65536):
                    pass
            except socket.timeout:
                pass
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
        s.close()

    return run


def resp(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def proxied(**kw):
    return redis.Redis(host="127.0.0.1", port=PROXY_PORT, **kw)


def py_pipeline():
    r = proxied()
    r.ping()
    pipe = r.pipeline(transaction=False)
    for i in range(10):
        pipe.set(f"key:{i}", f"value-{i}")
    pipe.hset("profile", "email", "someone@example.com")
    pipe.get("profile")  # WRONGTYPE
    for i in range(10):
        pipe.get(f"key:{i}")
    pipe.execute(raise_on_error=False)
    r.close()


def py_transaction():
    r = proxied()
    r.set("balance", 100)
    pipe = r.pipeline(transaction=True)
    pipe.decrby("balance", 30)
    pipe.incrby("savings", 30)
    pipe.get("balance")
    pipe.execute()
    r.close()


def py_pubsub():
    r = proxied(protocol=2)
    p = r.pubsub()
    p.subscribe("orders", "alerts")
    p.psubscribe("news.*")
    for _ in range(3):
        p.get_message(timeout=1)
    pub = direct()
    pub.publish("orders", "order 1234 for alice@example.com")
    pub.publish("news.tech", "a story")
    for _ in range(2):
        p.get_message(timeout=1)
    p.ping()
    p.get_message(timeout=1)
    p.unsubscribe()
    p.punsubscribe()
    for _ in range(3):
        p.get_message(timeout=1)
    p.close()
    r.close()


# 100 kB with RESP-looking bytes inside: only lengths may be used to skip it.
BIG = (b"*3\r\n$3\r\nSET\r\n-ERR x\r\n+OK\r\n" + bytes(range(256))) * 360
BIG = BIG[:100_000]


def py_large_value():
    r = proxied()
    r.set("blob", BIG)
    assert r.get("blob") == BIG
    r.strlen("blob")
    r.mset({"small": "1", "blob2": BIG[:20_000]})
    r.mget("small", "blob2", "missing")
    r.delete("blob", "blob2", "small")
    r.close()


def py_resp3():
    r = proxied(protocol=3)
    r.hset("user:3", mapping={"name": "carol", "plan": "pro"})
    r.hgetall("user:3")
    r.sadd("tags", "a", "b", "c")
    r.smembers("tags")
    r.zadd("scores", {"carol": 1.5})
    r.zscore("scores", "carol")
    r.get("missing")
    r.eval("redis.setresp(3); return true", 0)
    r.eval("redis.setresp(3); return {big_number='123456789012345678901234567890'}", 0)
    r.eval("redis.setresp(3); return {verbatim_string={format='txt', string='hi'}}", 0)
    try:
        r.eval("return redis.error_reply('MYCODE custom failure')", 0)
    except redis.ResponseError:
        pass
    r.delete("user:3", "tags", "scores")
    r.close()


def tracking_invalidate():
    c = direct()
    c.set("tracked", "changed")
    c.close()


def publish_news():
    c = direct()
    c.publish("news", "breaking")
    c.close()


def monitor_traffic():
    c = direct()
    c.set("secret:key", "secret value")
    c.get("secret:key")
    c.close()


def main():
    started = False
    if not port_open(SERVER_PORT):
        subprocess.run(["redis-server", "--port", str(SERVER_PORT), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no", "--daemonize", "yes",
                        "--dir", "/tmp", "--pidfile", "/tmp/redis-capture.pid"], check=True)
        started = True
        wait_port(SERVER_PORT)
    try:
        p = RecordingProxy()
        p.record("cli_basic", cli("-n", "3", stdin="\n".join([
            "SET user:1 alice",
            "GET user:1",
            "GET missing:key",
            "INCR visits",
            "HSET user:2 name bob email bob@example.com",
            "HGETALL user:2",
            "LPUSH queue job1 job2",
            "GET queue",
            "FOOBAR secret-arg",
            "CLIENT SETNAME tracer-test",
            "CONFIG GET maxmemory",
            "EXISTS user:1 user:2",
            "DEL user:1 visits user:2 queue",
        ]) + "\n"), "redis-cli -n 3, one command at a time")
        p.record("inline", raw([
            b"PING\r\n",
            b"SET greeting \"hello world\"\r\n",
            b"GET greeting\r\n",
            b"EXISTS greeting nothing\n",
            b"\r\n",
            b"DEL greeting\r\n",
            b"QUIT\r\n",
        ]), "inline commands over a raw socket")
        p.record("cli_pipe", cli("--pipe", stdin="".join(
            resp("SET", f"mass:{i}", f"payload-{i}").decode() for i in range(100)
        )), "redis-cli --pipe: 100 SETs in one write, then its ECHO marker")
        p.record("py_pipeline", py_pipeline,
                 "redis-py pipeline(transaction=False) of 22 commands, one WRONGTYPE")
        p.record("py_transaction", py_transaction, "redis-py pipeline(transaction=True)")
        p.record("multi_exec", raw([resp(*c.split(" ")) for c in [
            "MULTI",
            "SET tx:a 1",
            "INCR tx:a",
            "GET tx:a",
            "EXEC",
            "MULTI",
            "SET tx:b 2",
            "DISCARD",
            "MULTI",
            "SET tx:c 3",
            "NOSUCHCOMMAND tx:c",
            "EXEC",
            "SET tx:d text",
            "MULTI",
            "INCR tx:d",
            "SELECT 5",
            "EXEC",
            "GET tx:d",
        ]]), "MULTI/EXEC, DISCARD, EXECABORT, an error inside EXEC, SELECT inside MULTI")
        p.record("resp3", py_resp3, "redis-py protocol=3 (HELLO 3): maps, sets, doubles, "
                 "nulls, booleans, big numbers, verbatim strings, an error reply")
        p.record("resp3_push", raw([
            resp("HELLO", "3"),
            resp("SET", "tracked", "original"),
            resp("CLIENT", "TRACKING", "ON"),
            resp("GET", "tracked"),
            tracking_invalidate,
            resp("PING"),
            resp("SUBSCRIBE", "news"),
            publish_news,
            resp("PING"),
            resp("UNSUBSCRIBE"),
            resp("GET", "tracked"),
        ], pause=0.1), "RESP3 pushes: a tracking invalidation, SUBSCRIBE, a message")
        p.record("py_pubsub", py_pubsub, "redis-py pub/sub (RESP2): SUBSCRIBE 2 channels, "
                 "PSUBSCRIBE, 2 messages, PING, UNSUBSCRIBE, PUNSUBSCRIBE")
        p.record("large_value", py_large_value, "redis-py: SET/GET of 100 kB, MSET/MGET")
        p.record("client_reply", raw([
            resp("CLIENT", "REPLY", "OFF"),
            resp("SET", "quiet", "1"),
            resp("CLIENT", "REPLY", "ON"),
            resp("GET", "quiet"),
            resp("CLIENT", "REPLY", "SKIP"),
            resp("INCR", "quiet"),
            resp("GET", "quiet"),
        ]), "CLIENT REPLY OFF / ON / SKIP")
        p.record("monitor", raw([
            resp("SELECT", "2"),
            resp("MONITOR"),
            monitor_traffic,
        ], pause=0.1), "SELECT 2 then MONITOR; another client's commands are streamed")
    finally:
        if started:
            direct().shutdown(nosave=True)


if __name__ == "__main__":
    main()
