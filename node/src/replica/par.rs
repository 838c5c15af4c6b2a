//! Work shared among the cores: one ordered split of a list into a run per core, used by
//! verification, by a received batch's documents and by local writes' engine work.

use std::sync::OnceLock;

/// Lists shorter than this (changes to verify, documents to apply, writes to run through the
/// engine) stay on one thread: a thread's start costs more than a few items.
pub const PARALLEL_MIN_ITEMS: usize = 64;
/// Most threads one list is split among.
pub const MAX_PARALLEL_THREADS: usize = 4;

/// The cores this process may use, up to [`MAX_PARALLEL_THREADS`]; asked of the system once
/// (the standard library reads the cgroup files on every call).
pub fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_PARALLEL_THREADS)
    })
}

/// Split `items` into one run per core, hand each run to `f` on its own thread and join the
/// results in order; on this thread when there are fewer than [`PARALLEL_MIN_ITEMS`] (a
/// panic there unwinds as any call's would). A worker thread's panic is handed back (`Err`),
/// never swallowed, so no item's result can go missing unnoticed.
pub fn par_chunks<T: Send, R: Send>(
    items: Vec<T>,
    f: impl Fn(Vec<T>) -> Vec<R> + Sync,
) -> std::thread::Result<Vec<R>> {
    let workers = cores();
    if items.len() < PARALLEL_MIN_ITEMS || workers == 1 {
        return Ok(f(items));
    }
    let chunk = items.len().div_ceil(workers);
    let mut parts: Vec<Vec<T>> = Vec::with_capacity(workers);
    let mut rest = items;
    while rest.len() > chunk {
        let tail = rest.split_off(chunk);
        parts.push(rest);
        rest = tail;
    }
    parts.push(rest);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || f(part)))
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.extend(h.join()?);
        }
        Ok(out)
    })
}

/// The result of a split whose worker panics are this thread's: a worker's panic unwinds here.
pub fn or_unwind<R>(result: std::thread::Result<R>) -> R {
    result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Map `f` over `items` on every core, keeping their order (see [`par_chunks`]).
pub fn par_map<T: Send, R: Send>(
    items: Vec<T>,
    f: impl Fn(T) -> R + Sync,
) -> std::thread::Result<Vec<R>> {
    par_chunks(items, |part| part.into_iter().map(&f).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_map_keeps_every_result_in_order() {
        // Regression: worker results were joined with `unwrap_or_default`, so a panicking
        // worker would have dropped its share of a batch silently; now the panic is handed
        // back.
        let out = par_map((0..1000u32).collect(), |x| x * 2).expect("no panic");
        assert_eq!(out, (0..1000u32).map(|x| x * 2).collect::<Vec<_>>());
        let caught = par_map((0..1000u32).collect(), |x| {
            if x == 700 { panic!("boom") } else { x }
        });
        assert!(caught.is_err(), "a worker's panic must not be swallowed");
    }
}
