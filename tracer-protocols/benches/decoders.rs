//! Decoder throughput (MB/s) on real captured bytes. `cargo bench -p tracer-protocols`.
//! (The span pipeline's event rate is benchmarked in tracer-agent.)

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tracer_protocols::{
    Chunk,
    db::DbCall,
    http1::{Http1Decoder, Http1Limits, MessageKind, StartLine},
    mysql::MysqlDecoder,
    postgres::PgDecoder,
    redis::RedisDecoder,
    sql, testdata,
};

const HTTP_KEEPALIVE: &[u8] = include_bytes!("../testdata/http1/nginx_keepalive.cap");

/// `n` copies of a stream, fed in 1460-byte chunks (a loopback-ish segment size).
fn repeated(bytes: &[u8], n: usize) -> Vec<u8> {
    bytes
        .iter()
        .copied()
        .cycle()
        .take(bytes.len() * n)
        .collect()
}

fn feed_chunks(data: &[u8], mut f: impl FnMut(&Chunk<'_>)) {
    for (i, piece) in data.chunks(1460).enumerate() {
        f(&Chunk::whole(piece, i as u64));
    }
}

fn http1(c: &mut Criterion) {
    let mut g = c.benchmark_group("http1");
    let capture = testdata::parse(HTTP_KEEPALIVE).expect("capture file");
    let reqs = repeated(&capture.stream(true), 200);
    let resps = repeated(&capture.stream(false), 200);
    g.throughput(Throughput::Bytes((reqs.len() + resps.len()) as u64));
    g.bench_function("keepalive_requests_and_responses", |b| {
        b.iter(|| {
            let mut rq = Http1Decoder::new(MessageKind::Request, Http1Limits::default());
            let mut rs = Http1Decoder::new(MessageKind::Response, Http1Limits::default());
            let mut out = Vec::new();
            feed_chunks(&reqs, |c| {
                let _ = rq.feed(c, &mut out);
            });
            for m in &out {
                if let StartLine::Request { method, .. } = &m.start {
                    rs.expect_response_to(method);
                }
            }
            let mut resp_out = Vec::new();
            feed_chunks(&resps, |c| {
                let _ = rs.feed(c, &mut resp_out);
            });
            black_box((out.len(), resp_out.len()))
        })
    });
    g.finish();
}

/// One recorded read or write: (from the client?, bytes).
type Record = (bool, Vec<u8>);

/// The records of a capture file (testdata/README.md).
fn records(data: &[u8]) -> Vec<Record> {
    let capture = testdata::parse(data).expect("capture file");
    capture
        .records
        .iter()
        .map(|r| (r.from_client, r.bytes.to_vec()))
        .collect()
}

/// Decodes a whole recorded session, timing only the decoder.
fn db_bench<D>(
    c: &mut Criterion,
    name: &str,
    session: &[Record],
    new: impl Fn() -> D,
    feed: impl Fn(&mut D, bool, &Chunk<'_>, &mut Vec<DbCall>),
) {
    let bytes: usize = session.iter().map(|(_, b)| b.len()).sum();
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("recorded_session", |b| {
        b.iter(|| {
            let mut d = new();
            let mut out = Vec::new();
            for (i, (client, data)) in session.iter().enumerate() {
                feed(&mut d, *client, &Chunk::whole(data, i as u64), &mut out);
            }
            black_box(out.len())
        })
    });
    g.finish();
}

fn databases(c: &mut Criterion) {
    let pg = records(include_bytes!("../testdata/postgres/psycopg_large.cap"));
    db_bench(c, "postgres", &pg, PgDecoder::new, |d, client, ch, out| {
        let _ = if client {
            d.client(ch, out)
        } else {
            d.server(ch, out)
        };
    });
    let my = records(include_bytes!("../testdata/mysql/connector_prepared.cap"));
    db_bench(c, "mysql", &my, MysqlDecoder::new, |d, client, ch, out| {
        let _ = if client {
            d.client(ch, out)
        } else {
            d.server(ch, out)
        };
    });
    // Redis: 1000 pipelined SETs and their replies, in 1460-byte reads.
    let cmds = repeated(b"*3\r\n$3\r\nSET\r\n$5\r\nkey:1\r\n$7\r\nvalue-1\r\n", 1000);
    let replies = repeated(b"+OK\r\n", 1000);
    let mut session: Vec<Record> = cmds.chunks(1460).map(|c| (true, c.to_vec())).collect();
    session.extend(replies.chunks(1460).map(|c| (false, c.to_vec())));
    db_bench(
        c,
        "redis",
        &session,
        RedisDecoder::new,
        |d, client, ch, out| {
            let _ = if client {
                d.client(ch, out)
            } else {
                d.server(ch, out)
            };
        },
    );
    let mut g = c.benchmark_group("sql");
    let query = "SELECT o.id, o.total FROM orders o WHERE o.customer = 'alice@example.com' AND o.total > 100.50 AND o.id IN (1, 2, 3) -- recent\nORDER BY o.id LIMIT 20";
    g.throughput(Throughput::Bytes(query.len() as u64));
    g.bench_function("obfuscate", |b| {
        b.iter(|| black_box(sql::obfuscate(black_box(query))))
    });
    g.finish();
}

criterion_group!(benches, http1, databases);
criterion_main!(benches);
