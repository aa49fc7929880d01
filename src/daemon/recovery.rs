//! Start-up reconciliation, before the socket answers: every lockfile ends as an adopted run (its process is alive
//! and provably the run's), a finished one (its exit record, or the final event in its output, says how it ended:
//! it is never run again), a waiting task (woken at the same moment as before), or an abandoned one (the slot stays
//! held). A pid that names a stranger is never signalled; leftovers of a run are found through its run lock.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::Shared;
use super::life::{drive, wake_at};
use super::runs::{self, Wake};
use super::slots::Task;
use crate::cgroup::RunCgroup;
use crate::config::OnAbandoned;
use crate::ledger::{self, ExitRecord, RUN_LOCK, RunFiles, RunRecord, SlotLock};
use crate::output::scan_outcome;
use crate::provider::{EventFormat, Outcome};
use crate::supervisor::{self, ExitInfo};
use crate::task::{EndCause, Event, Phase, Verdict, verdict};
use crate::timefmt::parse_rfc3339;

/// How much of the history's tail is read to know each slot's last task.
const HISTORY_TAIL: u64 = 1 << 20;

/// Runs the recovery pass; returns warnings for `status`. Lockfiles that cannot be read at all are an error:
/// starting without them could hand a held issue to a second agent.
pub(super) async fn recover(shared: &Arc<Shared>) -> Result<Vec<String>, String> {
    let started = std::time::Instant::now();
    let mut warnings = Vec::new();
    let history = ledger::read_history_tail(&shared.paths.history_file(), HISTORY_TAIL).unwrap_or_else(|e| {
        warnings.push(format!("cannot read {}: {e}", shared.paths.history_file().display()));
        Vec::new()
    });
    let (mut locks, corrupt) = ledger::read_slot_locks(&shared.paths.slots_dir())
        .map_err(|e| format!("cannot read the lockfiles in {}: {e}", shared.paths.slots_dir().display()))?;
    let mut live = if corrupt.is_empty() { HashMap::new() } else { unclaimed_live_runs(shared, &locks) };
    for c in corrupt {
        let rebuilt = live.remove(&c.slot).map(|run| rebuild_from_live_run(shared, &run));
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
    let recorded: HashMap<&str, (String, Option<EndCause>)> =
        history.iter().map(|h| (h.run_id.as_str(), (h.state.clone(), h.end_cause))).collect();
    let read = started.elapsed();
    let count = locks.len();
    // Every run a lockfile names is kept from the sweep, also those recovery could not install (an LLM gone from
    // the config, a malformed run id): their issues stay held and their runs must live on.
    let named: std::collections::HashSet<String> = locks.iter().map(|l| l.run_id.clone()).collect();
    let mut abandoned = Vec::new();
    for lock in locks {
        let slot = lock.slot.clone();
        let already = recorded.get(lock.run_id.as_str()).cloned();
        match recover_one(shared, lock, already).await {
            Ok(Settled::Abandoned) => abandoned.push(slot),
            Ok(_) => {}
            Err(message) => {
                tracing::error!("{message}");
                warnings.push(message);
            }
        }
    }
    let settled = started.elapsed();
    sweep_cgroups(shared, &named);
    apply_policy(shared, abandoned).await;
    tracing::info!(
        "recovery: {count} lockfile(s) settled in {:.1} ms (reading {:.1} ms, settling {:.1} ms, policy {:.1} ms)",
        started.elapsed().as_secs_f64() * 1e3,
        read.as_secs_f64() * 1e3,
        (settled - read).as_secs_f64() * 1e3,
        (started.elapsed() - settled).as_secs_f64() * 1e3
    );
    Ok(warnings)
}

/// Cgroups under our base whose run no lockfile names (including those rebuilt from live runs): left by runs whose
/// end was recorded just before a crash, say, since a run's cgroup is emptied and removed before its end is
/// recorded. Whatever is in them is stopped, and they are removed. In the background: start-up does not wait.
fn sweep_cgroups(shared: &Arc<Shared>, named: &std::collections::HashSet<String>) {
    let Ok(cgroups) = &shared.cgroups else { return };
    let strays: Vec<RunCgroup> =
        cgroups.runs().into_iter().filter(|c| c.run_id().is_none_or(|id| !named.contains(id))).collect();
    if strays.is_empty() {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        for cgroup in strays {
            let n = cgroup.stop(shared.grace).await;
            if n > 0 {
                tracing::warn!(cgroup = %cgroup.path.display(), "stopped {n} process(es) of a run that is over");
            }
            let _ = cgroup.remove();
        }
    });
}

/// Runs whose run lock is still held (alive) and that no valid lockfile claims, by slot: where a corrupt lockfile's
/// task may still be running. Read once for all corrupt lockfiles.
fn unclaimed_live_runs(shared: &Shared, valid: &[SlotLock]) -> HashMap<String, RunRecord> {
    let Ok(runs) = std::fs::read_dir(shared.paths.runs_dir()) else { return HashMap::new() };
    let claimed: std::collections::HashSet<&str> = valid.iter().map(|l| l.run_id.as_str()).collect();
    runs.filter_map(|e| e.ok())
        .filter(|e| !claimed.contains(e.file_name().to_string_lossy().as_ref()))
        .filter(|e| supervisor::run_lock_held(&e.path().join(RUN_LOCK)))
        .filter_map(|e| ledger::read_run_record(&e.path().join("run.json")))
        .map(|r| (r.slot.clone(), r))
        .collect()
}

/// After a corrupt lockfile: a run of that slot whose run lock is still held is alive, and its `run.json` says
/// which issue it works on. The rebuilt lockfile (no pid on record) goes through recovery like any other.
fn rebuild_from_live_run(shared: &Shared, run: &RunRecord) -> SlotLock {
    let files = RunFiles::at(shared.paths.run_dir(&run.run_id));
    let mut lock = SlotLock::new(&run.slot, &run.provider, run.issue, run.cwd.clone(), files.prompt());
    lock.task_id = run.run_id.clone();
    lock.next_run(run.run_id.clone(), &files.dir, &shared.boot_id, run.daemon_pid);
    lock.phase = Phase::Running { stale: false, stop: None };
    lock.session_id = run.session_id.clone();
    (lock.program, lock.args) = (run.program.clone(), run.args.clone());
    (lock.started_at, lock.run_started_at) = (run.started_at.clone(), run.started_at.clone());
    // Its cgroup, if it has one: the run is alive, and the sweep must know the cgroup is owned.
    if let Ok(cgroups) = &shared.cgroups {
        let cgroup = cgroups.run(&run.run_id);
        lock.cgroup = cgroup.exists().then_some(cgroup.path);
    }
    lock
}

/// Slots without a lockfile show their last finished task from the history, so `status` and `resume` survive a
/// restart.
fn show_last_finished(shared: &Shared, history: &[ExitRecord], locks: &[SlotLock]) {
    let mut table = shared.lock_table();
    for exit in history {
        if locks.iter().any(|l| l.slot == exit.slot) || exit.state == "abandoned" {
            continue;
        }
        let Some(slot) = table.slots.iter_mut().find(|s| s.name == exit.slot) else { continue };
        let mut task = Task::idle(record_of_exit(shared, exit));
        task.exit = exit.exit_code.map(ExitInfo::Code);
        task.cost_usd = exit.cost_usd;
        (task.cost_estimated, task.usage) = (exit.cost_estimated, exit.tokens);
        task.turns = exit.turns;
        (task.commits, task.changes) = (exit.commits, exit.changes);
        task.ended_at = parse_rfc3339(&exit.ended_at);
        task.run_started_at = parse_rfc3339(&exit.started_at).unwrap_or(SystemTime::UNIX_EPOCH);
        task.recorded_as = Some((exit.state.clone(), exit.end_cause));
        slot.task = Some(task);
    }
}

/// The task record of a finished run, for display and `resume`.
fn record_of_exit(shared: &Shared, exit: &ExitRecord) -> SlotLock {
    let files = RunFiles::at(shared.paths.run_dir(&exit.run_id));
    let mut lock = SlotLock::new(&exit.slot, &exit.provider, exit.issue, exit.cwd.clone(), exit.prompt_file.clone());
    lock.task_id = exit.task_id.clone();
    lock.next_run(exit.run_id.clone(), &files.dir, "", 0);
    if !exit.runs.is_empty() {
        lock.runs = exit.runs.clone();
    }
    let cause = exit.end_cause.unwrap_or(if exit.state == "completed" { EndCause::Succeeded } else { EndCause::Lost });
    lock.phase = Phase::Ended { cause, reason: exit.reason.clone(), exit_code: exit.exit_code };
    lock.session_id = exit.session_id.clone();
    (lock.started_at, lock.run_started_at) = (exit.started_at.clone(), exit.started_at.clone());
    (lock.worktree, lock.branch) = (exit.worktree.clone(), exit.branch.clone());
    lock
}

/// What a lockfile comes to at start-up.
#[derive(Debug, PartialEq)]
enum Settle {
    /// Waiting: woken at the time it waits for (at once, if that passed while autodevd was down).
    Wait(Option<SystemTime>),
    /// Abandoned before, and still.
    StayAbandoned,
    /// The run's process lives and is provably the run's.
    Adopt(u32),
    /// The run ended and says how: its exit record, or its final event (a run that finished while autodevd was
    /// down is never run again).
    Ended(Verdict),
    /// An abandoned task whose end (release, give-up) was recorded just before a crash.
    Released { done: bool },
    /// Gone, and nothing says how it ended.
    Dead(String),
}

/// The facts recovery looks at.
struct Facts<'a> {
    phase: &'a Phase,
    exit: Option<&'a ExitRecord>,
    /// The run's leader, alive and proven to be the run's.
    leader: Option<u32>,
    same_boot: bool,
    pid: Option<u32>,
    /// The pid now names another process (its start time differs).
    pid_reused: bool,
}

/// The recovery decision, from facts only. `final_event` is read only when it is needed (a dead run).
fn settle(f: &Facts, format: EventFormat, final_event: impl FnOnce() -> Option<Outcome>) -> Settle {
    let exit_verdict = |exit: &ExitRecord| Verdict {
        cause: exit.end_cause.unwrap_or(if exit.state == "completed" { EndCause::Succeeded } else { EndCause::Lost }),
        reason: exit.reason.clone(),
        exit_code: exit.exit_code,
        resets_at: None,
    };
    match (f.phase, f.exit) {
        (Phase::Waiting { until, .. }, _) => return Settle::Wait(*until),
        (Phase::Abandoned { .. }, Some(exit)) if exit.state != "abandoned" => {
            let done = exit.end_cause == Some(EndCause::Succeeded);
            return Settle::Released { done };
        }
        (Phase::Abandoned { .. } | Phase::Ended { .. } | Phase::Queued, _) => return Settle::StayAbandoned,
        (_, Some(exit)) if exit.state == "abandoned" => return Settle::StayAbandoned,
        (_, Some(exit)) => return Settle::Ended(exit_verdict(exit)),
        (Phase::Starting | Phase::Running { .. }, None) => {}
    }
    if let Some(pid) = f.leader {
        return Settle::Adopt(pid);
    }
    if let Some(outcome) = final_event() {
        return Settle::Ended(verdict(format, &Ok(ExitInfo::Unknown), Some(&outcome), None));
    }
    Settle::Dead(match f.pid {
        _ if !f.same_boot => "the machine restarted while the run was going".into(),
        None => "autodevd stopped before the run's process was recorded".into(),
        Some(pid) if f.pid_reused => {
            format!("process {pid} ended while autodevd was not running (the pid now names another process)")
        }
        Some(pid) => format!("process {pid} ended while autodevd was not running"),
    })
}

/// How one lockfile settled.
enum Settled {
    Running,
    Abandoned,
    Other,
}

/// Settles one lockfile. Returns how, or a warning.
async fn recover_one(
    shared: &Arc<Shared>,
    mut lock: SlotLock,
    recorded: Option<(String, Option<EndCause>)>,
) -> Result<Settled, String> {
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
    let exit = std::fs::read(files.exit_record())
        .ok()
        .and_then(|bytes| ledger::parse_exit_record(&bytes).ok())
        .filter(|e| e.run_id == lock.run_id);
    let same_boot = lock.boot_id == shared.boot_id;
    // The run's cgroup is found from its id under our base, never taken from the file: a lockfile written by an
    // autodevd that did not record it (an older version) still gets its live run adopted, not swept away.
    if let Ok(cgroups) = &shared.cgroups {
        let found = cgroups.run(&lock.run_id);
        lock.cgroup = found.exists().then_some(found.path);
    }
    let cgroup = shared.run_cgroup(&lock).filter(|_| same_boot);
    // Leftovers of the run (its grandchildren, say) still hold the run lock or sit in its cgroup: they are
    // provably ours.
    let leftovers = same_boot && supervisor::run_lock_held(&run_lock);
    let leader = match (&lock.phase, &exit) {
        (Phase::Starting | Phase::Running { .. }, None) if same_boot => {
            live_leader(&mut lock, &run_lock, leftovers, cgroup.as_ref())
        }
        _ => None,
    };
    let pid_reused = lock
        .pid
        .and_then(|p| supervisor::proc_stat(p as i32))
        .is_some_and(|s| s.state != 'Z' && Some(s.start_time) != lock.start_time);
    let facts = Facts { phase: &lock.phase, exit: exit.as_ref(), leader, same_boot, pid: lock.pid, pid_reused };
    let decision = settle(&facts, format, || scan_outcome(&files.stdout(), format).ok().flatten());
    if let Settle::Adopt(pid) = decision {
        match supervisor::adopt(pid as i32) {
            Ok(child) => return adopt(shared, lock, child, format, &files),
            Err(e) => tracing::warn!(slot = %lock.slot, pid, "cannot watch the run's process: {e}"),
        }
    }
    if let Some(cgroup) = &cgroup {
        let n = cgroup.stop(shared.grace).await;
        if n > 0 {
            tracing::info!(slot = %lock.slot, "stopped {n} leftover process(es) in the cgroup of a run that is over");
        }
        if let Err(e) = cgroup.remove() {
            tracing::warn!(slot = %lock.slot, "cannot remove the cgroup {}: {e}", cgroup.path.display());
        }
    }
    if leftovers {
        let n = supervisor::clear_lock_holders(&run_lock, None, shared.grace).await;
        tracing::info!(slot = %lock.slot, "stopped {n} leftover process(es) of a run that is over");
    }
    let slot = lock.slot.clone();
    let mut task = Task::idle(lock);
    task.recorded_as = recorded;
    task.run_started_at = parse_rfc3339(&task.record.run_started_at).unwrap_or(SystemTime::UNIX_EPOCH);
    if let Some(exit) = &exit {
        task.exit = exit.exit_code.map(ExitInfo::Code);
        (task.cost_usd, task.turns) = (exit.cost_usd, exit.turns);
        task.ended_at = parse_rfc3339(&exit.ended_at);
    }
    let run_id = task.record.run_id.clone();
    install(shared, task);
    let event = match decision {
        Settle::Wait(until) => {
            tracing::info!(
                slot,
                "still waiting; goes on at {}",
                until.map(crate::timefmt::rfc3339).unwrap_or_default()
            );
            if let Some(until) = until {
                wake_at(shared, &slot, &run_id, until);
            }
            return Ok(Settled::Other);
        }
        Settle::StayAbandoned => return Ok(Settled::Abandoned),
        Settle::Adopt(_) => Event::FoundDead { reason: "the run's process could not be watched".into() },
        Settle::Dead(reason) => {
            tracing::warn!(slot, "abandoned: {reason}");
            Event::FoundDead { reason }
        }
        Settle::Ended(v) => {
            tracing::info!(slot, cause = v.cause.as_str(), "the run ended while autodevd was down");
            Event::RunEnded(v)
        }
        Settle::Released { done } => Event::Release { done },
    };
    drive(shared, &slot, event).map_err(|e| format!("slot {slot}: {e}"))?;
    let state = shared.lock_table().get(&slot).map(|s| s.state());
    Ok(match state {
        Some(crate::protocol::SlotState::Abandoned) => Settled::Abandoned,
        _ => Settled::Other,
    })
}

/// The pid of the run's leader if it is alive and provably the process the lockfile names: same pid, same start
/// time, same boot, leading its group, and proof that it is the run's: the run lock held, or the run's id in its
/// environment (a CLI may close the descriptors it inherited). A lockfile written before the pid was known is
/// matched through the run lock: the holder that leads its own process group is the leader.
fn live_leader(lock: &mut SlotLock, run_lock: &Path, leftovers: bool, cgroup: Option<&RunCgroup>) -> Option<u32> {
    match lock.pid {
        Some(pid) => {
            let stat = supervisor::proc_stat(pid as i32)?;
            let same = stat.state != 'Z' && Some(stat.start_time) == lock.start_time && stat.pgrp == pid as i32;
            let proven = leftovers
                || cgroup.is_some_and(|c| c.contains(pid as i32))
                || supervisor::started_with_env(pid as i32, "AUTODEV_RUN", &lock.run_id);
            (same && proven).then(|| {
                lock.pgid = Some(pid);
                pid
            })
        }
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
    format: EventFormat,
    files: &RunFiles,
) -> Result<Settled, String> {
    let wake = Wake::arm(shared, vec![files.stdout(), files.stderr()]);
    // The lockfile already tells the truth about this run; it is rewritten when something changes (session id,
    // the end), not here. A run adopted while it was starting is running now.
    if lock.phase == Phase::Starting {
        lock.phase = Phase::Running { stale: false, stop: None };
    }
    tracing::info!(slot = %lock.slot, issue = lock.issue, pid = child.pid, "adopted a run that outlived autodevd");
    let run_id = lock.run_id.clone();
    let mut task = Task::starting(lock);
    task.adopted = true;
    task.run_started_at = parse_rfc3339(&task.record.run_started_at).unwrap_or_else(SystemTime::now);
    install(shared, task);
    runs::follow(shared, run_id, format, child, wake, None);
    Ok(Settled::Running)
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
    let policy = shared.config.raw.supervisor.on_abandoned;
    for slot in abandoned {
        let (reason, restarts) = {
            let table = shared.lock_table();
            let Some(task) = table.get(&slot).and_then(|s| s.task.as_ref()) else { continue };
            (task.record.phase.reason().unwrap_or("abandoned").to_string(), task.record.restarts.clone())
        };
        match policy {
            OnAbandoned::Ask => {}
            OnAbandoned::Fail => {
                let reason = format!("{reason}; failed by policy onAbandoned=fail");
                if let Err(e) = drive(shared, &slot, Event::GiveUp { reason }) {
                    tracing::warn!(slot, "{e}");
                }
            }
            OnAbandoned::Resume if !shared.policy.allowance.allows(&restarts, SystemTime::now()) => {
                let allowance = shared.policy.allowance;
                let why = format!(
                    "{reason}; not resumed automatically: {} automatic restarts in {} already (resume it by hand)",
                    allowance.count,
                    crate::timefmt::short_duration(allowance.per.as_secs())
                );
                tracing::warn!(slot, "{why}");
                // Said in status only: the same facts give the same verdict at the next start.
                let _ = drive(shared, &slot, Event::FoundDead { reason: why });
            }
            OnAbandoned::Resume => {
                match super::handle::resume(shared, &slot, super::handle::ResumeBy::Policy { counted: true }).await {
                    Ok(_) => tracing::info!(slot, "resumed automatically (onAbandoned=resume)"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::StopBy;

    fn exit(state: &str, cause: Option<EndCause>) -> ExitRecord {
        ledger::parse_exit_record(
            serde_json::json!({
                "version": 2, "run_id": "R", "slot": "claude-1", "issue": 1, "state": state, "end_cause": cause,
                "reason": "r", "exit_code": 1, "signal": null, "started_at": "", "ended_at": "", "duration_secs": 1,
                "session_id": null, "cost_usd": null, "turns": null
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    fn success() -> Option<Outcome> {
        crate::provider::parse_line(EventFormat::Claude, r#"{"type":"result","is_error":false,"result":"ok"}"#).outcome
    }

    #[test]
    fn recovery_decisions() {
        let running = Phase::Running { stale: false, stop: None };
        let stopped_by_user = Phase::Running { stale: false, stop: Some(StopBy::User) };
        let abandoned = Phase::Abandoned { reason: "a".into() };
        let at = SystemTime::UNIX_EPOCH;
        let waiting = Phase::Waiting {
            until: Some(at),
            waiting_for: crate::task::WaitFor::Retry,
            after: EndCause::AgentError,
            reason: "w".into(),
            fallback: false,
        };
        let failed = exit("failed", Some(EndCause::ProviderError));
        let was_abandoned = exit("abandoned", None);
        let released = exit("failed", Some(EndCause::Released));
        let facts =
            |phase, exit, leader, same_boot, pid| Facts { phase, exit, leader, same_boot, pid, pid_reused: false };
        // (facts, final event in the output, expected)
        type Case<'a> = (Facts<'a>, Option<Outcome>, fn(&Settle) -> bool);
        let cases: Vec<Case> = vec![
            (facts(&waiting, None, None, true, Some(5)), None, |s| *s == Settle::Wait(Some(SystemTime::UNIX_EPOCH))),
            (facts(&running, None, Some(5), true, Some(5)), None, |s| *s == Settle::Adopt(5)),
            // Finished while autodevd was down: judged from its final event, never resumed.
            (
                facts(&running, None, None, true, Some(5)),
                success(),
                |s| matches!(s, Settle::Ended(v) if v.cause == EndCause::Succeeded && v.exit_code.is_none()),
            ),
            (
                facts(&running, None, None, true, Some(5)),
                None,
                |s| matches!(s, Settle::Dead(r) if r.contains("process 5 ended")),
            ),
            (
                facts(&running, None, None, false, Some(5)),
                None,
                |s| matches!(s, Settle::Dead(r) if r.contains("machine restarted")),
            ),
            (
                facts(&running, None, None, true, None),
                None,
                |s| matches!(s, Settle::Dead(r) if r.contains("before the run's process")),
            ),
            (
                facts(&running, Some(&failed), None, true, Some(5)),
                None,
                |s| matches!(s, Settle::Ended(v) if v.cause == EndCause::ProviderError),
            ),
            (facts(&running, Some(&was_abandoned), None, true, Some(5)), None, |s| *s == Settle::StayAbandoned),
            (facts(&stopped_by_user, None, None, true, Some(5)), None, |s| matches!(s, Settle::Dead(_))),
            (facts(&abandoned, None, None, true, Some(5)), success(), |s| *s == Settle::StayAbandoned),
            (facts(&abandoned, Some(&released), None, true, Some(5)), None, |s| *s == Settle::Released { done: false }),
        ];
        for (i, (f, event, expected)) in cases.into_iter().enumerate() {
            let got = settle(&f, EventFormat::Claude, || event);
            assert!(expected(&got), "case {i}: {got:?}");
        }
    }
}
