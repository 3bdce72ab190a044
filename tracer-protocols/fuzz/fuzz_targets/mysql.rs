//! cargo-fuzz target `mysql`: the MySQL/MariaDB decoder. The harness and its input layout
//! are `tracer_protocols::fuzz_logic::mysql`.
//!
//!     cargo +nightly fuzz run mysql

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tracer_protocols::fuzz_logic::mysql(data));
