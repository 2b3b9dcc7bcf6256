//! Spreading one query over the machine's cores.
//!
//! A query over 10 million events reads hundreds of thousands of cells, one license at a time,
//! and licenses are independent: the work is cut into blocks of licenses that threads take in
//! turn (popular licenses, with many cells, sit together in id and name order, so fixed halves
//! would leave one thread with most of the work). A query runs on the caller's thread alone when
//! it has fewer than two blocks, so small deployments and tests of small data pay nothing.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// At most this many threads per query, whatever the machine has.
const MAX_THREADS: usize = 8;

/// Licenses per block: large enough that taking a block costs nothing next to its work.
const BLOCK: usize = 1024;

/// Scratch memory of one query's per-thread accumulators, all threads together: a query whose
/// accumulator is larger (a long window by customer) runs on fewer threads, down to one.
const SCRATCH_BYTES: usize = 64 << 20;

/// How a query spreads over threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parallel {
    pub threads: usize,
    /// Licenses per block (at least 1).
    pub block: usize,
}

impl Default for Parallel {
    /// One thread per core, up to [`MAX_THREADS`].
    fn default() -> Parallel {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Parallel {
            threads: cores.min(MAX_THREADS),
            block: BLOCK,
        }
    }
}

impl Parallel {
    /// One thread, whatever the size (the reference for tests of the parallel answers).
    pub const SERIAL: Parallel = Parallel {
        threads: 1,
        block: usize::MAX,
    };

    /// At most as many threads as hold `bytes_per_thread` of accumulator each within
    /// [`SCRATCH_BYTES`], and at least one.
    pub fn within(self, bytes_per_thread: usize) -> Parallel {
        let fit = (SCRATCH_BYTES / bytes_per_thread.max(1)).max(1);
        Parallel {
            threads: self.threads.min(fit),
            ..self
        }
    }

    /// Folds `0..n` into one accumulator per thread that ran: each thread starts from `init()` and
    /// calls `f` on the blocks it takes. Which thread got which block varies, so the caller's
    /// merge must not depend on it (integer sums, or per-block results sorted by block).
    pub fn fold<A: Send>(
        self,
        n: usize,
        init: impl Fn() -> A + Sync,
        f: impl Fn(&mut A, Range<usize>) + Sync,
    ) -> Vec<A> {
        let block = self.block.max(1);
        let blocks = n.div_ceil(block);
        let range = |b: usize| b * block..(b.saturating_add(1).saturating_mul(block)).min(n);
        let threads = self.threads.clamp(1, blocks.max(1));
        if threads == 1 {
            let mut a = init();
            for b in 0..blocks {
                f(&mut a, range(b));
            }
            return vec![a];
        }
        let next = AtomicUsize::new(0);
        let work = || {
            let mut a = init();
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= blocks {
                    return a;
                }
                f(&mut a, range(b));
            }
        };
        std::thread::scope(|s| {
            let others: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
            let mut all = vec![work()];
            for h in others {
                all.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            all
        })
    }

    /// `f` of every block of `0..n`, in block order.
    pub fn map_blocks<T: Send>(self, n: usize, f: impl Fn(Range<usize>) -> T + Sync) -> Vec<T> {
        let mut done: Vec<(usize, T)> = self
            .fold(n, Vec::new, |out, r| {
                let start = r.start;
                out.push((start, f(r)));
            })
            .into_iter()
            .flatten()
            .collect();
        done.sort_unstable_by_key(|(start, _)| *start);
        done.into_iter().map(|(_, t)| t).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_is_visited_once_and_blocks_come_back_in_order() {
        for threads in [1, 2, 3, 8] {
            for block in [1, 3, 7, 1000] {
                for n in [0, 1, 6, 7, 8, 50, 2049] {
                    let p = Parallel { threads, block };
                    let seen: Vec<usize> = p.map_blocks(n, |r| r.collect::<Vec<_>>()).concat();
                    assert_eq!(
                        seen,
                        (0..n).collect::<Vec<_>>(),
                        "threads {threads} block {block} n {n}"
                    );
                    let sums = p.fold(n, || 0usize, |a, r| *a += r.sum::<usize>());
                    assert!(sums.len() <= threads.max(1));
                    assert_eq!(sums.iter().sum::<usize>(), n * n.saturating_sub(1) / 2);
                }
            }
        }
    }

    #[test]
    fn large_accumulators_take_fewer_threads() {
        let p = Parallel { threads: 8, block: 10 };
        assert_eq!(p.within(1 << 10).threads, 8);
        assert_eq!(p.within(SCRATCH_BYTES / 3).threads, 3);
        assert_eq!(p.within(SCRATCH_BYTES * 5).threads, 1);
        assert_eq!(p.within(0).threads, 8);
    }

    #[test]
    fn serial_runs_on_the_callers_thread() {
        let me = std::thread::current().id();
        let ids = Parallel::SERIAL.map_blocks(10_000, |_| std::thread::current().id());
        assert_eq!(ids, vec![me]);
        let spread = Parallel { threads: 4, block: 1 }.fold(64, Vec::new, |v, _| v.push(std::thread::current().id()));
        assert_eq!(spread.len(), 4);
    }
}
