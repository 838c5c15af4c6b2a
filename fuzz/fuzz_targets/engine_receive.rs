//! Fuzz target `engine_receive`: see `tidesync::fuzzing::engine_receive`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidesync::fuzzing::engine_receive(data));
