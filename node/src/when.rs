//! Unix times as people read them (RFC 3339, UTC, seconds), for any value a peer may send.

/// `ms` (Unix milliseconds) as RFC 3339, or `None` before 1970 or after 9999, which humantime
/// cannot print (its `Display` fails there, and `to_string` would panic).
pub fn rfc3339_ms(ms: i64) -> Option<String> {
    let ms = u64::try_from(ms).ok()?;
    let time = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms))?;
    let mut out = String::new();
    use std::fmt::Write;
    write!(out, "{}", humantime::format_rfc3339_seconds(time)).ok()?;
    Some(out)
}

/// `ms` as RFC 3339, or the number itself when it cannot be printed as a date.
pub fn rfc3339_or_number(ms: i64) -> String {
    rfc3339_ms(ms).unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Regression: a change's time is its author's to choose; `tidesync history` printed it
    // with `UNIX_EPOCH + from_secs(t)` and humantime's `to_string`, which panic for a time
    // past the year 9999 (or past what `SystemTime` holds), so one hostile change crashed the
    // command, and the status page would have done the same with a peer's status record.
    #[test]
    fn any_time_prints_without_panicking() {
        assert_eq!(rfc3339_ms(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(rfc3339_ms(-1), None);
        assert_eq!(rfc3339_ms(i64::MAX), None);
        assert_eq!(rfc3339_ms(253_402_300_800_000), None);
        assert_eq!(rfc3339_or_number(i64::MAX), i64::MAX.to_string());
    }
}
