//! A value as it changed over time: answers "the latest value up to t" for any t.

use bincode::de::{BorrowDecoder, Decoder};
use bincode::enc::Encoder;
use bincode::error::{DecodeError, EncodeError};
use bincode::{BorrowDecode, Decode, Encode};
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
///
/// That lookup reads stored events back and costs more than the rest of an insert, so each
/// point also keeps a bound on its run: no applied event carrying the field lies after the
/// point, before the next one, later than [`Point::run_end`]. A late event not earlier than the bound (or
/// before the first point) has the next point as its successor, and nothing is looked up.
/// Traffic with a value that changes on most events (a machine count) makes most runs a
/// single event.
///
/// A bound is not enough when batches from agents running side by side overlap in time: the
/// late batch's events land inside runs that the other batch's events repeated. So a timeline
/// that once had to look a successor up keeps the keys of the latest events that repeat a
/// value from then on ([`Recent`]), and answers the next such question from them when they
/// cover it. Nothing of this is persisted; a timeline read back starts without it.
#[derive(Clone, Debug)]
pub struct Timeline<T> {
    points: Vec<Point<T>>,
    /// The latest `(time, store_seq)` of any event that carried the field.
    last: Option<(i64, u64)>,
    recent: Option<Box<Recent>>,
}

impl<T> Default for Timeline<T> {
    fn default() -> Self {
        Timeline {
            points: Vec::new(),
            last: None,
            recent: None,
        }
    }
}

/// What is asked of two timelines: the same points and latest key ([`Recent`] is a cache).
impl<T: PartialEq> PartialEq for Timeline<T> {
    fn eq(&self, other: &Self) -> bool {
        self.points == other.points && self.last == other.last
    }
}

impl<T: Encode> Encode for Timeline<T> {
    fn encode<E: Encoder>(&self, enc: &mut E) -> Result<(), EncodeError> {
        (&self.points, &self.last).encode(enc)
    }
}

impl<C, T: Decode<C>> Decode<C> for Timeline<T> {
    fn decode<D: Decoder<Context = C>>(d: &mut D) -> Result<Self, DecodeError> {
        let (points, last) = <(Vec<Point<T>>, Option<(i64, u64)>)>::decode(d)?;
        Ok(Timeline {
            points,
            last,
            recent: None,
        })
    }
}

impl<'de, C, T: BorrowDecode<'de, C>> BorrowDecode<'de, C> for Timeline<T> {
    fn borrow_decode<D: BorrowDecoder<'de, Context = C>>(d: &mut D) -> Result<Self, DecodeError> {
        let (points, last) = <(Vec<Point<T>>, Option<(i64, u64)>)>::borrow_decode(d)?;
        Ok(Timeline {
            points,
            last,
            recent: None,
        })
    }
}

/// How many repeats [`Recent`] keeps.
const RECENT: usize = 8;

/// The keys of the latest events that joined a run (carried the value of the point before
/// them), in a ring: every such event with a key after `covered_after` is in `keys`. An
/// evicted key moves `covered_after` up to it; an event older than `covered_after` is not
/// kept, and one before the ring existed was not seen, which `covered_after` (then the
/// latest key applied) also covers.
#[derive(Clone, Debug)]
struct Recent {
    /// Unused slots hold `(i64::MIN, 0)`, which is never after any key asked about.
    keys: [(i64, u64); RECENT],
    /// The slot the next key overwrites (the oldest written).
    next: usize,
    covered_after: (i64, u64),
}

impl Recent {
    fn new(covered_after: (i64, u64)) -> Box<Recent> {
        Box::new(Recent {
            keys: [(i64::MIN, 0); RECENT],
            next: 0,
            covered_after,
        })
    }

    fn record(&mut self, key: (i64, u64)) {
        if key <= self.covered_after {
            return;
        }
        let slot = &mut self.keys[self.next];
        self.covered_after = self.covered_after.max(*slot);
        *slot = key;
        self.next = (self.next + 1) % RECENT;
    }

    /// If every repeat after `after` is known: the earliest of them before `before` (`None`
    /// if there is none).
    fn first_between(&self, after: (i64, u64), before: Option<(i64, u64)>) -> Option<Option<(i64, u64)>> {
        if after < self.covered_after {
            return None;
        }
        Some(
            self.keys
                .iter()
                .copied()
                .filter(|&k| k > after && before.is_none_or(|b| k < b))
                .min(),
        )
    }
}

/// A change point, and the bound on its run (see [`Timeline`]).
///
/// The bound is kept to one bit, so a point costs no more memory than `(time, store_seq,
/// value)` (queries walk these points): set, every event of the run has the point's own
/// time; clear, there is no bound (`i64::MAX`). A bound that is neither is rounded up to
/// none, which only costs lookups. The bit is the top bit of the sequence (store sequences
/// stay far below 2^63). It is not persisted: a snapshot holds `(time, store_seq, value)`
/// per point, and a point read back has no bound.
#[derive(Clone, Debug, PartialEq)]
struct Point<T> {
    time: i64,
    seq_and_bound: u64,
    value: T,
}

/// The bit of [`Point::seq_and_bound`] that says the run ends at the point's time.
const RUN_AT_TIME: u64 = 1 << 63;

impl<T> Point<T> {
    fn new(time: i64, seq: u64, value: T, run_end: i64) -> Point<T> {
        debug_assert!(seq < RUN_AT_TIME, "store sequence {seq} out of range");
        let mut p = Point {
            time,
            seq_and_bound: seq & !RUN_AT_TIME,
            value,
        };
        p.set_run_end(run_end);
        p
    }

    fn key(&self) -> (i64, u64) {
        (self.time, self.seq_and_bound & !RUN_AT_TIME)
    }

    /// No applied event carrying the field lies after this point and before the next one
    /// with a time later than this.
    fn run_end(&self) -> i64 {
        if self.seq_and_bound & RUN_AT_TIME != 0 {
            self.time
        } else {
            i64::MAX
        }
    }

    fn set_run_end(&mut self, end: i64) {
        if end <= self.time {
            self.seq_and_bound |= RUN_AT_TIME;
        } else {
            self.seq_and_bound &= !RUN_AT_TIME;
        }
    }
}

impl<T: Encode> Encode for Point<T> {
    fn encode<E: Encoder>(&self, enc: &mut E) -> Result<(), EncodeError> {
        let (time, seq) = self.key();
        (time, seq, &self.value).encode(enc)
    }
}

fn read_point<T>((time, seq, value): (i64, u64, T)) -> Result<Point<T>, DecodeError> {
    if seq >= RUN_AT_TIME {
        return Err(DecodeError::OtherString(format!("store sequence {seq} out of range")));
    }
    Ok(Point::new(time, seq, value, i64::MAX))
}

impl<C, T: Decode<C>> Decode<C> for Point<T> {
    fn decode<D: Decoder<Context = C>>(d: &mut D) -> Result<Self, DecodeError> {
        read_point(<(i64, u64, T)>::decode(d)?)
    }
}

impl<'de, C, T: BorrowDecode<'de, C>> BorrowDecode<'de, C> for Point<T> {
    fn borrow_decode<D: BorrowDecoder<'de, Context = C>>(d: &mut D) -> Result<Self, DecodeError> {
        read_point(<(i64, u64, T)>::borrow_decode(d)?)
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

impl<T: PartialEq + Clone> Timeline<T> {
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
        let pos = partition_point_from_end(&self.points, |p| p.key() < key);
        if pos > 0 && self.points[pos - 1].value == value {
            // The value at every t >= time is already `value`; this event joins that run.
            let before = &mut self.points[pos - 1];
            before.set_run_end(before.run_end().max(time));
            if let Some(r) = &mut self.recent {
                r.record(key);
            }
            return Inserted::Exact;
        }
        if self.points.get(pos).is_some_and(|p| p.key() == key) {
            return Inserted::Exact; // the same event applied twice
        }
        // The bound of the run this event lands in (before the first point: none).
        let split_end = pos.checked_sub(1).map_or(i64::MIN, |p| self.points[p].run_end());
        // No event of that run is later than the bound, and those at the same time as this
        // one were applied before it (store sequences grow in the order events are applied,
        // which is also what `next` assumes). So if this one is not earlier than the bound,
        // none lies between it and the next point, which is its successor.
        let successor_is_next = late && pos < self.points.len() && time >= split_end;
        self.points.insert(pos, Point::new(time, seq, value, time));
        let mut outcome = Inserted::Exact;
        if late && !successor_is_next {
            // `value` holds from `time` until the next event carrying the field, which has its
            // own value; from there on the earlier answer stands. Every applied event between
            // the point before this one and the next point repeats the former's value, so
            // when the recent repeats cover this event's key, they name the successor.
            let next_point = self.points.get(pos + 1).map(Point::key);
            let known = self.recent.as_ref().and_then(|r| r.first_between(key, next_point));
            match known {
                Some(Some(k)) if pos > 0 => {
                    // The rest of the split run, from its first event after this one.
                    let v = self.points[pos - 1].value.clone();
                    self.points.insert(pos + 1, Point::new(k.0, k.1, v, split_end));
                }
                // No repeat after this event: the next point is its successor.
                Some(None) if next_point.is_some() => {}
                _ => {
                    if self.recent.is_none() {
                        self.recent = Some(Recent::new(self.last.unwrap_or(key)));
                    }
                    outcome = self.insert_looked_up(pos, key, split_end, next);
                }
            }
        }
        // Drop points made redundant (same value as their predecessor) right after `pos`;
        // the predecessor's run takes the dropped point's, whose event is now a repeat.
        let mut i = pos + 1;
        while i < self.points.len() && i <= pos + 2 {
            if self.points[i].value == self.points[i - 1].value {
                let dropped = self.points.remove(i);
                let before = &mut self.points[i - 1];
                before.set_run_end(before.run_end().max(dropped.run_end()).max(dropped.time));
                if let Some(r) = &mut self.recent {
                    r.record(dropped.key());
                }
            } else {
                i += 1;
            }
        }
        outcome
    }

    /// The successor of the late event just inserted at `pos`, from `next` (the stored events).
    fn insert_looked_up(
        &mut self,
        pos: usize,
        key: (i64, u64),
        split_end: i64,
        next: impl FnOnce() -> Option<(i64, u64, T)>,
    ) -> Inserted {
        match next() {
            Some((nt, ns, nv)) => {
                let next_point = self.points.get(pos + 1).map(Point::key);
                let before_next_point = next_point.is_none_or(|p| (nt, ns) < p);
                if nv != self.points[pos].value && before_next_point && (nt, ns) > key {
                    // The rest of the split run, from its first event after this one.
                    self.points.insert(pos + 1, Point::new(nt, ns, nv, split_end));
                } else if next_point != Some((nt, ns)) {
                    self.points[pos].set_run_end(split_end);
                }
                Inserted::Exact
            }
            None => {
                self.points[pos].set_run_end(split_end);
                Inserted::NextUnknown
            }
        }
    }

    /// Records an event that is not late and carries the latest value again (`same` says so),
    /// which is what [`Timeline::insert`] would do with it, without the value. Returns false,
    /// changing nothing, for any other event: then call `insert`.
    pub fn repeats(&mut self, time: UnixNanos, seq: u64, same: impl FnOnce(&T) -> bool) -> bool {
        let key = (time, seq);
        let late = self.last.is_some_and(|l| key < l);
        match self.points.last_mut() {
            Some(p) if !late && p.key() <= key && same(&p.value) => {
                p.set_run_end(p.run_end().max(time));
                self.last = Some(key);
                if let Some(r) = &mut self.recent {
                    r.record(key);
                }
                true
            }
            _ => false,
        }
    }

    /// The value of the latest point with `time <= t`.
    pub fn at(&self, t: UnixNanos) -> Option<&T> {
        // Most questions are about now, after the last change: no search.
        match self.points.last() {
            Some(p) if p.time <= t => return Some(&p.value),
            None => return None,
            _ => {}
        }
        let idx = self.points.partition_point(|p| p.time <= t);
        idx.checked_sub(1).map(|i| &self.points[i].value)
    }

    /// The latest change point.
    pub fn last_point(&self) -> Option<(UnixNanos, &T)> {
        self.points.last().map(|p| (p.time, &p.value))
    }

    /// Change points up to t, oldest first.
    pub fn points_until(&self, t: UnixNanos) -> impl Iterator<Item = (UnixNanos, &T)> {
        self.points
            .iter()
            .take_while(move |p| p.time <= t)
            .map(|p| (p.time, &p.value))
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
        for round in 0..2400 {
            // Longer ones too, past what the ring of recent repeats holds.
            let n = if round % 6 == 0 {
                rng.usize(30..200)
            } else {
                rng.usize(1..30)
            };
            let times = (n as i64).max(20);
            let events: Vec<(i64, u64, u8)> = (0..n).map(|i| (rng.i64(0..times), i as u64, rng.u8(0..3))).collect();
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
                // Now and then read back from a snapshot, which forgets the bounds of the runs.
                if rng.u8(0..10) == 0 {
                    let cfg = bincode::config::standard();
                    let bytes = bincode::encode_to_vec(&tl, cfg).unwrap();
                    tl = bincode::decode_from_slice(&bytes, cfg).unwrap().0;
                }
                assert_eq!(tl.insert(t, s, v, next), Inserted::Exact);
            }
            for t in -1..times + 2 {
                assert_eq!(tl.at(t).copied(), reference(&events, t), "t={t} events={events:?}");
            }
            assert!(
                tl.points.windows(2).all(|w| w[0].value != w[1].value),
                "no redundant points"
            );
        }
    }

    #[test]
    fn a_late_event_after_the_end_of_a_run_needs_no_lookup() {
        // Every event changes the value: every run is the point alone.
        let mut tl = Timeline::default();
        for i in 0..10u64 {
            tl.insert(i as i64 * 10, i, i % 2, || unreachable!("in order"));
        }
        // Late, between the points at 40 and 50: its successor is the point at 50.
        assert_eq!(
            tl.insert(45, 100, 7, || unreachable!("successor known")),
            Inserted::Exact
        );
        assert_eq!((tl.at(44), tl.at(45), tl.at(50)), (Some(&0), Some(&7), Some(&1)));
        // Before the first point: the first point is the successor.
        assert_eq!(
            tl.insert(-5, 101, 7, || unreachable!("successor known")),
            Inserted::Exact
        );
        assert_eq!((tl.at(-5), tl.at(0)), (Some(&7), Some(&0)));
        // Repeats after the points at 60 (late) and 92 (in order) extend their runs: an event
        // landing inside one must look its successor up (the repeat at 65, at 95).
        tl.insert(92, 102, 1, || unreachable!("in order"));
        assert!(tl.repeats(95, 103, |v| *v == 1));
        tl.insert(65, 104, 0, || unreachable!("repeats the point at 60"));
        let mut asked = 0;
        tl.insert(62, 105, 5, || {
            asked += 1;
            Some((65, 104, 0))
        });
        assert_eq!(asked, 1);
        assert_eq!((tl.at(62), tl.at(65), tl.at(70)), (Some(&5), Some(&0), Some(&1)));
        let mut asked = 0;
        tl.insert(93, 106, 3, || {
            asked += 1;
            Some((95, 103, 1))
        });
        assert_eq!(asked, 1);
        assert_eq!((tl.at(93), tl.at(95)), (Some(&3), Some(&1)));
        // A run of events at one time (a batch stamped once): a late event after it needs
        // no lookup, even at that same time (applied later than the run's events).
        let mut tl = Timeline::default();
        tl.insert(10, 0, 'a', || unreachable!("in order"));
        assert!(tl.repeats(10, 1, |v| *v == 'a'));
        tl.insert(20, 2, 'b', || unreachable!("in order"));
        tl.insert(15, 3, 'c', || unreachable!("after the run of the point at 10"));
        assert_eq!((tl.at(10), tl.at(15), tl.at(20)), (Some(&'a'), Some(&'c'), Some(&'b')));
        tl.insert(15, 4, 'e', || unreachable!("at the time of the run of the point at 15"));
        assert_eq!((tl.at(15), tl.at(20)), (Some(&'e'), Some(&'b')));
        // A run over several times has no bound kept: a late event after its point asks, and
        // the answer is the same.
        tl.insert(30, 5, 'f', || unreachable!("in order"));
        assert!(tl.repeats(40, 6, |v| *v == 'f'));
        tl.insert(50, 7, 'g', || unreachable!("in order"));
        let mut asked = 0;
        tl.insert(35, 8, 'h', || {
            asked += 1;
            Some((40, 6, 'f'))
        });
        assert_eq!(asked, 1);
        assert_eq!((tl.at(35), tl.at(40), tl.at(50)), (Some(&'h'), Some(&'f'), Some(&'g')));
    }

    #[test]
    fn recent_repeats_name_a_late_events_successor_without_a_lookup() {
        // Two agents' batches overlap: the run of 'a' from 10 is repeated at 30 by one, then
        // the other's event at 20 arrives with another value.
        let mut tl = Timeline::default();
        tl.insert(10, 0, 'a', || unreachable!("in order"));
        assert!(tl.repeats(30, 1, |v| *v == 'a'));
        let mut asked = 0;
        tl.insert(20, 2, 'b', || {
            asked += 1;
            Some((30, 1, 'a'))
        });
        assert_eq!(asked, 1, "the first time, the successor is looked up");
        // From then on the repeats are kept (by both ways of recording one).
        assert!(tl.repeats(40, 3, |v| *v == 'a'));
        tl.insert(50, 4, 'a', || unreachable!("in order"));
        tl.insert(45, 5, 'c', || unreachable!("the repeat at 50 is known"));
        assert_eq!((tl.at(44), tl.at(45), tl.at(50)), (Some(&'a'), Some(&'c'), Some(&'a')));
        // No repeat after a late event's key and before the next point: that point is next.
        tl.insert(60, 6, 'd', || unreachable!("in order"));
        tl.insert(55, 7, 'e', || unreachable!("the point at 60 is next"));
        assert_eq!((tl.at(55), tl.at(60)), (Some(&'e'), Some(&'d')));
        // Keys from before the ring existed are not covered: looked up (the run of the point
        // at 10 had a repeat, at 30, when it was kept to one bit).
        let mut asked = 0;
        tl.insert(15, 8, 'f', || {
            asked += 1;
            Some((20, 2, 'b'))
        });
        assert_eq!(asked, 1);
        assert_eq!((tl.at(15), tl.at(20)), (Some(&'f'), Some(&'b')));
        // Past the ring's size, the oldest kept repeats are forgotten and the cover moves up.
        for i in 0..RECENT as i64 + 2 {
            assert!(tl.repeats(100 + i, 10 + i as u64, |v| *v == 'd'));
        }
        let mut asked = 0;
        tl.insert(100, 30, 'g', || {
            asked += 1;
            Some((101, 11, 'd'))
        });
        assert_eq!(asked, 1, "the repeat at 101 was evicted");
        tl.insert(108, 31, 'h', || unreachable!("the repeat at 109 is kept"));
        assert_eq!(
            (tl.at(100), tl.at(101), tl.at(108), tl.at(109)),
            (Some(&'g'), Some(&'d'), Some(&'h'), Some(&'d'))
        );
        // Read back from a snapshot, the ring is gone: asked again.
        let cfg = bincode::config::standard();
        let bytes = bincode::encode_to_vec(&tl, cfg).unwrap();
        let (mut back, _): (Timeline<char>, _) = bincode::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(bincode::encode_to_vec(&back, cfg).unwrap(), bytes);
        let mut asked = 0;
        back.insert(107, 32, 'i', || {
            asked += 1;
            Some((108, 31, 'h'))
        });
        assert_eq!(asked, 1);
    }

    #[test]
    fn a_timeline_read_back_is_answered_the_same_and_looks_successors_up() {
        let mut tl = Timeline::default();
        for i in 0..10u64 {
            tl.insert(i as i64 * 10, i, i % 2, || unreachable!("in order"));
        }
        let cfg = bincode::config::standard();
        let bytes = bincode::encode_to_vec(&tl, cfg).unwrap();
        let plain: Vec<(i64, u64, u64)> = (0..10u64).map(|i| (i as i64 * 10, i, i % 2)).collect();
        let layout = bincode::encode_to_vec((&plain, Some((90i64, 9u64))), cfg).unwrap();
        assert_eq!(
            bytes, layout,
            "the snapshot layout is (time, seq, value) points and the last key"
        );
        let (mut back, _): (Timeline<u64>, _) = bincode::decode_from_slice(&bytes, cfg).unwrap();
        for t in -1..100 {
            assert_eq!(back.at(t), tl.at(t));
        }
        // The runs' bounds are not kept: a late event asks.
        let mut asked = 0;
        back.insert(45, 100, 7, || {
            asked += 1;
            Some((50, 5, 1))
        });
        assert_eq!(asked, 1);
        assert_eq!((back.at(45), back.at(50)), (Some(&7), Some(&1)));
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
