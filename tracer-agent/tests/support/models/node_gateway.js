// Hop B of the parent-inference benchmark (bench_parents.rs) as a Node.js service:
// one event loop, an http.createServer server, every outgoing call through one
// keep-alive http.Agent of at most 4 sockets shared by all requests, and the
// PostgreSQL query through one pg.Pool of at most 4 connections. Concurrent
// requests therefore queue on, and take turns over, the same pooled connections.
//
// usage: NODE_PATH=<dir with pg> node node_gateway.js PORT --next URL [--calls N] [--pg PGPORT]
//
// Per request GET /r/<id>: --calls sequential GETs to {next}/r/<id>, then
// {next}/r2/<id>, ...; with --pg one `SELECT 1 AS b_<id>`; then 200 "ok\n".
"use strict";

const http = require("http");

function parseArgs(argv) {
  const args = { port: Number(argv[0]), next: null, calls: 1, pg: null };
  for (let i = 1; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === "--next") args.next = new URL(value);
    else if (flag === "--calls") args.calls = Number(value);
    else if (flag === "--pg") args.pg = Number(value);
    else throw new Error(`unknown argument ${flag}`);
  }
  if (!args.port) throw new Error("usage: node_gateway.js PORT --next URL [--calls N] [--pg PGPORT]");
  return args;
}

const args = parseArgs(process.argv.slice(2));
const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
let pool = null;
if (args.pg) {
  const { Pool } = require("pg");
  pool = new Pool({
    host: "127.0.0.1",
    port: args.pg,
    user: "postgres",
    database: "postgres",
    max: 4,
  });
}

function get(path) {
  return new Promise((resolve, reject) => {
    const req = http.get(
      { host: args.next.hostname, port: args.next.port, path, agent },
      (res) => {
        res.on("data", () => {});
        res.on("end", () => resolve(res.statusCode));
        res.on("error", reject);
      },
    );
    req.on("error", reject);
  });
}

async function handle(id) {
  if (args.next) {
    for (let leg = 1; leg <= args.calls; leg++) {
      const prefix = leg === 1 ? "r" : `r${leg}`;
      const status = await get(`/${prefix}/${id}`);
      if (status !== 200) throw new Error(`next hop answered ${status}`);
    }
  }
  if (pool) {
    await pool.query(`SELECT 1 AS b_${id}`);
  }
}

const server = http.createServer((req, res) => {
  const id = Number(req.url.split("/").pop());
  const answer = (status, body) => {
    res.writeHead(status, { "Content-Type": "text/plain", "Content-Length": Buffer.byteLength(body) });
    res.end(body);
  };
  if (!Number.isInteger(id)) return answer(404, "no id\n");
  handle(id).then(
    () => answer(200, "ok\n"),
    (err) => answer(502, `${err.message}\n`),
  );
});
server.keepAliveTimeout = 60_000;
server.listen(args.port, "127.0.0.1", () => console.log("ready"));
