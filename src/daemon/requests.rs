//! Requests that read or annotate rather than run: `workspaces`, `progress` from inside a run, `history`.

use std::path::Path;
use std::time::SystemTime;

use std::sync::Arc;

use super::life::drive;
use super::{Shared, refuse};
use crate::ledger::{self, RUN_LOCK};
use crate::protocol::{ErrorKind, ErrorReply, HistoryRun, Reply, SlotState, WorkspacesReport, WorktreeStatus};
use crate::supervisor;
use crate::task::Event;
use crate::workspace;

/// Handles `workspaces`: every worktree autodev made, and with `prune` removes those that are safe to remove
/// (no task holds them, nothing in them exists nowhere else).
pub(super) async fn workspaces(shared: &Shared, prune: bool) -> Result<Reply, ErrorReply> {
    let in_use: Vec<(std::path::PathBuf, String)> = shared
        .lock_table()
        .slots
        .iter()
        .filter(|s| s.is_held())
        .filter_map(|s| Some((s.task.as_ref()?.record.worktree.clone()?, s.name.clone())))
        .collect();
    let workspace = shared.workspace.clone();
    let config = shared.config.raw.worktree.clone();
    let report = tokio::task::spawn_blocking(move || -> Result<WorkspacesReport, String> {
        let Some(root) = workspace::repo_root(&workspace) else {
            return Ok(WorkspacesReport {
                repository: None,
                worktrees: Vec::new(),
                removed: Vec::new(),
                kept: Vec::new(),
            });
        };
        let user = |path: &str| {
            let canonical = std::fs::canonicalize(path).ok();
            in_use.iter().find(|(p, _)| std::fs::canonicalize(p).ok() == canonical).map(|(_, s)| s.clone())
        };
        let (mut removed, mut kept) = (Vec::new(), Vec::new());
        let mut worktrees = Vec::new();
        for info in workspace::list(&root, &config)? {
            let in_use_by = user(&info.path);
            if prune {
                match (&in_use_by, info.state.as_str()) {
                    (Some(slot), _) => kept.push(format!("{}: in use by {slot}", info.path)),
                    (None, "clean") => match workspace::remove_if_safe(&root, Path::new(&info.path)) {
                        Ok(true) => {
                            removed.push(info.path.clone());
                            continue;
                        }
                        Ok(false) => kept.push(format!("{}: holds unsaved work", info.path)),
                        Err(e) => kept.push(format!("{}: {e}", info.path)),
                    },
                    (None, state) => kept.push(format!("{}: {state}", info.path)),
                }
            }
            worktrees.push(WorktreeStatus { info, in_use_by });
        }
        Ok(WorkspacesReport { repository: Some(root.display().to_string()), worktrees, removed, kept })
    })
    .await
    .map_err(|e| refuse(ErrorKind::Failed, format!("internal error: {e}"), None))?
    .map_err(|e| refuse(ErrorKind::Failed, e, None))?;
    Ok(Reply::Workspaces(report))
}

/// Handles `progress` from inside a run: only a process of that run (holding its run lock, or in its process
/// group) may report for it.
pub(super) fn progress(
    shared: &Arc<Shared>,
    slot: &str,
    run_id: &str,
    percent: u8,
    message: &str,
    peer: Option<i32>,
) -> Result<Reply, ErrorReply> {
    let mut table = shared.lock_table();
    let refused = || {
        refuse(
            ErrorKind::Conflict,
            format!("progress for {slot} is only taken from inside its run (autodevctl progress, run by the agent)"),
            None,
        )
    };
    let Some(task) = table.get_mut(slot).and_then(|s| s.task.as_mut()) else { return Err(refused()) };
    if task.record.run_id != run_id || !task.is_running() {
        return Err(refused());
    }
    let lock = shared.paths.run_dir(run_id).join(RUN_LOCK);
    let inside = peer.is_some_and(|pid| {
        supervisor::holds_run_lock(pid, &lock)
            || supervisor::proc_stat(pid).is_some_and(|s| Some(s.pgrp as u32) == task.record.pgid)
    });
    if !inside {
        return Err(refused());
    }
    task.health.progress = Some(percent.min(100));
    task.health.progress_message = Some(crate::output::clean_line(message.as_bytes(), 200));
    task.health.last_progress_at = Some(SystemTime::now());
    let revived = task.state() == SlotState::Stale;
    task.signal.send_modify(|s| s.batches += 1);
    drop(table);
    if revived {
        let _ = drive(shared, slot, Event::Alive);
    }
    Ok(Reply::ProgressNoted { slot: slot.to_string(), percent: percent.min(100) })
}

/// Handles `history`: finished runs from history.jsonl (its last 8 MiB), newest last.
pub(super) async fn history(shared: &Shared, issue: Option<u64>, limit: Option<usize>) -> Result<Reply, ErrorReply> {
    let path = shared.paths.history_file();
    // Off the runtime thread: up to 8 MiB to read and parse must not hold up followers and status replies.
    let read = tokio::task::spawn_blocking(move || ledger::read_history_tail(&path, 8 << 20)).await;
    let mut runs = match read {
        Ok(Ok(runs)) => runs,
        Ok(Err(e)) => {
            let shown = shared.paths.history_file().display().to_string();
            return Err(refuse(ErrorKind::Failed, format!("cannot read {shown}: {e}"), None));
        }
        Err(e) => return Err(refuse(ErrorKind::Failed, format!("internal error: {e}"), None)),
    };
    if let Some(issue) = issue {
        runs.retain(|r| r.issue == issue);
    }
    let keep = limit.unwrap_or(50);
    let skip = runs.len().saturating_sub(keep);
    Ok(Reply::History { runs: runs.split_off(skip).into_iter().map(history_run).collect() })
}

/// A history line as the protocol shows it.
fn history_run(r: ledger::ExitRecord) -> HistoryRun {
    HistoryRun {
        run_id: r.run_id,
        task_id: r.task_id,
        slot: r.slot,
        provider: r.provider,
        issue: r.issue,
        state: r.state,
        end_cause: r.end_cause.map(|c| c.as_str().to_string()),
        reason: r.reason,
        exit_code: r.exit_code,
        signal: r.signal,
        started_at: r.started_at,
        ended_at: r.ended_at,
        duration_secs: r.duration_secs,
        session_id: r.session_id,
        cost_usd: r.cost_usd,
        turns: r.turns,
        runs: r.runs,
        branch: r.branch,
    }
}
