//! Agents' clocks, watched. Every request an agent sends carries its clock at sending
//! (`x-keytrail-sent-at`, unix milliseconds), and every answer of the receive port carries the
//! collector's (`x-keytrail-received-at`). The agent corrects the times it stamps itself from
//! the answers (agent `ship::AgentClock`); here the collector keeps each agent's **offset**
//! (collector clock at arrival − agent clock at sending, transit time included), exports it as
//! `keytrail_collector_agent_clock_offset_seconds`, and logs when an agent crosses
//! ±[`TOLERANCE`] either way, so operators see clocks that need fixing. Event times are
//! stored as the agent sent them (docs/reliability.md, "Clock trouble").

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
    /// Records the offset of `agent` from its `sent_at` header value (unix ms) at `now`. A
    /// missing or unparsable header (an older agent) records nothing.
    pub fn observe(&self, agent: &str, sent_at: Option<&str>, now: UnixNanos) {
        let Some(ms) = sent_at.and_then(|v| v.trim().parse::<i64>().ok()) else {
            return;
        };
        let Some(sent) = ms.checked_mul(1_000_000) else {
            return;
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
                "an agent's clock is off; the agent corrects the times it stamps, times its clients send are kept"
            );
        } else if !skewed && was_skewed {
            tracing::info!(agent, "an agent's clock is back within tolerance");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_measured_per_agent() {
        let c = Clocks::default();
        let now = 1_800_000_000 * NANOS_PER_SEC;
        let ms = |ns: i64| (ns / 1_000_000).to_string();
        let three_hours = 3 * 3600 * NANOS_PER_SEC;
        c.observe("a", Some(&ms(now - 2 * NANOS_PER_SEC)), now);
        // Three hours ahead: a negative offset (collector minus agent).
        c.observe("b", Some(&ms(now + three_hours)), now);
        c.observe("c", Some(&ms(now - three_hours)), now);
        c.observe("d", None, now);
        c.observe("d", Some("yesterday"), now);
        c.observe("d", Some(&i64::MAX.to_string()), now);
        let offsets = c.offsets_seconds();
        assert_eq!(
            offsets,
            vec![
                ("a".to_string(), 2.0),
                ("b".to_string(), -10800.0),
                ("c".to_string(), 10800.0)
            ]
        );
    }
}
