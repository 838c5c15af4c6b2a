//! The solo world: one node under crashes, checked after every step.

use tidesync_sim::solo::{Options, run};

#[test]
fn one_seed_gives_one_trace() {
    let opts = Options {
        seed: 7,
        steps: 300,
        crash_per_mille: 30,
    };
    let a = run(&opts).unwrap();
    let b = run(&opts).unwrap();
    assert_eq!(a, b);
    assert!(a.crashes > 0 && a.writes_acked > 0);
    let other = run(&Options { seed: 8, ..opts }).unwrap();
    assert_ne!(a.trace_hash, other.trace_hash);
}

#[test]
fn many_seeds_keep_every_acknowledged_write() {
    for seed in 0..40 {
        let opts = Options {
            seed,
            steps: 150,
            crash_per_mille: 40,
        };
        if let Err(v) = run(&opts) {
            panic!("{v}\nreproduce: {}", opts.command());
        }
    }
}
