"""Real Python HTTP clients for the agent's integration tests (`requests`).

usage:
  http_clients.py post-bodies PORT N     N POSTs to /ignore and N to /read, each
                                         with a 3000-byte body: `requests` (whose
                                         http.client writes the head and the body in
                                         separate writes), then http.client with the
                                         body 50 ms after the head (a slow upload)
  http_clients.py get URL N CA           N GETs of URL on one `requests` session
                                         (one keep-alive connection), trusting the
                                         CA file CA for https:// ("-": none)
  http_clients.py aio-get URL N CA       the same with aiohttp (asyncio: OpenSSL
                                         behind a memory BIO)
  http_clients.py give-up PORT SLOW TIMEOUT
                                         GET /slow?s=SLOW with a TIMEOUT-second
                                         read timeout: the client gives up first

Each prints one line per outcome so the test can check what the client saw.
"""
import sys

import requests


def post_bodies(port, n):
    import http.client
    import time

    body = b"x" * 3000
    for path in ("/ignore", "/read"):
        for _ in range(n):
            r = requests.post(f"http://127.0.0.1:{port}{path}", data=body)
            print("requests", path, r.status_code, flush=True)
        for _ in range(n):
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.putrequest("POST", path)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            time.sleep(0.05)
            try:
                conn.send(body)
            except OSError:
                pass  # the server answered and closed first
            print("slow", path, conn.getresponse().status, flush=True)
            conn.close()


def give_up(port, slow, timeout):
    try:
        requests.get(f"http://127.0.0.1:{port}/slow?s={slow}", timeout=timeout)
        print("answered", flush=True)
    except requests.exceptions.Timeout:
        print("timed out", flush=True)


def get(url, n, ca):
    with requests.Session() as session:
        for _ in range(n):
            r = session.get(url, verify=ca if ca != "-" else True)
            print("get", r.status_code, len(r.content), flush=True)


def aio_get(url, n, ca):
    import asyncio
    import ssl

    import aiohttp

    async def run():
        context = ssl.create_default_context(cafile=ca if ca != "-" else None)
        connector = aiohttp.TCPConnector(limit=1, ssl=context if url.startswith("https") else False)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(n):
                async with session.get(url) as r:
                    body = await r.read()
                    print("get", r.status, len(body), flush=True)

    asyncio.run(run())


def main():
    if sys.argv[1] in ("get", "aio-get"):
        fetch = get if sys.argv[1] == "get" else aio_get
        fetch(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    cmd, port = sys.argv[1], int(sys.argv[2])
    if cmd == "post-bodies":
        post_bodies(port, int(sys.argv[3]))
    elif cmd == "give-up":
        give_up(port, float(sys.argv[3]), float(sys.argv[4]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
