//! Start-up reconciliation, before the socket answers: every lockfile ends as an adopted run (its process is
//! alive and provably the same), an abandoned task (the slot stays held), or a finished one (its exit record was
//! written before the crash). A pid that names a stranger is never signalled; leftovers of a run are found through
//! its run lock, which only the run's own processes hold.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Shared;
use super::runs::{self, RUN_LOCK, Wake};
use super::slots::Task;
use crate::config::OnAbandoned;
use crate::ledger::{self, ExitRecord, RunFiles, SlotLock};
use crate::protocol::SlotState;
use crate::supervisor;
use crate::timefmt::{parse_rfc3339, rfc3339};

/// How much of the history's tail is read to know each slot's last task.
const HISTORY_TAIL: u64 = 1 << 20;
/// Automatic resumes allowed per slot per hour (policy `onAbandoned: resume`): a crash loop must not become a
/// resume loop that burns model money.
const AUTO_RESUMES_PER_HOUR: usize = 3;

/// Runs the recovery pass; returns warnings for `status`.
pub(super) async fn recover(shared: &Arc<Shared>) -> Vec<String> {
    let mut warnings = Vec::new();
    let history = ledger::read_history_tail(&shared.paths.history_file(), HISTORY_TAIL).unwrap_or_else(|e| {
        warnings.push(format!("cannot read {}: {e}", shared.paths.history_file().display()));
        Vec::new()
    });
    let (locks, corrupt) = ledger::read_slot_locks(&shared.paths.slots_dir()).unwrap_or_else(|e| {
        warnings.push(format!("cannot read lockfiles in {}: {e}", shared.paths.slots_dir().display()));
        (Vec::new(), Vec::new())
    });
    for c in corrupt {
        let message = format!(
            "slot {}: its lockfile was unreadable ({}) and was moved to {}; the task it held, if any, was not recovered",
            c.slot,
            c.error,
            c.moved_to.display()
        );
        tracing::error!("{message}");
        warnings.push(message);
    }
    show_last_finished(shared, &history, &locks);
    let recorded: HashSet<&str> = history.iter().map(|h| h.run_id.as_str()).collect();
    let mut abandoned = Vec::new();
    for lock in locks {
        let slot = lock.slot.clone();
        match recover_one(shared, lock, &recorded).await {
            Ok(Some(SlotState::Abandoned)) => abandoned.push(slot),
            Ok(_) => {}
            Err(message) => {
                tracing::error!("{message}");
                warnings.push(message);
            }
        }
    }
    apply_policy(shared, abandoned).await;
    warnings
}

/// Slots without a lockfile show their last finished task from the history, so `status` and `resume` survive a
/// restart.
fn show_last_finished(shared: &Shared, history: &[ExitRecord], locks: &[SlotLock]) {
    let mut table = shared.lock_table();
    for exit in history {
        if locks.iter().any(|l| l.slot == exit.slot) || exit.state == "abandoned" {
            continue;
        }
        let state = match exit.state.as_str() {
            "completed" => SlotState::Completed,
            _ => SlotState::Failed,
        };
        let Some(slot) = table.slots.iter_mut().find(|s| s.name == exit.slot) else { continue };
        let mut task = Task::idle(record_of_exit(shared, exit), state, exit.reason.clone());
        task.exit_code = exit.exit_code;
        task.cost_usd = exit.cost_usd;
        task.turns = exit.turns;
        task.ended_at = parse_rfc3339(&exit.ended_at);
        task.run_started_at = parse_rfc3339(&exit.started_at).unwrap_or(SystemTime::UNIX_EPOCH);
        slot.task = Some(task);
    }
}

/// The task record of a finished run, for display and `resume`.
fn record_of_exit(shared: &Shared, exit: &ExitRecord) -> SlotLock {
    let files = RunFiles::at(shared.paths.run_dir(&exit.run_id));
    SlotLock {
        version: ledger::RECORD_VERSION,
        slot: exit.slot.clone(),
        provider: exit.provider.clone(),
        issue: exit.issue,
        task_id: exit.task_id.clone(),
        run_id: exit.run_id.clone(),
        runs: if exit.runs.is_empty() { vec![exit.run_id.clone()] } else { exit.runs.clone() },
        state: exit.state.clone(),
        reason: exit.reason.clone(),
        pid: None,
        pgid: None,
        start_time: None,
        boot_id: String::new(),
        session_id: exit.session_id.clone(),
        cwd: exit.cwd.clone(),
        program: String::new(),
        args: Vec::new(),
        prompt_file: exit.prompt_file.clone(),
        stdout: files.stdout(),
        stderr: files.stderr(),
        started_at: exit.started_at.clone(),
        run_started_at: exit.started_at.clone(),
        daemon_pid: 0,
        auto_resumes: Vec::new(),
        worktree: exit.worktree.clone(),
        branch: exit.branch.clone(),
    }
}

/// Settles one lockfile. Returns the state the slot ends in, or a warning.
async fn recover_one(
    shared: &Arc<Shared>,
    mut lock: SlotLock,
    recorded: &HashSet<&str>,
) -> Result<Option<SlotState>, String> {
    let files = RunFiles::at(lock.stdout.parent().map(|p| p.to_path_buf()).unwrap_or_default());
    let run_lock = files.dir.join(RUN_LOCK);
    let format = {
        let mut table = shared.lock_table();
        let Some(slot) = table.slot_for_lock(&lock.slot, &lock.provider) else {
            return Err(format!(
                "slot {} holds issue #{} but LLM {:?} is no longer in the config: its lockfile is kept as it is; \
                 add the LLM back to resume or release the task",
                lock.slot, lock.issue, lock.provider
            ));
        };
        let provider = slot.provider;
        table.providers[provider].format
    };

    // The run ended and was recorded, and the daemon died before it freed or rewrote the lockfile.
    if let Ok(bytes) = std::fs::read(files.exit_record())
        && let Ok(exit) = serde_json::from_slice::<ExitRecord>(&bytes)
        && exit.run_id == lock.run_id
    {
        if exit.state != "abandoned" {
            if !recorded.contains(exit.run_id.as_str()) {
                let _ = ledger::append_history(&shared.paths.history_file(), &exit);
            }
            let state = if exit.state == "completed" { SlotState::Completed } else { SlotState::Failed };
            install(shared, Task::idle(lock.clone(), state, exit.reason.clone()));
            ledger::remove_slot_lock(&shared.paths.slots_dir(), &lock.slot).map_err(|e| e.to_string())?;
            return Ok(Some(state));
        }
        lock.state = "abandoned".into();
        lock.reason = exit.reason.clone();
    }

    let same_boot = lock.boot_id == shared.boot_id;
    // Leftovers of the run (its grandchildren, say) still hold the run lock: they are provably ours.
    let leftovers = same_boot && supervisor::run_lock_held(&run_lock);
    if lock.state != "abandoned" && same_boot {
        if let Some(pid) = live_leader(&mut lock, &run_lock, leftovers) {
            match supervisor::adopt(pid as i32) {
                Ok(child) => return adopt(shared, lock, child, format, &files),
                Err(e) => tracing::warn!(slot = %lock.slot, pid, "cannot watch the run's process: {e}"),
            }
        }
    }
    let reason = match (&lock.state[..], lock.pid) {
        ("abandoned", _) => lock.reason.clone().unwrap_or_else(|| "abandoned".into()),
        _ if !same_boot => "the machine restarted while the run was going".into(),
        (_, None) => "autodevd stopped before the run's process was recorded".into(),
        (_, Some(pid)) => match supervisor::proc_stat(pid as i32) {
            Some(stat) if stat.state != 'Z' && Some(stat.start_time) != lock.start_time => {
                format!("process {pid} ended while autodevd was not running (the pid now names another process)")
            }
            _ => format!("process {pid} ended while autodevd was not running"),
        },
    };
    if leftovers {
        let n = supervisor::clear_lock_holders(&run_lock, None, shared.grace).await;
        tracing::info!(slot = %lock.slot, "stopped {n} leftover process(es) of the abandoned run");
    }
    tracing::warn!(slot = %lock.slot, issue = lock.issue, "abandoned: {reason}");
    // The lockfile is left as it is: the same facts give the same verdict at every start, and not writing keeps
    // the socket's first answer fast (no fsync per lockfile).
    lock.state = "abandoned".into();
    lock.reason = Some(reason.clone());
    install(shared, Task::idle(lock, SlotState::Abandoned, Some(reason)));
    Ok(Some(SlotState::Abandoned))
}

/// The pid of the run's leader if it is alive and provably the process the lockfile names: same pid, same start
/// time, same boot, and the run lock held. A lockfile written before the pid was known is matched through the run lock: the holder that
/// leads its own process group is the leader.
fn live_leader(lock: &mut SlotLock, run_lock: &std::path::Path, leftovers: bool) -> Option<u32> {
    match lock.pid {
        // Same pid, start time and boot is the process we started; the run lock being held proves it is still
        // a run of ours and not a lockfile someone wrote by hand about a stranger.
        Some(pid) if leftovers => {
            let stat = supervisor::proc_stat(pid as i32)?;
            (stat.state != 'Z' && Some(stat.start_time) == lock.start_time).then_some(pid)
        }
        Some(_) => None,
        None if leftovers => {
            let leader = supervisor::run_lock_holders(run_lock, None)
                .into_iter()
                .find(|pid| supervisor::proc_stat(*pid).is_some_and(|s| s.pgrp == *pid))?;
            lock.pid = Some(leader as u32);
            lock.pgid = Some(leader as u32);
            lock.start_time = supervisor::proc_stat(leader).map(|s| s.start_time);
            Some(leader as u32)
        }
        None => None,
    }
}

/// Takes over a live run: it shows as in progress, its preview continues from the log, its end is detected.
fn adopt(
    shared: &Arc<Shared>,
    mut lock: SlotLock,
    child: supervisor::Child,
    format: crate::provider::EventFormat,
    files: &RunFiles,
) -> Result<Option<SlotState>, String> {
    let wake = Wake::arm(shared, vec![files.stdout(), files.stderr()])?;
    // The lockfile already tells the truth about this run; it is rewritten when something changes (session id,
    // the end), not here.
    lock.state = "in_progress".into();
    tracing::info!(slot = %lock.slot, issue = lock.issue, pid = child.pid, "adopted a run that outlived autodevd");
    let run_id = lock.run_id.clone();
    let mut task = Task::starting(lock);
    task.state = SlotState::InProgress;
    task.adopted = true;
    task.run_started_at = parse_rfc3339(&task.record.run_started_at).unwrap_or_else(SystemTime::now);
    install(shared, task);
    runs::follow(shared, run_id, format, child, wake, None);
    Ok(Some(SlotState::InProgress))
}

fn install(shared: &Shared, task: Task) {
    let mut table = shared.lock_table();
    let name = task.record.slot.clone();
    if let Some(slot) = table.get_mut(&name) {
        slot.task = Some(task);
    }
}

/// Applies `supervisor.onAbandoned` to the tasks found abandoned.
async fn apply_policy(shared: &Arc<Shared>, abandoned: Vec<String>) {
    match shared.config.raw.supervisor.on_abandoned {
        OnAbandoned::Ask => {}
        OnAbandoned::Fail => {
            for slot in abandoned {
                let run_id =
                    shared.lock_table().get(&slot).and_then(|s| s.task.as_ref()).map(|t| t.record.run_id.clone());
                let reason =
                    shared.lock_table().get(&slot).and_then(|s| s.task.as_ref()).and_then(|t| t.reason.clone());
                let Some(run_id) = run_id else { continue };
                let why =
                    format!("{}; failed by policy onAbandoned=fail", reason.unwrap_or_else(|| "abandoned".into()));
                if let Some(end) = runs::finish_task(shared, &run_id, SlotState::Failed, Some(why), None, None) {
                    runs::record_end(shared, &end);
                }
            }
        }
        OnAbandoned::Resume => {
            for slot in abandoned {
                let recent = {
                    let table = shared.lock_table();
                    let Some(task) = table.get(&slot).and_then(|s| s.task.as_ref()) else { continue };
                    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
                    task.record.auto_resumes.iter().filter_map(|t| parse_rfc3339(t)).filter(|t| *t > hour_ago).count()
                };
                if recent >= AUTO_RESUMES_PER_HOUR {
                    let lock = {
                        let mut table = shared.lock_table();
                        let Some(task) = table.get_mut(&slot).and_then(|s| s.task.as_mut()) else { continue };
                        let why = format!(
                            "{}; not resumed automatically: {AUTO_RESUMES_PER_HOUR} automatic resumes in the last hour \
                             already (resume it by hand)",
                            task.reason.clone().unwrap_or_default()
                        );
                        task.reason = Some(why.clone());
                        task.record.reason = Some(why);
                        task.record.clone()
                    };
                    tracing::warn!(slot, "not resumed automatically: too many automatic resumes in the last hour");
                    let _ = shared.write_lock(&lock);
                    continue;
                }
                match runs::resume(shared, &slot, true).await {
                    Ok(_) => tracing::info!(
                        slot,
                        "resumed automatically (onAbandoned=resume) at {}",
                        rfc3339(SystemTime::now())
                    ),
                    Err(e) => tracing::warn!(slot, "automatic resume failed: {}", e.message),
                }
            }
        }
    }
}
