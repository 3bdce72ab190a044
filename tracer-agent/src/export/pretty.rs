//! `--output pretty`: a readable live view of spans on the terminal, one line per
//! span, children indented under their parent when the parent is known.

use std::{collections::HashMap, fmt::Write as _};

use crate::spans::{AttrValue, Span, SpanId, SpanKind, SpanStatus};

/// Remembers recent spans' depths so children print indented under parents.
pub struct PrettyPrinter {
    depth: HashMap<SpanId, usize>,
    color: bool,
    capacity: usize,
}

impl PrettyPrinter {
    pub fn new(color: bool) -> Self {
        Self {
            depth: HashMap::new(),
            color,
            capacity: 4096,
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// Formats one span as a line.
    pub fn line(&mut self, span: &Span) -> String {
        let depth = span
            .parent_span_id
            .and_then(|p| self.depth.get(&p))
            .map(|d| d + 1)
            .unwrap_or(0);
        if self.depth.len() >= self.capacity {
            self.depth.clear();
        }
        self.depth.insert(span.span_id, depth);

        let str_attr = |k: &str| match span.attr(k) {
            Some(AttrValue::Str(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let secs = span.start_unix_nano / 1_000_000_000;
        let millis = (span.start_unix_nano / 1_000_000) % 1000;
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let status = str_attr("http.response.status_code");
        let status = match span.status {
            SpanStatus::Error => self.paint("31", &status),
            _ => self.paint("32", &status),
        };
        let kind = match span.kind {
            SpanKind::Server => self.paint("36", "SERVER"),
            SpanKind::Client => self.paint("35", "CLIENT"),
        };
        let ms = span.duration_ns() as f64 / 1e6;
        let peer = match span.kind {
            SpanKind::Server => format!(
                "← {}:{}",
                str_attr("client.address"),
                str_attr("client.port")
            ),
            SpanKind::Client => format!(
                "→ {}:{}",
                str_attr("server.address"),
                str_attr("server.port")
            ),
        };
        let mut out = String::new();
        let _ = write!(
            out,
            "{h:02}:{m:02}:{s:02}.{millis:03} {indent}{kind} {method} {path} {status} {ms:>8.2} ms  {exe}[{pid}] {peer}  trace={trace}",
            indent = "  ".repeat(depth.min(16)),
            method = str_attr("http.request.method"),
            path = str_attr("url.path"),
            exe = span.resource.executable_name,
            pid = span.resource.pid,
            trace = &span.trace_id.to_string()[..8],
        );
        out
    }
}
