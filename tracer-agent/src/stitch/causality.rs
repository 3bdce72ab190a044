//! Causality: per thread, which server request it works for, so that the requests
//! it sends can name their parent (the thread and timing rules of parent inference).
//! The connection table reports what each thread reads and sends; this module keeps
//! the state and answers "what caused this call".

use std::collections::VecDeque;

// Keyed by pids, threads and random span ids: a fast, randomly seeded hasher.
use foldhash::HashMap;

use crate::spans::{SpanId, route};

/// The server request a database call was made for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Culprit {
    /// `http.request.method`.
    pub method: String,
    /// `url.path` (never the query).
    pub path: String,
    /// The path as a template (`/orders/{id}`), as in the RED metrics.
    pub route: String,
    /// The SERVER span's id.
    pub span_id: String,
}

/// What the connection table saw a thread do, for causality.
#[derive(Clone, Copy, Debug)]
pub enum ThreadEvent<'a> {
    /// It read a request it serves: the span assigned to it, and its method and
    /// target when it has a request line.
    ServerRequest {
        pid: u32,
        tid: u32,
        ts_ns: u64,
        span: SpanId,
        request: Option<(&'a str, &'a str)>,
    },
    /// It answered that request.
    ServerAnswered { pid: u32, tid: u32, span: SpanId },
    /// It read the answer to a call made for `parent` (if known) on connection
    /// `conn`, or that call's end of stream.
    CallAnswered {
        pid: u32,
        tid: u32,
        ts_ns: u64,
        parent: Option<SpanId>,
        conn: u64,
    },
}

/// What a call a thread sends was made for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cause {
    /// The server request being served, when known.
    pub parent: Option<SpanId>,
    /// The thread serves one request at a time (the thread rule), rather than
    /// interleaving them (the timing rule).
    pub dedicated: bool,
}

/// What woke a thread last: the server request it is working for.
#[derive(Clone, Copy, Debug)]
struct Wake {
    parent: SpanId,
}

/// Per-thread causality: which server request each thread is handling, so that the
/// requests it sends can name their parent (`Link::woken_by`).
///
/// A thread that serves one request at a time (thread per request, blocking I/O)
/// works for the request it read last, or for the one whose call it just got an
/// answer to. A thread that interleaves requests (an event loop) resumes its
/// handlers in the order their input arrived, whether that input is a new request
/// or the answer to a call a handler made: every such read queues a wake for the
/// request it serves, a handler that answers its own request takes its wakes out,
/// and a call takes the oldest wake still queued, provided it came within
/// [`MAX_WAKE_TO_SEND_NS`]. Anything less clear is left without a cause.
#[derive(Default)]
pub struct Causality {
    /// (pid, tid) → the server request whose bytes (or whose child call's answer)
    /// the thread read last.
    wakes: HashMap<(u32, u32), Wake>,
    /// (pid, tid) → server requests read by that thread and not yet answered.
    open: HashMap<(u32, u32), u32>,
    /// (pid, tid) → wakes (request served, when) not yet followed by a call, oldest
    /// first. An answer to a call made for no known request queues `None`: the
    /// handler it resumes may send next, and its call then stays unlinked instead
    /// of taking a neighbour's wake.
    ready: HashMap<(u32, u32), VecDeque<QueuedWake>>,
    /// Server requests being served: span → (method, url.path), for the database
    /// calls made for them (the culprit of a leaked connection).
    serving: HashMap<SpanId, (String, String)>,
}

/// A wake waiting for its handler's call: the request served (if known), the
/// handler it resumes (the request, or for a call of unknown cause the connection
/// it was made on) and when.
#[derive(Clone, Copy, Debug)]
struct QueuedWake {
    parent: Option<SpanId>,
    handler: u64,
    ts: u64,
}

fn handler_of(span: SpanId) -> u64 {
    u64::from_be_bytes(span.0)
}

/// Threads remembered at most; beyond it the table is cleared (threads re-learn
/// on their next request).
const MAX_THREADS: usize = 65536;
/// Wakes remembered per thread at most.
const MAX_READY: usize = 1024;
/// Longest an event-loop handler may take between being woken and sending its call
/// for the two to be tied together.
const MAX_WAKE_TO_SEND_NS: u64 = 2_000_000;
/// More handlers than this woken together and still to send: their order is not
/// trusted.
const MAX_CONTENDERS: usize = 4;
/// Wakes older than this are dropped from a thread's queue.
const STALE_WAKE_NS: u64 = 100 * MAX_WAKE_TO_SEND_NS;

impl Causality {
    /// [`Causality::cause`] as (parent, dedicated), for tests.
    #[cfg(test)]
    fn cause_pair(&mut self, pid: u32, tid: u32, ts: u64) -> (Option<SpanId>, bool) {
        let c = self.cause(pid, tid, ts);
        (c.parent, c.dedicated)
    }

    /// Takes in what a thread did.
    pub fn observe(&mut self, event: ThreadEvent<'_>) {
        match event {
            ThreadEvent::ServerRequest {
                pid,
                tid,
                ts_ns,
                span,
                request,
            } => {
                self.server_request(pid, tid, span, ts_ns);
                if let Some((method, target)) = request {
                    self.serving(span, method, target);
                }
            }
            ThreadEvent::ServerAnswered { pid, tid, span } => self.server_answered(pid, tid, span),
            ThreadEvent::CallAnswered {
                pid,
                tid,
                ts_ns,
                parent,
                conn,
            } => self.answered_call(pid, tid, parent, conn, ts_ns),
        }
    }

    fn server_request(&mut self, pid: u32, tid: u32, span: SpanId, ts: u64) {
        if self.wakes.len() >= MAX_THREADS
            || self.open.len() >= MAX_THREADS
            || self.ready.len() >= MAX_THREADS
        {
            self.wakes.clear();
            self.open.clear();
            self.ready.clear();
            self.serving.clear();
        }
        log::trace!(target: "tracer::causality", "{pid}/{tid} {ts} request {span}");
        self.wakes.insert((pid, tid), Wake { parent: span });
        *self.open.entry((pid, tid)).or_default() += 1;
        self.push_ready(
            pid,
            tid,
            QueuedWake {
                parent: Some(span),
                handler: handler_of(span),
                ts,
            },
        );
    }

    /// Queues a wake; a handler woken again (more of an answer, or its end,
    /// arrived) resumes at its latest wake, so an earlier one of it goes.
    fn push_ready(&mut self, pid: u32, tid: u32, wake: QueuedWake) {
        let q = self.ready.entry((pid, tid)).or_default();
        q.retain(|w| w.handler != wake.handler);
        if q.len() >= MAX_READY {
            q.pop_front();
        }
        q.push_back(wake);
    }

    /// Remembers what a server request is, while it is served.
    fn serving(&mut self, span: SpanId, method: &str, path: &str) {
        if self.serving.len() >= MAX_THREADS {
            self.serving.clear();
        }
        self.serving
            .insert(span, (method.to_string(), route::bounded_path(path)));
    }

    pub fn culprit(&self, span: SpanId) -> Option<Culprit> {
        self.serving.get(&span).map(|(method, path)| Culprit {
            method: method.clone(),
            route: route::url_template(path),
            path: path.clone(),
            span_id: span.to_string(),
        })
    }

    fn server_answered(&mut self, pid: u32, tid: u32, span: SpanId) {
        self.serving.remove(&span);
        log::trace!(target: "tracer::causality", "{pid}/{tid} answered {span}");
        if let Some(n) = self.open.get_mut(&(pid, tid)) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(&(pid, tid));
            }
        }
        if self
            .wakes
            .get(&(pid, tid))
            .is_some_and(|w| w.parent == span)
        {
            self.wakes.remove(&(pid, tid));
        }
        // Its handler is done: none of its wakes can lead to a call any more. A
        // handler with no wake of its own queued was resumed by an answer to a
        // call of unknown cause (or by input we do not see): the oldest such
        // anonymous wake is its.
        if let Some(q) = self.ready.get_mut(&(pid, tid)) {
            let before = q.len();
            q.retain(|w| w.parent != Some(span));
            if q.len() == before
                && let Some(i) = q.iter().position(|w| w.parent.is_none())
            {
                q.remove(i);
            }
            if q.is_empty() {
                self.ready.remove(&(pid, tid));
            }
        }
    }

    /// The parent candidate of a request this thread sends at `ts`, and whether the
    /// thread serves one request at a time.
    pub fn cause(&mut self, pid: u32, tid: u32, ts: u64) -> Cause {
        let dedicated = self.open.get(&(pid, tid)).copied() == Some(1);
        let queued = self.ready.get_mut(&(pid, tid)).and_then(|q| {
            // Wakes long before `ts` can no longer be anybody's cause.
            q.retain(|w| w.ts.saturating_add(STALE_WAKE_NS) >= ts);
            let fits = |w: &QueuedWake| w.ts <= ts && ts - w.ts <= MAX_WAKE_TO_SEND_NS;
            let candidates = q.iter().filter(|w| fits(w)).count();
            if candidates > MAX_CONTENDERS {
                // Too many handlers woken at once to trust their order: do not
                // guess, and forget them.
                q.retain(|w| !fits(w));
                return None;
            }
            // Handlers resume in the order their input arrived: the oldest first.
            let first = q.iter().position(fits);
            first.and_then(|i| q.remove(i)).and_then(|w| w.parent)
        });
        if dedicated {
            return Cause {
                parent: self.wakes.get(&(pid, tid)).map(|w| w.parent),
                dedicated: true,
            };
        }
        Cause {
            parent: queued,
            dedicated: false,
        }
    }

    /// The thread read the answer to a call made for `parent`: that handler
    /// resumes. On a dedicated thread its next call is for the same request; on an
    /// event loop it takes its turn among the other woken handlers.
    /// `conn` names the call's connection, which stands for the handler when its
    /// cause is unknown.
    fn answered_call(&mut self, pid: u32, tid: u32, parent: Option<SpanId>, conn: u64, ts: u64) {
        log::trace!(target: "tracer::causality", "{pid}/{tid} {ts} answer for {:?}", parent.map(|s| s.to_string()));
        if let Some(parent) = parent {
            self.wakes.insert((pid, tid), Wake { parent });
        }
        if self.ready.len() < MAX_THREADS || self.ready.contains_key(&(pid, tid)) {
            let handler = parent.map_or(conn, handler_of);
            self.push_ready(
                pid,
                tid,
                QueuedWake {
                    parent,
                    handler,
                    ts,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_loop_ties_calls_to_wakes_in_order_and_refuses_crowds() {
        let mut c = Causality::default();
        let (a, b) = (SpanId::random(), SpanId::random());
        // One thread reads two requests, then its handlers send in that order.
        c.server_request(1, 1, a, 1_000);
        c.server_request(1, 1, b, 1_100);
        assert_eq!(c.cause_pair(1, 1, 1_200), (Some(a), false));
        assert_eq!(c.cause_pair(1, 1, 1_300), (Some(b), false));
        assert_eq!(c.cause_pair(1, 1, 1_400), (None, false), "no wake left");
        // A wake long before the send is nobody's cause any more.
        let late = SpanId::random();
        c.server_request(1, 1, late, 2_000);
        assert_eq!(
            c.cause_pair(1, 1, 2_000 + MAX_WAKE_TO_SEND_NS + 1),
            (None, false)
        );
        // Too many handlers woken at once: no guess.
        for i in 0..=MAX_CONTENDERS as u64 {
            c.server_request(1, 1, SpanId::random(), 10_000_000 + i);
        }
        assert_eq!(c.cause_pair(1, 1, 10_000_100), (None, false));
        // Handlers resumed by answers take their turn in the same queue.
        let (x, y, z) = (SpanId::random(), SpanId::random(), SpanId::random());
        c.server_request(1, 1, x, 20_000_000);
        assert_eq!(c.cause_pair(1, 1, 20_000_010), (Some(x), false));
        c.server_request(1, 1, y, 20_000_020);
        c.answered_call(1, 1, Some(x), 7, 20_000_030);
        c.answered_call(1, 1, Some(x), 7, 20_000_035); // more of the same answer
        c.server_request(1, 1, z, 20_000_040);
        assert_eq!(
            c.cause_pair(1, 1, 20_000_050),
            (Some(y), false),
            "y woke first"
        );
        assert_eq!(
            c.cause_pair(1, 1, 20_000_060),
            (Some(x), false),
            "x's second call"
        );
        assert_eq!(c.cause_pair(1, 1, 20_000_070), (Some(z), false));
        // A handler that answers its request takes its wake out of the queue.
        let (p, q) = (SpanId::random(), SpanId::random());
        c.server_request(1, 1, p, 30_000_000);
        c.server_request(1, 1, q, 30_000_010);
        c.server_answered(1, 1, p);
        assert_eq!(c.cause_pair(1, 1, 30_000_020), (Some(q), false));
        // An answer to a call of unknown cause: whoever sends next stays unlinked
        // rather than take a neighbour's wake.
        let r = SpanId::random();
        c.answered_call(1, 1, None, 8, 40_000_000);
        c.server_request(1, 1, r, 40_000_010);
        assert_eq!(c.cause_pair(1, 1, 40_000_020), (None, false));
        assert_eq!(c.cause_pair(1, 1, 40_000_030), (Some(r), false));
        // ... and once that handler answers (its wake was anonymous), the
        // anonymous wake goes, so it does not shadow the next request.
        let (u, v) = (SpanId::random(), SpanId::random());
        c.server_request(1, 1, u, 50_000_000);
        assert_eq!(c.cause_pair(1, 1, 50_000_010), (Some(u), false));
        c.answered_call(1, 1, None, 9, 50_000_020);
        c.server_answered(1, 1, u);
        c.server_request(1, 1, v, 50_000_030);
        assert_eq!(c.cause_pair(1, 1, 50_000_040), (Some(v), false));
        // A thread with a single open request is dedicated.
        let only = SpanId::random();
        c.server_request(1, 2, only, 5);
        assert_eq!(c.cause_pair(1, 2, 6), (Some(only), true));
    }
}
