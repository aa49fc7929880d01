//! Status comments (seed 000): one comment per task on its GitHub issue, created when the run starts and edited in
//! place on every state change and at most once per `statusComments.intervalSecs` while it runs. The body holds a
//! short summary and the INSTANCE_STATUS block with its JSON. Secrets are removed from previews first.
//!
//! A comment is never created twice: its id is kept with the task, and before any POST for a task whose id is not
//! known (a crash, a POST whose answer was lost) the issue's comments are searched for the task's marker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Notify;

use super::client::{GhError, GitHub};
use crate::protocol::SlotStatus;

/// Preview lines (and characters of each) a comment carries, whatever the preview keeps.
const COMMENT_PREVIEW_LINES: usize = 20;
const COMMENT_LINE_CHARS: usize = 500;
/// Comments read back per page and pages searched when looking for a task's comment.
const SEARCH_PAGES: u32 = 10;

/// What a comment is about, as of the moment it was asked for.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub task_id: String,
    pub issue: u64,
    pub title: String,
    pub row: SlotStatus,
    /// A state change: written at once; otherwise it waits for the interval.
    pub urgent: bool,
}

struct Entry {
    snapshot: Snapshot,
    comment_id: Option<u64>,
    last_written: Option<Instant>,
    /// Bumped by every update; the worker settles an entry only if no update came while it wrote.
    version: u64,
    written: u64,
    retry_at: Option<Instant>,
    failures: u32,
}

pub struct Comments {
    gh: Arc<GitHub>,
    owner: String,
    repo: String,
    interval: Duration,
    entries: Mutex<HashMap<String, Entry>>,
    wake: Notify,
    /// Comment ids learned, for the task records (task id → comment id), taken by the daemon.
    learned: Mutex<Vec<(String, u64)>>,
}

impl Comments {
    pub fn new(gh: Arc<GitHub>, owner: String, repo: String, interval: Duration) -> Arc<Comments> {
        Arc::new(Comments {
            gh,
            owner,
            repo,
            interval,
            entries: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            learned: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a status comment of `issue` waits to be written (one that is being retried counts).
    pub fn owes(&self, issue: u64) -> bool {
        self.lock().values().any(|e| e.snapshot.issue == issue && e.written < e.version)
    }

    /// Asks for the task's comment to show `snapshot`; `known_id` is the comment id the task record has.
    pub fn update(&self, snapshot: Snapshot, known_id: Option<u64>) {
        let urgent = snapshot.urgent;
        let mut entries = self.lock();
        let entry = entries.entry(snapshot.task_id.clone()).or_insert_with(|| Entry {
            snapshot: snapshot.clone(),
            comment_id: known_id,
            last_written: None,
            version: 0,
            written: 0,
            retry_at: None,
            failures: 0,
        });
        // An urgent change not yet written stays urgent when a routine one follows it.
        let pending_urgent = entry.snapshot.urgent && entry.written < entry.version;
        entry.snapshot = Snapshot { urgent: urgent || pending_urgent, ..snapshot };
        // The entry's own id wins: a comment found gone (404) must not come back from the task record.
        entry.version += 1;
        drop(entries);
        if urgent {
            self.wake.notify_one();
        }
    }

    /// Comment ids found or created since the last call.
    pub fn take_learned(&self) -> Vec<(String, u64)> {
        std::mem::take(&mut *self.learned.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The worker: writes what is due, one write a second at most.
    pub async fn run(self: Arc<Self>) {
        loop {
            let due = {
                let entries = self.lock();
                let now = Instant::now();
                entries
                    .iter()
                    .filter(|(_, e)| e.written < e.version && e.retry_at.is_none_or(|t| t <= now))
                    .filter(|(_, e)| {
                        e.snapshot.urgent || e.last_written.is_none_or(|t| now.duration_since(t) >= self.interval)
                    })
                    .map(|(k, e)| (k.clone(), e.snapshot.clone(), e.comment_id, e.version))
                    .collect::<Vec<_>>()
            };
            for (task_id, snapshot, id, version) in due {
                let body = render(&snapshot);
                let result = self.write(&snapshot, &task_id, id, &body).await;
                {
                    let mut entries = self.lock();
                    if let Some(entry) = entries.get_mut(&task_id) {
                        match result {
                            Ok(new_id) => {
                                entry.comment_id = Some(new_id);
                                entry.last_written = Some(Instant::now());
                                entry.written = version;
                                entry.failures = 0;
                                entry.retry_at = None;
                                if entry.version == version {
                                    entry.snapshot.urgent = false;
                                }
                            }
                            Err(GhError::NotOurs(why)) => {
                                tracing::info!(issue = snapshot.issue, "status comment {why}");
                                entry.written = entry.version;
                            }
                            Err(GhError::NotFound(what)) if entry.comment_id.is_none() => {
                                // The issue is not on GitHub (a task given with --prompt): nothing to comment on.
                                tracing::info!(issue = snapshot.issue, "no status comment: {what}");
                                entry.written = entry.version;
                                entry.retry_at = Some(Instant::now() + Duration::from_secs(86_400));
                            }
                            Err(e) => {
                                entry.failures += 1;
                                let wait = e
                                    .wait_hint()
                                    .unwrap_or(Duration::from_secs(1 << entry.failures.min(8)))
                                    .min(Duration::from_secs(3600));
                                tracing::warn!(issue = snapshot.issue, "status comment: {e}; trying again in {wait:?}");
                                entry.retry_at = Some(Instant::now() + wait);
                            }
                        }
                    }
                    // A task whose run is over and whose last state is written needs no entry any more (a resume
                    // brings it back, with the id from the task record).
                    let done = entries
                        .get(&task_id)
                        .is_some_and(|e| e.written == e.version && !e.snapshot.row.state.is_running());
                    if done {
                        entries.remove(&task_id);
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
        }
    }

    /// PATCHes the task's comment, or finds it, or (only if it does not exist) creates it. Returns its id.
    async fn write(&self, snapshot: &Snapshot, task_id: &str, known: Option<u64>, body: &str) -> Result<u64, GhError> {
        let (owner, repo) = (&self.owner, &self.repo);
        let id = match known {
            Some(id) => Some(id),
            None => self.find(snapshot.issue, task_id).await?,
        };
        // The token's one write pace (shared with the board and pull requests), then the fleet's claim check.
        self.gh.before_write(snapshot.issue).await?;
        let id = match id {
            Some(id) => {
                let reply = self
                    .gh
                    .rest_send(
                        "PATCH",
                        &format!("/repos/{owner}/{repo}/issues/comments/{id}"),
                        &json!({ "body": body }),
                    )
                    .await;
                match reply {
                    Ok(_) => id,
                    // Deleted by someone: a new one is made next time (after a search).
                    Err(GhError::NotFound(_)) => {
                        if let Some(e) = self.lock().get_mut(task_id) {
                            e.comment_id = None;
                        }
                        return Err(GhError::Other(format!("comment {id} is gone; a new one will be made")));
                    }
                    Err(e) => return Err(e),
                }
            }
            None => {
                let created = self
                    .gh
                    .rest_send(
                        "POST",
                        &format!("/repos/{owner}/{repo}/issues/{}/comments", snapshot.issue),
                        &json!({ "body": body }),
                    )
                    .await?;
                created["id"]
                    .as_u64()
                    .ok_or_else(|| GhError::Other("GitHub did not say the new comment's id".into()))?
            }
        };
        self.learned.lock().unwrap_or_else(|e| e.into_inner()).push((task_id.to_string(), id));
        Ok(id)
    }

    /// The task's comment on the issue, if one exists (found by its marker).
    async fn find(&self, issue: u64, task_id: &str) -> Result<Option<u64>, GhError> {
        let marker = task_marker(task_id);
        for page in 1..=SEARCH_PAGES {
            let path = format!("/repos/{}/{}/issues/{issue}/comments?per_page=100&page={page}", self.owner, self.repo);
            let list = self.gh.rest_get(&path).await?;
            let Some(items) = list.as_array() else { return Ok(None) };
            if let Some(found) = items.iter().find(|c| c["body"].as_str().is_some_and(|b| b.contains(&marker))) {
                return Ok(found["id"].as_u64());
            }
            if items.len() < 100 {
                break;
            }
        }
        Ok(None)
    }
}

fn task_marker(task_id: &str) -> String {
    format!("<!-- autodev-task:{task_id} -->")
}

fn bar(percent: u8) -> String {
    let filled = usize::from(percent.min(100)) / 10;
    format!("{}{} {percent}%", "█".repeat(filled), "░".repeat(10 - filled))
}

/// The comment: a human summary, then the seed's INSTANCE_STATUS block (JSON that parses), then the task marker.
pub fn render(s: &Snapshot) -> String {
    let redact = crate::redact::current();
    let row = &s.row;
    // GitHub takes at most 65,536 characters per comment; the preview config allows far more.
    let skip = row.console_preview.len().saturating_sub(COMMENT_PREVIEW_LINES);
    let preview: Vec<String> = row.console_preview[skip..]
        .iter()
        .map(|l| redact.clean(&l.chars().take(COMMENT_LINE_CHARS).collect::<String>()).into_owned())
        .collect();
    let uptime =
        row.started_at.as_deref().and_then(crate::timefmt::parse_rfc3339).map(crate::timefmt::age).unwrap_or(0);
    let json_block = json!({
        "instance_id": row.slot,
        "status": row.state.as_str(),
        "role": "worker",
        "current_task": {
            "id": format!("issue-{}", s.issue),
            "description": redact.clean(&s.title),
            "progress": row.progress.unwrap_or(0),
            "started_at": row.started_at,
        },
        "health": {
            "cpu_usage": row.cpu_percent.unwrap_or(0.0),
            "memory_mb": row.memory_mb.unwrap_or(0.0),
            "last_heartbeat": row.heartbeat_at,
            "uptime_seconds": uptime,
        },
        "console_preview": preview,
    });
    let progress = match (row.progress, &row.progress_message) {
        (Some(p), Some(m)) => format!("{} {}", bar(p), redact.clean(m)),
        (Some(p), None) => bar(p),
        _ => "no progress reported".into(),
    };
    let mut summary = format!("**autodev** · `{}` · **{}** · {progress}\n", row.slot, row.state.as_str());
    if let Some(reason) = &row.reason {
        summary.push_str(&format!("{}\n", redact.clean(reason)));
    }
    let spend = match (row.cost_usd, row.tokens) {
        (cost, Some(t)) => format!(
            " · {} tokens ({} in, {} cached, {} out){}",
            t.total(),
            t.input,
            t.cached_input,
            t.output,
            cost.map(|c| format!(" · {}${c:.2}", if row.cost_estimated { "~" } else { "" })).unwrap_or_default()
        ),
        (Some(c), None) => format!(" · ${c:.2}"),
        (None, None) => String::new(),
    };
    summary.push_str(&format!(
        "cpu {:.0}% · memory {:.0} MB · last heartbeat {}{spend}\n",
        row.cpu_percent.unwrap_or(0.0),
        row.memory_mb.unwrap_or(0.0),
        row.heartbeat_at.as_deref().unwrap_or("-")
    ));
    let pretty = serde_json::to_string_pretty(&json_block).unwrap_or_else(|_| Value::Null.to_string());
    format!(
        "{summary}\n<!-- INSTANCE_STATUS:START:{slot} -->\n```json\n{pretty}\n```\n<!-- INSTANCE_STATUS:END:{slot} -->\n{marker}\n",
        slot = row.slot,
        marker = task_marker(&s.task_id)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_preview_still_fits_in_a_comment() {
        let row: SlotStatus = serde_json::from_value(json!({
            "slot": "claude-1", "provider": "claude", "state": "in_progress", "issue": 1, "task_id": "t", "run_id": "r",
            "runs": [], "worktree": null, "branch": null, "pid": 1, "adopted": false, "started_at": null,
            "last_output_at": null, "ended_at": null, "session_id": null, "exit_code": null, "reason": null,
            "cost_usd": null, "turns": null, "console_preview": vec!["x".repeat(10_000); 1000], "heartbeat_at": null,
            "progress": null, "progress_message": null, "cpu_percent": null, "memory_mb": null, "attempt": 1,
            "rate_limited_until": null
        }))
        .unwrap();
        let snapshot = Snapshot { task_id: "t".into(), issue: 1, title: "t".into(), row, urgent: false };
        let body = render(&snapshot);
        assert!(body.chars().count() < 65_536, "{} characters", body.chars().count());
    }

    #[test]
    fn progress_bar() {
        assert_eq!(bar(70), "███████░░░ 70%");
        assert_eq!(bar(0), "░░░░░░░░░░ 0%");
    }
}
