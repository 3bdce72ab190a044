//! cargo-fuzz target `redis`: the Redis decoder. The harness and its input layout
//! are `tracer_protocols::fuzz_logic::redis`.
//!
//!     cargo +nightly fuzz run redis

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer_protocols::fuzz_logic::redis(data));
