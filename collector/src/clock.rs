//! Agents' clocks. Every batch request carries the agent's clock at sending
//! (`x-keytrail-sent-at`, unix milliseconds); the collector's clock at arrival minus that is
//! the agent's **offset** (plus the request's transit time, milliseconds on a working network).
//!
//! Treatment (docs/reliability.md, "Clock trouble"):
//! - within ±[`TOLERANCE`] the agent's clock is trusted and event times are stored as sent;
//! - beyond it, every event time of the batch is shifted by the measured offset before it is
//!   stored — the time the event happened by the collector's clock, as analytics tools that
//!   take client timestamps do (receive time − (sent time − event time)). `expires_at` is the
//!   license server's statement and is not shifted;
//! - each agent's last offset is exported as `keytrail_collector_agent_clock_offset_seconds`,
//!   and crossing the tolerance (either way) is logged once per crossing.
//!
//! A resent frame is deduplicated before any of this matters: correction happens on the events
//! the store will keep, from the offset measured on the request that carried them.

use std::collections::BTreeMap;
use std::sync::Mutex;

use keytrail_common::time::{UnixNanos, NANOS_PER_SEC};

/// Largest offset trusted as is.
pub const TOLERANCE: UnixNanos = 60 * NANOS_PER_SEC;
/// Agents remembered; past this the map is cleared (ids are certificate names, but without
/// mTLS anyone can make them up).
const MAX_AGENTS: usize = 100_000;

#[derive(Debug, Default)]
pub struct Clocks {
    offsets: Mutex<BTreeMap<String, UnixNanos>>,
}

impl Clocks {
    /// Records the offset of `agent` from its `sent_at` header value (unix ms) at `now`, and
    /// returns the correction to add to its events' times (0 within the tolerance). A missing
    /// or unparsable header (an older agent) means no correction.
    pub fn observe(&self, agent: &str, sent_at: Option<&str>, now: UnixNanos) -> UnixNanos {
        let Some(ms) = sent_at.and_then(|v| v.trim().parse::<i64>().ok()) else {
            return 0;
        };
        let Some(sent) = ms.checked_mul(1_000_000) else {
            return 0;
        };
        let offset = now.saturating_sub(sent);
        let skewed = offset.abs() > TOLERANCE;
        let mut map = self.offsets.lock().expect("clock offsets");
        if map.len() >= MAX_AGENTS && !map.contains_key(agent) {
            map.clear();
        }
        let before = map.insert(agent.to_string(), offset);
        let was_skewed = before.is_some_and(|o| o.abs() > TOLERANCE);
        if skewed && !was_skewed {
            tracing::warn!(
                agent,
                offset_seconds = offset as f64 / NANOS_PER_SEC as f64,
                "an agent's clock is off; its event times are corrected by the measured offset"
            );
        } else if !skewed && was_skewed {
            tracing::info!(agent, "an agent's clock is back within tolerance");
        }
        if skewed {
            offset
        } else {
            0
        }
    }

    /// Each agent's last measured offset, seconds (collector clock − agent clock).
    pub fn offsets_seconds(&self) -> Vec<(String, f64)> {
        let map = self.offsets.lock().expect("clock offsets");
        map.iter()
            .map(|(a, o)| (a.clone(), *o as f64 / NANOS_PER_SEC as f64))
            .collect()
    }
}

/// Shifts event times by `correction`, saturating at the ends of the time range.
pub fn correct(events: &mut [keytrail_common::event::Event], correction: UnixNanos) {
    if correction == 0 {
        return;
    }
    for e in events {
        e.time = e.time.saturating_add(correction);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_within_tolerance_are_trusted_beyond_are_corrected() {
        let c = Clocks::default();
        let now = 1_800_000_000 * NANOS_PER_SEC;
        let ms = |ns: i64| (ns / 1_000_000).to_string();
        assert_eq!(c.observe("a", Some(&ms(now - 2 * NANOS_PER_SEC)), now), 0);
        let three_hours = 3 * 3600 * NANOS_PER_SEC;
        // Three hours ahead: events are moved three hours back.
        assert_eq!(c.observe("a", Some(&ms(now + three_hours)), now), -three_hours);
        // Behind: moved forward.
        assert_eq!(c.observe("b", Some(&ms(now - three_hours)), now), three_hours);
        assert_eq!(c.observe("c", None, now), 0);
        assert_eq!(c.observe("c", Some("yesterday"), now), 0);
        assert_eq!(c.observe("c", Some(&i64::MAX.to_string()), now), 0);
        let offsets = c.offsets_seconds();
        assert_eq!(offsets[0], ("a".to_string(), -10800.0));
        assert_eq!(offsets[1], ("b".to_string(), 10800.0));
        let mut events = vec![keytrail_common::event::Event::new(
            "x",
            keytrail_common::event::EventType::Validated,
            i64::MAX - 5,
            "a",
        )];
        correct(&mut events, 10);
        assert_eq!(events[0].time, i64::MAX);
    }
}
