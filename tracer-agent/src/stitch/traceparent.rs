//! W3C trace context: the `traceparent` header, parsed once per request, and the
//! header rule that applies it to the request's span.

use std::collections::VecDeque;

use foldhash::HashMap;

use crate::spans::{ParentSource, Span, SpanId, SpanKind, TraceId};

/// A parsed W3C trace context (`traceparent` version 00).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    pub sampled: bool,
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Parses a `traceparent` header value; `None` for anything invalid per the W3C spec.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let version: [u8; 1] = unhex(version)?;
    // Version ff is invalid; version 00 has exactly four fields.
    if version[0] == 0xff || (version[0] == 0 && parts.next().is_some()) {
        return None;
    }
    let trace_id: [u8; 16] = unhex(trace)?;
    let parent_id: [u8; 8] = unhex(parent)?;
    let flags: [u8; 1] = unhex(flags.get(..2)?)?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id: TraceId(trace_id),
        parent_id: SpanId(parent_id),
        sampled: flags[0] & 1 == 1,
    })
}

/// What a request's `traceparent` says about its span, once the headers seen before
/// it on this host are taken into account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderUse {
    /// The header rule applies: a SERVER span is the child of the header's parent
    /// id; a CLIENT span *is* that id (an instrumented caller made it).
    Own,
    /// The header was forwarded unchanged by a hop that does not instrument (a
    /// reverse proxy): on a CLIENT request its id is not this span's, it already
    /// belongs to another span; on a SERVER request its parent is an ancestor
    /// further up, not the caller. The span keeps the header's trace and finds its
    /// parent by the other rules.
    Forwarded,
}

/// Where a `traceparent` was seen, for [`SeenHeaders::observe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderAt {
    /// Process `pid` read a request carrying it.
    ServerRead { pid: u32 },
    /// Process `pid` sent a request carrying it.
    ClientSent { pid: u32 },
    /// The server request that carried it is answered: its span is built now.
    ServerAnswered,
}

/// Header parent ids seen lately on this host, so that a `traceparent` forwarded
/// unchanged is recognised. A proxy reads the incoming request before it forwards
/// it, in the same process: that order is the order of its own records. Between
/// processes the kernel's records need not come in order (the peer may report its
/// read before the sender reports its send), so the next hop decides when its
/// span is built, long after the forward was seen.
pub struct SeenHeaders {
    /// Ids forgotten, oldest first, past the capacity
    /// (`tracer_state_forgotten_total{table="traceparent_ids"}`).
    pub forgotten: prometheus_client::metrics::counter::Counter,
    ids: HashMap<SpanId, Seen>,
    order: VecDeque<SpanId>,
    capacity: usize,
}

#[derive(Clone, Copy, Default)]
struct Seen {
    /// The last process that read a request carrying it.
    read_by: Option<u32>,
    /// A CLIENT span took it as its own id.
    claimed: bool,
    /// A request carried it again after that (forwarded unchanged).
    forwarded: bool,
}

impl Default for SeenHeaders {
    fn default() -> Self {
        Self::new(65536)
    }
}

impl SeenHeaders {
    /// Remembers `capacity` ids at most; the oldest are forgotten first.
    pub fn new(capacity: usize) -> Self {
        Self {
            forgotten: Default::default(),
            ids: HashMap::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn entry(&mut self, id: SpanId) -> &mut Seen {
        if !self.ids.contains_key(&id) {
            while self.order.len() >= self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                    self.forgotten.inc();
                }
            }
            self.order.push_back(id);
        }
        self.ids.entry(id).or_default()
    }

    /// A request carrying `tp` was read, sent or answered: whether the header is
    /// its span's own. Reads are always `Own` (decided again when answered).
    pub fn observe(&mut self, at: HeaderAt, tp: &TraceParent) -> HeaderUse {
        let seen = self.entry(tp.parent_id);
        match at {
            HeaderAt::ServerRead { pid } => {
                seen.read_by = Some(pid);
                HeaderUse::Own
            }
            HeaderAt::ClientSent { pid } if seen.read_by == Some(pid) || seen.claimed => {
                seen.forwarded = true;
                HeaderUse::Forwarded
            }
            HeaderAt::ClientSent { .. } => {
                seen.claimed = true;
                HeaderUse::Own
            }
            HeaderAt::ServerAnswered if seen.forwarded => HeaderUse::Forwarded,
            HeaderAt::ServerAnswered => HeaderUse::Own,
        }
    }
}

/// Applies the header rule to a span built from a request that carried `traceparent`.
/// A forwarded header gives the span its trace only.
pub fn apply_traceparent(span: &mut Span, traceparent: Option<(TraceParent, HeaderUse)>) {
    let Some((tp, usage)) = traceparent else {
        return;
    };
    span.trace_id = tp.trace_id;
    if usage == HeaderUse::Forwarded {
        return;
    }
    match span.kind {
        SpanKind::Server => {
            span.parent_span_id = Some(tp.parent_id);
            span.parent_source = ParentSource::Header;
        }
        SpanKind::Client => {
            // The outgoing header names the client span itself; its parent is not on the wire.
            span.span_id = tp.parent_id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_and_rejects_invalid_traceparents() {
        let tp =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id.to_string(), "00f067aa0ba902b7");
        assert!(tp.sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // Future versions may carry more fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn a_header_forwarded_unchanged_is_told_from_one_a_caller_made() {
        let tp = |p: &str| {
            parse_traceparent(&format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{p}-01")).unwrap()
        };
        use HeaderAt::*;
        let mut seen = SeenHeaders::new(16);
        // An instrumented caller (pid 1) sends P to a server (pid 2), which may
        // report its read before the caller reports its send.
        let p = tp("00000000000000a1");
        assert_eq!(seen.observe(ServerRead { pid: 2 }, &p), HeaderUse::Own);
        assert_eq!(seen.observe(ClientSent { pid: 1 }, &p), HeaderUse::Own);
        assert_eq!(seen.observe(ServerAnswered, &p), HeaderUse::Own);
        // A proxy (pid 3) reads Q and forwards it unchanged to pid 4: its CLIENT
        // span is not Q, and pid 4's parent is not Q's span.
        let q = tp("00000000000000b2");
        assert_eq!(seen.observe(ServerRead { pid: 3 }, &q), HeaderUse::Own);
        assert_eq!(
            seen.observe(ClientSent { pid: 3 }, &q),
            HeaderUse::Forwarded
        );
        assert_eq!(seen.observe(ServerRead { pid: 4 }, &q), HeaderUse::Own);
        assert_eq!(seen.observe(ServerAnswered, &q), HeaderUse::Forwarded);
        // Two CLIENT requests naming the same id: only the first owns it.
        let r = tp("00000000000000c3");
        assert_eq!(seen.observe(ClientSent { pid: 5 }, &r), HeaderUse::Own);
        assert_eq!(
            seen.observe(ClientSent { pid: 6 }, &r),
            HeaderUse::Forwarded
        );
        // Bounded: the oldest ids are forgotten.
        for i in 0..32u64 {
            seen.observe(ServerRead { pid: 7 }, &tp(&format!("{:016x}", 0x1000 + i)));
        }
        assert!(seen.ids.len() <= 16 && seen.order.len() <= 16);
        // Each id forgotten is counted: 3 + 32 seen, 16 kept.
        assert_eq!(seen.forgotten.get(), 3 + 32 - 16);
    }
}
