//! One license's `(time, store sequence)` keys in the event log's license index, ascending.
//!
//! Held as sorted runs of at most [`RUN`] keys. Events mostly arrive in time order, so an
//! insert usually lands at the end of the last run: no descent through a tree (each level a
//! cache miss, which made `BTreeSet` inserts 7.5 % of the collector's samples end to end,
//! docs/benchmarks.md). A late key moves at most one run's tail. Runs left behind by
//! appends are full; a run split by late keys holds half.

/// Most keys in one run.
const RUN: usize = 256;

type Key = (i64, u64);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LicenseKeys {
    /// Non-empty, each sorted, each run's keys all below the next run's.
    runs: Vec<Vec<Key>>,
    len: usize,
}

impl LicenseKeys {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `k`; false if it was there already.
    pub fn insert(&mut self, k: Key) -> bool {
        let Some(last) = self.runs.last_mut() else {
            self.runs.push(vec![k]);
            self.len = 1;
            return true;
        };
        let &end = last.last().expect("runs are not empty");
        if k > end {
            // The usual case: after every key.
            if last.len() < RUN {
                last.push(k);
            } else {
                self.runs.push(vec![k]);
            }
            self.len += 1;
            return true;
        }
        // The run that holds keys up to `k`: the last one starting at or below it.
        let r = self.runs.partition_point(|run| run[0] <= k).saturating_sub(1);
        let run = &mut self.runs[r];
        let Err(at) = run.binary_search(&k) else {
            return false;
        };
        run.insert(at, k);
        if run.len() > RUN {
            let upper = run.split_off(run.len() / 2);
            run.shrink_to_fit();
            self.runs.insert(r + 1, upper);
        }
        self.len += 1;
        true
    }

    /// Keys at or above `from`, ascending.
    pub fn range_from(&self, from: Key) -> impl Iterator<Item = Key> + '_ {
        let r = self.runs.partition_point(|run| run[0] <= from).saturating_sub(1);
        let start = self.runs.get(r).map_or(0, |run| run.partition_point(|k| *k < from));
        self.runs
            .get(r..)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .flat_map(move |(j, run)| run[if j == 0 { start } else { 0 }..].iter().copied())
    }

    /// Keys at or above `lo` and below `upper`, descending.
    pub fn range_rev(&self, lo: Key, upper: Key) -> impl Iterator<Item = Key> + '_ {
        // Runs that start below `upper`; the last of them holds the first key wanted.
        let r = self.runs.partition_point(|run| run[0] < upper);
        let end = r
            .checked_sub(1)
            .map_or(0, |last| self.runs[last].partition_point(|k| *k < upper));
        self.runs[..r]
            .iter()
            .rev()
            .enumerate()
            .flat_map(move |(j, run)| run[..if j == 0 { end } else { run.len() }].iter().rev().copied())
            .take_while(move |k| *k >= lo)
    }

    /// Removes every key below `at`; returns how many.
    pub fn remove_below(&mut self, at: Key) -> usize {
        let whole = self
            .runs
            .partition_point(|run| *run.last().expect("runs are not empty") < at);
        let mut removed: usize = self.runs.drain(..whole).map(|run| run.len()).sum();
        if let Some(first) = self.runs.first_mut() {
            let cut = first.partition_point(|k| *k < at);
            first.drain(..cut);
            removed += cut;
            if first.is_empty() {
                self.runs.remove(0);
            }
        }
        self.len -= removed;
        removed
    }
}

impl FromIterator<Key> for LicenseKeys {
    fn from_iter<I: IntoIterator<Item = Key>>(iter: I) -> LicenseKeys {
        let mut keys: Vec<Key> = iter.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        LicenseKeys {
            len: keys.len(),
            runs: keys.chunks(RUN).map(<[Key]>::to_vec).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn behaves_as_a_sorted_set_under_appends_late_keys_ranges_and_retention() {
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut keys = LicenseKeys::default();
            let mut model = BTreeSet::new();
            let n = (rng.next() % 3000) as i64;
            let mut seq = 0u64;
            for t in 0..n {
                // Mostly in time order; some late, some at the same time, some repeated.
                let time = match rng.next() % 10 {
                    0 => t - (rng.next() % 2000) as i64,
                    1 => t.saturating_sub(1),
                    _ => t,
                };
                seq += 1 + rng.next() % 2;
                let k = if rng.next() % 50 == 0 {
                    model.iter().next().copied().unwrap_or((time, seq))
                } else {
                    (time, seq)
                };
                assert_eq!(keys.insert(k), model.insert(k), "seed {seed}");
                if rng.next() % 500 == 0 {
                    let at = (t - (rng.next() % 1000) as i64, rng.next() % (seq + 1));
                    let below = model.iter().filter(|k| **k < at).count();
                    model = model.split_off(&at);
                    assert_eq!(keys.remove_below(at), below, "seed {seed}");
                }
            }
            assert_eq!(keys.len(), model.len(), "seed {seed}");
            assert!(keys.runs.iter().all(|r| !r.is_empty() && r.len() <= RUN), "seed {seed}");
            let all: Vec<Key> = keys.range_from((i64::MIN, 0)).collect();
            assert_eq!(all, model.iter().copied().collect::<Vec<_>>(), "seed {seed}");
            for _ in 0..20 {
                let a = (n - (rng.next() % (n as u64 + 10)) as i64, rng.next() % (seq + 2));
                let b = (n - (rng.next() % (n as u64 + 10)) as i64, rng.next() % (seq + 2));
                let from: Vec<Key> = keys.range_from(a).take(40).collect();
                let want: Vec<Key> = model.range(a..).take(40).copied().collect();
                assert_eq!(from, want, "seed {seed} from {a:?}");
                let (lo, hi) = (a.min(b), a.max(b));
                let rev: Vec<Key> = keys.range_rev(lo, hi).collect();
                let want: Vec<Key> = model.range(lo..hi).rev().copied().collect();
                assert_eq!(rev, want, "seed {seed} {lo:?}..{hi:?}");
            }
            let rebuilt: LicenseKeys = model.iter().rev().copied().collect();
            assert_eq!(
                rebuilt.range_from((i64::MIN, 0)).collect::<Vec<_>>(),
                all,
                "seed {seed}"
            );
            assert_eq!(rebuilt.len(), model.len());
        }
    }

    #[test]
    fn appends_in_order_leave_full_runs() {
        let mut keys = LicenseKeys::default();
        for i in 0..(RUN as i64 * 3 + 5) {
            assert!(keys.insert((i, i as u64)));
        }
        let sizes: Vec<usize> = keys.runs.iter().map(Vec::len).collect();
        assert_eq!(sizes, [RUN, RUN, RUN, 5]);
        assert!(!keys.insert((7, 7)), "already there");
        assert_eq!(keys.remove_below((RUN as i64 + 3, 0)), RUN + 3);
        assert_eq!(
            keys.range_from((i64::MIN, 0)).next(),
            Some((RUN as i64 + 3, RUN as u64 + 3))
        );
        assert_eq!(keys.remove_below((i64::MAX, 0)), RUN * 2 + 2);
        assert!(keys.is_empty() && keys.runs.is_empty());
        assert_eq!(keys.range_rev((i64::MIN, 0), (i64::MAX, 0)).count(), 0);
    }
}
