"""Hop B of the parent-inference benchmark (bench_parents.rs) as an ASGI service.

A plain ASGI callable under uvicorn (one worker, asyncio loop, h11): every
outgoing call through one httpx.AsyncClient whose pool keeps at most 4 keep-alive
connections for all requests, and the PostgreSQL query through one asyncpg pool
of at most 4 connections, opened on demand. Concurrent requests queue on, and
take turns over, the same pooled connections.

usage: uvicorn_gateway.py PORT --next URL [--calls N] [--pg PGPORT]

Per request GET /r/<id>: --calls sequential GETs to {next}/r/<id>, then
{next}/r2/<id>, ...; with --pg one `SELECT 1 AS b_<id>`; then 200 "ok\\n".
"""
import argparse
import asyncio

import asyncpg
import httpx
import uvicorn


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--next", required=True)
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--pg", type=int)
    return p.parse_args()


class Gateway:
    """The ASGI application; its client and pool are made at lifespan startup."""

    def __init__(self, args):
        self.args = args
        self.client = None
        self.pool = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            status, body = await self.handle(scope["path"])
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})

    async def lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(
                    limits=httpx.Limits(max_connections=4, max_keepalive_connections=4), timeout=30.0
                )
                if self.args.pg:
                    self.pool = await asyncpg.create_pool(
                        host="127.0.0.1",
                        port=self.args.pg,
                        user="postgres",
                        database="postgres",
                        min_size=0,
                        max_size=4,
                    )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                if self.pool is not None:
                    await self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, path):
        parts = path.split("/")
        if len(parts) != 3 or parts[1] != "r" or not parts[2].isdigit():
            return 404, b"no id\n"
        rid = int(parts[2])
        for leg in range(1, self.args.calls + 1):
            prefix = "r" if leg == 1 else f"r{leg}"
            resp = await self.client.get(f"{self.args.next}/{prefix}/{rid}")
            if resp.status_code != 200:
                return 502, f"next hop answered {resp.status_code}\n".encode()
        if self.pool is not None:
            async with self.pool.acquire() as conn:
                await conn.fetchval(f"SELECT 1 AS b_{rid}")
        return 200, b"ok\n"


async def main(args):
    config = uvicorn.Config(
        Gateway(args),
        host="127.0.0.1",
        port=args.port,
        loop="asyncio",
        http="h11",
        lifespan="on",
        workers=1,
        timeout_keep_alive=60,
        access_log=False,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        print("ready", flush=True)
    await serving


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
