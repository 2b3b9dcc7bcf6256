//! The recorder's CPU work — adapters, pseudonymisation, wire records, compressed chunks — on
//! a thread of its own at Linux's `SCHED_IDLE` policy, with the recorder's thread (normal
//! policy) taking over whatever that thread has not started after [`HELP_AFTER`].
//!
//! Why: on a small host a proxied call hops between cores with every wake-up (the
//! application, the proxy thread, the license server). A call thread woken onto a core where
//! one of the agent's background threads runs at the normal policy waits for it: the scheduler
//! lets the running thread go on, and a thread that slept a lot (as background threads do) is
//! ahead in its fair share. Traced with `perf sched` (docs/benchmarks.md, session 21), the
//! slowest 1 % of sequential proxied calls waited about 200 µs each behind the agent's own
//! threads, the recorder and the buffer's writer (which compressed the recorder's chunks) the
//! largest part of it. Any normal thread preempts a `SCHED_IDLE` one at once, and a woken
//! thread treats a core running only `SCHED_IDLE` threads as idle.
//!
//! Why the fallback: a `SCHED_IDLE` thread runs only when no normal thread wants the core, so
//! under a load that keeps every core busy it falls behind (session 21: 0.9–12 % of calls went
//! unrecorded with the whole recorder at `SCHED_IDLE`), and a thread cannot raise itself back
//! without `CAP_SYS_NICE`. So the recorder hands each batch over in units of [`UNIT`]
//! exchanges; the background thread claims them one at a time, and once a batch has waited
//! [`HELP_AFTER`] the recorder claims the rest itself, then redoes, on copies, the unit the
//! background thread may still be on: a starved `SCHED_IDLE` thread can wait seconds for a
//! core (a weight of 3 against 1,024), so the recorder never waits for it. After a batch it
//! had to help with, it helps with the next ones from the start for [`BEHIND_FOR`]. Encoding has no side
//! effects outside its output (counters and errors travel in it, event ids only need to be
//! unique), so the first output of a unit counts and a late duplicate is dropped. Outputs are
//! kept per unit, so the batch's events come out in order whoever encoded them.
//!
//! What the background thread may touch: only its job (the units it claimed, and the job's
//! result, which the recorder reads only after the thread is done with it) and what it owns
//! (its adapter context, its compressor).
//! Counters go back to the recorder in a [`Tally`]; it never touches the buffer, sled or the
//! metrics, whose locks normal threads take: a preempted idle thread holding one would stall
//! them for as long as it is starved. Two exceptions, both brief and both shared with every
//! thread of the process: the allocator (glibc's arenas, two in the agent; most small
//! allocations come from the thread's own cache without a lock), and debug logging.
//!
//! Elsewhere than Linux, or where the policy is refused (a seccomp profile), the background
//! thread runs at the normal policy and everything else stays the same.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use keytrail_common::fingerprint::Fingerprinter;

use super::{record_one, Adapter, Exchange, RecorderDefaults};
use crate::buffer::{Chunker, PreparedChunk};

/// Exchanges a thread claims at a time (the recorder yields its core between units).
const UNIT: usize = 32;
/// How long a batch is left to the background thread before the recorder helps with it.
/// Under a saturating load the proxy stages new calls meanwhile (up to 8,192, about 250 ms
/// of calls at the load measured in the proxy benchmark).
const HELP_AFTER: Duration = Duration::from_millis(100);
/// After a batch the recorder had to help with, it helps with the next ones at once for this
/// long: on a host whose cores stay busy the background thread gets almost no time, and
/// waiting [`HELP_AFTER`] on every batch would let the staging grow towards its cap.
const BEHIND_FOR: Duration = Duration::from_secs(1);
/// The background thread's name.
const THREAD_NAME: &str = "keytrail-encode";

/// One thread's means of turning exchanges into wire records.
pub struct Encoding {
    pub adapter: Arc<dyn Adapter>,
    pub fingerprinter: Fingerprinter,
    pub defaults: RecorderDefaults,
}

impl Encoding {
    /// Another thread's copy (the same adapter, secret and event ids).
    fn for_another_thread(&self) -> Encoding {
        Encoding {
            adapter: Arc::clone(&self.adapter),
            fingerprinter: self.fingerprinter.clone(),
            defaults: self.defaults.for_another_thread(),
        }
    }

    fn run(&self, exchanges: &[Exchange]) -> UnitOut {
        let mut out = UnitOut {
            records: Vec::with_capacity(exchanges.len() * 256),
            ..UnitOut::default()
        };
        for ex in exchanges {
            out.count += record_one(
                ex,
                self.adapter.as_ref(),
                &self.fingerprinter,
                &self.defaults,
                &mut out.unrecorded,
                &mut out.records,
            );
        }
        out
    }
}

/// Calls not recorded, by reason, and the first invalid event's error: counted and logged by
/// the recorder, not by the thread that found them.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub reasons: Vec<(&'static str, u64)>,
    /// The first adapter-produced event that failed validation, and how many did.
    pub invalid: Option<(String, u64)>,
}

impl Tally {
    pub fn add(&mut self, reason: &'static str, n: u64) {
        match self.reasons.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, total)) => *total += n,
            None => self.reasons.push((reason, n)),
        }
    }

    fn merge(&mut self, other: &Tally) {
        for &(reason, n) in &other.reasons {
            self.add(reason, n);
        }
        if let Some((error, n)) = &other.invalid {
            match &mut self.invalid {
                Some((_, total)) => *total += n,
                None => self.invalid = Some((error.clone(), *n)),
            }
        }
    }
}

/// A batch's events, as wire records or as chunks ready for the buffer.
pub enum Payload {
    /// Encoded (in part) by the recorder: the writer cuts and compresses them.
    Records(Vec<u8>),
    /// Encoded and compressed by the background thread.
    Chunks(Vec<PreparedChunk>),
}

/// What came of a batch.
pub struct Encoded {
    pub payload: Payload,
    pub count: u32,
    pub unrecorded: Tally,
}

#[derive(Default)]
struct UnitOut {
    records: Vec<u8>,
    count: u32,
    unrecorded: Tally,
}

/// A unit of a batch. Its exchanges are read only by the thread that claimed the unit; the
/// recorder redoes a unit the background thread claimed and has not finished on copies of
/// them (so it never waits for that thread, not even on an exchange's decoded body). The
/// first output set counts; a late duplicate is dropped.
struct Unit {
    exchanges: Vec<Exchange>,
    out: OnceLock<UnitOut>,
}

/// One batch being encoded.
struct Job {
    units: Box<[Unit]>,
    /// The next unit to claim.
    next: AtomicUsize,
    /// Set, with `result` filled and its lock released, when the background thread has put
    /// the whole batch together.
    complete: AtomicBool,
    result: Mutex<Option<Encoded>>,
    recorder: Thread,
}

impl Job {
    fn new(exchanges: &mut Vec<Exchange>, recorder: Thread) -> Job {
        let mut units: Vec<Vec<Exchange>> = Vec::with_capacity(exchanges.len().div_ceil(UNIT));
        for ex in exchanges.drain(..) {
            match units.last_mut() {
                Some(unit) if unit.len() < UNIT => unit.push(ex),
                _ => {
                    let mut unit = Vec::with_capacity(UNIT);
                    unit.push(ex);
                    units.push(unit);
                }
            }
        }
        Job {
            units: units
                .into_iter()
                .map(|exchanges| Unit {
                    exchanges,
                    out: OnceLock::new(),
                })
                .collect(),
            next: AtomicUsize::new(0),
            complete: AtomicBool::new(false),
            result: Mutex::new(None),
            recorder,
        }
    }

    fn claim(&self) -> Option<usize> {
        let i = self.next.fetch_add(1, Ordering::AcqRel);
        (i < self.units.len()).then_some(i)
    }

    /// The background thread's part: encodes units until none is left to claim; if every
    /// unit is then done, puts the batch together and compresses it into chunks.
    fn work_in_background(&self, encoding: &Encoding, chunker: &mut Chunker) {
        while let Some(i) = self.claim() {
            let unit = &self.units[i];
            let _ = unit.out.set(encoding.run(&unit.exchanges));
        }
        if self.units.iter().all(|u| u.out.get().is_some()) && !self.complete.load(Ordering::Acquire) {
            let encoded = self.assemble(Some(chunker));
            *self.result.lock().expect("job result") = Some(encoded);
            self.complete.store(true, Ordering::Release);
            self.recorder.unpark();
        }
    }

    /// The recorder's part: encodes the units nobody claimed, then redoes, on copies, those
    /// the background thread claimed and has not finished.
    fn work_in_front(&self, encoding: &Encoding) {
        while let Some(i) = self.claim() {
            if i > 0 {
                // The recorder runs at the normal policy: give a woken call thread its core.
                std::thread::yield_now();
            }
            let unit = &self.units[i];
            let _ = unit.out.set(encoding.run(&unit.exchanges));
        }
        for unit in self.units.iter() {
            if unit.out.get().is_none() {
                std::thread::yield_now();
                let copies = unit.exchanges.clone();
                let _ = unit.out.set(encoding.run(&copies));
            }
        }
    }

    /// The batch: every unit's records in order (compressed into chunks with a `chunker`).
    fn assemble(&self, chunker: Option<&mut Chunker>) -> Encoded {
        let mut records = Vec::with_capacity(
            self.units
                .iter()
                .filter_map(|u| u.out.get())
                .map(|o| o.records.len())
                .sum(),
        );
        let mut count = 0u32;
        let mut unrecorded = Tally::default();
        for out in self.units.iter().filter_map(|u| u.out.get()) {
            records.extend_from_slice(&out.records);
            count += out.count;
            unrecorded.merge(&out.unrecorded);
        }
        let payload = match chunker {
            Some(chunker) if count > 0 => Payload::Chunks(chunker.chunks(&records, count)),
            _ => Payload::Records(records),
        };
        Encoded {
            payload,
            count,
            unrecorded,
        }
    }
}

/// The hand-over to the background thread: the job it should take next.
#[derive(Default)]
struct Shared {
    job: Mutex<Option<Arc<Job>>>,
    stop: AtomicBool,
}

/// The recorder's side: encodes batches with the background thread's help.
pub struct Encoder {
    own: Encoding,
    shared: Arc<Shared>,
    /// The background thread, if it could be started.
    worker: Option<Thread>,
    help_after: Duration,
    /// Until when batches get help at once (the background thread fell behind on one).
    behind_until: Option<Instant>,
}

impl Encoder {
    /// Starts the background thread (lowered to `SCHED_IDLE`) with a copy of `encoding` and
    /// the chunker. Call on the thread that will call [`Encoder::encode`].
    pub fn start(encoding: Encoding, mut chunker: Chunker) -> Encoder {
        let shared = Arc::new(Shared::default());
        let theirs = encoding.for_another_thread();
        let their_shared = Arc::clone(&shared);
        let worker = std::thread::Builder::new().name(THREAD_NAME.into()).spawn(move || {
            lower_this_thread();
            loop {
                if their_shared.stop.load(Ordering::Acquire) {
                    return;
                }
                let job = their_shared.job.lock().expect("encoder job").take();
                match job {
                    Some(job) => job.work_in_background(&theirs, &mut chunker),
                    None => std::thread::park(),
                }
            }
        });
        let worker = match worker {
            Ok(handle) => Some(handle.thread().clone()),
            Err(e) => {
                tracing::warn!(error = %e, "proxy: starting the recorder's background thread failed; the recorder encodes alone");
                None
            }
        };
        Encoder {
            own: encoding,
            shared,
            worker,
            help_after: HELP_AFTER,
            behind_until: None,
        }
    }

    /// Encodes `exchanges` (leaving the vector empty, its room kept) into one batch's events.
    pub fn encode(&mut self, exchanges: &mut Vec<Exchange>) -> Encoded {
        let job = Arc::new(Job::new(exchanges, std::thread::current()));
        if job.units.is_empty() {
            return Encoded {
                payload: Payload::Records(Vec::new()),
                count: 0,
                unrecorded: Tally::default(),
            };
        }
        let posted = self.post(&job);
        let now = Instant::now();
        let help_from = match self.behind_until {
            Some(until) if now < until => now,
            _ => now + self.help_after,
        };
        let (encoded, helped) = self.complete(job, posted, help_from);
        if helped {
            self.behind_until = Some(Instant::now() + BEHIND_FOR);
        }
        encoded
    }

    /// Offers `job` to the background thread; false if there is none or its slot is busy.
    fn post(&self, job: &Arc<Job>) -> bool {
        let Some(worker) = &self.worker else {
            return false;
        };
        // Never wait for the background thread's lock: it may be preempted holding it.
        let Ok(mut slot) = self.shared.job.try_lock() else {
            return false;
        };
        *slot = Some(Arc::clone(job));
        drop(slot);
        worker.unpark();
        true
    }

    /// Waits for a posted job until `help_from`, then does what is left of it without
    /// waiting for the background thread again. Also returns whether it had to.
    fn complete(&self, job: Arc<Job>, posted: bool, help_from: Instant) -> (Encoded, bool) {
        if posted {
            while !job.complete.load(Ordering::Acquire) {
                let now = Instant::now();
                if now >= help_from {
                    break;
                }
                std::thread::park_timeout(help_from - now);
            }
        }
        let encoded = if job.complete.load(Ordering::Acquire) {
            // Released before `complete` was set, and nobody else takes it.
            job.result.lock().expect("job result").take()
        } else {
            None
        };
        let helped = encoded.is_none();
        let encoded = encoded.unwrap_or_else(|| {
            job.work_in_front(&self.own);
            job.assemble(None)
        });
        if posted {
            if let Ok(mut slot) = self.shared.job.try_lock() {
                if slot.as_ref().is_some_and(|j| Arc::ptr_eq(j, &job)) {
                    *slot = None;
                }
            }
        }
        (encoded, helped)
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(worker) = &self.worker {
            worker.unpark();
        }
    }
}

/// Lowers the calling thread to `SCHED_IDLE`; a refusal leaves it as it was (logged).
fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler reads the parameter it is given and changes only the
        // scheduling policy of the calling thread (pid 0).
        #[allow(unsafe_code)]
        let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if r != 0 {
            tracing::info!(error = %std::io::Error::last_os_error(), "proxy: the recorder's background thread could not be lowered to SCHED_IDLE; it runs at the normal policy");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{new_event, test_exchange, Unreadable};
    use keytrail_common::event::{Context, RawEvent};
    use std::borrow::Cow;
    use std::sync::Condvar;

    /// One validation per exchange, its license key the exchange's path; paths starting with
    /// `/skip` are unreadable. On the background thread it first waits for `gate`.
    #[derive(Default)]
    struct Gated {
        gate: Mutex<bool>,
        opened: Condvar,
        /// Exchanges seen on other threads; the gate opens at `open_at`.
        elsewhere: AtomicUsize,
        open_at: usize,
        on_worker: AtomicUsize,
    }

    impl Adapter for Gated {
        fn events<'a>(&self, ex: &'a Exchange) -> Result<Vec<RawEvent<'a>>, Unreadable> {
            if std::thread::current().name() == Some(THREAD_NAME) {
                self.on_worker.fetch_add(1, Ordering::SeqCst);
                let mut open = self.gate.lock().unwrap();
                while !*open {
                    open = self.opened.wait(open).unwrap();
                }
            } else if self.elsewhere.fetch_add(1, Ordering::SeqCst) + 1 == self.open_at {
                *self.gate.lock().unwrap() = true;
                self.opened.notify_all();
            }
            if ex.path.starts_with("/skip") {
                return Err(Unreadable("unknown_route", ex.path.clone()));
            }
            let mut e = new_event(ex, "license.validated");
            e.license_key = Some(Cow::Borrowed(&ex.path[1..]));
            e.result = Some(Cow::Borrowed("valid"));
            Ok(vec![e])
        }
    }

    impl Gated {
        /// One whose background-thread calls wait until [`Gated::open`].
        fn stalling() -> Gated {
            Gated {
                open_at: usize::MAX,
                ..Gated::default()
            }
        }

        fn open(&self) {
            *self.gate.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    /// An encoder over `adapter`, started, and the fingerprinter to read its events with.
    fn started(adapter: &Arc<Gated>) -> (Encoder, Fingerprinter) {
        let enc = encoding(adapter.clone());
        let fp = enc.fingerprinter.clone();
        (Encoder::start(enc, chunker()), fp)
    }

    fn encoding(adapter: Arc<dyn Adapter>) -> Encoding {
        Encoding {
            adapter,
            fingerprinter: Fingerprinter::new(b"test-secret".to_vec()),
            defaults: RecorderDefaults::new(
                "agent-1".into(),
                Context::default(),
                Arc::new(crate::ship::AgentClock::default()),
            ),
        }
    }

    fn chunker() -> Chunker {
        Chunker::for_tests(1000, 1 << 20, 3)
    }

    fn licenses_of(encoded: &Encoded, fp: &Fingerprinter) -> Vec<String> {
        let records = match &encoded.payload {
            Payload::Records(r) => r.clone(),
            Payload::Chunks(chunks) => chunks.iter().flat_map(|c| c.records_for_tests()).collect(),
        };
        let events = keytrail_common::wire::decode_payload(&records, "agent-1", 100_000).unwrap();
        let by_fingerprint: std::collections::HashMap<String, usize> =
            (0..1000).map(|i| (fp.license(&format!("key-{i}")), i)).collect();
        events
            .iter()
            .map(|e| format!("key-{}", by_fingerprint[e.license.as_ref().unwrap()]))
            .collect()
    }

    fn batch(n: usize) -> Vec<Exchange> {
        (0..n)
            .map(|i| {
                let path = if i % 10 == 9 {
                    format!("/skip-{i}")
                } else {
                    format!("/key-{i}")
                };
                test_exchange("POST", &path, &[], "{}", 200, "{}")
            })
            .collect()
    }

    fn expected(n: usize) -> Vec<String> {
        (0..n).filter(|i| i % 10 != 9).map(|i| format!("key-{i}")).collect()
    }

    #[test]
    fn batches_are_encoded_in_order_and_unrecorded_calls_tallied() {
        let adapter = Arc::new(Gated {
            gate: Mutex::new(true),
            ..Gated::default()
        });
        let (mut encoder, fp) = started(&adapter);
        for n in [1, 100, 0, 333] {
            let mut exchanges = batch(n);
            let encoded = encoder.encode(&mut exchanges);
            assert!(exchanges.is_empty());
            assert_eq!(licenses_of(&encoded, &fp), expected(n), "batch of {n}");
            assert_eq!(encoded.count as usize, expected(n).len());
            let skipped = (n / 10) as u64;
            let reasons = if skipped > 0 {
                vec![("unknown_route", skipped)]
            } else {
                vec![]
            };
            assert_eq!(encoded.unrecorded.reasons, reasons);
        }
    }

    #[test]
    fn a_stalled_background_thread_is_not_waited_for_and_nothing_is_counted_twice() {
        // The background thread stalls at its first exchange until the test opens the gate.
        let adapter = Arc::new(Gated::stalling());
        let (encoder, fp) = started(&adapter);
        let mut exchanges = batch(100);
        let job = Arc::new(Job::new(&mut exchanges, std::thread::current()));
        assert!(encoder.post(&job));
        let waited = Instant::now();
        while adapter.on_worker.load(Ordering::SeqCst) == 0 {
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "the background thread took the job"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // The recorder encodes units 1-3 and redoes unit 0, which the background thread holds.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (encoded, helped) = encoder.complete(job, true, Instant::now());
            assert!(helped);
            let _ = tx.send((encoder, encoded));
        });
        let (mut encoder, encoded) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the recorder finished without the stalled thread");
        assert_eq!(licenses_of(&encoded, &fp), expected(100));
        assert_eq!(encoded.unrecorded.reasons, vec![("unknown_route", 10)]);
        assert!(
            matches!(encoded.payload, Payload::Records(_)),
            "put together by the recorder"
        );
        assert_eq!(adapter.on_worker.load(Ordering::SeqCst), 1);
        assert_eq!(adapter.elsewhere.load(Ordering::SeqCst), 100);
        // Once let go, the background thread finishes its copy of unit 0 (dropped) and takes
        // the next batch.
        adapter.open();
        let mut exchanges = batch(50);
        assert_eq!(licenses_of(&encoder.encode(&mut exchanges), &fp), expected(50));
    }

    #[test]
    fn after_a_batch_it_had_to_help_with_the_recorder_helps_at_once() {
        let adapter = Arc::new(Gated::stalling());
        let (mut encoder, fp) = started(&adapter);
        assert!(encoder.behind_until.is_none());
        // The background thread stalls in the first batch: helped after HELP_AFTER.
        let mut exchanges = batch(40);
        assert_eq!(licenses_of(&encoder.encode(&mut exchanges), &fp), expected(40));
        let behind = encoder.behind_until.expect("behind after a helped batch");
        assert!(behind > Instant::now() + BEHIND_FOR / 2);
        // The next batch (the background thread still stalled) is helped from the start.
        let mut exchanges = batch(40);
        assert_eq!(licenses_of(&encoder.encode(&mut exchanges), &fp), expected(40));
        adapter.open();
    }

    #[test]
    fn without_a_background_thread_the_recorder_encodes_alone() {
        let adapter = Arc::new(Gated::default());
        let enc = encoding(adapter.clone());
        let fp = enc.fingerprinter.clone();
        let mut encoder = Encoder {
            own: enc,
            shared: Arc::default(),
            worker: None,
            help_after: HELP_AFTER,
            behind_until: None,
        };
        let mut exchanges = batch(70);
        let encoded = encoder.encode(&mut exchanges);
        assert!(matches!(encoded.payload, Payload::Records(_)));
        assert_eq!(licenses_of(&encoded, &fp), expected(70));
        assert_eq!(adapter.on_worker.load(Ordering::SeqCst), 0);
    }
}
