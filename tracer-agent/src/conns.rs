//! `tracer-agent conns`: the database connection table of a running agent, one row
//! per process and destination, fit for an 80-column terminal.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::pools::inventory::PoolRow;

#[derive(Debug, thiserror::Error)]
pub enum ConnsError {
    #[error(
        "no agent answers on {addr}: {source} (start one with `sudo tracer-agent`, or pass --listen)"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading from the agent on {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the agent on {addr} answered something unexpected: {reason}")]
    Answer { addr: SocketAddr, reason: String },
}

/// GETs `path` from the agent's endpoint: (status code, body).
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), ConnsError> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|source| ConnsError::Connect { addr, source })?;
    let io = |source| ConnsError::Io { addr, source };
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: tracer-agent\r\n\r\n").map_err(io)?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(io)?;
    let answer = |reason: &str| ConnsError::Answer {
        addr,
        reason: reason.into(),
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| answer("no HTTP body"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| answer("no HTTP status"))?;
    Ok((status, body.to_string()))
}

/// Fetches the pools from the agent's `/connections`.
pub fn fetch(addr: SocketAddr) -> Result<Vec<PoolRow>, ConnsError> {
    let (_, body) = get(addr, "/connections")?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| ConnsError::Answer {
        addr,
        reason: e.to_string(),
    })?;
    serde_json::from_value(v["pools"].clone()).map_err(|e| ConnsError::Answer {
        addr,
        reason: e.to_string(),
    })
}

fn human(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// The table: leaking pools first, then the longest idle; under a leaking pool,
/// one line naming its longest-idle leak and the request that last used it.
pub fn render(pools: &[PoolRow]) -> String {
    let mut out = format!(
        "{:<18} {:<21} {:<6} {:>4} {:>4} {:>4} {:>4} {:>7}\n",
        "PROCESS", "DESTINATION", "DB", "OPEN", "USED", "IDLE", "LEAK", "OLDEST"
    );
    if pools.is_empty() {
        out.push_str("(no database connections seen yet)\n");
    }
    for p in pools {
        out.push_str(&format!(
            "{:<18} {:<21} {:<6} {:>4} {:>4} {:>4} {:>4} {:>7}\n",
            clip(&format!("{}[{}]", p.executable, p.pid), 18),
            clip(&format!("{}:{}", p.server_address, p.server_port), 21),
            clip(short_system(&p.db_system), 6),
            p.open,
            p.used,
            p.idle,
            if p.leaked > 0 {
                p.leaked.to_string()
            } else {
                "-".into()
            },
            if p.idle > 0 {
                human(p.oldest_idle_seconds)
            } else {
                "-".into()
            },
        ));
        if let Some(w) = &p.worst_leak {
            let line = format!(
                "  ↳ {} port {} idle {} by {}{}",
                w.kind.as_str(),
                w.client_port,
                human(w.idle_seconds),
                w.culprit.as_deref().unwrap_or("an unknown request"),
                w.last_query
                    .as_deref()
                    .map(|q| format!(": {q}"))
                    .unwrap_or_default(),
            );
            out.push_str(&clip(&line, 80));
            out.push('\n');
        }
    }
    out
}

/// `db.system.name` shortened for the table.
fn short_system(system: &str) -> &str {
    match system {
        "postgresql" => "pg",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_fits_80_columns_and_puts_the_oldest_idle_first() {
        let pools = vec![PoolRow {
            pid: 4242,
            executable: "a-very-long-executable-name".into(),
            db_system: "postgresql".into(),
            server_address: "127.0.0.1".into(),
            server_port: 5432,
            open: 12,
            used: 2,
            idle: 10,
            oldest_idle_seconds: 754.0,
            leaked: 2,
            worst_leak: Some(crate::pools::inventory::LeakSummary {
                kind: crate::pools::LeakKind::NeverReturned,
                client_port: 41234,
                idle_seconds: 754.0,
                culprit: Some("GET /orders/leaky/with/a/rather/long/path".into()),
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
                last_query: Some("SELECT id, total FROM orders WHERE customer_id = ?".into()),
            }),
        }];
        let text = render(&pools);
        assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
        assert!(text.contains("12m34s"), "{text}");
        assert!(text.contains("127.0.0.1:5432"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].contains("   2 "), "{text}");
        assert!(
            lines[2].starts_with("  ↳ never_returned port 41234 idle 12m34s by GET /orders/leaky"),
            "{text}"
        );
    }

    #[test]
    fn no_agent_is_a_clear_error() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = fetch(free).unwrap_err().to_string();
        assert!(e.contains("no agent answers"), "{e}");
    }
}
