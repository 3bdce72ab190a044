//! The fuzz harnesses: one function per cargo-fuzz target in `fuzz/` (each target is
//! a one-line call), kept here so that `cargo test` compiles them and replays the
//! recorded captures through them (see the tests below).
//!
//! Any input is fine; a function panics only when a decoder breaks one of its
//! promises (a kept value over its bound, an end before a start, a call left in
//! flight after `finish`, a panic of its own), which is what the fuzzer looks for.
//! Built only for tests and under `cargo fuzz` (`cfg(fuzzing)`).

use crate::Chunk;
use crate::db::{DbCall, DbSystem};
use crate::http_target::{REDACTED, bounded_path, redacted_path, url_path, url_template};
use crate::http1::{Http1Decoder, Http1Limits, Http1Message, MessageKind, StartLine};
use crate::mysql::{self, MysqlDecoder};
use crate::postgres::{self, PgDecoder, UNKNOWN_SQLSTATE};
use crate::redis::{MAX_PENDING_COMMANDS, RedisDecoder, looks_like_command};
use crate::sql::{collection, obfuscate, obfuscate_for, operation};

/// Fuzzes the HTTP/1.x decoder with any bytes, cut anywhere, with capture gaps.
///
/// Input layout: byte 0 is a header (low 6 bits: how many control bytes follow; bit 6:
/// tiny limits; bit 7: the response decoder first expects answers to HEAD and
/// CONNECT). Each control byte, used in turn and cyclically, cuts the next chunk: its
/// low 6 bits + 1 are the captured size; top bits `11` add a gap (the next control
/// byte × 4 stream bytes left uncaptured), `01` make the response decoder `finish()`
/// before the chunk. The rest of the input is the stream, fed to both a request and a
/// response decoder, the way the agent feeds them.
///
/// Target `http1`: `cargo +nightly fuzz run http1` in `fuzz/`.
pub fn http1(data: &[u8]) {
    let Some((&header, rest)) = data.split_first() else {
        return;
    };
    let (control, stream) = rest.split_at(usize::from(header & 0x3f).min(rest.len()));
    let limits = if header & 0x40 != 0 {
        Http1Limits {
            max_head_bytes: 64,
            max_headers: 4,
        }
    } else {
        Http1Limits::default()
    };
    let mut requests = Http1Decoder::new(MessageKind::Request, limits.clone());
    let mut responses = Http1Decoder::new(MessageKind::Response, limits);
    if header & 0x80 != 0 {
        responses.expect_response_to("HEAD");
        responses.expect_response_to("CONNECT");
    }

    let mut reqs = Vec::new();
    let mut resps = Vec::new();
    let mut next_control = control.iter().copied().cycle();
    let mut pos = 0usize;
    let mut ts = 1u64;
    while pos < stream.len() {
        let remaining = stream.len() - pos;
        let (size, gap) = match next_control.next() {
            None => (remaining, 0),
            Some(c) => {
                let size = (usize::from(c & 0x3f) + 1).min(remaining);
                let gap = match c >> 6 {
                    0b11 => usize::from(next_control.next().unwrap_or(0)) * 4,
                    0b01 => {
                        responses.finish(&mut resps);
                        0
                    }
                    _ => 0,
                };
                (size, gap)
            }
        };
        let chunk = Chunk {
            bytes: &stream[pos..pos + size],
            len: size + gap,
            ts_ns: ts,
        };
        let before = reqs.len();
        let _ = requests.feed(&chunk, &mut reqs);
        for req in &reqs[before..] {
            if let StartLine::Request { method, .. } = &req.start {
                responses.expect_response_to(method);
            }
        }
        let _ = responses.feed(&chunk, &mut resps);
        pos += (size + gap).min(remaining);
        ts += 1;
    }
    requests.finish(&mut reqs);
    responses.finish(&mut resps);

    for msg in reqs.iter().chain(&resps) {
        check_http1(msg);
    }
    assert!(!requests.in_message() && !responses.in_message());
}

fn check_http1(msg: &Http1Message) {
    assert!(msg.start_ns <= msg.end_ns, "end before start: {msg:?}");
    let h = &msg.headers;
    for value in [
        &h.host,
        &h.traceparent,
        &h.tracestate,
        &h.user_agent,
        &h.content_type,
    ] {
        assert!(
            value.as_ref().is_none_or(|v| v.len() <= 512),
            "kept value too long"
        );
    }
}

/// Fuzzes the PostgreSQL decoder with any interleaving of client and server bytes, cut
/// anywhere, with capture gaps.
///
/// Input layout: a sequence of chunks, each a control byte followed by its bytes. The
/// control byte's low 6 bits + 1 are the captured size (cut short at the end of the
/// input); bit 7 picks the side (0 client, 1 server); bit 6 means one more byte follows
/// the control byte: the gap after the captured bytes, × 4 stream bytes left
/// uncaptured, or, when it is 0xff, `finish()` (connection closed) before the chunk.
/// The gap's stream bytes are taken from the input too, as the kernel would have moved
/// them, so the decoder must skip exactly that many.
///
/// Target `postgres`: `cargo +nightly fuzz run postgres` in `fuzz/`.
pub fn postgres(data: &[u8]) {
    mid_stream_detection(data);
    let mut decoder = PgDecoder::new();
    let mut calls = Vec::new();
    let mut rest = data;
    let mut ts = 1u64;
    while let Some((&control, tail)) = rest.split_first() {
        rest = tail;
        let mut gap = 0usize;
        if control & 0x40 != 0 {
            let Some((&g, tail)) = rest.split_first() else {
                break;
            };
            rest = tail;
            if g == 0xff {
                let in_flight = decoder.in_flight();
                let forgotten = decoder.finish();
                assert!(forgotten == 0 || in_flight);
                assert!(!decoder.in_flight());
            } else {
                gap = usize::from(g) * 4;
            }
        }
        let size = (usize::from(control & 0x3f) + 1).min(rest.len());
        let total = (size + gap).min(rest.len());
        let chunk = Chunk {
            bytes: &rest[..size],
            len: total,
            ts_ns: ts,
        };
        let _ = if control & 0x80 == 0 {
            decoder.client(&chunk, &mut calls)
        } else {
            decoder.server(&chunk, &mut calls)
        };
        rest = &rest[total..];
        ts += 1;
    }
    for call in &calls {
        check_postgres(call);
    }
    let in_flight = decoder.in_flight();
    let forgotten = decoder.finish();
    assert!(forgotten == 0 || in_flight);
    assert!(!decoder.in_flight());
}

fn check_postgres(call: &DbCall) {
    assert!(call.start_ns <= call.end_ns, "end before start: {call:?}");
    assert!(
        call.query_text
            .as_ref()
            .is_none_or(|t| t.len() <= postgres::MAX_QUERY_TEXT_BYTES),
        "kept text too long"
    );
    if let Some(op) = &call.operation {
        assert!(op.len() <= 32 && !op.bytes().any(|b| b.is_ascii_lowercase()));
    }
    if let Some(code) = &call.error_code {
        assert!(
            code == UNKNOWN_SQLSTATE
                || (code.len() == 5
                    && code
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())),
            "not a SQLSTATE"
        );
    }
}

/// Mid-stream detection of whatever bytes: whole messages (or packets) that end at
/// the write's end still pass when the capture was cut there (the write longer).
fn mid_stream_detection(data: &[u8]) {
    let pg = postgres::looks_like_session_messages(data, data.len());
    let my = mysql::looks_like_session_commands(data, data.len());
    if pg {
        assert!(postgres::looks_like_session_messages(data, data.len() + 7));
    }
    if my {
        assert!(mysql::looks_like_session_commands(data, data.len() + 7));
    }
}

/// A MariaDB 10.11 server greeting (testdata/mysql/cli_select.cap).
const GREETING: &[u8] = b"d\x00\x00\x00\x0a5.5.5-10.11.19-MariaDB-0+deb12u1\x00\x06\x00\x00\x00Z~0ob}l'\x00\xfe\xff\x08\x02\x00\xff\x81\x15\x00\x00\x00\x00\x00\x00\x1d\x00\x00\x00xIFa6*no_n/;\x00mysql_native_password\x00";

/// Fuzzes the MySQL/MariaDB decoder with any bytes, cut anywhere, with capture gaps,
/// the two directions interleaved.
///
/// Input layout: byte 0 is a header (low 6 bits: how many control bytes follow; bit 6:
/// a recorded MariaDB greeting is fed to the server side first, so that the handshake
/// path is taken; bit 7: the first chunk is the client's, else the server's). Each
/// control byte, used in turn and cyclically, cuts the next chunk: its low 5 bits + 1
/// are the captured size; bit 5 makes the other direction send it; top bits `11` add a
/// gap (the next control byte × 64 stream bytes left uncaptured), `10` make the decoder
/// `finish()` before the chunk. The rest of the input is the stream, handed out to the
/// two directions in turn, the way the agent feeds a connection.
///
/// Target `mysql`: `cargo +nightly fuzz run mysql` in `fuzz/`.
pub fn mysql(data: &[u8]) {
    let Some((&header, rest)) = data.split_first() else {
        return;
    };
    let (control, stream) = rest.split_at(usize::from(header & 0x3f).min(rest.len()));
    mid_stream_detection(stream);
    let mut dec = MysqlDecoder::new();
    let mut calls = Vec::new();
    if header & 0x40 != 0 {
        let _ = dec.server(&Chunk::whole(GREETING, 0), &mut calls);
    }
    let mut client = header & 0x80 != 0;
    let mut next_control = control.iter().copied().cycle();
    let mut pos = 0usize;
    let mut ts = 1u64;
    while pos < stream.len() {
        let remaining = stream.len() - pos;
        let (size, gap) = match next_control.next() {
            None => (remaining, 0),
            Some(c) => {
                if c & 0x20 != 0 {
                    client = !client;
                }
                let size = (usize::from(c & 0x1f) + 1).min(remaining);
                let gap = match c >> 6 {
                    0b11 => usize::from(next_control.next().unwrap_or(0)) * 64,
                    0b10 => {
                        dec.finish();
                        assert!(!dec.in_flight());
                        0
                    }
                    _ => 0,
                };
                (size, gap)
            }
        };
        let chunk = Chunk {
            bytes: &stream[pos..pos + size],
            len: size + gap,
            ts_ns: ts,
        };
        let _ = if client {
            dec.client(&chunk, &mut calls)
        } else {
            dec.server(&chunk, &mut calls)
        };
        pos += (size + gap).min(remaining);
        ts += 1;
        assert!(
            dec.namespace()
                .is_none_or(|n| n.len() <= mysql::MAX_NAME_BYTES)
        );
        assert!(dec.user().is_none_or(|u| u.len() <= mysql::MAX_NAME_BYTES));
    }
    let _ = format!("{dec:?}");
    dec.finish();
    assert!(!dec.in_flight());
    for call in &calls {
        check_mysql(call);
    }
}

fn check_mysql(call: &DbCall) {
    assert!(call.start_ns <= call.end_ns, "end before start: {call:?}");
    assert!(
        call.query_text
            .as_ref()
            .is_none_or(|t| t.len() <= mysql::MAX_QUERY_TEXT_BYTES),
        "kept text too long"
    );
    assert!(
        call.operation
            .as_ref()
            .is_none_or(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')),
        "operation is not an upper-case keyword: {call:?}"
    );
    assert!(
        call.namespace
            .as_ref()
            .is_none_or(|n| n.len() <= mysql::MAX_NAME_BYTES),
        "namespace too long"
    );
}

/// Fuzzes the Redis decoder with any bytes in both directions, cut anywhere, with
/// capture gaps.
///
/// Input layout: byte 0 is a header (low 6 bits: how many control bytes follow), byte 1
/// says where the rest splits into the client stream and the server stream (at
/// byte 1 / 256 of it). Each control byte, used in turn and cyclically, cuts the next
/// chunk: its low 5 bits + 1 are the captured size, bit 5 picks the direction (0:
/// client, 1: server); top bits `11` add a gap (the next control byte × 4 stream bytes
/// left uncaptured), `01` make the decoder `finish()` before the chunk. Chunks are fed
/// in order with rising timestamps.
///
/// Target `redis`: `cargo +nightly fuzz run redis` in `fuzz/`.
pub fn redis(data: &[u8]) {
    let Some((&header, rest)) = data.split_first() else {
        return;
    };
    let Some((&split, rest)) = rest.split_first() else {
        return;
    };
    let (control, streams) = rest.split_at(usize::from(header & 0x3f).min(rest.len()));
    let (client, server) = streams.split_at(streams.len() * usize::from(split) / 256);
    let _ = looks_like_command(client);

    let mut decoder = RedisDecoder::new();
    let mut calls = Vec::new();
    let mut next_control = control.iter().copied().cycle();
    let mut pos = [0usize; 2];
    let mut ts = 1u64;
    while pos[0] < client.len() || pos[1] < server.len() {
        let c = next_control.next();
        let wanted = match c {
            Some(c) => usize::from(c >> 5 & 1),
            None => usize::from(pos[0] >= client.len()),
        };
        // Fall back to the other direction when this one is used up.
        let side = if pos[wanted] < [client, server][wanted].len() {
            wanted
        } else {
            1 - wanted
        };
        let stream = [client, server][side];
        let remaining = stream.len() - pos[side];
        let (size, gap) = match c {
            None => (remaining, 0),
            Some(c) => {
                let size = (usize::from(c & 0x1f) + 1).min(remaining);
                let gap = match c >> 6 {
                    0b11 => usize::from(next_control.next().unwrap_or(0)) * 4,
                    0b01 => {
                        decoder.finish();
                        0
                    }
                    _ => 0,
                };
                (size, gap)
            }
        };
        let chunk = Chunk {
            bytes: &stream[pos[side]..pos[side] + size],
            len: size + gap,
            ts_ns: ts,
        };
        let _ = if side == 0 {
            decoder.client(&chunk, &mut calls)
        } else {
            decoder.server(&chunk, &mut calls)
        };
        assert!(decoder.pending_commands() <= MAX_PENDING_COMMANDS);
        pos[side] += (size + gap).min(remaining);
        ts += 1;
    }
    let _ = decoder.tx_status();
    let _ = decoder.namespace();
    decoder.finish();
    assert!(!decoder.in_flight());

    for call in &calls {
        check_redis(call);
    }
}

fn check_redis(call: &DbCall) {
    assert_eq!(call.system, DbSystem::Redis);
    assert!(call.start_ns <= call.end_ns, "end before start: {call:?}");
    // The query text is the operation and placeholders, never argument bytes.
    if let Some(text) = &call.query_text {
        let op = call
            .operation
            .as_deref()
            .expect("query text without operation");
        let rest = text
            .strip_prefix(op)
            .expect("query text starts with the operation");
        assert!(
            rest.split(' ').skip(1).all(|p| p == "?" || p == "..."),
            "{text:?}"
        );
    }
    if let Some(code) = &call.error_code {
        assert!(!code.is_empty() && code.len() <= 32);
        assert!(
            code.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        );
    }
}

/// Fuzzes the SQL helpers (obfuscation, operation, collection) with any text.
///
/// Input: the bytes as (lossy) UTF-8; every prefix cut at a character boundary is
/// tried too, as captures cut statements anywhere.
///
/// Target `sql`: `cargo +nightly fuzz run sql` in `fuzz/`.
pub fn sql(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_sql(&text);
    if let Some((cut, _)) = text.char_indices().nth(text.chars().count() / 2) {
        check_sql(&text[..cut]);
    }
}

fn check_sql(sql: &str) {
    for out in [obfuscate(sql), obfuscate_for(sql, DbSystem::Mysql)] {
        assert!(out.len() <= sql.len(), "output grew: {sql:?} -> {out:?}");
        // (It may end in a space: an unterminated quoted identifier is kept as is.)
        assert!(!out.starts_with(' '), "{out:?}");
    }
    if let Some(op) = operation(sql) {
        assert!(!op.is_empty() && op.len() <= 32);
        assert!(
            op.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
            "{op:?}"
        );
    }
    if let Some(name) = collection(sql) {
        assert!(!name.is_empty() && name.len() <= 256);
    }
}

/// Fuzzes what a request target becomes (`url.path`, `url.template`, a leak
/// culprit's path): any text in (the input, lossily UTF-8), never a panic; the
/// path has no query; the template has at most 8 segments (and the `{…}` marker),
/// no segment over 40 bytes and no path parameter; redaction is idempotent, keeps
/// the segment count, and leaves no segment it would redact again; the culprit's
/// path is at most 256 bytes.
///
/// Target `http_target`: `cargo +nightly fuzz run http_target` in `fuzz/`.
pub fn http_target(data: &[u8]) {
    let target = String::from_utf8_lossy(data);
    let path = url_path(&target);
    assert!(!path.contains(['?', '#']), "{path:?}");
    let template = url_template(path);
    let segments: Vec<&str> = template.split('/').skip(1).collect();
    assert!(segments.len() <= 9, "{template:?}");
    for seg in &segments {
        assert!(seg.len() <= 40 && !seg.contains(';'), "{template:?}");
    }
    let redacted = redacted_path(path);
    assert_eq!(redacted.split('/').count(), path.split('/').count());
    assert!(!redacted.contains(';'), "{redacted:?}");
    assert_eq!(redacted_path(&redacted), redacted, "idempotent");
    assert_eq!(
        url_template(&redacted),
        template,
        "the template is the raw path's"
    );
    for seg in redacted.split('/') {
        assert!(seg == REDACTED || redacted_path(seg) == seg);
    }
    assert!(bounded_path(&target).len() <= 256);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{self, Capture, PROTOCOLS};

    /// A harness and its target's name.
    type Harness = (&'static str, fn(&[u8]));

    const HARNESSES: [Harness; 6] = [
        ("http1", http1),
        ("postgres", postgres),
        ("mysql", mysql),
        ("redis", redis),
        ("sql", sql),
        ("http_target", http_target),
    ];

    /// A recorded session in the `postgres` harness's layout: each record as chunks
    /// of at most 64 bytes, in order, each behind its control byte (size - 1, bit 7
    /// for the server).
    fn postgres_layout(cap: &Capture<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        for r in &cap.records {
            for piece in r.bytes.chunks(64) {
                let side = if r.from_client { 0 } else { 0x80 };
                out.push(side | (piece.len() as u8 - 1));
                out.extend_from_slice(piece);
            }
        }
        out
    }

    /// Inputs made of one capture file: the file itself; each direction's stream
    /// behind each combination of the header flags the harnesses read from byte 0
    /// (and no control bytes, so the rest is one stream); both streams together; and
    /// the session in the `postgres` layout.
    fn inputs(file: &[u8]) -> Vec<(String, Vec<u8>)> {
        let cap = testdata::parse(file).expect("capture file");
        let (client, server) = (cap.stream(true), cap.stream(false));
        let mut out = vec![("the file".to_owned(), file.to_vec())];
        for (side, stream) in [("client", &client), ("server", &server)] {
            for header in [0x00u8, 0x40, 0x80, 0xc0] {
                let input = [&[header][..], stream].concat();
                out.push((format!("{side} stream behind {header:#04x}"), input));
            }
        }
        out.push((
            "both streams".to_owned(),
            [&[0x00, 0x80][..], &client, &server].concat(),
        ));
        out.push(("the postgres layout".to_owned(), postgres_layout(&cap)));
        out
    }

    fn run_all(what: &str, input: &[u8]) {
        for (target, harness) in HARNESSES {
            let result = std::panic::catch_unwind(|| harness(input));
            assert!(result.is_ok(), "fuzz_logic::{target} panicked on {what}");
        }
    }

    #[test]
    fn every_capture_replays_through_every_harness() {
        let mut files = 0;
        for protocol in PROTOCOLS {
            for (name, file) in testdata::recorded(protocol) {
                files += 1;
                for (what, input) in inputs(&file) {
                    let what = format!("{protocol}/{name}: {what}");
                    run_all(&what, &input);
                    // Truncated: cut in the middle, and short of its last byte.
                    run_all(&format!("{what}, first half"), &input[..input.len() / 2]);
                    let short = input.len().saturating_sub(1);
                    run_all(&format!("{what}, but its last byte"), &input[..short]);
                }
            }
        }
        assert!(files >= 4, "{files} captures");
    }

    #[test]
    fn edge_inputs_go_through_every_harness() {
        run_all("the empty input", b"");
        for b in 0..=255u8 {
            run_all(&format!("the byte {b:#04x}"), &[b]);
            run_all(&format!("64 bytes {b:#04x}"), &[b; 64]);
        }
        // Control bytes asking for a gap larger than the rest of the input.
        run_all(
            "gaps past the end",
            &[0x02, 0xff, 0xff, b'G', b'E', b'T', b' '],
        );
        run_all("invalid UTF-8", b"SELECT '\xff\xfe' FROM t WHERE a = \xc3");
        run_all(
            "a target full of tokens",
            b"http://h/a;jsessionid=X1/eyJa.b.c/Kq3ZpW9xLm2N7vB4;x=1/1/2/3/4/5/6/7/8/9?q#f",
        );
    }
}
