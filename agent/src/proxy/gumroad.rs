//! Gumroad's license check: `POST /v2/licenses/verify` (`product_id` or `product_permalink`,
//! and `license_key`, as form, JSON or query parameters). The mapping is in
//! `docs/adapters.md`.
//!
//! Gumroad answers failures with 404 for three different causes, told apart only by the
//! message. `uses` counts verifications, not machines or seats, so it goes to an attribute;
//! the buyer's email and the echoed key are never recorded.

use http::{Method, StatusCode};
use serde_json::{Map, Value};

use super::{new_event, put_str, Adapter, Exchange, Unreadable};

pub struct Gumroad;

fn is_verify(method: &Method, path: &str) -> bool {
    (method == Method::POST || method == Method::GET) && path.trim_end_matches('/').ends_with("/v2/licenses/verify")
}

/// The contract result (docs/adapters.md).
fn result(status: StatusCode, resp: Option<&Value>) -> &'static str {
    let success = resp.and_then(|r| r.get("success")).and_then(Value::as_bool);
    let message = resp
        .and_then(|r| r.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    match status.as_u16() {
        200..=299 if success == Some(true) => "valid",
        429 => "rate_limited",
        404 if message.contains("disabled") => "suspended",
        404 if message.contains("expired") => "expired",
        404 => "not_found",
        // A missing product_id is answered with a 500 and a message naming the parameter.
        500 if message.contains("parameter") => "invalid_format",
        400..=499 => "invalid_format",
        _ => "error",
    }
}

impl Adapter for Gumroad {
    fn events(&self, ex: &Exchange) -> Result<Vec<Value>, Unreadable> {
        if !is_verify(&ex.method, &ex.path) {
            return Ok(Vec::new());
        }
        let resp = ex.response_json()?;
        let mut e: Map<String, Value> = new_event(ex, "license.validated");
        e.insert("result".into(), result(ex.status, resp.as_ref()).into());
        let key = ex
            .request_field("license_key")
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Unreadable("no_license", "no license_key in the request".into()))?;
        e.insert("license_key".into(), key.into());
        let product = ex
            .request_field("product_id")
            .or_else(|| ex.request_field("product_permalink"))
            .map(Value::String);
        put_str(
            &mut e,
            "product",
            product
                .as_ref()
                .or(resp.as_ref().and_then(|r| r.pointer("/purchase/product_id"))),
        );
        if let Some(p) = resp.as_ref().and_then(|r| r.get("purchase")).filter(|p| p.is_object()) {
            put_str(&mut e, "plan", p.get("variants"));
            if p.get("is_multiseat_license").and_then(Value::as_bool) == Some(true) {
                if let Some(q) = p.get("quantity").and_then(Value::as_u64) {
                    e.insert("seats_limit".into(), q.into());
                }
            }
            let mut attrs = Map::new();
            put_str(&mut attrs, "gumroad_uses", resp.as_ref().and_then(|r| r.get("uses")));
            for flag in ["refunded", "chargebacked", "disputed"] {
                if p.get(flag).and_then(Value::as_bool) == Some(true) {
                    attrs.insert(format!("gumroad_{flag}"), "true".into());
                }
            }
            for (field, state) in [
                ("subscription_failed_at", "failed"),
                ("subscription_cancelled_at", "cancelled"),
                ("subscription_ended_at", "ended"),
            ] {
                if p.get(field).is_some_and(|v| !v.is_null()) {
                    attrs.insert("gumroad_subscription".into(), state.into());
                }
            }
            if !attrs.is_empty() {
                e.insert("attrs".into(), Value::Object(attrs));
            }
        }
        Ok(vec![Value::Object(e)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_exchange;
    use serde_json::json;

    fn ex(query: Option<&str>, form: &str, status: u16, resp: &str) -> Exchange {
        let path = match query {
            Some(q) => format!("/v2/licenses/verify?{q}"),
            None => "/v2/licenses/verify".to_string(),
        };
        test_exchange("POST", &path, &[], form, status, resp)
    }

    fn one(x: &Exchange) -> Value {
        let mut v = Gumroad.events(x).unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    #[test]
    fn success_with_purchase_fields_and_no_personal_data() {
        let resp = json!({"success":true,"uses":3,"purchase":{"id":"p1","product_id":"prod-9","variants":"(Team)","email":"buyer@example.com",
            "license_key":"ABCD-1234","is_multiseat_license":true,"quantity":5,"refunded":true,"chargebacked":false,"subscription_cancelled_at":"2026-11-01T00:00:00Z"}});
        let v = one(&ex(
            None,
            "product_id=prod-9&license_key=ABCD-1234",
            200,
            &resp.to_string(),
        ));
        assert_eq!(
            v,
            json!({"type":"license.validated","time":1_764_000_000_000i64,"result":"valid","license_key":"ABCD-1234",
                "product":"prod-9","plan":"(Team)","seats_limit":5,
                "attrs":{"gumroad_uses":"3","gumroad_refunded":"true","gumroad_subscription":"cancelled"}})
        );
        assert!(!v.to_string().contains("buyer@"));
    }

    #[test]
    fn each_failure_and_the_key_from_the_query() {
        let msg = |m: &str| json!({"success":false,"message":m}).to_string();
        let cases = [
            (404, msg("That license does not exist for the provided product."), "not_found"),
            (404, msg("Access to the purchase associated with this license has expired."), "expired"),
            (404, msg("This license key has been disabled."), "suspended"),
            (400, msg("The 'license_key' parameter must be a string."), "invalid_format"),
            (500, msg("The 'product_id' parameter is required to verify the license for this product. Please set 'product_id' to 'x' in the request."), "invalid_format"),
            (502, "<html>".to_string(), "error"),
            (429, "".to_string(), "rate_limited"),
        ];
        for (status, body, want) in cases {
            let v = one(&ex(None, "product_id=p&license_key=K", status, &body));
            assert_eq!(v["result"], want, "{status} {body}");
        }
        let v = one(&ex(
            Some("product_permalink=perm&license_key=Q-KEY"),
            "",
            200,
            r#"{"success":true,"uses":1}"#,
        ));
        assert_eq!(
            (v["license_key"].as_str(), v["product"].as_str()),
            (Some("Q-KEY"), Some("perm"))
        );
        assert_eq!(
            Gumroad.events(&ex(None, "product_id=p", 200, "{}")).unwrap_err().0,
            "no_license"
        );
    }
}
