//! Cron schedules as operators write them.
//!
//! Kubernetes CronJobs use five fields (`0 2 * * *`); the `cron` crate wants a
//! seconds field first. Both forms are accepted: five fields get `0` seconds.
//! Times are UTC.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

/// A parsed schedule, with the text it came from.
#[derive(Debug, Clone)]
pub struct Schedule {
    text: String,
    inner: cron::Schedule,
}

/// Why a schedule is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid schedule {text:?}: {reason}; use five cron fields such as '0 2 * * *' (02:00 UTC \
     daily), or six with seconds first such as '*/10 * * * * *'"
)]
pub struct ScheduleError {
    /// The input.
    pub text: String,
    /// What the parser said.
    pub reason: String,
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim().to_owned();
        let fields = text.split_whitespace().count();
        let full = match fields {
            5 => format!("0 {text}"),
            6 | 7 => text.clone(),
            n => {
                return Err(ScheduleError {
                    text,
                    reason: format!("{n} fields"),
                });
            }
        };
        let inner = cron::Schedule::from_str(&full).map_err(|e| ScheduleError {
            text: text.clone(),
            reason: e.to_string(),
        })?;
        Ok(Schedule { text, inner })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Schedule {
    /// The first time strictly after `t`.
    #[must_use]
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.inner.after(&t).next()
    }

    /// How many fire times fall strictly after `from` and strictly before `until`:
    /// the runs missed while a previous one was still going.
    #[must_use]
    pub fn missed_between(&self, from: DateTime<Utc>, until: DateTime<Utc>) -> u64 {
        self.inner
            .after(&from)
            .take_while(|t| *t < until)
            .take(10_000)
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid")
            .with_timezone(&Utc)
    }

    #[test]
    fn five_fields_mean_whole_minutes() {
        let s: Schedule = "0 2 * * *".parse().expect("valid");
        assert_eq!(
            s.next_after(at("2026-11-22T01:59:59Z")),
            Some(at("2026-11-22T02:00:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-11-22T02:00:00Z")),
            Some(at("2026-11-23T02:00:00Z"))
        );
        assert_eq!(s.to_string(), "0 2 * * *");
    }

    #[test]
    fn six_fields_take_seconds() {
        let s: Schedule = "*/10 * * * * *".parse().expect("valid");
        assert_eq!(
            s.next_after(at("2026-11-22T02:00:01Z")),
            Some(at("2026-11-22T02:00:10Z"))
        );
        assert_eq!(
            s.missed_between(at("2026-11-22T02:00:00Z"), at("2026-11-22T02:00:35Z")),
            3
        );
    }

    #[test]
    fn refuses_nonsense_with_examples() {
        for bad in ["", "daily", "0 2 * *", "61 * * * *", "0 2 * * * * * *"] {
            let e = bad.parse::<Schedule>().expect_err(bad);
            assert!(e.to_string().contains("'0 2 * * *'"), "{e}");
        }
    }
}
