//! Recovery targets as an operator writes them, and as PostgreSQL wants them.
//!
//! Times are accepted in RFC 3339 (`2026-11-21T14:30:00Z`) and in
//! PostgreSQL's notation (`2026-11-21 14:30:00.123456+00`); a time without an
//! offset means UTC. They are handed to PostgreSQL normalised to UTC, in its
//! own notation, which `recovery_target_time` always accepts.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::wal::{Lsn, TimelineId};

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// `recovery_target_time`.
    Time(TargetTime),
    /// `recovery_target_lsn`.
    Lsn(Lsn),
    /// `recovery_target_xid`.
    Xid(u64),
    /// `recovery_target_name` (from `pg_create_restore_point`).
    Name(String),
    /// `recovery_target = 'immediate'`: the end of the backup.
    Immediate,
    /// No target: everything archived and streamed, then promote.
    Latest,
}

/// Which timeline recovery follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetTimeline {
    /// The newest timeline that descends from the backup (PostgreSQL's default).
    Latest,
    /// The backup's own timeline.
    Current,
    /// This one.
    Id(TimelineId),
}

impl std::str::FromStr for TargetTimeline {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "latest" => Ok(Self::Latest),
            "current" => Ok(Self::Current),
            n => n
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .map(|n| Self::Id(TimelineId(n)))
                .ok_or_else(|| format!("invalid timeline {s:?}: use latest, current or a number")),
        }
    }
}

impl fmt::Display for TargetTimeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Latest => f.write_str("latest"),
            Self::Current => f.write_str("current"),
            Self::Id(t) => write!(f, "{t}"),
        }
    }
}

/// What PostgreSQL does at the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetAction {
    /// End recovery and accept writes, on a new timeline.
    Promote,
    /// Stay in recovery, read-only, so the result can be inspected first.
    Pause,
    /// Stop the server.
    Shutdown,
}

impl TargetAction {
    /// PostgreSQL's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Promote => "promote",
            Self::Pause => "pause",
            Self::Shutdown => "shutdown",
        }
    }
}

/// A point in time, with the form it is handed to PostgreSQL in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TargetTime {
    /// Microseconds since the Unix epoch, UTC.
    pub micros: i64,
    /// Whether the input named no offset (so UTC was assumed).
    pub assumed_utc: bool,
}

/// Why a time is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot read {input:?} as a time ({reason}); use for example '2026-11-21 14:30:00+00', \
     '2026-11-21 14:30:00.250+01:00', '2026-11-21T14:30:00Z' or '2026-11-21 14:30:00' (UTC)"
)]
pub struct TimeParseError {
    /// The input.
    pub input: String,
    /// What is wrong.
    pub reason: String,
}

impl TargetTime {
    /// Parses RFC 3339 or PostgreSQL's `YYYY-MM-DD HH:MM:SS[.ffffff][+TZ]`.
    ///
    /// # Errors
    /// [`TimeParseError`] naming the accepted forms.
    pub fn parse(input: &str) -> Result<Self, TimeParseError> {
        let err = |reason: &str| TimeParseError {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let s = input.trim();
        let num = |part: &str, what: &str| -> Result<i64, TimeParseError> {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(&format!("bad {what}")));
            }
            part.parse().map_err(|_| err(&format!("bad {what}")))
        };
        let (date, rest) = s.split_at_checked(10).ok_or_else(|| err("too short"))?;
        let mut d = date.split('-');
        let (year, month, day) = match (d.next(), d.next(), d.next(), d.next()) {
            (Some(y), Some(m), Some(d), None) if y.len() == 4 && m.len() == 2 && d.len() == 2 => {
                (num(y, "year")?, num(m, "month")?, num(d, "day")?)
            }
            _ => return Err(err("the date must be YYYY-MM-DD")),
        };
        if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
            return Err(err("no such date"));
        }
        let rest = rest
            .strip_prefix(['T', 't', ' '])
            .ok_or_else(|| err("the time must follow the date after 'T' or a space"))?;
        let time_end = rest.find(['+', '-', 'Z', 'z', ' ']).unwrap_or(rest.len());
        let (clock, zone) = rest.split_at(time_end);
        let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
        let mut t = hms.split(':');
        let (hour, minute, second) = match (t.next(), t.next(), t.next(), t.next()) {
            (Some(h), Some(m), Some(s), None) if h.len() == 2 && m.len() == 2 && s.len() == 2 => {
                (num(h, "hour")?, num(m, "minute")?, num(s, "second")?)
            }
            _ => return Err(err("the time must be HH:MM:SS")),
        };
        if hour > 23 || minute > 59 || second > 59 {
            return Err(err("no such time of day"));
        }
        let micros_frac = if fraction.is_empty() {
            0
        } else {
            if fraction.len() > 6 {
                return Err(err("at most 6 fractional digits"));
            }
            num(fraction, "fraction")? * 10_i64.pow(6 - fraction.len() as u32)
        };
        let zone = zone.trim();
        let (offset_secs, assumed_utc) = match zone {
            "" => (0, true),
            "Z" | "z" | "UTC" | "utc" | "+00" | "-00" | "+00:00" | "-00:00" | "+0000" => (0, false),
            z if z.starts_with(['+', '-']) => {
                let sign = if z.starts_with('-') { -1 } else { 1 };
                let digits: String = z[1..].chars().filter(|c| *c != ':').collect();
                let (h, m) = match digits.len() {
                    2 => (num(&digits, "offset")?, 0),
                    4 => (num(&digits[..2], "offset")?, num(&digits[2..], "offset")?),
                    _ => return Err(err("the offset must be +HH, +HH:MM or +HHMM")),
                };
                if h > 15 || m > 59 {
                    return Err(err("no such offset"));
                }
                (sign * (h * 3600 + m * 60), false)
            }
            _ => {
                return Err(err(
                    "unknown time zone; give an offset such as +00 or +01:00",
                ));
            }
        };
        let days = days_from_civil(year, month, day);
        let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
        Ok(TargetTime {
            micros: secs * 1_000_000 + micros_frac,
            assumed_utc,
        })
    }

    /// The same instant as a `SystemTime`.
    #[must_use]
    pub fn system_time(self) -> SystemTime {
        if self.micros >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.micros as u64)
        } else {
            UNIX_EPOCH - Duration::from_micros(self.micros.unsigned_abs())
        }
    }

    /// From a `SystemTime`.
    #[must_use]
    pub fn from_system_time(t: SystemTime) -> Self {
        let micros = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
        };
        TargetTime {
            micros,
            assumed_utc: false,
        }
    }
}

/// PostgreSQL's notation in UTC: `2026-11-21 14:30:00.123456+00`.
impl fmt::Display for TargetTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.micros.div_euclid(1_000_000);
        let frac = self.micros.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let tod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
            tod / 3600,
            tod / 60 % 60,
            tod % 60
        )?;
        if frac != 0 {
            write!(f, ".{frac:06}")?;
        }
        f.write_str("+00")
    }
}

impl fmt::Display for RecoveryTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Time(t) => write!(f, "time {t}"),
            Self::Lsn(l) => write!(f, "LSN {l}"),
            Self::Xid(x) => write!(f, "transaction {x}"),
            Self::Name(n) => write!(f, "restore point {n:?}"),
            Self::Immediate => f.write_str("the end of the backup (immediate)"),
            Self::Latest => f.write_str("the newest archived or streamed WAL (latest)"),
        }
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> String {
        TargetTime::parse(s).expect(s).to_string()
    }

    #[test]
    fn accepts_rfc3339_and_postgres_forms() {
        for (input, want) in [
            ("2026-11-21 14:30:00+00", "2026-11-21 14:30:00+00"),
            ("2026-11-21T14:30:00Z", "2026-11-21 14:30:00+00"),
            ("2026-11-21 14:30:00", "2026-11-21 14:30:00+00"),
            ("2026-11-21 15:30:00+01", "2026-11-21 14:30:00+00"),
            (
                "2026-11-21T16:00:00.5+01:30",
                "2026-11-21 14:30:00.500000+00",
            ),
            (
                "2026-11-21 09:30:00.123456-0500",
                "2026-11-21 14:30:00.123456+00",
            ),
            ("2026-11-21 14:30:00 UTC", "2026-11-21 14:30:00+00"),
            ("2024-02-29 00:00:00+00", "2024-02-29 00:00:00+00"),
            ("2026-01-01 00:30:00+01", "2025-12-31 23:30:00+00"),
        ] {
            assert_eq!(utc(input), want, "{input}");
        }
        assert!(
            TargetTime::parse("2026-11-21 14:30:00")
                .expect("ok")
                .assumed_utc
        );
        assert!(
            !TargetTime::parse("2026-11-21 14:30:00Z")
                .expect("ok")
                .assumed_utc
        );
    }

    #[test]
    fn refuses_what_it_cannot_read_and_names_the_forms() {
        for bad in [
            "",
            "yesterday",
            "2026-11-21",
            "2026-13-01 00:00:00",
            "2026-02-29 00:00:00",
            "2026-11-21 24:00:00",
            "2026-11-21 14:30",
            "2026-11-21 14:30:00 CEST",
            "2026-11-21 14:30:00+1",
            "2026-11-21 14:30:00.1234567",
        ] {
            let e = TargetTime::parse(bad).expect_err(bad);
            assert!(e.to_string().contains("'2026-11-21 14:30:00+00'"), "{e}");
        }
    }

    #[test]
    fn round_trips_system_time() {
        let t = TargetTime::parse("2026-11-21 14:30:00.25+00").expect("ok");
        let back = TargetTime::from_system_time(t.system_time());
        assert_eq!(back.micros, t.micros);
        assert_eq!(
            humantime::format_rfc3339_micros(t.system_time()).to_string(),
            "2026-11-21T14:30:00.250000Z"
        );
    }

    #[test]
    fn parses_timelines() {
        assert_eq!("latest".parse(), Ok(TargetTimeline::Latest));
        assert_eq!("current".parse(), Ok(TargetTimeline::Current));
        assert_eq!("3".parse(), Ok(TargetTimeline::Id(TimelineId(3))));
        assert!("0".parse::<TargetTimeline>().is_err());
        assert!("newest".parse::<TargetTimeline>().is_err());
    }

    proptest::proptest! {
        /// Every time from 1970 to 9999, to the microsecond, prints as
        /// PostgreSQL reads it and parses back to itself.
        #[test]
        fn target_times_round_trip(micros in 0i64..253_402_300_800_000_000) {
            let t = TargetTime { micros, assumed_utc: false };
            let back = TargetTime::parse(&t.to_string()).expect("parses");
            proptest::prop_assert_eq!(back, t);
        }
    }
}
