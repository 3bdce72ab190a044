//! cargo-fuzz target `http_target`: request targets as span attributes (url.path,
//! url.template, leak culprits). The harness is
//! `tracer_protocols::fuzz_logic::http_target`.
//!
//!     cargo +nightly fuzz run http_target

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer_protocols::fuzz_logic::http_target(data));
