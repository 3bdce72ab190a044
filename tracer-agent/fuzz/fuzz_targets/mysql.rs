//! Fuzzes the MySQL/MariaDB decoder with any bytes, cut anywhere, with capture gaps,
//! the two directions interleaved.
//!
//! Input layout: byte 0 is a header (low 6 bits: how many control bytes follow; bit 6:
//! a recorded MariaDB greeting is fed to the server side first, so that the handshake
//! path is taken; bit 7: the first chunk is the client's, else the server's). Each
//! control byte, used in turn and cyclically, cuts the next chunk: its low 5 bits + 1
//! are the captured size; bit 5 makes the other direction send it; top bits `11` add a
//! gap (the next control byte × 64 stream bytes left uncaptured), `10` make the decoder
//! `finish()` before the chunk. The rest of the input is the stream, handed out to the
//! two directions in turn, the way the agent feeds a connection.
//!
//!     cargo +nightly fuzz run mysql

#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_agent::protocols::Chunk;
use tracer_agent::protocols::db::DbCall;
use tracer_agent::protocols::mysql::{MAX_NAME_BYTES, MAX_QUERY_TEXT_BYTES, MysqlDecoder};

/// A MariaDB 10.11 server greeting (testdata/mysql/cli_select.chunks).
const GREETING: &[u8] = b"d\x00\x00\x00\x0a5.5.5-10.11.19-MariaDB-0+deb12u1\x00\x06\x00\x00\x00Z~0ob}l'\x00\xfe\xff\x08\x02\x00\xff\x81\x15\x00\x00\x00\x00\x00\x00\x1d\x00\x00\x00xIFa6*no_n/;\x00mysql_native_password\x00";

fuzz_target!(|data: &[u8]| {
    let Some((&header, rest)) = data.split_first() else {
        return;
    };
    let (control, stream) = rest.split_at(usize::from(header & 0x3f).min(rest.len()));
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
        assert!(dec.namespace().is_none_or(|n| n.len() <= MAX_NAME_BYTES));
        assert!(dec.user().is_none_or(|u| u.len() <= MAX_NAME_BYTES));
    }
    let _ = format!("{dec:?}");
    dec.finish();
    assert!(!dec.in_flight());
    for call in &calls {
        check(call);
    }
});

fn check(call: &DbCall) {
    assert!(call.start_ns <= call.end_ns, "end before start: {call:?}");
    assert!(
        call.query_text
            .as_ref()
            .is_none_or(|t| t.len() <= MAX_QUERY_TEXT_BYTES),
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
            .is_none_or(|n| n.len() <= MAX_NAME_BYTES),
        "namespace too long"
    );
}
