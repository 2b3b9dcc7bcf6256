//! Pseudonymisation of license keys and machine ids (contract §5).
//!
//! `lk_` + the first 32 hex digits of HMAC-SHA256(secret, key); machine ids the same with `mf_`.
//! The secret is the content of `fingerprint_secret_file` with surrounding whitespace trimmed,
//! shared by a fleet so one key has one pseudonym everywhere. This module never logs or stores
//! its inputs.

use std::path::Path;

use ring::hmac;

/// Longest secret file accepted; a secret is a short random string, not a document.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Keyed pseudonymiser; cheap to clone.
#[derive(Clone)]
pub struct Fingerprinter {
    key: hmac::Key,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter(<secret>)")
    }
}

impl Fingerprinter {
    /// A pseudonymiser keyed with `secret` (already trimmed).
    pub fn new(secret: Vec<u8>) -> Self {
        Fingerprinter {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
        }
    }

    /// Reads the secret file; an empty or unreadable file is an error naming the path.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("fingerprint secret file {}: {e}", path.display()))?;
        if meta.len() > MAX_SECRET_FILE_BYTES {
            return Err(format!(
                "fingerprint secret file {} is larger than {MAX_SECRET_FILE_BYTES} bytes",
                path.display()
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("fingerprint secret file {}: {e}", path.display()))?;
        let trimmed = trim_ascii_whitespace(&bytes);
        if trimmed.is_empty() {
            return Err(format!("fingerprint secret file {} is empty", path.display()));
        }
        Ok(Self::new(trimmed.to_vec()))
    }

    /// The pseudonym of a raw license key: `lk_` + 32 hex digits.
    pub fn license(&self, raw_key: &str) -> String {
        self.pseudonym("lk_", raw_key)
    }

    /// The pseudonym of a raw machine id: `mf_` + 32 hex digits.
    pub fn machine(&self, raw_machine: &str) -> String {
        self.pseudonym("mf_", raw_machine)
    }

    fn pseudonym(&self, prefix: &str, raw: &str) -> String {
        let tag = hmac::sign(&self.key, raw.as_bytes());
        let mut out = String::with_capacity(prefix.len() + 32);
        out.push_str(prefix);
        out.push_str(&hex::encode(&tag.as_ref()[..16]));
        out
    }
}

fn trim_ascii_whitespace(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rfc4231_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let fp = Fingerprinter::new(b"Jefe".to_vec());
        assert_eq!(
            fp.license("what do ya want for nothing?"),
            "lk_5bdcc146bf60754e6a042426089575c7"
        );
        assert_eq!(
            fp.machine("what do ya want for nothing?"),
            "mf_5bdcc146bf60754e6a042426089575c7"
        );
    }

    #[test]
    fn secret_file_is_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("kt-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        std::fs::write(&p, "  Jefe\n").unwrap();
        let fp = Fingerprinter::from_file(&p).unwrap();
        assert_eq!(
            fp.license("what do ya want for nothing?"),
            "lk_5bdcc146bf60754e6a042426089575c7"
        );
        std::fs::write(&p, " \n").unwrap();
        assert!(Fingerprinter::from_file(&p).unwrap_err().contains("empty"));
        assert!(Fingerprinter::from_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
