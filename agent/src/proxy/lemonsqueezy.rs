//! Lemon Squeezy's license API: `POST /v1/licenses/{activate,validate,deactivate}`, with
//! form-encoded or JSON bodies. The mapping is in `docs/adapters.md`.
//!
//! The machine is the *instance id* throughout (from the activation's answer, then the
//! `instance_id` of validations and deactivations), so an activation and its deactivation
//! pseudonymise to the same `mf_`. Instance names (often host names) and the customer's name
//! and email are never recorded.

use std::borrow::Cow;
use std::collections::BTreeMap;

use http::{Method, StatusCode};
use keytrail_common::event::RawEvent;
use keytrail_common::time::parse_rfc3339_ns;
use serde::Deserialize;

use super::json::{Obj, Scalar};
use super::{new_event, Adapter, Exchange, Unreadable};

pub struct LemonSqueezy;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Route {
    Activate,
    Validate,
    Deactivate,
}

fn route(method: &Method, path: &str) -> Option<Route> {
    if method != Method::POST {
        return None;
    }
    match path.trim_end_matches('/').rsplit_once("/v1/licenses/")?.1 {
        "activate" => Some(Route::Activate),
        "validate" => Some(Route::Validate),
        "deactivate" => Some(Route::Deactivate),
        _ => None,
    }
}

/// The parts of a Lemon Squeezy answer the adapter reads.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Answer<'a> {
    #[serde(borrow)]
    activated: Scalar<'a>,
    #[serde(borrow)]
    valid: Scalar<'a>,
    #[serde(borrow)]
    deactivated: Scalar<'a>,
    #[serde(borrow)]
    error: Scalar<'a>,
    #[serde(borrow)]
    license_key: Obj<LicenseKey<'a>>,
    #[serde(borrow)]
    instance: Obj<Instance<'a>>,
    #[serde(borrow)]
    meta: Obj<Meta<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct LicenseKey<'a> {
    #[serde(borrow)]
    status: Scalar<'a>,
    #[serde(borrow)]
    activation_limit: Scalar<'a>,
    #[serde(borrow)]
    activation_usage: Scalar<'a>,
    #[serde(borrow)]
    expires_at: Scalar<'a>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Instance<'a> {
    #[serde(borrow)]
    id: Scalar<'a>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Meta<'a> {
    #[serde(borrow)]
    variant_name: Scalar<'a>,
    #[serde(borrow)]
    product_name: Scalar<'a>,
    #[serde(borrow)]
    customer_id: Scalar<'a>,
    #[serde(borrow)]
    product_id: Scalar<'a>,
    #[serde(borrow)]
    variant_id: Scalar<'a>,
}

/// The contract result (docs/adapters.md).
fn result(route: Route, status: StatusCode, resp: Option<&Answer>) -> &'static str {
    let flag = resp
        .map(|r| match route {
            Route::Activate => &r.activated,
            Route::Validate => &r.valid,
            Route::Deactivate => &r.deactivated,
        })
        .and_then(Scalar::as_bool);
    let ls_status = resp.and_then(|r| r.license_key.get()).and_then(|l| l.status.as_str());
    let error = resp.and_then(|r| r.error.as_str()).unwrap_or("").to_ascii_lowercase();
    let by_license_status = match ls_status {
        Some("expired") => Some("expired"),
        Some("disabled") => Some("suspended"),
        _ => None,
    };
    match status.as_u16() {
        429 => "rate_limited",
        500..=599 => "error",
        422 => "invalid_format",
        404 if error.contains("instance") => "domain_mismatch",
        404 => "not_found",
        200..=299 if flag == Some(true) => match route {
            // A validation can say valid:true for a key Lemon Squeezy reports expired or
            // disabled; the key's status is the truth for validations.
            Route::Validate => by_license_status.unwrap_or("valid"),
            _ => "valid",
        },
        _ => {
            if let Some(r) = by_license_status {
                r
            } else if error.contains("activation limit") {
                "limit_exceeded"
            } else if error.contains("disabled") {
                "suspended"
            } else if error.contains("expired") {
                "expired"
            } else if error.contains("not found") {
                "not_found"
            } else {
                "invalid_format"
            }
        }
    }
}

impl Adapter for LemonSqueezy {
    fn events<'a>(&self, ex: &'a Exchange) -> Result<Vec<RawEvent<'a>>, Unreadable> {
        let Some(route) = route(&ex.method, &ex.path) else {
            return Ok(Vec::new());
        };
        let resp: Option<Answer> = ex.response()?;
        let mut e = new_event(
            ex,
            match route {
                Route::Activate => "license.activated",
                Route::Validate => "license.validated",
                Route::Deactivate => "license.deactivated",
            },
        );
        e.result = Some(Cow::Borrowed(result(route, ex.status, resp.as_ref())));
        let key = ex
            .request_field("license_key")
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Unreadable("no_license", "no license_key in the request".into()))?;
        e.license_key = Some(key);
        let instance = match route {
            Route::Activate => resp
                .as_ref()
                .and_then(|r| r.instance.get())
                .and_then(|i| i.id.clone().into_str()),
            _ => ex.request_field("instance_id"),
        };
        e.machine = instance.filter(|i| !i.is_empty() && i.len() <= 256);
        if let Some(r) = resp {
            let Answer { license_key, meta, .. } = r;
            let mut attrs = BTreeMap::new();
            if let Some(lk) = license_key.0 {
                e.machines_limit = lk.activation_limit.as_u64();
                e.machines_used = lk.activation_usage.as_u64();
                e.expires_at = lk.expires_at.into_str().filter(|x| parse_rfc3339_ns(x).is_some());
                if let Some(s) = lk.status.into_short() {
                    attrs.insert(Cow::Borrowed("ls_status"), s);
                }
            }
            if let Some(m) = meta.0 {
                e.plan = m.variant_name.into_short();
                e.product = m.product_name.into_short();
                e.customer = m.customer_id.into_short();
                if let Some(p) = m.product_id.into_short() {
                    attrs.insert(Cow::Borrowed("ls_product_id"), p);
                }
                if let Some(v) = m.variant_id.into_short() {
                    attrs.insert(Cow::Borrowed("ls_variant_id"), v);
                }
            }
            if !attrs.is_empty() {
                e.attrs = Some(attrs);
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

    fn fixture(name: &str) -> Option<String> {
        std::fs::read_to_string(format!("{FIXTURES}{name}")).ok()
    }

    fn ex(path: &str, form: &str, status: u16, resp: &str) -> Exchange {
        let form_type = [("content-type", "application/x-www-form-urlencoded")];
        test_exchange("POST", path, &form_type, form, status, resp)
    }

    fn one(x: &Exchange) -> Value {
        let mut v = LemonSqueezy.events(x).unwrap();
        assert_eq!(v.len(), 1);
        serde_json::to_value(v.remove(0)).unwrap()
    }

    #[test]
    fn the_vendor_payloads() {
        let (Some(act), Some(val), Some(deact)) = (
            fixture("lemonsqueezy_activate_response.json"),
            fixture("lemonsqueezy_validate_response.json"),
            fixture("lemonsqueezy_deactivate_response.json"),
        ) else {
            eprintln!("fixtures not beside the checkout; skipped");
            return;
        };
        let v = one(&ex(
            "/v1/licenses/activate",
            "license_key=38b1460a-5104-4067-a91d-77b872934d51&instance_name=Test",
            200,
            &act,
        ));
        assert_eq!(v["type"], "license.activated");
        assert_eq!(v["result"], "valid");
        assert_eq!(v["license_key"], "38b1460a-5104-4067-a91d-77b872934d51");
        assert_eq!(v["machine"], "47596ad9-a811-4ebf-ac8a-03fc7b6d2a17");
        assert_eq!(
            (v["machines_limit"].as_u64(), v["machines_used"].as_u64()),
            (Some(1), Some(5))
        );
        assert_eq!(
            (v["plan"].as_str(), v["product"].as_str(), v["customer"].as_str()),
            (Some("Default"), Some("Example Product"), Some("6"))
        );
        assert!(!v.to_string().contains('@'), "no email: {v}");
        let v = one(&ex(
            "/v1/licenses/validate",
            "license_key=38b1460a-5104-4067-a91d-77b872934d51&instance_id=f90ec370-fd83-46a5-8bbd-44a241e78665",
            200,
            &val,
        ));
        assert_eq!(
            (v["type"].as_str(), v["result"].as_str()),
            (Some("license.validated"), Some("valid"))
        );
        assert_eq!(v["machine"], "f90ec370-fd83-46a5-8bbd-44a241e78665");
        assert_eq!(v["expires_at"], "2022-01-24T14:15:07.000000Z");
        let v = one(&ex(
            "/v1/licenses/deactivate",
            "license_key=38b1460a-5104-4067-a91d-77b872934d51&instance_id=47596ad9-a811-4ebf-ac8a-03fc7b6d2a17",
            200,
            &deact,
        ));
        assert_eq!(
            (v["type"].as_str(), v["result"].as_str()),
            (Some("license.deactivated"), Some("valid"))
        );
        assert_eq!(
            v["machine"], "47596ad9-a811-4ebf-ac8a-03fc7b6d2a17",
            "same machine as the activation"
        );
        assert_eq!(v["attrs"]["ls_status"], "inactive");
    }

    #[test]
    fn failures_by_status_message_and_key_status() {
        let f = "license_key=K1&instance_id=i1";
        let cases = [
            (
                "activate",
                400,
                json!({"activated":false,"error":"This license key has reached the activation limit.","license_key":{"status":"active","activation_limit":1,"activation_usage":1}}),
                "limit_exceeded",
            ),
            (
                "validate",
                404,
                json!({"valid":false,"error":"license_key not found.","license_key":null}),
                "not_found",
            ),
            (
                "validate",
                404,
                json!({"valid":false,"error":"license_key instance not found."}),
                "domain_mismatch",
            ),
            (
                "validate",
                400,
                json!({"valid":false,"error":"This license key is disabled.","license_key":{"status":"disabled"}}),
                "suspended",
            ),
            (
                "validate",
                200,
                json!({"valid":true,"error":null,"license_key":{"status":"expired"}}),
                "expired",
            ),
            (
                "activate",
                400,
                json!({"activated":false,"error":"This license key has expired."}),
                "expired",
            ),
            (
                "deactivate",
                422,
                json!({"error":"The instance id field is required."}),
                "invalid_format",
            ),
            ("validate", 429, json!({"error":"Too Many Attempts."}), "rate_limited"),
            ("validate", 503, json!(null), "error"),
        ];
        for (r, status, body, want) in cases {
            let v = one(&ex(&format!("/v1/licenses/{r}"), f, status, &body.to_string()));
            assert_eq!(v["result"], want, "{r} {status} {body}");
        }
    }

    #[test]
    fn json_bodies_missing_keys_and_other_routes() {
        let mut x = ex(
            "/v1/licenses/validate",
            r#"{"license_key":"K-JSON","instance_id":"i9"}"#,
            200,
            r#"{"valid":true}"#,
        );
        x.request_headers
            .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let v = one(&x);
        assert_eq!(
            (v["license_key"].as_str(), v["machine"].as_str()),
            (Some("K-JSON"), Some("i9"))
        );
        let e = LemonSqueezy
            .events(&ex("/v1/licenses/validate", "instance_id=i1", 200, r#"{"valid":true}"#))
            .unwrap_err();
        assert_eq!(e.0, "no_license");
        assert!(LemonSqueezy
            .events(&ex("/v1/orders", "", 200, "{}"))
            .unwrap()
            .is_empty());
    }
}
