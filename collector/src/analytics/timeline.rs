//! A value as it changed over time: answers "the latest value up to t" for any t.

use bincode::{Decode, Encode};
use keytrail_common::time::UnixNanos;

/// Change points `(time, store_seq, value)` in ascending `(time, store_seq)` order, with no two
/// consecutive points holding the same value — so a value that is reported again and again
/// (the usual case: a license's plan on every validation) costs one point.
///
/// Dropping repeated values loses where they occurred, which matters when an event arrives
/// late (its time is before the latest event already applied) with a *different* value: the
/// value it sets holds only until the next event that carries the field. [`Timeline::insert`]
/// then asks for that next event (the store looks it up among the stored raw events), so the
/// answer for every t stays what the full, time-ordered event list would give.
#[derive(Clone, Debug, Encode, Decode, PartialEq)]
pub struct Timeline<T> {
    points: Vec<(i64, u64, T)>,
    /// The latest `(time, store_seq)` of any event that carried the field.
    last: Option<(i64, u64)>,
}

impl<T> Default for Timeline<T> {
    fn default() -> Self {
        Timeline {
            points: Vec::new(),
            last: None,
        }
    }
}

/// `slice.partition_point(below)`, searched from the end: first the last element, then
/// the 3rd, 7th, 15th, … from the end (steps doubling), then a binary search within the last step. Events come
/// in time order or a little late, so their place is at or near the end: found in a few
/// comparisons on memory just touched, where a binary search over a timeline of a popular
/// license (hundreds of thousands of points) misses the cache at most of its ~18 probes.
pub fn partition_point_from_end<T>(slice: &[T], below: impl Fn(&T) -> bool) -> usize {
    // Every element of slice[hi..] is not below.
    let mut hi = slice.len();
    let mut step = 1;
    while hi > 0 {
        let probe = hi.saturating_sub(step);
        if below(&slice[probe]) {
            return probe + 1 + slice[probe + 1..hi].partition_point(&below);
        }
        hi = probe;
        step = step.saturating_mul(2);
    }
    0
}

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// In time order, or a late event that changed nothing.
    Exact,
    /// A late event needed the next event carrying the field and it was not found (purged by
    /// retention): the value is assumed to hold until the next change point.
    NextUnknown,
}

impl<T: PartialEq> Timeline<T> {
    /// Records that an event at `(time, seq)` carried `value`. `next` finds the earliest
    /// already-applied event carrying the field with a time after `time`, as `(time, seq,
    /// value)`; it is called only for a late event that changes a value.
    pub fn insert(
        &mut self,
        time: UnixNanos,
        seq: u64,
        value: T,
        next: impl FnOnce() -> Option<(i64, u64, T)>,
    ) -> Inserted {
        let key = (time, seq);
        let late = self.last.is_some_and(|l| key < l);
        if !late {
            self.last = Some(key);
        }
        let pos = partition_point_from_end(&self.points, |p| (p.0, p.1) < key);
        if pos > 0 && self.points[pos - 1].2 == value {
            return Inserted::Exact; // the value at every t >= time is already `value`
        }
        if self.points.get(pos).is_some_and(|p| (p.0, p.1) == key) {
            return Inserted::Exact; // the same event applied twice
        }
        self.points.insert(pos, (time, seq, value));
        let mut outcome = Inserted::Exact;
        if late {
            // `value` holds from `time` until the next event carrying the field, which has its
            // own value; from there on the earlier answer stands.
            match next() {
                Some((nt, ns, nv)) => {
                    let before_next_point = self.points.get(pos + 1).is_none_or(|p| (nt, ns) < (p.0, p.1));
                    if nv != self.points[pos].2 && before_next_point && (nt, ns) > key {
                        self.points.insert(pos + 1, (nt, ns, nv));
                    }
                }
                None => outcome = Inserted::NextUnknown,
            }
        }
        // Drop points made redundant (same value as their predecessor) right after `pos`.
        let mut i = pos + 1;
        while i < self.points.len() && i <= pos + 2 {
            if self.points[i].2 == self.points[i - 1].2 {
                self.points.remove(i);
            } else {
                i += 1;
            }
        }
        outcome
    }

    /// Records an event that is not late and carries the latest value again (`same` says so),
    /// which is what [`Timeline::insert`] would do with it, without the value. Returns false,
    /// changing nothing, for any other event: then call `insert`.
    pub fn repeats(&mut self, time: UnixNanos, seq: u64, same: impl FnOnce(&T) -> bool) -> bool {
        let key = (time, seq);
        let late = self.last.is_some_and(|l| key < l);
        match self.points.last() {
            Some(p) if !late && (p.0, p.1) <= key && same(&p.2) => {
                self.last = Some(key);
                true
            }
            _ => false,
        }
    }

    /// The value of the latest point with `time <= t`.
    pub fn at(&self, t: UnixNanos) -> Option<&T> {
        // Most questions are about now, after the last change: no search.
        match self.points.last() {
            Some(p) if p.0 <= t => return Some(&p.2),
            None => return None,
            _ => {}
        }
        let idx = self.points.partition_point(|p| p.0 <= t);
        idx.checked_sub(1).map(|i| &self.points[i].2)
    }

    /// The latest change point.
    pub fn last_point(&self) -> Option<(UnixNanos, &T)> {
        self.points.last().map(|p| (p.0, &p.2))
    }

    /// Change points up to t, oldest first.
    pub fn points_until(&self, t: UnixNanos) -> impl Iterator<Item = (UnixNanos, &T)> {
        self.points.iter().take_while(move |p| p.0 <= t).map(|p| (p.0, &p.2))
    }

    #[cfg(test)]
    pub fn point_count(&self) -> usize {
        self.points.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_point_from_end_agrees_with_partition_point() {
        // Every length up to 70 (past several doubling steps), every split, with repeats.
        for len in 0..70usize {
            let v: Vec<usize> = (0..len).map(|i| i / 3).collect();
            for t in 0..=len / 3 + 1 {
                assert_eq!(
                    partition_point_from_end(&v, |x| *x < t),
                    v.partition_point(|x| *x < t),
                    "len {len}, t {t}"
                );
                assert_eq!(
                    partition_point_from_end(&v, |x| *x <= t),
                    v.partition_point(|x| *x <= t),
                    "len {len}, t {t} (<=)"
                );
            }
        }
    }

    /// The value at t from the plain definition: the latest (time, seq) event with time <= t.
    fn reference(events: &[(i64, u64, u8)], t: i64) -> Option<u8> {
        events
            .iter()
            .filter(|e| e.0 <= t)
            .max_by_key(|e| (e.0, e.1))
            .map(|e| e.2)
    }

    #[test]
    fn any_insertion_order_gives_the_time_ordered_answer() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let n = rng.usize(1..30);
            let events: Vec<(i64, u64, u8)> = (0..n).map(|i| (rng.i64(0..20), i as u64, rng.u8(0..3))).collect();
            // Applied in a random order; store sequences follow the order of application.
            let mut order: Vec<(i64, u8)> = events.iter().map(|e| (e.0, e.2)).collect();
            rng.shuffle(&mut order);
            let events: Vec<(i64, u64, u8)> = order.iter().enumerate().map(|(s, (t, v))| (*t, s as u64, *v)).collect();
            let mut tl = Timeline::default();
            for (i, &(t, s, v)) in events.iter().enumerate() {
                let next = || {
                    events[..i]
                        .iter()
                        .filter(|e| e.0 > t)
                        .min_by_key(|e| (e.0, e.1))
                        .copied()
                };
                // The fast path for repeated values, tried on half the events, must agree.
                if rng.bool() && tl.repeats(t, s, |x| *x == v) {
                    continue;
                }
                assert_eq!(tl.insert(t, s, v, next), Inserted::Exact);
            }
            for t in -1..22 {
                assert_eq!(tl.at(t).copied(), reference(&events, t), "t={t} events={events:?}");
            }
            assert!(tl.points.windows(2).all(|w| w[0].2 != w[1].2), "no redundant points");
        }
    }

    #[test]
    fn a_repeated_value_costs_one_point() {
        let mut tl = Timeline::default();
        for i in 0..100 {
            tl.insert(i, i as u64, "pro", || unreachable!("in order"));
        }
        assert_eq!(tl.point_count(), 1);
        // Late, different: holds until the next event (the one at 51, found by `next`).
        tl.insert(50, 1000, "team", || Some((51, 51, "pro")));
        assert_eq!(tl.at(49), Some(&"pro"));
        assert_eq!(tl.at(50), Some(&"team"), "same time, stored later: later");
        assert_eq!(tl.at(51), Some(&"pro"));
        assert_eq!(tl.point_count(), 3);
        // Late, not found (purged): reported, value assumed to hold to the next change point.
        assert_eq!(tl.insert(10, 1001, "free", || None), Inserted::NextUnknown);
    }
}
