//! `tidesync-sim`: run seeded worlds and check their invariants; print how to replay a failure.

use std::process::ExitCode;

use clap::Parser;
use tidesync_sim::world::{self, Options};

#[derive(Debug, Parser)]
#[command(
    name = "tidesync-sim",
    about = "Deterministic simulations of tidesync nodes"
)]
struct Args {
    /// The seed of the first world [default: a random seed, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// How many worlds to run, with consecutive seeds.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Steps per world.
    #[arg(long, default_value_t = 2_000)]
    steps: u32,
    /// Chance of a crash at each step, in thousandths.
    #[arg(long, default_value_t = 10)]
    crash_per_mille: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let first = args.seed.unwrap_or_else(rand::random);
    println!(
        "seed {first} seeds {} steps {} crash-per-mille {}",
        args.seeds, args.steps, args.crash_per_mille
    );
    for seed in first..first.saturating_add(args.seeds) {
        let opts = Options {
            seed,
            steps: args.steps,
            crash_per_mille: args.crash_per_mille,
        };
        match world::run(&opts) {
            Ok(r) => println!(
                "seed {seed}: ok, trace {:016x}, {} writes acknowledged, {} crashes, {} live objects",
                r.trace_hash, r.writes_acked, r.crashes, r.live_objects
            ),
            Err(v) => {
                println!("seed {seed}: FAILED at {v}");
                println!("reproduce: {}", opts.command());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
