//! Deduplication decisions: which events of a batch are new.
//!
//! Owns the rule, not the memory of what was seen: the caller (the store's writer, the only
//! place that serialises ingestion) supplies a lookup for ids already stored. An event is a
//! duplicate when its `id` was stored before (within `retention.dedup_window`), or appeared
//! earlier in the same group of batches; the first stored copy wins (metrics.md, common rules).
//! Batch-level dedup (same agent and sequence with the same frame checksum) is decided by the
//! store before this runs: a retried batch never reaches the event check.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hash, Hasher};

/// For keys that are already uniform 128-bit keyed hashes (event ids, license and user
/// names): a table uses their low bits as they are.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// The outcome for one batch: indexes of the events to store, and how many were duplicates.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub new: Vec<usize>,
    pub duplicates: u32,
}

/// Splits a batch, given as one dedup key per event (the event id, or a hash of it), into new
/// events and duplicates. `seen_before` answers for keys stored by earlier groups; `seen_now`
/// collects the keys of this group (shared across the group's batches) and is updated with
/// every new one.
pub fn plan<K: Hash + Eq + Clone, S: BuildHasher>(
    keys: &[K],
    seen_before: impl Fn(&K) -> bool,
    seen_now: &mut HashSet<K, S>,
) -> Plan {
    let mut plan = Plan::default();
    for (i, k) in keys.iter().enumerate() {
        if seen_now.contains(k) || seen_before(k) {
            plan.duplicates += 1;
        } else {
            seen_now.insert(k.clone());
            plan.new.push(i);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_copy_wins_within_and_across_batches() {
        let mut now = HashSet::new();
        let stored = ["old"];
        let p = plan(&["a", "old", "a", "b"], |id| stored.contains(id), &mut now);
        assert_eq!(
            p,
            Plan {
                new: vec![0, 3],
                duplicates: 2
            }
        );
        let p = plan(&["b", "c"], |_| false, &mut now);
        assert_eq!(
            p,
            Plan {
                new: vec![1],
                duplicates: 1
            }
        );
    }
}
