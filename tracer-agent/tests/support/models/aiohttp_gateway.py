"""Hop B of the parent-inference benchmark (bench_parents.rs) as an aiohttp service.

One asyncio event loop: an aiohttp.web server, every outgoing call through one
aiohttp.ClientSession whose TCPConnector keeps at most 4 keep-alive connections
for all requests, and the PostgreSQL query through one asyncpg pool of at most 4
connections, opened on demand. Concurrent requests queue on, and take turns over,
the same pooled connections.

usage: aiohttp_gateway.py PORT --next URL [--calls N] [--pg PGPORT]

Per request GET /r/<id>: --calls sequential GETs to {next}/r/<id>, then
{next}/r2/<id>, ...; with --pg one `SELECT 1 AS b_<id>`; then 200 "ok\\n".
"""
import argparse
import asyncio

import aiohttp
import asyncpg
from aiohttp import web


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--next", required=True)
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--pg", type=int)
    return p.parse_args()


async def main(args):
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4))
    pool = None
    if args.pg:
        pool = await asyncpg.create_pool(
            host="127.0.0.1", port=args.pg, user="postgres", database="postgres", min_size=0, max_size=4
        )

    async def handle(request):
        rid = int(request.match_info["id"])
        for leg in range(1, args.calls + 1):
            prefix = "r" if leg == 1 else f"r{leg}"
            async with session.get(f"{args.next}/{prefix}/{rid}") as resp:
                await resp.read()
                if resp.status != 200:
                    return web.Response(status=502, text=f"next hop answered {resp.status}\n")
        if pool is not None:
            async with pool.acquire() as conn:
                await conn.fetchval(f"SELECT 1 AS b_{rid}")
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/r/{id}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await session.close()
        if pool is not None:
            await pool.close()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
