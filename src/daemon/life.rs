//! Carries out what the task state machine (`crate::task`) decides. Every phase change goes through [`drive`]: it
//! applies the event to the slot's task under the table lock, then performs the effects in the order the machine
//! gave them. The runtime is single-threaded and `drive` never awaits, so two events for one task never interleave.
//!
//! Durability rules kept here: a run's end is recorded (exit record, history line) before its lockfile goes; a
//! record that cannot be written because the disk is full is kept in memory with the slot held, `status` says which
//! filesystem is full, and [`flush_pending`] writes it once there is room.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;

use super::Shared;
use super::issue_sync::{board_wants, comment};
use super::slots::Task;
use crate::github::sync::Target;
use crate::ledger::{self, ExitRecord, RECORD_VERSION, RunFiles};
use crate::protocol::SlotState;
use crate::supervisor::{self, ExitInfo};
use crate::task::{AgentSignal, BoardWish, Effect, Event, Illegal, Phase};
use crate::timefmt::rfc3339;
use crate::workspace;

/// A task whose wait is over and whose next run is to start (`Effect::StartNext`), for the daemon's loop.
pub(super) struct StartNext {
    pub slot: String,
    pub fallback: bool,
}

/// How often records that wait for disk space are tried again.
const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// Applies `event` to the task of `slot` and carries out what it implies. The caller has checked the request's own
/// rules (and said so to the user); an event the phase does not allow is an error that changes nothing.
pub(super) fn drive(shared: &Arc<Shared>, slot: &str, event: Event) -> Result<(), Illegal> {
    let now = SystemTime::now();
    let (effects, issue, run_id, told) = {
        let mut table = shared.lock_table();
        let task = table.get_mut(slot).and_then(|s| s.task.as_mut()).ok_or(Illegal { state: "ready", event: "any" })?;
        let before = task.record.phase.clone();
        let asked = matches!(&event, Event::Signal(_));
        let effects = task.record.on(event.clone(), &shared.policy, now)?;
        let kind = super::notify::kind_of(&before, &task.record.phase, &event)
            .filter(|k| *k != "needs_info" || (asked && effects.iter().any(|e| matches!(e, Effect::PostSignal(_)))));
        // The task moved to another slot (a fallback LLM): its old slot letting go of it is no end.
        let moved = kind.is_some() && {
            let issue = task.issue();
            table.holder_of(issue).is_some_and(|s| s.name != slot)
        };
        let task = table.get_mut(slot).and_then(|s| s.task.as_mut()).expect("found above");
        let told = kind.filter(|_| !moved).map(|kind| {
            let r = &task.record;
            let mut e = super::notify::Event::new(kind);
            e.slot = Some(slot.to_string());
            e.issue = Some(r.issue);
            e.title = r.title.clone();
            e.state = Some(r.state().as_str().to_string());
            e.end_cause = r.phase.end_cause().map(|c| c.as_str().to_string());
            e.reason = match &event {
                Event::Signal(AgentSignal::NeedsInfo { question }) => Some(question.clone()),
                _ => r.phase.reason().map(str::to_string),
            };
            e.run_id = Some(r.run_id.clone());
            // One per transition: a restart that finds the same facts (an end, a run found dead) never tells them
            // again; what can happen twice in one run (stale, a question) is keyed by when it happened.
            let when = match kind {
                "stale" | "needs_info" => format!("{:?}", now),
                _ => String::new(),
            };
            let key = format!("{}:{kind}:{when}", r.run_id);
            (key, e)
        });
        if !task.is_running() && task.ended_at.is_none() {
            task.ended_at = Some(now);
        }
        if !task.is_running() {
            task.signal.send_modify(|s| s.ended = true);
        }
        (effects, task.issue(), task.record.run_id.clone(), told)
    };
    if let Some((key, event)) = told {
        shared.notifier.emit(&key, event);
    }
    shared.changed();
    let mut recorded = true;
    for effect in effects {
        match effect {
            Effect::RecordRun => recorded = record_run(shared, slot),
            Effect::WriteLock => write_lock(shared, slot),
            // Only once the end is on disk: a lockfile never goes before its task's outcome is recorded.
            Effect::FreeSlot if recorded => free_slot(shared, slot),
            Effect::FreeSlot => {}
            Effect::Board(wish) => {
                let target = match wish {
                    BoardWish::InProgress => Target::InProgress,
                    BoardWish::Completed => Target::Completed,
                    BoardWish::Failed => Target::Failed,
                    BoardWish::NeedsInfo => Target::NeedsInfo,
                };
                board_wants(shared, issue, slot, target, false);
                note_end(shared, issue, Some(target));
            }
            Effect::Comment => comment(shared, slot, true),
            Effect::WakeAt(at) => wake_at(shared, slot, &run_id, at),
            Effect::SignalStop => signal_stop(shared, slot, &run_id),
            // Through the daemon's loop: starting a run needs the modules that send this one events.
            Effect::StartNext { fallback } => {
                let _ = shared.start_next.send(StartNext { slot: slot.to_string(), fallback });
            }
            Effect::PullRequest => {
                note_end(shared, issue, Some(Target::Review));
                pull_request(shared, slot);
            }
            Effect::PostSignal(signal) => post_signal(shared, slot, signal),
            Effect::CleanupWorktree => {
                let (shared, slot) = (shared.clone(), slot.to_string());
                tokio::spawn(async move { cleanup_worktree(&shared, &slot).await });
            }
        }
    }
    Ok(())
}

/// Remembers that the task of `issue` ended here (for the autopilot, which must not feed it back), with the
/// Status its end writes.
fn note_end(shared: &Shared, issue: u64, target: Option<Target>) {
    let Some(target) = target.filter(|t| matches!(t, Target::Completed | Target::Failed | Target::Review)) else {
        return;
    };
    let Ok(github) = &shared.github else { return };
    shared.queue.note_ended(issue, github.reconciler.status_name(target));
}

/// Owes the completed task's pull request to the outbox (which moves the board to review once it exists). Without
/// GitHub the board is told the task is done, as it would be without pull requests.
fn pull_request(shared: &Arc<Shared>, slot: &str) {
    let Some(posts) = shared.github.as_ref().ok().filter(|g| g.pull_requests).map(|g| g.posts.clone()) else {
        let issue = shared.lock_table().get(slot).and_then(|s| s.task.as_ref()).map(Task::issue);
        if let Some(issue) = issue {
            board_wants(shared, issue, slot, Target::Completed, false);
        }
        return;
    };
    let wish = {
        let table = shared.lock_table();
        let Some(task) = table.get(slot).and_then(|s| s.task.as_ref()) else { return };
        let r = &task.record;
        let Some(branch) = r.branch.clone() else { return };
        let started = crate::timefmt::parse_rfc3339(&r.started_at).unwrap_or(task.run_started_at);
        let costs: Vec<f64> = r
            .runs
            .iter()
            .filter_map(|run| ledger::read_exit_record(&RunFiles::at(shared.paths.run_dir(run)).exit_record()))
            .filter_map(|exit| exit.cost_usd)
            .collect();
        crate::github::posts::Wish {
            task_id: r.task_id.clone(),
            issue: r.issue,
            from_issue: r.from_issue,
            slot: shared.instance(slot),
            branch,
            title: r.title.clone().filter(|t| !t.trim().is_empty()).unwrap_or_else(|| format!("autodev: #{}", r.issue)),
            number: r.pr,
            said: task.said.clone().unwrap_or_else(|| r.phase.reason().unwrap_or_default().to_string()),
            runs: r.runs.len(),
            duration_secs: SystemTime::now().duration_since(started).unwrap_or_default().as_secs(),
            cost_usd: (!costs.is_empty()).then(|| costs.iter().sum()),
            since: rfc3339(SystemTime::now()),
            attempts: 0,
            last_error: None,
        }
    };
    posts.want(wish);
}

/// Posts what the agent said (its question, why it is blocked) on the task's issue, through the outbox. Tasks given
/// with `--prompt` have no issue to post on: the status shows it.
fn post_signal(shared: &Arc<Shared>, slot: &str, signal: AgentSignal) {
    let Ok(github) = &shared.github else { return };
    let note = {
        let table = shared.lock_table();
        let Some(task) = table.get(slot).and_then(|s| s.task.as_ref()).filter(|t| t.record.from_issue) else { return };
        let r = &task.record;
        let body = match &signal {
            AgentSignal::NeedsInfo { question } => format!(
                "**{slot} needs more information** to go on with this issue:\n\n{}\n\nAnswer in a comment here: the \
                 agent continues the same conversation with your answer.",
                quote(question)
            ),
            AgentSignal::Blocked { why } => format!("**{slot} is blocked** on this issue:\n\n{}", quote(why)),
            AgentSignal::Failed { why } => format!("**{slot} gave up** on this issue:\n\n{}", quote(why)),
            AgentSignal::Pr { .. } | AgentSignal::Complete => return,
        };
        crate::github::posts::Note {
            key: ulid::Ulid::new().to_string(),
            issue: r.issue,
            body,
            since: rfc3339(SystemTime::now()),
            attempts: 0,
            last_error: None,
        }
    };
    github.posts.note(note);
}

fn quote(text: &str) -> String {
    crate::redact::current().clean(text).lines().map(|l| format!("> {l}")).collect::<Vec<_>>().join("\n")
}

/// The exit record of the task's current run, as its phase now says.
fn exit_record(task: &Task) -> ExitRecord {
    let record = &task.record;
    let (state, cause, reason) = match &record.phase {
        Phase::Ended { cause, reason, .. } => (task.record.state().as_str(), Some(*cause), reason.clone()),
        Phase::Waiting { after, reason, .. } => ("failed", Some(*after), Some(reason.clone())),
        Phase::Abandoned { reason } => ("abandoned", None, Some(reason.clone())),
        // Not an end; never asked for.
        other => (other.state().as_str(), None, None),
    };
    let now = task.ended_at.unwrap_or_else(SystemTime::now);
    ExitRecord {
        version: RECORD_VERSION,
        run_id: record.run_id.clone(),
        slot: record.slot.clone(),
        issue: record.issue,
        state: state.to_string(),
        end_cause: cause,
        reason,
        exit_code: match task.exit {
            Some(ExitInfo::Code(c)) => Some(c),
            _ => None,
        },
        signal: match task.exit {
            Some(ExitInfo::Signal(s)) => Some(s),
            _ => None,
        },
        started_at: rfc3339(task.run_started_at),
        ended_at: rfc3339(now),
        duration_secs: now.duration_since(task.run_started_at).unwrap_or_default().as_secs(),
        session_id: record.session_id.clone(),
        cost_usd: task.cost_usd,
        cost_estimated: task.cost_estimated,
        tokens: task.usage,
        turns: task.turns,
        task_id: record.task_id.clone(),
        provider: record.provider.clone(),
        runs: record.runs.clone(),
        cwd: record.cwd.clone(),
        prompt_file: record.prompt_file.clone(),
        worktree: record.worktree.clone(),
        branch: record.branch.clone(),
        commits: task.commits,
        changes: task.changes,
    }
}

/// Writes the run's end: its exit record and history line. Returns whether it is on disk. On a full disk the record
/// waits in the task (the slot stays held) for [`flush_pending`].
fn record_run(shared: &Arc<Shared>, slot: &str) -> bool {
    let (exit, already) = {
        let table = shared.lock_table();
        let Some(task) = table.get(slot).and_then(|s| s.task.as_ref()) else { return true };
        (exit_record(task), task.recorded_as.clone())
    };
    let result = write_exit(shared, &exit, already.as_ref());
    let mut table = shared.lock_table();
    let Some(task) = table.get_mut(slot).and_then(|s| s.task.as_mut()) else { return true };
    match result {
        Ok(()) => {
            if already.is_none()
                && let Some(cost) = exit.cost_usd
            {
                shared.spend.add(&exit.provider, cost);
            }
            task.recorded_as = Some((exit.state.clone(), exit.end_cause));
            if exit.state == "completed" || exit.state == "failed" {
                shared.note_outcome(exit.state == "completed", exit.duration_secs);
            }
            true
        }
        Err(e) if ledger::is_disk_full(&e) => {
            tracing::error!(slot, run = %exit.run_id, "cannot record the end of the run: {e}; kept until there is room");
            shared.note_disk_full(&e);
            task.unrecorded = Some(exit);
            drop(table);
            start_flusher(shared);
            false
        }
        Err(e) => {
            // Not a full disk (EIO, permissions): retrying would not help, and holding the slot forever would be
            // worse than a missing history line. Said loudly.
            tracing::error!(slot, run = %exit.run_id, "cannot record the end of the run: {e}");
            true
        }
    }
}

/// The exit record, then the history line (unless the history already says the same of this run).
fn write_exit(
    shared: &Shared,
    exit: &ExitRecord,
    already: Option<&(String, Option<crate::task::EndCause>)>,
) -> std::io::Result<()> {
    let files = RunFiles::at(shared.paths.run_dir(&exit.run_id));
    ledger::write_json(&files.exit_record(), exit)?;
    if already != Some(&(exit.state.clone(), exit.end_cause)) {
        ledger::append_history(&shared.paths.history_file(), exit)?;
    }
    Ok(())
}

fn write_lock(shared: &Arc<Shared>, slot: &str) {
    let record = {
        let table = shared.lock_table();
        let Some(task) = table.get(slot).and_then(|s| s.task.as_ref()) else { return };
        task.record.clone()
    };
    let result = shared.write_lock(&record);
    let mut table = shared.lock_table();
    let Some(task) = table.get_mut(slot).and_then(|s| s.task.as_mut()) else { return };
    match result {
        Ok(()) => task.unsaved = false,
        Err(e) if ledger::is_disk_full(&e) => {
            tracing::error!(slot, "cannot write the lockfile: {e}; written again when there is room");
            shared.note_disk_full(&e);
            task.unsaved = true;
            drop(table);
            start_flusher(shared);
        }
        Err(e) => tracing::error!(slot, "cannot write the lockfile: {e}"),
    }
}

fn free_slot(shared: &Shared, slot: &str) {
    if let Err(e) = ledger::remove_slot_lock(&shared.paths.slots_dir(), slot) {
        tracing::error!(slot, "cannot remove the slot's lockfile: {e}");
    }
    // What waits for a slot may take this one.
    shared.queue.wake.notify_one();
    if let Some(task) = shared.lock_table().get_mut(slot).and_then(|s| s.task.as_mut()) {
        task.unsaved = false;
    }
}

/// Sends [`Event::WaitOver`] at `at`, if the task is then still this run's and still waiting.
pub(super) fn wake_at(shared: &Arc<Shared>, slot: &str, run_id: &str, at: SystemTime) {
    let (shared, slot, run_id) = (shared.clone(), slot.to_string(), run_id.to_string());
    tokio::spawn(async move {
        // Wall-clock time, as persisted: a restart waits for the same moment.
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        let still = shared
            .lock_table()
            .get(&slot)
            .and_then(|s| s.task.as_ref())
            .is_some_and(|t| t.record.run_id == run_id && t.state() == SlotState::Waiting);
        if still && let Err(e) = drive(&shared, &slot, Event::WaitOver) {
            tracing::warn!(slot, "end of a wait: {e}");
        }
    });
}

/// SIGTERM to the run's process group now, SIGKILL after the grace period if it is still going.
fn signal_stop(shared: &Arc<Shared>, slot: &str, run_id: &str) {
    let (pgid, cgroup) = {
        let table = shared.lock_table();
        let Some(task) = table.get(slot).and_then(|s| s.task.as_ref()) else { return };
        let pgid = task.record.pgid.map(|p| p as i32).filter(|pgid| task.group_is_ours(*pgid));
        (pgid, shared.run_cgroup(&task.record))
    };
    if pgid.is_none() && cgroup.is_none() {
        return;
    }
    if let Some(pgid) = pgid {
        supervisor::signal_group(pgid, Signal::SIGTERM);
    }
    // Also what left the group (setsid): everything in the run's cgroup.
    if let Some(cgroup) = &cgroup {
        cgroup.signal_all(Signal::SIGTERM);
    }
    let (shared, slot, run_id) = (shared.clone(), slot.to_string(), run_id.to_string());
    tokio::spawn(async move {
        let ended = shared.lock_table().task_of_run(&run_id).map(|t| t.signal.subscribe());
        let Some(mut ended) = ended else { return };
        if tokio::time::timeout(shared.grace, ended.wait_for(|s| s.ended)).await.is_ok() {
            return;
        }
        let mut table = shared.lock_table();
        let Some(task) = table.task_of_run(&run_id) else { return };
        tracing::info!(slot, "run ignored SIGTERM for {:?}; killing it", shared.grace);
        if let Some(cgroup) = &cgroup {
            cgroup.kill();
        }
        if let Some(pgid) = pgid.filter(|pgid| task.group_is_ours(*pgid)) {
            supervisor::signal_group(pgid, Signal::SIGKILL);
        }
    });
}

/// Starts the loop that writes what waits for disk space, unless it runs already.
fn start_flusher(shared: &Arc<Shared>) {
    if shared.flushing.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(FLUSH_EVERY).await;
            if flush_pending(&shared) {
                shared.flushing.store(false, std::sync::atomic::Ordering::SeqCst);
                shared.clear_disk_full();
                tracing::info!("every pending record is written");
                return;
            }
        }
    });
}

/// Writes the records and lockfiles that wait for disk space; frees the slots of tasks that ended meanwhile.
/// Returns whether nothing waits any more.
pub(super) fn flush_pending(shared: &Arc<Shared>) -> bool {
    let pending: Vec<(String, Option<ExitRecord>, bool)> = shared
        .lock_table()
        .slots
        .iter()
        .filter_map(|s| {
            let t = s.task.as_ref()?;
            (t.unrecorded.is_some() || t.unsaved).then(|| (s.name.clone(), t.unrecorded.clone(), t.unsaved))
        })
        .collect();
    let mut all_done = true;
    for (slot, exit, unsaved) in pending {
        if let Some(exit) = exit {
            let already = shared.lock_table().get(&slot).and_then(|s| s.task.as_ref()?.recorded_as.clone());
            match write_exit(shared, &exit, already.as_ref()) {
                Ok(()) => {
                    let held = {
                        let mut table = shared.lock_table();
                        let Some(task) = table.get_mut(&slot).and_then(|s| s.task.as_mut()) else { continue };
                        task.unrecorded = None;
                        task.recorded_as = Some((exit.state.clone(), exit.end_cause));
                        task.record.state().holds_slot()
                    };
                    if exit.state == "completed" || exit.state == "failed" {
                        shared.note_outcome(exit.state == "completed", exit.duration_secs);
                    }
                    if already.is_none()
                        && let Some(cost) = exit.cost_usd
                    {
                        shared.spend.add(&exit.provider, cost);
                    }
                    tracing::info!(slot, run = %exit.run_id, "recorded the end of the run now that there is room");
                    if !held {
                        free_slot(shared, &slot);
                        comment(shared, &slot, true);
                        continue;
                    }
                }
                Err(_) => {
                    all_done = false;
                    continue;
                }
            }
        }
        if unsaved {
            write_lock(shared, &slot);
            let still = shared.lock_table().get(&slot).and_then(|s| s.task.as_ref()).is_some_and(|t| t.unsaved);
            all_done &= !still;
        }
    }
    all_done
}

/// Honours `worktree.cleanup.onComplete` / `onError`: removes the ended task's worktree, only if it holds nothing
/// that exists nowhere else. The branch always stays.
async fn cleanup_worktree(shared: &Shared, slot: &str) {
    let cleanup = &shared.config.raw.worktree.cleanup;
    let (state, worktree) = {
        let table = shared.lock_table();
        let Some(task) = table.get(slot).and_then(|s| s.task.as_ref()) else { return };
        (task.state(), task.record.worktree.clone())
    };
    let wanted = match state {
        SlotState::Completed => cleanup.remove_on_complete(),
        SlotState::Failed => cleanup.remove_on_error(),
        _ => false,
    };
    let Some(path) = worktree.filter(|_| wanted) else { return };
    let workspace = shared.workspace.clone();
    let result = tokio::task::spawn_blocking(move || {
        let root = workspace::repo_root(&workspace).ok_or("the workspace is no longer a git repository")?;
        workspace::remove_if_safe(&root, &path).map_err(|e| e.to_string())
    })
    .await;
    match result {
        Ok(Ok(true)) => tracing::info!(slot, "removed the worktree of the finished task"),
        Ok(Ok(false)) => tracing::info!(slot, "kept the worktree: it holds unsaved work"),
        Ok(Err(e)) => tracing::warn!(slot, "worktree clean-up: {e}"),
        Err(e) => tracing::warn!(slot, "worktree clean-up: {e}"),
    }
}
