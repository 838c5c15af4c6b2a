//! `tidesync-sim`: run seeded worlds, check their invariants, print how to replay a failure.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use tidesync::fault::EngineFault;
use tidesync_sim::solo;
use tidesync_sim::topology::Topology;
use tidesync_sim::{Given, MAX_HEAL_ROUNDS, Options};

#[derive(Debug, Parser)]
#[command(
    name = "tidesync-sim",
    about = "Deterministic simulations of tidesync nodes: one seed, one trace"
)]
struct Args {
    /// The seed of the first world [default: a random seed, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// How many worlds to run, with consecutive seeds.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// star, mesh, line, two-hubs, ships, or solo (one node, checked at every step)
    /// [default: drawn from the seed].
    #[arg(long)]
    topology: Option<String>,
    /// Nodes in the world [default: drawn from the seed, 3 to 6].
    #[arg(long)]
    nodes: Option<usize>,
    /// Steps before the heal [default: drawn from the seed, 200 to 500].
    #[arg(long)]
    steps: Option<u32>,
    /// Chance of a crash at each step, in thousandths [default: drawn from the seed].
    #[arg(long)]
    crash_per_mille: Option<u32>,
    /// Chance that a message is lost, in thousandths [default: drawn from the seed].
    #[arg(long)]
    drop_per_mille: Option<u32>,
    /// Chance that a request is delivered twice, in thousandths [default: drawn from the seed].
    #[arg(long)]
    dup_per_mille: Option<u32>,
    /// Most simulated milliseconds a message takes [default: drawn from the seed].
    #[arg(long)]
    max_delay_ms: Option<i64>,
    /// Break the engine on purpose (accept-unsigned, forget-checkpoint, checkpoint-skips-gaps,
    /// drop-held, ignore-skip, ignore-link): the run then succeeds only if an invariant catches it.
    #[arg(long)]
    fault: Option<EngineFault>,
    /// The misbehaving node's misbehaviour (none, ignore-policy, send-skipped, equivocate,
    /// bogus-hellos, replay) [default: drawn from the seed: none in half the worlds].
    #[arg(long)]
    bad: Option<String>,
    /// Which node misbehaves (never node 0) [default: drawn from the seed].
    #[arg(long)]
    bad_node: Option<usize>,
    /// Whether links carry budgets, windows and rates [default: drawn from the seed].
    #[arg(long)]
    shaped: Option<bool>,
    /// Whether writes attach files that move between the nodes [default: drawn from the seed].
    #[arg(long)]
    files: Option<bool>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let first = args.seed.unwrap_or_else(rand::random);
    if args.topology.as_deref() == Some("solo") {
        return run_solo(&args, first);
    }
    let topology = match args.topology.as_deref().map(str::parse::<Topology>) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let bad = match args.bad.as_deref() {
        None => None,
        Some("none") => Some(None),
        Some(m) => match m.parse::<tidesync_sim::options::Misbehaviour>() {
            Ok(m) => Some(Some(m)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let given = Given {
        topology,
        nodes: args.nodes,
        steps: args.steps,
        crash_per_mille: args.crash_per_mille,
        drop_per_mille: args.drop_per_mille,
        dup_per_mille: args.dup_per_mille,
        max_delay_ms: args.max_delay_ms,
        fault: args.fault,
        bad,
        bad_node: args.bad_node,
        shaped: args.shaped,
        files: args.files,
    };
    println!("seed {first} seeds {}", args.seeds);
    let started = Instant::now();
    let (mut worst_rounds, mut caught) = (0, 0);
    let mut failed = Vec::new();
    for seed in first..first.saturating_add(args.seeds) {
        let opts = Options::derive(seed, &given);
        println!("{opts}");
        match tidesync_sim::run(&opts) {
            Ok(r) => {
                worst_rounds = worst_rounds.max(r.heal_rounds);
                println!(
                    "  ok: trace {:016x}, {} writes acknowledged, {} refused, {} forgeries, {} crashes, {} partitions, {} policy changes, {} messages ({} dropped, {} duplicated), converged {} rounds after the heal, {} documents, {} equivocations found, {} files attached, {} stored",
                    r.trace_hash,
                    r.writes_acked,
                    r.writes_refused,
                    r.forgeries,
                    r.crashes,
                    r.partitions,
                    r.policy_changes,
                    r.messages,
                    r.dropped,
                    r.duplicated,
                    r.heal_rounds,
                    r.docs,
                    r.equivocations,
                    r.files_added,
                    r.files_stored
                );
            }
            Err(v) if opts.fault.is_some() => {
                caught += 1;
                println!(
                    "  fault {} caught: {v}",
                    opts.fault.map(|f| f.name()).unwrap_or("")
                );
            }
            Err(v) => {
                println!("  FAILED: {v}");
                println!("reproduce: {}", opts.command());
                failed.push(opts.command());
            }
        }
    }
    if !failed.is_empty() {
        println!(
            "{} of {} worlds FAILED; reproduce each with:",
            failed.len(),
            args.seeds
        );
        for c in &failed {
            println!("  {c}");
        }
        return ExitCode::FAILURE;
    }
    println!(
        "{} worlds in {:.1} s; most rounds to converge after a heal: {worst_rounds} (limit {})",
        args.seeds,
        started.elapsed().as_secs_f64(),
        MAX_HEAL_ROUNDS
    );
    if let Some(f) = args.fault {
        println!("fault {f} caught in {caught} of {} worlds", args.seeds);
        if caught == 0 {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn run_solo(args: &Args, first: u64) -> ExitCode {
    println!("seed {first} seeds {} topology solo", args.seeds);
    for seed in first..first.saturating_add(args.seeds) {
        let opts = solo::Options {
            seed,
            steps: args.steps.unwrap_or(2_000),
            crash_per_mille: args.crash_per_mille.unwrap_or(10),
        };
        match solo::run(&opts) {
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
