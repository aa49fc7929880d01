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

/// Runs the recovery pass; returns warnings for `status`. Lockfiles that cannot be read at all are an error:
/// starting without them could hand a held issue to a second agent.
pub(super) async fn recover(shared: &Arc<Shared>) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    let history = ledger::read_history_tail(&shared.paths.history_file(), HISTORY_TAIL).unwrap_or_else(|e| {
        warnings.push(format!("cannot read {}: {e}", shared.paths.history_file().display()));
        Vec::new()
    });
    let (mut locks, corrupt) = ledger::read_slot_locks(&shared.paths.slots_dir())
        .map_err(|e| format!("cannot read the lockfiles in {}: {e}", shared.paths.slots_dir().display()))?;
    for c in corrupt {
        let rebuilt = rebuild_from_live_run(shared, &c.slot, &locks);
        let fate = match &rebuilt {
            Some(lock) => format!("its run {} is still alive and holds issue #{}", lock.run_id, lock.issue),
            None => "no live run of that slot was found".into(),
        };
        let message = format!(
            "slot {}: its lockfile was unreadable ({}) and was moved to {}; {fate}",
            c.slot,
            c.error,
            c.moved_to.display()
        );
        tracing::error!("{message}");
        warnings.push(message);
        locks.extend(rebuilt);
    }
    show_last_finished(shared, &history, &locks);
    for exit in history.iter().filter(|h| h.state == "completed" || h.state == "failed") {
        shared.note_outcome(exit.state == "completed", exit.duration_secs);
    }
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
    Ok(warnings)
}

/// After a corrupt lockfile: a run of that slot whose run lock is still held is alive, and its `run.json` says
/// which issue it works on. The rebuilt lockfile (no pid on record) goes through recovery like any other.
fn rebuild_from_live_run(shared: &Shared, slot: &str, valid: &[SlotLock]) -> Option<SlotLock> {
    let runs = std::fs::read_dir(shared.paths.runs_dir()).ok()?;
    let claimed: HashSet<&str> = valid.iter().map(|l| l.run_id.as_str()).collect();
    let run = runs
        .filter_map(|e| e.ok())
        .filter(|e| !claimed.contains(e.file_name().to_string_lossy().as_ref()))
        .filter(|e| supervisor::run_lock_held(&e.path().join(RUN_LOCK)))
        .filter_map(|e| {
            serde_json::from_slice::<ledger::RunRecord>(&std::fs::read(e.path().join("run.json")).ok()?).ok()
        })
        .find(|r| r.slot == slot)?;
    let files = RunFiles::at(shared.paths.run_dir(&run.run_id));
    let mut lock = SlotLock::new(&run.slot, &run.provider, run.issue, run.cwd.clone(), files.prompt());
    lock.task_id = run.run_id.clone();
    lock.next_run(run.run_id.clone(), &files, &shared.boot_id, run.daemon_pid);
    lock.state = "in_progress".into();
    lock.session_id = run.session_id.clone();
    (lock.program, lock.args) = (run.program.clone(), run.args.clone());
    (lock.started_at, lock.run_started_at) = (run.started_at.clone(), run.started_at);
    Some(lock)
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
    let mut lock = SlotLock::new(&exit.slot, &exit.provider, exit.issue, exit.cwd.clone(), exit.prompt_file.clone());
    lock.task_id = exit.task_id.clone();
    lock.next_run(exit.run_id.clone(), &files, "", 0);
    if !exit.runs.is_empty() {
        lock.runs = exit.runs.clone();
    }
    (lock.state, lock.reason) = (exit.state.clone(), exit.reason.clone());
    lock.session_id = exit.session_id.clone();
    (lock.started_at, lock.run_started_at) = (exit.started_at.clone(), exit.started_at.clone());
    (lock.worktree, lock.branch) = (exit.worktree.clone(), exit.branch.clone());
    lock
}

/// Settles one lockfile. Returns the state the slot ends in, or a warning.
async fn recover_one(
    shared: &Arc<Shared>,
    mut lock: SlotLock,
    recorded: &HashSet<&str>,
) -> Result<Option<SlotState>, String> {
    // The run's files are found from its id, never from paths in the file: an edited or copied lockfile must
    // not point recovery at another run's lock.
    if !is_run_id(&lock.run_id) {
        shared.lock_table().orphans.push((lock.slot.clone(), lock.issue));
        return Err(format!(
            "slot {}: the lockfile names a malformed run id {:?}; it is kept as it is and its issue \
             #{} stays held",
            lock.slot, lock.run_id, lock.issue
        ));
    }
    let files = RunFiles::at(shared.paths.run_dir(&lock.run_id));
    (lock.stdout, lock.stderr) = (files.stdout(), files.stderr());
    let run_lock = files.dir.join(RUN_LOCK);
    let format = {
        let mut table = shared.lock_table();
        let Some(slot) = table.slot_for_lock(&lock.slot, &lock.provider) else {
            // The issue stays held all the same: a live run of it must never get a second agent.
            table.orphans.push((lock.slot.clone(), lock.issue));
            return Err(format!(
                "slot {} holds issue #{} but LLM {:?} is no longer in the config: its lockfile is kept as it is \
                 and the issue stays held; add the LLM back to resume or release the task",
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
            if lock.boot_id == shared.boot_id && supervisor::run_lock_held(&run_lock) {
                supervisor::clear_lock_holders(&run_lock, None, shared.grace).await;
            }
            if !recorded.contains(exit.run_id.as_str()) {
                let _ = ledger::append_history(&shared.paths.history_file(), &exit);
            }
            super::issue_sync::board_wants_for_end(shared, &exit);
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
    if lock.state != "abandoned"
        && same_boot
        && let Some(pid) = live_leader(&mut lock, &run_lock, leftovers)
    {
        match supervisor::adopt(pid as i32) {
            Ok(child) => return adopt(shared, lock, child, format, &files),
            Err(e) => tracing::warn!(slot = %lock.slot, pid, "cannot watch the run's process: {e}"),
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
            let same = stat.state != 'Z' && Some(stat.start_time) == lock.start_time && stat.pgrp == pid as i32;
            same.then(|| {
                lock.pgid = Some(pid);
                pid
            })
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
    let wake = Wake::arm(shared, vec![files.stdout(), files.stderr()]);
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

/// Run ids are ULIDs (26 characters of Crockford base32); anything else in a lockfile is not ours.
fn is_run_id(id: &str) -> bool {
    id.len() == 26 && id.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}
