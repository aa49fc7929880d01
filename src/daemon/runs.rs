//! The life of a run: start it (new, resumed or restarted) in a slot its task holds, follow its output into the
//! preview, judge its outcome when it exits, record it, and keep the slot's lockfile true at every step; plus
//! `stop`, `resume` and `release`.
//!
//! Lockfile order: written before the child can do any work, rewritten once the pid (and later the session id) is
//! known, and at the end either rewritten as `abandoned` or removed, always after the run's exit record.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use tokio::sync::{Notify, watch};

use super::Shared;
use super::issue_sync::{board_wants, board_wants_for_end, comment, intake};
use super::retry::{resume_after_limit, schedule_retry};
use super::slots::{RunSignal, SlotRequest, StopReason, Task};
use crate::github::sync::Target;
use crate::ledger::{self, ExitRecord, RECORD_VERSION, RunFiles, RunRecord, SlotLock};
use crate::output::{FileFollower, Findings, Preview, render_tail, scan_outcome};
use crate::protocol::{Assigned, ErrorKind, ErrorReply, Reply, SlotState};
use crate::provider::{EventFormat, LaunchContext, Outcome, Provider};
use crate::supervisor::{self, Child, ExitInfo, SpawnError, SpawnSpec};
use crate::timefmt::rfc3339;
use crate::workspace;

/// Under a flood, followers read at most this often; a quiet run is read as soon as it writes.
const BATCH_INTERVAL: Duration = Duration::from_millis(25);
/// A batch this large means the run floods: read on the batch timer instead of per-write notifications.
const FLOOD_BATCH: u64 = 64 << 10;
/// How long a usage limit is assumed to last when the CLI does not say.
const RATE_LIMIT_GUESS: Duration = Duration::from_secs(15 * 60);
/// How long `stop` waits for a run to finish after SIGKILL before it answers that something is stuck.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// The lock file in a run's directory whose lock the run's processes hold.
pub const RUN_LOCK: &str = "run.lock";

pub(super) fn refuse(kind: ErrorKind, message: String, hint: Option<String>) -> ErrorReply {
    ErrorReply { kind, message, hint }
}

/// How a run continues its task.
pub(super) enum RunKind {
    /// A new conversation with the task's prompt.
    New,
    /// The same conversation, with a continuation prompt.
    Resume(String),
    /// No session was captured: a new conversation with the original prompt.
    Restart,
}

/// Handles `assign`: reserves a slot and starts the first run of a new task in it.
pub async fn assign(
    shared: &Arc<Shared>,
    issue: u64,
    llm: Option<&str>,
    slot: Option<&str>,
    prompt: Option<&str>,
    force: bool,
) -> Result<Reply, ErrorReply> {
    if prompt.is_some_and(|p| p.trim().is_empty()) {
        return Err(refuse(ErrorKind::BadRequest, "the prompt is empty".into(), None));
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
        record.next_run(run_id.clone(), &files, &shared.boot_id, shared.daemon_pid);
        // The slot's last finished task is kept aside, to come back if the worktree cannot be made.
        let previous = slot.task.replace(Task::starting(record));
        (slot.name.clone(), previous)
    };
    let title = match (&issue_view, prompt) {
        (Some(view), _) => view.title.clone(),
        // Without an issue title, the prompt's first line names the branch.
        (None, Some(p)) => p.lines().find(|l| !l.trim().is_empty()).unwrap_or_default().to_string(),
        (None, None) => String::new(),
    };
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
    let assigned = start_run(shared, &slot_name, RunKind::New, &text).await?;
    board_wants(shared, issue, &slot_name, Target::InProgress, force);
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
        workspace::prepare(&root, &config, &slot_name, issue, &title, &in_use).map(Some)
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
    }
    Ok(Some(prepared))
}

/// Handles `resume`: a new run of the slot's abandoned, failed or stopped task, in the same conversation.
pub async fn resume(shared: &Arc<Shared>, slot: &str, automatic: bool) -> Result<Reply, ErrorReply> {
    let (kind, issue, previous_reason, prompt_file, branch) = {
        let mut table = shared.lock_table();
        let Some(index) = table.slots.iter().position(|s| s.name == slot) else {
            return Err(refuse(ErrorKind::NotFound, format!("unknown slot {slot:?}"), None));
        };
        let Some((issue, state)) = table.slots[index].task.as_ref().map(|t| (t.issue(), t.state)) else {
            return Err(refuse(ErrorKind::Conflict, format!("slot {slot} has no task to resume (it is ready)"), None));
        };
        if !matches!(state, SlotState::Abandoned | SlotState::Failed) {
            let hint = match state {
                SlotState::Completed => "the task completed; assign the issue again for new work",
                _ => "it is running; see `autodevctl logs` or stop it first",
            };
            return Err(refuse(
                ErrorKind::Conflict,
                format!("slot {slot} cannot be resumed: its task is {}", state.as_str()),
                Some(hint.into()),
            ));
        }
        if let Some(other) = table.holder_of(issue).filter(|s| s.name != slot) {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("issue #{issue} is now held by {}; resuming here would run two agents on it", other.name),
                None,
            ));
        }
        let provider = &table.providers[table.slots[index].provider];
        if !provider.enabled {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("LLM {:?} is disabled", provider.name),
                Some(format!("set llms.{}.enabled to true, then resume", provider.name)),
            ));
        }
        let task = table.slots[index].task.as_mut().expect("checked above");
        if let Some(pid) = task.record.pid.filter(|_| task.record.boot_id == shared.boot_id)
            && supervisor::proc_stat(pid as i32)
                .is_some_and(|s| s.state != 'Z' && Some(s.start_time) == task.record.start_time)
        {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("process {pid} of the previous run in {slot} is still alive; resuming would run it twice"),
                Some(format!("end it first (kill {pid}), then resume")),
            ));
        }
        if supervisor::run_lock_held(&task.run_dir().join(RUN_LOCK)) {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("processes of the previous run in {slot} are still alive (being stopped)"),
                Some("try again in a few seconds".into()),
            ));
        }
        let run_id = ulid::Ulid::new().to_string();
        let files = RunFiles::at(shared.paths.run_dir(&run_id));
        let mut record = task.record.clone();
        record.next_run(run_id, &files, &shared.boot_id, shared.daemon_pid);
        if automatic {
            record.auto_resumes.push(rfc3339(SystemTime::now()));
        }
        let kind = match &record.session_id {
            Some(session) => RunKind::Resume(session.clone()),
            None => RunKind::Restart,
        };
        let previous_reason = task.reason.clone();
        let prompt_file = record.prompt_file.clone();
        let branch = record.branch.clone();
        *task = Task::starting(record);
        (kind, issue, previous_reason, prompt_file, branch)
    };
    let prompt = match &kind {
        RunKind::Resume(_) => continuation_prompt(issue, previous_reason.as_deref(), branch.as_deref()),
        _ => match std::fs::read_to_string(&prompt_file) {
            Ok(original) => original,
            Err(e) => {
                let reason = format!("cannot read the task's original prompt {}: {e}", prompt_file.display());
                let run_id =
                    shared.lock_table().get(slot).and_then(|s| s.task.as_ref()).map(|t| t.record.run_id.clone());
                if let Some(run_id) = run_id {
                    end_without_run(shared, &run_id, reason.clone());
                }
                return Err(refuse(ErrorKind::Failed, reason, None));
            }
        },
    };
    let resumed = start_run(shared, slot, kind, &prompt).await?;
    board_wants(shared, resumed.issue, slot, Target::InProgress, false);
    Ok(Reply::Resumed(resumed))
}

/// The message a resumed conversation continues with.
fn continuation_prompt(issue: u64, reason: Option<&str>, branch: Option<&str>) -> String {
    let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
    let on = branch.map(|b| format!(" You are still on branch {b}; keep committing there.")).unwrap_or_default();
    format!(
        "Your previous run on issue #{issue} was interrupted{why}. Continue the task from where you stopped: first \
         check the state of the working directory (files you changed, commands that may not have finished), then \
         carry on until the task is done.{on}"
    )
}

/// Starts the run the slot's task record names (state `starting`). On failure the task ends as failed.
pub(super) async fn start_run(
    shared: &Arc<Shared>,
    slot: &str,
    kind: RunKind,
    prompt: &str,
) -> Result<Assigned, ErrorReply> {
    let reserved = {
        let table = shared.lock_table();
        table.get(slot).and_then(|s| Some((table.providers[s.provider].clone(), s.task.as_ref()?.record.clone())))
    };
    // Nothing takes a starting slot away; should that ever change, this is an error, not a ghost "starting" slot.
    let Some((provider, mut record)) = reserved else {
        return Err(refuse(
            ErrorKind::Failed,
            format!("slot {slot} lost its reservation before the run started"),
            None,
        ));
    };
    if shared.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
        let reason = "autodevd is shutting down; assign or resume again once it is back".to_string();
        end_without_run(shared, &record.run_id, reason.clone());
        return Err(refuse(ErrorKind::Failed, reason, None));
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
                task.state = SlotState::InProgress;
            }
            tracing::info!(slot, issue = reply.issue, run = %run_id, pid = reply.pid, "run started");
            comment(shared, slot, true);
            follow(shared, run_id, provider.format, started.child, started.wake, Some(started.run_lock));
            Ok(reply)
        }
        Err(reason) => {
            tracing::warn!(slot, issue = record.issue, "run could not start: {reason}");
            end_without_run(shared, &record.run_id, reason.clone());
            Err(refuse(ErrorKind::Failed, reason, None))
        }
    }
}

/// Ends a task whose run never started, as failed.
fn end_without_run(shared: &Shared, run_id: &str, reason: String) {
    if let Some(done) = finish_task(shared, run_id, SlotState::Failed, Some(reason), None, None) {
        record_end(shared, &done);
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

/// Prepares the run directory, writes the lockfile, and spawns the CLI. Errors are the reason shown to the user.
fn launch(
    shared: &Shared,
    provider: &Provider,
    record: &mut SlotLock,
    prompt: &str,
    kind: &RunKind,
) -> Result<Started, String> {
    let disk = |what: &str, e: std::io::Error| format!("cannot {what} in {}: {e}", shared.paths.state_dir.display());
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
    let env = supervisor::child_env(
        &provider.passthrough_env,
        &provider.config_env,
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
    // The lockfile exists before the child can do anything: a crash from here on finds the task.
    shared.write_lock(record).map_err(|e| disk("write the slot's lockfile", e))?;
    let run_lock =
        supervisor::create_run_lock(&files.dir.join(RUN_LOCK)).map_err(|e| disk("create the run lock", e))?;

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
    record.pgid = Some(child.pid as u32);
    record.start_time = supervisor::proc_stat(child.pid).map(|s| s.start_time);
    record.state = "in_progress".into();
    // The run is going; a record that lags behind is a smaller loss than killing it. Recovery copes with a
    // lockfile without a pid through the run lock.
    if let Err(e) = shared.write_lock(record) {
        tracing::error!(run = %record.run_id, "cannot record the pid in the lockfile: {e}");
    }
    run_record.pid = record.pid;
    if let Err(e) = ledger::write_json(&files.record(), &run_record) {
        tracing::warn!(run = %record.run_id, "cannot record the pid of the run: {e}");
    }
    Ok(Started { child, wake, run_lock })
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
    if child.is_ours() {
        // Our leader is gone but still unreaped, so its group id is ours: clear what is left of the tree.
        supervisor::clear_group(pgid, shared.grace).await;
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
    let stop_reason = shared.lock_table().task_of_run(&run_id).and_then(|t| t.stop_reason.clone());
    let stop_reason_was_none = stop_reason.is_none();
    let stopped_stale = matches!(stop_reason, Some(StopReason::Stale(_)));
    let last_stderr = render_tail(&files.stderr(), EventFormat::Text, 1, shared.preview_chars)
        .ok()
        .and_then(|(lines, _)| lines.into_iter().next());
    let (mut state, mut reason) = judge(format, &exit, outcome.as_ref(), stop_reason, last_stderr);
    let limited_until = shared
        .lock_table()
        .task_of_run(&run_id)
        .and_then(|t| t.health.rate_limited_until)
        .filter(|u| *u > SystemTime::now());
    if let (SlotState::Failed, true, Some(until)) = (state, stop_reason_was_none, limited_until) {
        // Not a failure: the CLI waits for its usage limit. The slot keeps the issue; the task resumes after.
        state = SlotState::Abandoned;
        reason = Some(format!("rate limited until {}", rfc3339(until)));
        let slot = shared
            .lock_table()
            .slots
            .iter()
            .find(|s| s.task.as_ref().is_some_and(|t| t.record.run_id == run_id))
            .map(|s| s.name.clone());
        if let Some(slot) = slot {
            resume_after_limit(&shared, &slot, &run_id, until);
        }
    }
    tracing::info!(run = %run_id, state = state.as_str(), reason = reason.as_deref().unwrap_or(""), "run ended");
    let done = finish_task(&shared, &run_id, state, reason, exit.ok(), outcome.as_ref());
    // Nothing signals the group from here on (finish_task released it), so the pid may be freed.
    child.reap();
    wake.disarm(&shared);
    if let Some(done) = done {
        record_end(&shared, &done);
        // A task that goes on (a retry, a restart after going stale) keeps its worktree.
        let goes_on = state == SlotState::Failed
            && (stopped_stale || stop_reason_was_none && schedule_retry(&shared, &done.exit));
        if !goes_on {
            cleanup_worktree(&shared, &done.exit).await;
        }
    }
}

/// Honours `worktree.cleanup.onComplete` / `onError`: removes the finished task's worktree, only if it holds
/// nothing that exists nowhere else. The branch always stays.
async fn cleanup_worktree(shared: &Shared, exit: &ExitRecord) {
    let cleanup = &shared.config.raw.worktree.cleanup;
    let wanted = match exit.state.as_str() {
        "completed" => cleanup.remove_on_complete(),
        "failed" => cleanup.remove_on_error(),
        _ => false,
    };
    let Some(path) = exit.worktree.clone().filter(|_| wanted) else { return };
    let workspace = shared.workspace.clone();
    let result = tokio::task::spawn_blocking(move || {
        let root = workspace::repo_root(&workspace).ok_or("the workspace is no longer a git repository")?;
        workspace::remove_if_safe(&root, &path).map_err(|e| e.to_string())
    })
    .await;
    match result {
        Ok(Ok(true)) => tracing::info!(slot = %exit.slot, "removed the worktree of the finished task"),
        Ok(Ok(false)) => tracing::info!(slot = %exit.slot, "kept the worktree: it holds unsaved work"),
        Ok(Err(e)) => tracing::warn!(slot = %exit.slot, "worktree clean-up: {e}"),
        Err(e) => tracing::warn!(slot = %exit.slot, "worktree clean-up: {e}"),
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
        let reason = "autodevd lost track of this run (internal error, see its log); it was stopped".to_string();
        if let Some(done) = finish_task(&shared, &run_id, SlotState::Failed, Some(reason), None, None) {
            record_end(&shared, &done);
        }
    }
}

/// Copies the follower's view into the slot, under the lock, and wakes `logs -f` readers. A newly seen session id
/// goes into the lockfile at once: it is what a resume needs.
fn publish(shared: &Shared, run_id: &str, preview: &Preview, findings: &mut Findings) {
    let new_session = {
        let mut table = shared.lock_table();
        let Some(task) = table.task_of_run(run_id) else { return };
        if findings.new_bytes == 0
            && findings.session_id.is_none()
            && findings.progress.is_none()
            && findings.rate_limit.is_none()
        {
            return;
        }
        if findings.new_bytes > 0 {
            task.last_output_at = Some(SystemTime::now());
            findings.new_bytes = 0;
            task.preview = preview.lines();
            task.signal.send_modify(|s| s.batches += 1);
            if task.state == SlotState::Stale {
                task.state = SlotState::InProgress;
            }
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
        match (&task.record.session_id, &findings.session_id) {
            (None, Some(found)) if task.state.is_running() => {
                task.record.session_id = Some(found.clone());
                Some(task.record.clone())
            }
            _ => None,
        }
    };
    if let Some(record) = new_session
        && let Err(e) = shared.write_lock(&record)
    {
        tracing::error!(run = %run_id, "cannot record the session id in the lockfile: {e}");
    }
}

/// Decides how a run went from its exit and its final event. A run is `completed` only when both agree.
fn judge(
    format: EventFormat,
    exit: &std::io::Result<ExitInfo>,
    outcome: Option<&Outcome>,
    stop_reason: Option<StopReason>,
    last_stderr: Option<String>,
) -> (SlotState, Option<String>) {
    // A run that finished its work just as a stop arrived is done: running it again would cost money twice.
    let succeeded = matches!(exit, Ok(ExitInfo::Code(0))) && outcome.is_some_and(|o| o.success);
    match stop_reason {
        Some(StopReason::User) if !succeeded => return (SlotState::Failed, Some("stopped by autodevctl stop".into())),
        Some(StopReason::Shutdown(why)) if !succeeded => return (SlotState::Abandoned, Some(why)),
        Some(StopReason::Stale(why)) if !succeeded => return (SlotState::Failed, Some(format!("{why}: stopped"))),
        _ => {}
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
        // Adopted after a restart: the final event is all there is to go by; the exit code stays unknown.
        (Ok(ExitInfo::Unknown), Some(o)) if o.success => {
            (SlotState::Completed, Some(format!("{} (exit code unknown: adopted after a restart)", o.summary)))
        }
        (Ok(ExitInfo::Unknown), None) => (
            SlotState::Failed,
            Some(with_stderr("ended without a final result event; exit code unknown (adopted after a restart)".into())),
        ),
        (Ok(exit), Some(o)) if !o.success => (SlotState::Failed, Some(format!("{exit}, {}", o.summary))),
        (Ok(exit), Some(_)) => (SlotState::Failed, Some(format!("{exit} after a successful result"))),
        (Ok(exit), None) => (SlotState::Failed, Some(with_stderr(exit.to_string()))),
    }
}

/// What a finished run leaves to write to disk.
pub(super) struct RunEnd {
    exit: ExitRecord,
    /// `Some` keeps the slot held (abandoned): the lockfile is rewritten; `None` frees it: the lockfile goes.
    keep_lock: Option<SlotLock>,
}

/// Ends the current run of `run_id`'s task in memory and returns what to record on disk.
pub(super) fn finish_task(
    shared: &Shared,
    run_id: &str,
    state: SlotState,
    reason: Option<String>,
    exit: Option<ExitInfo>,
    outcome: Option<&Outcome>,
) -> Option<RunEnd> {
    let mut table = shared.lock_table();
    let task = table.task_of_run(run_id)?;
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
    let keep_lock = (state == SlotState::Abandoned).then(|| {
        task.record.state = "abandoned".into();
        task.record.reason = reason.clone();
        task.record.clone()
    });
    let record = &task.record;
    Some(RunEnd {
        exit: ExitRecord {
            version: RECORD_VERSION,
            run_id: run_id.to_string(),
            slot: record.slot.clone(),
            issue: record.issue,
            state: state.as_str().to_string(),
            reason,
            exit_code: task.exit_code,
            signal: match exit {
                Some(ExitInfo::Signal(s)) => Some(s),
                _ => None,
            },
            started_at: rfc3339(task.run_started_at),
            ended_at: rfc3339(now),
            duration_secs: now.duration_since(task.run_started_at).unwrap_or_default().as_secs(),
            session_id: record.session_id.clone(),
            cost_usd: task.cost_usd,
            turns: task.turns,
            task_id: record.task_id.clone(),
            provider: record.provider.clone(),
            runs: record.runs.clone(),
            cwd: record.cwd.clone(),
            prompt_file: record.prompt_file.clone(),
            worktree: record.worktree.clone(),
            branch: record.branch.clone(),
        },
        keep_lock,
    })
}

/// Writes a run's end: the exit record, the history line, then the lockfile (rewritten or removed). In that
/// order, so a crash in between is finished by the recovery pass from the exit record.
pub(super) fn record_end(shared: &Shared, end: &RunEnd) {
    let exit = &end.exit;
    let files = RunFiles::at(shared.paths.run_dir(&exit.run_id));
    if let Err(e) = ledger::write_json(&files.exit_record(), exit) {
        tracing::error!(run = %exit.run_id, "cannot write {}: {e}", files.exit_record().display());
    }
    if let Err(e) = ledger::append_history(&shared.paths.history_file(), exit) {
        tracing::error!(run = %exit.run_id, "cannot append to {}: {e}", shared.paths.history_file().display());
    }
    if exit.state == "completed" || exit.state == "failed" {
        shared.note_outcome(exit.state == "completed", exit.duration_secs);
    }
    // Before the lockfile goes: a crash in between is finished by recovery from the exit record, which tells the
    // board again (the wish is idempotent), so the board update is never lost.
    board_wants_for_end(shared, exit);
    let result = match &end.keep_lock {
        Some(lock) => shared.write_lock(lock),
        None => ledger::remove_slot_lock(&shared.paths.slots_dir(), &exit.slot),
    };
    if let Err(e) = result {
        tracing::error!(slot = %exit.slot, "cannot update the slot's lockfile: {e}");
    }
    comment(shared, &exit.slot, true);
}

/// Handles `stop`: TERM to the run's process group, KILL after the grace period, and answers once it is over.
pub async fn stop(shared: &Shared, slot: &str, why: StopReason) -> Result<Reply, ErrorReply> {
    let (pgid, run_id, issue, mut ended) = {
        let mut table = shared.lock_table();
        let Some(s) = table.get_mut(slot) else {
            return Err(refuse(ErrorKind::NotFound, format!("unknown slot {slot:?}"), None));
        };
        let Some(task) = s.task.as_mut().filter(|t| matches!(t.state, SlotState::InProgress | SlotState::Stale)) else {
            let state = s.state();
            let hint = (state == SlotState::Abandoned)
                .then(|| format!("its run is gone already: `autodevctl resume {slot}` or `autodevctl release {slot}`"));
            return Err(refuse(
                ErrorKind::Conflict,
                format!("slot {slot} is not running (it is {})", state.as_str()),
                hint,
            ));
        };
        let Some(pgid) = task.record.pgid.map(|p| p as i32) else {
            return Err(refuse(ErrorKind::Failed, format!("slot {slot} has no process group on record"), None));
        };
        task.stop_reason = Some(why);
        if group_is_ours(task, pgid) {
            supervisor::signal_group(pgid, Signal::SIGTERM);
        }
        (pgid, task.record.run_id.clone(), task.issue(), task.signal.subscribe())
    };
    if tokio::time::timeout(shared.grace, wait_ended(&mut ended)).await.is_err() {
        let mut table = shared.lock_table();
        if let Some(task) = table.task_of_run(&run_id)
            && group_is_ours(task, pgid)
        {
            tracing::info!(slot, pgid, "run ignored SIGTERM for {:?}; sending SIGKILL", shared.grace);
            supervisor::signal_group(pgid, Signal::SIGKILL);
        }
    }
    if tokio::time::timeout(KILL_WAIT, wait_ended(&mut ended)).await.is_err() {
        return Err(refuse(
            ErrorKind::Failed,
            format!("run {run_id} in {slot} survived SIGKILL for {KILL_WAIT:?} (stuck in the kernel?)"),
            None,
        ));
    }
    Ok(Reply::Stopped { slot: slot.to_string(), issue, run_id })
}

/// Whether `pgid` is still the run's group: for our own runs until the leader is reaped; for an adopted run
/// while its leader is alive and still the process on record (it is not our child, so nothing holds its id).
fn group_is_ours(task: &Task, pgid: i32) -> bool {
    if task.group_released {
        return false;
    }
    !task.adopted
        || supervisor::proc_stat(pgid)
            .is_some_and(|s| s.state != 'Z' && s.pgrp == pgid && Some(s.start_time) == task.record.start_time)
}

async fn wait_ended(rx: &mut watch::Receiver<RunSignal>) {
    // A dropped sender means the task record is gone, which only happens once the run is over.
    let _ = rx.wait_for(|s| s.ended).await;
}

/// Handles `release`: ends an abandoned task (failed, or completed with `done`) and frees its slot.
pub fn release(shared: &Shared, slot: &str, done: bool) -> Result<Reply, ErrorReply> {
    let (run_id, issue, state) = {
        let table = shared.lock_table();
        let Some(s) = table.get(slot) else {
            return Err(refuse(ErrorKind::NotFound, format!("unknown slot {slot:?}"), None));
        };
        match &s.task {
            Some(t) if t.state == SlotState::Abandoned => {
                (t.record.run_id.clone(), t.issue(), if done { SlotState::Completed } else { SlotState::Failed })
            }
            Some(t) if t.state.is_running() => {
                return Err(refuse(
                    ErrorKind::Conflict,
                    format!("slot {slot} is running issue #{}", t.issue()),
                    Some(format!("stop it first: `autodevctl stop {slot}`")),
                ));
            }
            _ => return Err(refuse(ErrorKind::Conflict, format!("slot {slot} holds no task; it is free"), None)),
        }
    };
    let reason = format!("released by autodevctl release{}", if done { " --done" } else { "" });
    if let Some(end) = finish_task(shared, &run_id, state, Some(reason), None, None) {
        record_end(shared, &end);
    }
    tracing::info!(slot, issue, state = state.as_str(), "task released");
    Ok(Reply::Released { slot: slot.to_string(), issue, state })
}

/// Stops every running run (daemon shutdown); their tasks stay abandoned and resumable.
pub async fn stop_all(shared: &Arc<Shared>, why: &str) {
    let busy: Vec<String> = shared
        .lock_table()
        .slots
        .iter()
        .filter(|s| matches!(s.state(), SlotState::InProgress | SlotState::Stale))
        .map(|s| s.name.clone())
        .collect();
    let mut stops = tokio::task::JoinSet::new();
    for slot in busy {
        let shared = shared.clone();
        let reason = StopReason::Shutdown(format!("{why}; resume with `autodevctl resume {slot}`"));
        stops.spawn(async move {
            if let Err(e) = stop(&shared, &slot, reason).await {
                tracing::warn!(slot, "stop at shutdown: {}", e.message);
            }
        });
    }
    while stops.join_next().await.is_some() {}
}

/// The run directory's stdout or stderr, for `logs`.
pub fn log_path(run_dir: &Path, stderr: bool) -> PathBuf {
    let files = RunFiles::at(run_dir.to_path_buf());
    if stderr { files.stderr() } else { files.stdout() }
}
