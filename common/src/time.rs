//! Instants as unix nanoseconds (i64, UTC) and their RFC 3339 / date forms.

use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, UtcOffset};

/// Unix time in nanoseconds, UTC. Covers 1677..2262.
pub type UnixNanos = i64;

pub const NANOS_PER_SEC: i64 = 1_000_000_000;
pub const NANOS_PER_DAY: i64 = 86_400 * NANOS_PER_SEC;

/// Now, as unix nanoseconds.
pub fn now_ns() -> UnixNanos {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Parses an RFC 3339 instant (any offset) to unix nanoseconds; `None` when malformed or out
/// of the i64-nanosecond range.
pub fn parse_rfc3339_ns(s: &str) -> Option<UnixNanos> {
    if s.len() > 64 {
        return None;
    }
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos()).ok()
}

/// Formats unix nanoseconds as RFC 3339 UTC (`Z`), with as many fraction digits as needed.
pub fn format_rfc3339(ns: UnixNanos) -> String {
    match OffsetDateTime::from_unix_timestamp_nanos(ns as i128) {
        Ok(t) => t
            .to_offset(UtcOffset::UTC)
            .format(&Rfc3339)
            .unwrap_or_else(|_| ns.to_string()),
        Err(_) => ns.to_string(),
    }
}

/// Parses a `YYYY-MM-DD` UTC date to the unix nanoseconds of its midnight.
pub fn parse_date_ns(s: &str) -> Option<UnixNanos> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let d = Date::parse(s, &fmt).ok()?;
    i64::try_from(d.midnight().assume_utc().unix_timestamp_nanos()).ok()
}

/// The `YYYY-MM-DD` UTC date of an instant.
pub fn format_date(ns: UnixNanos) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    match OffsetDateTime::from_unix_timestamp_nanos(ns as i128) {
        Ok(t) => t.date().format(&fmt).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip_and_offsets() {
        let ns = parse_rfc3339_ns("2026-11-01T10:00:00Z").unwrap();
        assert_eq!(ns, 1_793_527_200 * NANOS_PER_SEC);
        assert_eq!(format_rfc3339(ns), "2026-11-01T10:00:00Z");
        assert_eq!(parse_rfc3339_ns("2026-11-01T11:00:00+01:00"), Some(ns));
        assert_eq!(parse_rfc3339_ns("2026-11-01T10:00:00.000001Z"), Some(ns + 1000));
        assert_eq!(parse_rfc3339_ns("2026-11-01"), None);
        assert_eq!(parse_rfc3339_ns("9999-11-01T10:00:00Z"), None, "beyond i64 nanos");
        assert_eq!(parse_date_ns("2026-11-01"), Some(1_793_491_200 * NANOS_PER_SEC));
        assert_eq!(format_date(ns), "2026-11-01");
        assert_eq!(parse_date_ns("2026-13-01"), None);
    }
}
