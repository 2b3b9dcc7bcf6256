//! Gumroad's license check: `POST /v2/licenses/verify` (`product_id` or `product_permalink`,
//! and `license_key`, as form, JSON or query parameters). The mapping is in
//! `docs/adapters.md`.
//!
//! Gumroad answers failures with 404 for three different causes, told apart only by the
//! message. `uses` counts verifications, not machines or seats, so it goes to an attribute;
//! the buyer's email and the echoed key are never recorded.

use std::borrow::Cow;
use std::collections::BTreeMap;

use http::{Method, StatusCode};
use keytrail_common::event::RawEvent;
use serde::Deserialize;

use super::json::{Obj, Scalar};
use super::{new_event, Adapter, Exchange, Unreadable};

pub struct Gumroad;

fn is_verify(method: &Method, path: &str) -> bool {
    (method == Method::POST || method == Method::GET) && path.trim_end_matches('/').ends_with("/v2/licenses/verify")
}

/// The parts of a Gumroad answer the adapter reads.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Answer<'a> {
    #[serde(borrow)]
    success: Scalar<'a>,
    #[serde(borrow)]
    message: Scalar<'a>,
    #[serde(borrow)]
    uses: Scalar<'a>,
    #[serde(borrow)]
    purchase: Obj<Purchase<'a>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Purchase<'a> {
    #[serde(borrow)]
    product_id: Scalar<'a>,
    #[serde(borrow)]
    variants: Scalar<'a>,
    #[serde(borrow)]
    is_multiseat_license: Scalar<'a>,
    #[serde(borrow)]
    quantity: Scalar<'a>,
    #[serde(borrow)]
    refunded: Scalar<'a>,
    #[serde(borrow)]
    chargebacked: Scalar<'a>,
    #[serde(borrow)]
    disputed: Scalar<'a>,
    #[serde(borrow)]
    subscription_failed_at: Scalar<'a>,
    #[serde(borrow)]
    subscription_cancelled_at: Scalar<'a>,
    #[serde(borrow)]
    subscription_ended_at: Scalar<'a>,
}

/// The contract result (docs/adapters.md).
fn result(status: StatusCode, resp: Option<&Answer>) -> &'static str {
    let success = resp.and_then(|r| r.success.as_bool());
    let message = resp.and_then(|r| r.message.as_str()).unwrap_or("").to_ascii_lowercase();
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
    fn events<'a>(&self, ex: &'a Exchange) -> Result<Vec<RawEvent<'a>>, Unreadable> {
        if !is_verify(&ex.method, &ex.path) {
            return Ok(Vec::new());
        }
        let resp: Option<Answer> = ex.response()?;
        let mut e = new_event(ex, "license.validated");
        e.result = Some(Cow::Borrowed(result(ex.status, resp.as_ref())));
        let key = ex
            .request_field("license_key")
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Unreadable("no_license", "no license_key in the request".into()))?;
        e.license_key = Some(key);
        let requested = ex
            .request_field("product_id")
            .or_else(|| ex.request_field("product_permalink"));
        let Some(Answer { uses, purchase, .. }) = resp else {
            e.product = requested.and_then(|p| Scalar::Str(p).into_short());
            return Ok(vec![e]);
        };
        let purchase = purchase.0;
        e.product = match requested {
            Some(p) => Scalar::Str(p).into_short(),
            None => purchase.as_ref().and_then(|p| p.product_id.clone().into_short()),
        };
        if let Some(p) = purchase {
            e.plan = p.variants.into_short();
            if p.is_multiseat_license.as_bool() == Some(true) {
                e.seats_limit = p.quantity.as_u64();
            }
            let mut attrs = BTreeMap::new();
            if let Some(u) = uses.into_short() {
                attrs.insert(Cow::Borrowed("gumroad_uses"), u);
            }
            for (flag, v) in [
                ("gumroad_refunded", &p.refunded),
                ("gumroad_chargebacked", &p.chargebacked),
                ("gumroad_disputed", &p.disputed),
            ] {
                if v.as_bool() == Some(true) {
                    attrs.insert(Cow::Borrowed(flag), Cow::Borrowed("true"));
                }
            }
            for (at, state) in [
                (&p.subscription_failed_at, "failed"),
                (&p.subscription_cancelled_at, "cancelled"),
                (&p.subscription_ended_at, "ended"),
            ] {
                if *at != Scalar::Absent {
                    attrs.insert(Cow::Borrowed("gumroad_subscription"), Cow::Borrowed(state));
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
    use serde_json::{json, Value};

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
        serde_json::to_value(v.remove(0)).unwrap()
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
