//! cargo-fuzz target `http1`: the HTTP/1.x decoders. The harness and its input layout
//! are `tracer_protocols::fuzz_logic::http1`.
//!
//!     cargo +nightly fuzz run http1

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer_protocols::fuzz_logic::http1(data));
