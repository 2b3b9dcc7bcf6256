//! The license event: the domain type every stage passes around, and the validation of the
//! ingest JSON of contract §5 into it.
//!
//! Owns: field names, limits, the event types and results, and turning a request body (object,
//! array or NDJSON) into validated [`Event`]s with errors that name the field and the event's
//! index. Pseudonymisation happens here too, through [`Fingerprinter`], so a raw license key or
//! machine id never leaves this module inside an `Event`.
//!
//! Does not own: bytes on disk or on the wire (see `wire`), defaults that depend on the agent
//! (context stamping and id generation are done through [`IngestDefaults`] supplied by the
//! caller).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::fingerprint::Fingerprinter;
use crate::time::{format_rfc3339, parse_rfc3339_ns, UnixNanos};

/// Longest `id` accepted (bytes).
pub const MAX_ID_LEN: usize = 128;
/// Longest `license` accepted (bytes).
pub const MAX_LICENSE_LEN: usize = 128;
/// Longest value of the other string fields (bytes).
pub const MAX_STRING_LEN: usize = 256;
/// Most entries in `attrs`.
pub const MAX_ATTRS: usize = 32;
/// Longest raw `license_key` accepted before hashing (it is a credential, but not a novel).
pub const MAX_LICENSE_KEY_LEN: usize = 4096;
/// Event times the agent accepts: 2000-01-01T00:00:00Z inclusive to 2100-01-01T00:00:00Z
/// exclusive. Outside that, a time is a unit mistake (unix seconds read as milliseconds lands
/// in January 1970) or a broken clock, and would put the event outside every dashboard window;
/// the request is refused (400) so the sender sees it. `expires_at` has no such bound
/// (perpetual licenses carry far-future expiries).
pub const EARLIEST_EVENT_TIME: UnixNanos = 946_684_800 * 1_000_000_000;
pub const LATEST_EVENT_TIME: UnixNanos = 4_102_444_800 * 1_000_000_000;

/// Integer times are unix milliseconds; this bounds them to what fits in i64 nanoseconds.
const MAX_UNIX_MS: i64 = i64::MAX / 1_000_000;

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in declaration order (which is also the wire tag order).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The contract's spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the contract's spelling.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }

            /// Stable numeric tag used by the wire and storage codecs.
            pub fn tag(self) -> u8 {
                self as u8
            }

            /// Inverse of [`Self::tag`].
            pub fn from_tag(tag: u8) -> Option<Self> {
                Self::ALL.get(tag as usize).copied()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// `type` of an event (contract §5). Append only: the position is the wire tag.
    EventType {
        Issued => "license.issued",
        Assigned => "license.assigned",
        Activated => "license.activated",
        Deactivated => "license.deactivated",
        Validated => "license.validated",
        Renewed => "license.renewed",
        Upgraded => "license.upgraded",
        Downgraded => "license.downgraded",
        Expired => "license.expired",
        Suspended => "license.suspended",
        Reinstated => "license.reinstated",
        Revoked => "license.revoked",
        FeatureChecked => "feature.checked",
        PaymentSucceeded => "payment.succeeded",
        PaymentFailed => "payment.failed",
        SupportTicketOpened => "support.ticket_opened",
        SupportTicketClosed => "support.ticket_closed",
    }
);

impl EventType {
    /// `license.*` and `feature.*` events must name a license.
    pub fn requires_license(self) -> bool {
        let s = self.as_str();
        s.starts_with("license.") || s.starts_with("feature.")
    }
}

string_enum!(
    /// `result` of an event (contract §5). Append only: the position is the wire tag.
    ResultCode {
        Valid => "valid",
        Expired => "expired",
        Suspended => "suspended",
        Revoked => "revoked",
        NotFound => "not_found",
        InvalidFormat => "invalid_format",
        DomainMismatch => "domain_mismatch",
        LimitExceeded => "limit_exceeded",
        RateLimited => "rate_limited",
        FeatureDenied => "feature_denied",
        Overdue => "overdue",
        Error => "error",
    }
);

string_enum!(
    /// `deployment` of the product instance that produced the event.
    Deployment {
        Cloud => "cloud",
        OnPrem => "on_prem",
        Hybrid => "hybrid",
    }
);

/// Usage figures reported by a license server, all optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub seats_used: Option<u64>,
    pub seats_limit: Option<u64>,
    pub domains_used: Option<u64>,
    pub domains_limit: Option<u64>,
    pub machines_used: Option<u64>,
    pub machines_limit: Option<u64>,
}

impl Usage {
    /// `[seats_used, seats_limit, domains_used, domains_limit, machines_used, machines_limit]`:
    /// the order of every binary encoding of the figures.
    pub fn to_array(&self) -> [Option<u64>; 6] {
        [
            self.seats_used,
            self.seats_limit,
            self.domains_used,
            self.domains_limit,
            self.machines_used,
            self.machines_limit,
        ]
    }

    /// The inverse of [`Usage::to_array`].
    pub fn from_array(u: [Option<u64>; 6]) -> Usage {
        Usage {
            seats_used: u[0],
            seats_limit: u[1],
            domains_used: u[2],
            domains_limit: u[3],
            machines_used: u[4],
            machines_limit: u[5],
        }
    }
}

/// A validated, pseudonymised license event. Never holds a raw license key or machine id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Idempotency key: the collector counts an id once.
    pub id: String,
    pub event_type: EventType,
    /// When it happened, unix nanoseconds UTC.
    pub time: UnixNanos,
    /// The agent that recorded it.
    pub agent_id: String,
    /// The license: a pseudonym (`lk_…`) or a non-secret id given as-is.
    pub license: Option<String>,
    pub customer: Option<String>,
    pub product: Option<String>,
    pub plan: Option<String>,
    pub previous_plan: Option<String>,
    pub region: Option<String>,
    pub user: Option<String>,
    pub domain: Option<String>,
    pub version: Option<String>,
    pub feature: Option<String>,
    /// Machine pseudonym (`mf_…`).
    pub machine: Option<String>,
    /// ISO 3166-1 alpha-2, upper case.
    pub country: Option<String>,
    pub deployment: Option<Deployment>,
    pub result: ResultCode,
    pub expires_at: Option<UnixNanos>,
    pub usage: Usage,
    /// Sorted by key, unique keys.
    pub attrs: Vec<(String, String)>,
}

impl Event {
    /// An event with only its required parts set: result `valid`, every optional field empty.
    pub fn new(id: impl Into<String>, event_type: EventType, time: UnixNanos, agent_id: impl Into<String>) -> Event {
        Event {
            id: id.into(),
            event_type,
            time,
            agent_id: agent_id.into(),
            license: None,
            customer: None,
            product: None,
            plan: None,
            previous_plan: None,
            region: None,
            user: None,
            domain: None,
            version: None,
            feature: None,
            machine: None,
            country: None,
            deployment: None,
            result: ResultCode::Valid,
            expires_at: None,
            usage: Usage::default(),
            attrs: Vec::new(),
        }
    }

    /// Re-checks the limits of a decoded event (the collector does not trust its peers' encoders).
    pub fn check_limits(&self) -> Result<(), String> {
        let check = |name: &str, v: &Option<String>, max: usize| match v {
            Some(s) if s.len() > max => Err(format!("{name} longer than {max} bytes")),
            _ => Ok(()),
        };
        if self.id.is_empty() || self.id.len() > MAX_ID_LEN {
            return Err(format!("id must be 1..={MAX_ID_LEN} bytes"));
        }
        if self.agent_id.is_empty() || self.agent_id.len() > MAX_STRING_LEN {
            return Err(format!("agent_id must be 1..={MAX_STRING_LEN} bytes"));
        }
        check("license", &self.license, MAX_LICENSE_LEN)?;
        for (name, v) in [
            ("customer", &self.customer),
            ("product", &self.product),
            ("plan", &self.plan),
            ("previous_plan", &self.previous_plan),
            ("region", &self.region),
            ("user", &self.user),
            ("domain", &self.domain),
            ("version", &self.version),
            ("feature", &self.feature),
            ("machine", &self.machine),
        ] {
            check(name, v, MAX_STRING_LEN)?;
        }
        if let Some(c) = &self.country {
            if !is_country_code(c) {
                return Err("country is not an upper-case ISO 3166-1 alpha-2 code".into());
            }
        }
        if self.attrs.len() > MAX_ATTRS {
            return Err(format!("attrs has more than {MAX_ATTRS} entries"));
        }
        for (k, v) in &self.attrs {
            if k.len() > MAX_STRING_LEN || v.len() > MAX_STRING_LEN {
                return Err(format!("attrs entry longer than {MAX_STRING_LEN} bytes"));
            }
        }
        Ok(())
    }

    /// The event as the analyst API shows it (contract field names; no secrets to hide).
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            m.insert(k.to_string(), v);
        };
        put("id", self.id.clone().into());
        put("type", self.event_type.as_str().into());
        put("time", format_rfc3339(self.time).into());
        put("agent_id", self.agent_id.clone().into());
        let opt = |v: &Option<String>| v.clone().map_or(serde_json::Value::Null, Into::into);
        for (k, v) in [
            ("license", &self.license),
            ("customer", &self.customer),
            ("product", &self.product),
            ("plan", &self.plan),
            ("previous_plan", &self.previous_plan),
            ("region", &self.region),
            ("user", &self.user),
            ("domain", &self.domain),
            ("version", &self.version),
            ("feature", &self.feature),
            ("machine", &self.machine),
            ("country", &self.country),
        ] {
            if v.is_some() {
                put(k, opt(v));
            }
        }
        if let Some(d) = self.deployment {
            put("deployment", d.as_str().into());
        }
        put("result", self.result.as_str().into());
        if let Some(e) = self.expires_at {
            put("expires_at", format_rfc3339(e).into());
        }
        let u = &self.usage;
        for (k, v) in [
            ("seats_used", u.seats_used),
            ("seats_limit", u.seats_limit),
            ("domains_used", u.domains_used),
            ("domains_limit", u.domains_limit),
            ("machines_used", u.machines_used),
            ("machines_limit", u.machines_limit),
        ] {
            if let Some(v) = v {
                put(k, v.into());
            }
        }
        if !self.attrs.is_empty() {
            let attrs: serde_json::Map<String, serde_json::Value> =
                self.attrs.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
            put("attrs", attrs.into());
        }
        serde_json::Value::Object(m)
    }
}

/// `ISO 3166-1 alpha-2` shape: two upper-case ASCII letters.
pub fn is_country_code(s: &str) -> bool {
    s.len() == 2 && s.bytes().all(|b| b.is_ascii_uppercase())
}

/// A rejected ingest request: what the agent answers with 400.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestError {
    /// Machine-readable reason: `invalid_json`, `unknown_field`, `missing_field`, `invalid_type`,
    /// `invalid_value`, `too_long`, `too_many`, `empty_body`.
    pub code: &'static str,
    pub message: String,
    /// Index of the offending event in the request (array position or NDJSON line among events).
    pub index: Option<usize>,
    pub field: Option<String>,
}

/// `event 3, field "plan": message`; the parts not known are left out.
impl std::fmt::Display for IngestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.index, &self.field) {
            (Some(i), Some(field)) => write!(f, "event {i}, field {field:?}: ")?,
            (Some(i), None) => write!(f, "event {i}: ")?,
            (None, Some(field)) => write!(f, "field {field:?}: ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for IngestError {}

#[cfg(test)]
#[test]
fn ingest_errors_name_the_event_and_field_they_know() {
    let e = |index, field: Option<&str>| IngestError {
        code: "invalid_value",
        message: "bad".into(),
        index,
        field: field.map(String::from),
    };
    assert_eq!(e(Some(3), Some("plan")).to_string(), r#"event 3, field "plan": bad"#);
    assert_eq!(e(Some(0), None).to_string(), "event 0: bad");
    assert_eq!(e(None, Some("time")).to_string(), r#"field "time": bad"#);
    assert_eq!(e(None, None).to_string(), "bad");
}

impl IngestError {
    fn new(code: &'static str, field: Option<&str>, message: impl Into<String>) -> Self {
        IngestError {
            code,
            message: message.into(),
            index: None,
            field: field.map(str::to_string),
        }
    }

    fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    /// The 400 body of contract §4.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "code": self.code, "message": self.message, "index": self.index, "field": self.field,
        }})
    }
}

/// What the ingesting agent supplies: identity, context defaults, time and id sources.
pub trait IngestDefaults {
    fn agent_id(&self) -> &str;
    /// `[context]` values stamped on events that lack them.
    fn context(&self) -> &Context;
    fn now(&self) -> UnixNanos;
    /// A fresh unique event id for an event that came without one.
    fn new_event_id(&self) -> String;
}

/// Fixed defaults, for parsing bodies outside an agent (benchmarks, fuzzing, tests): one agent
/// id, one context, one `now`; an event without an id gets the id `generated`.
pub struct FixedDefaults {
    pub agent_id: String,
    pub context: Context,
    pub now: UnixNanos,
}

impl IngestDefaults for FixedDefaults {
    fn agent_id(&self) -> &str {
        &self.agent_id
    }
    fn context(&self) -> &Context {
        &self.context
    }
    fn now(&self) -> UnixNanos {
        self.now
    }
    fn new_event_id(&self) -> String {
        "generated".into()
    }
}

/// `[context]` of the agent config.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub customer: Option<String>,
    pub product: Option<String>,
    pub region: Option<String>,
    pub country: Option<String>,
    pub deployment: Option<Deployment>,
}

/// Body shape of an ingest request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: an object or an array of objects.
    Json,
    /// `application/x-ndjson`: one object per non-empty line.
    Ndjson,
}

/// Validates and pseudonymises events the proxy's adapters built, with the same rules as
/// [`parse_body`]; all or nothing (an error names the event's index).
pub fn parse_raw(
    raws: Vec<RawEvent<'_>>,
    fp: &Fingerprinter,
    defaults: &dyn IngestDefaults,
) -> Result<Vec<Event>, IngestError> {
    raws.into_iter()
        .enumerate()
        .map(|(i, raw)| raw.into_event(fp, defaults).map_err(|e| e.at(i)))
        .collect()
}

impl RawEvent<'static> {
    /// An event held as a JSON value, read into fields; a value that is not an event of the
    /// ingest schema is refused naming the field, as [`parse_body`] refuses it.
    pub fn from_value(v: serde_json::Value) -> Result<RawEvent<'static>, IngestError> {
        if let Some(e) = explain_value(&v) {
            return Err(e);
        }
        RawEvent::deserialize(v).map_err(|e| IngestError::new("invalid_value", None, format!("invalid event: {e}")))
    }
}

/// Validates events already held as JSON values (the proxy's adapters build them so) with the
/// same rules as [`parse_body`], without printing and reparsing the JSON; all or nothing.
pub fn parse_values(
    values: &[serde_json::Value],
    fp: &Fingerprinter,
    defaults: &dyn IngestDefaults,
) -> Result<Vec<Event>, IngestError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let raw = RawEvent::deserialize(v).map_err(|e| {
                explain_value(v)
                    .unwrap_or_else(|| IngestError::new("invalid_value", None, format!("invalid event: {e}")))
                    .at(i)
            })?;
            raw.into_event(fp, defaults).map_err(|e| e.at(i))
        })
        .collect()
}

/// Parses and validates a whole ingest body; all or nothing.
pub fn parse_body(
    body: &[u8],
    format: BodyFormat,
    fp: &Fingerprinter,
    defaults: &dyn IngestDefaults,
    max_events: usize,
) -> Result<Vec<Event>, IngestError> {
    let mut out = Vec::new();
    for_each_in_body(body, format, fp, defaults, max_events, |e| out.push(e))?;
    Ok(out)
}

/// [`parse_body`], handing each event to `each` as it is read instead of collecting them, so
/// a caller that encodes them holds one at a time. On an error some events may have been
/// handed over already: the caller discards what it made of them (all or nothing). Returns
/// how many events the body held.
pub fn for_each_in_body(
    body: &[u8],
    format: BodyFormat,
    fp: &Fingerprinter,
    defaults: &dyn IngestDefaults,
    max_events: usize,
    mut each: impl FnMut(Event),
) -> Result<usize, IngestError> {
    let mut count = 0;
    match format {
        BodyFormat::Ndjson => {
            for line in body.split(|b| *b == b'\n') {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if count >= max_events {
                    return Err(too_many(max_events).at(count));
                }
                let raw = parse_text(line).map_err(|e| e.at(count))?;
                each(raw.into_event(fp, defaults).map_err(|e| e.at(count))?);
                count += 1;
            }
        }
        BodyFormat::Json => {
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            match first {
                Some(b'[') => {
                    for raw in parse_array(body, max_events)? {
                        each(raw.into_event(fp, defaults).map_err(|e| e.at(count))?);
                        count += 1;
                    }
                }
                Some(_) => {
                    let raw = parse_text(body).map_err(|e| e.at(0))?;
                    each(raw.into_event(fp, defaults).map_err(|e| e.at(0))?);
                    count = 1;
                }
                None => {}
            }
        }
    }
    if count == 0 {
        return Err(IngestError::new("empty_body", None, "the body holds no event"));
    }
    Ok(count)
}

fn too_many(max: usize) -> IngestError {
    IngestError::new("too_many", None, format!("more than {max} events in one request"))
}

/// Integer unix milliseconds or an RFC 3339 string.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawTime<'a> {
    Millis(i64),
    #[serde(borrow)]
    Text(Cow<'a, str>),
}

/// An event as it comes, in the ingest schema (contract §5), before validation and
/// pseudonymisation ([`parse_raw`]): parsed from a request body, or built field by field by
/// the proxy's adapters (borrowing from the exchange they read). Serializes to the ingest
/// JSON, absent fields left out.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvent<'a> {
    #[serde(rename = "type", borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<RawTime<'a>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license_key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_plan: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Cow<'a, str>>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seats_used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seats_limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domains_used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domains_limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machines_used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machines_limit: Option<u64>,
    #[serde(borrow)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attrs: Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
}

/// The fields of contract §5 with the JSON type each must have; used to name the field of a
/// serde error precisely (serde's own message does not carry it in a usable form).
const FIELDS: &[(&str, FieldKind)] = &[
    ("type", FieldKind::String),
    ("id", FieldKind::String),
    ("time", FieldKind::Time),
    ("license_key", FieldKind::String),
    ("license", FieldKind::String),
    ("customer", FieldKind::String),
    ("product", FieldKind::String),
    ("plan", FieldKind::String),
    ("previous_plan", FieldKind::String),
    ("region", FieldKind::String),
    ("user", FieldKind::String),
    ("domain", FieldKind::String),
    ("version", FieldKind::String),
    ("feature", FieldKind::String),
    ("machine", FieldKind::String),
    ("country", FieldKind::String),
    ("deployment", FieldKind::String),
    ("result", FieldKind::String),
    ("expires_at", FieldKind::String),
    ("seats_used", FieldKind::Count),
    ("seats_limit", FieldKind::Count),
    ("domains_used", FieldKind::Count),
    ("domains_limit", FieldKind::Count),
    ("machines_used", FieldKind::Count),
    ("machines_limit", FieldKind::Count),
    ("attrs", FieldKind::Attrs),
];

#[derive(Clone, Copy)]
enum FieldKind {
    String,
    Time,
    Count,
    Attrs,
}

/// Explains why `serde` refused one event, naming the field. Slow path: runs only on error.
fn explain(event_json: &[u8], serde_err: &serde_json::Error) -> IngestError {
    let value: serde_json::Value = match serde_json::from_slice(event_json) {
        Ok(v) => v,
        Err(e) => return IngestError::new("invalid_json", None, format!("invalid JSON: {e}")),
    };
    explain_value(&value)
        .unwrap_or_else(|| IngestError::new("invalid_value", None, format!("invalid event: {serde_err}")))
}

fn explain_value(value: &serde_json::Value) -> Option<IngestError> {
    let obj = match value.as_object() {
        Some(o) => o,
        None => return Some(IngestError::new("invalid_type", None, "an event must be a JSON object")),
    };
    for (key, v) in obj {
        let Some((_, kind)) = FIELDS.iter().find(|(name, _)| name == key) else {
            return Some(IngestError::new(
                "unknown_field",
                Some(key),
                format!("unknown field `{}`", truncate_for_message(key)),
            ));
        };
        if v.is_null() {
            continue;
        }
        let bad = match kind {
            FieldKind::String => (!v.is_string()).then_some("a string"),
            FieldKind::Time => {
                (!(v.is_string() || v.is_i64())).then_some("an RFC 3339 string or integer unix milliseconds")
            }
            FieldKind::Count => (!v.is_u64()).then_some("an integer >= 0"),
            FieldKind::Attrs => match v.as_object() {
                Some(m) if m.values().all(|x| x.is_string()) => None,
                _ => Some("an object of string values"),
            },
        };
        if let Some(want) = bad {
            return Some(IngestError::new(
                "invalid_type",
                Some(key),
                format!("`{key}` must be {want}"),
            ));
        }
    }
    None
}

fn truncate_for_message(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn parse_one(json: &[u8]) -> Result<RawEvent<'_>, IngestError> {
    serde_json::from_slice::<RawEvent<'_>>(json).map_err(|e| explain(json, &e))
}

/// [`parse_one`], checking the event's UTF-8 once as a whole (one fast pass) instead of each
/// string in it: the parser checks strings only in bytes that are not known to be text.
fn parse_text(json: &[u8]) -> Result<RawEvent<'_>, IngestError> {
    match std::str::from_utf8(json) {
        Ok(text) => serde_json::from_str::<RawEvent<'_>>(text).map_err(|e| explain(json, &e)),
        Err(_) => parse_one(json),
    }
}

/// Parses a JSON array of events, counting elements so an error can name its index.
fn parse_array(body: &[u8], max_events: usize) -> Result<Vec<RawEvent<'_>>, IngestError> {
    struct Seed {
        max: usize,
        failed_at: std::cell::Cell<usize>,
    }
    struct ArrayVisitor<'s> {
        seed: &'s Seed,
    }
    impl<'de> Visitor<'de> for ArrayVisitor<'_> {
        type Value = Vec<RawEvent<'de>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of events")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            loop {
                self.seed.failed_at.set(out.len());
                if out.len() >= self.seed.max {
                    // One more element present means too many.
                    return match seq.next_element::<de::IgnoredAny>()? {
                        Some(_) => Err(de::Error::custom("too_many")),
                        None => Ok(out),
                    };
                }
                match seq.next_element::<RawEvent<'de>>()? {
                    Some(e) => out.push(e),
                    None => return Ok(out),
                }
            }
        }
    }
    impl<'de> DeserializeSeed<'de> for &Seed {
        type Value = Vec<RawEvent<'de>>;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(ArrayVisitor { seed: self })
        }
    }

    let seed = Seed {
        max: max_events,
        failed_at: std::cell::Cell::new(0),
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = (&seed).deserialize(&mut de).and_then(|v| de.end().map(|_| v));
    match result {
        Ok(v) => Ok(v),
        Err(e) => {
            let index = seed.failed_at.get();
            if e.to_string().starts_with("too_many") {
                return Err(too_many(max_events).at(index));
            }
            // Slow path: find the element and name the field.
            let detail = match serde_json::from_slice::<Vec<serde_json::Value>>(body) {
                Ok(values) => values
                    .get(index)
                    .and_then(explain_value)
                    .unwrap_or_else(|| IngestError::new("invalid_value", None, format!("invalid event: {e}"))),
                Err(syntax) => IngestError::new("invalid_json", None, format!("invalid JSON: {syntax}")),
            };
            Err(detail.at(index))
        }
    }
}

fn take_string(field: &'static str, v: Option<Cow<'_, str>>, max: usize) -> Result<Option<String>, IngestError> {
    match v {
        None => Ok(None),
        Some(s) if s.len() > max => Err(IngestError::new(
            "too_long",
            Some(field),
            format!("`{field}` is {} bytes, longer than {max}", s.len()),
        )),
        Some(s) => Ok(Some(s.into_owned())),
    }
}

/// A `time` the sender gave must be within the accepted range.
fn check_event_time(time: UnixNanos) -> Result<UnixNanos, IngestError> {
    if (EARLIEST_EVENT_TIME..LATEST_EVENT_TIME).contains(&time) {
        return Ok(time);
    }
    Err(IngestError::new(
        "invalid_value",
        Some("time"),
        format!(
            "`time` {} is outside 2000-01-01..2100-01-01 (unix seconds sent as milliseconds?)",
            crate::time::format_rfc3339(time)
        ),
    ))
}

fn parse_time_field(field: &'static str, text: &str) -> Result<UnixNanos, IngestError> {
    parse_rfc3339_ns(text).ok_or_else(|| {
        IngestError::new(
            "invalid_value",
            Some(field),
            format!("`{field}` is not an RFC 3339 time: {:?}", truncate_for_message(text)),
        )
    })
}

impl RawEvent<'_> {
    fn into_event(self, fp: &Fingerprinter, d: &dyn IngestDefaults) -> Result<Event, IngestError> {
        let type_text = self
            .event_type
            .ok_or_else(|| IngestError::new("missing_field", Some("type"), "`type` is required"))?;
        let event_type = EventType::parse(&type_text).ok_or_else(|| {
            IngestError::new(
                "invalid_value",
                Some("type"),
                format!("unknown event type {:?}", truncate_for_message(&type_text)),
            )
        })?;
        let id = match take_string("id", self.id, MAX_ID_LEN)? {
            Some(id) if id.is_empty() => {
                return Err(IngestError::new("invalid_value", Some("id"), "`id` must not be empty"))
            }
            Some(id) => id,
            None => d.new_event_id(),
        };
        let time = match self.time {
            // The agent's own clock is not judged here: an agent whose clock is off still takes
            // events, and the collector corrects their times (collector/src/clock.rs).
            None => d.now(),
            Some(RawTime::Millis(ms)) => {
                if !(-MAX_UNIX_MS..=MAX_UNIX_MS).contains(&ms) {
                    return Err(IngestError::new(
                        "invalid_value",
                        Some("time"),
                        "`time` in unix milliseconds is out of range",
                    ));
                }
                check_event_time(ms * 1_000_000)?
            }
            Some(RawTime::Text(t)) => check_event_time(parse_time_field("time", &t)?)?,
        };
        let license = match (self.license_key, self.license) {
            (Some(_), Some(_)) => {
                return Err(IngestError::new(
                    "invalid_value",
                    Some("license_key"),
                    "set `license_key` or `license`, not both",
                ))
            }
            (Some(key), None) => {
                if key.is_empty() || key.len() > MAX_LICENSE_KEY_LEN {
                    return Err(IngestError::new(
                        "invalid_value",
                        Some("license_key"),
                        format!("`license_key` must be 1..={MAX_LICENSE_KEY_LEN} bytes"),
                    ));
                }
                Some(fp.license(&key))
            }
            (None, Some(l)) if l.is_empty() => {
                return Err(IngestError::new(
                    "invalid_value",
                    Some("license"),
                    "`license` must not be empty",
                ))
            }
            (None, l) => take_string("license", l, MAX_LICENSE_LEN)?,
        };
        if license.is_none() && event_type.requires_license() {
            return Err(IngestError::new(
                "missing_field",
                Some("license"),
                format!("`license_key` or `license` is required for {event_type}"),
            ));
        }
        let machine = take_string("machine", self.machine, MAX_STRING_LEN)?.map(|m| fp.machine(&m));
        let country = match take_string("country", self.country, MAX_STRING_LEN)? {
            None => None,
            Some(c) => {
                let upper = c.to_ascii_uppercase();
                if !is_country_code(&upper) {
                    return Err(IngestError::new(
                        "invalid_value",
                        Some("country"),
                        format!(
                            "`country` must be an ISO 3166-1 alpha-2 code, not {:?}",
                            truncate_for_message(&c)
                        ),
                    ));
                }
                Some(upper)
            }
        };
        let deployment = match self.deployment {
            None => None,
            Some(s) => Some(Deployment::parse(&s).ok_or_else(|| {
                IngestError::new(
                    "invalid_value",
                    Some("deployment"),
                    "`deployment` must be one of cloud, on_prem, hybrid",
                )
            })?),
        };
        let result = match self.result {
            None => ResultCode::Valid,
            Some(s) => ResultCode::parse(&s).ok_or_else(|| {
                IngestError::new(
                    "invalid_value",
                    Some("result"),
                    format!("unknown result {:?}", truncate_for_message(&s)),
                )
            })?,
        };
        let expires_at = match self.expires_at {
            None => None,
            Some(t) => Some(parse_time_field("expires_at", &t)?),
        };
        let attrs = match self.attrs {
            None => Vec::new(),
            Some(map) => {
                if map.len() > MAX_ATTRS {
                    return Err(IngestError::new(
                        "too_many",
                        Some("attrs"),
                        format!("`attrs` has {} entries, more than {MAX_ATTRS}", map.len()),
                    ));
                }
                let mut out = Vec::with_capacity(map.len());
                for (k, v) in map {
                    if k.len() > MAX_STRING_LEN || v.len() > MAX_STRING_LEN {
                        return Err(IngestError::new(
                            "too_long",
                            Some("attrs"),
                            format!(
                                "`attrs` entry {:?} is longer than {MAX_STRING_LEN} bytes",
                                truncate_for_message(&k)
                            ),
                        ));
                    }
                    out.push((k.into_owned(), v.into_owned()));
                }
                out
            }
        };
        let ctx = d.context();
        let or_ctx = |v: Option<String>, c: &Option<String>| v.or_else(|| c.clone());
        Ok(Event {
            id,
            event_type,
            time,
            agent_id: d.agent_id().to_string(),
            license,
            customer: or_ctx(take_string("customer", self.customer, MAX_STRING_LEN)?, &ctx.customer),
            product: or_ctx(take_string("product", self.product, MAX_STRING_LEN)?, &ctx.product),
            plan: take_string("plan", self.plan, MAX_STRING_LEN)?,
            previous_plan: take_string("previous_plan", self.previous_plan, MAX_STRING_LEN)?,
            region: or_ctx(take_string("region", self.region, MAX_STRING_LEN)?, &ctx.region),
            user: take_string("user", self.user, MAX_STRING_LEN)?,
            domain: take_string("domain", self.domain, MAX_STRING_LEN)?,
            version: take_string("version", self.version, MAX_STRING_LEN)?,
            feature: take_string("feature", self.feature, MAX_STRING_LEN)?,
            machine,
            country: country.or_else(|| ctx.country.clone()),
            deployment: deployment.or(ctx.deployment),
            result,
            expires_at,
            usage: Usage {
                seats_used: self.seats_used,
                seats_limit: self.seats_limit,
                domains_used: self.domains_used,
                domains_limit: self.domains_limit,
                machines_used: self.machines_used,
                machines_limit: self.machines_limit,
            },
            attrs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> FixedDefaults {
        FixedDefaults {
            agent_id: "agent-1".into(),
            context: Context {
                region: Some("eu-west-1".into()),
                deployment: Some(Deployment::OnPrem),
                customer: Some("acme".into()),
                ..Context::default()
            },
            now: 1_700_000_000_000_000_000,
        }
    }

    fn fp() -> Fingerprinter {
        Fingerprinter::new(b"secret".to_vec())
    }

    fn parse(body: &str, format: BodyFormat) -> Result<Vec<Event>, IngestError> {
        parse_body(body.as_bytes(), format, &fp(), &fixed(), 1000)
    }

    #[test]
    fn a_line_that_is_not_utf8_is_refused_naming_the_event() {
        let mut body = b"{\"type\":\"license.validated\",\"license\":\"l\"}\n".to_vec();
        body.extend_from_slice(b"{\"type\":\"license.validated\",\"license\":\"l\xff\"}\n");
        let e = parse_body(&body, BodyFormat::Ndjson, &fp(), &fixed(), 10).unwrap_err();
        assert_eq!((e.code, e.index), ("invalid_json", Some(1)), "{e:?}");
        let one = b"{\"type\":\"license.validated\",\"license\":\"l\xff\"}";
        let e = parse_body(one, BodyFormat::Json, &fp(), &fixed(), 10).unwrap_err();
        assert_eq!((e.code, e.index), ("invalid_json", Some(0)), "{e:?}");
    }

    /// Not a test: the time to parse the lines of a 500-event NDJSON body with the parser
    /// checking UTF-8 string by string (`from_slice`) and after one check per line
    /// (`parse_text`), alternated in one run:
    /// `cargo test --release -p keytrail-common ingest_parse_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn ingest_parse_cost() {
        let lines: Vec<String> = (0..500)
            .map(|i| {
                format!(
                    r#"{{"id":"demo-4d-{i}","type":"license.validated","license":"license-{:05}","plan":"pro","country":"DE","result":"valid","user":"user-{}","machines_used":{},"machines_limit":5}}"#,
                    i * 7 % 5000,
                    i % 8,
                    i % 7
                )
            })
            .collect();
        let (mut per_string, mut per_line) = (Vec::new(), Vec::new());
        for round in 0..2000 {
            let t = std::time::Instant::now();
            let mut n = 0;
            for l in &lines {
                let raw = if round % 2 == 0 {
                    parse_one(l.as_bytes())
                } else {
                    parse_text(l.as_bytes())
                };
                n += raw.unwrap().id.map_or(0, |id| id.len());
            }
            std::hint::black_box(n);
            let us = t.elapsed().as_secs_f64() * 1e6;
            if round % 2 == 0 { &mut per_string } else { &mut per_line }.push(us);
        }
        for v in [&mut per_string, &mut per_line] {
            v.sort_by(|a, b| a.total_cmp(b));
        }
        println!(
            "500 lines, median µs: checked per string {:.1}, per line {:.1}",
            per_string[per_string.len() / 2],
            per_line[per_line.len() / 2]
        );
    }

    #[test]
    fn values_parse_exactly_like_bodies() {
        let body = r#"[{"type":"license.validated","license_key":"RAW-1","machine":"fp","time":1762000000000,"seats_used":3,"attrs":{"a":"b"}},
            {"type":"license.activated","license":"l2","time":"2026-11-01T10:00:00.5+01:00","result":"limit_exceeded","expires_at":"2027-01-01T00:00:00.000Z"}]"#;
        let values: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
        let from_values = parse_values(&values, &fp(), &fixed()).unwrap();
        let from_body = parse(body, BodyFormat::Json).unwrap();
        assert_eq!(format!("{from_values:?}"), format!("{from_body:?}"));
        assert!(
            from_values[0].license.as_deref().unwrap().starts_with("lk_"),
            "pseudonymised"
        );
        let bad = [
            serde_json::json!({"type":"license.validated","license":"l"}),
            serde_json::json!({"type":"license.validated","licence":"l"}),
        ];
        let e = parse_values(&bad, &fp(), &fixed()).unwrap_err();
        assert_eq!(
            (e.code, e.index, e.field.as_deref()),
            ("unknown_field", Some(1), Some("licence"))
        );
        let e = parse_values(
            &[serde_json::json!({"type":"license.validated","license":"l","seats_used":"x"})],
            &fp(),
            &fixed(),
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("seats_used"));
    }

    #[test]
    fn object_array_and_ndjson_parse() {
        let one = parse(r#"{"type":"license.validated","license":"l1"}"#, BodyFormat::Json).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].id, "generated");
        assert_eq!(one[0].result, ResultCode::Valid);
        assert_eq!(one[0].region.as_deref(), Some("eu-west-1"));
        assert_eq!(one[0].customer.as_deref(), Some("acme"));
        assert_eq!(one[0].time, 1_700_000_000_000_000_000);
        let arr = parse(
            r#"[{"type":"license.issued","license":"l1","time":1762000000000},
                {"type":"payment.failed","customer":"other","time":"2026-11-01T10:00:00.5+01:00"}]"#,
            BodyFormat::Json,
        )
        .unwrap();
        assert_eq!(arr[0].time, 1_762_000_000_000 * 1_000_000);
        assert_eq!(arr[1].customer.as_deref(), Some("other"));
        assert_eq!(format_rfc3339(arr[1].time), "2026-11-01T09:00:00.5Z");
        let nd = parse(
            "{\"type\":\"license.validated\",\"license\":\"a\"}\n\n{\"type\":\"license.validated\",\"license\":\"b\"}\n",
            BodyFormat::Ndjson,
        )
        .unwrap();
        assert_eq!(nd.len(), 2);
    }

    #[test]
    fn license_key_and_machine_are_pseudonymised() {
        let e = parse(
            r#"{"type":"license.activated","license_key":"RAW-KEY","machine":"RAW-MACHINE"}"#,
            BodyFormat::Json,
        )
        .unwrap()
        .remove(0);
        let l = e.license.unwrap();
        assert!(l.starts_with("lk_") && l.len() == 35, "{l}");
        assert_eq!(l, fp().license("RAW-KEY"));
        let m = e.machine.unwrap();
        assert!(m.starts_with("mf_") && m.len() == 35, "{m}");
        assert!(!m.contains("RAW"));
    }

    #[test]
    fn errors_name_field_and_index() {
        let err = parse(
            r#"[{"type":"license.validated","license":"ok"},{"type":"license.validated","license":"x","colour":"red"}]"#,
            BodyFormat::Json,
        )
        .unwrap_err();
        assert_eq!(
            (err.code, err.index, err.field.as_deref()),
            ("unknown_field", Some(1), Some("colour"))
        );

        let err = parse(
            r#"[{"type":"license.validated","license":"ok","seats_used":-1}]"#,
            BodyFormat::Json,
        )
        .unwrap_err();
        assert_eq!(
            (err.code, err.index, err.field.as_deref()),
            ("invalid_type", Some(0), Some("seats_used"))
        );

        let err = parse(
            "{\"type\":\"license.validated\",\"license\":\"a\"}\n{\"type\":\"nope\"}",
            BodyFormat::Ndjson,
        )
        .unwrap_err();
        assert_eq!(
            (err.code, err.index, err.field.as_deref()),
            ("invalid_value", Some(1), Some("type"))
        );

        let err = parse(r#"{"type":"license.validated"}"#, BodyFormat::Json).unwrap_err();
        assert_eq!((err.code, err.field.as_deref()), ("missing_field", Some("license")));

        let long = "x".repeat(129);
        let err = parse(
            &format!(r#"{{"type":"payment.failed","id":"{long}"}}"#),
            BodyFormat::Json,
        )
        .unwrap_err();
        assert_eq!((err.code, err.field.as_deref()), ("too_long", Some("id")));

        let err = parse(
            r#"[{"type":"payment.failed"},{"type":"payment.failed""#,
            BodyFormat::Json,
        )
        .unwrap_err();
        assert_eq!((err.code, err.index), ("invalid_json", Some(1)));

        let err = parse(r#"{"type":"payment.failed","country":"Germany"}"#, BodyFormat::Json).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("country"));

        let err = parse(r#"{"type":"payment.failed","time":"yesterday"}"#, BodyFormat::Json).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("time"));
        // Times outside 2000..2100 are refused (seconds sent as milliseconds land in 1970);
        // expiries are not bounded (perpetual licenses).
        for bad in [
            r#""time":1762000000"#,
            r#""time":"2100-01-01T00:00:00Z""#,
            r#""time":"1999-12-31T23:59:59Z""#,
        ] {
            let err = parse(&format!(r#"{{"type":"payment.failed",{bad}}}"#), BodyFormat::Json).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("time"), "{bad}");
            assert!(
                err.message.contains("outside 2000-01-01..2100-01-01"),
                "{}",
                err.message
            );
        }
        parse(
            r#"{"type":"license.validated","license":"l","time":"2099-12-31T23:59:59Z","expires_at":"2200-01-01T00:00:00Z"}"#,
            BodyFormat::Json,
        )
        .unwrap();

        let attrs: String = (0..33).map(|i| format!(r#""k{i}":"v","#)).collect();
        let err = parse(
            &format!(
                r#"{{"type":"payment.failed","attrs":{{{}}}}}"#,
                attrs.trim_end_matches(',')
            ),
            BodyFormat::Json,
        )
        .unwrap_err();
        assert_eq!((err.code, err.field.as_deref()), ("too_many", Some("attrs")));

        assert_eq!(parse("  ", BodyFormat::Json).unwrap_err().code, "empty_body");
        assert_eq!(parse("[]", BodyFormat::Json).unwrap_err().code, "empty_body");
    }

    #[test]
    fn too_many_events_is_an_error() {
        let body = format!("[{}]", [r#"{"type":"payment.failed"}"#; 3].join(","));
        let err = parse_body(body.as_bytes(), BodyFormat::Json, &fp(), &fixed(), 2).unwrap_err();
        assert_eq!((err.code, err.index), ("too_many", Some(2)));
        let ok = parse_body(body.as_bytes(), BodyFormat::Json, &fp(), &fixed(), 3).unwrap();
        assert_eq!(ok.len(), 3);
    }

    #[test]
    fn tags_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::from_tag(t.tag()), Some(*t));
            assert_eq!(EventType::parse(t.as_str()), Some(*t));
        }
        for r in ResultCode::ALL {
            assert_eq!(ResultCode::from_tag(r.tag()), Some(*r));
        }
        assert!(EventType::FeatureChecked.requires_license());
        assert!(!EventType::PaymentFailed.requires_license());
    }
}
