//! Fuzz target `bundle_open`: see `tidesync::fuzzing::bundle_open`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidesync::fuzzing::bundle_open(data));
