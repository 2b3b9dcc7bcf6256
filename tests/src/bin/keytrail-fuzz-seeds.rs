//! `keytrail-fuzz-seeds DIR`: writes seed inputs for the fuzz targets (`scripts/fuzz.sh`): a
//! valid record payload and a valid sealed frame of realistic events, made by the project's
//! own encoder, so the fuzzer starts from inputs that get past the checksum and the header;
//! and license-server exchanges of each vendor's shape for the proxy adapters.

use keytrail_common::event::{parse_body, BodyFormat, Context, FixedDefaults};
use keytrail_common::fingerprint::Fingerprinter;
use keytrail_common::wire::{self, BatchSeq};
use keytrail_tests::traffic::Traffic;

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".into()));
    let fp = Fingerprinter::new(b"seed-secret".to_vec());
    let mut t = Traffic::new(3, 20);
    let body: String = (0..8).map(|_| t.event() + "\n").collect();
    let events = parse_body(
        body.as_bytes(),
        BodyFormat::Ndjson,
        &fp,
        &FixedDefaults {
            agent_id: "seed-agent".into(),
            context: Context::default(),
            now: 1_795_000_000_000_000_000,
        },
        100,
    )
    .unwrap_or_else(|e| panic!("seed events: {e}"));
    let mut payload = Vec::new();
    for e in &events {
        wire::append_event(e, &mut payload);
    }
    let frame = wire::seal_frame("seed-agent", BatchSeq(1), events.len() as u32, &payload, 3);
    // proxy_adapter: selector bytes (adapter, route | 0x80 for `Authorization: License`,
    // method | 0x80 for a form body, status), then request body, 0xFF, response body.
    let exchange = |selector: [u8; 4], request: &str, response: &str| {
        let mut v = selector.to_vec();
        v.extend_from_slice(request.as_bytes());
        v.push(0xFF);
        v.extend_from_slice(response.as_bytes());
        v
    };
    let keygen = exchange(
        [0, 0, 0, 0],
        r#"{"meta":{"key":"K-1","scope":{"fingerprint":"fp-1"}}}"#,
        r#"{"meta":{"valid":true,"code":"VALID","detail":"is valid"},"data":{"id":"lic-1","attributes":{"maxMachines":3,"expiry":"2027-01-01T00:00:00Z"},"relationships":{"machines":{"meta":{"count":1}}}}}"#,
    );
    let keygen_machine = exchange(
        [0, 0x82, 0, 1],
        r#"{"data":{"type":"machines","attributes":{"fingerprint":"fp-2"},"relationships":{"license":{"data":{"type":"licenses","id":"lic-1"}}}}}"#,
        r#"{"data":{"id":"m-1","type":"machines"}}"#,
    );
    let lemonsqueezy = exchange(
        [1, 5, 0x80, 0],
        "license_key=K-2&instance_id=i-1",
        r#"{"valid":true,"error":null,"license_key":{"status":"active","activation_limit":3,"activation_usage":1,"expires_at":null},"meta":{"variant_name":"Pro","customer_id":7}}"#,
    );
    let gumroad = exchange(
        [2, 7, 0x80, 0],
        "product_id=p-1&license_key=K-3",
        r#"{"success":true,"uses":2,"purchase":{"email":"a@example.com","refunded":false,"subscription_cancelled_at":null}}"#,
    );
    for (sub, name, bytes) in [
        ("wire_payload", "valid.bin", &payload),
        ("wire_frame", "valid.bin", &frame),
        ("proxy_adapter", "keygen.bin", &keygen),
        ("proxy_adapter", "keygen-machine.bin", &keygen_machine),
        ("proxy_adapter", "lemonsqueezy.bin", &lemonsqueezy),
        ("proxy_adapter", "gumroad.bin", &gumroad),
    ] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        std::fs::write(d.join(name), bytes).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    }
}
