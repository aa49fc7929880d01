//! `assign`: reserves a slot for an issue, prepares its worktree and prompt, and starts the task's first run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use super::internal;
use crate::daemon::Shared;
use crate::daemon::fleet::Claiming;
use crate::daemon::issue_sync::{board_wants, intake};
use crate::daemon::runs::{Refused, RunKind, start_run};
use crate::daemon::slots::{SlotRequest, Task};
use crate::github::sync::Target;
use crate::ledger::{RunFiles, SlotLock};
use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply, Reply};
use crate::task::Event;
use crate::workspace;

/// The largest prompt a task takes (what `autodevctl` sends at most, and what a resume reads back).
const MAX_PROMPT: usize = 1 << 20;

/// What every task's prompt ends with: how the agent says it is stuck (the seed tool's markers work too).
const SIGNALS_HELP: &str = "\n---\nIf you need a person's answer to go on, run `autodevctl signal needs-info \"<your \
question>\"` (or write a line `AUTONOMOUS_SIGNAL:NEEDS_INFO:<your question>`) and end your turn: the answer comes \
back in this conversation. If you cannot go on at all, run `autodevctl signal blocked \"<why>\"` (or write \
`AUTONOMOUS_SIGNAL:BLOCKED:<why>`). If you opened a pull request yourself, write `AUTONOMOUS_SIGNAL:PR:<number>`.\n";

/// How an assignment is made, beyond what it asks for.
#[derive(Debug, Clone, Default)]
pub(in crate::daemon) struct How {
    /// Take over an issue whose Assigned Instance names someone else (or a stale machine's claim), and ignore
    /// label rules.
    pub force: bool,
    /// With no free slot, wait in the local queue instead of being refused.
    pub queue: bool,
    /// How the fleet's claim is taken; `None`: as a new task (`force` as given).
    pub claiming: Option<Claiming>,
}

/// Handles `assign`: reserves a slot and starts the first run of a new task in it.
pub(in crate::daemon) async fn assign(
    shared: &Arc<Shared>,
    issue: u64,
    llm: Option<&str>,
    slot: Option<&str>,
    prompt: Option<&str>,
    how: How,
) -> Result<Reply, ErrorReply> {
    let How { force, queue, claiming } = how;
    if issue == 0 {
        return Err(refuse(ErrorKind::BadRequest, "issue numbers start at 1".into(), None));
    }
    if prompt.is_some_and(|p| p.len() > MAX_PROMPT) {
        return Err(refuse(
            ErrorKind::BadRequest,
            format!("the prompt is {} KiB; the limit is {} KiB", prompt.map_or(0, str::len) >> 10, MAX_PROMPT >> 10),
            Some("put the details in a file in the repository and point to it".into()),
        ));
    }
    if prompt.is_some_and(|p| p.trim().is_empty()) {
        return Err(refuse(ErrorKind::BadRequest, "the prompt is empty".into(), None));
    }
    if queue && shared.lock_table().lacks_free_slot(&SlotRequest { issue, llm, slot }) {
        // Every slot it could have is busy: it waits in the local queue (no slot held, nothing asked of GitHub yet;
        // its intake happens when it is taken).
        let place =
            shared.queue.push(issue, llm, slot, prompt, force).map_err(|e| refuse(ErrorKind::Failed, e, None))?;
        return Ok(Reply::Queued { issue, place });
    }
    // GitHub first: whatever it refuses is refused before a slot is taken.
    let issue_view = intake(shared, issue, prompt.is_none(), force).await?;
    let run_id = ulid::Ulid::new().to_string();
    let (slot_name, previous) = {
        let mut table = shared.lock_table();
        let index = table.choose(&SlotRequest { issue, llm, slot })?;
        let provider = table.providers[table.slots[index].provider].name.clone();
        let slot = &mut table.slots[index];
        let files = RunFiles::at(shared.paths.run_dir(&run_id));
        let mut record = SlotLock::new(&slot.name, &provider, issue, shared.workspace.clone(), files.prompt());
        record.from_issue = prompt.is_none();
        record.next_run(run_id.clone(), &files.dir, &shared.boot_id, shared.daemon_pid);
        // Queued → starting: nothing to carry out yet (the launch writes the lockfile, the board hears on start).
        record.on(Event::Continue { counted: false }, &shared.policy, SystemTime::now()).map_err(internal)?;
        // The slot's last finished task is kept aside, to come back if the run cannot be set up.
        let previous = slot.task.replace(Task::starting(record));
        (slot.name.clone(), previous)
    };
    let title = match (&issue_view, prompt) {
        (Some(view), _) => view.title.clone(),
        // Without an issue title, the prompt's first line names the branch.
        (None, Some(p)) => p.lines().find(|l| !l.trim().is_empty()).unwrap_or_default().to_string(),
        (None, None) => String::new(),
    };
    // The fleet's claim before anything is made for the task: only one machine ever runs an issue.
    let claiming = claiming.unwrap_or(Claiming::New { force, from_board: false });
    if let Err(e) = crate::daemon::fleet::claim(shared, issue, &slot_name, &claiming).await {
        if let Some(slot) = shared.lock_table().get_mut(&slot_name) {
            slot.task = previous;
        }
        return Err(e);
    }
    let worktree = match prepare_worktree(shared, &slot_name, issue, &title).await {
        Ok(w) => w,
        Err(e) => {
            if let Some(slot) = shared.lock_table().get_mut(&slot_name) {
                slot.task = previous;
            }
            return Err(refuse(ErrorKind::Failed, format!("cannot prepare a git worktree for {slot_name}: {e}"), None));
        }
    };
    if let Some(task) = shared.lock_table().get_mut(&slot_name).and_then(|s| s.task.as_mut()) {
        task.record.title = Some(title.chars().take(120).collect());
    }
    let branch = worktree.as_ref().map(|w| w.branch.as_str());
    let mut text = match (prompt, &issue_view) {
        (Some(p), _) => p.to_string(),
        (None, Some(view)) => {
            let template = shared.config.raw.github.prompt_template.as_deref().unwrap_or(crate::github::DEFAULT_PROMPT);
            crate::github::render_prompt(template, view, &slot_name, branch)
        }
        (None, None) => unreachable!("intake refuses an assignment with neither a prompt nor an issue"),
    };
    if let Some(w) = &worktree {
        let from = w.base.as_deref().map(|b| format!(" (a new branch from {b})")).unwrap_or_default();
        text.push_str(&format!(
            "\n\n---\nYou work in the git worktree {} on branch {}{from}. Commit your work to this branch; do not \
             switch branches or touch other worktrees.\n",
            w.path.display(),
            w.branch
        ));
    }
    if prompt.is_none() {
        // The prompt autodev writes says how to signal; a prompt given by hand is the person's to write.
        text.push_str(SIGNALS_HELP);
    }
    let assigned = match start_run(shared, &slot_name, RunKind::New, &text).await {
        Err(Refused::NotStarted(e)) => {
            // Nothing ran and nothing was recorded: the slot is as it was.
            if let Some(slot) = shared.lock_table().get_mut(&slot_name) {
                slot.task = previous;
            }
            return Err(e);
        }
        Err(Refused::Ended(e)) => return Err(e),
        Ok(assigned) => assigned,
    };
    if let Some(fleet) = &shared.fleet {
        fleet.started(issue);
    }
    board_wants(shared, issue, &slot_name, Target::InProgress, force);
    // Taken by hand (or by the queue itself): it waits no more.
    shared.queue.remove(issue);
    Ok(Reply::Assigned(assigned))
}

/// Puts a new task in its own git worktree when the workspace is a git repository (and `worktree.enabled`), and
/// records it as the task's cwd.
async fn prepare_worktree(
    shared: &Arc<Shared>,
    slot: &str,
    issue: u64,
    title: &str,
) -> Result<Option<workspace::Prepared>, String> {
    let config = shared.config.raw.worktree.clone();
    if !config.enabled {
        return Ok(None);
    }
    let workspace = shared.workspace.clone();
    let (slot_name, title) = (slot.to_string(), title.to_string());
    // With the fleet, another machine may have pushed the issue's branch (a takeover continues it).
    let from_origin = shared.fleet.is_some();
    // Worktrees other tasks work in (a task moved to a fallback slot keeps its own) are never touched.
    let in_use: Vec<PathBuf> = shared
        .lock_table()
        .slots
        .iter()
        .filter(|s| s.name != slot && s.is_held())
        .filter_map(|s| s.task.as_ref()?.record.worktree.clone())
        .collect();
    let prepared = tokio::task::spawn_blocking(move || {
        let Some(root) = workspace::repo_root(&workspace) else { return Ok(None) };
        workspace::prepare(&root, &config, &slot_name, issue, &title, &in_use, from_origin).map(Some)
    })
    .await
    .map_err(|e| format!("internal error: {e}"))??;
    let Some(prepared) = prepared else { return Ok(None) };
    for note in &prepared.notes {
        tracing::warn!(slot, "{note}");
    }
    let mut table = shared.lock_table();
    if let Some(task) = table.get_mut(slot).and_then(|s| s.task.as_mut()) {
        task.record.cwd = prepared.path.clone();
        task.record.worktree = Some(prepared.path.clone());
        task.record.branch = Some(prepared.branch.clone());
        task.record.base = Some(prepared.compare_to.clone());
    }
    Ok(Some(prepared))
}
