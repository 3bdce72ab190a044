//! Fuzzes the SQL helpers (obfuscation, operation, collection) with any text.
//!
//! Input: the bytes as (lossy) UTF-8; every prefix cut at a character boundary is
//! tried too, as captures cut statements anywhere.
//!
//!     cargo +nightly fuzz run sql

#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_agent::protocols::db::DbSystem;
use tracer_agent::protocols::sql::{collection, obfuscate, obfuscate_for, operation};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check(&text);
    if let Some((cut, _)) = text.char_indices().nth(text.chars().count() / 2) {
        check(&text[..cut]);
    }
});

fn check(sql: &str) {
    for out in [obfuscate(sql), obfuscate_for(sql, DbSystem::Mysql)] {
        assert!(out.len() <= sql.len(), "output grew: {sql:?} -> {out:?}");
        // (It may end in a space: an unterminated quoted identifier is kept as is.)
        assert!(!out.starts_with(' '), "{out:?}");
    }
    if let Some(op) = operation(sql) {
        assert!(!op.is_empty() && op.len() <= 32);
        assert!(
            op.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
            "{op:?}"
        );
    }
    if let Some(name) = collection(sql) {
        assert!(!name.is_empty() && name.len() <= 256);
    }
}
