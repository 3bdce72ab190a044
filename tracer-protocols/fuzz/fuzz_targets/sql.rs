//! cargo-fuzz target `sql`: the SQL helpers. The harness and its input layout
//! are `tracer_protocols::fuzz_logic::sql`.
//!
//!     cargo +nightly fuzz run sql

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer_protocols::fuzz_logic::sql(data));
