//! One proxied exchange through a vendor adapter and then the ingest validator, as the agent's
//! recorder does it: the first bytes pick the adapter, the route, the method, the status and
//! the headers; the rest, split at 0xFF bytes, are the request body, the response body and
//! the query string. Events or a reason, never a panic; every event the validator accepts is
//! within the limits; the raw key sent in `Authorization: License` never survives into an
//! accepted event.
#![no_main]

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use keytrail_agent::proxy::{gumroad::Gumroad, keygen::Keygen, lemonsqueezy::LemonSqueezy};
use keytrail_agent::proxy::{Adapter, Capture, Exchange, Unreadable};
use keytrail_common::event::{parse_raw, Context, FixedDefaults};
use keytrail_common::fingerprint::Fingerprinter;
use libfuzzer_sys::fuzz_target;

const RAW_KEY: &str = "RAWKEY-FUZZ-7731-C0DE";

const PATHS: [&str; 9] = [
    "/v1/accounts/acme/licenses/actions/validate-key",
    "/v1/accounts/acme/licenses/lic-1/actions/validate",
    "/v1/accounts/acme/machines",
    "/v1/accounts/acme/machines/mach-1",
    "/v1/licenses/activate",
    "/v1/licenses/validate",
    "/v1/licenses/deactivate",
    "/v2/licenses/verify",
    "/v1/other",
];
const STATUSES: [u16; 10] = [200, 201, 204, 400, 401, 403, 404, 422, 429, 500];

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let adapters: [&dyn Adapter; 3] = [&Keygen, &LemonSqueezy, &Gumroad];
    let adapter = adapters[data[0] as usize % 3];
    let path = PATHS[data[1] as usize % PATHS.len()];
    let method = [Method::POST, Method::GET, Method::DELETE][data[2] as usize % 3].clone();
    let status = StatusCode::from_u16(STATUSES[data[3] as usize % STATUSES.len()]).unwrap();
    let mut parts = data[4..].split(|b| *b == 0xFF);
    let request_body = parts.next().unwrap_or_default().to_vec();
    let response_body = parts.next().unwrap_or_default().to_vec();
    let query = parts.next().map(|q| String::from_utf8_lossy(q).into_owned());
    let mut request_headers = HeaderMap::new();
    let form = data[2] & 0x80 != 0;
    request_headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(if form {
            "application/x-www-form-urlencoded"
        } else {
            "application/json"
        }),
    );
    if data[1] & 0x80 != 0 {
        request_headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("License {RAW_KEY}")).unwrap(),
        );
    }
    let mut response_headers = HeaderMap::new();
    response_headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let ex = Exchange {
        time: 1_795_000_000_000_000_000,
        method,
        path: path.to_string(),
        query,
        request_headers,
        request_body: Capture {
            bytes: request_body,
            complete: true,
        },
        status,
        response_headers,
        response_body: Capture {
            bytes: response_body,
            complete: true,
        },
        decoded: Default::default(),
    };
    let values = match adapter.events(&ex) {
        Ok(v) => v,
        Err(Unreadable(reason, _)) => {
            assert!(!reason.is_empty());
            return;
        }
    };
    let fp = Fingerprinter::new(b"fuzz-secret".to_vec());
    let d = FixedDefaults {
        agent_id: "fuzz-agent".into(),
        context: Context::default(),
        now: 1_795_000_000_000_000_000,
    };
    match parse_raw(values, &fp, &d) {
        Ok(events) => {
            let key_elsewhere = data[4..].windows(RAW_KEY.len()).any(|w| w == RAW_KEY.as_bytes());
            for e in &events {
                assert!(e.check_limits().is_ok(), "accepted an event over the limits: {e:?}");
                if !key_elsewhere {
                    assert!(
                        !format!("{e:?}").contains(RAW_KEY),
                        "the raw key from the Authorization header survived: {e:?}"
                    );
                }
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
