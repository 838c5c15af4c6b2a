//! Fuzz target `change_decode`: see `tidesync::fuzzing::change_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(
    // libfuzzer-sys's hook aborts on every panic, even one the node catches (its
    // `catch_unwind` guards around Automerge); this one only reports it, so a panic is a
    // crash exactly when it escapes the node's code, as in a release build.
    init: std::panic::set_hook(Box::new(|info| eprintln!("PANIC (caught unless a crash follows): {info}"))),
    |data: &[u8]| tidesync::fuzzing::change_decode(data)
);
