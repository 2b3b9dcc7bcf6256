//! Keygen (keygen.sh, self-hosted CE/EE too): validations, machine activations and
//! deactivations. The mapping from Keygen's codes to contract results is in `docs/adapters.md`.
//!
//! Routes are matched after `/v1/accounts/<account>` or `/v1` (both forms exist). Keygen
//! answers every validation with 200 and puts the outcome in `meta.code` (`meta.constant` on
//! API versions 1.0 and 1.1), so the result comes from the code, not the status. The one
//! exception, as the issue asks: `meta.valid: true` (an over-limit code within the policy's
//! allowed overage, or an expired license that keeps access) is recorded as `valid`, with the
//! usage that shows the overage and the code in `attrs.keygen_code`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use http::{header, Method, StatusCode};
use keytrail_common::event::RawEvent;
use keytrail_common::time::parse_rfc3339_ns;
use serde::Deserialize;

use super::json::{First, Obj, Scalar};
use super::{new_event, Adapter, Exchange, Unreadable};

pub struct Keygen;

/// The request, by route.
#[derive(Debug, PartialEq)]
enum Call<'a> {
    /// `POST …/licenses/actions/validate-key`
    ValidateKey,
    /// `POST|GET …/licenses/<id>/actions/validate`
    ValidateById(&'a str),
    /// `POST …/machines`
    Activate,
    /// `DELETE …/machines/<id or fingerprint>`
    Deactivate(&'a str),
}

fn call<'a>(method: &Method, path: &'a str) -> Option<Call<'a>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let v1 = segs.iter().position(|s| *s == "v1")?;
    let mut rest = &segs[v1 + 1..];
    if rest.first() == Some(&"accounts") && rest.len() >= 2 {
        rest = &rest[2..];
    }
    match (method, rest) {
        (&Method::POST, ["licenses", "actions", "validate-key"]) => Some(Call::ValidateKey),
        (&Method::POST | &Method::GET, ["licenses", id, "actions", "validate"]) => Some(Call::ValidateById(id)),
        (&Method::POST, ["machines"]) => Some(Call::Activate),
        (&Method::DELETE, ["machines", id]) => Some(Call::Deactivate(id)),
        _ => None,
    }
}

/// The license key of the request's credentials: `Authorization: License <key>`,
/// `Authorization: Basic base64("license:<key>")`, or `?auth=license:<key>`. Bearer tokens
/// are API tokens, not license keys.
fn auth_key(ex: &Exchange) -> Option<String> {
    if let Some(v) = ex
        .request_headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some((scheme, cred)) = v.trim().split_once(' ') {
            let cred = cred.trim();
            if scheme.eq_ignore_ascii_case("license") && !cred.is_empty() {
                return Some(cred.to_string());
            }
            if scheme.eq_ignore_ascii_case("basic") {
                let key = base64::engine::general_purpose::STANDARD
                    .decode(cred)
                    .ok()
                    .and_then(|raw| String::from_utf8(raw).ok())
                    .and_then(|text| {
                        text.strip_prefix("license:")
                            .filter(|k| !k.is_empty())
                            .map(str::to_string)
                    });
                if key.is_some() {
                    return key;
                }
            }
        }
    }
    ex.query_param("auth")?
        .strip_prefix("license:")
        .filter(|k| !k.is_empty())
        .map(str::to_string)
}

/// The contract result of a Keygen validation code (docs/adapters.md).
pub fn code_result(code: &str) -> &'static str {
    match code {
        "VALID" => "valid",
        "NOT_FOUND" => "not_found",
        "BANNED" => "revoked",
        "SUSPENDED" => "suspended",
        "EXPIRED" => "expired",
        "OVERDUE" | "HEARTBEAT_NOT_STARTED" | "HEARTBEAT_DEAD" => "overdue",
        "ENTITLEMENTS_MISSING" | "CHECKSUM_SCOPE_MISMATCH" | "VERSION_SCOPE_MISMATCH" => "feature_denied",
        "TOO_MANY_USERS" | "TOO_MANY_MACHINES" | "TOO_MANY_CORES" | "TOO_MUCH_MEMORY" | "TOO_MUCH_DISK"
        | "TOO_MANY_PROCESSES" => "limit_exceeded",
        c if c.ends_with("_SCOPE_MISMATCH") || c == "NO_MACHINE" || c == "NO_MACHINES" => "domain_mismatch",
        c if c.ends_with("_SCOPE_REQUIRED") || c.ends_with("_SCOPE_EMPTY") => "invalid_format",
        _ => "error",
    }
}

/// The parts of a Keygen answer the adapter reads.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Answer<'a> {
    #[serde(borrow)]
    data: Obj<LicenseDoc<'a>>,
    #[serde(borrow)]
    meta: Obj<Meta<'a>>,
    #[serde(borrow)]
    errors: First<ErrorDoc<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Meta<'a> {
    #[serde(borrow)]
    valid: Scalar<'a>,
    #[serde(borrow)]
    code: Scalar<'a>,
    /// API versions 1.0 and 1.1.
    #[serde(borrow)]
    constant: Scalar<'a>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct ErrorDoc<'a> {
    #[serde(borrow)]
    code: Scalar<'a>,
}

/// A license document (`data` of a validation answer).
#[derive(Default, Deserialize)]
#[serde(default)]
struct LicenseDoc<'a> {
    #[serde(borrow)]
    id: Scalar<'a>,
    #[serde(borrow)]
    attributes: Obj<LicenseAttributes<'a>>,
    #[serde(borrow)]
    relationships: Obj<Relationships<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct LicenseAttributes<'a> {
    #[serde(borrow)]
    key: Scalar<'a>,
    #[serde(borrow)]
    expiry: Scalar<'a>,
    #[serde(borrow)]
    max_machines: Scalar<'a>,
    #[serde(borrow)]
    max_users: Scalar<'a>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Relationships<'a> {
    #[serde(borrow)]
    machines: Obj<Counted<'a>>,
    #[serde(borrow)]
    users: Obj<Counted<'a>>,
    #[serde(borrow)]
    policy: Obj<Related<'a>>,
    #[serde(borrow)]
    product: Obj<Related<'a>>,
    #[serde(borrow)]
    license: Obj<Related<'a>>,
}

/// `{"meta": {"count": n}}`
#[derive(Default, Deserialize)]
#[serde(default)]
struct Counted<'a> {
    #[serde(borrow)]
    meta: Obj<Count<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Count<'a> {
    #[serde(borrow)]
    count: Scalar<'a>,
}

/// `{"data": {"id": …}}`
#[derive(Default, Deserialize)]
#[serde(default)]
struct Related<'a> {
    #[serde(borrow)]
    data: Obj<Id<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Id<'a> {
    #[serde(borrow)]
    id: Scalar<'a>,
}

impl<'a> Related<'a> {
    fn id(&self) -> Option<&Scalar<'a>> {
        self.data.get().map(|d| &d.id)
    }
}

/// A validation request: `{"meta": {"key": …, "scope": {"fingerprint": …}}}`.
#[derive(Default, Deserialize)]
#[serde(default)]
struct ValidateRequest<'a> {
    #[serde(borrow)]
    meta: Obj<ValidateMeta<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct ValidateMeta<'a> {
    #[serde(borrow)]
    key: Scalar<'a>,
    #[serde(borrow)]
    scope: Obj<Scope<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Scope<'a> {
    #[serde(borrow)]
    fingerprint: Scalar<'a>,
}

/// A machine activation: `{"data": {"attributes": {"fingerprint": …}, "relationships":
/// {"license": {"data": {"id": …}}}}}`.
#[derive(Default, Deserialize)]
#[serde(default)]
struct ActivateRequest<'a> {
    #[serde(borrow)]
    data: Obj<MachineDoc<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct MachineDoc<'a> {
    #[serde(borrow)]
    attributes: Obj<Scope<'a>>,
    #[serde(borrow)]
    relationships: Obj<Relationships<'a>>,
}

/// The result of a non-validation answer, by HTTP status (and the first error's code).
fn status_result(status: StatusCode, answer: Option<&Answer>) -> &'static str {
    let code = answer
        .and_then(|a| a.errors.get())
        .and_then(|e| e.code.as_str())
        .unwrap_or("");
    match status.as_u16() {
        200..=299 => "valid",
        429 => "rate_limited",
        401 | 403 | 404 => "not_found",
        422 if code.ends_with("_LIMIT_EXCEEDED") => "limit_exceeded",
        400..=499 => "invalid_format",
        _ => "error",
    }
}

/// License fields of a license document (`data` of a validation answer).
fn license_fields<'a>(e: &mut RawEvent<'a>, data: &LicenseDoc<'a>) {
    if let Some(a) = data.attributes.get() {
        e.machines_limit = a.max_machines.as_u64();
        e.seats_limit = a.max_users.as_u64();
        e.expires_at = a.expiry.clone().into_str().filter(|x| parse_rfc3339_ns(x).is_some());
    }
    if let Some(r) = data.relationships.get() {
        let count = |c: &Obj<Counted>| c.get()?.meta.get()?.count.as_u64();
        e.machines_used = count(&r.machines);
        e.seats_used = count(&r.users);
        let id = |rel: &Obj<Related<'a>>| rel.get()?.id()?.clone().into_str().filter(|v| v.len() <= 128);
        e.plan = id(&r.policy);
        e.product = id(&r.product);
    }
}

/// Keygen license and machine ids are UUIDs; Keygen also accepts a license's key in their
/// place, so anything else in an id position is treated as a key (and pseudonymised).
fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// Identity: a key wins over a license id (one license, one pseudonym). A "license id" that is
/// not a UUID is a key Keygen accepts in its place: pseudonymised as a key, never stored raw.
fn identify<'a>(
    e: &mut RawEvent<'a>,
    key: Option<Cow<'a, str>>,
    license_id: Option<Cow<'a, str>>,
) -> Result<(), Unreadable> {
    let (key, license_id) = match (key, license_id) {
        (None, Some(id)) if !is_uuid(&id) => (Some(id), None),
        other => other,
    };
    match (key, license_id) {
        (Some(k), _) => e.license_key = Some(k),
        (None, Some(id)) if !id.is_empty() && id.len() <= 128 => e.license = Some(id),
        _ => {
            return Err(Unreadable(
                "no_license",
                "neither a license key nor a license id".into(),
            ))
        }
    }
    Ok(())
}

/// A machine fingerprint, when there is one.
fn machine<'a>(fingerprint: Option<&Scalar<'a>>) -> Option<Cow<'a, str>> {
    fingerprint?.clone().into_str().filter(|f| !f.is_empty())
}

fn keygen_code<'a>(code: Option<&str>) -> Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>> {
    let c = code.filter(|c| c.len() <= 64)?;
    Some(BTreeMap::from([(
        Cow::Borrowed("keygen_code"),
        Cow::Owned(c.to_string()),
    )]))
}

impl Adapter for Keygen {
    fn request_headers(&self) -> Vec<http::HeaderName> {
        vec![header::AUTHORIZATION]
    }

    fn events<'a>(&self, ex: &'a Exchange) -> Result<Vec<RawEvent<'a>>, Unreadable> {
        let Some(call) = call(&ex.method, &ex.path) else {
            return Ok(Vec::new());
        };
        let answer: Option<Answer> = ex.response()?;
        let answer = answer.as_ref();
        let mut e;
        match call {
            Call::ValidateKey | Call::ValidateById(_) => {
                e = new_event(ex, "license.validated");
                let meta = answer.and_then(|a| a.meta.get());
                // `constant` (API 1.0 and 1.1) only where there is no `code` at all.
                let code = meta.and_then(|m| match &m.code {
                    Scalar::Absent => m.constant.as_str(),
                    code => code.as_str(),
                });
                let result = match (meta.and_then(|m| m.valid.as_bool()), code) {
                    _ if !ex.status.is_success() => status_result(ex.status, answer),
                    (Some(true), _) => "valid",
                    (_, Some(c)) => code_result(c),
                    (Some(false), None) => "error",
                    (None, None) => {
                        return Err(Unreadable("unreadable_response", "no meta.valid or meta.code".into()));
                    }
                };
                e.result = Some(Cow::Borrowed(result));
                e.attrs = keygen_code(code);
                let data = answer.and_then(|a| a.data.get());
                if let Some(d) = data {
                    license_fields(&mut e, d);
                }
                let req: Option<ValidateRequest> = ex.request();
                let req_meta = req.as_ref().and_then(|r| r.meta.get());
                let body_key = req_meta.and_then(|m| m.key.clone().into_str());
                let echoed_key = data
                    .and_then(|d| d.attributes.get())
                    .and_then(|a| a.key.clone().into_str());
                let key = body_key.or(echoed_key).or_else(|| auth_key(ex).map(Cow::Owned));
                let id = match call {
                    Call::ValidateById(id) => Some(Cow::Borrowed(id)),
                    _ => data.and_then(|d| d.id.clone().into_str()),
                };
                identify(&mut e, key, id)?;
                e.machine = machine(req_meta.and_then(|m| m.scope.get()).map(|s| &s.fingerprint));
            }
            Call::Activate => {
                e = new_event(ex, "license.activated");
                e.result = Some(Cow::Borrowed(status_result(ex.status, answer)));
                let req: Option<ActivateRequest> = ex.request();
                let machine_doc = req.as_ref().and_then(|r| r.data.get());
                let license_id = machine_doc
                    .and_then(|d| d.relationships.get())
                    .and_then(|r| r.license.get())
                    .and_then(|l| l.id())
                    .and_then(|id| id.clone().into_str());
                identify(&mut e, auth_key(ex).map(Cow::Owned), license_id)?;
                e.machine = machine(machine_doc.and_then(|d| d.attributes.get()).map(|a| &a.fingerprint));
                e.attrs = keygen_code(answer.and_then(|a| a.errors.get()).and_then(|e| e.code.as_str()));
            }
            Call::Deactivate(machine) => {
                e = new_event(ex, "license.deactivated");
                e.result = Some(Cow::Borrowed(status_result(ex.status, answer)));
                identify(&mut e, auth_key(ex).map(Cow::Owned), None)?;
                if !machine.is_empty() {
                    e.machine = Some(Cow::Borrowed(machine));
                }
            }
        }
        Ok(vec![e])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_exchange;
    use http::HeaderValue;
    use serde_json::{json, Value};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures/license-apis/");

    fn fixture(name: &str) -> Option<Value> {
        let text = std::fs::read_to_string(format!("{FIXTURES}{name}")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn ex(method: Method, path: &str, headers: &[(&str, &str)], req: &str, status: u16, resp: &str) -> Exchange {
        let mut x = test_exchange(method.as_str(), path, headers, req, status, resp);
        x.time = 1_764_000_000_123_000_000;
        x
    }

    fn one(x: &Exchange) -> Value {
        let mut v = Keygen.events(x).unwrap();
        assert_eq!(v.len(), 1);
        serde_json::to_value(v.remove(0)).unwrap()
    }

    const VALIDATE_KEY: &str = "/v1/accounts/acme/licenses/actions/validate-key";

    #[test]
    fn routes_with_and_without_the_account_prefix() {
        assert_eq!(call(&Method::POST, VALIDATE_KEY), Some(Call::ValidateKey));
        assert_eq!(
            call(&Method::POST, "/v1/licenses/actions/validate-key"),
            Some(Call::ValidateKey)
        );
        assert_eq!(
            call(&Method::GET, "/v1/licenses/8d1f/actions/validate"),
            Some(Call::ValidateById("8d1f"))
        );
        assert_eq!(call(&Method::POST, "/v1/accounts/a/machines"), Some(Call::Activate));
        assert_eq!(call(&Method::DELETE, "/v1/machines/m1"), Some(Call::Deactivate("m1")));
        assert_eq!(call(&Method::GET, "/v1/accounts/a/licenses/x"), None);
        assert_eq!(call(&Method::POST, "/v1/accounts/a/machines/m1/actions/ping"), None);
    }

    #[test]
    fn validate_key_with_usage_and_code() {
        let resp = r#"{"data":{"id":"lic-1","type":"licenses","attributes":{"key":"KEY-1","expiry":"2027-01-01T00:00:00.000Z","maxMachines":3},
            "relationships":{"machines":{"meta":{"count":2}},"policy":{"data":{"type":"policies","id":"pol-pro"}}}},
            "meta":{"valid":false,"detail":"fingerprint is not activated","code":"FINGERPRINT_SCOPE_MISMATCH"}}"#;
        let x = ex(
            Method::POST,
            VALIDATE_KEY,
            &[],
            r#"{"meta":{"key":"KEY-1","scope":{"fingerprint":"fp-9"}}}"#,
            200,
            resp,
        );
        assert_eq!(
            one(&x),
            json!({"type":"license.validated","time":1_764_000_000_123i64,"result":"domain_mismatch",
                "attrs":{"keygen_code":"FINGERPRINT_SCOPE_MISMATCH"},"machines_limit":3,"machines_used":2,
                "expires_at":"2027-01-01T00:00:00.000Z","plan":"pol-pro","license_key":"KEY-1","machine":"fp-9"})
        );
    }

    #[test]
    fn valid_true_with_an_over_limit_code_is_valid_with_its_usage() {
        let resp = r#"{"data":{"id":"l","attributes":{"maxMachines":2},"relationships":{"machines":{"meta":{"count":3}}}},
            "meta":{"valid":true,"code":"TOO_MANY_MACHINES"}}"#;
        let v = one(&ex(
            Method::POST,
            VALIDATE_KEY,
            &[],
            r#"{"meta":{"key":"K"}}"#,
            200,
            resp,
        ));
        assert_eq!(v["result"], "valid");
        assert_eq!(
            (v["machines_used"].as_u64(), v["machines_limit"].as_u64()),
            (Some(3), Some(2))
        );
        assert_eq!(v["attrs"]["keygen_code"], "TOO_MANY_MACHINES");
    }

    #[test]
    fn every_code_of_the_fixture_maps_and_meta_constant_is_read() {
        let codes = fixture("keygen_validation_codes.json");
        let Some(codes) = codes else {
            eprintln!("fixtures not beside the checkout; skipped");
            return;
        };
        let mut seen = 0;
        let text = codes.to_string();
        for code in text
            .split('"')
            .filter(|s| s.len() > 2 && s.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        {
            let r = code_result(code);
            assert_ne!(r, "error", "{code} has no mapping");
            seen += 1;
        }
        assert!(seen >= 38, "{seen} codes");
        // API 1.0/1.1: the code is in meta.constant.
        let resp = r#"{"data":null,"meta":{"valid":false,"detail":"is suspended","constant":"SUSPENDED"}}"#;
        let v = one(&ex(
            Method::POST,
            VALIDATE_KEY,
            &[],
            r#"{"meta":{"key":"K"}}"#,
            200,
            resp,
        ));
        assert_eq!(v["result"], "suspended");
    }

    #[test]
    fn keys_from_every_credential_form() {
        let id = "8f1d2c3b-0a9e-4f5d-8c7b-6a5e4d3c2b1a";
        let resp = format!(r#"{{"data":{{"id":"{id}","attributes":{{}}}},"meta":{{"valid":true,"code":"VALID"}}}}"#);
        let resp = resp.as_str();
        let path = format!("/v1/licenses/{id}/actions/validate");
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("license:KEY-B")
        );
        for (headers, query, want) in [
            (vec![("authorization", "License KEY-A")], "", "KEY-A"),
            (vec![("authorization", basic.as_str())], "", "KEY-B"),
            (vec![], "?auth=license%3AKEY-C", "KEY-C"),
            (
                vec![("authorization", "Basic !!not-base64")],
                "?auth=license%3AKEY-D",
                "KEY-D",
            ),
        ] {
            let v = one(&ex(Method::POST, &format!("{path}{query}"), &headers, "", 200, resp));
            assert_eq!(v["license_key"], want);
        }
        // A bearer token is not a license key: the license id is used.
        let v = one(&ex(
            Method::POST,
            &path,
            &[("authorization", "Bearer prod-xyz")],
            "",
            200,
            resp,
        ));
        assert_eq!((v.get("license_key"), v["license"].as_str()), (None, Some(id)));
        // Keygen accepts a key where the id goes: then it is a key, never stored raw.
        let v = one(&ex(
            Method::POST,
            "/v1/licenses/KEY-IN-PATH/actions/validate",
            &[],
            "",
            200,
            resp,
        ));
        assert_eq!(
            (v["license_key"].as_str(), v.get("license")),
            (Some("KEY-IN-PATH"), None)
        );
    }

    #[test]
    fn activation_deactivation_and_errors() {
        let req = r#"{"data":{"type":"machines","attributes":{"fingerprint":"4d:Eq"},"relationships":{"license":{"data":{"type":"licenses","id":"0b4f2c1d-9e8a-4b7c-a6d5-e4f3a2b1c0d9"}}}}}"#;
        let auth = [("authorization", "License KEY-1")];
        let v = one(&ex(
            Method::POST,
            "/v1/accounts/a/machines",
            &auth,
            req,
            201,
            r#"{"data":{"id":"m-1"}}"#,
        ));
        assert_eq!(
            (
                v["type"].as_str(),
                v["result"].as_str(),
                v["machine"].as_str(),
                v["license_key"].as_str()
            ),
            (Some("license.activated"), Some("valid"), Some("4d:Eq"), Some("KEY-1"))
        );
        let limit = r#"{"errors":[{"title":"Unprocessable resource","detail":"machine count has exceeded maximum allowed for license (4)","code":"MACHINE_LIMIT_EXCEEDED","source":{"pointer":"/data"}}]}"#;
        let v = one(&ex(Method::POST, "/v1/accounts/a/machines", &[], req, 422, limit));
        assert_eq!(
            (v["result"].as_str(), v["license"].as_str()),
            (Some("limit_exceeded"), Some("0b4f2c1d-9e8a-4b7c-a6d5-e4f3a2b1c0d9"))
        );
        // Keys that repeat count with their last value, as Keygen reads them (not a way to
        // slip an activation past the recorder).
        let repeated = r#"{"data":{"attributes":{"fingerprint":"old"},"attributes":{"fingerprint":"new"},"relationships":{"license":{"data":{"id":"0b4f2c1d-9e8a-4b7c-a6d5-e4f3a2b1c0d9"}}}}}"#;
        let twice = r#"{"errors":[{"code":"MACHINE_LIMIT_EXCEEDED","code":"MACHINE_LIMIT_EXCEEDED"}],"errors":[{"code":"MACHINE_LIMIT_EXCEEDED"}]}"#;
        let v = one(&ex(Method::POST, "/v1/machines", &[], repeated, 422, twice));
        assert_eq!(
            (v["machine"].as_str(), v["license"].as_str(), v["result"].as_str()),
            (
                Some("new"),
                Some("0b4f2c1d-9e8a-4b7c-a6d5-e4f3a2b1c0d9"),
                Some("limit_exceeded")
            )
        );
        // A key where the license id goes is pseudonymised as a key, never stored raw.
        let keyed = req.replace("0b4f2c1d-9e8a-4b7c-a6d5-e4f3a2b1c0d9", "RAW-KEY-IN-ID");
        let v = one(&ex(Method::POST, "/v1/machines", &[], &keyed, 201, "{}"));
        assert_eq!(
            (v["license_key"].as_str(), v.get("license")),
            (Some("RAW-KEY-IN-ID"), None)
        );
        let taken = r#"{"errors":[{"detail":"has already been taken","code":"FINGERPRINT_TAKEN"}]}"#;
        assert_eq!(
            one(&ex(Method::POST, "/v1/machines", &auth, req, 422, taken))["result"],
            "invalid_format"
        );
        let v = one(&ex(Method::DELETE, "/v1/machines/m-1", &auth, "", 204, ""));
        assert_eq!(
            (v["type"].as_str(), v["machine"].as_str()),
            (Some("license.deactivated"), Some("m-1"))
        );
        // Throttled and failing servers.
        let v = one(&ex(
            Method::POST,
            VALIDATE_KEY,
            &[],
            r#"{"meta":{"key":"K"}}"#,
            429,
            r#"{"errors":[{"title":"Too many requests"}]}"#,
        ));
        assert_eq!(v["result"], "rate_limited");
        let v = one(&ex(
            Method::POST,
            VALIDATE_KEY,
            &[],
            r#"{"meta":{"key":"K"}}"#,
            502,
            "<html>bad gateway</html>",
        ));
        assert_eq!(v["result"], "error");
        // No identity at all: not recorded, with a reason.
        let e = Keygen
            .events(&ex(Method::DELETE, "/v1/machines/m-1", &[], "", 204, ""))
            .unwrap_err();
        assert_eq!(e.0, "no_license");
        // Not a license call: nothing.
        assert!(Keygen
            .events(&ex(Method::GET, "/v1/me", &auth, "", 200, "{}"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn unreadable_answers_are_reasons_not_events() {
        let mut x = ex(
            Method::POST,
            VALIDATE_KEY,
            &[],
            r#"{"meta":{"key":"K"}}"#,
            200,
            "{not json",
        );
        assert_eq!(Keygen.events(&x).unwrap_err().0, "unreadable_response");
        x.response_body.complete = false;
        assert_eq!(Keygen.events(&x).unwrap_err().0, "body_incomplete");
        x.response_body.complete = true;
        x.response_headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(Keygen.events(&x).unwrap_err().0, "unreadable_response", "not gzip");
    }
}
