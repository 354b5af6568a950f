//! What the server has for each agent right now, in memory: a task generation per agent that run-now, restore and
//! listing requests move forward (the long-poll `GET /api/v1/agents/tasks` waits on it), and the pending snapshot
//! listings, which are never stored: one that is not answered in time is dropped and its caller told so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use rm_protocol::restore::{LsResult, LsTask};
use tokio::sync::{oneshot, watch};

/// Most listings pending at once, fleet-wide (each holds an operator's request open).
pub const MAX_PENDING_LS: usize = 1000;
/// Most listings pending at once for one agent (it runs two `restic ls` at a time).
pub const MAX_PENDING_LS_PER_AGENT: usize = 8;
/// What an agent turned away from a full long-poll is told to wait before asking again.
pub const POLL_BUSY_RETRY_SECS: u64 = 30;

pub struct Tasks {
    inner: Mutex<Inner>,
    /// Long-polls held now, and how many may be (half the connection limit, set on first use).
    polls: AtomicUsize,
    max_polls: OnceLock<usize>,
    /// Where generations start: different for every server process, so an agent's `seen` from before a restart
    /// never matches by accident.
    base: u64,
}

#[derive(Default)]
struct Inner {
    agents: HashMap<String, watch::Sender<u64>>,
    ls: HashMap<String, PendingLs>,
}

struct PendingLs {
    agent_id: String,
    task: LsTask,
    reply: oneshot::Sender<LsResult>,
}

/// Why a listing was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum LsRefused {
    /// [`MAX_PENDING_LS`] are pending fleet-wide.
    Fleet,
    /// [`MAX_PENDING_LS_PER_AGENT`] are pending for this agent.
    Agent,
}

/// A held long-poll: counted until dropped.
pub struct PollSlot<'a>(&'a AtomicUsize);

impl Drop for PollSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why an agent's listing answer was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum AnswerError {
    /// No such pending request (answered already, timed out, or never asked).
    Unknown,
}

impl Default for Tasks {
    fn default() -> Tasks {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Tasks { inner: Mutex::default(), polls: AtomicUsize::new(0), max_polls: OnceLock::new(), base: nanos }
    }
}

impl Tasks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sender<'a>(&self, inner: &'a mut Inner, agent_id: &str) -> &'a watch::Sender<u64> {
        inner.agents.entry(agent_id.to_owned()).or_insert_with(|| watch::channel(self.base).0)
    }

    /// Something new for `agent_id`: its long-poll answers now.
    pub fn wake(&self, agent_id: &str) {
        let mut inner = self.lock();
        self.sender(&mut inner, agent_id).send_modify(|g| *g = g.wrapping_add(1));
    }

    /// The agent's generation now and a receiver that sees it move.
    pub fn subscribe(&self, agent_id: &str) -> watch::Receiver<u64> {
        let mut inner = self.lock();
        self.sender(&mut inner, agent_id).subscribe()
    }

    /// A long-poll may be held (`None`: as many as allowed are held; answer at once). `max` is computed once, on
    /// first use: long-polls may take at most half the connection limit, so heartbeats, admin requests and
    /// `/healthz` always find room.
    pub fn hold_poll(&self, max: impl FnOnce() -> usize) -> Option<PollSlot<'_>> {
        let max = *self.max_polls.get_or_init(|| (max() / 2).max(1));
        let held = self.polls.fetch_add(1, Ordering::AcqRel);
        let slot = PollSlot(&self.polls);
        (held < max).then_some(slot)
    }

    /// Queues a listing for `agent_id` and wakes it; refused when [`MAX_PENDING_LS`] are pending already, or
    /// [`MAX_PENDING_LS_PER_AGENT`] for this agent.
    pub fn add_ls(&self, agent_id: &str, task: LsTask) -> Result<oneshot::Receiver<LsResult>, LsRefused> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        if inner.ls.len() >= MAX_PENDING_LS {
            return Err(LsRefused::Fleet);
        }
        if inner.ls.values().filter(|p| p.agent_id == agent_id).count() >= MAX_PENDING_LS_PER_AGENT {
            return Err(LsRefused::Agent);
        }
        inner.ls.insert(task.request_id.clone(), PendingLs { agent_id: agent_id.to_owned(), task, reply: tx });
        self.sender(&mut inner, agent_id).send_modify(|g| *g = g.wrapping_add(1));
        Ok(rx)
    }

    /// Drops a listing (its caller stopped waiting).
    pub fn remove_ls(&self, request_id: &str) {
        self.lock().ls.remove(request_id);
    }

    /// The listings pending for `agent_id`.
    pub fn pending_ls(&self, agent_id: &str) -> Vec<LsTask> {
        let inner = self.lock();
        let mut list: Vec<LsTask> =
            inner.ls.values().filter(|p| p.agent_id == agent_id).map(|p| p.task.clone()).collect();
        list.sort_by(|a, b| a.request_id.cmp(&b.request_id));
        list
    }

    /// Hands `agent_id`'s answer to the waiting caller. A request of another agent is [`AnswerError::Unknown`] too:
    /// an agent learns nothing about others' requests.
    pub fn answer_ls(&self, agent_id: &str, request_id: &str, result: LsResult) -> Result<(), AnswerError> {
        let mut inner = self.lock();
        match inner.ls.get(request_id) {
            Some(p) if p.agent_id == agent_id => {}
            _ => return Err(AnswerError::Unknown),
        }
        let pending = inner.ls.remove(request_id).expect("checked above");
        pending.reply.send(result).map_err(|_| AnswerError::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str) -> LsTask {
        LsTask { request_id: id.into(), repository: "r".into(), snapshot: "ab".into(), path: "/".into() }
    }

    #[tokio::test]
    async fn wakes_reach_the_agent_and_answers_only_its_own_requests() {
        let tasks = Tasks::default();
        let mut rx = tasks.subscribe("a1");
        let start = *rx.borrow_and_update();
        tasks.wake("a2");
        assert!(!rx.has_changed().unwrap(), "another agent's wake");
        let reply = tasks.add_ls("a1", task("ls_1")).unwrap();
        assert!(rx.has_changed().unwrap());
        assert_ne!(*rx.borrow_and_update(), start);
        assert_eq!(tasks.pending_ls("a1"), vec![task("ls_1")]);
        assert!(tasks.pending_ls("a2").is_empty());
        assert_eq!(tasks.answer_ls("a2", "ls_1", LsResult::default()), Err(AnswerError::Unknown));
        let result = LsResult { truncated: true, ..Default::default() };
        tasks.answer_ls("a1", "ls_1", result.clone()).unwrap();
        assert_eq!(reply.await.unwrap(), result);
        assert_eq!(tasks.answer_ls("a1", "ls_1", LsResult::default()), Err(AnswerError::Unknown), "answered once");
        assert!(tasks.pending_ls("a1").is_empty());
    }

    #[test]
    fn one_agent_cannot_take_every_pending_listing() {
        let tasks = Tasks::default();
        let mut held = Vec::new();
        for i in 0..MAX_PENDING_LS_PER_AGENT {
            held.push(tasks.add_ls("a1", task(&format!("ls_{i}"))).unwrap());
        }
        assert_eq!(tasks.add_ls("a1", task("ls_more")).err(), Some(LsRefused::Agent));
        assert!(tasks.add_ls("a2", task("ls_other")).is_ok(), "another agent still lists");
        tasks.remove_ls("ls_0");
        assert!(tasks.add_ls("a1", task("ls_again")).is_ok(), "room again once one ended");
    }

    #[test]
    fn long_polls_take_at_most_half_the_connections() {
        let tasks = Tasks::default();
        let held: Vec<_> = (0..5).map(|_| tasks.hold_poll(|| 10).expect("five of ten")).collect();
        assert!(tasks.hold_poll(|| 10).is_none(), "the sixth is answered at once");
        drop(held);
        assert!(tasks.hold_poll(|| 10).is_some(), "released when they end");
        assert!(Tasks::default().hold_poll(|| 1).is_some(), "at least one");
    }
}
