//! Fuzz target `config_parse`: see `tidesync::fuzzing::config_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidesync::fuzzing::config_parse(data));
