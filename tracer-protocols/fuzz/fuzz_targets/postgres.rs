//! cargo-fuzz target `postgres`: the PostgreSQL decoder. The harness and its input layout
//! are `tracer_protocols::fuzz_logic::postgres`.
//!
//!     cargo +nightly fuzz run postgres

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer_protocols::fuzz_logic::postgres(data));
