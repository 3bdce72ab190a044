// One standard session per Node.js database driver, for the agent's driver tests
// (the same sessions as drivers.py).
//
// usage: node drivers.js pg|ioredis|mysql2 PORT   (NODE_PATH: their node_modules)
// Prints "done" when the session went as expected.
"use strict";

const SECRET = "secret-literal";
const [driver, portText] = process.argv.slice(2);
const port = Number(portText);

async function pgSession() {
  const { Client } = require("pg");
  const c = new Client({ host: "127.0.0.1", port, user: "postgres", database: "postgres" });
  await c.connect();
  await c.query("SELECT 1");
  for (const n of [1, 2]) {
    await c.query("SELECT $1::int + 40 AS answer, $2::text AS s", [n, SECRET]);
  }
  await c.query("SELECT 1 / 0").then(
    () => { throw new Error("SELECT 1 / 0 succeeded"); },
    (e) => { if (e.code !== "22012") throw e; },
  );
  await c.end();
}

async function ioredisSession() {
  const Redis = require("ioredis");
  const r = new Redis({ host: "127.0.0.1", port, enableReadyCheck: false });
  await r.set("drivers:key", SECRET);
  if ((await r.get("drivers:key")) !== SECRET) throw new Error("GET");
  await r.lpush("drivers:key", "x").then(
    () => { throw new Error("LPUSH succeeded"); },
    (e) => { if (!String(e.message).startsWith("WRONGTYPE")) throw e; },
  );
  await r.quit();
}

async function mysql2Session() {
  const mysql = require("mysql2/promise");
  const c = await mysql.createConnection({ host: "127.0.0.1", port, user: "root", database: "mysql" });
  for (const n of [1, 2]) {
    // execute(): a server-side prepared statement.
    await c.execute("SELECT ? + 40 AS answer, ? AS s", [n, SECRET]);
  }
  await c.execute("SELECT * FROM no_such_table WHERE id = ?", [7]).then(
    () => { throw new Error("the query on a missing table succeeded"); },
    (e) => { if (e.errno !== 1146) throw e; },
  );
  await c.end();
}

const sessions = { pg: pgSession, ioredis: ioredisSession, mysql2: mysql2Session };
sessions[driver]().then(
  () => console.log("done"),
  (e) => { console.error(e); process.exit(1); },
);
