//! Wall-clock times as RFC 3339 text (UTC), without a date crate.

/// `ms` since the Unix epoch as RFC 3339 in UTC, with milliseconds
/// (`2023-11-14T22:13:20.123Z`) or without (`2023-11-14T22:13:20Z`).
pub fn rfc3339(ms: i64, millis: bool) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, min, s) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60);
    if millis {
        format!(
            "{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{:03}Z",
            rem % 1000
        )
    } else {
        format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}Z")
    }
}

/// Now, in milliseconds since the Unix epoch.
/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Now as RFC 3339 in UTC, to the second.
pub fn now_rfc3339() -> String {
    rfc3339(i64::try_from(now_ms()).unwrap_or(i64::MAX), false)
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn dates_before_and_after_leap_days() {
        assert_eq!(rfc3339(0, true), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123, true), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(1_709_164_800_000, false), "2024-02-29T00:00:00Z");
        assert_eq!(rfc3339(951_868_800_000, false), "2000-03-01T00:00:00Z");
    }
}
