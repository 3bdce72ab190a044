"""One standard session per database driver, for the agent's driver tests.

usage: drivers.py DRIVER PORT
  psycopg, asyncpg            PostgreSQL: SELECT 1; a parameterised query twice;
                              SELECT 1 / 0 (fails)
  redis-sync, redis-asyncio   Redis: SET, GET, then LPUSH on the string (WRONGTYPE)
  pymysql                     MySQL/MariaDB: a parameterised query twice; a query on
                              a missing table (fails)

Prints "done" when the session went as expected.
"""
import asyncio
import sys

SECRET = "secret-literal"


def psycopg_session(port):
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
        conn.execute("SELECT 1")
        for n in (1, 2):
            conn.execute("SELECT %s::int + 40 AS answer, %s AS s", (n, SECRET))
        try:
            conn.execute("SELECT 1 / 0")
        except psycopg.errors.DivisionByZero:
            pass


async def asyncpg_session(port):
    import asyncpg

    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres")
    await conn.fetchval("SELECT 1")
    for n in (1, 2):
        await conn.fetchrow("SELECT $1::int + 40 AS answer, $2::text AS s", n, SECRET)
    try:
        await conn.fetchval("SELECT 1 / 0")
    except asyncpg.exceptions.DivisionByZeroError:
        pass
    await conn.close()


def redis_sync(port):
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    r.set("drivers:key", SECRET)
    assert r.get("drivers:key") == SECRET.encode()
    try:
        r.lpush("drivers:key", "x")
    except redis.exceptions.ResponseError:
        pass
    r.close()


async def redis_asyncio(port):
    import redis.asyncio as redis

    r = redis.Redis(host="127.0.0.1", port=port)
    await r.set("drivers:key", SECRET)
    assert await r.get("drivers:key") == SECRET.encode()
    try:
        await r.lpush("drivers:key", "x")
    except redis.ResponseError:
        pass
    await r.aclose()


def pymysql_session(port):
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=port, user="root", password="", database="mysql")
    with conn.cursor() as cur:
        for n in (1, 2):
            cur.execute("SELECT %s + 40 AS answer, %s AS s", (n, SECRET))
            cur.fetchall()
        try:
            cur.execute("SELECT * FROM no_such_table WHERE id = %s", (7,))
        except pymysql.err.ProgrammingError:
            pass
    conn.close()


def main():
    driver, port = sys.argv[1], int(sys.argv[2])
    {
        "psycopg": lambda: psycopg_session(port),
        "asyncpg": lambda: asyncio.run(asyncpg_session(port)),
        "redis-sync": lambda: redis_sync(port),
        "redis-asyncio": lambda: asyncio.run(redis_asyncio(port)),
        "pymysql": lambda: pymysql_session(port),
    }[driver]()
    print("done", flush=True)


if __name__ == "__main__":
    main()
