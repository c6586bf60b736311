//! Fuzzes the spec loader and the planner: the input is split on NUL bytes into a stages
//! file, a stage config and two migrations of a project held in memory. No input may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = baton_coordinator::synthetic::fuzz_project(data);
});
