//! Retention: which snapshots of a plan a host keeps, in restic's own `forget` vocabulary (`--keep-last`,
//! `--keep-hourly` … `--keep-yearly`, `--keep-within`, `--keep-tag`), and what a `forget` run removed.
//!
//! A plan carries an optional [`Retention`] (operator API, the agent's plan); after each backup that made a snapshot
//! the agent runs `restic forget` with [`Retention::restic_args`] for that host's snapshots of that plan only, and
//! reports it as its own operation of kind `forget` with a [`ForgetSummary`].
//!
//! [`Retention`] is read by agents too, so it never refuses unknown fields while parsing; operator input is checked
//! by [`Retention::validate`], which refuses them (a misspelt `keep_lats` must not silently keep everything). An
//! agent checks a policy with [`Retention::check_known`] before forget: keep options are additive, so a policy with
//! one it does not know would keep less than the operator asked for; it refuses to forget instead, and keeps the
//! unknown fields when it saves the plan (they are written back out).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::validate::is_printable;

/// The largest count a keep option takes.
pub const MAX_COUNT: u32 = 1_000_000;
/// Most `keep_tag` entries.
pub const MAX_KEEP_TAGS: usize = 32;
const MAX_TAG: usize = 128;
/// Most removed snapshot ids a [`ForgetSummary`] lists (the counts are always complete).
pub const MAX_REMOVED_IDS: usize = 1_000;

/// A plan's retention policy: restic's keep options. Counts are at least 1 when given; `within` is a duration in
/// restic's spelling (`7d`, `1y2m`, `36h`: numbers followed by `y`, `m` (months), `d`, `h`, each unit at most once, in
/// that order). A policy must keep something: at least one option is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yearly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<String>,
    /// Snapshots carrying this tag are kept (each entry one tag).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_tag: Vec<String>,
    /// Fields this version does not know: kept while parsing (agents must read newer servers' plans) and written
    /// back out (an agent's saved config still has them after a restart), refused by [`Retention::validate`]
    /// (operator input) and by [`Retention::check_known`] (an agent about to forget).
    #[serde(flatten, default)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl Retention {
    fn counts(&self) -> [(&'static str, Option<u32>); 6] {
        [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ]
    }

    /// Checks operator input; the error names the field (`retention.daily: …`). A policy that keeps nothing (no
    /// option set) is refused: `forget` with it would remove every snapshot of the plan.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(name) = self.unknown.keys().next() {
            let name: String = name.chars().take(64).collect();
            return Err(format!(
                "retention.{name}: unknown field; the keep options are last, hourly, daily, weekly, monthly, yearly, \
                 within and keep_tag"
            ));
        }
        for (name, count) in self.counts() {
            if let Some(n) = count {
                if n == 0 || n > MAX_COUNT {
                    return Err(format!(
                        "retention.{name}: {n} must be 1-{MAX_COUNT} (leave the field out to not keep by it)"
                    ));
                }
            }
        }
        if let Some(within) = &self.within {
            parse_within(within).map_err(|e| format!("retention.within: {e}"))?;
        }
        if self.keep_tag.len() > MAX_KEEP_TAGS {
            return Err(format!("retention.keep_tag: at most {MAX_KEEP_TAGS} tags"));
        }
        for tag in &self.keep_tag {
            if !is_printable(tag, MAX_TAG) || tag.contains(',') || tag.chars().any(char::is_whitespace) {
                let shown: String = tag.chars().take(64).collect();
                return Err(format!(
                    "retention.keep_tag: {shown:?} must be 1-{MAX_TAG} printable characters without commas or white \
                     space"
                ));
            }
        }
        if self.keeps_nothing() {
            return Err("retention: the policy keeps nothing (forget would remove every snapshot of the plan); set \
                        at least one of last, hourly, daily, weekly, monthly, yearly, within, keep_tag, or send \
                        retention: null for no retention"
                .into());
        }
        Ok(())
    }

    /// An agent's check before it forgets with this policy: every field known (a keep option it does not know
    /// would be dropped, and forget would keep less than asked), then [`Retention::validate`] (a policy stored
    /// before a check existed, e.g. an empty `keep_tag` entry, which restic reads as "keep nothing").
    pub fn check_known(&self) -> Result<(), String> {
        if !self.unknown.is_empty() {
            let names: Vec<String> = self.unknown.keys().take(8).map(|k| k.chars().take(64).collect()).collect();
            return Err(format!(
                "the policy has options this agent does not know: {}; update the agent (it does not forget with \
                 fewer keep options than the plan has)",
                names.join(", ")
            ));
        }
        self.validate()
    }

    /// No keep option is set.
    pub fn keeps_nothing(&self) -> bool {
        self.counts().iter().all(|(_, c)| c.is_none()) && self.within.is_none() && self.keep_tag.is_empty()
    }

    /// restic's keep flags, one argument each: `--keep-last=3`, `--keep-within=7d`, `--keep-tag=x`.
    pub fn restic_args(&self) -> Vec<String> {
        let mut args: Vec<String> =
            self.counts().iter().filter_map(|(name, c)| c.map(|n| format!("--keep-{name}={n}"))).collect();
        if let Some(within) = &self.within {
            args.push(format!("--keep-within={}", within.trim()));
        }
        args.extend(self.keep_tag.iter().map(|t| format!("--keep-tag={t}")));
        args
    }

    /// A short description for listings and the audit log: `last=3 daily=7 within=1y tag=keep`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> =
            self.counts().iter().filter_map(|(name, c)| c.map(|n| format!("{name}={n}"))).collect();
        if let Some(within) = &self.within {
            parts.push(format!("within={within}"));
        }
        parts.extend(self.keep_tag.iter().map(|t| format!("tag={t}")));
        parts.join(" ")
    }
}

/// A duration as restic's `--keep-within` reads it (`1y2m3d4h`): returns (years, months, days, hours). Strict:
/// digits then one of `y`, `m`, `d`, `h`, each unit at most once and in that order, nothing else (no spaces, no
/// signs), not all zero, each number at most 100,000.
pub fn parse_within(text: &str) -> Result<(u32, u32, u32, u32), String> {
    const UNITS: [char; 4] = ['y', 'm', 'd', 'h'];
    let shown: String = text.chars().take(64).collect();
    let bad = |why: &str| format!("{shown:?} {why}; write numbers with units y, m (months), d, h, as in 7d or 1y2m");
    if text.is_empty() {
        return Err(bad("is empty"));
    }
    let mut values = [0u32; 4];
    let mut next_unit = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let Some(unit) = UNITS.iter().position(|u| *u == c) else {
            return Err(bad(&format!("has {c:?}, which is not a digit or a unit")));
        };
        if digits.is_empty() {
            return Err(bad(&format!("has the unit {c:?} without a number before it")));
        }
        if unit < next_unit {
            return Err(bad("repeats a unit or has them out of order (y, m, d, h)"));
        }
        let n: u32 = digits.parse().ok().filter(|n| *n <= 100_000).ok_or_else(|| bad("has a number over 100000"))?;
        values[unit] = n;
        next_unit = unit + 1;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(bad("ends in a number without a unit"));
    }
    if values.iter().all(|v| *v == 0) {
        return Err(bad("is zero (it would keep nothing by time)"));
    }
    Ok((values[0], values[1], values[2], values[3]))
}

/// What one `restic forget` run did to a host's snapshots of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ForgetSummary {
    /// Snapshots removed.
    pub removed: u64,
    /// Snapshots kept.
    pub kept: u64,
    /// The removed snapshots' full ids (at most [`MAX_REMOVED_IDS`]).
    pub removed_ids: Vec<String>,
}

/// For `PATCH` bodies: a field absent stays `None` (leave as is), a field `null` becomes `Some(None)` (clear it), a
/// value becomes `Some(Some(v))`. Use with `#[serde(default, deserialize_with = "double_option")]`.
pub fn double_option<'de, T, D>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(json: &str) -> Retention {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn policies_are_validated_field_by_field() {
        assert!(r(r#"{"last":3}"#).validate().is_ok());
        assert!(r(r#"{"within":"1y2m3d4h","keep_tag":["keep"]}"#).validate().is_ok());
        let err = |json: &str| r(json).validate().unwrap_err();
        assert!(err("{}").starts_with("retention: the policy keeps nothing"), "{}", err("{}"));
        assert!(err(r#"{"keep_tag":[]}"#).contains("keeps nothing"));
        assert!(err(r#"{"last":0}"#).starts_with("retention.last:"));
        assert!(err(r#"{"daily":2000000}"#).starts_with("retention.daily:"));
        assert!(err(r#"{"keep_lats":3}"#).starts_with("retention.keep_lats: unknown field"));
        assert!(err(r#"{"keep_tag":["a,b"]}"#).starts_with("retention.keep_tag:"));
        assert!(err(r#"{"keep_tag":[""]}"#).starts_with("retention.keep_tag:"));
        for bad in ["", "7", "d", "7 d", "7days", "1d1y", "1d2d", "-1d", "0d", "0y0h", "1.5d", "7D", "200000h", "1w"] {
            let e = Retention { within: Some(bad.into()), ..Default::default() }.validate().unwrap_err();
            assert!(e.starts_with("retention.within:"), "{bad:?}: {e}");
        }
        assert_eq!(parse_within("7d"), Ok((0, 0, 7, 0)));
        assert_eq!(parse_within("1y2m"), Ok((1, 2, 0, 0)));
        assert_eq!(parse_within("36h"), Ok((0, 0, 0, 36)));
        assert_eq!(parse_within("0y3h"), Ok((0, 0, 0, 3)));
        assert!(serde_json::from_str::<Retention>(r#"{"last":-1}"#).is_err(), "negative counts do not parse");
    }

    #[test]
    fn restic_args_use_restics_spelling_and_unknown_fields_are_written_back() {
        let policy = r(r#"{"last":3,"daily":7,"yearly":1,"within":"1y2m","keep_tag":["keep","gold"],"future":1}"#);
        assert_eq!(
            policy.restic_args(),
            [
                "--keep-last=3",
                "--keep-daily=7",
                "--keep-yearly=1",
                "--keep-within=1y2m",
                "--keep-tag=keep",
                "--keep-tag=gold"
            ]
        );
        assert_eq!(policy.describe(), "last=3 daily=7 yearly=1 within=1y2m tag=keep tag=gold");
        let written = serde_json::to_string(&policy).unwrap();
        assert!(written.contains(r#""future":1"#), "an agent's saved config keeps what it does not know: {written}");
        assert_eq!(serde_json::from_str::<Retention>(&written).unwrap(), policy, "and reads it back");
        assert_eq!(serde_json::to_string(&r(r#"{"last":3}"#)).unwrap(), r#"{"last":3}"#);
    }

    #[test]
    fn agents_read_plans_with_and_without_retention_and_with_fields_they_do_not_know() {
        let plan = |retention: &str| {
            let json = format!(
                r#"{{"name":"p","repository":"r","paths":["/x"],"schedule":"@daily","timeout_secs":60{retention}}}"#
            );
            serde_json::from_str::<crate::backup::AgentPlan>(&json).unwrap()
        };
        assert_eq!(plan("").retention, None, "a server from before retention");
        let newer = plan(r#","retention":{"last":3,"keep_within_daily":"7d","keep_size":1}"#).retention.unwrap();
        assert_eq!(newer.last, Some(3));
        let refused = newer.check_known().unwrap_err();
        assert_eq!(
            refused,
            "the policy has options this agent does not know: keep_size, keep_within_daily; update the agent (it \
             does not forget with fewer keep options than the plan has)",
            "never a forget that keeps less than asked"
        );
        assert!(r(r#"{"last":3}"#).check_known().is_ok());
        for stored in [r#"{"keep_tag":[""]}"#, r#"{"within":"0d"}"#, r#"{"last":0}"#, "{}"] {
            assert!(r(stored).check_known().is_err(), "{stored}: a policy stored before a check is checked again");
        }
        let written = serde_json::to_value(plan("")).unwrap();
        assert!(written.get("retention").is_none(), "older agents' view unchanged: {written}");
    }

    #[test]
    fn double_option_tells_absent_from_null() {
        #[derive(Deserialize)]
        struct Patch {
            #[serde(default, deserialize_with = "double_option")]
            retention: Option<Option<Retention>>,
        }
        let p = |json: &str| serde_json::from_str::<Patch>(json).unwrap().retention;
        assert_eq!(p("{}"), None);
        assert_eq!(p(r#"{"retention":null}"#), Some(None));
        assert_eq!(p(r#"{"retention":{"last":2}}"#), Some(Some(Retention { last: Some(2), ..Default::default() })));
    }
}
