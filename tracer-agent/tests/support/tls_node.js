// Node.js over TLS and in plaintext, for the agent's TLS tests. Node's TLS keeps
// OpenSSL behind memory BIOs: its sockets are written and read by libuv, outside
// OpenSSL's calls.
//
// usage (NODE_PATH: the pg module's node_modules):
//   node tls_node.js get http|https PORT PATH N [CA]   N GETs on one keep-alive
//                                                      connection; prints "get STATUS LENGTH"
//   node tls_node.js serve http|https PORT [CERT KEY]  answers every request with
//                                                      "hello from node\n"
//   node tls_node.js pg on|off PORT                    a pg session: a query, a named
//                                                      prepared statement twice, a failing
//                                                      query; prints "ssl true|false", "done"
"use strict";

const fs = require("fs");
const [command, mode, portText, ...rest] = process.argv.slice(2);
const port = Number(portText);
const tls = mode === "https" || mode === "on";

async function get(path, n, ca) {
  const lib = require(tls ? "https" : "http");
  const agent = new lib.Agent({ keepAlive: true, maxSockets: 1 });
  for (let i = 0; i < n; i++) {
    await new Promise((resolve, reject) => {
      const req = lib.get(
        { host: "127.0.0.1", port, path, agent, ca: ca ? fs.readFileSync(ca) : undefined },
        (res) => {
          let length = 0;
          res.on("data", (chunk) => { length += chunk.length; });
          res.on("end", () => {
            console.log(`get ${res.statusCode} ${length}`);
            resolve();
          });
        },
      );
      req.on("error", reject);
    });
  }
  agent.destroy();
}

function serve(cert, key) {
  const handler = (req, res) => {
    req.resume();
    req.on("end", () => {
      res.writeHead(200, { "Content-Type": "text/plain" });
      res.end("hello from node\n");
    });
  };
  const server = tls
    ? require("https").createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }, handler)
    : require("http").createServer(handler);
  server.keepAliveTimeout = 30000;
  server.listen(port, "127.0.0.1");
}

async function pgSession() {
  const { Client } = require("pg");
  const c = new Client({
    host: "127.0.0.1",
    port,
    user: "postgres",
    database: "postgres",
    ssl: tls ? { rejectUnauthorized: false } : false,
  });
  await c.connect();
  const r = await c.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
  console.log(`ssl ${r.rows[0].ssl}`);
  for (const n of [1, 2]) {
    await c.query({ name: "answer", text: "SELECT $1::int + 40 AS answer, $2::text AS s", values: [n, "secret-literal"] });
  }
  await c.query("SELECT 1 / 0").then(
    () => { throw new Error("SELECT 1 / 0 succeeded"); },
    (e) => { if (e.code !== "22012") throw e; },
  );
  await c.end();
}

const run = {
  get: () => get(rest[0], Number(rest[1]), rest[2]),
  serve: async () => serve(rest[0], rest[1]),
  pg: pgSession,
}[command];
run().then(
  () => { if (command !== "serve") console.log("done"); },
  (e) => { console.error(e); process.exit(1); },
);
