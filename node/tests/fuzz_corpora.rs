//! Replays every committed fuzz input (`fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`)
//! through the same `tidesync::fuzzing` functions the fuzzers ran, on stable, in seconds.

use std::path::{Path, PathBuf};

use tidesync::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable corpus directory").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(kind: &str, require: bool) -> usize {
    let mut total = 0;
    for (name, target) in TARGETS {
        let dir = fuzz_dir().join(kind).join(name);
        let files = inputs(&dir);
        assert!(
            !require || !files.is_empty(),
            "no inputs in {} for target {name}",
            dir.display()
        );
        for file in files {
            let data = std::fs::read(&file).expect("a readable corpus file");
            // A panic here names the input that caused it.
            eprintln!("{name}: {}", file.display());
            target(&data);
            total += 1;
        }
    }
    total
}

#[test]
fn every_corpus_input_replays_without_panicking() {
    let n = replay("corpus", true);
    eprintln!("replayed {n} corpus inputs");
}

#[test]
fn every_regression_input_replays_without_panicking() {
    // Each file is an input that once crashed a target; its bug is stated in
    // fuzz/regressions/README.md.
    let n = replay("regressions", false);
    eprintln!("replayed {n} regression inputs");
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    for (name, _) in TARGETS {
        let file = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(file.is_file(), "{} is missing", file.display());
    }
}
