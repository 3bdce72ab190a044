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
    /// It answered that request: `tid` read it, `by` wrote the answer (0 when the
    /// answer was not written by a thread we saw, e.g. paired at close).
    ServerAnswered {
        pid: u32,
        tid: u32,
        by: u32,
        span: SpanId,
    },
    /// Thread `tid` read the answer to a call made for `parent` (if known) on
    /// connection `conn`, or that call's end of stream. (Which thread sent the call
    /// is not asked: client libraries with I/O threads of their own, like Java's
    /// `HttpClient`, read answers on other threads than the caller's, and the caller
    /// may still serve one request at a time.)
    CallAnswered {
        pid: u32,
        tid: u32,
        ts_ns: u64,
        parent: Option<SpanId>,
        conn: u64,
    },
    /// The process runs a runtime that moves work between threads.
    MovesWork { pid: u32, runtime: &'static str },
    /// The process exited.
    ProcessExited { pid: u32 },
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
    /// Entries forgotten to stay within [`MAX_THREADS`] (`tracer_state_forgotten_total{table="causality"}`).
    pub forgotten: prometheus_client::metrics::counter::Counter,
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
    /// Processes seen handing one request's work from thread to thread (a request
    /// read by one thread and answered by another): work-stealing runtimes (Go,
    /// tokio multi-thread, Java virtual threads, .NET's thread pool) and hand-off
    /// designs, where neither the thread nor the timing rule holds.
    hands_off: HashMap<u32, ()>,
    /// Connection → when an answer on it was last read: a call sent on it soon
    /// after may be a queued request the pool handed the connection to on release,
    /// not the answered handler's own.
    answered_on: HashMap<u64, u64>,
    /// Calls the rules refused to link, by why.
    pub refused: Refusals,
}

/// Calls left without a cause because a rule's assumptions did not hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// The process moves work between threads (detected or a known runtime).
    pub moves_work: u64,
    /// More than one handler could have sent it.
    pub ambiguous: u64,
    /// Sent on a pooled connection right after its previous answer.
    pub pool_hand_off: u64,
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

/// What the wake queue says about one call.
enum Verdict {
    /// The one handler woken shortly before (its request, if known).
    Woken(Option<SpanId>),
    /// No handler was woken shortly before.
    NoWake,
    /// More than one was.
    Ambiguous,
    /// Sent on a connection just handed back by its previous answer.
    PoolHandOff,
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
/// More handlers than this woken and not yet accounted for when a call goes out:
/// the call could be any of theirs, and their order is not trusted (measured:
/// event loops that await a pool, a connect or a lock before they send resume out
/// of input order, and a slow handler sends after a newer one was woken).
const MAX_CONTENDERS: usize = 1;
/// Wakes older than this are dropped from a thread's queue.
const STALE_WAKE_NS: u64 = 100 * MAX_WAKE_TO_SEND_NS;

impl Causality {
    /// [`Causality::cause`] as (parent, dedicated), for tests.
    #[cfg(test)]
    fn cause_pair(&mut self, pid: u32, tid: u32, ts: u64) -> (Option<SpanId>, bool) {
        let c = self.cause(pid, tid, ts, u64::from(tid) << 32);
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
            ThreadEvent::ServerAnswered { pid, tid, by, span } => {
                if by != 0 && by != tid {
                    self.hand_off(pid);
                }
                self.server_answered(pid, tid, span)
            }
            ThreadEvent::CallAnswered {
                pid,
                tid,
                ts_ns,
                parent,
                conn,
            } => {
                if self.answered_on.len() >= MAX_THREADS {
                    self.forgotten.inc_by(self.answered_on.len() as u64);
                    self.answered_on.clear();
                }
                self.answered_on.insert(conn, ts_ns);
                self.answered_call(pid, tid, parent, conn, ts_ns)
            }
            ThreadEvent::MovesWork { pid, runtime } => {
                if !self.hands_off.contains_key(&pid) {
                    log::debug!(target: "tracer::causality", "process {pid} runs {runtime}: thread and timing rules off for it");
                    self.hand_off(pid);
                }
            }
            ThreadEvent::ProcessExited { pid } => self.process_exited(pid),
        }
    }

    /// `pid` moved one request's work between threads: no thread or timing link
    /// for it from now on.
    fn hand_off(&mut self, pid: u32) {
        if self.hands_off.len() >= MAX_THREADS {
            self.forgotten.inc_by(self.hands_off.len() as u64);
            self.hands_off.clear();
        }
        if self.hands_off.insert(pid, ()).is_none() {
            log::debug!(target: "tracer::causality", "process {pid} hands requests between threads: thread and timing rules off for it");
        }
    }

    /// The process is gone: its pid may come back as another program.
    fn process_exited(&mut self, pid: u32) {
        self.hands_off.remove(&pid);
    }

    fn server_request(&mut self, pid: u32, tid: u32, span: SpanId, ts: u64) {
        if self.wakes.len() >= MAX_THREADS
            || self.open.len() >= MAX_THREADS
            || self.ready.len() >= MAX_THREADS
        {
            self.forgotten.inc_by(
                (self.wakes.len() + self.open.len() + self.ready.len() + self.serving.len()) as u64,
            );
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
            self.forgotten.inc();
        }
        q.push_back(wake);
    }

    /// Remembers what a server request is, while it is served.
    fn serving(&mut self, span: SpanId, method: &str, path: &str) {
        if self.serving.len() >= MAX_THREADS {
            self.forgotten.inc_by(self.serving.len() as u64);
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

    /// The parent candidate of a request this thread sends at `ts` on connection
    /// `conn`, and whether the thread serves one request at a time.
    pub fn cause(&mut self, pid: u32, tid: u32, ts: u64, conn: u64) -> Cause {
        if self.hands_off.contains_key(&pid) {
            self.refused.moves_work += 1;
            return Cause::default();
        }
        let dedicated = self.open.get(&(pid, tid)).copied() == Some(1);
        // Sent on a connection whose previous answer was just read: on an event
        // loop that is as likely a request queued in a pool (handed the connection
        // on release) as the answered handler's next call.
        let reused_at_once = self
            .answered_on
            .get(&conn)
            .is_some_and(|&at| at <= ts && ts - at <= MAX_WAKE_TO_SEND_NS);
        let mut verdict = Verdict::NoWake;
        if let Some(q) = self.ready.get_mut(&(pid, tid)) {
            // Wakes long before `ts` can no longer be anybody's cause.
            q.retain(|w| w.ts.saturating_add(STALE_WAKE_NS) >= ts);
            // Every handler woken before the call and not yet accounted for could
            // have sent it: one woken long ago whose handler is slow as much as
            // one woken just now. A wake is accounted for when its handler's call
            // takes it, or when the handler answers its request.
            let contenders = q.iter().filter(|w| w.ts <= ts).count();
            if contenders > MAX_CONTENDERS {
                // Several could have: do not guess. Their wakes stay until their
                // handlers answer, so the doubt lasts as long as the crowd.
                verdict = Verdict::Ambiguous;
            } else if let Some(i) = q
                .iter()
                .position(|w| w.ts <= ts && ts - w.ts <= MAX_WAKE_TO_SEND_NS)
            {
                verdict = if reused_at_once {
                    Verdict::PoolHandOff
                } else {
                    Verdict::Woken(q.remove(i).and_then(|w| w.parent))
                };
            }
        }
        if dedicated {
            return Cause {
                parent: self.wakes.get(&(pid, tid)).map(|w| w.parent),
                dedicated: true,
            };
        }
        let parent = match verdict {
            Verdict::Woken(parent) => parent,
            Verdict::NoWake => None,
            Verdict::Ambiguous => {
                self.refused.ambiguous += 1;
                None
            }
            Verdict::PoolHandOff => {
                self.refused.pool_hand_off += 1;
                None
            }
        };
        Cause {
            parent,
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

    const MS: u64 = 1_000_000;

    fn answered(c: &mut Causality, tid: u32, by: u32, span: SpanId) {
        c.observe(ThreadEvent::ServerAnswered {
            pid: 1,
            tid,
            by,
            span,
        });
    }

    /// An event loop (thread 1 of pid 1) with one request in flight already, whose
    /// handler made its call: the thread interleaves requests from now on.
    fn event_loop() -> Causality {
        let mut c = Causality::default();
        c.server_request(1, 1, SpanId::random(), 0);
        c.cause(1, 1, 1, 99);
        c
    }

    fn call_answered(c: &mut Causality, parent: Option<SpanId>, conn: u64, ts: u64) {
        c.observe(ThreadEvent::CallAnswered {
            pid: 1,
            tid: 1,
            ts_ns: ts,
            parent,
            conn,
        });
    }

    #[test]
    fn an_event_loop_links_a_call_only_to_the_one_handler_woken_before_it() {
        let mut c = event_loop();
        let a = SpanId::random();
        c.server_request(1, 1, a, 1_000);
        assert_eq!(c.cause_pair(1, 1, 1_200), (Some(a), false));
        assert_eq!(c.cause_pair(1, 1, 1_300), (None, false), "its wake is used");
        // Two handlers woken before a call: it could be either's.
        let (b, d) = (SpanId::random(), SpanId::random());
        c.server_request(1, 1, b, 10 * MS);
        c.server_request(1, 1, d, 10 * MS + 100);
        assert_eq!(c.cause_pair(1, 1, 10 * MS + 200), (None, false));
        assert_eq!(c.refused.ambiguous, 1);
        // ... and the next call too: nobody knows whose wake the first took.
        assert_eq!(c.cause_pair(1, 1, 10 * MS + 300), (None, false));
        // Once both handlers answered, the loop is clear again.
        answered(&mut c, 1, 1, b);
        answered(&mut c, 1, 1, d);
        let e = SpanId::random();
        c.server_request(1, 1, e, 11 * MS);
        assert_eq!(c.cause_pair(1, 1, 11 * MS + 10), (Some(e), false));
        // A handler woken more than the window before the call, still to send,
        // may be slow rather than done: a newer wake is not the only candidate.
        let (slow, new) = (SpanId::random(), SpanId::random());
        c.server_request(1, 1, slow, 12 * MS);
        c.server_request(1, 1, new, 12 * MS + MAX_WAKE_TO_SEND_NS + 500_000);
        assert_eq!(
            c.cause_pair(1, 1, 12 * MS + MAX_WAKE_TO_SEND_NS + 600_000),
            (None, false)
        );
        answered(&mut c, 1, 1, slow);
        answered(&mut c, 1, 1, new);
        // A wake long before the call is nobody's cause any more.
        let late = SpanId::random();
        c.server_request(1, 1, late, 20 * MS);
        assert_eq!(
            c.cause_pair(1, 1, 20 * MS + MAX_WAKE_TO_SEND_NS + 1),
            (None, false)
        );
    }

    #[test]
    fn answers_wake_handlers_and_a_handler_that_answers_takes_its_wakes_out() {
        let mut c = event_loop();
        let (x, y) = (SpanId::random(), SpanId::random());
        c.server_request(1, 1, x, MS);
        assert_eq!(c.cause(1, 1, MS + 10, 7).parent, Some(x));
        // The answer to x's call resumes x: its next call (on another connection)
        // is x's.
        call_answered(&mut c, Some(x), 7, MS + 20);
        call_answered(&mut c, Some(x), 7, MS + 25); // more of the same answer
        assert_eq!(c.cause(1, 1, MS + 30, 8).parent, Some(x));
        // A handler that answers its request takes its wake out of the queue.
        c.server_request(1, 1, y, 10 * MS);
        answered(&mut c, 1, 1, y);
        assert_eq!(c.cause_pair(1, 1, 10 * MS + 10), (None, false));
        // An answer to a call of unknown cause resumes some handler: while it may
        // still send, a call is not guessed.
        let (q, r) = (SpanId::random(), SpanId::random());
        c.server_request(1, 1, q, 20 * MS);
        assert_eq!(c.cause(1, 1, 20 * MS + 5, 14).parent, Some(q));
        call_answered(&mut c, None, 9, 21 * MS);
        c.server_request(1, 1, r, 21 * MS + 10);
        assert_eq!(c.cause(1, 1, 21 * MS + 20, 10).parent, None);
        // ... until a handler with no wake of its own answers (q: the anonymous
        // wake was its): then r's call is r's.
        answered(&mut c, 1, 1, q);
        assert_eq!(c.cause(1, 1, 21 * MS + 30, 15).parent, Some(r));
    }

    #[test]
    fn a_call_on_a_connection_just_handed_back_by_its_answer_is_not_guessed() {
        let mut c = event_loop();
        let (x, y) = (SpanId::random(), SpanId::random());
        c.server_request(1, 1, x, MS);
        assert_eq!(c.cause(1, 1, MS + 10, 7).parent, Some(x));
        // x's answer arrives on pooled connection 7, and a call goes out on 7
        // at once: a request queued in the pool may have been handed it.
        call_answered(&mut c, Some(x), 7, 2 * MS);
        assert_eq!(c.cause(1, 1, 2 * MS + 10, 7).parent, None);
        assert_eq!(c.refused.pool_hand_off, 1);
        // Later, connection 7 is an idle pooled connection like any other.
        c.server_request(1, 1, y, 10 * MS);
        answered(&mut c, 1, 1, x);
        assert_eq!(c.cause(1, 1, 10 * MS + 10, 7).parent, Some(y));
    }

    #[test]
    fn a_process_that_moves_work_between_threads_gets_no_thread_or_timing_links() {
        let mut c = Causality::default();
        let (a, b) = (SpanId::random(), SpanId::random());
        // Thread 2 reads a request; thread 3 answers it: work moved.
        c.server_request(1, 2, a, MS);
        assert_eq!(c.cause_pair(1, 2, MS + 10), (Some(a), true));
        answered(&mut c, 2, 3, a);
        c.server_request(1, 2, b, 2 * MS);
        assert_eq!(c.cause_pair(1, 2, 2 * MS + 10), (None, false));
        assert_eq!(c.refused.moves_work, 1);
        // Another process is not affected, and a call whose answer another thread
        // reads (a client with I/O threads of its own) leaves the thread that
        // serves one request at a time dedicated to it.
        let d = SpanId::random();
        c.server_request(2, 5, d, 3 * MS);
        assert_eq!(c.cause(2, 5, 3 * MS + 10, 40).parent, Some(d));
        c.observe(ThreadEvent::CallAnswered {
            pid: 2,
            tid: 6,
            ts_ns: 3 * MS + 20,
            parent: Some(d),
            conn: 40,
        });
        assert_eq!(c.cause_pair(2, 5, 3 * MS + 30), (Some(d), true));
        // A known runtime says so before any traffic does; an exited process's
        // pid starts afresh.
        c.observe(ThreadEvent::MovesWork {
            pid: 3,
            runtime: "go",
        });
        c.server_request(3, 7, SpanId::random(), 4 * MS);
        assert_eq!(c.cause_pair(3, 7, 4 * MS + 10), (None, false));
        c.observe(ThreadEvent::ProcessExited { pid: 1 });
        let e = SpanId::random();
        c.server_request(1, 9, e, 5 * MS);
        assert_eq!(c.cause_pair(1, 9, 5 * MS + 10), (Some(e), true));
    }

    #[test]
    fn a_thread_serving_one_request_is_dedicated_to_it() {
        let mut c = Causality::default();
        let only = SpanId::random();
        c.server_request(1, 2, only, 5);
        assert_eq!(c.cause_pair(1, 2, 6), (Some(only), true));
        // Long after its wake, still the request it serves.
        assert_eq!(c.cause_pair(1, 2, 60 * MS), (Some(only), true));
        answered(&mut c, 2, 2, only);
        assert_eq!(c.cause_pair(1, 2, 61 * MS), (None, false));
    }
}
