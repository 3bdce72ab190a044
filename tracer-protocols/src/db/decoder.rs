//! [`DbDecoder`]: the three database decoders behind one interface, picked from a
//! connection's first bytes or its server's port.

use super::{DbCall, DbSystem, TxStatus};
use crate::Chunk;
use crate::http1;
use crate::mysql::{self, MysqlDecoder, MysqlError};
use crate::postgres::{self, PgDecoder, PgError};
use crate::redis::{self, RedisDecoder, RedisError};

/// The database decoders, each seeing both directions of one connection.
#[derive(Debug)]
pub enum DbDecoder {
    Postgres(PgDecoder),
    Mysql(MysqlDecoder),
    Redis(RedisDecoder),
}

/// What made a chunk undecodable: the error of the decoder that was fed. Its text is
/// that decoder's error text; like those, it never holds captured bytes.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DbDecodeError {
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error(transparent)]
    Mysql(#[from] MysqlError),
    #[error(transparent)]
    Redis(#[from] RedisError),
}

impl DbDecodeError {
    /// The database system whose decoder failed.
    pub fn system(&self) -> DbSystem {
        match self {
            DbDecodeError::Postgres(_) => DbSystem::Postgresql,
            DbDecodeError::Mysql(_) => DbSystem::Mysql,
            DbDecodeError::Redis(_) => DbSystem::Redis,
        }
    }
}

impl DbDecoder {
    /// The decoder for a connection whose first captured payload is `first`, which
    /// the local end sent (`sent`) or received. `None` when it starts none of the
    /// database protocols (the caller then tries HTTP/1.x), or is empty.
    ///
    /// - PostgreSQL: the local end sent a startup packet (StartupMessage, SSLRequest,
    ///   GSSENCRequest or CancelRequest).
    /// - MySQL/MariaDB: the local end received a server greeting (the server speaks
    ///   first).
    /// - Redis: the local end sent a command that does not also look like an HTTP/1.x
    ///   request (an inline `GET key` does: HTTP/1.x is tried next).
    ///
    /// In each case the local end is the database's client.
    pub fn detect(first: &[u8], sent: bool) -> Option<Self> {
        if sent && postgres::looks_like_startup(first) {
            Some(DbDecoder::Postgres(PgDecoder::new()))
        } else if !sent && mysql::looks_like_server_greeting(first) {
            Some(DbDecoder::Mysql(MysqlDecoder::new()))
        } else if sent && !http1::looks_like_request(first) && redis::looks_like_command(first) {
            Some(DbDecoder::Redis(RedisDecoder::new()))
        } else {
            None
        }
    }

    /// The decoder for a connection met mid-stream (opened before the agent started),
    /// whose local end sent `first`, the captured start of `total_len` bytes in a
    /// row: whole PostgreSQL frontend messages of a session, or whole MySQL command
    /// packets ([`postgres::looks_like_session_messages`],
    /// [`mysql::looks_like_session_commands`]); the local end is then the client.
    /// `None` for what was received, and for anything else (Redis needs no
    /// handshake: [`DbDecoder::detect`] knows it anywhere).
    pub fn detect_mid_stream(first: &[u8], total_len: usize, sent: bool) -> Option<Self> {
        if !sent {
            None
        } else if postgres::looks_like_session_messages(first, total_len) {
            Some(Self::mid_stream(DbSystem::Postgresql))
        } else if mysql::looks_like_session_commands(first, total_len) {
            Some(Self::mid_stream(DbSystem::Mysql))
        } else {
            None
        }
    }

    /// A decoder for a connection met mid-stream, by its server's well-known port.
    pub fn guess_by_port(port: u16) -> Option<Self> {
        match port {
            5432 => Some(Self::mid_stream(DbSystem::Postgresql)),
            3306 => Some(Self::mid_stream(DbSystem::Mysql)),
            6379 => Some(Self::mid_stream(DbSystem::Redis)),
            _ => None,
        }
    }

    /// A decoder for `system` joining a connection wherever its next bytes start
    /// (its handshake long over).
    pub fn mid_stream(system: DbSystem) -> Self {
        match system {
            DbSystem::Postgresql => DbDecoder::Postgres(PgDecoder::mid_stream()),
            DbSystem::Mysql => DbDecoder::Mysql(MysqlDecoder::new()),
            DbSystem::Redis => DbDecoder::Redis(RedisDecoder::new()),
        }
    }

    /// Which database the decoder speaks.
    pub fn system(&self) -> DbSystem {
        match self {
            DbDecoder::Postgres(_) => DbSystem::Postgresql,
            DbDecoder::Mysql(_) => DbSystem::Mysql,
            DbDecoder::Redis(_) => DbSystem::Redis,
        }
    }

    /// Feeds bytes the client sent (`from_client`) or received.
    pub fn feed(
        &mut self,
        from_client: bool,
        chunk: &Chunk<'_>,
        out: &mut Vec<DbCall>,
    ) -> Result<(), DbDecodeError> {
        match (self, from_client) {
            (DbDecoder::Postgres(d), true) => Ok(d.client(chunk, out)?),
            (DbDecoder::Postgres(d), false) => Ok(d.server(chunk, out)?),
            (DbDecoder::Mysql(d), true) => Ok(d.client(chunk, out)?),
            (DbDecoder::Mysql(d), false) => Ok(d.server(chunk, out)?),
            (DbDecoder::Redis(d), true) => Ok(d.client(chunk, out)?),
            (DbDecoder::Redis(d), false) => Ok(d.server(chunk, out)?),
        }
    }

    /// The transaction status as the server last reported it.
    pub fn tx_status(&self) -> TxStatus {
        match self {
            DbDecoder::Postgres(d) => d.tx_status(),
            DbDecoder::Mysql(d) => d.tx_status(),
            DbDecoder::Redis(d) => d.tx_status(),
        }
    }

    /// The database (PostgreSQL, MySQL) or the Redis DB index, when known.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            DbDecoder::Postgres(d) => d.namespace(),
            DbDecoder::Mysql(d) => d.namespace(),
            DbDecoder::Redis(d) => d.namespace(),
        }
    }

    /// A request was sent and its response is not complete yet.
    pub fn in_flight(&self) -> bool {
        match self {
            DbDecoder::Postgres(d) => d.in_flight(),
            DbDecoder::Mysql(d) => d.in_flight(),
            DbDecoder::Redis(d) => d.in_flight(),
        }
    }

    /// Bytes the decoder holds between chunks.
    pub fn held_bytes(&self) -> usize {
        match self {
            DbDecoder::Postgres(d) => d.held_bytes(),
            DbDecoder::Mysql(d) => d.held_bytes(),
            DbDecoder::Redis(d) => d.held_bytes(),
        }
    }

    /// The connection is encrypted (TLS was asked for or started): later chunks are
    /// not decoded. Never for Redis (TLS there starts before any RESP).
    pub fn encrypted(&self) -> bool {
        match self {
            DbDecoder::Postgres(d) => d.is_encrypted(),
            DbDecoder::Mysql(d) => d.is_encrypted(),
            DbDecoder::Redis(_) => false,
        }
    }

    /// The plaintext of this encrypted connection starts (from the TLS probes):
    /// decoding resumes where TLS began (see the decoders' `resume_in_plaintext`).
    pub fn resume_in_plaintext(&mut self) {
        match self {
            DbDecoder::Postgres(d) => d.resume_in_plaintext(),
            DbDecoder::Mysql(d) => d.resume_in_plaintext(),
            DbDecoder::Redis(_) => {}
        }
    }

    /// The connection closed: how many requests never got an answer.
    pub fn finish(&mut self) -> usize {
        match self {
            DbDecoder::Postgres(d) => d.finish(),
            DbDecoder::Mysql(d) => d.finish(),
            DbDecoder::Redis(d) => d.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{self, PROTOCOLS};

    /// The system each testdata folder's captures are detected as, from the client's
    /// side of the connection.
    fn expected(protocol: &str) -> Option<DbSystem> {
        match protocol {
            "postgres" => Some(DbSystem::Postgresql),
            "mysql" => Some(DbSystem::Mysql),
            "redis" => Some(DbSystem::Redis),
            _ => None,
        }
    }

    #[test]
    fn detect_picks_the_decoder_from_the_clients_first_bytes() {
        for protocol in PROTOCOLS {
            for (name, file) in testdata::recorded(protocol) {
                let cap = testdata::parse(&file).unwrap();
                let first = cap.records[0];
                // The client sent the first record, or received it (a MySQL greeting).
                let client = DbDecoder::detect(first.bytes, first.from_client);
                assert_eq!(
                    client.map(|d| d.system()),
                    expected(protocol),
                    "{protocol}/{name}"
                );
                // The server's end of the same connection is never taken for a client.
                let server = DbDecoder::detect(first.bytes, !first.from_client);
                assert!(server.is_none(), "{protocol}/{name}");
            }
        }
    }

    #[test]
    fn detect_follows_the_direction_and_leaves_http_alone() {
        let ping = b"*1\r\n$4\r\nPING\r\n";
        let detect = |bytes: &[u8], sent| DbDecoder::detect(bytes, sent).map(|d| d.system());
        assert_eq!(detect(ping, true), Some(DbSystem::Redis));
        assert_eq!(detect(b"SET key value\r\n", true), Some(DbSystem::Redis));
        // Also an HTTP/1.x request line: HTTP/1.x is tried next.
        assert_eq!(detect(b"GET key\r\n", true), None);
        assert_eq!(detect(ping, false), None);
        assert_eq!(detect(b"GET /key HTTP/1.1\r\nHost: x\r\n\r\n", true), None);
        assert_eq!(detect(b"HTTP/1.1 200 OK\r\n\r\n", false), None);
        // An SSLRequest is a startup packet too.
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(detect(&ssl, true), Some(DbSystem::Postgresql));
        assert_eq!(detect(&ssl, false), None);
        assert_eq!(detect(b"", true), None);
        assert_eq!(detect(b"", false), None);
        for cut in 0..ssl.len() {
            assert!(detect(&ssl[..cut], true).is_none(), "{cut}");
        }
    }

    /// Whether a recorded client write is a whole request of a session (not its
    /// handshake): what a connection met mid-stream is recognised by.
    fn mid_stream(bytes: &[u8]) -> Option<DbSystem> {
        DbDecoder::detect_mid_stream(bytes, bytes.len(), true).map(|d| d.system())
    }

    #[test]
    fn detect_mid_stream_knows_a_sessions_requests_in_every_recording() {
        for protocol in PROTOCOLS {
            for (name, file) in testdata::recorded(protocol) {
                let cap = testdata::parse(&file).unwrap();
                let encrypted = name.contains("tls") || name.contains("compressed");
                let mut detected = 0;
                for (i, r) in cap.records.iter().enumerate() {
                    let what = format!("{protocol}/{name} record {i}");
                    // What was received is never judged.
                    assert!(
                        DbDecoder::detect_mid_stream(r.bytes, r.bytes.len(), false).is_none(),
                        "{what}"
                    );
                    let got = mid_stream(r.bytes);
                    match protocol {
                        // Text protocols, either end: never a database.
                        "http1" | "redis" => assert_eq!(got, None, "{what}"),
                        // A server's writes are never a client's session requests.
                        _ if !r.from_client => assert_eq!(got, None, "{what}"),
                        "postgres" => {
                            // Every simple query and extended-protocol batch the
                            // clients sent after their startup is recognised.
                            let request = i > 0 && b"QPBEDCSHX".contains(&r.bytes[0]);
                            if request {
                                assert_eq!(got, Some(DbSystem::Postgresql), "{what}");
                                detected += 1;
                            } else {
                                assert_ne!(got, Some(DbSystem::Mysql), "{what}");
                            }
                        }
                        _ => {
                            // A command packet (sequence id 0) after the handshake.
                            let command = !encrypted && r.bytes.get(3) == Some(&0);
                            if command {
                                assert_eq!(got, Some(DbSystem::Mysql), "{what}");
                                detected += 1;
                            } else {
                                assert_ne!(got, Some(DbSystem::Postgresql), "{what}");
                            }
                        }
                    }
                }
                if protocol == "postgres" || (protocol == "mysql" && !encrypted) {
                    assert!(detected > 0, "{protocol}/{name}: no request recognised");
                }
            }
        }
    }

    #[test]
    fn detect_mid_stream_wants_whole_messages_and_tells_a_cut_capture_from_a_lie() {
        let query = |sql: &str| {
            let mut m = vec![b'Q'];
            m.extend_from_slice(&(sql.len() as u32 + 5).to_be_bytes());
            m.extend_from_slice(sql.as_bytes());
            m.push(0);
            m
        };
        let q = query("SELECT 1");
        let detect = |bytes: &[u8], total: usize| {
            DbDecoder::detect_mid_stream(bytes, total, true).map(|d| d.system())
        };
        assert_eq!(detect(&q, q.len()), Some(DbSystem::Postgresql));
        // Two messages in one write (a query, then Sync).
        let mut two = q.clone();
        two.extend_from_slice(b"S\0\0\0\x04");
        assert_eq!(detect(&two, two.len()), Some(DbSystem::Postgresql));
        // Captured in part: consistent as far as it goes.
        assert_eq!(detect(&q[..7], q.len()), Some(DbSystem::Postgresql));
        assert_eq!(
            detect(&two[..q.len() + 2], two.len()),
            Some(DbSystem::Postgresql)
        );
        // The write ends before the message does.
        assert_eq!(detect(&q[..q.len() - 1], q.len() - 1), None);
        // The length's header cut before anything whole.
        assert_eq!(detect(&q[..3], q.len()), None);
        // Not NUL-terminated.
        let mut bad = q.clone();
        *bad.last_mut().unwrap() = b'x';
        assert_eq!(detect(&bad, bad.len()), None);
        // A server's ErrorResponse is an `E`, but not an Execute.
        let mut error = vec![b'E'];
        let body = b"SERROR\0C42601\0Msyntax error\0\0";
        error.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        error.extend_from_slice(body);
        assert_eq!(detect(&error, error.len()), None);
        // MySQL: COM_QUERY, COM_PING; a handshake response's sequence id is 1.
        let mut com_query = vec![9, 0, 0, 0, 0x03];
        com_query.extend_from_slice(b"SELECT 1");
        assert_eq!(detect(&com_query, com_query.len()), Some(DbSystem::Mysql));
        let ping = [1, 0, 0, 0, 0x0e];
        assert_eq!(detect(&ping, ping.len()), Some(DbSystem::Mysql));
        assert_eq!(detect(&[1, 0, 0, 1, 0x0e], 5), None);
        assert_eq!(
            detect(&[2, 0, 0, 0, 0x0e, 0], 6),
            None,
            "COM_PING has no argument"
        );
        assert_eq!(detect(&com_query[..8], 8), None);
        // Text and other binary protocols.
        for text in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            b"PING\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc],
            &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
            b"",
        ] {
            assert_eq!(detect(text, text.len()), None, "{text:?}");
        }
    }

    #[test]
    fn guess_by_port_knows_the_well_known_ports() {
        let guess = |port| DbDecoder::guess_by_port(port).map(|d| d.system());
        assert_eq!(guess(5432), Some(DbSystem::Postgresql));
        assert_eq!(guess(3306), Some(DbSystem::Mysql));
        assert_eq!(guess(6379), Some(DbSystem::Redis));
        assert_eq!(guess(80), None);
        assert_eq!(guess(0), None);
    }

    /// The decoder `detect` picks for a connection's start, made directly.
    fn fresh(protocol: &str) -> DbDecoder {
        match protocol {
            "postgres" => DbDecoder::Postgres(PgDecoder::new()),
            "mysql" => DbDecoder::Mysql(MysqlDecoder::new()),
            _ => DbDecoder::Redis(RedisDecoder::new()),
        }
    }

    /// Feeds a decoder directly, the way the agent fed it before the dispatch.
    fn feed_directly(
        d: &mut DbDecoder,
        from_client: bool,
        chunk: &Chunk<'_>,
        out: &mut Vec<DbCall>,
    ) -> Result<(), String> {
        match (d, from_client) {
            (DbDecoder::Postgres(d), true) => d.client(chunk, out).map_err(|e| e.to_string()),
            (DbDecoder::Postgres(d), false) => d.server(chunk, out).map_err(|e| e.to_string()),
            (DbDecoder::Mysql(d), true) => d.client(chunk, out).map_err(|e| e.to_string()),
            (DbDecoder::Mysql(d), false) => d.server(chunk, out).map_err(|e| e.to_string()),
            (DbDecoder::Redis(d), true) => d.client(chunk, out).map_err(|e| e.to_string()),
            (DbDecoder::Redis(d), false) => d.server(chunk, out).map_err(|e| e.to_string()),
        }
    }

    #[test]
    fn feeding_through_the_dispatch_is_feeding_the_decoder() {
        for protocol in ["postgres", "mysql", "redis"] {
            for (name, file) in testdata::recorded(protocol) {
                let cap = testdata::parse(&file).unwrap();
                let first = cap.records[0];
                let mut dispatch = DbDecoder::detect(first.bytes, first.from_client).unwrap();
                let mut direct = fresh(protocol);
                let (mut got, mut want) = (Vec::new(), Vec::new());
                for r in &cap.records {
                    // Whole records, then the same cut into pieces with a gap, so that
                    // errors are compared too.
                    let mut chunks = vec![r.chunk()];
                    if r.bytes.len() > 8 {
                        chunks = vec![
                            Chunk {
                                bytes: &r.bytes[..3],
                                len: r.bytes.len() - 2,
                                ts_ns: r.ts_ns,
                            },
                            Chunk::whole(&r.bytes[r.bytes.len() - 2..], r.ts_ns),
                        ];
                    }
                    for chunk in &chunks {
                        let a = dispatch.feed(r.from_client, chunk, &mut got);
                        let b = feed_directly(&mut direct, r.from_client, chunk, &mut want);
                        if let Err(e) = &a {
                            assert_eq!(e.system(), dispatch.system(), "{protocol}/{name}");
                        }
                        assert_eq!(a.map_err(|e| e.to_string()), b, "{protocol}/{name}");
                        assert_eq!(dispatch.tx_status(), direct.tx_status());
                        assert_eq!(dispatch.namespace(), direct.namespace());
                        assert_eq!(dispatch.in_flight(), direct.in_flight());
                        assert_eq!(dispatch.encrypted(), direct.encrypted());
                    }
                }
                assert_eq!(got, want, "{protocol}/{name}");
                assert_eq!(dispatch.finish(), direct.finish(), "{protocol}/{name}");
            }
        }
    }

    #[test]
    fn whole_captures_decode_through_the_dispatch() {
        for protocol in ["postgres", "mysql", "redis"] {
            let mut calls = 0;
            for (name, file) in testdata::recorded(protocol) {
                let cap = testdata::parse(&file).unwrap();
                let first = cap.records[0];
                let mut d = DbDecoder::detect(first.bytes, first.from_client).unwrap();
                let mut out = Vec::new();
                for r in &cap.records {
                    d.feed(r.from_client, &r.chunk(), &mut out)
                        .unwrap_or_else(|e| panic!("{protocol}/{name}: {e}"));
                }
                assert!(out.iter().all(|c| c.system == d.system()));
                calls += out.len();
            }
            assert!(calls > 0, "{protocol}");
        }
    }

    #[test]
    fn errors_name_their_system_and_read_as_the_decoders_own() {
        // (decoder, the first records of a capture fed first, from the client?, garbage)
        type Case<'a> = (&'a str, Option<(&'a str, usize)>, bool, &'a [u8]);
        let cases: [Case<'_>; 4] = [
            ("postgres", None, true, b"\0\0\0\x01 not a startup"),
            ("postgres", None, false, b"\x01\x02\x03\x04\x05"),
            // After the handshake, a command byte no server knows.
            (
                "mysql",
                Some(("cli_select.cap", 3)),
                true,
                b"\x05\0\0\0\x99junk",
            ),
            ("redis", None, false, b"?what\r\n"),
        ];
        for (protocol, before, from_client, bytes) in cases {
            let (mut d, mut direct) = (fresh(protocol), fresh(protocol));
            if let Some((capture, n)) = before {
                let files = testdata::recorded(protocol);
                let (_, file) = files.iter().find(|(name, _)| name == capture).unwrap();
                for r in testdata::parse(file).unwrap().records.iter().take(n) {
                    d.feed(r.from_client, &r.chunk(), &mut Vec::new()).unwrap();
                    feed_directly(&mut direct, r.from_client, &r.chunk(), &mut Vec::new()).unwrap();
                }
            }
            let chunk = Chunk::whole(bytes, 1);
            let err = d
                .feed(from_client, &chunk, &mut Vec::new())
                .err()
                .unwrap_or_else(|| panic!("{bytes:?} is no error"));
            let want = feed_directly(&mut direct, from_client, &chunk, &mut Vec::new());
            assert_eq!(Err(err.to_string()), want);
            assert_eq!(err.system(), d.system());
            let variant = match &err {
                DbDecodeError::Postgres(_) => DbSystem::Postgresql,
                DbDecodeError::Mysql(_) => DbSystem::Mysql,
                DbDecodeError::Redis(_) => DbSystem::Redis,
            };
            assert_eq!(variant, d.system(), "{err:?}");
        }
    }
}
