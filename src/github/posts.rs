//! What autodev posts on GitHub beside the board: a completed task's pull request (opened, or the open one of its
//! branch updated) and the notes of agents' signals (a question, why it is blocked). What is owed is kept in
//! `github-posts.json` (atomic writes) like the board's outbox: an outage delays a post but never loses it, and
//! because each post is looked for before it is made (the branch's open pull request, the note's marker among the
//! issue's comments), a restart or an answer lost on the way never makes a second.
//!
//! autodev writes only inside its marked section of a pull request's body; what people write around it stays.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::client::{GhError, GitHub};
use super::sync::{Reconciler, Target};
use crate::timefmt::{rfc3339, short_duration};

/// The section of a pull request's body autodev owns.
pub const SECTION_START: &str = "<!-- autodev:start (this section is rewritten by autodev; write outside it) -->";
pub const SECTION_END: &str = "<!-- autodev:end -->";

/// Version of `github-posts.json`.
const OUTBOX_VERSION: u32 = 1;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Pull requests remembered for `status` (the newest).
const REMEMBERED: usize = 200;
/// The agent's last words in a body: enough to say what was done, not a transcript.
const SAID_CHARS: usize = 2000;

/// A pull request owed for a task's branch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Wish {
    pub task_id: String,
    pub issue: u64,
    /// Taken from a GitHub issue: the body says `Closes #<issue>` and the issue's board item moves to review.
    pub from_issue: bool,
    pub slot: String,
    pub branch: String,
    pub title: String,
    /// The pull request the agent said it opened.
    pub number: Option<u64>,
    /// What the agent said last.
    pub said: String,
    pub runs: usize,
    pub duration_secs: u64,
    pub cost_usd: Option<f64>,
    pub since: String,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A comment owed on an issue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Note {
    /// Unique per note: its marker in the comment, by which a second post is avoided.
    pub key: String,
    pub issue: u64,
    pub body: String,
    pub since: String,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What marks a comment autodev wrote, so answers are told from autodev's own words.
pub const NOTE_MARKER: &str = "<!-- autodev:note ";

/// A task's pull request, once it exists (or why it never will).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Opened {
    pub number: Option<u64>,
    pub url: Option<String>,
    /// Said to the user: a draft GitHub refused, or why no pull request could be opened.
    pub note: Option<String>,
    /// This attempt opened it (rather than updating one that was open).
    #[serde(default)]
    pub created: bool,
}

/// Told when a wish is settled: the pull request as it is, and the Status the board is asked for.
pub type Settled = Box<dyn Fn(&Wish, &Opened, Target) + Send + Sync>;

#[derive(Debug, Serialize, Deserialize)]
struct Outbox {
    version: u32,
    /// Keyed by branch: a newer wish for the branch replaces an older one.
    owed: BTreeMap<String, Wish>,
    /// Task id → its pull request, oldest first (bounded).
    done: Vec<(String, Opened)>,
    /// Comments owed, by key.
    #[serde(default)]
    notes: BTreeMap<String, Note>,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox { version: OUTBOX_VERSION, owed: BTreeMap::new(), done: Vec::new(), notes: BTreeMap::new() }
    }
}

fn load_outbox(path: &std::path::Path) -> Outbox {
    crate::ledger::load_versioned(path, OUTBOX_VERSION, |o: &Outbox| o.version)
}

struct State {
    outbox: Outbox,
    retry_at: HashMap<String, Instant>,
    default_branch: Option<String>,
}

pub struct Posts {
    gh: Arc<GitHub>,
    owner: String,
    repo: String,
    draft: bool,
    path: PathBuf,
    backoff_max: Duration,
    /// The board, when it is kept: an issue whose pull request exists moves to review.
    board: Option<Arc<Reconciler>>,
    /// The daemon's hook for settled wishes (notifications, what the autopilot remembers).
    settled: std::sync::OnceLock<Settled>,
    state: Mutex<State>,
    wake: Notify,
}

impl Posts {
    pub fn new(
        gh: Arc<GitHub>,
        (owner, repo): (String, String),
        draft: bool,
        path: PathBuf,
        backoff_max: Duration,
        board: Option<Arc<Reconciler>>,
    ) -> Arc<Posts> {
        let outbox = load_outbox(&path);
        Arc::new(Posts {
            gh,
            owner,
            repo,
            draft,
            path,
            backoff_max,
            board,
            settled: std::sync::OnceLock::new(),
            state: Mutex::new(State { outbox, retry_at: HashMap::new(), default_branch: None }),
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

    /// Owes a pull request for `wish.branch` (replacing an older wish for it) and wakes the worker.
    pub fn want(&self, wish: Wish) {
        let mut state = self.lock();
        state.retry_at.remove(&wish.branch);
        state.outbox.owed.insert(wish.branch.clone(), wish);
        self.persist(&state);
        drop(state);
        self.wake.notify_one();
    }

    /// Sets the hook told of every settled wish (once).
    pub fn on_settled(&self, hook: Settled) {
        let _ = self.settled.set(hook);
    }

    /// Whether a pull request (and so a board write) is still owed for `issue`.
    pub fn owes_issue(&self, issue: u64) -> bool {
        let state = self.lock();
        state.outbox.owed.values().any(|w| w.issue == issue) || state.outbox.notes.values().any(|n| n.issue == issue)
    }

    /// Owes a comment and wakes the worker.
    pub fn note(&self, note: Note) {
        let mut state = self.lock();
        state.retry_at.remove(&note_slot(&note.key));
        state.outbox.notes.insert(note.key.clone(), note);
        self.persist(&state);
        drop(state);
        self.wake.notify_one();
    }

    /// The task's pull request: opened, or owed (with the last error), or given up.
    pub fn of_task(&self, task_id: &str) -> Option<Opened> {
        let state = self.lock();
        if let Some(wish) = state.outbox.owed.values().find(|w| w.task_id == task_id) {
            let note = match &wish.last_error {
                Some(e) => format!("pull request owed ({} attempts so far; last: {e})", wish.attempts),
                None => "pull request owed".to_string(),
            };
            return Some(Opened { number: wish.number, url: None, note: Some(note), created: false });
        }
        state.outbox.done.iter().rev().find(|(id, _)| id == task_id).map(|(_, o)| o.clone())
    }

    /// The pull requests still owed, for `project status`.
    pub fn owed(&self) -> Vec<Wish> {
        self.lock().outbox.owed.values().cloned().collect()
    }

    pub async fn run(self: Arc<Self>) {
        loop {
            let (due, notes, later) = {
                let state = self.lock();
                let now = Instant::now();
                let ready = |key: &String| state.retry_at.get(key).is_none_or(|t| *t <= now);
                let due: Vec<Wish> = state.outbox.owed.values().filter(|w| ready(&w.branch)).cloned().collect();
                let notes: Vec<Note> =
                    state.outbox.notes.values().filter(|n| ready(&note_slot(&n.key))).cloned().collect();
                (due, notes, state.retry_at.values().filter(|t| **t > now).min().copied())
            };
            for note in notes {
                let result = self.post_note(&note).await;
                self.settle_note(&note, result);
            }
            for wish in due {
                let result = self.apply(&wish).await;
                self.settle(&wish, result);
            }
            let idle = {
                let state = self.lock();
                state.outbox.owed.is_empty() && state.outbox.notes.is_empty()
            };
            match later {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at.into(), self.wake.notified()).await;
                }
                None if idle => self.wake.notified().await,
                None => {}
            }
        }
    }

    /// Records how an attempt went: done (or refused for good) takes the wish out; trouble waits and tries again.
    fn settle(&self, wish: &Wish, result: Result<Opened, GhError>) {
        let mut state = self.lock();
        let current = state.outbox.owed.get(&wish.branch).cloned();
        let same = current.as_ref().is_some_and(|c| c.since == wish.since);
        let mut target = Target::Review;
        let finished = match result {
            Ok(opened) => {
                tracing::info!(
                    issue = wish.issue,
                    branch = %wish.branch,
                    "pull request #{} is up to date{}",
                    opened.number.unwrap_or_default(),
                    opened.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
                );
                if wish.from_issue
                    && let Some(board) = &self.board
                {
                    board.want(wish.issue, &wish.slot, Target::Review, false);
                }
                Some(opened)
            }
            // Another machine holds the issue now: no pull request from here, and no board write.
            Err(GhError::NotOurs(why)) => {
                tracing::warn!(issue = wish.issue, branch = %wish.branch, "no pull request: {why}");
                target = Target::Failed;
                Some(Opened { number: None, url: None, note: Some(format!("not opened: {why}")), created: false })
            }
            // The request itself is wrong (no commits between the branches, a base that does not exist): asking
            // again would get the same answer.
            Err(GhError::Invalid(why)) => {
                let note = format!("no pull request: GitHub refused it (422): {why}");
                tracing::warn!(issue = wish.issue, branch = %wish.branch, "{note}");
                target = Target::Failed;
                if wish.from_issue
                    && let Some(board) = &self.board
                {
                    board.want(wish.issue, &wish.slot, Target::Failed, false);
                }
                Some(Opened { number: None, url: None, note: Some(note), created: false })
            }
            Err(e) => {
                let attempts = current.as_ref().map_or(0, |c| c.attempts) + 1;
                let backoff = e
                    .wait_hint()
                    .unwrap_or_else(|| BACKOFF_MIN.saturating_mul(1 << (attempts - 1).min(9)))
                    .min(self.backoff_max);
                tracing::warn!(branch = %wish.branch, "pull request: {e}; trying again in {backoff:?}");
                if let Some(c) = state.outbox.owed.get_mut(&wish.branch) {
                    c.attempts = attempts;
                    c.last_error = Some(e.to_string());
                }
                state.retry_at.insert(wish.branch.clone(), Instant::now() + backoff);
                None
            }
        };
        if let Some(opened) = &finished {
            state.outbox.done.retain(|(id, _)| *id != wish.task_id);
            state.outbox.done.push((wish.task_id.clone(), opened.clone()));
            let excess = state.outbox.done.len().saturating_sub(REMEMBERED);
            state.outbox.done.drain(..excess);
            // A newer wish for the branch (the task ran again meanwhile) stays owed.
            if same {
                state.outbox.owed.remove(&wish.branch);
            }
            state.retry_at.remove(&wish.branch);
        }
        self.persist(&state);
        drop(state);
        if let (Some(opened), Some(hook)) = (&finished, self.settled.get()) {
            hook(wish, opened, target);
        }
    }

    /// Posts a note, unless an earlier attempt whose answer was lost already did.
    async fn post_note(&self, note: &Note) -> Result<(), GhError> {
        let marker = format!("{NOTE_MARKER}{} -->", note.key);
        let path = format!("/repos/{}/{}/issues/{}/comments", self.owner, self.repo, note.issue);
        if note.attempts == 0 {
            // Counted before the POST: if autodevd dies before its answer, the next try looks for it first.
            let mut state = self.lock();
            if let Some(n) = state.outbox.notes.get_mut(&note.key) {
                n.attempts = 1;
            }
            self.persist(&state);
        } else {
            let since = format!("{path}?per_page=100&since={}", note.since);
            let found = self.gh.rest_get(&since).await?;
            let posted =
                found.as_array().into_iter().flatten().any(|c| c["body"].as_str().is_some_and(|b| b.contains(&marker)));
            if posted {
                return Ok(());
            }
        }
        self.mutation_slot(note.issue).await?;
        self.gh.rest_send("POST", &path, &json!({ "body": format!("{}\n\n{marker}", note.body) })).await?;
        Ok(())
    }

    fn settle_note(&self, note: &Note, result: Result<(), GhError>) {
        let mut state = self.lock();
        let slot = note_slot(&note.key);
        match result {
            Ok(()) => {
                state.outbox.notes.remove(&note.key);
                state.retry_at.remove(&slot);
            }
            // The issue is gone, the request is wrong, or the issue is another machine's now: never posted.
            Err(e @ (GhError::NotFound(_) | GhError::Invalid(_) | GhError::NotOurs(_))) => {
                tracing::warn!(issue = note.issue, "comment not posted: {e}");
                state.outbox.notes.remove(&note.key);
                state.retry_at.remove(&slot);
            }
            Err(e) => {
                let attempts = note.attempts + 1;
                let backoff = e
                    .wait_hint()
                    .unwrap_or_else(|| BACKOFF_MIN.saturating_mul(1 << (attempts - 1).min(9)))
                    .min(self.backoff_max);
                tracing::warn!(issue = note.issue, "comment: {e}; trying again in {backoff:?}");
                if let Some(n) = state.outbox.notes.get_mut(&note.key) {
                    // The comment may have been made (a timeout): the next try looks first.
                    n.attempts = attempts;
                    n.last_error = Some(e.to_string());
                }
                state.retry_at.insert(slot, Instant::now() + backoff);
            }
        }
        self.persist(&state);
    }

    /// Waits until a mutation may be sent (secondary limits, shared with every writer of the token).
    async fn mutation_slot(&self, issue: u64) -> Result<(), GhError> {
        self.gh.before_write(issue).await
    }

    async fn default_branch(&self) -> Result<String, GhError> {
        if let Some(known) = self.lock().default_branch.clone() {
            return Ok(known);
        }
        let repo = self.gh.rest_get(&format!("/repos/{}/{}", self.owner, self.repo)).await?;
        let name = repo["default_branch"]
            .as_str()
            .ok_or_else(|| GhError::Other(format!("{}/{} has no default branch", self.owner, self.repo)))?
            .to_string();
        self.lock().default_branch = Some(name.clone());
        Ok(name)
    }

    /// The open pull request of the wish: the one the agent named (if it is open and of this branch), else the
    /// open one whose head is the branch.
    async fn existing(&self, wish: &Wish) -> Result<Option<Value>, GhError> {
        let base = format!("/repos/{}/{}/pulls", self.owner, self.repo);
        if let Some(number) = wish.number {
            match self.gh.rest_get(&format!("{base}/{number}")).await {
                Ok(pr) if pr["state"] == "open" && pr["head"]["ref"] == wish.branch.as_str() => return Ok(Some(pr)),
                Ok(_) | Err(GhError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let query = format!("{base}?state=open&per_page=1&head={}:{}", self.owner, percent_encode(&wish.branch));
        let found = self.gh.rest_get(&query).await?;
        Ok(found.as_array().and_then(|list| list.first()).cloned())
    }

    async fn apply(&self, wish: &Wish) -> Result<Opened, GhError> {
        let section = render_section(wish);
        let pulls = format!("/repos/{}/{}/pulls", self.owner, self.repo);
        if let Some(pr) = self.existing(wish).await? {
            return self.update(wish.issue, &pr, &section).await;
        }
        let base = self.default_branch().await?;
        let mut request = json!({ "title": wish.title, "head": wish.branch, "base": base, "body": section,
                                  "draft": self.draft });
        self.mutation_slot(wish.issue).await?;
        let mut note = None;
        let created = match self.gh.rest_send("POST", &pulls, &request).await {
            Err(GhError::Invalid(why)) => {
                // It may exist after all (an answer lost on the way, a list that lagged): then it is updated.
                if let Some(pr) = self.existing(wish).await? {
                    return self.update(wish.issue, &pr, &section).await;
                }
                if !self.draft {
                    return Err(GhError::Invalid(why));
                }
                // Drafts are not available for every repository (private ones on some plans): a ready one.
                request["draft"] = json!(false);
                self.mutation_slot(wish.issue).await?;
                let created = self.gh.rest_send("POST", &pulls, &request).await?;
                note = Some(format!("GitHub refused a draft ({why}); opened a ready pull request"));
                created
            }
            other => other?,
        };
        let number =
            created["number"].as_u64().ok_or_else(|| GhError::Other("GitHub did not say the number".into()))?;
        Ok(Opened { created: true, ..opened(&created, number, note) })
    }

    /// Replaces autodev's section of an open pull request's body.
    async fn update(&self, issue: u64, pr: &Value, section: &str) -> Result<Opened, GhError> {
        let number = pr["number"].as_u64().ok_or_else(|| GhError::Other("a pull request without a number".into()))?;
        let body = with_section(pr["body"].as_str().unwrap_or_default(), section);
        let path = format!("/repos/{}/{}/pulls/{number}", self.owner, self.repo);
        self.mutation_slot(issue).await?;
        let updated = self.gh.rest_send("PATCH", &path, &json!({ "body": body })).await?;
        Ok(opened(&updated, number, None))
    }
}

/// The retry key of a note (apart from branch names, which never contain a space).
fn note_slot(key: &str) -> String {
    format!("note {key}")
}

/// Whether a comment's body is one autodev wrote (a note, or a task's status comment).
pub fn is_autodevs(body: &str) -> bool {
    // Notes carry `<!-- autodev:note …`, status comments `<!-- autodev-task:…`.
    body.contains("<!-- autodev")
}

fn opened(pr: &Value, number: u64, note: Option<String>) -> Opened {
    Opened { number: Some(number), url: pr["html_url"].as_str().map(str::to_string), note, created: false }
}

/// A branch name in a query string: git allows characters a URL does not take as they are.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// autodev's section of the body: what closes, what the agent said last, and what the work cost.
pub fn render_section(wish: &Wish) -> String {
    let redact = crate::redact::current();
    let mut out = format!("{SECTION_START}\n");
    if wish.from_issue {
        out.push_str(&format!("Closes #{}\n\n", wish.issue));
    }
    let said: String = wish.said.trim().chars().take(SAID_CHARS).collect();
    if !said.is_empty() {
        out.push_str("**What the agent said last**\n\n");
        for line in redact.clean(&said).lines() {
            out.push_str(&format!("> {line}\n"));
        }
        out.push('\n');
    }
    let cost = wish.cost_usd.map(|c| format!(" · cost ${c:.2}")).unwrap_or_default();
    out.push_str(&format!(
        "{} run(s) · {}{cost} · slot {} · updated {}\n",
        wish.runs,
        short_duration(wish.duration_secs),
        wish.slot,
        rfc3339(SystemTime::now())
    ));
    out.push_str(SECTION_END);
    out
}

/// `body` with autodev's section replaced by `section` (or added at the end): a person's text stays as it is.
pub fn with_section(body: &str, section: &str) -> String {
    if let Some(start) = body.find(SECTION_START)
        && let Some(len) = body[start..].find(SECTION_END)
    {
        let end = start + len + SECTION_END.len();
        return format!("{}{section}{}", &body[..start], &body[end..]);
    }
    if body.trim().is_empty() { section.to_string() } else { format!("{}\n\n{section}", body.trim_end()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_and_a_persons_text_stays() {
        let first = format!("{SECTION_START}\nold\n{SECTION_END}");
        let table = [
            ("", first.clone()),
            ("Notes by a person.", format!("Notes by a person.\n\n{first}")),
            (&*format!("Intro\n{SECTION_START}\nolder\n{SECTION_END}\nOutro"), format!("Intro\n{first}\nOutro")),
            // A start marker without its end: the person broke the section; a new one is added, nothing is lost.
            (&*format!("Intro {SECTION_START} cut"), format!("Intro {SECTION_START} cut\n\n{first}")),
        ];
        for (body, expected) in table {
            assert_eq!(with_section(body, &first), expected, "{body:?}");
        }
    }

    #[test]
    fn branch_names_are_encoded_for_the_query() {
        assert_eq!(percent_encode("autodev/12-fix the #bug&x"), "autodev/12-fix%20the%20%23bug%26x");
    }
}
