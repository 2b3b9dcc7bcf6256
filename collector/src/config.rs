//! Collector configuration: the TOML of contract §3, validated into [`CollectorConfig`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keytrail_common::config::{load_toml, parse_toml, ByteSize, HumanDuration};
use serde::Deserialize;

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    #[serde(default)]
    receive: RawReceive,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    store: RawStore,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct RawReceive {
    listen: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    max_batch_bytes: Option<ByteSize>,
    max_batch_events: Option<u32>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    dedup_window: Option<HumanDuration>,
    raw_events: Option<HumanDuration>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct RawStore {
    cache_bytes: Option<ByteSize>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    pub price_monthly: Option<f64>,
    pub seats: Option<u64>,
    pub domains: Option<u64>,
    pub machines: Option<u64>,
}

/// One entry of the plan catalog (`[plans.<name>]`).
pub type Plan = RawPlan;

/// The validated collector configuration.
#[derive(Clone, Debug)]
pub struct CollectorConfig {
    pub data_dir: PathBuf,
    pub receive_listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: agents must present a certificate signed by it; their id is its CN.
    pub client_ca: Option<PathBuf>,
    /// Largest batch payload after decompression.
    pub max_batch_bytes: u64,
    pub max_batch_events: u32,
    pub api_listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    pub dedup_window: Duration,
    pub raw_events: Duration,
    pub cache_bytes: u64,
    pub plans: BTreeMap<String, Plan>,
}

/// Command-line flags that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub api_listen: Option<String>,
}

impl CollectorConfig {
    pub fn load(path: Option<&Path>, o: &Overrides) -> Result<CollectorConfig, String> {
        let raw: RawConfig = match path {
            Some(p) => load_toml(p)?,
            None => RawConfig::default(),
        };
        Self::from_raw(raw, o).map_err(|errors| {
            let origin = path.map_or("configuration".to_string(), |p| format!("config {}", p.display()));
            format!("{origin}: {}", errors.join("; "))
        })
    }

    pub fn parse(text: &str) -> Result<CollectorConfig, String> {
        let raw: RawConfig = parse_toml(text)?;
        Self::from_raw(raw, &Overrides::default()).map_err(|e| e.join("; "))
    }

    fn from_raw(raw: RawConfig, o: &Overrides) -> Result<CollectorConfig, Vec<String>> {
        let mut errors = Vec::new();
        let mut addr = |name: &str, text: String| match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errors.push(format!("{name} {text:?}: expected ip:port, e.g. 0.0.0.0:7443"));
                None
            }
        };
        let receive_listen = addr(
            "receive.listen",
            o.listen
                .clone()
                .or(raw.receive.listen)
                .unwrap_or_else(|| "0.0.0.0:7443".into()),
        );
        let api_listen = addr(
            "api.listen",
            o.api_listen
                .clone()
                .or(raw.api.listen)
                .unwrap_or_else(|| "127.0.0.1:7444".into()),
        );
        let cert = raw.receive.cert.unwrap_or_default();
        let key = raw.receive.key.unwrap_or_default();
        if cert.as_os_str().is_empty() || key.as_os_str().is_empty() {
            errors.push("receive.cert and receive.key are required: agents always connect over TLS".into());
        }
        let max_batch_bytes = raw.receive.max_batch_bytes.map_or(16 << 20, |b| b.0);
        if !((64 << 10)..=(256 << 20)).contains(&max_batch_bytes) {
            errors.push("receive.max_batch_bytes must be between 64KiB and 256MiB".into());
        }
        let max_batch_events = raw.receive.max_batch_events.unwrap_or(1_000_000);
        if max_batch_events == 0 {
            errors.push("receive.max_batch_events must be at least 1".into());
        }
        let dedup_window = raw
            .retention
            .dedup_window
            .map_or(Duration::from_secs(30 * 86400), |d| d.0);
        let raw_events = raw
            .retention
            .raw_events
            .map_or(Duration::from_secs(90 * 86400), |d| d.0);
        if dedup_window.is_zero() || raw_events.is_zero() {
            errors.push("retention windows must be greater than zero".into());
        }
        for (name, plan) in &raw.plans {
            if plan.price_monthly.is_some_and(|p| !p.is_finite() || p < 0.0) {
                errors.push(format!("plans.{name}.price_monthly must be a number >= 0"));
            }
            if name.is_empty() || name.len() > 256 {
                errors.push(format!("plan name {name:?} must be 1-256 bytes"));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CollectorConfig {
            data_dir: o
                .data_dir
                .clone()
                .or(raw.data_dir)
                .unwrap_or_else(|| "/var/lib/keytrail/collector".into()),
            receive_listen: receive_listen.expect("checked"),
            cert,
            key,
            client_ca: raw.receive.client_ca,
            max_batch_bytes,
            max_batch_events,
            api_listen: api_listen.expect("checked"),
            token_file: raw.api.token_file,
            dedup_window,
            raw_events,
            cache_bytes: raw.store.cache_bytes.map_or(64 << 20, |b| b.0),
            plans: raw.plans,
        })
    }

    /// Reads the analyst token, if one is configured (trimmed; empty is an error).
    pub fn read_token(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| format!("api.token_file {}: {e}", path.display()))?;
        let token = text.trim().to_string();
        if token.is_empty() || token.len() > 4096 {
            return Err(format!(
                "api.token_file {}: the token must be 1-4096 bytes",
                path.display()
            ));
        }
        Ok(Some(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plans_and_defaults() {
        let c = CollectorConfig::parse(
            r#"
            [receive]
            cert = "/c"
            key = "/k"
            [plans.pro]
            price_monthly = 49.0
            seats = 10
        "#,
        )
        .unwrap();
        assert_eq!(c.plans["pro"].price_monthly, Some(49.0));
        assert_eq!(c.dedup_window, Duration::from_secs(30 * 86400));
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:7444");
        let err = CollectorConfig::parse("[receive]\ncert = \"/c\"\nkey = \"/k\"\nclientca = \"x\"\n").unwrap_err();
        assert!(err.contains("clientca"), "{err}");
        let err = CollectorConfig::parse("[plans.x]\nprice_monthly = -1.0\n").unwrap_err();
        assert!(err.contains("price_monthly") && err.contains("receive.cert"), "{err}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_example_config_parses_with_every_key() {
        let c = CollectorConfig::parse(include_str!("../../deploy/config/collector.example.toml")).unwrap();
        assert!(c.client_ca.is_some() && c.token_file.is_some());
        assert_eq!(c.raw_events, Duration::from_secs(90 * 86400));
        assert_eq!(c.plans["enterprise"].seats, Some(100));
    }
}
