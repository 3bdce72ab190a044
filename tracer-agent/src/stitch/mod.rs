//! Parent inference: gives spans their trace and parent, strongest rule first, and
//! records which rule did it (`tracer.parent.source`) and how sure it is
//! (`tracer.parent.confidence`):
//!
//! 1. header — an incoming W3C `traceparent` makes a SERVER span a child of that span
//!    in that trace; an outgoing request carrying one makes the CLIENT span use
//!    exactly those ids, so instrumented applications keep one tree
//!    ([`traceparent`]).
//! 2. socket — a SERVER span and the CLIENT span at the other end of the same TCP
//!    connection on this host, same exchange (the Nth request on it), same method
//!    and path: the client is the parent, across processes, through any depth.
//! 3. thread — a request a thread sends while it is handling one incoming request
//!    (it read that request, or the answer to an earlier call made for it) is that
//!    request's child ([`causality`]).
//! 4. timing — on a thread that interleaves requests (an event loop) a call is tied
//!    to the handler woken last before it, only when that is unambiguous (few
//!    handlers woken, the call soon after its wake; see [`causality`]), at a lower
//!    confidence than the thread rule; anything less clear stays unlinked (`none`)
//!    rather than linked wrongly.
//!
//! Spans wait for their relatives at most `wait`; the buffer is bounded.

pub mod causality;
pub mod traceparent;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    time::{Duration, Instant},
};

// The hot maps are keyed by kernel addresses, pids and random span ids: a fast,
// randomly seeded hasher is enough.
use foldhash::{HashMap, HashMapExt};

use crate::spans::{AttrValue, ParentSource, Span, SpanId, SpanKind, TraceId};

/// One exchange on one connection, as a 64-bit fingerprint of the connection's
/// endpoints and the exchange's number: the socket rule keeps tens of thousands of
/// these per second of traffic, and a fingerprint is a ninth of the key's size. Two
/// exchanges would be confused only if their fingerprints and their paths' hashes
/// were both equal.
type ExchangeKey = u64;

fn exchange_key(conn: (SocketAddr, SocketAddr), n: u64) -> ExchangeKey {
    use std::hash::BuildHasher;
    FIXED_HASHER.hash_one((conn, n))
}

/// A fixed seed: path hashes and exchange keys only ever meet each other in this
/// process.
const FIXED_HASHER: foldhash::fast::FixedState =
    foldhash::fast::FixedState::with_seed(0x7472_6163_6572);

struct Pending {
    span: Span,
    deadline: Instant,
    /// The span this one waits for (its parent, or its socket peer); `None` when it
    /// waits for a peer that has not arrived.
    waiting_on: Option<SpanId>,
}

/// Bounded FIFO map: the oldest entries go first when full.
struct Recent<K, V> {
    map: HashMap<K, V>,
    /// Keys in insertion order, with when they came (nanoseconds since `base`).
    order: VecDeque<(K, u64)>,
    base: Instant,
    capacity: usize,
    /// Entries older than this are forgotten.
    keep: Duration,
}

impl<K: std::hash::Hash + Eq + Clone, V> Recent<K, V> {
    fn new(capacity: usize, keep: Duration) -> Self {
        Self {
            map: HashMap::default(),
            order: VecDeque::new(),
            base: Instant::now(),
            capacity: capacity.max(1),
            keep,
        }
    }

    /// Inserts; returns how many entries went before their time to make room.
    fn insert(&mut self, k: K, v: V, now: Instant) -> u64 {
        let now = now.saturating_duration_since(self.base).as_nanos() as u64;
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back((k, now));
        }
        let keep = self.keep.as_nanos() as u64;
        let mut forced = 0;
        while let Some((old, at)) = self.order.front() {
            let expired = now.saturating_sub(*at) > keep;
            if self.order.len() <= self.capacity && !expired {
                break;
            }
            forced += u64::from(!expired);
            self.map.remove(old);
            self.order.pop_front();
        }
        forced
    }

    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }
}

/// Confidence of each rule.
const CONFIDENCE_HEADER: f64 = 1.0;
const CONFIDENCE_SOCKET: f64 = 1.0;
const CONFIDENCE_THREAD: f64 = 0.95;
const CONFIDENCE_TIMING: f64 = 0.7;

/// Links spans into traces; see the module documentation for the rules.
pub struct ParentInference {
    wait: Duration,
    max_pending: usize,
    pending: HashMap<SpanId, Pending>,
    arrivals: VecDeque<SpanId>,
    /// Final trace ids and time ranges of released spans, for relatives that
    /// arrive later.
    released: Recent<SpanId, (TraceId, u64, u64)>,
    /// CLIENT spans by connection exchange (pending or released), for the socket rule.
    clients: Recent<ExchangeKey, (SpanId, u64)>,
    /// SERVER spans waiting for the CLIENT span at the other end.
    servers_waiting: HashMap<ExchangeKey, SpanId>,
    /// Released spans and CLIENT exchanges forgotten before their time, the maps
    /// full (`tracer_state_forgotten_total{table="parent_inference"}`).
    pub forgotten: prometheus_client::metrics::counter::Counter,
    /// Spans waiting for a pending span, by the span they wait for.
    waiters: HashMap<SpanId, Vec<SpanId>>,
    /// What went out of the ordinary, for `/metrics`.
    pub counts: StitchCounts,
}

/// Counts of what parent inference had to refuse or repair, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StitchCounts {
    /// Spans forced out early (unlinked) because the waiting buffer was full.
    pub evicted: u64,
    /// Spans that arrived with the id of a span still waiting: each got a new id
    /// rather than overwrite the other.
    pub duplicate_ids: u64,
    /// Links refused because the parent waited on the child (a cycle).
    pub cycles: u64,
    /// Spans released, by `tracer.parent.source` (in [`SOURCES`] order).
    pub released: [u64; 5],
}

/// The parent sources, in the order [`StitchCounts::released`] counts them.
pub const SOURCES: [ParentSource; 5] = [
    ParentSource::Header,
    ParentSource::Socket,
    ParentSource::Thread,
    ParentSource::Timing,
    ParentSource::None,
];

impl StitchCounts {
    fn count_release(&mut self, source: ParentSource) {
        let i = SOURCES.iter().position(|s| *s == source).unwrap_or(4);
        self.released[i] += 1;
    }
}

/// A timing link must nest in time: the call inside the request it serves.
fn timing_fits(child: &Span, parent_start: u64, parent_end: u64) -> bool {
    child.parent_source != ParentSource::Timing
        || (parent_start <= child.start_unix_nano && child.end_unix_nano <= parent_end)
}

fn unlink(span: &mut Span) {
    span.parent_span_id = None;
    span.parent_source = ParentSource::None;
    span.parent_confidence = 0.0;
}

/// The span's `url.path`, hashed: all the socket rule compares.
fn path_of(span: &Span) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = FIXED_HASHER.build_hasher();
    if let Some(AttrValue::Str(path)) = span.attr("url.path") {
        path.hash(&mut h);
    }
    h.finish()
}

/// Both ends on this host: loopback, or the same address at both ends.
fn same_host(conn: (SocketAddr, SocketAddr)) -> bool {
    conn.0.ip().is_loopback() || conn.0.ip() == conn.1.ip()
}

impl ParentInference {
    pub fn new(wait: Duration, max_pending: usize) -> Self {
        let recent = max_pending.max(1024) * 4;
        // Relatives arrive within their own wait: keep released spans that long.
        let keep = wait.max(Duration::from_secs(1));
        Self {
            wait,
            max_pending: max_pending.max(1),
            pending: HashMap::new(),
            arrivals: VecDeque::new(),
            released: Recent::new(recent, keep),
            clients: Recent::new(recent, keep),
            servers_waiting: HashMap::new(),
            forgotten: Default::default(),
            waiters: HashMap::new(),
            counts: StitchCounts::default(),
        }
    }

    /// Spans waiting for relatives right now.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes one finished span; pushes every span whose trace is now final to `out`.
    pub fn push(&mut self, mut span: Span, now: Instant, out: &mut Vec<Span>) {
        if self.pending.contains_key(&span.span_id) {
            // Two spans with one id (a header reused by a client we could not tell
            // from a forwarder): the later one gets an id of its own rather than
            // overwrite the one waiting.
            self.counts.duplicate_ids += 1;
            span.span_id = SpanId::random();
        }
        let id = span.span_id;
        let mut waiting_on = None;
        let mut wait = false;
        match span.kind {
            SpanKind::Server if span.link.header => {
                // The header rule was applied when the span was built.
                span.parent_confidence = CONFIDENCE_HEADER;
                if let Some(parent) = span.parent_span_id
                    && self.pending.contains_key(&parent)
                {
                    waiting_on = Some(parent);
                    wait = true;
                }
            }
            SpanKind::Server => {
                if let (Some(conn), Some(n)) = (span.link.conn, span.link.exchange) {
                    let key = exchange_key(conn, n);
                    match self.clients.get(&key) {
                        Some((client, path)) if *path == path_of(&span) => {
                            let client = *client;
                            self.link(&mut span, client, ParentSource::Socket, CONFIDENCE_SOCKET);
                            if self.pending.contains_key(&client) {
                                waiting_on = Some(client);
                                wait = true;
                            }
                        }
                        Some(_) => {} // exchanges do not line up: do not guess
                        None if same_host(conn) => {
                            self.servers_waiting.insert(key, id);
                            wait = true;
                        }
                        None => {}
                    }
                }
            }
            SpanKind::Client => {
                if let (Some(conn), Some(n)) = (span.link.conn, span.link.exchange) {
                    let key = exchange_key(conn, n);
                    let forced = self.clients.insert(key, (id, path_of(&span)), now);
                    self.forgotten.inc_by(forced);
                    if let Some(server) = self.servers_waiting.remove(&key) {
                        self.adopt_waiting_server(server, &span);
                    }
                }
                if let Some(parent) = span.link.woken_by {
                    let (source, confidence) = if span.link.dedicated_thread {
                        (ParentSource::Thread, CONFIDENCE_THREAD)
                    } else {
                        (ParentSource::Timing, CONFIDENCE_TIMING)
                    };
                    self.link(&mut span, parent, source, confidence);
                    if !self.released.map.contains_key(&parent) {
                        // The parent request is still open (or pending): wait for it.
                        waiting_on = Some(parent);
                        wait = true;
                    }
                }
            }
        }
        if let Some(parent) = span.parent_span_id
            && let Some(&(trace, start, end)) = self.released.get(&parent)
        {
            if timing_fits(&span, start, end) {
                span.trace_id = trace;
            } else {
                unlink(&mut span);
            }
        }
        if let Some(on) = waiting_on
            && self.waits_on(on, id)
        {
            // Its parent waits (through others) on it: a cycle no rule can make
            // right. The link goes, the span waits for nothing.
            self.counts.cycles += 1;
            unlink(&mut span);
            waiting_on = None;
            wait = false;
        }
        if !wait {
            self.release(span, now, out);
            return;
        }
        if let Some(on) = waiting_on {
            self.waiters.entry(on).or_default().push(id);
        }
        self.pending.insert(
            id,
            Pending {
                span,
                deadline: now + self.wait,
                waiting_on,
            },
        );
        self.arrivals.push_back(id);
        while self.pending.len() > self.max_pending {
            let Some(oldest) = self.arrivals.pop_front() else {
                break;
            };
            if self.pending.contains_key(&oldest) {
                self.counts.evicted += 1;
                self.give_up(oldest, now, out);
            }
        }
    }

    /// Whether pending span `from` waits, directly or through other pending spans,
    /// on `target`. Chains are as deep as the call tree; the walk is bounded.
    fn waits_on(&self, from: SpanId, target: SpanId) -> bool {
        let mut at = from;
        for _ in 0..64 {
            match self.pending.get(&at).and_then(|p| p.waiting_on) {
                Some(next) if next == target => return true,
                Some(next) => at = next,
                None => return false,
            }
        }
        // Deeper than any real call tree: treat it as a cycle.
        true
    }

    fn link(&self, span: &mut Span, parent: SpanId, source: ParentSource, confidence: f64) {
        span.parent_span_id = Some(parent);
        span.parent_source = source;
        span.parent_confidence = confidence;
    }

    /// A SERVER span that waited for its peer: the peer arrived.
    fn adopt_waiting_server(&mut self, server: SpanId, client: &Span) {
        let Some(p) = self.pending.get_mut(&server) else {
            return;
        };
        if path_of(&p.span) != path_of(client) {
            return;
        }
        p.span.parent_span_id = Some(client.span_id);
        p.span.parent_source = ParentSource::Socket;
        p.span.parent_confidence = CONFIDENCE_SOCKET;
        p.waiting_on = Some(client.span_id);
        self.waiters.entry(client.span_id).or_default().push(server);
    }

    /// Releases spans whose wait is over; call it periodically.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Span>) {
        // Each span is looked at once per call at most.
        for _ in 0..self.arrivals.len() {
            let Some(&id) = self.arrivals.front() else {
                break;
            };
            match self.pending.get(&id) {
                None => {
                    self.arrivals.pop_front();
                }
                Some(p) if p.deadline <= now => {
                    self.arrivals.pop_front();
                    if p.waiting_on.is_some_and(|w| self.pending.contains_key(&w)) {
                        // It waits on a span that is itself still pending: it goes
                        // out with that one (whose own wait is bounded).
                        self.arrivals.push_back(id);
                        continue;
                    }
                    self.give_up(id, now, out);
                }
                Some(_) => break,
            }
        }
    }

    /// Releases everything (shutdown).
    pub fn flush(&mut self, out: &mut Vec<Span>) {
        let ids: Vec<SpanId> = self.arrivals.drain(..).collect();
        let now = Instant::now();
        for id in ids {
            if self.pending.contains_key(&id) {
                self.give_up(id, now, out);
            }
        }
    }

    /// Releases a span whose relative never came: it keeps the links it already has
    /// only if they were made by a rule that needs no waiting.
    fn give_up(&mut self, id: SpanId, now: Instant, out: &mut Vec<Span>) {
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        let mut span = p.span;
        if let Some(on) = p.waiting_on
            && let Some(list) = self.waiters.get_mut(&on)
        {
            list.retain(|w| *w != id);
            if list.is_empty() {
                // The parent it waited for never came: forget it too.
                self.waiters.remove(&on);
            }
        }
        // Keep a link only when its parent's trace is known (or came on the wire):
        // an unlinked span is better than a link to a span that never shows up.
        let parent_known = span
            .parent_span_id
            .is_some_and(|p| self.released.get(&p).is_some());
        if span.parent_source != ParentSource::Header && !parent_known {
            span.parent_span_id = None;
            span.parent_source = ParentSource::None;
            span.parent_confidence = 0.0;
        }
        if let (Some(conn), Some(n)) = (span.link.conn, span.link.exchange)
            && span.kind == SpanKind::Server
        {
            self.servers_waiting.remove(&exchange_key(conn, n));
        }
        self.release(span, now, out);
    }

    /// The span's trace is final: hand it out, then everything that waited on it.
    fn release(&mut self, span: Span, now: Instant, out: &mut Vec<Span>) {
        if !self.waiters.contains_key(&span.span_id) {
            // Nothing waits on it (most spans): no work list.
            self.counts.count_release(span.parent_source);
            let forced = self.released.insert(
                span.span_id,
                (span.trace_id, span.start_unix_nano, span.end_unix_nano),
                now,
            );
            self.forgotten.inc_by(forced);
            out.push(span);
            return;
        }
        let mut work = vec![span];
        while let Some(span) = work.pop() {
            let id = span.span_id;
            self.counts.count_release(span.parent_source);
            let forced = self.released.insert(
                id,
                (span.trace_id, span.start_unix_nano, span.end_unix_nano),
                now,
            );
            self.forgotten.inc_by(forced);
            if let Some(children) = self.waiters.remove(&id) {
                for child in children {
                    if let Some(mut p) = self.pending.remove(&child) {
                        if timing_fits(&p.span, span.start_unix_nano, span.end_unix_nano) {
                            p.span.trace_id = span.trace_id;
                        } else {
                            unlink(&mut p.span);
                        }
                        work.push(p.span);
                    }
                }
            }
            out.push(span);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        process::ProcessResource,
        spans::{Link, SpanStatus},
    };
    use std::sync::Arc;

    fn span(kind: SpanKind, pid: u32, path: &str, start: u64, end: u64, link: Link) -> Span {
        Span {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            parent_span_id: None,
            parent_source: ParentSource::None,
            parent_confidence: 0.0,
            name: "GET".into(),
            kind,
            start_unix_nano: start,
            end_unix_nano: end,
            status: SpanStatus::Unset,
            status_message: None,
            attributes: vec![("url.path", AttrValue::Str(path.to_string().into()))],
            resource: Arc::new(ProcessResource {
                pid,
                executable_name: "svc".into(),
                service_name: "svc".into(),
                service_namespace: None,
                service_instance_id: String::new(),
                host_name: "h".into(),
                k8s: None,
                k8s_node: None,
            }),
            tid: pid,
            link,
        }
    }

    fn conn(client_port: u16, server_port: u16) -> Option<(SocketAddr, SocketAddr)> {
        Some((
            SocketAddr::from(([127, 0, 0, 1], client_port)),
            SocketAddr::from(([127, 0, 0, 1], server_port)),
        ))
    }

    /// A (pid 1) serves /x and calls B (pid 2) over one connection; events arrive the
    /// way the kernel reports them: innermost spans first.
    #[test]
    fn a_chain_across_processes_becomes_one_trace() {
        let mut st = ParentInference::new(Duration::from_secs(5), 1000);
        let now = Instant::now();
        let mut out = Vec::new();
        // Incoming request to A from an untraced peer on another host.
        let a_server = span(
            SpanKind::Server,
            1,
            "/x",
            10,
            100,
            Link {
                conn: Some((
                    SocketAddr::from(([10, 0, 0, 9], 5555)),
                    SocketAddr::from(([10, 0, 0, 1], 80)),
                )),
                exchange: Some(0),
                ..Link::default()
            },
        );
        // A's call to B, sent by the thread handling a_server.
        let a_client = span(
            SpanKind::Client,
            1,
            "/y",
            20,
            90,
            Link {
                conn: conn(40000, 8080),
                exchange: Some(3),
                woken_by: Some(a_server.span_id),
                dedicated_thread: true,
                header: false,
            },
        );
        let b_server = span(
            SpanKind::Server,
            2,
            "/y",
            25,
            85,
            Link {
                conn: conn(40000, 8080),
                exchange: Some(3),
                ..Link::default()
            },
        );
        let (a_server_id, a_client_id, b_server_id) =
            (a_server.span_id, a_client.span_id, b_server.span_id);
        st.push(b_server, now, &mut out);
        assert!(out.is_empty(), "B waits for its peer on this host");
        st.push(a_client, now, &mut out);
        assert!(out.is_empty(), "A's call waits for the request it serves");
        st.push(a_server, now, &mut out);
        assert_eq!(out.len(), 3);
        let by_id = |id: SpanId| out.iter().find(|s| s.span_id == id).unwrap();
        let (root, call, remote) = (by_id(a_server_id), by_id(a_client_id), by_id(b_server_id));
        assert_eq!(root.parent_span_id, None);
        assert_eq!(call.parent_span_id, Some(a_server_id));
        assert_eq!(call.parent_source, ParentSource::Thread);
        assert_eq!(remote.parent_span_id, Some(a_client_id));
        assert_eq!(remote.parent_source, ParentSource::Socket);
        assert!(out.iter().all(|s| s.trace_id == root.trace_id), "one trace");
        assert_eq!(st.pending(), 0);
    }

    #[test]
    fn an_event_loop_call_is_linked_by_timing_with_less_confidence() {
        let mut st = ParentInference::new(Duration::from_secs(5), 1000);
        let mut out = Vec::new();
        let server = span(SpanKind::Server, 1, "/a", 0, 100, Link::default());
        let call = span(
            SpanKind::Client,
            1,
            "/b",
            10,
            20,
            Link {
                woken_by: Some(server.span_id),
                dedicated_thread: false, // several requests open on that thread
                ..Link::default()
            },
        );
        let (server_id, call_id) = (server.span_id, call.span_id);
        st.push(call, Instant::now(), &mut out);
        st.push(server, Instant::now(), &mut out);
        assert_eq!(out.len(), 2);
        let call = out.iter().find(|s| s.span_id == call_id).unwrap();
        assert_eq!(call.parent_span_id, Some(server_id));
        assert_eq!(call.parent_source, ParentSource::Timing);
        assert!(call.parent_confidence < CONFIDENCE_THREAD);
    }

    #[test]
    fn a_call_without_a_clear_cause_stays_unlinked() {
        let mut st = ParentInference::new(Duration::from_secs(5), 1000);
        let mut out = Vec::new();
        let call = span(SpanKind::Client, 1, "/b", 10, 20, Link::default());
        st.push(call, Instant::now(), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].parent_source, ParentSource::None);
    }

    #[test]
    fn a_missing_relative_releases_the_span_unlinked_after_the_wait() {
        let mut st = ParentInference::new(Duration::from_millis(100), 1000);
        let mut out = Vec::new();
        let now = Instant::now();
        let orphan_parent = SpanId::random();
        let call = span(
            SpanKind::Client,
            1,
            "/b",
            10,
            20,
            Link {
                woken_by: Some(orphan_parent),
                dedicated_thread: true,
                ..Link::default()
            },
        );
        let server = span(
            SpanKind::Server,
            2,
            "/c",
            10,
            20,
            Link {
                conn: conn(1, 2),
                exchange: Some(0),
                ..Link::default()
            },
        );
        st.push(call, now, &mut out);
        st.push(server, now, &mut out);
        assert!(out.is_empty());
        st.expire(now + Duration::from_millis(50), &mut out);
        assert!(out.is_empty(), "still within the wait");
        st.expire(now + Duration::from_millis(150), &mut out);
        assert_eq!(out.len(), 2);
        assert!(
            out.iter().all(|s| s.parent_span_id.is_none()),
            "no link to a span that never came"
        );
        assert_eq!(st.pending(), 0);
        assert!(
            st.waiters.is_empty() && st.servers_waiting.is_empty(),
            "nothing is kept for the parent that never came"
        );
    }

    #[test]
    fn mismatched_exchanges_are_not_linked() {
        let mut st = ParentInference::new(Duration::from_secs(5), 1000);
        let mut out = Vec::new();
        let client = span(
            SpanKind::Client,
            1,
            "/one",
            0,
            10,
            Link {
                conn: conn(1, 2),
                exchange: Some(0),
                ..Link::default()
            },
        );
        let server = span(
            SpanKind::Server,
            2,
            "/two",
            1,
            9,
            Link {
                conn: conn(1, 2),
                exchange: Some(0),
                ..Link::default()
            },
        );
        st.push(client, Instant::now(), &mut out);
        st.push(server, Instant::now(), &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|s| s.parent_span_id.is_none()));
    }

    #[test]
    fn recent_maps_count_only_what_goes_before_its_time() {
        let mut r: Recent<u32, ()> = Recent::new(4, Duration::from_secs(10));
        let t0 = r.base;
        let forced: u64 = (0..6).map(|k| r.insert(k, (), t0)).sum();
        assert_eq!(forced, 2, "full: two went early");
        assert!(r.get(&0).is_none() && r.get(&5).is_some());
        // Past their time, entries go without counting.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(r.insert(9, (), later), 0);
        assert_eq!(r.map.len(), 1);
    }

    #[test]
    fn the_waiting_buffer_is_bounded() {
        let mut st = ParentInference::new(Duration::from_secs(60), 10);
        let mut out = Vec::new();
        for i in 0..50u16 {
            let s = span(
                SpanKind::Server,
                2,
                "/c",
                0,
                1,
                Link {
                    conn: conn(i, 2),
                    exchange: Some(0),
                    ..Link::default()
                },
            );
            st.push(s, Instant::now(), &mut out);
        }
        assert_eq!(st.pending(), 10);
        assert_eq!(out.len(), 40);
        assert_eq!(st.counts.evicted, 40);
        st.flush(&mut out);
        assert_eq!(out.len(), 50);
    }

    /// Two spans with one id: both come out, neither overwrites the other.
    #[test]
    fn a_duplicate_span_id_is_renamed_not_lost() {
        let mut st = ParentInference::new(Duration::from_secs(5), 1000);
        let mut out = Vec::new();
        let now = Instant::now();
        let parent = SpanId::random();
        let mk = || {
            span(
                SpanKind::Client,
                1,
                "/b",
                10,
                20,
                Link {
                    woken_by: Some(parent),
                    dedicated_thread: true,
                    ..Link::default()
                },
            )
        };
        let first = mk();
        let mut second = mk();
        second.span_id = first.span_id;
        st.push(first, now, &mut out);
        st.push(second, now, &mut out);
        assert_eq!(st.pending(), 2, "both wait for their parent");
        assert_eq!(st.counts.duplicate_ids, 1);
        st.flush(&mut out);
        assert_eq!(out.len(), 2);
        assert_ne!(out[0].span_id, out[1].span_id);
    }

    /// A SERVER span whose header names a CLIENT span that is itself waiting on
    /// that SERVER span (a header forwarded by a proxy we did not recognise):
    /// the cycle is refused at once instead of filling the buffer.
    #[test]
    fn a_wait_cycle_is_refused() {
        let mut st = ParentInference::new(Duration::from_secs(60), 1000);
        let mut out = Vec::new();
        let now = Instant::now();
        let server_id = SpanId::random();
        let client_id = SpanId::random();
        let mut client = span(
            SpanKind::Client,
            1,
            "/up",
            10,
            20,
            Link {
                woken_by: Some(server_id),
                dedicated_thread: true,
                ..Link::default()
            },
        );
        client.span_id = client_id;
        let mut server = span(
            SpanKind::Server,
            1,
            "/in",
            5,
            30,
            Link {
                header: true,
                ..Link::default()
            },
        );
        server.span_id = server_id;
        server.parent_span_id = Some(client_id);
        server.parent_source = ParentSource::Header;
        st.push(client, now, &mut out);
        assert!(out.is_empty(), "the call waits for the request it serves");
        st.push(server, now, &mut out);
        assert_eq!(st.counts.cycles, 1);
        assert_eq!(st.pending(), 0, "nothing waits on a cycle");
        assert_eq!(out.len(), 2);
        let server = out.iter().find(|s| s.span_id == server_id).unwrap();
        assert_eq!(server.parent_source, ParentSource::None);
        let client = out.iter().find(|s| s.span_id == client_id).unwrap();
        assert_eq!(client.parent_span_id, Some(server_id));
        assert_eq!(client.trace_id, server.trace_id);
    }
}
