//! Fuzz target `wire_decode`: see `tidesync::fuzzing::wire_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidesync::fuzzing::wire_decode(data));
