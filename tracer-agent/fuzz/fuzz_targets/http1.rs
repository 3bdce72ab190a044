//! Fuzzes the HTTP/1.x decoder with any bytes, cut anywhere, with capture gaps.
//!
//! Input layout: byte 0 is a header (low 6 bits: how many control bytes follow; bit 6:
//! tiny limits; bit 7: the response decoder first expects answers to HEAD and
//! CONNECT). Each control byte, used in turn and cyclically, cuts the next chunk: its
//! low 6 bits + 1 are the captured size; top bits `11` add a gap (the next control
//! byte × 4 stream bytes left uncaptured), `01` make the response decoder `finish()`
//! before the chunk. The rest of the input is the stream, fed to both a request and a
//! response decoder, the way the agent feeds them.
//!
//!     cargo +nightly fuzz run http1

#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_agent::protocols::Chunk;
use tracer_agent::protocols::http1::{
    Http1Decoder, Http1Limits, Http1Message, MessageKind, StartLine,
};

fuzz_target!(|data: &[u8]| {
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
        check(msg);
    }
    assert!(!requests.in_message() && !responses.in_message());
});

fn check(msg: &Http1Message) {
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
