//! Fuzz target `change_decode`: see `tidesync::fuzzing::change_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidesync::fuzzing::change_decode(data));
