//! Database client connections: decoded calls, their spans, and each chunk's use
//! reported to the pool tracker.

use super::*;

/// The client end of a database connection.
pub(super) struct DbConn {
    pub(super) decoder: DbDecoder,
    /// The last call completed on it: its (obfuscated) text and span.
    pub(super) last_call: Option<(Option<String>, SpanId, u64)>,
    /// Thread that sent the latest request bytes.
    pub(super) request_tid: u32,
    /// What that thread was working for when it sent them.
    pub(super) cause: Cause,
    /// The server request the call in flight was made for, and the one the last
    /// completed call was made for.
    pub(super) call_culprit: Option<Culprit>,
    pub(super) last_culprit: Option<Culprit>,
    /// The handshake's end was seen (or can no longer be timed).
    pub(super) ready: bool,
    /// Records of ciphertext since the session went encrypted (SSLRequest
    /// accepted), waiting for the TLS probes' plaintext.
    pub(super) ciphertext_records: u32,
}

impl DbConn {
    /// `joined_late`: the connection was open before we saw it connect, so its
    /// handshake cannot be timed.
    pub(super) fn new(decoder: DbDecoder, tid: u32, joined_late: bool) -> Self {
        // Redis has no handshake to wait for.
        let ready = joined_late || matches!(decoder, DbDecoder::Redis(_));
        Self {
            decoder,
            request_tid: tid,
            cause: Cause::default(),
            last_call: None,
            call_culprit: None,
            last_culprit: None,
            ready,
            ciphertext_records: 0,
        }
    }
}

impl Connection {
    /// The pool a database client connection belongs to.
    pub(super) fn pool_key(&self, db: &DbConn) -> PoolKey {
        PoolKey {
            pid: self.pid,
            db_system: db.decoder.system(),
            server: self.endpoints.remote,
        }
    }

    pub(super) fn db_data<O: Observer>(
        &mut self,
        rec: &DataRecord,
        chunk: &Chunk<'_>,
        ctx: &mut Ctx<'_, O>,
    ) {
        let ips = self.addr_text();
        let Protocol::Db(db) = &mut self.protocol else {
            return;
        };
        let sock = rec.meta.sock;
        if db.decoder.encrypted() {
            // Ciphertext (the TLS handshake): its plaintext comes from the TLS
            // probes, when its process's TLS library is one they cover.
            db.ciphertext_records += 1;
            if db.ciphertext_records > MAX_CIPHERTEXT_RECORDS {
                ctx.telemetry.dropped(DropReason::Encrypted);
                // Nothing more to decode: it leaves the table's database connections.
                ctx.out.db(DbObservation::Left { sock });
                self.protocol = Protocol::Other;
            }
            return;
        }
        let from_client = rec.direction == Direction::Send;
        let mut request_started = false;
        if from_client {
            db.request_tid = rec.meta.tid;
            if !db.decoder.in_flight() {
                // A new request starts: what is this thread working for?
                db.cause = ctx.cause(rec, rec.meta.ts_ns, sock);
                db.call_culprit = db.cause.parent.and_then(|p| ctx.out.culprit(p));
                request_started = db.ready;
            }
        }
        let mut calls = std::mem::take(&mut ctx.scratch.db);
        calls.clear();
        if let Err(e) = db.decoder.feed(from_client, chunk, &mut calls) {
            log::debug!(
                "{} decode error on {:?}: {e}",
                db.decoder.system().as_str(),
                self.endpoints
            );
            ctx.telemetry.dropped(match db.decoder.system() {
                DbSystem::Postgresql => DropReason::PostgresqlMalformed,
                DbSystem::Mysql => DropReason::MysqlMalformed,
                DbSystem::Redis => DropReason::RedisMalformed,
            });
        }
        if !from_client && !db.ready && db.decoder.tx_status() != TxStatus::Unknown {
            // The server said it is ready for queries: the connection is made.
            db.ready = true;
            ctx.out.db(DbObservation::Ready {
                sock,
                ts_ns: rec.meta.ts_ns,
            });
        }
        let mut usage = DbUse {
            sock,
            ts_ns: rec.meta.ts_ns,
            request_started,
            completed: None,
            in_flight: db.decoder.in_flight(),
            in_transaction: db.decoder.tx_status().in_transaction(),
        };
        if calls.is_empty() {
            // A session that went encrypted stays: the TLS probes bring its
            // plaintext (see `Connection::begin_plaintext`), or it is given up
            // after the handshake's records.
            ctx.scratch.db = calls;
            ctx.out.db(DbObservation::Used(usage));
            return;
        }
        if !from_client {
            ctx.out.thread(ThreadEvent::CallAnswered {
                pid: rec.meta.tgid,
                tid: rec.meta.tid,
                ts_ns: rec.meta.ts_ns,
                parent: db.cause.parent,
                conn: sock,
            });
        }
        let resource = ctx.procs.get(self.pid, &self.comm);
        let link = Link {
            conn: None,
            exchange: None,
            woken_by: db.cause.parent,
            dedicated_thread: db.cause.dedicated,
            header: false,
        };
        for call in calls.drain(..) {
            let span = db_span(&DbExchange {
                call: &call,
                local: self.endpoints.local,
                remote: self.endpoints.remote,
                ips: &ips,
                resource: resource.clone(),
                tid: db.request_tid,
                keep_literals: ctx.options.keep_sql_literals,
                link: link.clone(),
                tls: self.tls,
            });
            let text = span.attr("db.query.text").map(|t| t.to_string());
            db.last_call = Some((text, span.span_id, call.end_ns));
            db.last_culprit.clone_from(&db.call_culprit);
            usage.completed = Some(span.span_id);
            ctx.telemetry.spans_built.inc();
            ctx.out.span(span);
        }
        ctx.scratch.db = calls;
        ctx.out.db(DbObservation::Used(usage));
    }
}
