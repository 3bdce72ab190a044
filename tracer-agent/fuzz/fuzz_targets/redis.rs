//! Fuzzes the Redis decoder with any bytes in both directions, cut anywhere, with
//! capture gaps.
//!
//! Input layout: byte 0 is a header (low 6 bits: how many control bytes follow), byte 1
//! says where the rest splits into the client stream and the server stream (at
//! byte 1 / 256 of it). Each control byte, used in turn and cyclically, cuts the next
//! chunk: its low 5 bits + 1 are the captured size, bit 5 picks the direction (0:
//! client, 1: server); top bits `11` add a gap (the next control byte × 4 stream bytes
//! left uncaptured), `01` make the decoder `finish()` before the chunk. Chunks are fed
//! in order with rising timestamps.
//!
//!     cargo +nightly fuzz run redis

#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_agent::protocols::Chunk;
use tracer_agent::protocols::db::{DbCall, DbSystem};
use tracer_agent::protocols::redis::{MAX_PENDING_COMMANDS, RedisDecoder, looks_like_command};

fuzz_target!(|data: &[u8]| {
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
        check(call);
    }
});

fn check(call: &DbCall) {
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
