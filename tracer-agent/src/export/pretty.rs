//! `--output pretty`: a readable live view of spans on the terminal. Spans come out
//! of parent inference parents first, so each trace prints as a waterfall: children
//! indented under their parent, with a bar placing each span inside its root's time.

use std::{collections::HashMap, fmt::Write as _};

use crate::spans::{AttrValue, Span, SpanId, SpanKind, SpanStatus};

/// Width of the waterfall bar, in characters.
const BAR: usize = 24;

/// `text` safe to print on a terminal: control characters (escape sequences, the
/// C1 range, DEL) and bidirectional overrides, which captured traffic may carry
/// to rewrite or hide what the operator sees, become visible `\u{..}` escapes.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// What a child needs from its parent's line.
#[derive(Clone, Copy)]
struct Placed {
    depth: usize,
    /// The trace root's start and duration (ns).
    root_start: u64,
    root_len: u64,
}

/// Remembers recent spans so children print under their parents.
pub struct PrettyPrinter {
    placed: HashMap<SpanId, Placed>,
    color: bool,
    capacity: usize,
}

impl PrettyPrinter {
    pub fn new(color: bool) -> Self {
        Self {
            placed: HashMap::new(),
            color,
            capacity: 8192,
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// The bar of a span inside its root's time range.
    fn bar(span: &Span, at: &Placed) -> String {
        let len = at.root_len.max(1) as f64;
        let from =
            (span.start_unix_nano.saturating_sub(at.root_start) as f64 / len * BAR as f64) as usize;
        let from = from.min(BAR - 1);
        let width =
            ((span.duration_ns() as f64 / len * BAR as f64).ceil() as usize).clamp(1, BAR - from);
        format!(
            "{}{}{}",
            " ".repeat(from),
            "█".repeat(width),
            " ".repeat(BAR - from - width)
        )
    }

    /// Formats one span as a line.
    pub fn line(&mut self, span: &Span) -> String {
        let at = match span.parent_span_id.and_then(|p| self.placed.get(&p)) {
            Some(parent) => Placed {
                depth: parent.depth + 1,
                ..*parent
            },
            None => Placed {
                depth: 0,
                root_start: span.start_unix_nano,
                root_len: span.duration_ns(),
            },
        };
        if self.placed.len() >= self.capacity {
            self.placed.clear();
        }
        self.placed.insert(span.span_id, at);

        let str_attr = |k: &str| match span.attr(k) {
            Some(AttrValue::Str(s)) => printable(s).into_owned(),
            Some(other) => printable(&other.to_string()).into_owned(),
            None => String::new(),
        };
        let secs = span.start_unix_nano / 1_000_000_000;
        let millis = (span.start_unix_nano / 1_000_000) % 1000;
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let is_db = span.attr("db.system.name").is_some();
        let (what, outcome) = if is_db {
            let text = str_attr("db.query.text");
            let text: String = text.chars().take(60).collect();
            let outcome = span
                .attr("db.response.status_code")
                .map(|c| c.to_string())
                .unwrap_or_else(|| "ok".into());
            (format!("{} {text}", str_attr("db.system.name")), outcome)
        } else {
            (
                format!(
                    "{} {}",
                    str_attr("http.request.method"),
                    str_attr("url.path")
                ),
                str_attr("http.response.status_code"),
            )
        };
        let outcome = match span.status {
            SpanStatus::Error => self.paint("31", &outcome),
            _ => self.paint("32", &outcome),
        };
        let kind = match span.kind {
            SpanKind::Server => self.paint("36", "SERVER"),
            SpanKind::Client => self.paint("35", "CLIENT"),
        };
        let ms = span.duration_ns() as f64 / 1e6;
        let peer = match (span.kind, is_db) {
            (SpanKind::Server, _) => format!(
                "← {}:{}",
                str_attr("client.address"),
                str_attr("client.port")
            ),
            (SpanKind::Client, _) => format!(
                "→ {}:{}",
                str_attr("server.address"),
                str_attr("server.port")
            ),
        };
        let trace = span.trace_id.to_string();
        let mut out = String::new();
        let _ = write!(
            out,
            "{h:02}:{m:02}:{s:02}.{millis:03} {trace} |{bar}| {indent}{kind} {what} {outcome} {ms:.2} ms  {exe}[{pid}] {peer}",
            trace = &trace[..8],
            bar = Self::bar(span, &at),
            indent = "  ".repeat(at.depth.min(12)),
            exe = printable(&span.resource.executable_name),
            pid = span.resource.pid,
        );
        out
    }
}

/// A leak, highlighted.
pub fn leak_line(e: &crate::pools::LeakEvent, color: bool) -> String {
    let r = &e.row;
    let (label, code) = match e.state {
        crate::pools::LeakState::Found => ("LEAK", "1;31"),
        crate::pools::LeakState::Resolved => ("leak resolved", "33"),
    };
    let label = if color {
        format!("\x1b[{code}m{label}\x1b[0m")
    } else {
        label.to_string()
    };
    let culprit = match &r.culprit {
        Some(c) => format!(" by {} {}", printable(&c.method), printable(&c.path)),
        None => String::new(),
    };
    let trace = match &r.last_trace_id {
        Some(t) => format!(" trace {t}"),
        None => String::new(),
    };
    format!(
        "{label} {kind} {exe}[{pid}] → {db} {addr}:{port} (local port {local}) idle {idle:.0}s{culprit}{trace} last query: {query}",
        kind = e.kind.as_str(),
        exe = printable(&r.executable),
        pid = r.pool.pid,
        db = r.pool.db_system.as_str(),
        addr = r.pool.server.ip(),
        port = r.pool.server.port(),
        local = r.client_port,
        idle = r.idle_seconds,
        query = printable(r.last_query.as_deref().unwrap_or("-")),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        process::ProcessResource,
        spans::{Link, ParentSource, TraceId},
    };

    fn span(parent: Option<SpanId>, start: u64, end: u64, path: &str) -> Span {
        Span {
            trace_id: TraceId([7; 16]),
            span_id: SpanId::random(),
            parent_span_id: parent,
            parent_source: ParentSource::None,
            parent_confidence: 0.0,
            name: "GET".into(),
            kind: SpanKind::Server,
            start_unix_nano: start,
            end_unix_nano: end,
            status: SpanStatus::Unset,
            status_message: None,
            attributes: vec![
                ("http.request.method", AttrValue::Str("GET".into())),
                ("url.path", AttrValue::Str(path.to_string().into())),
                ("http.response.status_code", AttrValue::Int(200)),
            ],
            resource: Arc::new(ProcessResource {
                pid: 1,
                executable_name: "svc".into(),
                service_name: "svc".into(),
                service_namespace: None,
                service_instance_id: String::new(),
                host_name: "h".into(),
                k8s: None,
                k8s_node: None,
            }),
            tid: 1,
            link: Link::default(),
        }
    }

    /// Escape sequences and bidi overrides in captured traffic or process names
    /// never reach the terminal raw.
    #[test]
    fn hostile_bytes_are_escaped_not_printed() {
        let mut p = PrettyPrinter::new(true);
        let mut s = span(
            None,
            1,
            2,
            "/a\x1b]0;owned\x07\x1b[2J\u{9b}31m\u{202e}gpj.exe",
        );
        let resource = Arc::make_mut(&mut s.resource);
        resource.executable_name = "sh\x1b[8m".into();
        let line = p.line(&s);
        let raw: String = line
            .replace("\x1b[36m", "")
            .replace("\x1b[32m", "")
            .replace("\x1b[0m", "");
        assert!(
            !raw.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{line:?}"
        );
        assert!(
            raw.contains("/a\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{9b}31m\\u{202e}gpj.exe"),
            "{raw}"
        );
        assert!(raw.contains("sh\\u{1b}[8m[1]"), "{raw}");
        assert_eq!(printable("plain /path ünï"), "plain /path ünï");
    }

    #[test]
    fn children_print_indented_with_a_bar_inside_the_root() {
        let mut p = PrettyPrinter::new(false);
        let root = span(None, 1_000_000_000, 1_100_000_000, "/root");
        let child = span(Some(root.span_id), 1_050_000_000, 1_100_000_000, "/child");
        let root_line = p.line(&root);
        let child_line = p.line(&child);
        assert!(
            root_line.contains(&format!("|{}|", "█".repeat(BAR))),
            "{root_line}"
        );
        assert!(
            child_line.contains(&format!("|{}{}|", " ".repeat(BAR / 2), "█".repeat(BAR / 2))),
            "{child_line}"
        );
        assert!(
            child_line.contains("  SERVER GET /child 200"),
            "{child_line}"
        );
        assert!(root_line.contains("| SERVER GET /root 200"), "{root_line}");
    }
}
