//! The life of a run: start it in a reserved slot, follow its output into the preview, judge its outcome when it
//! exits, record it, free the slot; and `stop`, which ends its whole process group.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use tokio::sync::{Notify, watch};

use super::Shared;
use super::slots::{RunSignal, SlotRequest, Task};
use crate::ledger::{self, ExitRecord, RECORD_VERSION, RunFiles, RunRecord};
use crate::output::{FileFollower, Findings, Preview, render_tail, scan_outcome};
use crate::protocol::{Assigned, ErrorKind, ErrorReply, Reply, SlotState};
use crate::provider::{EventFormat, LaunchContext, Outcome, Provider};
use crate::supervisor::{self, Child, ExitInfo, SpawnError, SpawnSpec};
use crate::timefmt::rfc3339;

/// Under a flood, followers read at most this often; a quiet run is read as soon as it writes.
const BATCH_INTERVAL: Duration = Duration::from_millis(25);
/// A batch this large means the run floods: read on the batch timer instead of per-write notifications.
const FLOOD_BATCH: u64 = 64 << 10;
/// How long `stop` waits for a run to finish after SIGKILL before it answers that something is stuck.
const KILL_WAIT: Duration = Duration::from_secs(10);

fn failed(kind: ErrorKind, message: String, hint: Option<String>) -> ErrorReply {
    ErrorReply { kind, message, hint }
}

/// Handles `assign`: reserves a slot, starts the CLI, and starts following it.
pub async fn assign(
    shared: &Arc<Shared>,
    issue: u64,
    llm: Option<&str>,
    slot: Option<&str>,
    prompt: &str,
) -> Result<Reply, ErrorReply> {
    if prompt.trim().is_empty() {
        return Err(failed(ErrorKind::BadRequest, "the prompt is empty".into(), None));
    }
    let run_id = ulid::Ulid::new().to_string();
    let run_files = RunFiles::at(shared.paths.run_dir(&run_id));
    let started_at = SystemTime::now();
    let (slot_name, provider) = {
        let mut table = shared.lock_table();
        let index = table.choose(&SlotRequest { issue, llm, slot })?;
        let provider = table.providers[table.slots[index].provider].clone();
        let slot = &mut table.slots[index];
        slot.task = Some(Task {
            issue,
            run_id: run_id.clone(),
            run_dir: run_files.dir.clone(),
            state: SlotState::Starting,
            reason: None,
            pid: None,
            started_at,
            last_output_at: None,
            ended_at: None,
            session_id: None,
            exit_code: None,
            cost_usd: None,
            turns: None,
            preview: Vec::new(),
            stop_reason: None,
            group_released: false,
            signal: Arc::new(watch::channel(RunSignal::default()).0),
        });
        (slot.name.clone(), provider)
    };
    match launch(shared, &slot_name, &provider, issue, &run_id, prompt, started_at) {
        Ok(started) => {
            let reply = Assigned {
                slot: slot_name.clone(),
                issue,
                run_id: run_id.clone(),
                pid: started.child.pid as u32,
                session_id: started.session_id.clone(),
                cwd: shared.workspace.display().to_string(),
            };
            {
                let mut table = shared.lock_table();
                if let Some(task) = table.task_of_run(&run_id) {
                    task.pid = Some(started.child.pid as u32);
                    task.session_id = started.session_id;
                    task.state = SlotState::InProgress;
                }
            }
            tracing::info!(slot = %slot_name, issue, run = %run_id, pid = started.child.pid, "run started");
            let follower = tokio::spawn(follow_run(
                shared.clone(),
                slot_name,
                run_id.clone(),
                provider.format,
                started.child,
                started.wake,
            ));
            tokio::spawn(fail_run_if_follower_dies(shared.clone(), run_id, follower));
            Ok(Reply::Assigned(reply))
        }
        Err(reason) => {
            tracing::warn!(slot = %slot_name, issue, "run could not start: {reason}");
            let record = finish_task(shared, &run_id, SlotState::Failed, Some(reason.clone()), None, None);
            if let Some(record) = record {
                write_exit_records(shared, &run_files, &record);
            }
            Err(failed(ErrorKind::Failed, reason, None))
        }
    }
}

struct Started {
    child: Child,
    session_id: Option<String>,
    wake: Wake,
}

/// The follower's wake-up: inotify watches on the run's output files, dropped while the run floods (every watched
/// write(2) costs the writer a notification in the kernel) and re-armed once it is quiet.
struct Wake {
    notify: Arc<Notify>,
    paths: Vec<PathBuf>,
    watches: Vec<inotify::WatchDescriptor>,
}

impl Wake {
    fn arm(shared: &Shared, paths: Vec<PathBuf>) -> Result<Wake, String> {
        let mut wake = Wake { notify: Arc::new(Notify::new()), paths, watches: Vec::new() };
        wake.rearm(shared)?;
        Ok(wake)
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

/// Prepares the run directory and spawns the CLI. Errors are the reason shown to the user.
fn launch(
    shared: &Shared,
    slot: &str,
    provider: &Provider,
    issue: u64,
    run_id: &str,
    prompt: &str,
    started_at: SystemTime,
) -> Result<Started, String> {
    let disk = |what: &str, e: std::io::Error| format!("cannot {what} in {}: {e}", shared.paths.state_dir.display());
    let files = RunFiles::create(&shared.paths.runs_dir(), run_id).map_err(|e| disk("create the run directory", e))?;
    ledger::write_atomic(&files.prompt(), prompt.as_bytes()).map_err(|e| disk("write the prompt", e))?;
    for path in [files.stdout(), files.stderr()] {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| disk("create the output files", e))?;
    }
    let prompt_file = files.prompt();
    let launch = provider.launch_new(&LaunchContext { prompt, prompt_file: &prompt_file, issue, slot });
    let env = supervisor::child_env(
        &provider.passthrough_env,
        &provider.config_env,
        &[
            ("AUTODEV_SLOT", slot.to_string()),
            ("AUTODEV_ISSUE", issue.to_string()),
            ("AUTODEV_RUN", run_id.to_string()),
            ("AUTODEV_SOCKET", shared.paths.socket().display().to_string()),
            ("AUTODEV_RUNTIME_DIR", shared.paths.runtime_dir.display().to_string()),
        ],
    );
    let mut record = RunRecord {
        version: RECORD_VERSION,
        run_id: run_id.to_string(),
        slot: slot.to_string(),
        provider: provider.name.clone(),
        issue,
        program: launch.program.clone(),
        args: launch.args.clone(),
        cwd: shared.workspace.clone(),
        prompt_on_stdin: launch.prompt_on_stdin,
        session_id: launch.session_id.clone(),
        started_at: rfc3339(started_at),
        pid: None,
        daemon_pid: shared.daemon_pid,
    };
    ledger::write_json(&files.record(), &record).map_err(|e| disk("write the run record", e))?;

    let mut wake = Wake::arm(shared, vec![files.stdout(), files.stderr()])?;
    let spawned = supervisor::spawn(&SpawnSpec {
        program: &launch.program,
        args: &launch.args,
        cwd: &shared.workspace,
        env: &env,
        stdin: launch.prompt_on_stdin.then_some(prompt_file.as_path()),
        stdout: &files.stdout(),
        stderr: &files.stderr(),
    });
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            wake.disarm(shared);
            let name = &provider.name;
            let program = &launch.program;
            return Err(match e {
                SpawnError::NotFound => {
                    format!("{name}: command not found (cliPath {program:?}) — install it or set llms.{name}.cliPath")
                }
                SpawnError::NotExecutable => format!(
                    "{name}: {program:?} cannot be run: permission denied — make it executable or fix llms.{name}.cliPath"
                ),
                SpawnError::NoWorkingDir(dir) => format!(
                    "{name}: working directory {} does not exist — create it or fix workspace.dir",
                    dir.display()
                ),
                SpawnError::Io(e) => format!("{name}: cannot start {program:?}: {e}"),
            });
        }
    };
    record.pid = Some(child.pid as u32);
    if let Err(e) = ledger::write_json(&files.record(), &record) {
        // The run is going; a missing pid in the record is a smaller loss than killing it.
        tracing::warn!(run = %run_id, "cannot record the pid of the run: {e}");
    }
    Ok(Started { child, session_id: launch.session_id, wake })
}

/// Follows a run until it exits, then judges, records and frees the slot.
async fn follow_run(
    shared: Arc<Shared>,
    slot: String,
    run_id: String,
    format: EventFormat,
    child: Child,
    mut wake: Wake,
) {
    let files = RunFiles::at(shared.paths.run_dir(&run_id));
    let keep = shared.preview_lines * 2 + 8;
    let mut preview = Preview::new(shared.preview_lines, shared.preview_chars);
    let mut findings = Findings::default();
    let mut followers: Vec<FileFollower> = [(files.stdout(), format), (files.stderr(), EventFormat::Text)]
        .iter()
        .filter_map(|(path, format)| {
            FileFollower::open(path, *format, keep)
                .inspect_err(|e| tracing::warn!(run = %run_id, "cannot follow {}: {e}", path.display()))
                .ok()
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
        publish(&shared, &run_id, &preview, &mut findings, false);
        if batch >= FLOOD_BATCH && wake.is_armed() {
            wake.disarm(&shared);
        } else if batch == 0 && !wake.is_armed() {
            match wake.rearm(&shared) {
                // Output written before the watch was back raised no event: look once more.
                Ok(()) => wake.notify.notify_one(),
                Err(e) => tracing::warn!(run = %run_id, "{e}; reading on a timer instead"),
            }
        }
        // Coalesce a flood into a bounded number of reads; an exit is still seen at once.
        tokio::select! {
            biased;
            exit = child.wait_exit() => break exit,
            () = tokio::time::sleep(BATCH_INTERVAL) => {}
        }
    };

    // The leader is gone but still unreaped, so its group id is ours: clear what is left of the tree.
    supervisor::clear_group(child.pid, shared.grace).await;
    read_all(&mut preview, &mut findings);
    for f in followers.iter_mut() {
        f.finish(&mut preview, &mut findings);
    }
    publish(&shared, &run_id, &preview, &mut findings, false);
    let outcome = match findings.outcome.take() {
        Some(o) => Some(o),
        None => scan_outcome(&files.stdout(), format).unwrap_or(None),
    };
    let stop_reason = shared.lock_table().task_of_run(&run_id).and_then(|t| t.stop_reason.clone());
    let last_stderr = render_tail(&files.stderr(), EventFormat::Text, 1, shared.preview_chars)
        .ok()
        .and_then(|(lines, _)| lines.into_iter().next());
    let (state, reason) = judge(format, &exit, outcome.as_ref(), stop_reason, last_stderr);
    tracing::info!(slot = %slot, run = %run_id, state = state.as_str(), reason = reason.as_deref().unwrap_or(""), "run ended");
    let exit_info = exit.ok();
    let record = finish_task(&shared, &run_id, state, reason, exit_info, outcome.as_ref());
    // Nothing signals the group from here on (finish_task released it), so the pid may be freed.
    child.reap();
    wake.disarm(&shared);
    if let Some(record) = record {
        write_exit_records(&shared, &files, &record);
    }
}

/// A bug in the follower must not leave a ghost "in_progress" slot: if it panics, the run is recorded as failed.
async fn fail_run_if_follower_dies(shared: Arc<Shared>, run_id: String, follower: tokio::task::JoinHandle<()>) {
    if let Err(e) = follower.await {
        tracing::error!(run = %run_id, "the follower of the run died: {e}");
        let reason = "autodevd lost track of this run (internal error, see its log)".to_string();
        if let Some(record) = finish_task(&shared, &run_id, SlotState::Failed, Some(reason), None, None) {
            write_exit_records(&shared, &RunFiles::at(shared.paths.run_dir(&run_id)), &record);
        }
    }
}

/// Copies the follower's view into the slot, under the lock, and wakes `logs -f` readers.
fn publish(shared: &Shared, run_id: &str, preview: &Preview, findings: &mut Findings, ended: bool) {
    let mut table = shared.lock_table();
    let Some(task) = table.task_of_run(run_id) else {
        return;
    };
    if findings.new_bytes > 0 {
        task.last_output_at = Some(SystemTime::now());
        findings.new_bytes = 0;
    }
    task.preview = preview.lines();
    if task.session_id.is_none() {
        task.session_id = findings.session_id.clone();
    }
    task.signal.send_modify(|s| {
        s.batches += 1;
        s.ended |= ended;
    });
}

/// Decides how a run went from its exit and its final event. A run is `completed` only when both agree.
fn judge(
    format: EventFormat,
    exit: &std::io::Result<ExitInfo>,
    outcome: Option<&Outcome>,
    stop_reason: Option<String>,
    last_stderr: Option<String>,
) -> (SlotState, Option<String>) {
    if let Some(reason) = stop_reason {
        return (SlotState::Failed, Some(reason));
    }
    let with_stderr = |base: String| match &last_stderr {
        Some(line) => format!("{base}: {line}"),
        None => base,
    };
    match (exit, outcome) {
        (Err(e), _) => (SlotState::Failed, Some(format!("lost track of the process: {e}"))),
        (Ok(ExitInfo::Code(0)), Some(o)) if o.success => (SlotState::Completed, Some(o.summary.clone())),
        (Ok(ExitInfo::Code(0)), None) if format == EventFormat::Text => (SlotState::Completed, None),
        (Ok(ExitInfo::Code(0)), None) => {
            (SlotState::Failed, Some(with_stderr("exited 0 without a final result event".into())))
        }
        (Ok(exit), Some(o)) if !o.success => (SlotState::Failed, Some(format!("{exit}, {}", o.summary))),
        (Ok(exit), Some(_)) => (SlotState::Failed, Some(format!("{exit} after a successful result"))),
        (Ok(exit), None) => (SlotState::Failed, Some(with_stderr(exit.to_string()))),
    }
}

/// Ends the task of `run_id` in memory and returns what to record on disk.
fn finish_task(
    shared: &Shared,
    run_id: &str,
    state: SlotState,
    reason: Option<String>,
    exit: Option<ExitInfo>,
    outcome: Option<&Outcome>,
) -> Option<ExitRecord> {
    let mut table = shared.lock_table();
    let (slot, task) = table
        .slots
        .iter_mut()
        .find_map(|s| s.task.as_mut().filter(|t| t.run_id == run_id).map(|t| (s.name.clone(), t)))?;
    let now = SystemTime::now();
    task.state = state;
    task.reason = reason.clone();
    task.ended_at = Some(now);
    task.group_released = true;
    task.exit_code = match exit {
        Some(ExitInfo::Code(c)) => Some(c),
        _ => None,
    };
    if let Some(o) = outcome {
        task.cost_usd = o.cost_usd;
        task.turns = o.turns;
    }
    task.signal.send_modify(|s| s.ended = true);
    Some(ExitRecord {
        version: RECORD_VERSION,
        run_id: run_id.to_string(),
        slot,
        issue: task.issue,
        state: state.as_str().to_string(),
        reason,
        exit_code: task.exit_code,
        signal: match exit {
            Some(ExitInfo::Signal(s)) => Some(s),
            _ => None,
        },
        started_at: rfc3339(task.started_at),
        ended_at: rfc3339(now),
        duration_secs: now.duration_since(task.started_at).unwrap_or_default().as_secs(),
        session_id: task.session_id.clone(),
        cost_usd: task.cost_usd,
        turns: task.turns,
    })
}

fn write_exit_records(shared: &Shared, files: &RunFiles, record: &ExitRecord) {
    if let Err(e) = ledger::write_json(&files.exit_record(), record) {
        tracing::error!(run = %record.run_id, "cannot write {}: {e}", files.exit_record().display());
    }
    if let Err(e) = ledger::append_history(&shared.paths.history_file(), record) {
        tracing::error!(run = %record.run_id, "cannot append to {}: {e}", shared.paths.history_file().display());
    }
}

/// Handles `stop`: TERM to the run's process group, KILL after the grace period, and answers once it is over.
pub async fn stop(shared: &Shared, slot: &str, why: &str) -> Result<Reply, ErrorReply> {
    let (pgid, run_id, issue, mut ended) = {
        let mut table = shared.lock_table();
        let Some(s) = table.get_mut(slot) else {
            return Err(failed(ErrorKind::NotFound, format!("unknown slot {slot:?}"), None));
        };
        let Some(task) = s.task.as_mut().filter(|t| t.state == SlotState::InProgress) else {
            let state = s.state();
            return Err(failed(
                ErrorKind::Conflict,
                format!("slot {slot} is not running (it is {})", state.as_str()),
                None,
            ));
        };
        let pgid = task.pid.expect("an in-progress task has a pid") as i32;
        task.stop_reason = Some(why.to_string());
        if !task.group_released {
            supervisor::signal_group(pgid, Signal::SIGTERM);
        }
        (pgid, task.run_id.clone(), task.issue, task.signal.subscribe())
    };
    if tokio::time::timeout(shared.grace, wait_ended(&mut ended)).await.is_err() {
        let mut table = shared.lock_table();
        if let Some(task) = table.task_of_run(&run_id)
            && !task.group_released
        {
            tracing::info!(slot, pgid, "run ignored SIGTERM for {:?}; sending SIGKILL", shared.grace);
            supervisor::signal_group(pgid, Signal::SIGKILL);
        }
    }
    if tokio::time::timeout(KILL_WAIT, wait_ended(&mut ended)).await.is_err() {
        return Err(failed(
            ErrorKind::Failed,
            format!("run {run_id} in {slot} survived SIGKILL for {KILL_WAIT:?} (stuck in the kernel?)"),
            None,
        ));
    }
    Ok(Reply::Stopped { slot: slot.to_string(), issue, run_id })
}

async fn wait_ended(rx: &mut watch::Receiver<RunSignal>) {
    // A dropped sender means the task record is gone, which only happens once the run is over.
    let _ = rx.wait_for(|s| s.ended).await;
}

/// Stops every running run (daemon shutdown).
pub async fn stop_all(shared: &Arc<Shared>, why: &str) {
    let busy: Vec<String> = shared
        .lock_table()
        .slots
        .iter()
        .filter(|s| s.state() == SlotState::InProgress)
        .map(|s| s.name.clone())
        .collect();
    let mut stops = tokio::task::JoinSet::new();
    for slot in busy {
        let shared = shared.clone();
        let why = why.to_string();
        stops.spawn(async move {
            if let Err(e) = stop(&shared, &slot, &why).await {
                tracing::warn!(slot, "stop at shutdown: {}", e.message);
            }
        });
    }
    while stops.join_next().await.is_some() {}
}

/// The run directory's stdout or stderr, for `logs`.
pub fn log_path(run_dir: &Path, stderr: bool) -> std::path::PathBuf {
    let files = RunFiles::at(run_dir.to_path_buf());
    if stderr { files.stderr() } else { files.stdout() }
}
