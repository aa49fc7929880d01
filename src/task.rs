//! The life of a task, in one place: the [`Phase`] it is in (each phase carries its own data), why it ended (a
//! typed [`EndCause`]), and the one transition function, [`SlotLock::on`], that turns an [`Event`] into the next
//! phase and the [`Effect`]s the daemon must carry out. Nothing else sets a phase. The lockfile is this record
//! serialized, so after a crash a task is exactly what its lockfile says.
//!
//! ```text
//!            start               spawned                 silent / alive
//!  queued ─────────> starting ───────────> in_progress <────────────────> stale
//!                        │                     │ stop asked: the phase remembers who asked, so a crash mid-stop
//!                        │ spawn failed        │ still ends the way the stop meant
//!                        v                     v run ended (verdict: exit code + final event + who stopped it)
//!                      failed         ┌────────┼──────────────────────────┬─────────────────────────┐
//!                                     v        v                          v                         v
//!                               completed   failed       waiting (retry backoff, usage limit)   abandoned
//!                                           (slot free)    │ holds the slot, persisted          (shutdown stop, or
//!                                                          │ wait over: the next run             found dead at start)
//!                                                          v                                         │
//!                                                       starting <───────── resume / policy ─────────┘
//!                                                                            release / give up ──> failed | completed
//! ```
//!
//! Decisions here use typed facts only: the spawn error kind, the exit code or signal, and the fields of the CLI's
//! final event. An agent that writes "fixed #1502" is not a 502.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::OnStale;
use crate::provider::{EventFormat, Failure, Outcome};
use crate::supervisor::ExitInfo;
use crate::timefmt::{parse_rfc3339, rfc3339};

/// Version of the lockfile format. 1: `state`/`reason` strings and `auto_resumes`; 2: `phase` and `restarts`.
pub const LOCK_VERSION: u32 = 2;

/// How long a usage limit is assumed to last when the CLI does not say.
pub const USAGE_LIMIT_GUESS: Duration = Duration::from_secs(15 * 60);

/// Why a task (or its run) ended. Extensible: later features add causes; readers treat an unknown one as failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndCause {
    /// Exit 0 and a final event that says so.
    Succeeded,
    /// The agent's own turn failed (the CLI said so without an API status: max turns, an error in its tools).
    AgentError,
    /// The model service failed (an HTTP status of 5xx or similar, a failed codex turn).
    ProviderError,
    /// A usage or rate limit of the account.
    UsageLimit,
    /// The CLI is not logged in or its key is refused (401, 403, gemini exit 41).
    AuthError,
    /// The CLI could not be found or run.
    CliMissing,
    /// The run could not be started for another reason (working directory gone, an I/O error).
    SpawnFailed,
    /// `autodevctl stop`.
    Stopped,
    /// A signal from outside autodev (the OOM killer, a person's `kill`).
    Killed,
    /// The process is gone and nothing tells how it ended.
    Lost,
    /// Exit 0 without a final result event.
    NoResult,
    /// autodev's own records could not be written: the state dir's filesystem is full.
    DiskFull,
    /// `autodevctl release` gave the task up.
    Released,
    /// The run completed, but its branch has nothing beyond its base and its worktree is clean: nothing to review.
    NoChanges,
    /// The run completed, but what it left could not be committed (a hook failed, a file holds a secret): the work
    /// waits uncommitted in the worktree.
    CommitFailed,
    /// The run completed and its work is committed, but the branch could not be pushed (rejected, no access, a
    /// secret in its diff): the work waits on the local branch.
    PushFailed,
    /// The agent said it cannot go on (`signal blocked`, `AUTONOMOUS_SIGNAL:BLOCKED` or `FAILED`).
    Blocked,
    /// The task spent its budget (`budget.perTaskUsd`): its run was stopped.
    Budget,
    /// The fleet's claim on the issue is no longer this machine's (taken over, or not renewed in time): the run was
    /// stopped and nothing more is written for the issue. Logs and worktree stay; a person may resume it.
    ClaimLost,
}

impl EndCause {
    pub fn as_str(self) -> &'static str {
        match self {
            EndCause::Succeeded => "succeeded",
            EndCause::AgentError => "agent_error",
            EndCause::ProviderError => "provider_error",
            EndCause::UsageLimit => "usage_limit",
            EndCause::AuthError => "auth_error",
            EndCause::CliMissing => "cli_missing",
            EndCause::SpawnFailed => "spawn_failed",
            EndCause::Stopped => "stopped",
            EndCause::Killed => "killed",
            EndCause::Lost => "lost",
            EndCause::NoResult => "no_result",
            EndCause::DiskFull => "disk_full",
            EndCause::Released => "released",
            EndCause::NoChanges => "no_changes",
            EndCause::CommitFailed => "commit_failed",
            EndCause::PushFailed => "push_failed",
            EndCause::Blocked => "blocked",
            EndCause::Budget => "budget",
            EndCause::ClaimLost => "claim_lost",
        }
    }

    /// Whether another run of the same task could end differently. Missing CLIs, refused keys and people's
    /// decisions would end the same way again.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            EndCause::AgentError | EndCause::ProviderError | EndCause::Killed | EndCause::Lost | EndCause::NoResult
        )
    }

    /// Trouble with the LLM's service rather than the task: a fallback LLM may do better.
    pub fn provider_trouble(self) -> bool {
        matches!(self, EndCause::ProviderError | EndCause::UsageLimit)
    }
}

/// What a waiting task waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitFor {
    /// The backoff before a retry (or an immediate restart after a stale run was stopped).
    Retry,
    /// The account's usage limit to reset.
    UsageLimit,
    /// A person's answer.
    Reply,
}

impl WaitFor {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitFor::Retry => "retry",
            WaitFor::UsageLimit => "usage_limit",
            WaitFor::Reply => "reply",
        }
    }
}

/// What an agent says of its own task, from `autodevctl signal` or a marker line in its own assistant messages
/// (`AUTONOMOUS_SIGNAL:<KIND>[:<text>]`, the seed tool's protocol).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentSignal {
    /// It needs a person's answer: the question goes to the issue and the task waits for the reply.
    NeedsInfo { question: String },
    /// It cannot go on: the task ends failed with the reason.
    Blocked { why: String },
    /// It gave up (`FAILED`): the same end as blocked.
    Failed { why: String },
    /// It opened this pull request itself: autodev updates it rather than opening another.
    Pr { number: u64 },
    /// It says it is done (the run's exit and final event still decide).
    Complete,
}

/// The marker the seed tool's agents print, as a whole line.
pub const SIGNAL_MARKER: &str = "AUTONOMOUS_SIGNAL:";
/// The longest question or reason a signal carries.
const SIGNAL_TEXT_MAX: usize = 2000;

impl AgentSignal {
    /// Reads one line of an assistant message: a signal only when the whole line is a marker.
    pub fn from_marker_line(line: &str) -> Option<AgentSignal> {
        let rest = line.trim().strip_prefix(SIGNAL_MARKER)?;
        let (kind, text) = rest.split_once(':').map_or((rest, ""), |(k, t)| (k, t.trim()));
        let text: String = text.chars().take(SIGNAL_TEXT_MAX).collect();
        let said = |fallback: &str| if text.is_empty() { fallback.to_string() } else { text.clone() };
        Some(match kind.trim() {
            "NEEDS_INFO" => AgentSignal::NeedsInfo { question: said("(no question given)") },
            "BLOCKED" => AgentSignal::Blocked { why: said("(no reason given)") },
            "FAILED" => AgentSignal::Failed { why: said("(no reason given)") },
            "PR" => AgentSignal::Pr { number: text.trim_start_matches('#').parse().ok().filter(|n| *n > 0)? },
            "COMPLETE" => AgentSignal::Complete,
            _ => return None,
        })
    }

    /// Whether it decides how the run ends (over its exit and over "no changes").
    pub fn decides_end(&self) -> bool {
        matches!(self, AgentSignal::NeedsInfo { .. } | AgentSignal::Blocked { .. } | AgentSignal::Failed { .. })
    }
}

/// Who asked a run to stop, which decides what its end becomes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum StopBy {
    /// `autodevctl stop`: the task ends `stopped` (and can be resumed).
    User,
    /// autodevd is shutting down: the task is abandoned, resumable after the restart.
    Shutdown { why: String },
    /// `health.onStale` stops a stale run to run it again (`reassign`: on a fallback LLM first).
    Stale { reassign: bool },
    /// The task spent its budget: it ends `budget`, and is not run again unless a person says so.
    Budget { why: String },
    /// The fleet's claim is lost: it ends `claim_lost`, writing nothing more for the issue.
    ClaimLost { why: String },
}

/// Where a task is in its life. Serialized into the lockfile under `phase`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Phase {
    /// Waits for a free slot; holds none (the autopilot and `assign --queue` put tasks here).
    Queued,
    /// The next run is being set up; the CLI is not running yet.
    Starting,
    /// The CLI runs.
    #[serde(rename = "in_progress")]
    Running {
        /// No output, progress or CPU for `health.staleAfterSecs`.
        #[serde(default)]
        stale: bool,
        /// Someone asked the run to stop; kept so a crash during the stop still ends it as the stop meant.
        #[serde(default)]
        stop: Option<StopBy>,
    },
    /// Holds its slot until `until` (or an answer), then goes on by itself.
    Waiting {
        #[serde(with = "stamp")]
        until: Option<SystemTime>,
        #[serde(rename = "for")]
        waiting_for: WaitFor,
        /// How the run before the wait ended.
        after: EndCause,
        reason: String,
        /// The next run goes to a fallback LLM first.
        #[serde(default)]
        fallback: bool,
    },
    /// Its run died unwatched (crash, reboot, shutdown): the slot stays held until it is resumed or released.
    Abandoned { reason: String },
    /// Over. The slot is free.
    Ended { cause: EndCause, reason: Option<String>, exit_code: Option<i32> },
}

/// RFC 3339 stamps for optional times in the lockfile.
mod stamp {
    use super::*;
    pub fn serialize<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        t.map(rfc3339).serialize(s)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => parse_rfc3339(&text)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time"))),
        }
    }
}

/// The state words users and scripts see (`status --json` `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Ready,
    Queued,
    Starting,
    InProgress,
    Stale,
    Waiting,
    Abandoned,
    Completed,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Queued => "queued",
            State::Starting => "starting",
            State::InProgress => "in_progress",
            State::Stale => "stale",
            State::Waiting => "waiting",
            State::Abandoned => "abandoned",
            State::Completed => "completed",
            State::Failed => "failed",
        }
    }

    /// A run is going (or about to).
    pub fn is_running(self) -> bool {
        matches!(self, State::Starting | State::InProgress | State::Stale)
    }

    /// The slot belongs to its issue: `assign` may not take it, and the issue may not go elsewhere.
    pub fn holds_slot(self) -> bool {
        matches!(self, State::Starting | State::InProgress | State::Stale | State::Waiting | State::Abandoned)
    }
}

impl Phase {
    pub fn state(&self) -> State {
        match self {
            Phase::Queued => State::Queued,
            Phase::Starting => State::Starting,
            Phase::Running { stale: false, .. } => State::InProgress,
            Phase::Running { stale: true, .. } => State::Stale,
            Phase::Waiting { .. } => State::Waiting,
            Phase::Abandoned { .. } => State::Abandoned,
            Phase::Ended { cause: EndCause::Succeeded, .. } => State::Completed,
            Phase::Ended { .. } => State::Failed,
        }
    }

    pub fn end_cause(&self) -> Option<EndCause> {
        match self {
            Phase::Ended { cause, .. } => Some(*cause),
            _ => None,
        }
    }

    /// The reason people read: why it waits, why it was abandoned, how it ended.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Phase::Waiting { reason, .. } | Phase::Abandoned { reason } => Some(reason),
            Phase::Ended { reason, .. } => reason.as_deref(),
            _ => None,
        }
    }

    pub fn stop(&self) -> Option<&StopBy> {
        match self {
            Phase::Running { stop, .. } => stop.as_ref(),
            _ => None,
        }
    }
}

/// What a finished run says, decided from typed facts by [`verdict`].
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub cause: EndCause,
    /// For people: the CLI's summary, the exit, the last stderr line.
    pub reason: Option<String>,
    /// `None` when unknown (an adopted run), never guessed as 0.
    pub exit_code: Option<i32>,
    /// With [`EndCause::UsageLimit`]: when the CLI said the limit resets.
    pub resets_at: Option<SystemTime>,
}

impl Verdict {
    pub fn new(cause: EndCause, reason: impl Into<String>) -> Verdict {
        Verdict { cause, reason: Some(reason.into()), exit_code: None, resets_at: None }
    }
}

/// How a run ended, from its exit and its final event. A run succeeded only when both say so.
pub fn verdict(
    format: EventFormat,
    exit: &Result<ExitInfo, String>,
    outcome: Option<&Outcome>,
    last_stderr: Option<&str>,
) -> Verdict {
    let exit_code = match exit {
        Ok(ExitInfo::Code(c)) => Some(*c),
        _ => None,
    };
    let with_stderr = |base: String| match last_stderr {
        Some(line) => format!("{base}: {line}"),
        None => base,
    };
    let (cause, reason) = match (exit, outcome) {
        (Err(e), _) => (EndCause::Lost, format!("lost track of the process: {e}")),
        (Ok(ExitInfo::Code(0)), Some(o)) if o.success => (EndCause::Succeeded, o.summary.clone()),
        // Plain-text CLIs have no final event: the exit code is all there is.
        (Ok(ExitInfo::Code(0)), None) if format == EventFormat::Text => (EndCause::Succeeded, "exit code 0".into()),
        (Ok(ExitInfo::Code(0)), None) => {
            (EndCause::NoResult, with_stderr("exited 0 without a final result event".into()))
        }
        (Ok(ExitInfo::Unknown), Some(o)) if o.success => {
            (EndCause::Succeeded, format!("{} (exit code unknown: adopted after a restart)", o.summary))
        }
        (Ok(ExitInfo::Unknown), None) => (
            EndCause::Lost,
            with_stderr("ended without a final result event; exit code unknown (adopted after a restart)".into()),
        ),
        (Ok(ExitInfo::Signal(sig)), None) => (EndCause::Killed, with_stderr(ExitInfo::Signal(*sig).to_string())),
        (Ok(exit), Some(o)) if !o.success => {
            (cause_of_failure(format, exit, o.failure.as_ref()), format!("{exit}, {}", o.summary))
        }
        (Ok(exit), Some(_)) => (EndCause::AgentError, format!("{exit} after a successful result")),
        (Ok(exit @ ExitInfo::Code(code)), None) => {
            (failure_of_exit(format, *code).map_or(EndCause::AgentError, cause_of), with_stderr(exit.to_string()))
        }
    };
    let resets_at = match outcome.and_then(|o| o.failure.as_ref()) {
        Some(Failure::UsageLimit { resets_at }) => *resets_at,
        _ => None,
    };
    Verdict { cause, reason: Some(reason), exit_code, resets_at }
}

/// The cause of a run whose final event reports a failure: the event's typed facts first, then what the exit code
/// means for this CLI.
fn cause_of_failure(format: EventFormat, exit: &ExitInfo, failure: Option<&Failure>) -> EndCause {
    if let Some(f) = failure.filter(|f| !matches!(f, Failure::Agent)) {
        return cause_of(*f);
    }
    if let ExitInfo::Code(code) = exit
        && let Some(f) = failure_of_exit(format, *code)
    {
        return cause_of(f);
    }
    EndCause::AgentError
}

fn cause_of(failure: Failure) -> EndCause {
    match failure {
        Failure::UsageLimit { .. } => EndCause::UsageLimit,
        Failure::Api { status: Some(401 | 403) } => EndCause::AuthError,
        Failure::Api { status: Some(429) } => EndCause::UsageLimit,
        Failure::Api { .. } => EndCause::ProviderError,
        Failure::Auth => EndCause::AuthError,
        Failure::Agent => EndCause::AgentError,
    }
}

/// What an exit code alone says, where the CLI gives its codes a meaning (llm-clis.md): gemini exits 41 on
/// authentication and, with a structured output format, with the HTTP status of a failed API call mod 256.
fn failure_of_exit(format: EventFormat, code: i32) -> Option<Failure> {
    match (format, code) {
        (EventFormat::Gemini, 41) => Some(Failure::Auth),
        (EventFormat::Gemini, 145 | 147) => Some(Failure::Api { status: Some(code as u16 + 256) }),
        (EventFormat::Gemini, 173) => Some(Failure::UsageLimit { resets_at: None }),
        // 500..=511 mod 256.
        (EventFormat::Gemini, 244..=255) => Some(Failure::Api { status: Some(code as u16 + 256) }),
        _ => None,
    }
}

/// The allowance of automatic restarts a task gets (stale restarts, abandoned resumes, retries after failures):
/// `count` per `per`. Never a hot loop that burns model money.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Allowance {
    pub count: u32,
    pub per: Duration,
}

impl Allowance {
    /// Automatic restarts of `restarts` inside the window ending at `now`.
    pub fn used(&self, restarts: &[String], now: SystemTime) -> u32 {
        let since = now.checked_sub(self.per).unwrap_or(SystemTime::UNIX_EPOCH);
        restarts.iter().filter_map(|t| parse_rfc3339(t)).filter(|t| *t > since).count() as u32
    }

    pub fn allows(&self, restarts: &[String], now: SystemTime) -> bool {
        self.used(restarts, now) < self.count
    }
}

/// What the configuration says about a task's life.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Runs a task gets in all after failures (`retry.maxAttempts`).
    pub max_attempts: u32,
    /// Seconds before the first retry; each further one waits twice as long.
    pub backoff_secs: f64,
    /// `retry.fallback` names at least one LLM.
    pub has_fallback: bool,
    pub allowance: Allowance,
    pub on_stale: OnStale,
    /// A completed task's branch is pushed and up for review: its end asks for a pull request, and the board
    /// moves on once that exists (not before).
    pub pull_requests: bool,
}

impl Policy {
    pub fn from_config(config: &crate::config::RawConfig) -> Policy {
        let allowance = &config.supervisor.restart_allowance;
        Policy {
            max_attempts: config.retry.max_attempts,
            backoff_secs: config.retry.backoff_secs,
            has_fallback: !config.retry.fallback.is_empty(),
            allowance: Allowance { count: allowance.count, per: Duration::from_secs_f64(allowance.per_secs) },
            on_stale: config.health.on_stale,
            pull_requests: false,
        }
    }

    /// The wait before retry number `attempts` (1 after the first run).
    fn backoff(&self, attempts: u32) -> Duration {
        Duration::from_secs_f64(self.backoff_secs * f64::from(1u32 << attempts.saturating_sub(1).min(10)))
    }
}

/// What happens to a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The CLI of the current run was spawned.
    Spawned,
    /// The run could not be started.
    SpawnFailed(Verdict),
    /// Output or a progress report: a sign of life.
    Alive,
    /// No sign of life for `health.staleAfterSecs`.
    Silent,
    /// Someone asks the run to stop.
    StopAsked(StopBy),
    /// The run is over.
    RunEnded(Verdict),
    /// Start-up found the run dead and nothing that says how it ended.
    FoundDead { reason: String },
    /// A new run of the task begins (a person's resume, a policy's, the end of a wait). The caller has already made
    /// the record name the new run. `counted`: an automatic restart, which uses the task's allowance.
    Continue { counted: bool },
    /// The time waited for has come.
    WaitOver,
    /// `autodevctl release`: given up (`done`: the person says it is done).
    Release { done: bool },
    /// A policy gives the task up (`onAbandoned: fail`, an automatic restart that cannot happen).
    GiveUp { reason: String },
    /// The agent says something of its task from inside the run.
    Signal(AgentSignal),
    /// The fleet's claim on the issue is no longer this machine's.
    ClaimLost { why: String },
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Spawned => "spawned",
            Event::SpawnFailed(_) => "spawn failed",
            Event::Alive => "alive",
            Event::Silent => "silent",
            Event::StopAsked(_) => "stop",
            Event::RunEnded(_) => "run ended",
            Event::FoundDead { .. } => "found dead",
            Event::Continue { .. } => "continue",
            Event::WaitOver => "wait over",
            Event::Release { .. } => "release",
            Event::GiveUp { .. } => "give up",
            Event::Signal(_) => "signal",
            Event::ClaimLost { .. } => "claim lost",
        }
    }
}

/// What the board should say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoardWish {
    InProgress,
    Completed,
    Failed,
    /// The task waits for a person's answer (`needsMoreInfoValue`, else blocked); the slot keeps the issue.
    NeedsInfo,
}

/// What the daemon must do after a transition, in this order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Record the end of the current run: its exit record and history line.
    RecordRun,
    /// Write the lockfile as the task now is.
    WriteLock,
    /// The slot is free: remove the lockfile. Only once the run's end is durably recorded.
    FreeSlot,
    Board(BoardWish),
    /// Show the new state in the status comment at once.
    Comment,
    /// Send [`Event::WaitOver`] at this time (or at once, if it has passed).
    WakeAt(SystemTime),
    /// Send SIGTERM to the run (the stop's grace and SIGKILL follow).
    SignalStop,
    /// Start the next run: in the task's own slot, or on a fallback LLM first.
    StartNext {
        fallback: bool,
    },
    /// Apply `worktree.cleanup` to the ended task's worktree.
    CleanupWorktree,
    /// Open or update the completed task's pull request (through the outbox); the board follows once it exists.
    PullRequest,
    /// Post what the agent said (its question, why it is blocked) as a comment on the issue (through the outbox).
    PostSignal(AgentSignal),
}

/// A transition the task's phase does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a task that is {state} cannot take the event '{event}'")]
pub struct Illegal {
    pub state: &'static str,
    pub event: &'static str,
}

/// A busy slot's durable truth, `slots/<slot>.lock`: the serialized task. Present while the slot holds the task
/// (starting, in progress, waiting, abandoned); absent when the slot is free. Read by the recovery pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotLock {
    pub version: u32,
    pub slot: String,
    pub provider: String,
    pub issue: u64,
    /// The work on the issue; stays the same across resumes.
    pub task_id: String,
    /// The current run.
    pub run_id: String,
    /// Every run of the task, oldest first (the chain of resumes).
    pub runs: Vec<String>,
    pub phase: Phase,
    pub pid: Option<u32>,
    pub pgid: Option<u32>,
    /// Field 22 of /proc/<pid>/stat: with the boot id, tells this process from a later one with the same pid.
    pub start_time: Option<u64>,
    pub boot_id: String,
    pub session_id: Option<String>,
    pub cwd: PathBuf,
    pub program: String,
    pub args: Vec<String>,
    /// The task's original prompt (first run), for a restart when no session was captured.
    pub prompt_file: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// When the task was assigned.
    pub started_at: String,
    pub run_started_at: String,
    pub daemon_pid: u32,
    /// When automatic restarts happened (stale restarts, abandoned resumes, retries): the restart allowance.
    #[serde(default)]
    pub restarts: Vec<String>,
    /// The task's git worktree (its `cwd`) and branch, when it has one.
    #[serde(default)]
    pub worktree: Option<PathBuf>,
    #[serde(default)]
    pub branch: Option<String>,
    /// What the task is about in a few words (the issue title, else the prompt's first line).
    #[serde(default)]
    pub title: Option<String>,
    /// The task's status comment on its issue, once made.
    #[serde(default)]
    pub comment_id: Option<u64>,
    /// What the task's branch started from (`origin/main`, `main`): "changes" are commits beyond it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The current run's cgroup, when it has one (`containment: cgroup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The task was taken from a GitHub issue (not `assign --prompt`): its pull request may close the issue.
    #[serde(default)]
    pub from_issue: bool,
    /// The pull request the agent said it opened (`AUTONOMOUS_SIGNAL:PR:<n>`): updated rather than a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr: Option<u64>,
    /// What the current run said of its own end (needs info, blocked), kept so a crash before the end still ends
    /// the run as the agent said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<AgentSignal>,
    /// When the task asked its question: only answers after it count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked_at: Option<String>,
    /// A person said to go on past `budget.perTaskUsd` (`resume --over-budget`): the task budget no longer stops it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub over_budget: bool,
    /// With the fleet on: the version of the issue's claim this task holds (a claim commit, a NATS revision). After
    /// a restart, a claim that is no longer at this version was lost meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
}

impl SlotLock {
    /// A new task's record, with what is known before its first run: [`SlotLock::next_run`] names the run.
    pub fn new(slot: &str, provider: &str, issue: u64, cwd: PathBuf, prompt_file: PathBuf) -> SlotLock {
        let now = rfc3339(SystemTime::now());
        SlotLock {
            version: LOCK_VERSION,
            slot: slot.to_string(),
            provider: provider.to_string(),
            issue,
            task_id: ulid::Ulid::new().to_string(),
            run_id: String::new(),
            runs: Vec::new(),
            phase: Phase::Queued,
            pid: None,
            pgid: None,
            start_time: None,
            boot_id: String::new(),
            session_id: None,
            cwd,
            program: String::new(),
            args: Vec::new(),
            prompt_file,
            stdout: PathBuf::new(),
            stderr: PathBuf::new(),
            started_at: now.clone(),
            run_started_at: now,
            daemon_pid: 0,
            restarts: Vec::new(),
            worktree: None,
            branch: None,
            title: None,
            comment_id: None,
            base: None,
            cgroup: None,
            from_issue: false,
            pr: None,
            signal: None,
            asked_at: None,
            over_budget: false,
            claim: None,
        }
    }

    /// Makes the record name the task's next run (the first, a resume, a retry): the chain of runs grows and what
    /// belonged to the previous run's process goes. The conversation (session id) stays. The phase is left to
    /// [`Event::Continue`].
    pub fn next_run(&mut self, run_id: String, run_dir: &std::path::Path, boot_id: &str, daemon_pid: u32) {
        self.run_id = run_id.clone();
        self.runs.push(run_id);
        (self.pid, self.pgid, self.start_time, self.cgroup) = (None, None, None, None);
        self.signal = None;
        self.boot_id = boot_id.to_string();
        self.stdout = run_dir.join("stdout");
        self.stderr = run_dir.join("stderr");
        self.run_started_at = rfc3339(SystemTime::now());
        self.daemon_pid = daemon_pid;
    }

    pub fn state(&self) -> State {
        self.phase.state()
    }

    /// The one transition function: moves the task to its next phase and says what must be done. An event the
    /// phase does not allow changes nothing.
    pub fn on(&mut self, event: Event, policy: &Policy, now: SystemTime) -> Result<Vec<Effect>, Illegal> {
        use Effect::*;
        let illegal = Illegal { state: self.state().as_str(), event: event.name() };
        let resumable = match &self.phase {
            Phase::Queued | Phase::Abandoned { .. } | Phase::Waiting { .. } | Phase::Starting => true,
            Phase::Ended { cause, .. } => *cause != EndCause::Succeeded,
            Phase::Running { .. } => false,
        };
        let effects = match (&mut self.phase, event) {
            (Phase::Starting, Event::Continue { .. }) => return Err(illegal),
            (_, Event::Continue { counted }) if resumable => {
                if counted {
                    self.restarts.push(rfc3339(now));
                    // Only the allowance's window matters; older entries would only grow the lockfile.
                    let window = policy.allowance;
                    self.restarts.retain(|t| parse_rfc3339(t).is_some_and(|t| t + window.per > now));
                }
                self.phase = Phase::Starting;
                vec![Board(BoardWish::InProgress)]
            }
            (Phase::Starting, Event::Spawned) => {
                self.phase = Phase::Running { stale: false, stop: None };
                vec![WriteLock, Comment]
            }
            (Phase::Starting, Event::SpawnFailed(v)) => self.end(v),
            (Phase::Running { stale, .. }, Event::Alive) => {
                let was = std::mem::replace(stale, false);
                if was { vec![Comment] } else { vec![] }
            }
            (Phase::Running { stale: stale @ false, stop }, Event::Silent) => {
                *stale = true;
                let then = match policy.on_stale {
                    OnStale::Mark => None,
                    OnStale::Restart => Some(false),
                    OnStale::Reassign => Some(true),
                };
                match then {
                    Some(reassign) if stop.is_none() && policy.allowance.allows(&self.restarts, now) => {
                        *stop = Some(StopBy::Stale { reassign });
                        vec![WriteLock, SignalStop, Comment]
                    }
                    _ => vec![Comment],
                }
            }
            (Phase::Running { .. }, Event::Silent) => vec![],
            (Phase::Running { stop, .. }, Event::StopAsked(by)) => {
                // A person's stop or a shutdown overrides a policy's; the first of those stands.
                if stop.is_none() || matches!(stop, Some(StopBy::Stale { .. })) {
                    *stop = Some(by);
                }
                vec![WriteLock, SignalStop]
            }
            (Phase::Running { .. } | Phase::Starting, Event::RunEnded(v)) => self.after_run(v, policy, now),
            (Phase::Running { .. }, Event::Signal(signal)) => match signal {
                AgentSignal::Pr { number } if self.pr == Some(number) => vec![],
                AgentSignal::Pr { number } => {
                    self.pr = Some(number);
                    vec![WriteLock]
                }
                AgentSignal::Complete => vec![],
                // The same words twice (a marker, then the command) are said once.
                same if self.signal.as_ref() == Some(&same) => vec![],
                AgentSignal::NeedsInfo { question } => {
                    self.asked_at = Some(rfc3339(now));
                    self.signal = Some(AgentSignal::NeedsInfo { question: question.clone() });
                    vec![WriteLock, Board(BoardWish::NeedsInfo), PostSignal(AgentSignal::NeedsInfo { question })]
                }
                other => {
                    self.signal = Some(other.clone());
                    vec![WriteLock, PostSignal(other)]
                }
            },
            (Phase::Running { stop: Some(StopBy::User), .. }, Event::FoundDead { .. }) => {
                self.end(Verdict::new(EndCause::Stopped, "stopped by autodevctl stop (autodevd restarted meanwhile)"))
            }
            // Found dead again (a later start, a policy's note): the reason says why it stays.
            (Phase::Running { .. } | Phase::Starting | Phase::Abandoned { .. }, Event::FoundDead { reason }) => {
                // Nothing is written: the same facts give the same verdict at every start.
                self.phase = Phase::Abandoned { reason };
                vec![]
            }
            (Phase::Waiting { waiting_for, fallback, after, reason, .. }, Event::WaitOver) => {
                let counted = *waiting_for != WaitFor::UsageLimit;
                if counted && !policy.allowance.allows(&self.restarts, now) {
                    let why = format!(
                        "{reason}; not restarted: {} automatic restarts in {} already (resume it by hand)",
                        policy.allowance.count,
                        crate::timefmt::short_duration(policy.allowance.per.as_secs())
                    );
                    let cause = *after;
                    self.finish(cause, Some(why), None)
                } else {
                    vec![StartNext { fallback: *fallback }]
                }
            }
            (Phase::Abandoned { .. } | Phase::Waiting { .. }, Event::Release { done }) => {
                let by = if done { "released by autodevctl release --done" } else { "released by autodevctl release" };
                let cause = if done { EndCause::Succeeded } else { EndCause::Released };
                let mut effects = vec![RecordRun];
                effects.extend(self.finish(cause, Some(by.into()), None));
                effects
            }
            (Phase::Running { stop, .. }, Event::ClaimLost { why }) => {
                // Overrides any other stop: nothing of this run may reach the issue any more.
                *stop = Some(StopBy::ClaimLost { why });
                vec![WriteLock, SignalStop]
            }
            (Phase::Abandoned { .. } | Phase::Waiting { .. } | Phase::Starting, Event::ClaimLost { why }) => {
                self.end(Verdict::new(EndCause::ClaimLost, why))
            }
            (Phase::Abandoned { .. } | Phase::Waiting { .. } | Phase::Starting, Event::GiveUp { reason }) => {
                let cause = match &self.phase {
                    Phase::Waiting { after, .. } => *after,
                    _ => EndCause::Lost,
                };
                let mut effects = vec![RecordRun];
                effects.extend(self.finish(cause, Some(reason), None));
                effects
            }
            _ => return Err(illegal),
        };
        Ok(effects)
    }

    /// The end of a run decides what the task becomes: done, retried after a backoff, waiting for a usage limit,
    /// abandoned (a shutdown), or ended.
    fn after_run(&mut self, v: Verdict, policy: &Policy, now: SystemTime) -> Vec<Effect> {
        use Effect::*;
        let stop = self.phase.stop().cloned();
        // The issue is another machine's now (the run was stopped for it, or its push was refused for it): whatever
        // this run did or said stays here, unpublished.
        let lost = match &stop {
            Some(StopBy::ClaimLost { why }) => Some(why.clone()),
            _ if v.cause == EndCause::ClaimLost => Some(v.reason.clone().unwrap_or_else(|| "claim lost".into())),
            _ => None,
        };
        if let Some(why) = lost {
            self.signal = None;
            return self.end(Verdict::new(EndCause::ClaimLost, why));
        }
        // What the agent said of its end wins over how the run ended, unless a person or a shutdown stopped it.
        let said = self
            .signal
            .take()
            .filter(|_| !matches!(stop, Some(StopBy::User | StopBy::Shutdown { .. } | StopBy::Budget { .. })));
        match said {
            Some(AgentSignal::NeedsInfo { question }) => {
                self.phase = Phase::Waiting {
                    until: None,
                    waiting_for: WaitFor::Reply,
                    after: v.cause,
                    reason: format!("needs info: {question}"),
                    fallback: false,
                };
                return vec![RecordRun, WriteLock, Comment];
            }
            Some(AgentSignal::Blocked { why }) => {
                return self.end(Verdict { cause: EndCause::Blocked, reason: Some(format!("blocked: {why}")), ..v });
            }
            Some(AgentSignal::Failed { why }) => {
                let reason = Some(format!("the agent gave up: {why}"));
                return self.end(Verdict { cause: EndCause::Blocked, reason, ..v });
            }
            _ => {}
        }
        if v.cause == EndCause::Succeeded {
            // A run that finished its work just as a stop arrived is done: running it again would cost twice.
            let mut effects = self.end(v);
            if policy.pull_requests && self.branch.is_some() {
                // The board shows review once the pull request exists, which the outbox sees to.
                effects.iter_mut().filter(|e| **e == Board(BoardWish::Completed)).for_each(|e| *e = PullRequest);
            }
            return effects;
        }
        let wait = |waiting_for, until: SystemTime, after, reason: String, fallback| Phase::Waiting {
            until: Some(until),
            waiting_for,
            after,
            reason,
            fallback,
        };
        let reason = v.reason.clone().unwrap_or_else(|| v.cause.as_str().into());
        self.phase = match stop {
            Some(StopBy::User) => {
                return self.end(Verdict {
                    cause: EndCause::Stopped,
                    reason: Some("stopped by autodevctl stop".into()),
                    ..v
                });
            }
            Some(StopBy::Shutdown { why }) => {
                self.phase = Phase::Abandoned { reason: why };
                return vec![RecordRun, WriteLock, Comment];
            }
            Some(StopBy::Stale { reassign }) => {
                wait(WaitFor::Retry, now, EndCause::Stopped, "stale: stopped to run it again".into(), reassign)
            }
            Some(StopBy::Budget { why }) => {
                return self.end(Verdict { cause: EndCause::Budget, reason: Some(why), ..v });
            }
            // Ended above already; named for the match.
            Some(StopBy::ClaimLost { why }) => return self.end(Verdict::new(EndCause::ClaimLost, why)),
            None if v.cause == EndCause::UsageLimit => {
                let until = v.resets_at.filter(|t| *t > now).unwrap_or(now + USAGE_LIMIT_GUESS);
                wait(
                    WaitFor::UsageLimit,
                    until,
                    v.cause,
                    format!("usage limit until {}: {reason}", rfc3339(until)),
                    false,
                )
            }
            None if v.cause.retryable() && (self.runs.len() as u32) < policy.max_attempts => {
                let attempts = self.runs.len() as u32;
                let until = now + policy.backoff(attempts);
                let fallback = v.cause.provider_trouble() && policy.has_fallback;
                let why = format!("attempt {attempts} of {} failed ({reason}); retrying", policy.max_attempts);
                wait(WaitFor::Retry, until, v.cause, why, fallback)
            }
            None => return self.end(v),
        };
        let until = match &self.phase {
            Phase::Waiting { until: Some(t), .. } => *t,
            _ => now,
        };
        vec![RecordRun, WriteLock, WakeAt(until), Comment]
    }

    /// Ends the task with its run's verdict.
    fn end(&mut self, v: Verdict) -> Vec<Effect> {
        let mut effects = vec![Effect::RecordRun];
        effects.extend(self.finish(v.cause, v.reason, v.exit_code));
        effects
    }

    /// The task is over: the slot goes free once the end is recorded.
    fn finish(&mut self, cause: EndCause, reason: Option<String>, exit_code: Option<i32>) -> Vec<Effect> {
        use Effect::*;
        if cause == EndCause::ClaimLost {
            // However it came (a run that found its push refused by the claim): nothing written, nothing removed.
            self.phase = Phase::Ended { cause, reason, exit_code };
            return vec![FreeSlot];
        }
        self.phase = Phase::Ended { cause, reason, exit_code };
        let wish = if cause == EndCause::Succeeded { BoardWish::Completed } else { BoardWish::Failed };
        vec![Board(wish), FreeSlot, Comment, CleanupWorktree]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::parse_line;
    use Effect::*;

    fn policy() -> Policy {
        Policy {
            max_attempts: 3,
            backoff_secs: 10.0,
            has_fallback: true,
            allowance: Allowance { count: 3, per: Duration::from_secs(3600) },
            on_stale: OnStale::Mark,
            pull_requests: false,
        }
    }

    fn task(phase: Phase, runs: usize) -> SlotLock {
        let mut t = SlotLock::new("claude-1", "claude", 7, PathBuf::from("/w"), PathBuf::from("/p"));
        t.runs = (0..runs).map(|i| format!("r{i}")).collect();
        t.phase = phase;
        t
    }

    fn running(stop: Option<StopBy>) -> Phase {
        Phase::Running { stale: false, stop }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn transitions() {
        let p = policy();
        let now = at(0);
        let ended = |cause| Phase::Ended { cause, reason: Some("x".into()), exit_code: Some(1) };
        let fail =
            |cause| Event::RunEnded(Verdict { cause, reason: Some("x".into()), exit_code: Some(1), resets_at: None });
        let done = Event::RunEnded(Verdict {
            cause: EndCause::Succeeded,
            reason: Some("x".into()),
            exit_code: Some(0),
            resets_at: None,
        });
        let free = |wish| vec![RecordRun, Board(wish), FreeSlot, Comment, CleanupWorktree];
        let waits = |until| vec![RecordRun, WriteLock, WakeAt(until), Comment];
        // (from, runs so far, event, expected state, expected effects)
        let table: Vec<(Phase, usize, Event, State, Vec<Effect>)> = vec![
            (Phase::Queued, 0, Event::Continue { counted: false }, State::Starting, vec![Board(BoardWish::InProgress)]),
            (Phase::Starting, 1, Event::Spawned, State::InProgress, vec![WriteLock, Comment]),
            (
                Phase::Starting,
                1,
                Event::SpawnFailed(Verdict::new(EndCause::CliMissing, "x")),
                State::Failed,
                free(BoardWish::Failed),
            ),
            (running(None), 1, done.clone(), State::Completed, free(BoardWish::Completed)),
            // Finished just as a stop came: done, not stopped.
            (running(Some(StopBy::User)), 1, done.clone(), State::Completed, free(BoardWish::Completed)),
            (running(Some(StopBy::User)), 1, fail(EndCause::Killed), State::Failed, free(BoardWish::Failed)),
            (
                running(Some(StopBy::Shutdown { why: "w".into() })),
                1,
                fail(EndCause::Killed),
                State::Abandoned,
                vec![RecordRun, WriteLock, Comment],
            ),
            (running(Some(StopBy::Stale { reassign: false })), 1, fail(EndCause::Killed), State::Waiting, waits(now)),
            (running(None), 1, fail(EndCause::ProviderError), State::Waiting, waits(now + Duration::from_secs(10))),
            (running(None), 2, fail(EndCause::AgentError), State::Waiting, waits(now + Duration::from_secs(20))),
            // No attempts left; errors a retry cannot fix.
            (running(None), 3, fail(EndCause::AgentError), State::Failed, free(BoardWish::Failed)),
            (running(None), 1, fail(EndCause::AuthError), State::Failed, free(BoardWish::Failed)),
            (running(None), 1, fail(EndCause::UsageLimit), State::Waiting, waits(now + USAGE_LIMIT_GUESS)),
            (running(None), 1, Event::Alive, State::InProgress, vec![]),
            (Phase::Running { stale: true, stop: None }, 1, Event::Alive, State::InProgress, vec![Comment]),
            (running(None), 1, Event::Silent, State::Stale, vec![Comment]),
            (running(None), 1, Event::StopAsked(StopBy::User), State::InProgress, vec![WriteLock, SignalStop]),
            (running(None), 1, Event::FoundDead { reason: "gone".into() }, State::Abandoned, vec![]),
            (
                running(Some(StopBy::User)),
                1,
                Event::FoundDead { reason: "gone".into() },
                State::Failed,
                free(BoardWish::Failed),
            ),
            (
                Phase::Abandoned { reason: "r".into() },
                1,
                Event::Continue { counted: true },
                State::Starting,
                vec![Board(BoardWish::InProgress)],
            ),
            (
                ended(EndCause::Stopped),
                1,
                Event::Continue { counted: false },
                State::Starting,
                vec![Board(BoardWish::InProgress)],
            ),
            (
                Phase::Abandoned { reason: "r".into() },
                1,
                Event::Release { done: true },
                State::Completed,
                free(BoardWish::Completed),
            ),
            (
                Phase::Abandoned { reason: "r".into() },
                1,
                Event::GiveUp { reason: "p".into() },
                State::Failed,
                free(BoardWish::Failed),
            ), // The fleet's claim is lost: the run stops, then the task ends with no write for the issue, even when the
            // run completed meanwhile; a task that is not running ends at once.
            (
                running(Some(StopBy::User)),
                1,
                Event::ClaimLost { why: "w".into() },
                State::InProgress,
                vec![WriteLock, SignalStop],
            ),
            (
                running(Some(StopBy::ClaimLost { why: "w".into() })),
                1,
                done.clone(),
                State::Failed,
                vec![RecordRun, FreeSlot],
            ),
            (
                running(Some(StopBy::ClaimLost { why: "w".into() })),
                1,
                fail(EndCause::Killed),
                State::Failed,
                vec![RecordRun, FreeSlot],
            ),
            (
                Phase::Abandoned { reason: "r".into() },
                1,
                Event::ClaimLost { why: "w".into() },
                State::Failed,
                vec![RecordRun, FreeSlot],
            ),
            (
                Phase::Waiting {
                    until: None,
                    waiting_for: WaitFor::Reply,
                    after: EndCause::Succeeded,
                    reason: "q".into(),
                    fallback: false,
                },
                1,
                Event::ClaimLost { why: "w".into() },
                State::Failed,
                vec![RecordRun, FreeSlot],
            ),
        ];
        for (i, (from, runs, event, state, effects)) in table.into_iter().enumerate() {
            let mut t = task(from.clone(), runs);
            let got = t.on(event.clone(), &p, now).unwrap_or_else(|e| panic!("row {i}: {from:?} + {event:?}: {e}"));
            assert_eq!((t.state(), got), (state, effects), "row {i}: {from:?} + {event:?}");
        }
    }

    #[test]
    fn a_completed_branch_asks_for_a_pull_request_and_the_board_waits_for_it() {
        let mut p = policy();
        p.pull_requests = true;
        let end = |cause| Event::RunEnded(Verdict::new(cause, "x"));
        let on_branch = |branch: Option<&str>| {
            let mut t = task(running(None), 1);
            t.branch = branch.map(str::to_string);
            t
        };
        // (branch, cause, expected effects)
        let table = [
            (Some("b"), EndCause::Succeeded, vec![RecordRun, PullRequest, FreeSlot, Comment, CleanupWorktree]),
            // No branch of its own (the workspace is no git repository): nothing to review.
            (
                None,
                EndCause::Succeeded,
                vec![RecordRun, Board(BoardWish::Completed), FreeSlot, Comment, CleanupWorktree],
            ),
            (
                Some("b"),
                EndCause::PushFailed,
                vec![RecordRun, Board(BoardWish::Failed), FreeSlot, Comment, CleanupWorktree],
            ),
            (
                Some("b"),
                EndCause::CommitFailed,
                vec![RecordRun, Board(BoardWish::Failed), FreeSlot, Comment, CleanupWorktree],
            ),
            (
                Some("b"),
                EndCause::NoChanges,
                vec![RecordRun, Board(BoardWish::Failed), FreeSlot, Comment, CleanupWorktree],
            ),
        ];
        for (i, (branch, cause, effects)) in table.into_iter().enumerate() {
            let mut t = on_branch(branch);
            assert_eq!(t.on(end(cause), &p, at(0)).unwrap(), effects, "row {i}: {cause:?} on {branch:?}");
            assert!(!cause.retryable(), "{cause:?} would end the same way again");
        }
    }

    #[test]
    fn markers_are_whole_lines_of_a_known_kind() {
        let table = [
            (
                "AUTONOMOUS_SIGNAL:NEEDS_INFO: Which API version?",
                Some(AgentSignal::NeedsInfo { question: "Which API version?".into() }),
            ),
            (
                "  AUTONOMOUS_SIGNAL:BLOCKED:no access to the staging DB  ",
                Some(AgentSignal::Blocked { why: "no access to the staging DB".into() }),
            ),
            ("AUTONOMOUS_SIGNAL:FAILED", Some(AgentSignal::Failed { why: "(no reason given)".into() })),
            ("AUTONOMOUS_SIGNAL:PR:#42", Some(AgentSignal::Pr { number: 42 })),
            ("AUTONOMOUS_SIGNAL:COMPLETE", Some(AgentSignal::Complete)),
            ("AUTONOMOUS_SIGNAL:PR:soon", None),
            ("AUTONOMOUS_SIGNAL:PR:0", None),
            ("AUTONOMOUS_SIGNAL:SHRUG:x", None),
            // Only a whole line: prose that mentions the marker is not one.
            ("I will print AUTONOMOUS_SIGNAL:BLOCKED:x when stuck", None),
            ("", None),
        ];
        for (line, expected) in table {
            assert_eq!(AgentSignal::from_marker_line(line), expected, "{line:?}");
        }
    }

    #[test]
    fn what_the_agent_says_decides_its_end_unless_a_person_stopped_it() {
        let p = policy();
        let now = at(0);
        let ask = AgentSignal::NeedsInfo { question: "Which API?".into() };
        let done = || Event::RunEnded(Verdict::new(EndCause::Succeeded, "success"));
        let mut t = task(running(None), 1);
        assert_eq!(
            t.on(Event::Signal(ask.clone()), &p, now).unwrap(),
            vec![WriteLock, Board(BoardWish::NeedsInfo), PostSignal(ask.clone())]
        );
        assert_eq!(t.on(Event::Signal(ask.clone()), &p, now).unwrap(), vec![], "said twice, posted once");
        assert_eq!(t.on(done(), &p, now).unwrap(), vec![RecordRun, WriteLock, Comment]);
        assert!(
            matches!(&t.phase, Phase::Waiting { until: None, waiting_for: WaitFor::Reply, reason, .. } if reason == "needs info: Which API?"),
            "{:?}",
            t.phase
        );
        // A reply continues it (the resume), which the allowance does not count.
        assert_eq!(t.on(Event::Continue { counted: false }, &p, now).unwrap(), vec![Board(BoardWish::InProgress)]);

        // (signal, stop, run's cause, expected state, expected cause)
        let blocked = AgentSignal::Blocked { why: "no access".into() };
        let gave_up = AgentSignal::Failed { why: "tests cannot run".into() };
        let table = [
            (blocked.clone(), None, EndCause::Succeeded, State::Failed, Some(EndCause::Blocked)),
            (gave_up, None, EndCause::AgentError, State::Failed, Some(EndCause::Blocked)),
            (ask.clone(), None, EndCause::ProviderError, State::Waiting, None),
            (blocked, Some(StopBy::User), EndCause::Killed, State::Failed, Some(EndCause::Stopped)),
            (ask, Some(StopBy::Shutdown { why: "w".into() }), EndCause::Killed, State::Abandoned, None),
        ];
        for (i, (signal, stop, cause, state, end)) in table.into_iter().enumerate() {
            let mut t = task(running(None), 1);
            t.on(Event::Signal(signal), &p, now).unwrap();
            if let Some(by) = stop {
                t.on(Event::StopAsked(by), &p, now).unwrap();
            }
            t.on(Event::RunEnded(Verdict::new(cause, "x")), &p, now).unwrap();
            assert_eq!((t.state(), t.phase.end_cause()), (state, end), "row {i}: {:?}", t.phase);
            assert_eq!(t.signal, None, "row {i}: a signal belongs to its run");
        }

        let mut t = task(running(None), 1);
        assert_eq!(t.on(Event::Signal(AgentSignal::Pr { number: 7 }), &p, now).unwrap(), vec![WriteLock]);
        assert_eq!(t.pr, Some(7));
        let mut idle = task(Phase::Abandoned { reason: "r".into() }, 1);
        assert!(idle.on(Event::Signal(AgentSignal::Complete), &p, now).is_err(), "only a running task signals");
    }

    #[test]
    fn illegal_events_change_nothing() {
        let p = policy();
        for (from, event) in [
            (
                Phase::Ended { cause: EndCause::Succeeded, reason: None, exit_code: Some(0) },
                Event::Continue { counted: false },
            ),
            (running(None), Event::Release { done: false }),
            (Phase::Abandoned { reason: "r".into() }, Event::StopAsked(StopBy::User)),
            (Phase::Queued, Event::Spawned),
            (Phase::Abandoned { reason: "r".into() }, Event::WaitOver),
        ] {
            let mut t = task(from.clone(), 1);
            assert!(t.on(event.clone(), &p, at(0)).is_err(), "{from:?} + {event:?}");
            assert_eq!(t.phase, from);
        }
    }

    #[test]
    fn stale_policy_stops_within_the_allowance_only() {
        let mut p = policy();
        p.on_stale = OnStale::Reassign;
        let now = at(10_000);
        let mut t = task(running(None), 1);
        assert_eq!(t.on(Event::Silent, &p, now).unwrap(), vec![WriteLock, SignalStop, Comment]);
        assert_eq!(t.phase, Phase::Running { stale: true, stop: Some(StopBy::Stale { reassign: true }) });
        let v = Verdict::new(EndCause::Killed, "killed");
        t.on(Event::RunEnded(v), &p, now).unwrap();
        assert!(matches!(t.phase, Phase::Waiting { waiting_for: WaitFor::Retry, fallback: true, .. }), "{:?}", t.phase);

        // Three automatic restarts within the hour: the fourth is not made.
        let mut t = task(running(None), 1);
        t.restarts = (1..=3).map(|m| rfc3339(now - Duration::from_secs(m * 60))).collect();
        assert_eq!(t.on(Event::Silent, &p, now).unwrap(), vec![Comment]);
        assert_eq!(t.state(), State::Stale);
        // An hour later, they are forgotten.
        let mut t2 = task(running(None), 1);
        t2.restarts = t.restarts.clone();
        assert_eq!(t2.on(Event::Silent, &p, now + Duration::from_secs(3600)).unwrap()[1], SignalStop);
    }

    #[test]
    fn waits_end_in_the_next_run_or_in_the_allowance() {
        let p = policy();
        let now = at(0);
        let waiting = |waiting_for| Phase::Waiting {
            until: Some(now),
            waiting_for,
            after: EndCause::AgentError,
            reason: "r".into(),
            fallback: false,
        };
        let mut t = task(waiting(WaitFor::Retry), 1);
        assert_eq!(t.on(Event::WaitOver, &p, now).unwrap(), vec![StartNext { fallback: false }]);
        t.on(Event::Continue { counted: true }, &p, now).unwrap();
        assert_eq!((t.state(), t.restarts.len()), (State::Starting, 1));

        let full: Vec<String> = (0..3).map(|_| rfc3339(now)).collect();
        let mut t = task(waiting(WaitFor::Retry), 1);
        t.restarts = full.clone();
        t.on(Event::WaitOver, &p, now).unwrap();
        assert_eq!(t.phase.end_cause(), Some(EndCause::AgentError));
        assert!(t.phase.reason().unwrap().contains("3 automatic restarts in 1h00m"), "{:?}", t.phase);
        // A usage limit's end is not a restart the allowance counts.
        let mut t = task(waiting(WaitFor::UsageLimit), 1);
        t.restarts = full;
        assert_eq!(t.on(Event::WaitOver, &p, now).unwrap(), vec![StartNext { fallback: false }]);
    }

    #[test]
    fn the_phase_round_trips_through_the_lockfile() {
        for phase in [
            Phase::Starting,
            running(Some(StopBy::Shutdown { why: "w".into() })),
            Phase::Waiting {
                until: Some(at(5)),
                waiting_for: WaitFor::UsageLimit,
                after: EndCause::UsageLimit,
                reason: "r".into(),
                fallback: false,
            },
            Phase::Abandoned { reason: "r".into() },
        ] {
            let t = task(phase, 1);
            let text = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<SlotLock>(&text).unwrap(), t, "{text}");
        }
    }

    fn outcome_of(format: EventFormat, lines: &str) -> Option<Outcome> {
        lines.lines().filter_map(|l| parse_line(format, l).outcome).next_back()
    }

    fn sample(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cli-samples").join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn end_causes_come_from_typed_facts() {
        use EventFormat::*;
        let code = |c| Ok(ExitInfo::Code(c));
        let claude_err = |extra: &str| {
            format!(
                r#"{{"type":"result","subtype":"success","is_error":true,"result":"fixed bug #1502 and the 429 handler","num_turns":1{extra}}}"#
            )
        };
        type Case = (EventFormat, Result<ExitInfo, String>, Option<String>, EndCause);
        let cases: Vec<Case> = vec![
            // Real samples.
            (Claude, code(0), Some(sample("claude-tool-use.jsonl")), EndCause::Succeeded),
            (Gemini, code(0), Some(sample("gemini-text.jsonl")), EndCause::Succeeded),
            (Codex, code(0), Some(sample("codex-tool-use.jsonl")), EndCause::Succeeded),
            // The agent's words never decide: "#1502" and "429" in its text are not statuses.
            (Claude, code(1), Some(claude_err("")), EndCause::AgentError),
            (Claude, code(1), Some(claude_err(r#","api_error_status":502"#)), EndCause::ProviderError),
            (Claude, code(1), Some(claude_err(r#","api_error_status":401"#)), EndCause::AuthError),
            (Claude, code(1), Some(claude_err(r#","api_error_status":429"#)), EndCause::UsageLimit),
            (
                Claude,
                code(1),
                Some(r#"{"type":"result","is_error":true,"result":"Claude AI usage limit reached|1900000000"}"#.into()),
                EndCause::UsageLimit,
            ),
            (
                Gemini,
                code(1),
                Some(
                    r#"{"type":"result","status":"error","error":{"type":"FatalError","message":"quota 429"}}"#.into(),
                ),
                EndCause::AgentError,
            ),
            (
                Gemini,
                code(244),
                Some(r#"{"type":"result","status":"error","error":{"type":"ApiError","message":"x"}}"#.into()),
                EndCause::ProviderError,
            ),
            (Gemini, code(41), None, EndCause::AuthError),
            (
                Gemini,
                code(1),
                Some(r#"{"type":"result","status":"error","error":{"message":"x","code":503}}"#.into()),
                EndCause::ProviderError,
            ),
            (
                Codex,
                code(1),
                Some(r#"{"type":"turn.failed","error":{"message":"stream disconnected"}}"#.into()),
                EndCause::ProviderError,
            ),
            (Codex, code(0), None, EndCause::NoResult),
            (Text, code(0), None, EndCause::Succeeded),
            (Text, code(3), None, EndCause::AgentError),
            (Claude, Ok(ExitInfo::Signal(9)), None, EndCause::Killed),
            (Claude, Ok(ExitInfo::Unknown), None, EndCause::Lost),
            (Claude, Ok(ExitInfo::Unknown), Some(sample("claude-text.jsonl")), EndCause::Succeeded),
            (Claude, Err("pidfd".into()), None, EndCause::Lost),
            // Exit 0 with a failed final event, and the other way round.
            (Claude, code(0), Some(claude_err("")), EndCause::AgentError),
            (Codex, code(1), Some(sample("codex-text.jsonl")), EndCause::AgentError),
        ];
        for (i, (format, exit, events, cause)) in cases.into_iter().enumerate() {
            let outcome = events.as_deref().and_then(|e| outcome_of(format, e));
            let v = verdict(format, &exit, outcome.as_ref(), None);
            assert_eq!(v.cause, cause, "case {i}: {format:?} {exit:?} {events:?}: {v:?}");
        }
        let limited = outcome_of(
            Claude,
            r#"{"type":"result","is_error":true,"result":"Claude AI usage limit reached|1900000000"}"#,
        );
        let v = verdict(Claude, &code(1), limited.as_ref(), None);
        assert_eq!(v.resets_at, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000)));
    }
}
