//! Fuzzes the template and condition parsers and renderers. No input may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        baton_common::template::fuzz_template(text);
    }
});
