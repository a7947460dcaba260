//! How the CLI shows things: aligned tables, times (RFC 3339, UTC), durations, and the
//! parsing of the times and durations operators type.

use std::fmt::Write as _;
use std::time::Duration;

use skald_runtime::machine::Timestamp;

/// A table with a header row, rendered with columns aligned and two spaces between.
#[derive(Debug)]
pub(crate) struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: Vec<&'static str>) -> Table {
        Table {
            header,
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub(crate) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let width = widths.get(i).copied().unwrap_or(0);
                    let pad = width.saturating_sub(cell.chars().count());
                    let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A civil date to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-24T03:50:12.345Z`.
pub(crate) fn time(t: Timestamp) -> String {
    let ms = i64::try_from(t.as_millis()).unwrap_or(i64::MAX);
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, frac) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1_000 % 60,
        rem % 1_000,
    );
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{frac:03}Z")
}

/// A short human duration: `850ms`, `12.3s`, `4m05s`, `3h12m`, `2d04h`.
pub(crate) fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms < 1_000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 3_600 {
        match s % 60 {
            0 => format!("{}m", s / 60),
            r => format!("{}m{r:02}s", s / 60),
        }
    } else if s < 86_400 {
        match s / 60 % 60 {
            0 => format!("{}h", s / 3_600),
            r => format!("{}h{r:02}m", s / 3_600),
        }
    } else {
        match s / 3_600 % 24 {
            0 => format!("{}d", s / 86_400),
            r => format!("{}d{r:02}h", s / 86_400),
        }
    }
}

/// `later - earlier` as a short duration (`0ms` if `later` is earlier).
pub(crate) fn since(earlier: Timestamp, later: Timestamp) -> String {
    duration(earlier.until(later))
}

/// Parses `250ms`, `30s`, `5m`, `2h`, `7d` and sums like `1h30m`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: expected e.g. 250ms, 30s, 5m, 2h, 7d or 1h30m");
    let s = s.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    // Byte counts of ASCII digits and letters only: every slice below ends on a
    // character boundary, whatever else the input holds.
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3_600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Parses a point in time: RFC 3339 (`2026-11-24T03:50:12Z`, fractions and `±hh:mm`
/// offsets allowed; a space may replace the `T`), milliseconds since the Unix epoch, or
/// a duration ago (`5m` ago: `-5m`).
pub(crate) fn parse_time(s: &str, now: Timestamp) -> Result<Timestamp, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "invalid time {s:?}: expected RFC 3339 (2026-11-24T03:50:12.345Z), milliseconds \
             since the epoch, or a duration ago (-5m)"
        )
    };
    if let Some(ago) = s.strip_prefix('-') {
        let d = parse_duration(ago).map_err(|_| bad())?;
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        return Ok(Timestamp(now.as_millis().saturating_sub(ms)));
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map(Timestamp).map_err(|_| bad());
    }
    let b = s.as_bytes();
    // The first 19 bytes must be ASCII (checked here and by `num`), so slicing at 19 is
    // on a character boundary whatever follows.
    if b.len() < 19
        || !b[..19].is_ascii()
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        s.get(r)
            .filter(|p| p.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
            .ok_or_else(bad)
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    if h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let mut rest = s.get(19..).ok_or_else(bad)?;
    let mut frac_ms = 0i64;
    if let Some(f) = rest.strip_prefix('.') {
        // ASCII digits only: `n` and `n.min(3)` are character boundaries.
        let n = f.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return Err(bad());
        }
        let digits = format!("{:0<3}", f.get(..n.min(3)).ok_or_else(bad)?);
        frac_ms = digits.parse().map_err(|_| bad())?;
        rest = f.get(n..).ok_or_else(bad)?;
    }
    // Byte-wise: `rest` is what the user typed after the seconds, any characters at all.
    let offset_min = match rest.as_bytes() {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()) =>
        {
            let digit = |c: &u8| i64::from(c - b'0');
            let (oh, om) = (digit(h1) * 10 + digit(h2), digit(m1) * 10 + digit(m2));
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            if *sign == b'-' {
                -(oh * 60 + om)
            } else {
                oh * 60 + om
            }
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(
        y,
        u32::try_from(mo).map_err(|_| bad())?,
        u32::try_from(d).map_err(|_| bad())?,
    );
    let ms = ((days * 24 + h) * 60 + mi - offset_min) * 60_000 + sec * 1_000 + frac_ms;
    u64::try_from(ms).map(Timestamp).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_rfc3339() {
        for ms in [0u64, 1_764_000_000_123, 951_782_400_000, 4_102_444_799_999] {
            let shown = time(Timestamp(ms));
            assert_eq!(
                parse_time(&shown, Timestamp(0)),
                Ok(Timestamp(ms)),
                "{shown}"
            );
        }
        assert_eq!(
            time(Timestamp(1_795_000_212_345)),
            "2026-11-18T11:10:12.345Z"
        );
        assert_eq!(time(Timestamp(951_782_400_000)), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn times_accept_offsets_epoch_millis_and_ago() {
        let utc = parse_time("2026-11-24T03:50:12Z", Timestamp(0)).expect("utc");
        assert_eq!(
            parse_time("2026-11-24T05:50:12+02:00", Timestamp(0)),
            Ok(utc)
        );
        assert_eq!(
            parse_time("2026-11-24 03:50:12.5Z", Timestamp(0)),
            Ok(Timestamp(utc.0 + 500))
        );
        assert_eq!(
            parse_time("1764000000123", Timestamp(0)),
            Ok(Timestamp(1_764_000_000_123))
        );
        assert_eq!(
            parse_time("-5m", Timestamp(600_000)),
            Ok(Timestamp(300_000))
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-24T03:50:12",
            "2026-11-24T25:00:00Z",
            "-5x",
        ] {
            let e = parse_time(bad, Timestamp(0)).expect_err(bad);
            assert!(e.contains("invalid time"), "{e}");
        }
    }

    #[test]
    fn times_with_multibyte_characters_are_refused_not_a_panic() {
        for bad in [
            "2026-11-24T03:50:12é1:00",
            "2026-11-24T03:50:12€",
            "2026-11-24T03:50:12.5€:00",
            "2026-11-24T03:50:12+€:00",
            "2026-11-24T03:50:12+02:0€",
            "2026-11-24T03:50:1€Z",
            "2026-11-24T03:5€:12Z",
            "2026-11-24T03€50:12Z",
            "2026-11-2€T03:50:12Z",
            "€€€€€€€€€€€€€€€€€€€€",
            "ééééééééééééééééééééé",
            "2026-11-24Té3:50:12Z",
            "2026-11-24T03:50:12.€",
            "2026-11-24T03:50:12.1234€",
            "-5€",
            "-€",
            "€",
            "2026-11-24T03:50:12+-1:00",
            "2026-11-24T03:50:12+24:00",
            "2026-11-24T03:50:12+02:60",
        ] {
            let e = parse_time(bad, Timestamp(0)).expect_err(bad);
            assert!(e.contains("invalid time"), "{e}");
        }
        assert_eq!(
            parse_time("2026-11-24T03:50:12.1234Z", Timestamp(0)),
            parse_time("2026-11-24T03:50:12.123Z", Timestamp(0))
        );
        assert_eq!(
            parse_time("2026-11-24T03:50:12-01:30", Timestamp(0)),
            parse_time("2026-11-24T05:20:12Z", Timestamp(0))
        );
        for bad in ["5€", "€5s", "5s€", "1h€m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_row_longer_than_the_header_does_not_panic() {
        let mut t = Table::new(vec!["A"]);
        t.row(vec!["1".into(), "2".into(), "3".into()]);
        assert_eq!(t.render(), "A\n1  2  3\n");
    }

    #[test]
    fn durations_parse_and_show() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "5", "m", "5 m", "5y", "-5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(duration(Duration::from_secs(11_520)), "3h12m");
        assert_eq!(duration(Duration::from_secs(187_200)), "2d04h");
        assert_eq!(duration(Duration::from_secs(60)), "1m");
        assert_eq!(duration(Duration::from_secs(7_200)), "2h");
        assert_eq!(duration(Duration::from_secs(86_400)), "1d");
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(vec!["ID", "STATUS", "NOTE"]);
        t.row(vec!["1".into(), "running".into(), "x".into()]);
        t.row(vec!["22".into(), "ok".into(), String::new()]);
        assert_eq!(t.render(), "ID  STATUS   NOTE\n1   running  x\n22  ok\n");
    }
}
