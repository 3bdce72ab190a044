//! Hop B of the parent-inference benchmark (bench_parents.rs) as a Rust service:
//! the tokio multi-thread runtime (4 workers), a hyper 1 HTTP/1.1 server, every
//! outgoing call through one pooled hyper-util legacy client (at most 4 idle
//! connections, at most 4 calls in flight behind a semaphore, and a connector that
//! keeps at most 4 connections open: at most 4 keep-alive connections to the next
//! hop for all requests), and the PostgreSQL
//! query through one deadpool-postgres pool of at most 4 tokio-postgres
//! connections. Concurrent requests queue on, and take turns over, the same
//! pooled connections, on whichever worker thread polls them.
//!
//! usage: tokio_gateway PORT --next URL [--calls N] [--pg PGPORT]
//!
//! Per request GET /r/<id>: --calls sequential GETs to {next}/r/<id>, then
//! {next}/r2/<id>, ...; with --pg one `SELECT 1 AS b_<id>`; then 200 "ok\n".

use std::{
    convert::Infallible,
    error::Error,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{
    Request, Response, StatusCode, Uri, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection, HttpConnector},
    },
    rt::{TokioExecutor, TokioIo},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

type BoxError = Box<dyn Error + Send + Sync>;

const POOL: usize = 4;

/// HttpConnector, with at most `POOL` of its connections open at once. The
/// semaphore around calls alone is not enough: the legacy client gives a
/// connection back to its pool from a task of its own after the answer, and a call
/// that looks in between opens a new connection.
#[derive(Clone)]
struct LimitedConnector {
    inner: HttpConnector,
    open: Arc<Semaphore>,
}

/// A connection that frees its slot when it closes.
struct LimitedConn {
    io: TokioIo<TcpStream>,
    _slot: OwnedSemaphorePermit,
}

impl tower_service::Service<Uri> for LimitedConnector {
    type Response = LimitedConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<LimitedConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (mut inner, open) = (self.inner.clone(), self.open.clone());
        Box::pin(async move {
            let slot = open.acquire_owned().await?;
            let io = inner.call(uri).await?;
            Ok(LimitedConn { io, _slot: slot })
        })
    }
}

impl Connection for LimitedConn {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for LimitedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for LimitedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

struct Gateway {
    next: String,
    calls: u32,
    client: Client<LimitedConnector, Empty<Bytes>>,
    in_flight: Semaphore,
    db: Option<Pool>,
}

impl Gateway {
    async fn call(&self, path: &str) -> Result<StatusCode, BoxError> {
        let uri: hyper::Uri = format!("{}{path}", self.next).parse()?;
        let _permit = self.in_flight.acquire().await?;
        let resp = self.client.get(uri).await?;
        let status = resp.status();
        // Read to the end, so the connection goes back to the pool.
        resp.into_body().collect().await?;
        Ok(status)
    }

    async fn serve(&self, id: u64) -> Result<(), BoxError> {
        for leg in 1..=self.calls {
            let prefix = if leg == 1 {
                "r".to_string()
            } else {
                format!("r{leg}")
            };
            let status = self.call(&format!("/{prefix}/{id}")).await?;
            if status != StatusCode::OK {
                return Err(format!("next hop answered {status}").into());
            }
        }
        if let Some(db) = &self.db {
            let conn = db.get().await?;
            conn.query_one(format!("SELECT 1 AS b_{id}").as_str(), &[])
                .await?;
        }
        Ok(())
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let id = req
            .uri()
            .path()
            .strip_prefix("/r/")
            .and_then(|id| id.parse::<u64>().ok());
        let (status, body) = match id {
            None => (StatusCode::NOT_FOUND, "no id\n".to_string()),
            Some(id) => match self.serve(id).await {
                Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                Err(e) => (StatusCode::BAD_GATEWAY, format!("{e}\n")),
            },
        };
        // Full has an exact size: hyper sends it as Content-Length.
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        Ok(resp)
    }
}

fn usage() -> ! {
    eprintln!("usage: tokio_gateway PORT --next URL [--calls N] [--pg PGPORT]");
    std::process::exit(2)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> Result<(), BoxError> {
    let mut argv = std::env::args().skip(1);
    let port: u16 = argv
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| usage());
    let (mut next, mut calls, mut pg) = (None, 1, None);
    while let Some(flag) = argv.next() {
        let value = argv.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--next" => next = Some(value),
            "--calls" => calls = value.parse()?,
            "--pg" => pg = Some(value.parse::<u16>()?),
            _ => usage(),
        }
    }
    let next = next.unwrap_or_else(|| usage());

    let db = match pg {
        None => None,
        Some(port) => {
            let mut cfg = tokio_postgres::Config::new();
            cfg.host("127.0.0.1")
                .port(port)
                .user("postgres")
                .dbname("postgres");
            let manager = Manager::from_config(
                cfg,
                tokio_postgres::NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Some(Pool::builder(manager).max_size(POOL).build()?)
        }
    };
    let connector = LimitedConnector {
        inner: HttpConnector::new(),
        open: Arc::new(Semaphore::new(POOL)),
    };
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(POOL)
        .build(connector);
    let gateway = Arc::new(Gateway {
        next: next.trim_end_matches('/').to_string(),
        calls,
        client,
        in_flight: Semaphore::new(POOL),
        db,
    });

    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("ready");
    loop {
        let (stream, _) = listener.accept().await?;
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| gateway.clone().handle(req));
            // Errors are the peer going away: nothing to do about them.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
