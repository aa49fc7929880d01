//! Spawn and follow: start a run (new, resumed or restarted) in a slot its task holds, follow its output into the
//! preview, and judge its outcome when it exits; the verdict goes to the task's state machine (`life::drive`).
//!
//! Lockfile order: written before the child can do any work, rewritten once the pid (and later the session id) is
//! known; what happens to it at the end is `life`'s to decide.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use super::Shared;
use super::life::drive;
use crate::ledger::{self, RECORD_VERSION, RUN_LOCK, RunFiles, RunRecord, SlotLock};
use crate::output::{FileFollower, Findings, Preview, render_tail, scan_outcome};
use crate::protocol::refuse;
use crate::protocol::{Assigned, ErrorKind, ErrorReply, SlotState};
use crate::provider::{EventFormat, LaunchContext, Provider};
use crate::supervisor::{self, Child, SpawnError, SpawnSpec};
use crate::task::{EndCause, Event, Verdict};
use crate::timefmt::rfc3339;

/// Under a flood, followers read at most this often; a quiet run is read as soon as it writes.
const BATCH_INTERVAL: Duration = Duration::from_millis(25);
/// A batch this large means the run floods: read on the batch timer instead of per-write notifications.
const FLOOD_BATCH: u64 = 64 << 10;
/// How long a usage limit is assumed to last when the CLI does not say.
const RATE_LIMIT_GUESS: Duration = crate::task::USAGE_LIMIT_GUESS;

/// How a run continues its task.
pub(super) enum RunKind {
    /// A new conversation with the task's prompt.
    New,
    /// The same conversation, with a continuation prompt.
    Resume(String),
    /// No session was captured: a new conversation with the original prompt.
    Restart,
}

/// Why a run did not start.
pub(super) enum Refused {
    /// Nothing was written or run (the disk is full, autodevd is stopping): the caller puts the task back as it was.
    NotStarted(ErrorReply),
    /// The attempt is recorded: the task ended with its cause (the CLI is missing, say).
    Ended(ErrorReply),
}

impl From<Refused> for ErrorReply {
    fn from(r: Refused) -> ErrorReply {
        match r {
            Refused::NotStarted(e) | Refused::Ended(e) => e,
        }
    }
}

/// Starts the run the slot's task record names (phase `starting`).
pub(super) async fn start_run(
    shared: &Arc<Shared>,
    slot: &str,
    kind: RunKind,
    prompt: &str,
) -> Result<Assigned, Refused> {
    let reserved = {
        let table = shared.lock_table();
        table.get(slot).and_then(|s| Some((table.providers[s.provider].clone(), s.task.as_ref()?.record.clone())))
    };
    // Nothing takes a starting slot away; should that ever change, this is an error, not a ghost "starting" slot.
    let Some((provider, mut record)) = reserved else {
        return Err(Refused::NotStarted(refuse(
            ErrorKind::Failed,
            format!("slot {slot} lost its reservation before the run started"),
            None,
        )));
    };
    if shared.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
        let reason = "autodevd is shutting down; assign or resume again once it is back".to_string();
        return Err(Refused::NotStarted(refuse(ErrorKind::Failed, reason, None)));
    }
    // The claim was taken before the worktree was made (which may take a while): still ours, lease in force?
    if let Some(fleet) = &shared.fleet
        && !fleet.still_holds(record.issue, record.claim.as_deref())
    {
        let reason = format!(
            "the fleet's claim on issue #{} is no longer held here, or this machine's lease ran out meanwhile",
            record.issue
        );
        return Err(Refused::NotStarted(refuse(ErrorKind::Conflict, reason, None)));
    }
    let note = matches!(kind, RunKind::Restart)
        .then(|| "no session was captured for this task: restarted it with its original prompt".to_string());
    match launch(shared, &provider, &mut record, prompt, &kind) {
        Ok(started) => {
            let reply = Assigned {
                slot: slot.to_string(),
                issue: record.issue,
                run_id: record.run_id.clone(),
                pid: started.child.pid as u32,
                session_id: record.session_id.clone(),
                cwd: record.cwd.display().to_string(),
                note,
            };
            let run_id = record.run_id.clone();
            if let Some(task) = shared.lock_table().task_of_run(&run_id) {
                task.record = record;
            }
            tracing::info!(slot, issue = reply.issue, run = %run_id, pid = reply.pid, "run started");
            if let Err(e) = drive(shared, slot, Event::Spawned) {
                tracing::error!(slot, "{e}");
            }
            super::health::sample_new_run(shared, &run_id);
            follow(shared, run_id, provider.format, started.child, started.wake, Some(started.run_lock));
            Ok(reply)
        }
        Err(Launch::DiskFull(reason)) => {
            tracing::warn!(slot, issue = record.issue, "run could not start: {reason}");
            Err(Refused::NotStarted(refuse(
                ErrorKind::Failed,
                reason,
                Some("free some disk space and try again".into()),
            )))
        }
        Err(Launch::Failed(verdict)) => {
            let reason = verdict.reason.clone().unwrap_or_default();
            tracing::warn!(slot, issue = record.issue, "run could not start: {reason}");
            if let Err(e) = drive(shared, slot, Event::SpawnFailed(verdict)) {
                tracing::error!(slot, "{e}");
            }
            Err(Refused::Ended(refuse(ErrorKind::Failed, reason, None)))
        }
    }
}

/// Starts following a run (ours or adopted) on its own task, and makes sure a bug there cannot leave a ghost.
pub(super) fn follow(
    shared: &Arc<Shared>,
    run_id: String,
    format: EventFormat,
    child: Child,
    wake: Wake,
    run_lock: Option<std::fs::File>,
) {
    // Read once at the start: an adopted run's preview continues from its log at once.
    wake.notify.notify_one();
    let follower = tokio::spawn(follow_run(shared.clone(), run_id.clone(), format, child, wake, run_lock));
    tokio::spawn(fail_run_if_follower_dies(shared.clone(), run_id, follower));
}

struct Started {
    child: Child,
    wake: Wake,
    /// Our descriptor of the run lock; the child holds another.
    run_lock: std::fs::File,
}

/// The follower's wake-up: inotify watches on the run's output files, dropped while the run floods (every watched
/// write(2) costs the writer a notification in the kernel) and re-armed once it is quiet.
pub(super) struct Wake {
    notify: Arc<Notify>,
    paths: Vec<PathBuf>,
    watches: Vec<inotify::WatchDescriptor>,
    /// A failed re-arm is said once, not every batch.
    warned: bool,
}

impl Wake {
    /// Watches the run's files. Without inotify watches (the per-user limit reached) the follower reads on its
    /// batch timer instead: a run is never left unwatched.
    pub(super) fn arm(shared: &Shared, paths: Vec<PathBuf>) -> Wake {
        let mut wake = Wake { notify: Arc::new(Notify::new()), paths, watches: Vec::new(), warned: false };
        if let Err(e) = wake.rearm(shared) {
            tracing::warn!("{e}; reading on a timer instead");
            wake.warned = true;
        }
        wake
    }

    fn is_armed(&self) -> bool {
        !self.watches.is_empty()
    }

    fn rearm(&mut self, shared: &Shared) -> Result<(), String> {
        let mut failure = None;
        for path in &self.paths {
            match shared.watcher.watch(path, self.notify.clone()) {
                Ok(wd) => self.watches.push(wd),
                Err(e) => {
                    failure = Some(format!(
                        "cannot watch {} for output: {e} (raise fs.inotify.max_user_watches?)",
                        path.display()
                    ));
                    break;
                }
            }
        }
        match failure {
            Some(message) => {
                self.disarm(shared);
                Err(message)
            }
            None => Ok(()),
        }
    }

    fn disarm(&mut self, shared: &Shared) {
        self.watches.drain(..).for_each(|wd| shared.watcher.unwatch(wd));
    }
}

/// Why a launch failed.
enum Launch {
    /// autodev's own files could not be written: nothing was started or recorded.
    DiskFull(String),
    /// The CLI could not be started: the run ends with this verdict.
    Failed(Verdict),
}

/// Prepares the run directory, writes the lockfile, and spawns the CLI.
fn launch(
    shared: &Shared,
    provider: &Provider,
    record: &mut SlotLock,
    prompt: &str,
    kind: &RunKind,
) -> Result<Started, Launch> {
    let disk = |what: &str, e: std::io::Error| {
        let reason = format!("cannot {what} in {}: {e}", shared.paths.state_dir.display());
        if ledger::is_disk_full(&e) {
            shared.note_disk_full(&e);
            Launch::DiskFull(reason)
        } else {
            Launch::Failed(Verdict::new(EndCause::SpawnFailed, reason))
        }
    };
    let files =
        RunFiles::create(&shared.paths.runs_dir(), &record.run_id).map_err(|e| disk("create the run directory", e))?;
    ledger::write_atomic(&files.prompt(), prompt.as_bytes()).map_err(|e| disk("write the prompt", e))?;
    for path in [files.stdout(), files.stderr()] {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| disk("create the output files", e))?;
    }
    let prompt_file = files.prompt();
    let ctx = LaunchContext { prompt, prompt_file: &prompt_file, issue: record.issue, slot: &record.slot };
    let launch = match kind {
        RunKind::Resume(session) => provider.launch_resume(&ctx, session),
        RunKind::New | RunKind::Restart => provider.launch_new(&ctx),
    };
    if launch.session_id.is_some() {
        record.session_id = launch.session_id.clone();
    }
    record.program = launch.program.clone();
    record.args = launch.args.clone();
    let env = agent_env(
        shared,
        provider,
        &[
            ("AUTODEV_SLOT", record.slot.clone()),
            ("AUTODEV_ISSUE", record.issue.to_string()),
            ("AUTODEV_RUN", record.run_id.clone()),
            ("AUTODEV_TASK", record.task_id.clone()),
            ("AUTODEV_SOCKET", shared.paths.socket().display().to_string()),
            ("AUTODEV_RUNTIME_DIR", shared.paths.runtime_dir.display().to_string()),
        ],
    );
    let mut run_record = RunRecord {
        version: RECORD_VERSION,
        run_id: record.run_id.clone(),
        slot: record.slot.clone(),
        provider: provider.name.clone(),
        issue: record.issue,
        program: launch.program.clone(),
        args: launch.args.clone(),
        cwd: record.cwd.clone(),
        prompt_on_stdin: launch.prompt_on_stdin,
        session_id: record.session_id.clone(),
        started_at: record.run_started_at.clone(),
        pid: None,
        daemon_pid: shared.daemon_pid,
    };
    ledger::write_json(&files.record(), &run_record).map_err(|e| disk("write the run record", e))?;
    let cgroup = join_cgroup(shared, provider, record);
    // Nothing runs in the cgroup if the launch stops before the spawn.
    let unjoin = |record: &SlotLock| {
        if let Some(made) = shared.run_cgroup(record) {
            let _ = made.remove();
        }
    };
    // The lockfile exists before the child can do anything: a crash from here on finds the task.
    shared.write_lock(record).map_err(|e| {
        unjoin(record);
        disk("write the slot's lockfile", e)
    })?;
    let run_lock = supervisor::create_run_lock(&files.dir.join(RUN_LOCK)).map_err(|e| {
        unjoin(record);
        disk("create the run lock", e)
    })?;

    let mut wake = Wake::arm(shared, vec![files.stdout(), files.stderr()]);
    let spawned = supervisor::spawn(&SpawnSpec {
        program: &launch.program,
        args: &launch.args,
        cwd: &record.cwd,
        env: &env,
        stdin: launch.prompt_on_stdin.then_some(prompt_file.as_path()),
        stdout: &files.stdout(),
        stderr: &files.stderr(),
        run_lock: Some(&run_lock),
        cgroup: cgroup.as_ref(),
    });
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            wake.disarm(shared);
            let name = &provider.name;
            let program = &launch.program;
            let (cause, reason) = match e {
                SpawnError::NotFound => (
                    EndCause::CliMissing,
                    format!("{name}: command not found (cliPath {program:?}) — install it or set llms.{name}.cliPath"),
                ),
                SpawnError::NoInterpreter(interpreter) => (
                    EndCause::CliMissing,
                    format!(
                        "{name}: {program:?} is a script whose interpreter {interpreter} (from its #! line) is not \
                         found — install it, or fix llms.{name}.cliPath"
                    ),
                ),
                SpawnError::IsDirectory => (
                    EndCause::CliMissing,
                    format!("{name}: cliPath {program:?} is a directory, not a program — fix llms.{name}.cliPath"),
                ),
                SpawnError::NotExecutable => (
                    EndCause::CliMissing,
                    format!(
                        "{name}: {program:?} cannot be run: permission denied — make it executable or fix \
                         llms.{name}.cliPath"
                    ),
                ),
                SpawnError::NoWorkingDir(dir) => (
                    EndCause::SpawnFailed,
                    format!(
                        "{name}: working directory {} does not exist — create it or fix workspace.dir",
                        dir.display()
                    ),
                ),
                SpawnError::Io(e) => (EndCause::SpawnFailed, format!("{name}: cannot start {program:?}: {e}")),
            };
            unjoin(record);
            return Err(Launch::Failed(Verdict::new(cause, reason)));
        }
    };
    if let Some(joined) = shared.run_cgroup(record)
        && !joined.contains(child.pid)
    {
        tracing::warn!(
            slot = %record.slot,
            "the run could not join its cgroup {} (permissions?); it is contained by its process group only",
            joined.path.display()
        );
        record.cgroup = None;
        let _ = joined.remove();
    }
    record.pid = Some(child.pid as u32);
    record.pgid = Some(child.pid as u32);
    record.start_time = supervisor::proc_stat(child.pid).map(|s| s.start_time);
    // The lockfile gets the pid with the `spawned` event (a record that lags behind is a smaller loss than killing
    // the run: recovery finds a run without a pid through its run lock).
    run_record.pid = record.pid;
    if let Err(e) = ledger::write_json(&files.record(), &run_record) {
        tracing::warn!(run = %record.run_id, "cannot record the pid of the run: {e}");
    }
    Ok(Started { child, wake, run_lock })
}

/// The environment an agent of `provider` gets (and the git its work is committed with): the clean base, the user's
/// git identity (first, so `llms.<name>.env` may override it), the provider's variables, then `autodev_vars`.
fn agent_env(shared: &Shared, provider: &Provider, autodev_vars: &[(&str, String)]) -> Vec<(String, String)> {
    let mut config_env = shared.git_identity().clone();
    config_env.extend(provider.config_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    supervisor::child_env(&provider.passthrough_env, &config_env, autodev_vars)
}

/// Makes the run's cgroup and opens its `cgroup.procs` for the child to join; records it in the task. Without one
/// (no cgroup containment, or it cannot be made) the run is contained by its process group and run lock.
fn join_cgroup(shared: &Shared, provider: &Provider, record: &mut SlotLock) -> Option<std::fs::File> {
    let cgroups = shared.cgroups.as_ref().ok()?;
    let cgroup = cgroups.run(&record.run_id);
    let opened = cgroup.create(&provider.limits).and_then(|unapplied| {
        for limit in unapplied {
            tracing::warn!(slot = %record.slot, "limit of llms.{}.limits not applied: {limit}", provider.name);
        }
        cgroup.procs_for_joining()
    });
    match opened {
        Ok(procs) => {
            record.cgroup = Some(cgroup.path);
            Some(procs)
        }
        Err(e) => {
            tracing::warn!(slot = %record.slot, "cannot make the run's cgroup {}: {e}; process group only", cgroup.path.display());
            let _ = cgroup.remove();
            None
        }
    }
}

/// Follows a run until it exits, then judges, records and frees (or keeps) the slot.
async fn follow_run(
    shared: Arc<Shared>,
    run_id: String,
    format: EventFormat,
    child: Child,
    mut wake: Wake,
    run_lock: Option<std::fs::File>,
) {
    let files = RunFiles::at(shared.paths.run_dir(&run_id));
    let keep = shared.preview_lines * 2 + 8;
    let mut preview = Preview::new(shared.preview_lines, shared.preview_chars);
    let mut findings = Findings::default();
    let mut followers: Vec<FileFollower> = [
        (files.stdout(), FileFollower::open(&files.stdout(), format, keep)),
        (files.stderr(), FileFollower::open_marked(&files.stderr(), keep, crate::protocol::STDERR_MARK)),
    ]
    .into_iter()
    .filter_map(|(path, opened)| {
        opened.inspect_err(|e| tracing::warn!(run = %run_id, "cannot follow {}: {e}", path.display())).ok()
    })
    .collect();
    let mut read_all = |preview: &mut Preview, findings: &mut Findings| {
        for f in followers.iter_mut() {
            if let Err(e) = f.read_new(preview, findings) {
                tracing::warn!(run = %run_id, "reading output failed: {e}");
            }
        }
    };

    let exit = loop {
        if wake.is_armed() {
            tokio::select! {
                biased;
                exit = child.wait_exit() => break exit,
                () = wake.notify.notified() => {}
            }
        }
        read_all(&mut preview, &mut findings);
        let batch = findings.new_bytes;
        publish(&shared, &run_id, &preview, &mut findings);
        if batch >= FLOOD_BATCH && wake.is_armed() {
            wake.disarm(&shared);
        } else if batch == 0 && !wake.is_armed() {
            match wake.rearm(&shared) {
                // Output written before the watch was back raised no event: look once more.
                Ok(()) => wake.notify.notify_one(),
                Err(e) if !wake.warned => {
                    wake.warned = true;
                    tracing::warn!(run = %run_id, "{e}; reading on a timer instead");
                }
                Err(_) => {}
            }
        }
        // Coalesce a flood into a bounded number of reads; an exit is still seen at once.
        tokio::select! {
            biased;
            exit = child.wait_exit() => break exit,
            () = tokio::time::sleep(BATCH_INTERVAL) => {}
        }
    };

    let pgid = child.pid;
    let cgroup = shared.lock_table().task_of_run(&run_id).and_then(|t| shared.run_cgroup(&t.record));
    let mut oom = None;
    if let Some(cgroup) = &cgroup {
        // The leader is gone; whatever it left in its cgroup (daemons that called setsid and closed their
        // descriptors too) goes with it: a run has ended only when its cgroup is empty.
        let left = cgroup.pids().len();
        if left > 0 {
            tracing::info!(run = %run_id, "stopping {left} process(es) the run left behind");
        }
        cgroup.stop(shared.grace).await;
        if cgroup.oom_killed() {
            oom = Some(cgroup.memory_max().unwrap_or_else(|| "?".into()));
        }
        if let Err(e) = cgroup.remove() {
            tracing::warn!(run = %run_id, "cannot remove the run's cgroup {}: {e}", cgroup.path.display());
        }
    }
    if child.is_ours() {
        // Our leader is gone but still unreaped, so its group id is ours: clear what is left of the tree (in a
        // cgroup, that was done above).
        if cgroup.is_none() {
            supervisor::clear_group(pgid, shared.grace).await;
        }
    } else if let Some(task) = shared.lock_table().task_of_run(&run_id) {
        // An adopted leader was reaped by someone else: its group id is no longer provably ours.
        task.group_released = true;
    }
    // Whatever left the group (setsid, a daemonizing tool) but still holds the run lock is the run's too.
    drop(run_lock);
    let lock_path = files.dir.join(RUN_LOCK);
    if supervisor::run_lock_held(&lock_path) {
        let n = supervisor::clear_lock_holders(&lock_path, None, shared.grace).await;
        tracing::info!(run = %run_id, "stopped {n} process(es) of the run outside its process group");
    }
    read_all(&mut preview, &mut findings);
    for f in followers.iter_mut() {
        f.finish(&mut preview, &mut findings);
    }
    publish(&shared, &run_id, &preview, &mut findings);
    let outcome = match findings.outcome.take() {
        Some(o) => Some(o),
        None => scan_outcome(&files.stdout(), format).unwrap_or(None),
    };
    let last_stderr = render_tail(&files.stderr(), EventFormat::Text, 1, shared.preview_chars)
        .ok()
        .and_then(|(lines, _)| lines.into_iter().next());
    let exit = exit.map_err(|e| e.to_string());
    let mut verdict = crate::task::verdict(format, &exit, outcome.as_ref(), last_stderr.as_deref());
    // Only a run that died of a kill says the OOM killer: one of its tools killed an hour ago does not make a
    // usage limit or a bad key into an OOM kill.
    if let Some(max) = oom
        && matches!(verdict.cause, EndCause::Killed | EndCause::Lost)
    {
        verdict = Verdict::new(
            EndCause::Killed,
            format!("killed by the kernel's OOM killer: the run reached its memory limit (memory.max {max})"),
        );
    }
    // What the agent said of its end (a question, blocked) decides it: its work is not up for review yet.
    let said_end = shared
        .lock_table()
        .task_of_run(&run_id)
        .is_some_and(|t| t.record.signal.as_ref().is_some_and(|s| s.decides_end()));
    if verdict.cause == EndCause::Succeeded && !said_end {
        if shared.config.raw.push.commit_leftovers {
            commit_leftovers(&shared, &run_id, &mut verdict).await;
        }
        if verdict.cause == EndCause::Succeeded {
            judge_changes(&shared, &run_id, &mut verdict).await;
        }
        if verdict.cause == EndCause::Succeeded && shared.push_enabled() {
            // A push is a write for the issue too: only while the fleet's claim is ours.
            match super::fleet::may_push(&shared, &run_id).await {
                Ok(()) => push_branch(&shared, &run_id, &mut verdict).await,
                Err(why) => fail_verdict(&mut verdict, EndCause::ClaimLost, format!("not pushed: {why}")),
            }
        }
    }
    let slot = {
        let mut table = shared.lock_table();
        let slot = table.slots.iter().find(|s| s.task.as_ref().is_some_and(|t| t.record.run_id == run_id));
        let pricing = slot.and_then(|s| table.providers[s.provider].pricing);
        let name = slot.map(|s| s.name.clone());
        if let Some(task) = table.task_of_run(&run_id) {
            task.exit = exit.ok();
            task.group_released = true;
            if let Some(o) = &outcome {
                task.usage = o.usage.or(task.usage);
                task.turns = o.turns;
                (task.cost_usd, task.cost_estimated) = match o.cost_usd {
                    Some(cost) => (Some(cost), false),
                    None => match (task.usage, pricing) {
                        (Some(usage), Some(pricing)) => (Some(usage.cost(&pricing)), true),
                        _ => (None, false),
                    },
                };
            }
        }
        name
    };
    tracing::info!(run = %run_id, cause = verdict.cause.as_str(), reason = verdict.reason.as_deref().unwrap_or(""), "run ended");
    // Nothing signals the group from here on (group_released is set), so the pid may be freed.
    child.reap();
    wake.disarm(&shared);
    if let Some(slot) = slot
        && let Err(e) = drive(&shared, &slot, Event::RunEnded(verdict))
    {
        tracing::error!(slot, run = %run_id, "{e}");
    }
}

/// After a completed run in a worktree: commits what the agent left uncommitted on the task's branch (the agent may
/// not have been allowed to commit), and says so, or why not, in the run's outcome. The work is never lost either
/// way: what is not committed stays in the worktree.
async fn commit_leftovers(shared: &Shared, run_id: &str, verdict: &mut Verdict) {
    let job = {
        let table = shared.lock_table();
        table.slots.iter().find_map(|s| {
            let r = &s.task.as_ref().filter(|t| t.record.run_id == run_id)?.record;
            let title = r.title.clone().unwrap_or_default();
            let message = format!("autodev: #{} {} ({}, run {})", r.issue, title.trim(), r.slot, r.run_id);
            // The agent's own environment for git and the hooks it runs: never the daemon's secrets.
            // Only a worktree of the task's own: in a shared workspace (worktree.enabled false) what is uncommitted
            // may be a person's work in progress, and the branch checked out is theirs.
            Some((r.worktree.clone()?, message, agent_env(shared, &table.providers[s.provider], &[])))
        })
    };
    let Some((worktree, message, env)) = job else { return };
    let secrets = crate::redact::current().secrets().to_vec();
    let done =
        tokio::task::spawn_blocking(move || crate::workspace::commit_leftovers(&worktree, &message, &secrets, &env))
            .await;
    let said = match done {
        Ok(Ok(leftovers)) => {
            let mut said: Vec<String> = leftovers
                .commit
                .iter()
                .map(|c| format!("autodev committed what the agent left uncommitted ({c})"))
                .collect();
            if !leftovers.left_out.is_empty() {
                said.push(format!("not committed: {}", leftovers.left_out.join(", ")));
            }
            said
        }
        Ok(Err(why)) => return fail_verdict(verdict, EndCause::CommitFailed, why),
        Err(e) => {
            return fail_verdict(verdict, EndCause::CommitFailed, format!("committing the leftovers failed: {e}"));
        }
    };
    if !said.is_empty() {
        tracing::info!(run = %run_id, "{}", said.join("; "));
        let reason = verdict.reason.take().unwrap_or_default();
        verdict.reason = Some(format!("{reason} · {}", said.join(" · ")).trim_start_matches(" · ").to_string());
    }
}

/// The completed run's work is not where it should be: the run ends `cause`, saying why and what the agent said.
fn fail_verdict(verdict: &mut Verdict, cause: EndCause, why: String) {
    tracing::warn!("{why}");
    let said = verdict.reason.take().unwrap_or_default();
    *verdict = Verdict { cause, reason: Some(format!("{why} · the agent said: {said}")), ..verdict.clone() };
}

/// After a completed run with changes: pushes the task's branch (never forced). A refusal ends the run
/// `push_failed` with git's reason; the work stays committed on the local branch.
async fn push_branch(shared: &Shared, run_id: &str, verdict: &mut Verdict) {
    let job = {
        let table = shared.lock_table();
        table.slots.iter().find_map(|s| {
            let r = &s.task.as_ref().filter(|t| t.record.run_id == run_id)?.record;
            let env = agent_env(shared, &table.providers[s.provider], &[]);
            Some((r.worktree.clone()?, r.branch.clone()?, r.base.clone()?, env))
        })
    };
    let Some((worktree, branch, base, env)) = job else { return };
    let remote = shared.config.raw.push.remote.clone();
    let secrets = crate::redact::current().secrets().to_vec();
    let token = shared.github.as_ref().ok().map(|g| g.token.expose().to_string());
    let host = github_host(&shared.config.raw.github.api_url);
    let askpass =
        std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("autodevctl"))).filter(|p| p.exists());
    let pushed = tokio::task::spawn_blocking(move || {
        crate::workspace::push(&crate::workspace::PushJob {
            worktree: &worktree,
            remote: &remote,
            branch: &branch,
            base: &base,
            secrets: &secrets,
            env: &env,
            askpass: match (askpass.as_deref(), token.as_deref(), host.as_deref()) {
                (Some(program), Some(token), Some(host)) => Some((program, token, host)),
                _ => None,
            },
        })
        .map(|()| format!("pushed {branch} to {remote}"))
    })
    .await;
    match pushed {
        Ok(Ok(note)) => tracing::info!(run = %run_id, "{note}"),
        Ok(Err(why)) => fail_verdict(verdict, EndCause::PushFailed, why),
        Err(e) => fail_verdict(verdict, EndCause::PushFailed, format!("the push failed: {e}")),
    }
}

/// The host git pushes to for GitHub: `api.github.com` → `github.com`; an Enterprise server's own host.
fn github_host(api_url: &str) -> Option<String> {
    let host = api_url.parse::<http::Uri>().ok()?.host()?.to_string();
    Some(host.strip_prefix("api.").map(str::to_string).unwrap_or(host))
}

/// A completed run in a worktree whose branch has nothing beyond its base and whose worktree is clean produced
/// nothing to review: it ends `no_changes` (Status → blocked), never silently "done". Notes the counts for `status`.
async fn judge_changes(shared: &Shared, run_id: &str, verdict: &mut Verdict) {
    let job = shared.lock_table().task_of_run(run_id).and_then(|t| {
        let r = &t.record;
        Some((r.worktree.clone()?, r.base.clone()?))
    });
    let Some((worktree, base)) = job else { return };
    let counted = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || crate::workspace::changes(&worktree, &base)).await
    };
    let (commits, dirty) = match counted {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return tracing::warn!(run = %run_id, "cannot count the task's changes: {e}"),
        Err(e) => return tracing::warn!(run = %run_id, "cannot count the task's changes: {e}"),
    };
    let words = shared.lock_table().task_of_run(run_id).and_then(|task| {
        (task.commits, task.changes) = (Some(commits), Some(commits > 0 || dirty));
        task.said.as_deref().map(last_words)
    });
    if commits == 0 && !dirty {
        let summary = verdict.reason.take().unwrap_or_default();
        let said = match words {
            Some(words) => format!("\"{words}\" ({summary})"),
            None => summary,
        };
        *verdict = Verdict::new(
            EndCause::NoChanges,
            format!(
                "no changes were produced: nothing beyond {} and a clean worktree · the agent said: {said}",
                base.get(..12).filter(|_| base.len() == 40).unwrap_or(&base)
            ),
        );
    }
}

/// The agent's last message in one short line, for a reason people read.
fn last_words(said: &str) -> String {
    let line = said.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// A bug in the follower must not leave a ghost "in_progress" slot: if it panics, the run is recorded as failed.
async fn fail_run_if_follower_dies(shared: Arc<Shared>, run_id: String, follower: tokio::task::JoinHandle<()>) {
    if let Err(e) = follower.await {
        tracing::error!(run = %run_id, "the follower of the run died: {e}");
        // Nothing watches the run any more: end it rather than leave an agent working unseen.
        let pid = shared.lock_table().task_of_run(&run_id).and_then(|t| t.record.pid);
        supervisor::clear_lock_holders(&shared.paths.run_dir(&run_id).join(RUN_LOCK), None, shared.grace).await;
        if let Some(pid) = pid {
            supervisor::forget_child(pid as i32);
        }
        let reason = "autodevd lost track of this run (internal error, see its log); it was stopped";
        let slot = shared
            .lock_table()
            .slots
            .iter()
            .find(|s| s.task.as_ref().is_some_and(|t| t.record.run_id == run_id))
            .map(|s| s.name.clone());
        if let Some(slot) = slot {
            if let Some(task) = shared.lock_table().task_of_run(&run_id) {
                task.group_released = true;
            }
            let _ = drive(&shared, &slot, Event::RunEnded(Verdict::new(EndCause::Lost, reason)));
        }
    }
}

/// Copies the follower's view into the slot, under the lock, and wakes `logs -f` readers. A newly seen session id
/// goes into the lockfile at once: it is what a resume needs.
fn publish(shared: &Arc<Shared>, run_id: &str, preview: &Preview, findings: &mut Findings) {
    let mut over_budget = false;
    let (new_session, revived, signals, slot) = {
        let mut table = shared.lock_table();
        // One look for the run's slot per batch: its task, and its LLM's pricing.
        let Some(index) = table.slots.iter().position(|s| s.task.as_ref().is_some_and(|t| t.record.run_id == run_id))
        else {
            return;
        };
        let pricing = table.providers[table.slots[index].provider].pricing;
        let Some(task) = table.slots[index].task.as_mut() else { return };
        if findings.new_bytes == 0
            && findings.session_id.is_none()
            && findings.progress.is_none()
            && findings.rate_limit.is_none()
            && findings.signals.is_empty()
            && !findings.usage_changed
        {
            return;
        }
        if std::mem::take(&mut findings.said_changed) {
            task.said = Some(findings.said.clone());
        }
        if std::mem::take(&mut findings.usage_changed) {
            task.usage = Some(findings.usage);
            // A cost while it runs is tokens × pricing: no CLI reports its cost before the end.
            if let Some(pricing) = pricing {
                (task.cost_usd, task.cost_estimated) = (Some(findings.usage.cost(&pricing)), true);
                over_budget = true;
            }
        }
        let mut revived = false;
        if findings.new_bytes > 0 {
            task.last_output_at = Some(SystemTime::now());
            findings.new_bytes = 0;
            task.preview = preview.lines();
            task.signal.send_modify(|s| s.batches += 1);
            revived = task.state() == SlotState::Stale;
        }
        if let Some(limit) = findings.rate_limit.take() {
            let until = limit.unwrap_or_else(|| SystemTime::now() + RATE_LIMIT_GUESS);
            task.health.rate_limited_until = Some(until);
            tracing::warn!(run = %run_id, "the CLI hit a usage limit; waiting until {}", rfc3339(until));
        }
        if let Some((percent, message)) = findings.progress.take() {
            task.health.progress = Some(percent);
            task.health.progress_message = Some(message);
        }
        let new_session = match (&task.record.session_id, &findings.session_id) {
            (None, Some(found)) if task.is_running() => {
                task.record.session_id = Some(found.clone());
                Some(task.record.clone())
            }
            _ => None,
        };
        let signals = std::mem::take(&mut findings.signals);
        (new_session, revived.then(|| task.record.slot.clone()), signals, task.record.slot.clone())
    };
    shared.changed();
    if let Some(slot) = revived {
        let _ = drive(shared, &slot, Event::Alive);
    }
    if over_budget {
        check_task_budget(shared, &slot, run_id);
    }
    for signal in signals {
        tracing::info!(slot = %slot, "the agent signalled {signal:?}");
        if let Err(e) = drive(shared, &slot, Event::Signal(signal)) {
            tracing::warn!(slot = %slot, "signal: {e}");
        }
    }
    if let Some(record) = new_session
        && let Err(e) = shared.write_lock(&record)
    {
        tracing::error!(run = %run_id, "cannot record the session id in the lockfile: {e}");
    }
}

/// Stops the run of `slot` once its task has spent `budget.perTaskUsd` (its finished runs and this one so far).
fn check_task_budget(shared: &Arc<Shared>, slot: &str, run_id: &str) {
    if shared.config.raw.budget.per_task_usd.is_none() {
        return;
    }
    let over = {
        let table = shared.lock_table();
        let Some(task) = table.get(slot).and_then(|s| s.task.as_ref()) else { return };
        if task.record.run_id != run_id || task.record.phase.stop().is_some() || task.record.over_budget {
            return;
        }
        // The finished runs' costs are read once per run (a few small files), then kept.
        let finished = *task.finished_cost.get_or_init(|| super::budget::finished_runs_cost(shared, task));
        let limit = shared.config.raw.budget.per_task_usd.unwrap_or(f64::MAX);
        let spent = finished + task.cost_usd.unwrap_or(0.0);
        (spent >= limit).then(|| {
            format!(
                "stopped: issue #{} spent ~${spent:.2} of its ${limit:.2} budget (budget.perTaskUsd); `autodevctl \
                 resume {slot} --over-budget` goes on",
                task.issue()
            )
        })
    };
    if let Some(why) = over {
        tracing::warn!(slot, "{why}");
        let _ = drive(shared, slot, Event::StopAsked(crate::task::StopBy::Budget { why }));
    }
}

/// The run directory's stdout or stderr, for `logs`.
pub fn log_path(run_dir: &Path, stderr: bool) -> PathBuf {
    let files = RunFiles::at(run_dir.to_path_buf());
    if stderr { files.stderr() } else { files.stdout() }
}
