//! What the server has for each agent right now, in memory: a task generation per agent that run-now, restore and
//! listing requests move forward (the long-poll `GET /api/v1/agents/tasks` waits on it), and the pending snapshot
//! listings, which are never stored: one that is not answered in time is dropped and its caller told so.

use std::collections::HashMap;
use std::sync::Mutex;

use rm_protocol::restore::{LsResult, LsTask};
use tokio::sync::{oneshot, watch};

/// Most listings pending at once, fleet-wide (each holds an operator's request open).
pub const MAX_PENDING_LS: usize = 1000;

pub struct Tasks {
    inner: Mutex<Inner>,
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
        Tasks { inner: Mutex::default(), base: nanos }
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

    /// Queues a listing for `agent_id` and wakes it; `None` when [`MAX_PENDING_LS`] are pending already.
    pub fn add_ls(&self, agent_id: &str, task: LsTask) -> Option<oneshot::Receiver<LsResult>> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        if inner.ls.len() >= MAX_PENDING_LS {
            return None;
        }
        inner.ls.insert(task.request_id.clone(), PendingLs { agent_id: agent_id.to_owned(), task, reply: tx });
        self.sender(&mut inner, agent_id).send_modify(|g| *g = g.wrapping_add(1));
        Some(rx)
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
}
