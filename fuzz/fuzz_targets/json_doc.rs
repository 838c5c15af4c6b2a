//! Fuzz target `json_doc`: see `tidesync::fuzzing::json_doc`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidesync::fuzzing::json_doc(data));
