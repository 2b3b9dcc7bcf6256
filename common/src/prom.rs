//! Minimal Prometheus text-format metrics: counters, gauges and labelled counters backed by
//! atomics, rendered on demand. Names follow contract §8.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// A monotonically increasing count.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Default, Debug)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, v: i64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A counter family keyed by label values (few, fixed label sets: reasons, outcomes).
#[derive(Debug)]
pub struct LabeledCounter {
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl LabeledCounter {
    pub fn new(labels: &'static [&'static str]) -> Self {
        LabeledCounter {
            labels,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn add(&self, label_values: &[&str], n: u64) {
        debug_assert_eq!(label_values.len(), self.labels.len());
        let key: Vec<String> = label_values.iter().map(|s| s.to_string()).collect();
        *self.values.lock().expect("metrics lock").entry(key).or_default() += n;
    }

    /// Sum over every label set.
    pub fn total(&self) -> u64 {
        self.values.lock().expect("metrics lock").values().sum()
    }

    /// Value of one label set.
    pub fn get(&self, label_values: &[&str]) -> u64 {
        let key: Vec<String> = label_values.iter().map(|s| s.to_string()).collect();
        self.values
            .lock()
            .expect("metrics lock")
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// `(labels, value)` pairs, for JSON status pages.
    pub fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        self.values
            .lock()
            .expect("metrics lock")
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// Builds one exposition page.
#[derive(Default)]
pub struct Page(String);

impl Page {
    fn head(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.head(name, help, "counter");
        let _ = writeln!(self.0, "{name} {value}");
        self
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.head(name, help, "gauge");
        let _ = writeln!(self.0, "{name} {value}");
        self
    }

    /// A labelled family; `fixed` labels (e.g. `component`) are prepended to every sample, and
    /// `always` label sets are shown as 0 when never counted, so dashboards see them.
    pub fn labeled(&mut self, name: &str, help: &str, family: &LabeledCounter, always: &[&[&str]]) -> &mut Self {
        self.head(name, help, "counter");
        let mut values: BTreeMap<Vec<String>, u64> = family.snapshot().into_iter().collect();
        for set in always {
            values.entry(set.iter().map(|s| s.to_string()).collect()).or_insert(0);
        }
        for (k, v) in values {
            let labels: Vec<String> = family
                .labels
                .iter()
                .zip(k.iter())
                .map(|(l, v)| format!("{l}=\"{}\"", escape(v)))
                .collect();
            let _ = writeln!(self.0, "{name}{{{}}} {v}", labels.join(","));
        }
        self
    }

    /// A gauge family with one label, one sample per value.
    pub fn labeled_gauge(&mut self, name: &str, help: &str, label: &str, samples: &[(String, f64)]) -> &mut Self {
        self.head(name, help, "gauge");
        for (v, x) in samples {
            let _ = writeln!(self.0, "{name}{{{label}=\"{}\"}} {x}", escape(v));
        }
        self
    }

    pub fn finish(self) -> String {
        self.0
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families() {
        let f = LabeledCounter::new(&["reason"]);
        f.add(&["drop_oldest"], 3);
        let mut p = Page::default();
        p.counter("a_total", "a", 1)
            .labeled("b_total", "b", &f, &[&["buffer_full"]]);
        let text = p.finish();
        assert!(text.contains("a_total 1\n"));
        assert!(text.contains("b_total{reason=\"drop_oldest\"} 3\n"));
        assert!(text.contains("b_total{reason=\"buffer_full\"} 0\n"));
        assert_eq!(f.total(), 3);
    }
}
