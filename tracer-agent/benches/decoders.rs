//! The span pipeline's event rate: a keep-alive HTTP/1.1 server's 1,000 requests and
//! responses through the connection table. `cargo bench -p tracer-agent --bench
//! decoders`. (Decoder throughput: `cargo bench -p tracer-protocols`.)

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tracer_agent::{
    capture::{DataRecord, Endpoints, Event, Meta},
    connections::{ConnectionTable, TableLimits},
    pipeline::Downstream,
    process::ProcessTable,
    telemetry::Telemetry,
};
use tracer_common::{conn::Role, data::Direction};

fn pipeline(c: &mut Criterion) {
    let sock = 0xffff_0000_0000_1000u64;
    let endpoints = Endpoints {
        local: "127.0.0.1:8000".parse().unwrap(),
        remote: "127.0.0.1:40000".parse().unwrap(),
    };
    let meta = |ts: u64| Meta {
        ts_ns: ts,
        tgid: 7,
        tid: 8,
        sock,
        comm: "nginx".into(),
    };
    let req = b"GET /orders/42 HTTP/1.1\r\nHost: shop\r\nUser-Agent: bench\r\n\r\n".to_vec();
    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 512\r\n\r\n".to_vec();
    let mut events = vec![Event::ConnOpen {
        meta: meta(0),
        endpoints,
        role: Role::Server,
    }];
    for i in 0..1000u64 {
        events.push(Event::Data(DataRecord {
            meta: meta(i * 10 + 1),
            direction: Direction::Recv,
            syscall: 45,
            total_len: req.len() as u32,
            payload: req.clone().into(),
            flags: 0,
        }));
        events.push(Event::Data(DataRecord {
            meta: meta(i * 10 + 5),
            direction: Direction::Send,
            syscall: 20,
            total_len: resp.len() as u32 + 512,
            payload: resp.clone().into(),
            flags: 2,
        }));
    }
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("http_server_events", |b| {
        let telemetry = Telemetry::new();
        b.iter(|| {
            let mut table = ConnectionTable::new(TableLimits::default());
            let mut procs = ProcessTable::with_proc_root(16, "/nonexistent");
            let mut down = Downstream::default();
            for e in events.iter().cloned() {
                table.handle(e, &mut procs, &telemetry, &mut down);
            }
            black_box(down.spans.len())
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
