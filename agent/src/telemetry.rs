//! The agent's counters and gauges (contract §8 names), shared by every stage.

use keytrail_common::prom::{Counter, Gauge, LabeledCounter, Page};

/// Every number the agent exposes on `/metrics` and `/v1/status`.
#[derive(Debug)]
pub struct AgentMetrics {
    /// Events accepted into the buffer (acknowledged).
    pub received: Counter,
    /// Events the collector acknowledged.
    pub sent: Counter,
    /// `{stage, error_type}`: failures that did not lose data by themselves.
    pub errors: LabeledCounter,
    pub buffer_events: Gauge,
    pub buffer_bytes: Gauge,
    /// `{reason}`: events that will never reach the collector.
    pub discarded: LabeledCounter,
    /// `{outcome}`: `ok`, `duplicate`, `retry`, `dead_letter`.
    pub ship_batches: LabeledCounter,
    /// Ingest requests by answer code.
    pub requests: LabeledCounter,
    /// Events the proxy recorded (also counted in `received`).
    pub proxy_recorded: Counter,
    /// `{reason}`: proxied exchanges (or their events) that could not be recorded; the
    /// requests themselves went through.
    pub proxy_unrecorded: LabeledCounter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            received: Counter::default(),
            sent: Counter::default(),
            errors: LabeledCounter::new(&["stage", "error_type"]),
            buffer_events: Gauge::default(),
            buffer_bytes: Gauge::default(),
            discarded: LabeledCounter::new(&["reason"]),
            ship_batches: LabeledCounter::new(&["outcome"]),
            requests: LabeledCounter::new(&["code"]),
            proxy_recorded: Counter::default(),
            proxy_unrecorded: LabeledCounter::new(&["reason"]),
        }
    }
}

impl AgentMetrics {
    /// The Prometheus page; `oldest_age_seconds` is read from the buffer by the caller.
    pub fn render(&self, oldest_age_seconds: f64) -> String {
        let mut p = Page::default();
        p.counter(
            "keytrail_component_received_events_total",
            "Events accepted and durably buffered.",
            self.received.get(),
        )
        .counter(
            "keytrail_component_sent_events_total",
            "Events acknowledged by the collector.",
            self.sent.get(),
        )
        .labeled(
            "keytrail_component_errors_total",
            "Errors by stage and type.",
            &self.errors,
            &[&["ingest", "invalid_request"], &["ship", "request_failed"]],
        )
        .gauge(
            "keytrail_buffer_size_events",
            "Events buffered and not yet acknowledged.",
            self.buffer_events.get() as f64,
        )
        .gauge(
            "keytrail_buffer_size_bytes",
            "Bytes of buffered records (pending, sealed, dead letters).",
            self.buffer_bytes.get() as f64,
        )
        .labeled(
            "keytrail_buffer_discarded_events_total",
            "Events that will never be shipped, by reason.",
            &self.discarded,
            &[&["drop_oldest"], &["corrupt"], &["dead_letter_overflow"]],
        )
        .gauge(
            "keytrail_buffer_oldest_event_age_seconds",
            "Seconds since the oldest buffered event arrived.",
            oldest_age_seconds,
        )
        .labeled(
            "keytrail_ship_batches_total",
            "Batch send attempts by outcome.",
            &self.ship_batches,
            &[&["ok"], &["retry"], &["dead_letter"]],
        )
        .labeled(
            "keytrail_ingest_requests_total",
            "Local API event requests by status code.",
            &self.requests,
            &[],
        )
        .counter(
            "keytrail_proxy_recorded_events_total",
            "Events recorded from proxied license calls.",
            self.proxy_recorded.get(),
        )
        .labeled(
            "keytrail_proxy_unrecorded_total",
            "Proxied license calls (or their events) not recorded, by reason; the calls went through.",
            &self.proxy_unrecorded,
            &crate::proxy::UNRECORDED_REASONS,
        );
        p.finish()
    }
}
