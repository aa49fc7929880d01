//! Small time helpers: RFC 3339 stamps for the protocol and short human durations for tables.

use std::time::{Duration, SystemTime};

/// `2026-11-21T08:21:00Z`: what every `*_at` field of the protocol holds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The local calendar day of `t` (`2026-12-04`), as the machine's time zone has it: budgets count local days.
pub fn local_day(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r only writes the given struct; a zeroed tm is a valid value to pass.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return rfc3339(t).chars().take(10).collect();
    }
    format!("{:04}-{:02}-{:02}", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday)
}

/// Parses what [`rfc3339`] wrote.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

/// `45s`, `3m10s`, `2h05m`, `3d04h`: compact enough for a table column.
pub fn short_duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{:02}h", secs / 86400, (secs % 86400) / 3600),
    }
}

/// Seconds from `then` to now, zero if `then` is in the future (clock changes).
pub fn age(then: SystemTime) -> u64 {
    SystemTime::now().duration_since(then).unwrap_or(Duration::ZERO).as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(5), "5s");
        assert_eq!(short_duration(190), "3m10s");
        assert_eq!(short_duration(7500), "2h05m");
        assert_eq!(short_duration(90000), "1d01h");
    }

    #[test]
    fn rfc3339_round_trips() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
    }
}
