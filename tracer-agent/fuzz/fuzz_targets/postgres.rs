//! Fuzzes the PostgreSQL decoder with any interleaving of client and server bytes, cut
//! anywhere, with capture gaps.
//!
//! Input layout: a sequence of chunks, each a control byte followed by its bytes. The
//! control byte's low 6 bits + 1 are the captured size (cut short at the end of the
//! input); bit 7 picks the side (0 client, 1 server); bit 6 means one more byte follows
//! the control byte: the gap after the captured bytes, × 4 stream bytes left
//! uncaptured, or, when it is 0xff, `finish()` (connection closed) before the chunk.
//! The gap's stream bytes are taken from the input too, as the kernel would have moved
//! them, so the decoder must skip exactly that many.
//!
//!     cargo +nightly fuzz run postgres

#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_agent::protocols::Chunk;
use tracer_agent::protocols::db::DbCall;
use tracer_agent::protocols::postgres::{MAX_QUERY_TEXT_BYTES, PgDecoder, UNKNOWN_SQLSTATE};

fuzz_target!(|data: &[u8]| {
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
        check(call);
    }
    let in_flight = decoder.in_flight();
    let forgotten = decoder.finish();
    assert!(forgotten == 0 || in_flight);
    assert!(!decoder.in_flight());
});

fn check(call: &DbCall) {
    assert!(call.start_ns <= call.end_ns, "end before start: {call:?}");
    assert!(
        call.query_text
            .as_ref()
            .is_none_or(|t| t.len() <= MAX_QUERY_TEXT_BYTES),
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
