//! The generic adapter: a vendor's own JSON license API, mapped by configuration
//! (`[[proxy.routes]]`; worked example in `deploy/config/agent-generic-proxy.example.toml`).
//!
//! A route matches by method and path pattern (`{name}` is one segment, a final `*` the
//! rest). Each event field is taken from a *source*: `request:/json/pointer`,
//! `response:/json/pointer`, `query:name`, `header:name`, `path:name` or `const:text`. For a
//! form-encoded request body, `request:/name` is the form field `name`. The result comes
//! from the status code (`result.status`), else a field's value (`result.field` looked up in
//! `result.map`), else `result.default`, else the status class (2xx `valid`, 404
//! `not_found`, 429 `rate_limited`, other 4xx `invalid_format`, 5xx `error`).

use std::collections::BTreeMap;

use http::{HeaderName, Method};
use keytrail_common::event::{EventType, RawEvent, ResultCode};
use serde_json::{Map, Value};

use super::{Adapter, Exchange, Unreadable};

/// Where a value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Request(String),
    Response(String),
    Query(String),
    Header(String),
    Path(String),
    Const(String),
}

impl Source {
    pub fn parse(s: &str) -> Result<Source, String> {
        let (kind, arg) = s.split_once(':').ok_or_else(|| {
            format!("{s:?}: use request:/pointer, response:/pointer, query:, header:, path: or const:")
        })?;
        let pointer = |a: &str| {
            if a.is_empty() || a.starts_with('/') {
                Ok(a.to_string())
            } else {
                Err(format!("{s:?}: a JSON pointer starts with /"))
            }
        };
        Ok(match kind {
            "request" => Source::Request(pointer(arg)?),
            "response" => Source::Response(pointer(arg)?),
            "query" if !arg.is_empty() => Source::Query(arg.to_string()),
            "header" if !arg.is_empty() => {
                http::HeaderName::from_bytes(arg.as_bytes())
                    .map_err(|_| format!("{s:?}: {arg:?} is not an HTTP header name"))?;
                Source::Header(arg.to_ascii_lowercase())
            }
            "path" if !arg.is_empty() => Source::Path(arg.to_string()),
            "const" => Source::Const(arg.to_string()),
            _ => return Err(format!("{s:?}: unknown source {kind:?} or empty name")),
        })
    }
}

/// Event fields a route may fill (the result has its own table).
const STRING_FIELDS: [&str; 15] = [
    "id",
    "license_key",
    "license",
    "customer",
    "product",
    "plan",
    "previous_plan",
    "region",
    "user",
    "domain",
    "version",
    "feature",
    "machine",
    "country",
    "expires_at",
];
const NUMBER_FIELDS: [&str; 6] = [
    "seats_used",
    "seats_limit",
    "domains_used",
    "domains_limit",
    "machines_used",
    "machines_limit",
];

/// One configured route.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Option<Method>,
    /// Pattern segments: `Some(name)` for `{name}`, `None` for a literal (kept in `literals`).
    segments: Vec<Segment>,
    rest: bool,
    pub event_type: String,
    /// Event field (or `attrs.<name>`) → source.
    pub fields: Vec<(String, Source)>,
    pub result_status: BTreeMap<String, String>,
    pub result_field: Option<Source>,
    pub result_map: BTreeMap<String, String>,
    pub result_default: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Var(String),
}

/// A route as written in the config file.
#[derive(serde::Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub method: Option<String>,
    pub path: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    pub result: Option<RawResult>,
}

#[derive(serde::Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawResult {
    pub status: Option<BTreeMap<String, String>>,
    pub field: Option<String>,
    pub map: Option<BTreeMap<String, String>>,
    pub default: Option<String>,
}

fn check_result(r: &str, at: &str) -> Result<String, String> {
    ResultCode::parse(r)
        .map(|_| r.to_string())
        .ok_or_else(|| format!("{at}: {r:?} is not a result (valid, expired, suspended, revoked, not_found, invalid_format, domain_mismatch, limit_exceeded, rate_limited, feature_denied, overdue, error)"))
}

impl Route {
    /// Validates a configured route; errors name the key (`proxy.routes[i]…`).
    pub fn from_raw(i: usize, raw: &RawRoute) -> Result<Route, String> {
        let at = |k: &str| format!("proxy.routes[{i}].{k}");
        let method = match &raw.method {
            None => None,
            Some(m) => Some(
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("{}: {m:?} is not an HTTP method", at("method")))?,
            ),
        };
        if !raw.path.starts_with('/') {
            return Err(format!("{}: {:?} must start with /", at("path"), raw.path));
        }
        let mut segments = Vec::new();
        let mut rest = false;
        let parts: Vec<&str> = raw
            .path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        for (n, p) in parts.iter().enumerate() {
            if *p == "*" {
                if n + 1 != parts.len() {
                    return Err(format!("{}: * is only allowed at the end", at("path")));
                }
                rest = true;
            } else if let Some(name) = p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.is_empty() {
                    return Err(format!("{}: empty {{}}", at("path")));
                }
                segments.push(Segment::Var(name.to_string()));
            } else {
                segments.push(Segment::Literal(p.to_string()));
            }
        }
        if EventType::parse(&raw.event_type).is_none() {
            return Err(format!("{}: {:?} is not an event type", at("type"), raw.event_type));
        }
        let mut fields = Vec::new();
        for (name, src) in &raw.fields {
            let known = STRING_FIELDS.contains(&name.as_str())
                || NUMBER_FIELDS.contains(&name.as_str())
                || name
                    .strip_prefix("attrs.")
                    .is_some_and(|a| !a.is_empty() && a.len() <= 64);
            if !known {
                return Err(format!(
                    "{}: not an event field (use one of {}, {}, or attrs.<name>)",
                    at(&format!("fields.{name}")),
                    STRING_FIELDS.join(", "),
                    NUMBER_FIELDS.join(", ")
                ));
            }
            let src = Source::parse(src).map_err(|e| format!("{}: {e}", at(&format!("fields.{name}"))))?;
            if let Source::Path(v) = &src {
                if !segments.contains(&Segment::Var(v.clone())) {
                    return Err(format!("{}: the path has no {{{v}}}", at(&format!("fields.{name}"))));
                }
            }
            fields.push((name.clone(), src));
        }
        if !fields.iter().any(|(n, _)| n == "license_key" || n == "license") {
            return Err(format!(
                "{}: a route needs fields.license_key or fields.license",
                at("fields")
            ));
        }
        let r = raw.result.clone().unwrap_or_default();
        let mut result_status = BTreeMap::new();
        for (code, result) in r.status.unwrap_or_default() {
            let ok = (code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()))
                || (code.len() == 3 && code.as_bytes()[0].is_ascii_digit() && &code[1..] == "xx");
            if !ok {
                return Err(format!(
                    "{}: {code:?} is not a status code or class like 4xx",
                    at("result.status")
                ));
            }
            result_status.insert(
                code.clone(),
                check_result(&result, &at(&format!("result.status.{code}")))?,
            );
        }
        let result_field = r
            .field
            .as_deref()
            .map(Source::parse)
            .transpose()
            .map_err(|e| format!("{}: {e}", at("result.field")))?;
        let mut result_map = BTreeMap::new();
        for (value, result) in r.map.unwrap_or_default() {
            result_map.insert(
                value.clone(),
                check_result(&result, &at(&format!("result.map.{value}")))?,
            );
        }
        if result_field.is_none() && !result_map.is_empty() {
            return Err(format!("{}: result.map needs result.field", at("result")));
        }
        let result_default = r.default.map(|d| check_result(&d, &at("result.default"))).transpose()?;
        Ok(Route {
            method,
            segments,
            rest,
            event_type: raw.event_type.clone(),
            fields,
            result_status,
            result_field,
            result_map,
            result_default,
        })
    }

    /// The path variables when the route matches.
    fn matches(&self, method: &Method, path: &str) -> Option<BTreeMap<String, String>> {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return None;
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
        if parts.len() < self.segments.len() || (!self.rest && parts.len() != self.segments.len()) {
            return None;
        }
        let mut vars = BTreeMap::new();
        for (seg, part) in self.segments.iter().zip(&parts) {
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Var(v) => {
                    vars.insert(v.clone(), super::percent_decode(part.as_bytes())?);
                }
            }
        }
        Some(vars)
    }
}

fn scalar(v: &Value) -> Option<Value> {
    match v {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Some(v.clone()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Whether a value can go into the event as it is; anything else is left out (rather than the
/// whole event refused by the ingest rules).
fn acceptable(field: &str, v: &str) -> bool {
    !v.is_empty()
        && match field {
            "id" | "license" => v.len() <= 128,
            "expires_at" => keytrail_common::time::parse_rfc3339_ns(v).is_some(),
            "country" => keytrail_common::event::is_country_code(v),
            _ => v.len() <= 256,
        }
}

pub struct Generic {
    pub routes: Vec<Route>,
}

impl Generic {
    fn value(
        ex: &Exchange,
        src: &Source,
        req: &Option<Value>,
        resp: &Option<Value>,
        vars: &BTreeMap<String, String>,
    ) -> Option<Value> {
        match src {
            Source::Request(p) => match req {
                Some(j) => j.pointer(p).and_then(scalar),
                // A form body: `/name` is the field `name`.
                None => super::form_value(&ex.request_body.bytes, p.trim_start_matches('/')).map(Value::String),
            },
            Source::Response(p) => resp.as_ref()?.pointer(p).and_then(scalar),
            Source::Query(n) => ex.query_param(n).map(Value::String),
            Source::Header(n) => ex
                .request_headers
                .get(n.as_str())
                .and_then(|v| v.to_str().ok())
                .map(|v| Value::String(v.to_string())),
            Source::Path(n) => vars.get(n).cloned().map(Value::String),
            Source::Const(c) => Some(Value::String(c.clone())),
        }
    }
}

impl Adapter for Generic {
    fn request_headers(&self) -> Vec<HeaderName> {
        let mut names: Vec<HeaderName> = self
            .routes
            .iter()
            .flat_map(|r| r.fields.iter().map(|(_, src)| src).chain(r.result_field.as_ref()))
            .filter_map(|src| match src {
                Source::Header(n) => HeaderName::from_bytes(n.as_bytes()).ok(),
                _ => None,
            })
            .collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        names
    }

    fn events<'a>(&self, ex: &'a Exchange) -> Result<Vec<RawEvent<'a>>, Unreadable> {
        let Some((route, vars)) = self
            .routes
            .iter()
            .find_map(|r| r.matches(&ex.method, &ex.path).map(|v| (r, v)))
        else {
            return Ok(Vec::new());
        };
        let resp = ex.response_json()?;
        let req = ex.request_json();
        let mut e = Map::new();
        e.insert("type".into(), route.event_type.clone().into());
        e.insert("time".into(), (ex.time / 1_000_000).into());
        let mut attrs = Map::new();
        for (name, src) in &route.fields {
            let Some(v) = Self::value(ex, src, &req, &resp, &vars) else {
                continue;
            };
            if let Some(a) = name.strip_prefix("attrs.") {
                if let Some(t) = text(&v).filter(|t| t.len() <= 256) {
                    attrs.insert(a.to_string(), t.into());
                }
            } else if NUMBER_FIELDS.contains(&name.as_str()) {
                let n = v.as_u64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()));
                if let Some(n) = n {
                    e.insert(name.clone(), n.into());
                }
            } else if let Some(t) = text(&v).filter(|t| acceptable(name, t)) {
                e.insert(name.clone(), t.into());
            }
        }
        // One license identity: a key wins over an id (as the vendor adapters do).
        if e.contains_key("license_key") {
            e.remove("license");
        }
        if !e.contains_key("license_key") && !e.contains_key("license") {
            return Err(Unreadable(
                "no_license",
                "the route's license field had no value".into(),
            ));
        }
        if !attrs.is_empty() {
            e.insert("attrs".into(), Value::Object(attrs));
        }
        let code = ex.status.as_u16();
        let class = format!("{}xx", code / 100);
        let by_field = || {
            let src = route.result_field.as_ref()?;
            let v = Self::value(ex, src, &req, &resp, &vars)?;
            route.result_map.get(&text(&v)?).cloned()
        };
        let result = route
            .result_status
            .get(&code.to_string())
            .or_else(|| route.result_status.get(&class))
            .cloned()
            .or_else(by_field)
            .or_else(|| route.result_default.clone())
            .unwrap_or_else(|| {
                match code {
                    200..=299 => "valid",
                    404 => "not_found",
                    429 => "rate_limited",
                    400..=499 => "invalid_format",
                    _ => "error",
                }
                .to_string()
            });
        e.insert("result".into(), result.into());
        // Fields are named by configuration, so the event is built as JSON and read as the
        // ingest parser reads a body.
        let event = RawEvent::from_value(Value::Object(e))
            .map_err(|err| Unreadable("invalid_event", format!("the route's event: {err}")))?;
        Ok(vec![event])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_exchange;
    use serde_json::json;

    fn raw(toml_text: &str) -> RawRoute {
        keytrail_common::config::parse_toml(toml_text).unwrap()
    }

    const ROUTE: &str = r#"
        method = "POST"
        path = "/api/v2/licenses/{id}/verify"
        type = "license.validated"
        [fields]
        license_key = "request:/key"
        license = "path:id"
        machine = "header:x-machine"
        plan = "response:/license/tier"
        seats_used = "response:/license/seats/used"
        seats_limit = "response:/license/seats/max"
        "attrs.channel" = "query:channel"
        [result]
        status = { "429" = "rate_limited", "5xx" = "error" }
        field = "response:/license/state"
        map = { active = "valid", lapsed = "expired", blocked = "revoked" }
        default = "invalid_format"
    "#;

    /// The events as the ingest JSON.
    fn values(g: &Generic, x: &Exchange) -> Result<Vec<Value>, Unreadable> {
        g.events(x)
            .map(|v| v.into_iter().map(|e| serde_json::to_value(e).unwrap()).collect())
    }

    fn ex(method: Method, path: &str, body: &str, status: u16, resp: &str) -> Exchange {
        test_exchange(method.as_str(), path, &[("x-machine", "host-7")], body, status, resp)
    }

    #[test]
    fn a_route_maps_fields_and_results() {
        let g = Generic {
            routes: vec![Route::from_raw(0, &raw(ROUTE)).unwrap()],
        };
        // The proxy copies only the headers a route reads into the exchange.
        assert_eq!(g.request_headers(), [HeaderName::from_static("x-machine")]);
        let resp = r#"{"license":{"tier":"gold","state":"lapsed","seats":{"used":"4","max":5}}}"#;
        let v = values(
            &g,
            &ex(
                Method::POST,
                "/api/v2/licenses/L%2042/verify?channel=beta",
                r#"{"key":"RAW-KEY"}"#,
                200,
                resp,
            ),
        )
        .unwrap();
        assert_eq!(
            v,
            vec![
                json!({"type":"license.validated","time":1_764_000_000_000i64,"license_key":"RAW-KEY",
                "machine":"host-7","plan":"gold","seats_used":4,"seats_limit":5,"attrs":{"channel":"beta"},"result":"expired"})
            ]
        );
        let result = |status, resp: &str| {
            values(&g, &ex(Method::POST, "/api/v2/licenses/x/verify", "{}", status, resp)).unwrap()[0]["result"].clone()
        };
        assert_eq!(result(429, "{}"), "rate_limited");
        assert_eq!(result(503, "oops"), "error", "a class");
        assert_eq!(result(200, r#"{"license":{"state":"active"}}"#), "valid");
        assert_eq!(
            result(200, r#"{"license":{"state":"weird"}}"#),
            "invalid_format",
            "default"
        );
        // Method, path shape: no match, no event.
        assert!(values(&g, &ex(Method::GET, "/api/v2/licenses/x/verify", "", 200, "{}"))
            .unwrap()
            .is_empty());
        assert!(
            values(&g, &ex(Method::POST, "/api/v2/licenses/x/verify/more", "", 200, "{}"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn form_bodies_wildcards_and_status_class_defaults() {
        let r = raw(r#"
            path = "/check/*"
            type = "license.activated"
            fields = { license_key = "request:/license_key", machine = "request:/device" }
            "#);
        let g = Generic {
            routes: vec![Route::from_raw(0, &r).unwrap()],
        };
        let v = values(
            &g,
            &ex(Method::PUT, "/check/a/b", "license_key=K%2B1&device=d1", 201, ""),
        )
        .unwrap();
        assert_eq!(
            (
                v[0]["license_key"].as_str(),
                v[0]["machine"].as_str(),
                v[0]["result"].as_str()
            ),
            (Some("K+1"), Some("d1"), Some("valid"))
        );
        let v = values(&g, &ex(Method::POST, "/check/x", "license_key=K", 404, "")).unwrap();
        assert_eq!(v[0]["result"], "not_found");
        // A value the ingest rules would refuse is left out, not the whole event.
        let long = "m".repeat(300);
        let v = values(
            &g,
            &ex(
                Method::POST,
                "/check/x",
                &format!("license_key=K&device={long}"),
                200,
                "",
            ),
        )
        .unwrap();
        assert_eq!((v[0]["license_key"].as_str(), v[0].get("machine")), (Some("K"), None));
        assert!(!acceptable("expires_at", "2027-01-01"));
        assert!(acceptable("expires_at", "2027-01-01T00:00:00Z"));
        assert!(!acceptable("country", "Germany"));
        let e = values(&g, &ex(Method::POST, "/check/x", "device=d", 200, "")).unwrap_err();
        assert_eq!(e.0, "no_license");
    }

    #[test]
    fn bad_routes_are_refused_naming_the_key() {
        let bad = |t: &str, want: &str| {
            let e = Route::from_raw(3, &raw(t)).unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        let base = "path = \"/v\"\ntype = \"license.validated\"\n";
        bad(
            &format!("{base}fields = {{ license_key = \"header:bad name\" }}"),
            "not an HTTP header name",
        );
        bad(
            &format!("{base}fields = {{ license_key = \"body:/k\" }}"),
            "proxy.routes[3].fields.license_key",
        );
        bad(
            &format!("{base}fields = {{ license_key = \"request:k\" }}"),
            "JSON pointer",
        );
        bad(
            &format!("{base}fields = {{ licence = \"request:/k\" }}"),
            "not an event field",
        );
        bad(
            &format!("{base}fields = {{ plan = \"request:/p\" }}"),
            "needs fields.license_key",
        );
        bad(
            &format!("{base}fields = {{ license = \"path:id\" }}"),
            "the path has no {id}",
        );
        bad(
            "path = \"/v\"\ntype = \"license.checked\"\nfields = { license = \"const:x\" }",
            "not an event type",
        );
        bad(
            "path = \"v\"\ntype = \"license.validated\"\nfields = { license = \"const:x\" }",
            "must start with /",
        );
        bad(
            "path = \"/a/*/b\"\ntype = \"license.validated\"\nfields = { license = \"const:x\" }",
            "only allowed at the end",
        );
        bad(
            &format!("{base}fields = {{ license = \"const:x\" }}\nresult = {{ status = {{ \"4x\" = \"valid\" }} }}"),
            "status code or class",
        );
        bad(
            &format!("{base}fields = {{ license = \"const:x\" }}\nresult = {{ default = \"ok\" }}"),
            "proxy.routes[3].result.default",
        );
        bad(
            &format!("{base}fields = {{ license = \"const:x\" }}\nresult = {{ map = {{ a = \"valid\" }} }}"),
            "needs result.field",
        );
        bad(
            &format!("method = \"GE T\"\n{base}fields = {{ license = \"const:x\" }}"),
            "not an HTTP method",
        );
    }
}
