//! RFC 3339 timestamps for key expiry (`expires_at`), written without a date crate: the key list
//! needs only parsing of one well-defined format and its UTC rendering.

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`]: (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Reads exactly `n` ASCII digits at `at` as a number.
fn digits(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let field = b.get(at..at.checked_add(n)?)?;
    field.iter().try_fold(0i64, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
    })
}

fn byte_is(b: &[u8], at: usize, want: u8) -> bool {
    b.get(at) == Some(&want)
}

/// Parses an RFC 3339 date-time (`2026-12-31T00:00:00Z`, `t`/`z` in either case, optional
/// fraction, `Z` or a `±HH:MM` offset) to Unix seconds. A fraction is dropped, which rounds
/// toward the past. Fields are range-checked (days per month with leap years; second 60 is
/// accepted as a leap second and lands on the next second). None on anything malformed.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let year = digits(b, 0, 4)?;
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    let hour = digits(b, 11, 2)?;
    let minute = digits(b, 14, 2)?;
    let second = digits(b, 17, 2)?;
    if !(byte_is(b, 4, b'-')
        && byte_is(b, 7, b'-')
        && matches!(b.get(10), Some(b'T' | b't'))
        && byte_is(b, 13, b':')
        && byte_is(b, 16, b':'))
    {
        return None;
    }
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }

    let mut at = 19;
    if byte_is(b, at, b'.') {
        let frac = b
            .get(at + 1..)?
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if frac == 0 {
            return None;
        }
        at += 1 + frac;
    }
    let offset = match b.get(at..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] if rest.len() == 5 && rest.get(2) == Some(&b':') => {
            let oh = digits(rest, 0, 2)?;
            let om = digits(rest, 3, 2)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let off = oh * 3600 + om * 60;
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };

    let local = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(local - offset)
}

/// Earliest and latest instants with a four-digit year, the range RFC 3339 can write.
const MIN_UNIX: i64 = -62_167_219_200; // 0000-01-01T00:00:00Z
const MAX_UNIX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`. Instants outside years 0000–9999 are clamped
/// to that range, since RFC 3339 has no way to write them and the output must parse back.
pub fn format_rfc3339(unix: i64) -> String {
    let t = unix.clamp(MIN_UNIX, MAX_UNIX);
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<i64> {
        parse_rfc3339(s)
    }

    #[test]
    fn known_instants() {
        assert_eq!(p("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(p("2026-12-31T00:00:00Z"), Some(1_798_675_200));
        assert_eq!(p("2024-02-19T12:20:00Z"), Some(1_708_345_200));
        assert_eq!(p("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(p("1969-12-31T23:59:59Z"), Some(-1));
        assert_eq!(p("0000-01-01T00:00:00Z"), Some(MIN_UNIX));
        assert_eq!(p("9999-12-31T23:59:59Z"), Some(MAX_UNIX));
        assert_eq!(p("2038-01-19T03:14:08Z"), Some(1 << 31));
    }

    #[test]
    fn case_and_fractions() {
        assert_eq!(p("2026-12-31t00:00:00z"), p("2026-12-31T00:00:00Z"));
        assert_eq!(p("2026-12-31T00:00:00.999999999Z"), Some(1_798_675_200));
        assert_eq!(p("2026-12-31T00:00:00.5+01:00"), Some(1_798_675_200 - 3600));
        // Truncation is toward the past before 1970 too.
        assert_eq!(p("1969-12-31T23:59:59.9Z"), Some(-1));
        assert_eq!(p("2026-12-31T00:00:00."), None);
        assert_eq!(p("2026-12-31T00:00:00.Z"), None);
        assert_eq!(p("2026-12-31T00:00:00.1x"), None);
    }

    #[test]
    fn offsets() {
        let utc = 1_798_675_200;
        assert_eq!(p("2026-12-31T02:00:00+02:00"), Some(utc));
        assert_eq!(p("2026-12-30T18:30:00-05:30"), Some(utc));
        assert_eq!(p("2026-12-31T00:00:00-00:00"), Some(utc));
        assert_eq!(p("2026-12-31T00:00:00+23:59"), Some(utc - 86_340));
        assert_eq!(p("2026-12-31T00:00:00+24:00"), None);
        assert_eq!(p("2026-12-31T00:00:00+02:60"), None);
        assert_eq!(p("2026-12-31T00:00:00+0200"), None);
        assert_eq!(p("2026-12-31T00:00:00+02"), None);
        assert_eq!(p("2026-12-31T00:00:00+02:00:00"), None);
        assert_eq!(p("2026-12-31T00:00:00"), None);
        assert_eq!(p("2026-12-31T00:00:00ZZ"), None);
    }

    #[test]
    fn leap_years() {
        assert!(p("2024-02-29T00:00:00Z").is_some());
        assert!(p("2000-02-29T00:00:00Z").is_some());
        assert!(p("1600-02-29T00:00:00Z").is_some());
        assert_eq!(p("2023-02-29T00:00:00Z"), None);
        assert_eq!(p("1900-02-29T00:00:00Z"), None);
        assert_eq!(p("2100-02-29T00:00:00Z"), None);
        assert_eq!(p("2024-02-30T00:00:00Z"), None);
        assert_eq!(
            p("2024-03-01T00:00:00Z").map(|t| t - 86_400),
            p("2024-02-29T00:00:00Z")
        );
    }

    #[test]
    fn field_ranges() {
        assert_eq!(p("2026-00-01T00:00:00Z"), None);
        assert_eq!(p("2026-13-01T00:00:00Z"), None);
        assert_eq!(p("2026-01-00T00:00:00Z"), None);
        assert_eq!(p("2026-01-32T00:00:00Z"), None);
        assert_eq!(p("2026-04-31T00:00:00Z"), None);
        assert!(p("2026-04-30T00:00:00Z").is_some());
        assert_eq!(p("2026-01-01T24:00:00Z"), None);
        assert_eq!(p("2026-01-01T00:60:00Z"), None);
        assert_eq!(p("2026-01-01T00:00:61Z"), None);
        assert_eq!(
            p("2016-12-31T23:59:60Z"),
            p("2017-01-01T00:00:00Z"),
            "leap second lands on the next second"
        );
    }

    #[test]
    fn malformed() {
        for s in [
            "",
            "2026",
            "2026-12-31",
            "2026-12-31 00:00:00Z",
            "2026-12-31T00:00Z",
            "2026-12-31X00:00:00Z",
            "2026/12/31T00:00:00Z",
            "26-12-31T00:00:00Z",
            "+2026-12-31T00:00:00Z",
            "2026-1-31T00:00:00Z",
            "2026-12-31T0:00:00Z",
            "2026-12-31T00:00:0Z",
            "２026-12-31T00:00:00Z",
            "2026-12-31T00:00:00Zé",
            " 2026-12-31T00:00:00Z",
            "2026-12-31T00:00:00Z ",
            "1798675200",
            "-001-12-31T00:00:00Z",
            "2026-+1-31T00:00:00Z",
        ] {
            assert_eq!(p(s), None, "{s:?}");
        }
    }

    #[test]
    fn format_known() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_798_675_200), "2026-12-31T00:00:00Z");
        assert_eq!(format_rfc3339(1_708_345_200), "2024-02-19T12:20:00Z");
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn format_clamps_out_of_range() {
        assert_eq!(format_rfc3339(i64::MIN), "0000-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(MAX_UNIX + 1), "9999-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(MIN_UNIX - 1), "0000-01-01T00:00:00Z");
    }

    #[test]
    fn round_trips() {
        let mut t = MIN_UNIX;
        while t <= MAX_UNIX {
            assert_eq!(p(&format_rfc3339(t)), Some(t), "{t}");
            t += 7_919_993; // ~92 days, a prime so times of day vary
        }
        for t in [MIN_UNIX, -1, 0, 1, 86_399, 86_400, MAX_UNIX] {
            assert_eq!(p(&format_rfc3339(t)), Some(t));
        }
    }

    #[test]
    fn civil_days_agree_for_every_day() {
        for z in days_from_civil(0, 1, 1)..=days_from_civil(9999, 12, 31) {
            let (y, m, d) = civil_from_days(z);
            assert!((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m));
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }
}
