"""Real database clients for the agent's integration tests.

usage:
  db_clients.py pg-session PORT [SSLMODE]
                                         psycopg 3: simple query, one prepared statement
                                         three times, a failing query (autocommit);
                                         SSLMODE as libpq's (default prefer)
  db_clients.py redis-pipeline PORT N    redis-py: N commands in one pipeline
  db_clients.py mysql-prepared PORT [pure|c] [on|off]
                                         mysql-connector: one server-side prepared
                                         statement executed twice, then a failing query;
                                         `pure` is its Python implementation (it reads
                                         each packet's header and payload apart), `c`
                                         its C extension (the default); `on`/`off`:
                                         over TLS or not, first asking the server
                                         its cipher (and saying whether it has one)

  db_clients.py pg-mysql-rounds PGPORT MYSQLPORT
                                         psycopg and mysql-connector, one connection each,
                                         opened and used once, then kept: each line `go N`
                                         on stdin runs a round on them (PostgreSQL: a query
                                         and a prepared statement; MySQL: a query and a
                                         prepared statement), answered `done N`

Each prints one line per step so the test can check the client saw what the agent saw.
"""
import sys


def pg_session(port, sslmode="prefer"):
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True, sslmode=sslmode
    ) as conn:
        print("ssl", conn.pgconn.ssl_in_use)
        cur = conn.cursor()
        cur.execute("SELECT 1 AS one")
        print("simple", cur.fetchone()[0])
        for n in (1, 2, 3):
            cur.execute("SELECT %s::int + 40 AS answer, 'secret-literal' AS s", (n,), prepare=True)
            print("prepared", cur.fetchone()[0])
        try:
            cur.execute("SELECT 1 / 0")
        except psycopg.errors.DivisionByZero:
            print("failed as expected")


def pg_hold(port, seconds):
    """Three connections: two idle after a query, one left inside a transaction."""
    import time

    import psycopg

    conns = [psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) for _ in range(3)]
    conns[0].execute("SELECT 1")
    conns[1].execute("BEGIN")
    conns[1].execute("SELECT 2")
    conns[2].execute("SELECT 3")
    print("holding", flush=True)
    time.sleep(seconds)


def redis_pipeline(port, n):
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"key:{i}", f"value-{i}")
    results = pipe.execute()
    print("pipeline", len(results))


def mysql_prepared(port, implementation="c", tls=None):
    import mysql.connector

    conn = mysql.connector.connect(
        host="127.0.0.1",
        port=port,
        user="root",
        password="",
        database="mysql",
        use_pure=implementation == "pure",
        ssl_disabled=tls != "on",
    )
    print("implementation", type(conn).__name__)
    if tls is not None:
        status = conn.cursor()
        status.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        print("ssl", bool(status.fetchall()[0][1]))
        status.close()
    cur = conn.cursor(prepared=True)
    for n in (1, 2):
        cur.execute("SELECT ? + 40 AS answer, 'secret-literal' AS s", (n,))
        print("prepared", cur.fetchall()[0][0])
    try:
        cur.execute("SELECT * FROM no_such_table WHERE id = ?", (7,))
    except mysql.connector.Error as e:
        print("failed as expected", e.errno)
    cur.close()
    conn.close()


def pg_mysql_rounds(pg_port, mysql_port):
    import mysql.connector
    import psycopg

    pg = psycopg.connect(host="127.0.0.1", port=pg_port, user="postgres", dbname="postgres", autocommit=True)
    my = mysql.connector.connect(host="127.0.0.1", port=mysql_port, user="root", password="", database="mysql")
    pg.execute("SELECT 1")
    my_cur = my.cursor()
    my_cur.execute("SELECT 1")
    my_cur.fetchall()
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line.split()[1])
        pg.execute("SELECT 'round-secret' AS s, %s::int AS n", (n,)).fetchall()
        pg.execute("SELECT %s::int * 2 AS twice", (n,), prepare=True).fetchall()
        my_cur.execute("SELECT 'round-secret' AS s, %s AS n" % n)
        my_cur.fetchall()
        prepared = my.cursor(prepared=True)
        prepared.execute("SELECT ? * 2 AS twice", (n,))
        prepared.fetchall()
        prepared.close()
        print("done", n, flush=True)


def main():
    cmd, port = sys.argv[1], int(sys.argv[2])
    if cmd == "pg-session":
        pg_session(port, *sys.argv[3:4])
    elif cmd == "pg-hold":
        pg_hold(port, float(sys.argv[3]))
    elif cmd == "redis-pipeline":
        redis_pipeline(port, int(sys.argv[3]))
    elif cmd == "pg-mysql-rounds":
        pg_mysql_rounds(port, int(sys.argv[3]))
    elif cmd == "mysql-prepared":
        mysql_prepared(port, *sys.argv[3:5])
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
