//! The collector's own counters (contract §8 names); the receive totals live in the store so
//! they survive restarts.

use keytrail_common::prom::{LabeledCounter, Page};

use crate::store::Store;

#[derive(Debug)]
pub struct CollectorMetrics {
    /// `{stage, error_type}`.
    pub errors: LabeledCounter,
    /// `{outcome}`: `stored`, `duplicate`, `rejected`, `failed`.
    pub batches: LabeledCounter,
    /// Each agent's clock offset, measured on its requests.
    pub clocks: crate::clock::Clocks,
}

impl Default for CollectorMetrics {
    fn default() -> Self {
        CollectorMetrics {
            errors: LabeledCounter::new(&["stage", "error_type"]),
            batches: LabeledCounter::new(&["outcome"]),
            clocks: crate::clock::Clocks::default(),
        }
    }
}

impl CollectorMetrics {
    pub fn render(&self, store: &Store) -> String {
        let c: std::collections::BTreeMap<_, _> = store.counters().into_iter().collect();
        let mut p = Page::default();
        p.counter(
            "keytrail_component_received_events_total",
            "Events received from agents, duplicates included.",
            c["events_received"],
        )
        .counter(
            "keytrail_collector_stored_events_total",
            "Unique events stored.",
            c["events_stored"],
        )
        .counter(
            "keytrail_collector_duplicates_total",
            "Duplicate events acknowledged and not stored.",
            c["duplicates_dropped"],
        )
        .counter(
            "keytrail_collector_batches_received_total",
            "Batches received, retries included.",
            c["batches_received"],
        )
        .labeled(
            "keytrail_collector_batches_total",
            "Batch requests by outcome.",
            &self.batches,
            &[&["stored"], &["duplicate"], &["rejected"]],
        )
        .labeled(
            "keytrail_component_errors_total",
            "Errors by stage and type.",
            &self.errors,
            &[&["receive", "invalid_frame"], &["receive", "tls_handshake"]],
        )
        .gauge(
            "keytrail_collector_agents",
            "Agents that have sent at least one batch.",
            store.agents().len() as f64,
        )
        .labeled_gauge(
            "keytrail_collector_agent_clock_offset_seconds",
            "Collector clock minus the agent's clock, measured on its last request.",
            "agent_id",
            &self.clocks.offsets_seconds(),
        );
        let a = store.analytics_stats();
        p.gauge(
            "keytrail_analytics_licenses",
            "Licenses the analytics hold state for.",
            a.licenses as f64,
        )
        .gauge(
            "keytrail_analytics_cells",
            "Per-(day, license, variant) rollup cells held.",
            a.cells as f64,
        )
        .counter(
            "keytrail_analytics_inexact_events_total",
            "Late events placed without their successor (purged by retention) since start.",
            a.inexact_events,
        );
        p.finish()
    }
}
