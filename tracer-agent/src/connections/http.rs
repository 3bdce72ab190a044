//! HTTP/1 connections: requests paired with their answers, the spans of each
//! exchange, and what each thread reads and answers (for causality).

use super::*;

/// One HTTP/1 connection: a decoder per direction and the requests awaiting answers.
pub(super) struct HttpConn {
    pub(super) requests: Http1Decoder,
    pub(super) responses: Http1Decoder,
    pub(super) pending: VecDeque<PendingRequest>,
    /// Index of the next request on this connection.
    pub(super) next_exchange: u64,
    /// Both ends count exchanges alike only when followed from the first byte.
    pub(super) from_start: bool,
    /// Client end: the cause of the last answered request, once one was answered.
    pub(super) last_woken_by: Option<Option<SpanId>>,
    /// The request whose head is read and whose body is not: it waits for its
    /// answer from its head on (servers answer before reading a body they refuse,
    /// or leave it to the application), and is completed in `pending` when its
    /// body ends — unless it was answered first.
    pub(super) open_request: Option<SpanId>,
}

pub(super) struct PendingRequest {
    pub(super) message: Http1Message,
    pub(super) tid: u32,
    pub(super) span_id: SpanId,
    pub(super) exchange: u64,
    pub(super) woken_by: Option<SpanId>,
    pub(super) dedicated: bool,
    /// The request's `traceparent`, parsed once when the request is read, and
    /// whether it is the span's own or forwarded unchanged.
    pub(super) traceparent: Option<(TraceParent, HeaderUse)>,
}

/// A request dropped without a span: on a server, the thread that read it no longer
/// serves it (else its later calls would name a request that was never answered).
fn forget_request<O: Observer>(role: Role, pid: u32, req: &PendingRequest, ctx: &mut Ctx<'_, O>) {
    if role == Role::Server {
        ctx.out.thread(ThreadEvent::ServerAnswered {
            pid,
            tid: req.tid,
            by: 0,
            span: req.span_id,
        });
    }
}

/// What registering a request needs of its connection.
pub(super) struct ConnEnd {
    role: Role,
    role_from_kernel: bool,
    opened_ns: u64,
    sock: u64,
}

impl HttpConn {
    /// A request whose head is read joins the requests waiting for an answer; its
    /// span id.
    fn register<O: Observer>(
        &mut self,
        message: Http1Message,
        rec: &DataRecord,
        end: &ConnEnd,
        ctx: &mut Ctx<'_, O>,
    ) -> SpanId {
        let (pid, tid) = (rec.meta.tgid, rec.meta.tid);
        if let StartLine::Request { method, .. } = &message.start {
            self.responses.expect_response_to(method);
        }
        if self.pending.len() >= ctx.max_pending
            && let Some(dropped) = self.pending.pop_front()
        {
            ctx.telemetry.dropped(DropReason::HttpPendingOverflow);
            forget_request(end.role, pid, &dropped, ctx);
        }
        let at = if end.role == Role::Server {
            HeaderAt::ServerRead { pid }
        } else {
            HeaderAt::ClientSent { pid }
        };
        let traceparent = message
            .headers
            .traceparent
            .as_deref()
            .and_then(traceparent::parse_traceparent)
            .map(|tp| (tp, ctx.out.traceparent(at, &tp)));
        let (span_id, woken_by, dedicated) = if end.role == Role::Server {
            let id = SpanId::random();
            let request = match &message.start {
                StartLine::Request { method, target } => Some((method.as_str(), target.as_str())),
                StartLine::Response { .. } => None,
            };
            ctx.out.thread(ThreadEvent::ServerRequest {
                pid,
                tid,
                ts_ns: rec.meta.ts_ns,
                span: id,
                request,
            });
            (id, None, false)
        } else {
            // An outgoing traceparent names this very client span, unless it was
            // forwarded from a request already seen.
            let id = match traceparent {
                Some((tp, HeaderUse::Own)) => tp.parent_id,
                _ => SpanId::random(),
            };
            // A handler's call starts at its connect() when it opens a connection
            // for it: that is the moment closest to its wake.
            let at = if self.next_exchange == 0 && end.role_from_kernel {
                end.opened_ns.min(message.start_ns)
            } else {
                message.start_ns
            };
            let Cause {
                parent: woken_by,
                dedicated,
            } = ctx.cause(rec, at, end.sock);
            log::trace!(target: "tracer::causality", "{pid}/{tid} {at} call {id} from {:?}", woken_by.map(|s| s.to_string()));
            (id, woken_by, dedicated)
        };
        self.pending.push_back(PendingRequest {
            message,
            tid,
            span_id,
            exchange: self.next_exchange,
            woken_by,
            dedicated,
            traceparent,
        });
        self.next_exchange += 1;
        span_id
    }
}

impl Connection {
    /// The peer ended its stream and a thread read that end: on a client
    /// connection that resumes the handler waiting for its answer (a response
    /// delimited by the close, or a reader that reads to the end).
    pub(super) fn end_of_stream<O: Observer>(&mut self, rec: &DataRecord, ctx: &mut Ctx<'_, O>) {
        let Protocol::Http1(http) = &self.protocol else {
            return;
        };
        if self.role != Role::Client || rec.direction != Direction::Recv {
            return;
        }
        let cause = match http.pending.front() {
            Some(waiting) => Some(waiting.woken_by),
            None => http.last_woken_by,
        };
        if let Some(parent) = cause {
            ctx.out.thread(ThreadEvent::CallAnswered {
                pid: rec.meta.tgid,
                tid: rec.meta.tid,
                ts_ns: rec.meta.ts_ns,
                parent,
                conn: self.sock,
            });
        }
    }

    pub(super) fn http_data<O: Observer>(
        &mut self,
        rec: &DataRecord,
        chunk: &Chunk<'_>,
        ctx: &mut Ctx<'_, O>,
    ) {
        let Protocol::Http1(http) = &mut self.protocol else {
            return;
        };
        let requests_flow = if self.role == Role::Server {
            Direction::Recv
        } else {
            Direction::Send
        };
        let mut messages = std::mem::take(&mut ctx.scratch.http);
        messages.clear();
        if rec.direction == requests_flow {
            if let Err(e) = http.requests.feed(chunk, &mut messages) {
                log::debug!("HTTP request decode error on {:?}: {e}", self.endpoints);
                ctx.telemetry.dropped(DropReason::HttpRequestMalformed);
                // The open request's body was dropped with the message in progress;
                // it keeps its head, and its place in `pending`.
                if messages.is_empty() {
                    http.open_request = None;
                }
            }
            let end = ConnEnd {
                role: self.role,
                role_from_kernel: self.role_from_kernel,
                opened_ns: self.opened_ns,
                sock: self.sock,
            };
            for (i, message) in messages.drain(..).enumerate() {
                if i == 0
                    && let Some(open) = http.open_request.take()
                {
                    // The body of the request registered at its head has ended.
                    if let Some(req) = http.pending.back_mut().filter(|r| r.span_id == open) {
                        req.message = message;
                    }
                    continue;
                }
                http.register(message, rec, &end, ctx);
            }
            ctx.scratch.http = messages;
            if http.open_request.is_none()
                && let Some(head) = http.requests.in_progress()
            {
                let head = head.clone();
                http.open_request = Some(http.register(head, rec, &end, ctx));
            }
            return;
        }
        if let Err(e) = http.responses.feed(chunk, &mut messages) {
            log::debug!("HTTP response decode error on {:?}: {e}", self.endpoints);
            ctx.telemetry.dropped(DropReason::HttpResponseMalformed);
        }
        for response in &messages {
            self.answer(response, rec.meta.tid, ctx);
        }
        messages.clear();
        ctx.scratch.http = messages;
        if let Protocol::Http1(http) = &mut self.protocol {
            if http.responses.is_tunnel() {
                // 101 Switching Protocols or CONNECT: what follows is not HTTP/1.
                // Requests still waiting will not be answered in HTTP.
                for req in std::mem::take(&mut http.pending) {
                    forget_request(self.role, self.pid, &req, ctx);
                }
                self.protocol = Protocol::Other;
            } else if http.pending.is_empty() && http.pending.capacity() > 0 {
                // Every request is answered: an idle connection holds no queue.
                http.pending = VecDeque::new();
            }
        }
    }

    /// The connection closed with requests unanswered: each becomes a span that
    /// ends when its client gave up (its end sent the first FIN) or the connection
    /// closed, with `error.type` saying which end ended it.
    pub(super) fn abandon<O: Observer>(&mut self, ctx: &mut Ctx<'_, O>) {
        let closed_ns = if self.closed_ns != 0 {
            self.closed_ns
        } else {
            self.last_io_ns
        };
        let (error_type, end_ns) = match (self.role, self.ending) {
            // The client closed while waiting: it gave up (a timeout, most often).
            (Role::Client, Some((false, at))) => ("timeout", at),
            (Role::Server, Some((true, _))) => ("client_closed", closed_ns),
            _ => ("connection_closed", closed_ns),
        };
        // Each answer takes the oldest waiting request.
        while let Protocol::Http1(http) = &self.protocol
            && let Some(oldest) = http.pending.front()
        {
            let response = Http1Message {
                start: StartLine::Response { status: 0 },
                version_minor: oldest.message.version_minor,
                headers: Default::default(),
                start_ns: end_ns,
                end_ns: end_ns.max(oldest.message.start_ns),
                body_len: 0,
                head_truncated: false,
                body_sync_lost: false,
            };
            self.answer_as(&response, 0, Some(error_type), ctx);
        }
    }

    pub(super) fn conn_key(&self) -> Option<(SocketAddr, SocketAddr)> {
        let e = &self.endpoints;
        match self.role {
            Role::Server => Some((e.remote, e.local)),
            Role::Client => Some((e.local, e.remote)),
            Role::Unknown => None,
        }
    }

    /// Pairs a response with the oldest waiting request and emits the span.
    /// `reader` is the thread that read the response (0 when the connection closed).
    pub(super) fn answer<O: Observer>(
        &mut self,
        response: &Http1Message,
        reader: u32,
        ctx: &mut Ctx<'_, O>,
    ) {
        self.answer_as(response, reader, None, ctx);
    }

    /// [`Self::answer`]; `abandoned`: there was no response, the connection closed
    /// (the `error.type` to give the span).
    fn answer_as<O: Observer>(
        &mut self,
        response: &Http1Message,
        reader: u32,
        abandoned: Option<&'static str>,
        ctx: &mut Ctx<'_, O>,
    ) {
        let conn = self.conn_key();
        let sock = self.sock;
        let ips = self.addr_text();
        let Protocol::Http1(http) = &mut self.protocol else {
            return;
        };
        if let StartLine::Response { status } = response.start
            && (100..200).contains(&status)
            && status != 101
        {
            return; // interim response: the final one follows
        }
        let Some(mut req) = http.pending.pop_front() else {
            ctx.telemetry.dropped(DropReason::HttpResponseUnpaired);
            return;
        };
        let kind = if self.role == Role::Server {
            SpanKind::Server
        } else {
            SpanKind::Client
        };
        let from_start = http.from_start;
        if kind == SpanKind::Server
            && let Some((tp, usage)) = &mut req.traceparent
        {
            // Forwarded unchanged by a proxy on this host: its read was reported
            // by now, and the header's parent is not this span's caller.
            *usage = ctx.out.traceparent(HeaderAt::ServerAnswered, tp);
        }
        if kind == SpanKind::Server {
            ctx.out.thread(ThreadEvent::ServerAnswered {
                pid: self.pid,
                tid: req.tid,
                by: reader,
                span: req.span_id,
            });
        } else if reader != 0 {
            ctx.out.thread(ThreadEvent::CallAnswered {
                pid: self.pid,
                tid: reader,
                ts_ns: response.end_ns,
                parent: req.woken_by,
                conn: sock,
            });
            http.last_woken_by = Some(req.woken_by);
        }
        let resource = ctx.procs.get(self.pid, &self.comm);
        let header = matches!(req.traceparent, Some((_, HeaderUse::Own)));
        let mut span = http_span(&HttpExchange {
            kind,
            request: &req.message,
            response,
            local: self.endpoints.local,
            remote: self.endpoints.remote,
            ips: &ips,
            abandoned,
            resource,
            tid: req.tid,
            span_id: req.span_id,
            link: Link {
                conn,
                exchange: from_start.then_some(req.exchange),
                woken_by: req.woken_by,
                dedicated_thread: req.dedicated,
                header,
            },
            tls: self.tls,
        });
        traceparent::apply_traceparent(&mut span, req.traceparent);
        ctx.telemetry.spans_built.inc();
        ctx.out.span(span);
    }
}
