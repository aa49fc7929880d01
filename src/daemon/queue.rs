//! What waits for a slot and what the autopilot must remember, in `queue.json` (atomic writes): the local queue
//! (`assign --queue`, first in first out), the person's `autopilot on|off` until `reset`, and the issues this
//! machine ended, so the board does not feed them back until a person moves them to Ready again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::timefmt::rfc3339;

/// The longest local queue: more is refused with a clear error.
pub const MAX_QUEUED: usize = 1000;
/// The prompts of queued tasks together at most (each may be 1 MiB; `queue.json` is rewritten on every change).
const MAX_QUEUED_PROMPT_BYTES: usize = 16 << 20;
/// Ended issues remembered (the newest).
const MAX_ENDED: usize = 2000;
const FORMAT_VERSION: u32 = 1;

/// A task waiting for a free slot; it holds none.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Queued {
    pub issue: u64,
    pub llm: Option<String>,
    pub slot: Option<String>,
    pub prompt: Option<String>,
    pub force: bool,
    pub queued_at: String,
}

/// An issue whose task ended here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ended {
    pub at: String,
    /// The Status the end writes on the board.
    pub wrote: String,
    /// When Status last changed as first seen once that write was done: a later change is a person's.
    pub seen: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    version: u32,
    /// `autodevctl autopilot on|off`, until `reset`.
    #[serde(rename = "override")]
    autopilot: Option<bool>,
    queue: Vec<Queued>,
    ended: BTreeMap<u64, Ended>,
}

impl Default for Stored {
    fn default() -> Self {
        Stored { version: FORMAT_VERSION, autopilot: None, queue: Vec::new(), ended: BTreeMap::new() }
    }
}

pub struct Queue {
    path: PathBuf,
    stored: Mutex<Stored>,
    /// Woken when a slot may have come free or the queue changed.
    pub wake: Notify,
    /// The daemon's change counter: what `status` shows of the queue and the switch changed (the live feed).
    changes: tokio::sync::watch::Sender<u64>,
}

impl Queue {
    /// Loads `queue.json` (one that cannot be read, or of a newer format, is moved aside, never overwritten).
    pub fn load(path: PathBuf, changes: tokio::sync::watch::Sender<u64>) -> Queue {
        let stored = crate::ledger::load_versioned(&path, FORMAT_VERSION, |s: &Stored| s.version);
        Queue { path, stored: Mutex::new(stored), wake: Notify::new(), changes }
    }

    /// The queue or the switch changed: the autopilot looks again, and subscribers see it.
    fn changed(&self) {
        self.wake.notify_one();
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.stored.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, stored: &Stored) -> std::io::Result<()> {
        crate::ledger::write_json(&self.path, stored)
    }

    /// Puts a task at the end of the local queue; returns its place (1 first). Refused when the issue is queued
    /// already, the queue is full, or it cannot be written (then nothing is queued).
    pub fn push(
        &self,
        issue: u64,
        llm: Option<&str>,
        slot: Option<&str>,
        prompt: Option<&str>,
        force: bool,
    ) -> Result<usize, String> {
        let mut stored = self.lock();
        if let Some(at) = stored.queue.iter().position(|q| q.issue == issue) {
            return Err(format!("issue #{issue} is queued already (place {})", at + 1));
        }
        if stored.queue.len() >= MAX_QUEUED {
            return Err(format!("the queue holds {MAX_QUEUED} tasks, its limit"));
        }
        let held: usize = stored.queue.iter().filter_map(|q| q.prompt.as_ref()).map(String::len).sum();
        if held + prompt.map_or(0, str::len) > MAX_QUEUED_PROMPT_BYTES {
            return Err(format!(
                "the queued tasks' prompts would pass {} MiB together, the queue's limit: put long tasks in files \
                 in the repository and point to them",
                MAX_QUEUED_PROMPT_BYTES >> 20
            ));
        }
        stored.queue.push(Queued {
            issue,
            llm: llm.map(str::to_string),
            slot: slot.map(str::to_string),
            prompt: prompt.map(str::to_string),
            force,
            queued_at: rfc3339(SystemTime::now()),
        });
        if let Err(e) = self.persist(&stored) {
            stored.queue.pop();
            return Err(format!("cannot write {}: {e}", self.path.display()));
        }
        let place = stored.queue.len();
        drop(stored);
        self.changed();
        Ok(place)
    }

    /// Takes `issue` out of the local queue; whether it was there.
    pub fn remove(&self, issue: u64) -> bool {
        let mut stored = self.lock();
        let before = stored.queue.len();
        stored.queue.retain(|q| q.issue != issue);
        let removed = stored.queue.len() != before;
        if removed && let Err(e) = self.persist(&stored) {
            tracing::error!("cannot write {}: {e}", self.path.display());
        }
        drop(stored);
        if removed {
            self.changed();
        }
        removed
    }

    pub fn is_empty(&self) -> bool {
        self.lock().queue.is_empty()
    }

    pub fn queued(&self) -> Vec<Queued> {
        self.lock().queue.clone()
    }

    pub fn autopilot_override(&self) -> Option<bool> {
        self.lock().autopilot
    }

    pub fn set_autopilot(&self, value: Option<bool>) -> Result<(), String> {
        let mut stored = self.lock();
        let old = std::mem::replace(&mut stored.autopilot, value);
        if let Err(e) = self.persist(&stored) {
            stored.autopilot = old;
            return Err(format!("cannot write {}: {e}", self.path.display()));
        }
        drop(stored);
        self.changed();
        Ok(())
    }

    /// Remembers that the task of `issue` ended here, and which Status its end writes.
    pub fn note_ended(&self, issue: u64, wrote: String) {
        let mut stored = self.lock();
        stored.ended.insert(issue, Ended { at: rfc3339(SystemTime::now()), wrote, seen: None });
        if stored.ended.len() > MAX_ENDED {
            let oldest = stored.ended.iter().min_by(|a, b| a.1.at.cmp(&b.1.at)).map(|(i, _)| *i);
            if let Some(oldest) = oldest {
                stored.ended.remove(&oldest);
            }
        }
        if let Err(e) = self.persist(&stored) {
            tracing::error!("cannot write {}: {e}", self.path.display());
        }
        drop(stored);
        self.wake.notify_one();
    }

    pub fn ended(&self, issue: u64) -> Option<Ended> {
        self.lock().ended.get(&issue).cloned()
    }

    /// Records the Status change time seen once the end's write was done.
    pub fn set_seen(&self, issue: u64, seen: Option<String>) {
        let mut stored = self.lock();
        // Only a change is written: a full board read says the same of most items every time.
        if let Some(ended) = stored.ended.get_mut(&issue)
            && ended.seen != seen
        {
            ended.seen = seen;
            if let Err(e) = self.persist(&stored) {
                tracing::error!("cannot write {}: {e}", self.path.display());
            }
        }
    }

    /// A person moved the issue back: it may be taken again.
    pub fn forget_ended(&self, issue: u64) {
        let mut stored = self.lock();
        if stored.ended.remove(&issue).is_some()
            && let Err(e) = self.persist(&stored)
        {
            tracing::error!("cannot write {}: {e}", self.path.display());
        }
    }
}

/// May the board feed this ended issue back? Only once a person moved it to Ready after the end's own write.
/// `pending`: that write is still owed. Returns the decision and the `seen` to record, if it changes.
pub fn may_retake(ended: &Ended, status: Option<&str>, changed_at: Option<&str>, ready: bool, pending: bool) -> Retake {
    if pending {
        return Retake::No("the board write of its end is still owed");
    }
    match &ended.seen {
        // The first look since the write: the board shows what the end wrote (a baseline), or a person already
        // moved it on to Ready.
        None if ready && status != Some(ended.wrote.as_str()) => Retake::Yes,
        None => Retake::Record(changed_at.map(str::to_string)),
        Some(seen) if ready && changed_at.is_some_and(|c| c != seen) => Retake::Yes,
        Some(_) => Retake::No("it ended here, and nobody has moved it back to Ready since"),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Retake {
    Yes,
    No(&'static str),
    /// Not now; remember this as the end's own Status change.
    Record(Option<String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_issue_comes_back_only_when_a_person_moves_it_to_ready() {
        let ended = |wrote: &str, seen: Option<&str>| Ended {
            at: "t".into(),
            wrote: wrote.into(),
            seen: seen.map(String::from),
        };
        let nobody = Retake::No("it ended here, and nobody has moved it back to Ready since");
        // (what the end wrote, seen, status now, changed at, ready?, write pending?, expected)
        let table = [
            (
                "Blocked",
                None,
                Some("Ready"),
                Some("t1"),
                true,
                true,
                Retake::No("the board write of its end is still owed"),
            ),
            ("Blocked", None, Some("Blocked"), Some("t1"), false, false, Retake::Record(Some("t1".into()))),
            // blockedValue missing: the end itself wrote a Ready value; that is no person's move.
            ("Ready", None, Some("Ready"), Some("t1"), true, false, Retake::Record(Some("t1".into()))),
            // Moved back to Ready before the first look.
            ("Blocked", None, Some("Ready"), Some("t2"), true, false, Retake::Yes),
            ("Blocked", Some("t1"), Some("Ready"), Some("t1"), true, false, nobody.clone()),
            ("Ready", Some("t1"), Some("Ready"), Some("t3"), true, false, Retake::Yes),
            ("Blocked", Some("t1"), Some("Todo"), Some("t3"), false, false, nobody),
        ];
        for (i, (wrote, seen, status, changed, ready, pending, expected)) in table.into_iter().enumerate() {
            assert_eq!(may_retake(&ended(wrote, seen), status, changed, ready, pending), expected, "row {i}");
        }
    }
}
