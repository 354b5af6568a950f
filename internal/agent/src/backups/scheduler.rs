//! When each plan runs: the firings of its schedule (`rm_protocol::schedule`, in the plan's timezone), each delayed
//! by a fixed per-host offset in `0..jitter_secs` (a hash of the agent id and the plan name), and what has been
//! handled already: `schedule-state.json` (0600, replaced atomically) holds per plan the last firing handled.
//!
//! A plan seen for the first time (or whose schedule changed) records "now" and waits for its next firing. A plan
//! whose latest due firing is later than the last one handled runs once: trigger `schedule` if it fell due while
//! this process was running, `catch_up` if it fell due before (the host or agent was down), however many firings
//! were missed.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rm_protocol::backup::{AgentPlan, Timezone, Trigger};
use rm_protocol::schedule::Schedule;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// The fixed delay of this host's runs of `plan`: `0..jitter_secs`, the same on every start.
pub fn offset(agent_id: &str, plan: &str, jitter_secs: u64) -> Duration {
    if jitter_secs == 0 {
        return Duration::ZERO;
    }
    let mut hash = sha2::Sha256::new();
    hash.update(agent_id.as_bytes());
    hash.update([0]);
    hash.update(plan.as_bytes());
    let digest = hash.finalize();
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    Duration::from_secs(n % jitter_secs)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanState {
    /// The schedule this entry was recorded for; another schedule starts afresh.
    pub schedule: String,
    #[serde(default)]
    pub timezone: Timezone,
    /// The last firing handled (Unix seconds; the firing itself, without the offset), or when the plan was first
    /// seen.
    pub last: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleState {
    #[serde(default)]
    pub plans: BTreeMap<String, PlanState>,
}

/// A plan to run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub plan: String,
    pub trigger: Trigger,
    /// The firing being handled (without the offset).
    pub firing: DateTime<Utc>,
}

/// Something that fires on a schedule: a plan, or a repository's prune or check (`backups::maintenance`).
pub trait Scheduled {
    /// Unique among the entries of one [`ScheduleState`].
    fn name(&self) -> &str;
    fn schedule(&self) -> &str;
    fn timezone(&self) -> Timezone;
    fn jitter_secs(&self) -> u64;
}

impl Scheduled for AgentPlan {
    fn name(&self) -> &str {
        &self.name
    }
    fn schedule(&self) -> &str {
        &self.schedule
    }
    fn timezone(&self) -> Timezone {
        self.timezone
    }
    fn jitter_secs(&self) -> u64 {
        self.jitter_secs
    }
}

fn parse<P: Scheduled>(plan: &P) -> Option<Schedule> {
    Schedule::parse(plan.schedule()).ok()
}

impl ScheduleState {
    /// Brings the state in line with `plans`: new plans (and plans whose schedule or timezone changed) record `now`,
    /// removed plans are dropped. Returns whether anything changed (the caller saves then).
    pub fn reconcile<P: Scheduled>(&mut self, plans: &[P], now: DateTime<Utc>) -> bool {
        let before = self.plans.clone();
        self.plans.retain(|name, _| plans.iter().any(|p| p.name() == name));
        for plan in plans {
            let fresh =
                PlanState { schedule: plan.schedule().to_string(), timezone: plan.timezone(), last: now.timestamp() };
            match self.plans.get(plan.name()) {
                Some(s) if s.schedule == plan.schedule() && s.timezone == plan.timezone() => {}
                _ => {
                    self.plans.insert(plan.name().to_string(), fresh);
                }
            }
        }
        self.plans != before
    }

    /// The plans due at `now` (at most one run each), marked handled. `started` is when this process started:
    /// a firing that fell due before it is a catch-up. Call [`ScheduleState::reconcile`] first.
    pub fn take_due<P: Scheduled>(
        &mut self,
        plans: &[P],
        agent_id: &str,
        now: DateTime<Utc>,
        started: DateTime<Utc>,
    ) -> Vec<Due> {
        let mut due = Vec::new();
        for plan in plans {
            let (Some(schedule), Some(state)) = (parse(plan), self.plans.get_mut(plan.name())) else { continue };
            let offset = offset(agent_id, plan.name(), plan.jitter_secs());
            let Some(latest) = schedule.previous_at_or_before(now - offset, plan.timezone()) else { continue };
            if latest.timestamp() <= state.last {
                continue;
            }
            state.last = latest.timestamp();
            let trigger = if latest + offset < started { Trigger::CatchUp } else { Trigger::Schedule };
            due.push(Due { plan: plan.name().to_string(), trigger, firing: latest });
        }
        due
    }

    /// When the next of `plans` falls due after `now` (offset included).
    pub fn next_wake<P: Scheduled>(&self, plans: &[P], agent_id: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        plans.iter().filter_map(|p| next_run(p, agent_id, now)).min()
    }
}

/// When `plan` next runs on this host after `now` (its next firing plus this host's offset).
pub fn next_run<P: Scheduled>(plan: &P, agent_id: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let offset = offset(agent_id, plan.name(), plan.jitter_secs());
    parse(plan)?.next_after(now - offset, plan.timezone()).map(|t| t + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(name: &str, schedule: &str, jitter_secs: u64) -> AgentPlan {
        AgentPlan {
            name: name.into(),
            repository: "r".into(),
            paths: vec!["/data".into()],
            excludes: vec![],
            schedule: schedule.into(),
            timezone: Timezone::Utc,
            tags: vec![],
            one_file_system: false,
            exclude_caches: false,
            timeout_secs: 3600,
            jitter_secs,
            retention: None,
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    #[test]
    fn the_offset_is_deterministic_bounded_and_spread() {
        assert_eq!(offset("agent-1", "daily", 600), offset("agent-1", "daily", 600));
        assert_eq!(offset("agent-1", "daily", 0), Duration::ZERO);
        let offsets: std::collections::BTreeSet<_> =
            (0..50).map(|i| offset(&format!("agent-{i}"), "daily", 600)).collect();
        assert!(offsets.iter().all(|o| *o < Duration::from_secs(600)));
        assert!(offsets.len() > 30, "hosts spread over the window: {offsets:?}");
        assert_ne!(offset("agent-1", "a", 1_000_000), offset("agent-1", "b", 1_000_000), "per plan too");
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(offset("ab", "c", u64::MAX), offset("a", "bc", u64::MAX));
    }

    #[test]
    fn next_firing_includes_the_hosts_offset() {
        let p = plan("hourly", "@every 1h", 600);
        let o = offset("agent-1", "hourly", 600).as_secs() as i64;
        let now = at(10 * 3600 + 5);
        let next = next_run(&p, "agent-1", now).unwrap();
        // The 10:00 firing is due at 10:00 + o: if that is still ahead it is next, else 11:00 + o.
        let want = if 10 * 3600 + o > 10 * 3600 + 5 { 10 * 3600 + o } else { 11 * 3600 + o };
        assert_eq!(next.timestamp(), want);
        let cron = plan("nightly", "0 3 * * *", 0);
        assert_eq!(next_run(&cron, "agent-1", at(0)).unwrap(), at(3 * 3600));
    }

    #[test]
    fn first_sight_waits_for_the_next_firing() {
        let plans = vec![plan("p", "@every 1h", 0)];
        let mut state = ScheduleState::default();
        let now = at(10 * 3600 + 1800);
        assert!(state.reconcile(&plans, now));
        assert!(state.take_due(&plans, "a", now, now).is_empty(), "the 10:00 firing predates the plan here");
        assert!(state.take_due(&plans, "a", at(11 * 3600 - 1), now).is_empty());
        let due = state.take_due(&plans, "a", at(11 * 3600), now);
        assert_eq!(due, vec![Due { plan: "p".into(), trigger: Trigger::Schedule, firing: at(11 * 3600) }]);
        assert!(state.take_due(&plans, "a", at(11 * 3600 + 10), now).is_empty(), "handled once");
        assert!(!state.reconcile(&plans, at(11 * 3600 + 20)), "nothing new");
    }

    #[test]
    fn downtime_catches_up_once() {
        let plans = vec![plan("p", "@every 1h", 0)];
        let mut state = ScheduleState::default();
        state.reconcile(&plans, at(3600));
        assert_eq!(state.take_due(&plans, "a", at(7200), at(3600)).len(), 1);
        let saved = serde_json::to_vec(&state).unwrap();
        // Down from 02:00:30 to 07:15: five firings missed. The restarted agent runs the plan once, as a catch-up.
        let mut restarted: ScheduleState = serde_json::from_slice(&saved).unwrap();
        let start = at(7 * 3600 + 900);
        assert!(!restarted.reconcile(&plans, start));
        let due = restarted.take_due(&plans, "a", start, start);
        assert_eq!(due, vec![Due { plan: "p".into(), trigger: Trigger::CatchUp, firing: at(7 * 3600) }]);
        assert!(restarted.take_due(&plans, "a", at(7 * 3600 + 901), start).is_empty());
        assert_eq!(restarted.take_due(&plans, "a", at(8 * 3600), start)[0].trigger, Trigger::Schedule);
    }

    #[test]
    fn jitter_delays_the_due_time_not_the_firing() {
        let p = plan("p", "@every 1h", 3600);
        let o = offset("agent-9", "p", 3600).as_secs() as i64;
        assert!(o > 0, "this id has a non-zero offset");
        let plans = vec![p];
        let mut state = ScheduleState::default();
        state.reconcile(&plans, at(3600 * 5 + 3599));
        let start = at(3600 * 5 + 3599);
        assert!(state.take_due(&plans, "agent-9", at(6 * 3600 + o - 1), start).is_empty());
        let due = state.take_due(&plans, "agent-9", at(6 * 3600 + o), start);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].firing, at(6 * 3600));
        assert_eq!(state.next_wake(&plans, "agent-9", at(6 * 3600 + o)), Some(at(7 * 3600 + o)));
    }

    #[test]
    fn removed_and_changed_plans() {
        let mut state = ScheduleState::default();
        state.reconcile(&[plan("a", "@every 1h", 0), plan("b", "@every 1h", 0)], at(100));
        state.plans.get_mut("a").unwrap().last = 50;
        assert!(state.reconcile(&[plan("a", "@every 2h", 0)], at(200)));
        assert_eq!(state.plans.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(state.plans["a"].last, 200, "a changed schedule starts afresh");
        // A schedule that does not parse is never due, and does not stop the others.
        let plans = vec![plan("bad", "not a schedule", 0), plan("a", "@every 2h", 0)];
        state.reconcile(&plans, at(200));
        assert_eq!(state.take_due(&plans, "x", at(7200), at(0)).len(), 1);
    }
}
