//! Agent configuration: the TOML of contract §3, validated into [`AgentConfig`].
//!
//! Raw serde structs (`deny_unknown_fields`, so a misspelt key is an error naming it) are
//! turned into a typed config in one pass that collects every problem before failing. Command
//! line flags are applied by the caller through [`Overrides`] before validation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keytrail_common::config::{load_toml, parse_toml, ByteSize, HumanDuration};
use keytrail_common::event::{is_country_code, Context, Deployment};
use serde::Deserialize;

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub agent_id: Option<String>,
    #[serde(default)]
    pub context: RawContext,
    #[serde(default)]
    pub ingest: RawIngest,
    pub proxy: Option<RawProxy>,
    #[serde(default)]
    pub buffer: RawBuffer,
    #[serde(default)]
    pub ship: RawShip,
    #[serde(default)]
    pub privacy: RawPrivacy,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawContext {
    pub customer: Option<String>,
    pub product: Option<String>,
    pub region: Option<String>,
    pub country: Option<String>,
    pub deployment: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawIngest {
    pub listen: Option<String>,
    pub max_body_bytes: Option<ByteSize>,
    pub max_inflight_bytes: Option<ByteSize>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub adapter: Option<String>,
    pub upstream_ca: Option<PathBuf>,
    /// `[[proxy.routes]]`: the generic adapter's mapping.
    pub routes: Option<Vec<crate::proxy::generic::RawRoute>>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawBuffer {
    pub dir: Option<PathBuf>,
    pub max_bytes: Option<ByteSize>,
    pub when_full: Option<String>,
    pub cache_bytes: Option<ByteSize>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawShip {
    pub collector: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub batch_max_events: Option<u32>,
    pub batch_max_bytes: Option<ByteSize>,
    pub batch_timeout: Option<HumanDuration>,
    pub zstd_level: Option<i32>,
    pub backoff_max: Option<HumanDuration>,
    pub request_timeout: Option<HumanDuration>,
    pub stall_after: Option<HumanDuration>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawPrivacy {
    pub fingerprint_secret_file: Option<PathBuf>,
}

/// What to do when the disk cap is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// `/v1/events` answers 503 + `Retry-After`; nothing buffered is touched.
    Reject,
    /// The oldest unsent events are discarded (counted) to make room.
    DropOldest,
}

/// `[proxy]`: parsed and checked here; served by the proxy stage.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub upstream: String,
    pub adapter: String,
    /// CA file for an `https://` upstream; the system bundle when `None`.
    pub upstream_ca: Option<PathBuf>,
    /// The generic adapter's routes (empty for the vendor adapters).
    pub routes: Vec<crate::proxy::generic::Route>,
}

/// Where and how batches are shipped.
#[derive(Clone, Debug)]
pub struct ShipConfig {
    /// `https://host:port`.
    pub collector: String,
    pub ca: PathBuf,
    /// mTLS client certificate and key, when set.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub batch_max_events: u32,
    /// Uncompressed payload bytes per batch.
    pub batch_max_bytes: u64,
    pub batch_timeout: Duration,
    pub zstd_level: i32,
    /// Cap of the exponential backoff between retries.
    pub backoff_max: Duration,
    /// Whole-request timeout (connect, TLS, send, answer).
    pub request_timeout: Duration,
    /// Readiness turns red when nothing could be shipped for this long while data waits.
    pub stall_after: Duration,
}

/// The validated agent configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Explicit `agent_id`; `None` means the persisted one, else the host name.
    pub agent_id: Option<String>,
    pub context: Context,
    pub ingest_listen: SocketAddr,
    pub max_body_bytes: u64,
    /// Budget of request bytes being read, parsed or written at once; requests wait for room.
    pub max_inflight_bytes: u64,
    pub proxy: Option<ProxyConfig>,
    pub buffer_dir: PathBuf,
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub cache_bytes: u64,
    pub ship: ShipConfig,
    pub fingerprint_secret_file: PathBuf,
}

/// Command-line flags that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub collector: Option<String>,
    pub ingest_listen: Option<String>,
}

pub const DEFAULT_INGEST_LISTEN: &str = "127.0.0.1:7070";
pub const DEFAULT_BUFFER_DIR: &str = "/var/lib/keytrail/agent";

impl AgentConfig {
    /// Loads, overrides and validates; the error lists every problem found, one per line.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<AgentConfig, String> {
        let raw: RawConfig = match path {
            Some(p) => load_toml(p)?,
            None => RawConfig::default(),
        };
        Self::from_raw(raw, overrides).map_err(|errors| {
            let origin = path.map_or("configuration".to_string(), |p| format!("config {}", p.display()));
            format!("{origin}: {}", errors.join("; "))
        })
    }

    /// Parses TOML text (used by tests and `validate`).
    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        let raw: RawConfig = parse_toml(text)?;
        Self::from_raw(raw, &Overrides::default()).map_err(|e| e.join("; "))
    }

    fn from_raw(raw: RawConfig, o: &Overrides) -> Result<AgentConfig, Vec<String>> {
        let mut errors = Vec::new();
        let mut err = |e: String| errors.push(e);

        let agent_id = raw.agent_id.filter(|a| {
            let ok = !a.is_empty() && a.len() <= 256 && !a.chars().any(char::is_control);
            if !ok {
                err("agent_id must be 1-256 printable characters".into());
            }
            ok
        });

        let c = raw.context;
        let deployment = c.deployment.as_deref().and_then(|d| {
            let p = Deployment::parse(d);
            if p.is_none() {
                err(format!("context.deployment {d:?}: use cloud, on_prem or hybrid"));
            }
            p
        });
        let country = c.country.map(|x| x.to_ascii_uppercase()).filter(|x| {
            let ok = is_country_code(x);
            if !ok {
                err(format!(
                    "context.country {x:?}: use an ISO 3166-1 alpha-2 code such as DE"
                ));
            }
            ok
        });
        for (name, v) in [
            ("customer", &c.customer),
            ("product", &c.product),
            ("region", &c.region),
        ] {
            if v.as_ref().is_some_and(|s| s.len() > 256) {
                err(format!("context.{name} is longer than 256 bytes"));
            }
        }
        let context = Context {
            customer: c.customer,
            product: c.product,
            region: c.region,
            country,
            deployment,
        };

        let listen_text = o
            .ingest_listen
            .clone()
            .or(raw.ingest.listen)
            .unwrap_or_else(|| DEFAULT_INGEST_LISTEN.into());
        let ingest_listen = parse_addr("ingest.listen", &listen_text, &mut err);
        let max_body_bytes = raw.ingest.max_body_bytes.map_or(10 << 20, |b| b.0);
        if !(1024..=(256 << 20)).contains(&max_body_bytes) {
            err("ingest.max_body_bytes must be between 1KiB and 256MiB".into());
        }
        let max_inflight_bytes = raw.ingest.max_inflight_bytes.map_or(64 << 20, |b| b.0);
        if max_inflight_bytes < max_body_bytes {
            err("ingest.max_inflight_bytes must be at least ingest.max_body_bytes".into());
        }

        let proxy = raw.proxy.map(|p| {
            let listen = parse_addr(
                "proxy.listen",
                p.listen.as_deref().unwrap_or("127.0.0.1:7080"),
                &mut err,
            );
            let upstream = p.upstream.unwrap_or_default();
            if !(upstream.starts_with("http://") || upstream.starts_with("https://")) {
                err(format!("proxy.upstream {upstream:?}: use an http:// or https:// URL"));
            }
            let adapter = p.adapter.unwrap_or_else(|| "generic".into());
            if !["keygen", "lemonsqueezy", "gumroad", "generic"].contains(&adapter.as_str()) {
                err(format!(
                    "proxy.adapter {adapter:?}: use keygen, lemonsqueezy, gumroad or generic"
                ));
            }
            let mut routes = Vec::new();
            for (i, raw) in p.routes.iter().flatten().enumerate() {
                match crate::proxy::generic::Route::from_raw(i, raw) {
                    Ok(r) => routes.push(r),
                    Err(e) => err(e),
                }
            }
            if adapter == "generic" && p.routes.as_ref().is_none_or(|r| r.is_empty()) {
                err("proxy.adapter \"generic\" needs at least one [[proxy.routes]] (see deploy/config/agent-generic-proxy.example.toml)".into());
            }
            if adapter != "generic" && p.routes.is_some() {
                err(format!("proxy.routes: only the generic adapter takes routes (adapter is {adapter:?})"));
            }
            ProxyConfig {
                listen: listen.unwrap_or_else(|| ([127, 0, 0, 1], 7080).into()),
                upstream,
                adapter,
                upstream_ca: p.upstream_ca,
                routes,
            }
        });

        let b = raw.buffer;
        let buffer_dir = o
            .data_dir
            .clone()
            .or(b.dir)
            .unwrap_or_else(|| DEFAULT_BUFFER_DIR.into());
        let max_bytes = b.max_bytes.map_or(1 << 30, |s| s.0);
        if max_bytes < (1 << 20) {
            err("buffer.max_bytes must be at least 1MiB".into());
        }
        let when_full = match b.when_full.as_deref().unwrap_or("reject") {
            "reject" => WhenFull::Reject,
            "drop_oldest" => WhenFull::DropOldest,
            other => {
                err(format!("buffer.when_full {other:?}: use reject or drop_oldest"));
                WhenFull::Reject
            }
        };
        let cache_bytes = b.cache_bytes.map_or(8 << 20, |s| s.0);

        let s = raw.ship;
        let collector = o.collector.clone().or(s.collector).unwrap_or_default();
        if collector.is_empty() {
            err("ship.collector is required (https://host:port)".into());
        } else if !collector.starts_with("https://") {
            err(format!(
                "ship.collector {collector:?}: must be an https:// URL (batches always travel over TLS)"
            ));
        }
        let ca = s.ca.unwrap_or_default();
        if ca.as_os_str().is_empty() {
            err("ship.ca is required: the CA that signed the collector's certificate".into());
        }
        let client_cert = match (s.cert, s.key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                err("ship.cert and ship.key go together".into());
                None
            }
        };
        let batch_max_events = s.batch_max_events.unwrap_or(5000);
        if !(1..=1_000_000).contains(&batch_max_events) {
            err("ship.batch_max_events must be 1..=1000000".into());
        }
        let batch_max_bytes = s.batch_max_bytes.map_or(1 << 20, |b| b.0);
        if !(1024..=(16 << 20)).contains(&batch_max_bytes) {
            err("ship.batch_max_bytes must be between 1KiB and 16MiB".into());
        }
        let zstd_level = s.zstd_level.unwrap_or(3);
        if !(1..=19).contains(&zstd_level) {
            err("ship.zstd_level must be 1..=19".into());
        }
        let ship = ShipConfig {
            collector,
            ca,
            client_cert,
            batch_max_events,
            batch_max_bytes,
            batch_timeout: s.batch_timeout.map_or(Duration::from_secs(1), |d| d.0),
            zstd_level,
            backoff_max: s.backoff_max.map_or(Duration::from_secs(30), |d| d.0),
            request_timeout: s.request_timeout.map_or(Duration::from_secs(30), |d| d.0),
            stall_after: s.stall_after.map_or(Duration::from_secs(30), |d| d.0),
        };
        if ship.batch_timeout.is_zero() || ship.backoff_max.is_zero() || ship.request_timeout.is_zero() {
            err("ship durations must be greater than zero".into());
        }

        let fingerprint_secret_file = raw.privacy.fingerprint_secret_file.unwrap_or_default();
        if fingerprint_secret_file.as_os_str().is_empty() {
            err("privacy.fingerprint_secret_file is required: the HMAC key for license keys and machine ids".into());
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(AgentConfig {
            agent_id,
            context,
            ingest_listen: ingest_listen.expect("checked above"),
            max_body_bytes,
            max_inflight_bytes,
            proxy,
            buffer_dir,
            max_bytes,
            when_full,
            cache_bytes,
            ship,
            fingerprint_secret_file,
        })
    }

    /// Checks that every file the config names can be read and used (`validate`, and `run`
    /// before it binds anything).
    pub fn check_files(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if let Err(e) = keytrail_common::fingerprint::Fingerprinter::from_file(&self.fingerprint_secret_file) {
            errors.push(e);
        }
        let pair = self.ship.client_cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        if let Err(e) = keytrail_common::tls::client_config(&self.ship.ca, pair) {
            errors.push(e);
        }
        if let Some(p) = &self.proxy {
            if p.upstream.starts_with("https://") {
                if let Err(e) = keytrail_common::tls::upstream_client_config(p.upstream_ca.as_deref()) {
                    errors.push(e);
                }
            }
            if let Err(e) = crate::proxy::adapter(p) {
                errors.push(e);
            }
            if let Err(e) = crate::proxy::Upstream::parse(&p.upstream) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

fn parse_addr(name: &str, text: &str, err: &mut impl FnMut(String)) -> Option<SocketAddr> {
    match text.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            err(format!("{name} {text:?}: expected ip:port, e.g. 127.0.0.1:7070"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [ship]
        collector = "https://localhost:7443"
        ca = "/x/ca.crt"
        [privacy]
        fingerprint_secret_file = "/x/secret"
    "#;

    #[test]
    fn defaults_fill_in() {
        let c = AgentConfig::parse(MINIMAL).unwrap();
        assert_eq!(c.ingest_listen.to_string(), "127.0.0.1:7070");
        assert_eq!(c.max_bytes, 1 << 30);
        assert_eq!(c.when_full, WhenFull::Reject);
        assert_eq!(c.ship.batch_max_events, 5000);
        assert_eq!(c.ship.batch_timeout, Duration::from_secs(1));
        assert!(c.proxy.is_none());
    }

    #[test]
    fn inflight_budget_must_hold_one_whole_body() {
        let c = AgentConfig::parse(MINIMAL).unwrap();
        assert_eq!((c.max_body_bytes, c.max_inflight_bytes), (10 << 20, 64 << 20));
        let err = AgentConfig::parse(&format!(
            "{MINIMAL}\n[ingest]\nmax_body_bytes = \"8MiB\"\nmax_inflight_bytes = \"4MiB\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("max_inflight_bytes"), "{err}");
    }

    #[test]
    fn every_problem_is_named() {
        let err = AgentConfig::parse(
            r#"
            [context]
            deployment = "moon"
            country = "Germany"
            [buffer]
            when_full = "explode"
            [ship]
            collector = "http://plain:80"
            ca = "/x"
            zstd_level = 99
        "#,
        )
        .unwrap_err();
        for needle in [
            "context.deployment",
            "context.country",
            "when_full",
            "https://",
            "zstd_level",
            "fingerprint",
        ] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
        let err = AgentConfig::parse(&format!("{MINIMAL}\n[buffer]\nwhen_ful = \"x\"\n")).unwrap_err();
        assert!(err.contains("when_ful"), "{err}");
        let err = AgentConfig::parse(&format!(
            "{MINIMAL}\n[proxy]\nupstream = \"http://a\"\nadapter = \"generic\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("needs at least one [[proxy.routes]]"), "{err}");
        let err = AgentConfig::parse(&format!(
            "{MINIMAL}\n[proxy]\nupstream = \"http://a\"\nadapter = \"keygen\"\n[[proxy.routes]]\npath = \"/x\"\ntype = \"license.validated\"\nfields = {{ license = \"const:a\" }}\n"
        ))
        .unwrap_err();
        assert!(err.contains("only the generic adapter takes routes"), "{err}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/config/agent.example.toml");

    #[test]
    fn the_example_config_parses_with_every_key() {
        let c = AgentConfig::parse(EXAMPLE).unwrap();
        assert_eq!(c.agent_id.as_deref(), Some("acme-prod-eu-1"));
        assert_eq!(c.context.deployment, Some(Deployment::OnPrem));
        assert_eq!(c.max_bytes, 1 << 30);
        assert_eq!(c.ship.batch_max_events, 5000);
        assert!(c.ship.client_cert.is_some());
        // The commented [proxy] section parses too once uncommented.
        let with_proxy = EXAMPLE
            .replace("# [proxy]", "[proxy]")
            .replace("# listen   =", "listen =")
            .replace("# upstream =", "upstream =")
            .replace("# adapter  =", "adapter =")
            .replace("# upstream_ca =", "upstream_ca =");
        let c = AgentConfig::parse(&with_proxy).unwrap();
        let p = c.proxy.unwrap();
        assert_eq!(p.adapter, "keygen");
        assert!(p.upstream_ca.is_some());
    }

    #[test]
    fn the_generic_proxy_example_parses_and_maps_its_worked_example() {
        let c = AgentConfig::parse(include_str!("../../deploy/config/agent-generic-proxy.example.toml")).unwrap();
        let p = c.proxy.unwrap();
        assert_eq!((p.adapter.as_str(), p.routes.len()), ("generic", 3));
        let adapter = crate::proxy::adapter(&p).unwrap();
        let ex = crate::proxy::test_exchange;
        let values = |x: crate::proxy::Exchange| -> Vec<serde_json::Value> {
            let events = adapter.events(&x).unwrap();
            events.into_iter().map(|e| serde_json::to_value(e).unwrap()).collect()
        };
        let resp = r#"{"license":{"tier":"gold","state":"lapsed","seats":{"used":4,"max":5},"expires":"2027-01-01T00:00:00Z"}}"#;
        let v = values(ex(
            "POST",
            "/api/v2/licenses/L-9/verify",
            &[],
            r#"{"key":"K","device":"d1"}"#,
            200,
            resp,
        ));
        assert_eq!(
            v[0],
            serde_json::json!({"type":"license.validated","time":1_764_000_000_000i64,"license_key":"K","machine":"d1",
                "plan":"gold","seats_used":4,"seats_limit":5,"expires_at":"2027-01-01T00:00:00Z",
                "attrs":{"acme_license_id":"L-9"},"result":"expired"})
        );
        let v = values(ex(
            "POST",
            "/api/v2/activations",
            &[],
            "license_key=K&device=d2",
            409,
            r#"{"reason":"seat_limit"}"#,
        ));
        assert_eq!(
            (v[0]["type"].as_str(), v[0]["result"].as_str()),
            (Some("license.activated"), Some("limit_exceeded"))
        );
        let v = values(ex(
            "DELETE",
            "/api/v2/activations/d2",
            &[("x-license-key", "K")],
            "",
            204,
            "",
        ));
        assert_eq!(
            (v[0]["type"].as_str(), v[0]["machine"].as_str(), v[0]["result"].as_str()),
            (Some("license.deactivated"), Some("d2"), Some("valid"))
        );
    }
}
