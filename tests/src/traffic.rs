//! Realistic sample license traffic: a population of licenses with skewed popularity, each
//! living through issue → activation → daily validations (mostly valid, some failures),
//! feature checks, payments, renewals and upgrades. Used by the local demo and by load tests.

/// Deterministic generator (xorshift), so a seed replays the same traffic.
pub struct Traffic {
    state: u64,
    licenses: u32,
    counter: u64,
    run: String,
    issued: Vec<bool>,
}

const PLANS: [&str; 3] = ["free", "pro", "enterprise"];
const COUNTRIES: [&str; 8] = ["DE", "US", "FR", "GB", "JP", "BR", "IN", "NL"];
const FEATURES: [&str; 4] = ["export", "sso", "audit-log", "api"];
const FAILURES: [&str; 6] = [
    "expired",
    "not_found",
    "domain_mismatch",
    "limit_exceeded",
    "suspended",
    "rate_limited",
];

impl Traffic {
    pub fn new(seed: u64, licenses: u32) -> Traffic {
        Traffic {
            state: seed.max(1),
            licenses: licenses.max(1),
            counter: 0,
            run: format!("{seed:x}"),
            issued: vec![false; licenses.max(1) as usize],
        }
    }

    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }

    /// A license index with Zipf-like skew: low indexes are far more popular.
    fn license(&mut self) -> u32 {
        let u = (self.next() % 1_000_000) as f64 / 1_000_000.0;
        ((u * u * u) * self.licenses as f64) as u32 % self.licenses
    }

    /// The next event, as one JSON line.
    pub fn event(&mut self) -> String {
        self.counter += 1;
        let id = format!("demo-{}-{}", self.run, self.counter);
        let l = self.license();
        let plan = PLANS[(l % 3) as usize];
        let country = COUNTRIES[(l % COUNTRIES.len() as u32) as usize];
        let license = format!("license-{l:05}");
        if !self.issued[l as usize] {
            self.issued[l as usize] = true;
            return format!(
                r#"{{"id":"{id}","type":"license.issued","license":"{license}","plan":"{plan}","customer":"customer-{}","country":"{country}","seats_limit":10}}"#,
                l / 3
            );
        }
        let roll = self.next() % 100;
        match roll {
            0..=69 => {
                let result = if self.next() % 10 == 0 {
                    self.pick(&FAILURES)
                } else {
                    "valid"
                };
                format!(
                    r#"{{"id":"{id}","type":"license.validated","license":"{license}","plan":"{plan}","country":"{country}","result":"{result}","user":"user-{}","machines_used":{},"machines_limit":5}}"#,
                    self.next() % 8,
                    self.next() % 7
                )
            }
            70..=79 => {
                let feature = self.pick(&FEATURES);
                let result = if plan == "free" && self.next() % 2 == 0 {
                    "feature_denied"
                } else {
                    "valid"
                };
                format!(
                    r#"{{"id":"{id}","type":"feature.checked","license":"{license}","feature":"{feature}","result":"{result}","user":"user-{}"}}"#,
                    self.next() % 8
                )
            }
            80..=87 => format!(
                r#"{{"id":"{id}","type":"license.activated","license":"{license}","machine":"host-{l}-{}"}}"#,
                self.next() % 6
            ),
            88..=91 => format!(
                r#"{{"id":"{id}","type":"license.deactivated","license":"{license}","machine":"host-{l}-{}"}}"#,
                self.next() % 6
            ),
            92..=94 => {
                let t = if self.next() % 6 == 0 {
                    "payment.failed"
                } else {
                    "payment.succeeded"
                };
                format!(
                    r#"{{"id":"{id}","type":"{t}","license":"{license}","customer":"customer-{}"}}"#,
                    l / 3
                )
            }
            95..=96 => format!(r#"{{"id":"{id}","type":"license.renewed","license":"{license}","plan":"{plan}"}}"#),
            97 => format!(
                r#"{{"id":"{id}","type":"license.upgraded","license":"{license}","plan":"enterprise","previous_plan":"{plan}"}}"#
            ),
            _ => format!(r#"{{"id":"{id}","type":"support.ticket_opened","license":"{license}"}}"#),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_traffic_and_every_line_is_json() {
        let mut a = Traffic::new(7, 100);
        let mut b = Traffic::new(7, 100);
        for _ in 0..1000 {
            let line = a.event();
            assert_eq!(line, b.event());
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert!(v["type"].is_string() && v["id"].is_string());
        }
    }
}
