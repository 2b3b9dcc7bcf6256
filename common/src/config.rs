//! Shared configuration helpers: TOML loading with precise errors, size and duration values.
//!
//! The agent and collector each own their config schema; this module only parses the value
//! syntaxes the contract fixes (`KiB/MiB/GiB`, `ms/s/m/h/d`).

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// Largest config file read; a config is a page of TOML, not a data file.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads and parses a TOML file. Errors name the file, and serde's message names the key
/// (`unknown field `when_ful``) and the line.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("config {}: {e}", path.display()))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(format!("config {}: larger than 1 MiB", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
    parse_toml(&text).map_err(|e| format!("config {}: {e}", path.display()))
}

/// Parses TOML text into `T`, flattening toml's multi-line message into one line.
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {msg}")
            }
            None => msg,
        }
    })
}

/// A byte size written as `1GiB`, `512 MiB`, `64KiB`, `100B` or a bare integer of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected e.g. 64MiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => return Err(format!("invalid size unit {other:?} in {s:?}: use B, KiB, MiB or GiB")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written as `500ms`, `1s`, `5m`, `2h`, `30d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 1s, 30d"))?;
        let ms: u64 = match unit.trim() {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => {
                return Err(format!(
                    "invalid duration unit {other:?} in {s:?}: use ms, s, m, h or d"
                ))
            }
        };
        n.checked_mul(ms)
            .map(|ms| HumanDuration(Duration::from_millis(ms)))
            .ok_or_else(|| format!("duration {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The machine's host name, for default agent ids.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Logs a warning when a file holding a secret (a private key, the analyst token, the
/// fingerprint secret) can be read or written by users other than its owner. Never fails:
/// the operator decides, but is told. Returns whether it warned.
pub fn warn_if_exposed(path: &Path, what: &str) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    file = %path.display(),
                    mode = format!("{mode:o}"),
                    "the {what} is readable by other users of this machine; `chmod 600` it"
                );
                return true;
            }
        }
    }
    let _ = (path, what);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(ByteSize::parse("1GiB").unwrap().0, 1 << 30);
        assert_eq!(ByteSize::parse("64 MiB").unwrap().0, 64 << 20);
        assert_eq!(ByteSize::parse("100").unwrap().0, 100);
        assert!(ByteSize::parse("1GB").unwrap_err().contains("GB"));
        assert!(ByteSize::parse("lots").is_err());
        assert_eq!(HumanDuration::parse("500ms").unwrap().0, Duration::from_millis(500));
        assert_eq!(HumanDuration::parse("30d").unwrap().0, Duration::from_secs(30 * 86400));
        assert!(HumanDuration::parse("3 weeks").is_err());
        assert!(HumanDuration::parse("5").is_err());
    }

    #[test]
    fn toml_errors_name_the_key_and_line() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct C {
            a: u32,
        }
        let err = parse_toml::<C>("a = 1\nwhen_ful = 2\n").unwrap_err();
        assert!(err.contains("when_ful") && err.contains("line 2"), "{err}");
    }
}
