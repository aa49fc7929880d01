//! The board reconciler. Local state decides; this pushes the field values it implies, in the background, so
//! GitHub being down, slow or rate limited never delays a spawn, a stop or a status reply.
//!
//! What is owed per issue is kept in `github-sync.json` (atomic writes): the newest wish per issue replaces older
//! ones (coalescing), it survives restarts, and an entry is removed only once GitHub has taken it — so after a
//! restart nothing is lost and nothing applied is sent again.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Notify;

use super::board::{self, Board, IssueView};
use super::client::{GhError, GitHub};
use crate::config::{ProjectConfig, to_review};
use crate::timefmt::rfc3339;

/// An intake read this recent stands in for the reconciler's own read.
const HINT_FRESH: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_secs(1);

/// What the board should say about an issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Status in progress, Assigned Instance = the slot.
    InProgress,
    /// Status done (or review), Assigned Instance cleared if still ours.
    Completed,
    /// Status blocked (or the first ready value), Assigned Instance cleared if still ours.
    Failed,
    /// Its pull request exists: Status review (else done), Assigned Instance cleared if still ours.
    Review,
    /// The task waits for a person's answer: Status needs-more-info (else blocked), Assigned Instance kept.
    NeedsInfo,
}

impl Target {
    /// The name `project` shows (and serde writes).
    pub fn as_str(self) -> &'static str {
        match self {
            Target::InProgress => "in_progress",
            Target::Completed => "completed",
            Target::Failed => "failed",
            Target::Review => "review",
            Target::NeedsInfo => "needs_info",
        }
    }
}

/// One issue's owed update.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Owed {
    pub issue: u64,
    pub slot: String,
    pub target: Target,
    pub since: String,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
    /// `assign --force`: overwrite an Assigned Instance someone else set.
    #[serde(default)]
    pub takeover: bool,
}

impl From<Owed> for crate::protocol::PendingWrite {
    fn from(owed: Owed) -> Self {
        crate::protocol::PendingWrite {
            issue: owed.issue,
            slot: owed.slot,
            target: owed.target.as_str().to_string(),
            since: owed.since,
            attempts: owed.attempts,
            last_error: owed.last_error,
        }
    }
}

/// Format version of `github-sync.json` (files written before it carried one are version 1 as well).
const OUTBOX_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Outbox {
    #[serde(default = "first_version")]
    version: u32,
    owed: BTreeMap<u64, Owed>,
    last_error: Option<(String, String)>,
}

fn first_version() -> u32 {
    1
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox { version: OUTBOX_VERSION, owed: BTreeMap::new(), last_error: None }
    }
}

/// Reads the outbox. One of a newer format is moved aside (`github-sync.json.v<N>`), never overwritten: the newer
/// autodev that wrote it can still send what it holds.
fn load_outbox(path: &std::path::Path) -> Outbox {
    crate::ledger::load_versioned(path, OUTBOX_VERSION, |o: &Outbox| o.version)
}

struct State {
    outbox: Outbox,
    /// When each owed issue may be tried again.
    retry_at: HashMap<u64, Instant>,
    /// Fresh reads from intake, so the reconciler need not read the issue again.
    hints: HashMap<u64, (IssueView, Instant)>,
    board: Option<Board>,
    /// Requests sent to GitHub (for `project status` and the request-count test).
    requests: u64,
}

pub struct Reconciler {
    gh: Arc<GitHub>,
    owner: String,
    repo: String,
    project: ProjectConfig,
    path: PathBuf,
    /// The longest wait between attempts (`github.retryMaxSecs`).
    backoff_max: Duration,
    state: Mutex<State>,
    wake: Notify,
}

/// What `project status` shows of the reconciler.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncReport {
    pub pending: Vec<Owed>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub requests: u64,
    pub board: Option<Board>,
}

impl Reconciler {
    /// Loads what is owed from `path` (empty if the file does not exist).
    pub fn new(
        gh: Arc<GitHub>,
        owner: String,
        repo: String,
        project: ProjectConfig,
        path: PathBuf,
        backoff_max: Duration,
    ) -> Arc<Reconciler> {
        let outbox = load_outbox(&path);
        Arc::new(Reconciler {
            gh,
            owner,
            repo,
            project,
            path,
            backoff_max,
            state: Mutex::new(State {
                outbox,
                retry_at: HashMap::new(),
                hints: HashMap::new(),
                board: None,
                requests: 0,
            }),
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, state: &State) {
        if let Err(e) = crate::ledger::write_json(&self.path, &state.outbox) {
            tracing::error!("cannot write {}: {e}", self.path.display());
        }
    }

    /// Records what the board should say about `issue` (replacing any older wish) and wakes the reconciler.
    pub fn want(&self, issue: u64, slot: &str, target: Target, takeover: bool) {
        let mut state = self.lock();
        let owed = Owed {
            issue,
            slot: slot.to_string(),
            target,
            since: rfc3339(SystemTime::now()),
            attempts: 0,
            last_error: None,
            takeover,
        };
        state.outbox.owed.insert(issue, owed);
        state.retry_at.remove(&issue);
        self.persist(&state);
        drop(state);
        self.wake.notify_one();
    }

    /// A fresh read of the issue (from intake), so the reconciler's next update of it needs no read of its own.
    pub fn hint(&self, view: IssueView) {
        let mut state = self.lock();
        // Old hints are worthless (the next update reads the issue again); never let them pile up.
        state.hints.retain(|_, (_, at)| at.elapsed() < HINT_FRESH);
        state.hints.insert(view.number, (view, Instant::now()));
    }

    /// Counts requests made for this board outside the reconciler (intake reads, the autopilot's board reads).
    pub fn count_request(&self) {
        self.count_requests(1);
    }

    pub fn count_requests(&self, n: u64) {
        self.lock().requests += n;
    }

    /// Whether a board write for `issue` is still owed.
    pub fn owes(&self, issue: u64) -> bool {
        self.lock().outbox.owed.contains_key(&issue)
    }

    pub fn project(&self) -> &ProjectConfig {
        &self.project
    }

    pub fn github(&self) -> &GitHub {
        &self.gh
    }

    /// The Status value a wish writes.
    pub fn status_name(&self, target: Target) -> String {
        let status = &self.project.fields.status;
        match target {
            Target::InProgress => status.in_progress_value.clone(),
            Target::NeedsInfo => match (status.needs_more_info_value.as_str(), &status.blocked_value) {
                (Some(value), _) => value.to_string(),
                (None, Some(blocked)) => blocked.clone(),
                (None, None) => status.in_progress_value.clone(),
            },
            Target::Completed if to_review(&self.project) => status.review_value.clone().unwrap_or_default(),
            Target::Completed => status.done_value.clone(),
            Target::Review => status.review_value.clone().unwrap_or_else(|| status.done_value.clone()),
            Target::Failed => match &status.blocked_value {
                Some(blocked) => blocked.clone(),
                None => status.ready_values.first().cloned().unwrap_or_default(),
            },
        }
    }

    pub fn report(&self) -> SyncReport {
        let state = self.lock();
        SyncReport {
            pending: state.outbox.owed.values().cloned().collect(),
            last_error: state.outbox.last_error.as_ref().map(|e| e.0.clone()),
            last_error_at: state.outbox.last_error.as_ref().map(|e| e.1.clone()),
            requests: state.requests,
            board: state.board.clone(),
        }
    }

    /// The board as last loaded, without asking GitHub.
    pub fn cached_board(&self) -> Option<Board> {
        self.lock().board.clone()
    }

    /// The board, loaded once and cached.
    pub async fn board(&self) -> Result<Board, GhError> {
        if let Some(board) = self.lock().board.clone() {
            return Ok(board);
        }
        self.lock().requests += 1;
        let board = Board::load(&self.gh, &self.owner, &self.project).await?;
        self.lock().board = Some(board.clone());
        Ok(board)
    }

    /// Reads an issue with its item on the board.
    pub async fn read_issue(&self, issue: u64) -> Result<IssueView, GhError> {
        let project_id = if self.project.enabled { Some(self.board().await?.project_id) } else { None };
        self.lock().requests += 1;
        board::issue_view(&self.gh, &self.owner, &self.repo, issue, &self.project, project_id.as_deref()).await
    }

    /// The reconciler's loop: applies what is owed, with backoff, never more than one mutation a second.
    pub async fn run(self: Arc<Self>) {
        loop {
            let next = {
                let state = self.lock();
                let now = Instant::now();
                let due: Vec<Owed> = state
                    .outbox
                    .owed
                    .values()
                    .filter(|o| state.retry_at.get(&o.issue).is_none_or(|t| *t <= now))
                    .cloned()
                    .collect();
                let later = state.retry_at.values().filter(|t| **t > now).min().copied();
                (due, later)
            };
            let (due, later) = next;
            for owed in due {
                let result = match self.apply(&owed).await {
                    // Another machine holds the issue now: the wish is dropped, never sent.
                    Err(GhError::NotOurs(why)) => Ok(Some(format!("issue #{}: {why}", owed.issue))),
                    other => other,
                };
                let mut state = self.lock();
                // Only settle the wish that was applied: a newer wish for the issue stays owed.
                let current = state.outbox.owed.get(&owed.issue).cloned();
                match result {
                    Ok(note) => {
                        if let Some(note) = note {
                            tracing::warn!(issue = owed.issue, "{note}");
                            state.outbox.last_error = Some((note, rfc3339(SystemTime::now())));
                        }
                        if current
                            .as_ref()
                            .is_some_and(|c| c.target == owed.target && c.slot == owed.slot && c.since == owed.since)
                        {
                            state.outbox.owed.remove(&owed.issue);
                        }
                        state.retry_at.remove(&owed.issue);
                    }
                    Err(e) => {
                        if matches!(e, GhError::NotFound(_)) {
                            // Ids may have changed on the board: read it again next time.
                            state.board = None;
                        }
                        let attempts = current.as_ref().map_or(0, |c| c.attempts) + 1;
                        let backoff = e
                            .wait_hint()
                            .unwrap_or_else(|| BACKOFF_MIN.saturating_mul(1 << (attempts - 1).min(9)))
                            .min(self.backoff_max);
                        let message = format!("issue #{}: {e}", owed.issue);
                        tracing::warn!("board sync: {message}; trying again in {backoff:?}");
                        state.outbox.last_error = Some((message.clone(), rfc3339(SystemTime::now())));
                        if let Some(c) = state.outbox.owed.get_mut(&owed.issue) {
                            c.attempts = attempts;
                            c.last_error = Some(message);
                        }
                        state.retry_at.insert(owed.issue, Instant::now() + backoff);
                    }
                }
                self.persist(&state);
            }
            match later {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at.into(), self.wake.notified()).await;
                }
                None if self.lock().outbox.owed.is_empty() => self.wake.notified().await,
                None => {}
            }
        }
    }

    /// Waits until a mutation may be sent (secondary limits), and counts it.
    async fn mutation_slot(&self, issue: u64) -> Result<(), GhError> {
        self.lock().requests += 1;
        self.gh.before_write(issue).await
    }

    /// Brings the board in line with one wish. `Ok(Some(note))`: done, but something was left alone on purpose.
    async fn apply(&self, owed: &Owed) -> Result<Option<String>, GhError> {
        let board = self.board().await?;
        let bad_config = |e: String| GhError::Other(e);
        let status_field = board.field(&self.project.fields.status.field_name).map_err(bad_config)?.clone();
        let assigned_field =
            board.field(&self.project.fields.assigned_instance.field_name).map_err(bad_config)?.clone();
        let hinted = {
            let mut state = self.lock();
            state.hints.remove(&owed.issue).filter(|(_, at)| at.elapsed() < HINT_FRESH).map(|(v, _)| v)
        };
        let view = match hinted.filter(|_| owed.target == Target::InProgress) {
            Some(view) => view,
            None => match self.read_issue(owed.issue).await {
                // The issue does not exist (a task given with --prompt and a number of its own): nothing to update.
                Err(GhError::NotFound(what)) if what.starts_with("issue #") => {
                    return Ok(Some(format!("{what}: no board update for it")));
                }
                other => other?,
            },
        };
        let item = match &view.item {
            Some(item) => item.clone(),
            None => {
                self.mutation_slot(owed.issue).await?;
                let reply = self
                    .gh
                    .graphql(board::ADD_ITEM, json!({ "project": board.project_id, "content": view.node_id }))
                    .await?;
                let id = reply.data["addProjectV2ItemById"]["item"]["id"].as_str().ok_or_else(|| {
                    GhError::Other(format!("adding issue #{} to the project failed: {:?}", owed.issue, reply.errors))
                })?;
                board::Item { id: id.to_string(), status: None, assigned: None }
            }
        };
        let status_name = self.status_name(owed.target);
        let status = board.value(&status_field, &status_name).map_err(bad_config)?;
        let base =
            json!({ "project": board.project_id, "item": item.id, "statusField": status_field.id, "status": status });
        let ours = item.assigned.as_deref() == Some(owed.slot.as_str());
        let (document, vars, note) = match owed.target {
            Target::InProgress | Target::NeedsInfo => {
                if let Some(other) = item.assigned.as_deref().filter(|a| *a != owed.slot && !owed.takeover) {
                    return Ok(Some(format!(
                        "issue #{}: Assigned Instance says {other:?}, set by someone else: not overwritten",
                        owed.issue
                    )));
                }
                let assigned = board.value(&assigned_field, &owed.slot).map_err(bad_config)?;
                let mut vars = base;
                vars["assignedField"] = json!(assigned_field.id);
                vars["assigned"] = assigned;
                (board::SET_FIELDS, vars, None)
            }
            _ if ours => {
                let mut vars = base;
                vars["assignedField"] = json!(assigned_field.id);
                (board::FINISH, vars, None)
            }
            _ if item.assigned.is_none() => (board::SET_STATUS, base, None),
            _ => {
                return Ok(Some(format!(
                    "issue #{}: Assigned Instance now says {:?}, not {}: neither it nor Status was changed",
                    owed.issue,
                    item.assigned.as_deref().unwrap_or_default(),
                    owed.slot
                )));
            }
        };
        self.mutation_slot(owed.issue).await?;
        let reply = self.gh.graphql(document, vars).await?;
        if let Some(e) = reply.errors.first() {
            // A batched mutation can partly succeed; field updates are idempotent, so trying the whole again is safe.
            return Err(GhError::Other(format!("{} {}", e.kind, e.message).trim().to_string()));
        }
        Ok(note)
    }
}

#[cfg(test)]
mod format_tests {
    #[test]
    fn an_outbox_of_the_first_format_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("github-sync.json");
        let fixture =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats/v1/github-sync.json");
        std::fs::copy(fixture, &path).unwrap();
        let outbox = super::load_outbox(&path);
        assert_eq!(outbox.version, 1);
        assert_eq!(outbox.owed[&41].slot, "claude-1");
        std::fs::write(&path, r#"{"version":9,"owed":{},"last_error":null}"#).unwrap();
        assert!(super::load_outbox(&path).owed.is_empty());
        assert!(dir.path().join("github-sync.json.v9").exists(), "a newer outbox is kept aside, not overwritten");
        std::fs::write(&path, "{\"version\": 1, \"owed\": {\"41\": tor").unwrap();
        assert!(super::load_outbox(&path).owed.is_empty());
        assert!(dir.path().join("github-sync.json.unreadable").exists(), "a torn outbox is kept for a person");
    }
}
