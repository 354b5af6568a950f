//! Plan schedules, read the same way by the server (validation, overdue detection) and the agent (firing):
//! a cron expression through `croner` (5 fields, or 6 with seconds; `@daily`, `@hourly` …), or `@every <duration>`
//! (`@every 6h`, `@every 90m`), whose firings are the multiples of the duration since the Unix epoch, so they do not
//! move when an agent restarts.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Local, Utc};

use crate::backup::Timezone;

/// The longest duration anything takes (`@every`, timeouts, jitter): time arithmetic then never overflows.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);

/// The shortest `@every` interval: restic runs take seconds at least, and a shorter one is more likely a typo.
pub const MIN_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub enum Schedule {
    Cron(Box<croner::Cron>),
    Every(Duration),
}

impl Schedule {
    /// Parses a schedule; the error says what is wrong in words.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("@every") {
            let rest = rest.trim();
            let d = parse_duration(rest).map_err(|e| format!("schedule {text:?}: {e}"))?;
            if d < MIN_EVERY {
                return Err(format!("schedule {text:?}: the shortest @every interval is 1m"));
            }
            return Ok(Schedule::Every(d));
        }
        if text.is_empty() {
            return Err("schedule is empty; use a cron expression such as \"0 3 * * *\" or \"@every 6h\"".into());
        }
        croner::Cron::from_str(text)
            .map(|c| Schedule::Cron(Box::new(c)))
            .map_err(|e| format!("schedule {text:?} is not a cron expression or @every <duration>: {e}"))
    }

    /// The first firing strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Timezone) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(d) => {
                let step = d.as_secs() as i64;
                let t = after.timestamp();
                DateTime::from_timestamp((t.div_euclid(step) + 1) * step, 0)
            }
            Schedule::Cron(c) => match tz {
                Timezone::Utc => c.find_next_occurrence(&after, false).ok(),
                Timezone::Local => {
                    c.find_next_occurrence(&after.with_timezone(&Local), false).ok().map(|t| t.with_timezone(&Utc))
                }
            },
        }
    }

    /// The last firing at or before `at` (what a host that was off missed).
    pub fn previous_at_or_before(&self, at: DateTime<Utc>, tz: Timezone) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(d) => {
                let step = d.as_secs() as i64;
                DateTime::from_timestamp(at.timestamp().div_euclid(step) * step, 0)
            }
            Schedule::Cron(c) => match tz {
                Timezone::Utc => c.find_previous_occurrence(&at, true).ok(),
                Timezone::Local => {
                    c.find_previous_occurrence(&at.with_timezone(&Local), true).ok().map(|t| t.with_timezone(&Utc))
                }
            },
        }
    }

    /// The time between the firing after `at` and the one after that: the interval "overdue" is measured in.
    pub fn interval(&self, at: DateTime<Utc>, tz: Timezone) -> Duration {
        match self {
            Schedule::Every(d) => *d,
            Schedule::Cron(_) => {
                let first = self.next_after(at, tz);
                let second = first.and_then(|f| self.next_after(f, tz));
                match (first, second) {
                    (Some(a), Some(b)) => (b - a).to_std().unwrap_or(Duration::from_secs(86_400)),
                    _ => Duration::from_secs(86_400),
                }
            }
        }
    }
}

/// `90s`, `30m`, `6h`, `2d`, or combinations such as `1h30m` (humantime's syntax without the dependency).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("a duration such as 30m, 6h or 1d is needed".into());
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    let mut unit = String::new();
    let mut flush = |number: &mut String, unit: &mut String| -> Result<(), String> {
        if number.is_empty() {
            return Err(format!("{text:?} is not a duration such as 30m, 6h or 1d"));
        }
        let n: u64 = number.parse().map_err(|_| format!("{text:?}: {number} is too large"))?;
        let secs = match unit.as_str() {
            "s" | "sec" | "secs" => 1,
            "m" | "min" | "mins" => 60,
            "h" | "hr" | "hrs" => 3600,
            "d" | "day" | "days" => 86_400,
            "w" | "week" | "weeks" => 7 * 86_400,
            "" => return Err(format!("{text:?}: {number} needs a unit (s, m, h, d, w)")),
            other => return Err(format!("{text:?}: unknown unit {other:?} (use s, m, h, d, w)")),
        };
        total =
            n.checked_mul(secs).and_then(|v| total.checked_add(v)).ok_or_else(|| format!("{text:?} is too long"))?;
        number.clear();
        unit.clear();
        Ok(())
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !unit.is_empty() {
                flush(&mut number, &mut unit)?;
            }
            number.push(c);
        } else if c.is_ascii_alphabetic() {
            unit.push(c.to_ascii_lowercase());
        } else if c != ' ' {
            return Err(format!("{text:?} is not a duration such as 30m, 6h or 1d"));
        }
    }
    flush(&mut number, &mut unit)?;
    if total == 0 {
        return Err(format!("{text:?} is zero"));
    }
    if total > MAX_DURATION.as_secs() {
        return Err(format!("{text:?} is longer than 366 days"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn cron_fires_on_the_minute() {
        let s = Schedule::parse("*/5 * * * *").unwrap();
        assert_eq!(s.next_after(t("2026-01-01T10:02:30Z"), Timezone::Utc), Some(t("2026-01-01T10:05:00Z")));
        assert_eq!(s.next_after(t("2026-01-01T10:05:00Z"), Timezone::Utc), Some(t("2026-01-01T10:10:00Z")));
        assert_eq!(s.previous_at_or_before(t("2026-01-01T10:05:00Z"), Timezone::Utc), Some(t("2026-01-01T10:05:00Z")));
        assert_eq!(s.interval(t("2026-01-01T10:02:30Z"), Timezone::Utc), Duration::from_secs(300));
        let daily = Schedule::parse("@daily").unwrap();
        assert_eq!(daily.interval(t("2026-01-01T10:02:30Z"), Timezone::Utc), Duration::from_secs(86_400));
    }

    #[test]
    fn every_is_anchored_to_the_epoch() {
        let s = Schedule::parse("@every 6h").unwrap();
        assert_eq!(s.next_after(t("2026-01-01T10:02:30Z"), Timezone::Utc), Some(t("2026-01-01T12:00:00Z")));
        assert_eq!(s.previous_at_or_before(t("2026-01-01T10:02:30Z"), Timezone::Utc), Some(t("2026-01-01T06:00:00Z")));
        assert_eq!(s.interval(t("2026-01-01T10:02:30Z"), Timezone::Utc), Duration::from_secs(6 * 3600));
    }

    #[test]
    fn bad_schedules_are_explained() {
        for bad in ["", "@every", "@every 10s", "@every 5x", "61 * * * *", "* * *", "@every 0m", "@sometimes"] {
            let e = Schedule::parse(bad).unwrap_err();
            assert!(e.contains("schedule") || e.contains("duration") || e.contains("unit"), "{bad}: {e}");
        }
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("1.5h").is_err());
        assert!(parse_duration("367d").unwrap_err().contains("366 days"));
        assert!(parse_duration("100000000w").is_err() && parse_duration("99999999999999999999s").is_err());
        assert!(Schedule::parse("@every 100000000w").is_err());
    }
}
