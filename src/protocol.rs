//! The control-socket protocol: request/response types and their framing, shared by autodevd and autodevctl.
//!
//! A frame is one kind byte (`J` for a JSON document, `B` for raw bytes), a big-endian u32 payload length, then the
//! payload. Requests are JSON frames capped at [`MAX_REQUEST_FRAME`]; a reply is one JSON frame, except `logs`,
//! which streams chunk frames and ends with a JSON frame. Every request carries the protocol version.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Bumped when a request or reply changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;
/// A request larger than this is refused before it is read (a prompt travels inside `assign`).
/// The largest legitimate request is an `assign` with a 1 MiB prompt; JSON escapes a control byte as six bytes.
pub const MAX_REQUEST_FRAME: usize = (6 << 20) + (64 << 10);
/// A reply larger than this is refused by the client (status of hundreds of slots stays far below it).
pub const MAX_REPLY_FRAME: usize = 64 << 20;

const KIND_JSON: u8 = b'J';
const KIND_BYTES: u8 = b'B';

/// What autodevctl asks of autodevd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping,
    Status,
    Instances,
    Assign {
        issue: u64,
        #[serde(default)]
        llm: Option<String>,
        #[serde(default)]
        slot: Option<String>,
        /// The task; `None` takes it from the GitHub issue.
        #[serde(default)]
        prompt: Option<String>,
        /// Take over an issue whose Assigned Instance names someone else, and ignore label rules.
        #[serde(default)]
        force: bool,
        /// With no free slot, wait in the local queue instead of being refused.
        #[serde(default)]
        queue: bool,
    },
    /// What waits to run, in the order it will be taken: the local queue, then the board's Ready items.
    Queue,
    /// Takes an issue out of the local queue.
    Unqueue {
        issue: u64,
    },
    /// The autopilot: `set` switches it (`None`: only say how it stands).
    Autopilot {
        #[serde(default)]
        set: Option<AutopilotSet>,
    },
    /// The GitHub side: project, fields, token, pending board updates.
    ProjectStatus,
    /// The fleet: the machines seen, their heartbeats, their claims.
    Fleet,
    Stop {
        slot: String,
    },
    /// Continue a slot's abandoned, failed, stopped or waiting task in the same conversation; `prompt` is what the
    /// conversation continues with (a person's answer to the agent's question).
    Resume {
        slot: String,
        #[serde(default)]
        prompt: Option<String>,
        /// Go on although the task spent its budget (`budget.perTaskUsd`).
        #[serde(default)]
        over_budget: bool,
    },
    /// End a slot's abandoned task (as failed, or completed with `done`) and free the slot.
    Release {
        slot: String,
        #[serde(default)]
        done: bool,
    },
    /// A progress report from inside a run (`autodevctl progress`); refused from anything else.
    Progress {
        slot: String,
        run_id: String,
        percent: u8,
        #[serde(default)]
        message: String,
    },
    /// What the agent says of its task, from inside its run (`autodevctl signal`); refused from anything else.
    Signal {
        slot: String,
        run_id: String,
        signal: crate::task::AgentSignal,
    },
    /// Finished runs, newest last.
    History {
        #[serde(default)]
        issue: Option<u64>,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// The dashboard's URL with its token; `rotate` makes a new token first.
    DashboardUrl {
        #[serde(default)]
        rotate: bool,
    },
    /// The live feed: the full status now, then what changed (at most a few frames a second), until the client
    /// hangs up. For `autodevctl top` and the dashboard.
    Subscribe,
    /// Finished runs added up: all of them, or by issue, LLM or local day.
    HistorySum {
        #[serde(default)]
        issue: Option<u64>,
        #[serde(default)]
        by: Option<SumBy>,
    },
    /// Every worktree autodev made; with `prune`, remove the ones that are safe to remove.
    Workspaces {
        #[serde(default)]
        prune: bool,
    },
    Logs {
        slot: String,
        /// Last N lines; `None` means the whole log.
        #[serde(default)]
        lines: Option<usize>,
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        raw: bool,
        #[serde(default)]
        stderr: bool,
    },
}

/// The versioned wrapper every request travels in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub v: u32,
    pub request: Request,
}

/// What autodevd answers. `logs` answers with `Chunk` frames and one closing `LogEnd`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Pong {
        version: u32,
        daemon_pid: u32,
    },
    Status(StatusReport),
    Instances {
        providers: Vec<ProviderUsage>,
    },
    Assigned(Assigned),
    Stopped {
        slot: String,
        issue: u64,
        run_id: String,
    },
    Resumed(Assigned),
    Released {
        slot: String,
        issue: u64,
        state: SlotState,
    },
    Workspaces(WorkspacesReport),
    ProjectStatus(ProjectReport),
    ProgressNoted {
        slot: String,
        percent: u8,
    },
    Queued {
        issue: u64,
        place: usize,
    },
    Queue {
        entries: Vec<QueueEntry>,
    },
    Unqueued {
        issue: u64,
    },
    Autopilot(AutopilotReport),
    Fleet(FleetReport),
    SignalNoted {
        slot: String,
    },
    History {
        runs: Vec<HistoryRun>,
    },
    HistorySum {
        rows: Vec<SumRow>,
    },
    DashboardUrl {
        url: String,
    },
    /// A frame of the live feed: `full`, the whole status; else the header and only the slot rows that changed.
    Feed {
        full: bool,
        report: StatusReport,
    },
    LogEnd {
        slot: String,
        run_id: String,
        state: SlotState,
    },
    Error(ErrorReply),
}

/// A refusal or failure, with what to do about it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Before each console-preview line that came from the run's stderr (not the agent's events).
pub const STDERR_MARK: &str = "stderr: ";

/// The variable through which autodevd hands the GitHub token to `autodevctl` acting as git's `GIT_ASKPASS` (set
/// only in the environment of the one `git push` that may need it).
pub const ASKPASS_TOKEN_VAR: &str = "AUTODEV_ASKPASS_TOKEN";
/// The only host the askpass answers for (git names it in its prompt).
pub const ASKPASS_HOST_VAR: &str = "AUTODEV_ASKPASS_HOST";

/// A refusal or failure for the client, with what to do about it.
pub fn refuse(kind: ErrorKind, message: String, hint: Option<String>) -> ErrorReply {
    ErrorReply { kind, message, hint }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request could not be decoded or is not understood.
    BadRequest,
    /// The request names something that does not exist (slot, provider, run).
    NotFound,
    /// The request conflicts with current state (busy slot, issue already held, no free slot).
    Conflict,
    /// The request was accepted but the work could not start (CLI missing, spawn failed, disk error).
    Failed,
    /// The client speaks another protocol version.
    Version,
}

/// The seed's state words, plus `queued` and `waiting`. The wire's own type: the daemon's task phases map onto it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    Ready,
    /// Waits for a free slot; holds none.
    Queued,
    Starting,
    InProgress,
    /// Running, but no output, progress or CPU for `health.staleAfterSecs`.
    Stale,
    /// Holds its slot until `waiting_until` (a retry's backoff, a usage limit) or a reply, then goes on by itself.
    Waiting,
    /// Its run died while autodevd was not watching (crash, reboot, shutdown): the slot stays held by the issue
    /// until the task is resumed or released.
    Abandoned,
    Completed,
    Failed,
}

impl SlotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Ready => "ready",
            SlotState::Queued => "queued",
            SlotState::Starting => "starting",
            SlotState::InProgress => "in_progress",
            SlotState::Stale => "stale",
            SlotState::Waiting => "waiting",
            SlotState::Abandoned => "abandoned",
            SlotState::Completed => "completed",
            SlotState::Failed => "failed",
        }
    }

    /// A run is going (or about to).
    pub fn is_running(self) -> bool {
        matches!(self, SlotState::Starting | SlotState::InProgress | SlotState::Stale)
    }

    /// The slot belongs to its issue: `assign` may not take it, and the issue may not go elsewhere.
    pub fn holds_slot(self) -> bool {
        matches!(
            self,
            SlotState::Starting | SlotState::InProgress | SlotState::Stale | SlotState::Waiting | SlotState::Abandoned
        )
    }
}

impl From<crate::task::State> for SlotState {
    fn from(state: crate::task::State) -> SlotState {
        use crate::task::State;
        match state {
            State::Ready => SlotState::Ready,
            State::Queued => SlotState::Queued,
            State::Starting => SlotState::Starting,
            State::InProgress => SlotState::InProgress,
            State::Stale => SlotState::Stale,
            State::Waiting => SlotState::Waiting,
            State::Abandoned => SlotState::Abandoned,
            State::Completed => SlotState::Completed,
            State::Failed => SlotState::Failed,
        }
    }
}

/// The restart allowance of a task: automatic restarts used in the window, of how many.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Restarts {
    pub used: u32,
    pub allowed: u32,
    pub per_secs: u64,
}

/// One finished run in `history`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryRun {
    pub run_id: String,
    pub task_id: String,
    pub slot: String,
    pub provider: String,
    pub issue: u64,
    /// `completed`, `failed` or `abandoned`.
    pub state: String,
    /// Why, as a typed word (`succeeded`, `agent_error`, …); null for old records of failed runs.
    pub end_cause: Option<String>,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: String,
    pub ended_at: String,
    pub duration_secs: u64,
    pub session_id: Option<String>,
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cost_estimated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<crate::provider::Usage>,
    pub turns: Option<u64>,
    /// The runs of the task up to and including this one.
    pub runs: Vec<String>,
    pub branch: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon_pid: u32,
    pub state_dir: String,
    pub config_path: Option<String>,
    pub slots: Vec<SlotStatus>,
    /// Things the user should know that belong to no slot (e.g. a corrupt lockfile moved aside).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The seed's overall view.
    pub summary: Summary,
    /// How runs' processes are kept together: `cgroup` (a cgroup per run) or `process-group`.
    #[serde(default)]
    pub containment: String,
    /// Where runs' cgroups live, or why there are none.
    #[serde(default)]
    pub containment_note: String,
    /// Cgroup controllers the runs' cgroups have (for `llms.<name>.limits`).
    #[serde(default)]
    pub cgroup_controllers: Vec<String>,
    /// Tasks in the local queue (`assign --queue`), first to run first. They hold no slot.
    #[serde(default)]
    pub queued: Vec<QueueEntry>,
    /// Whether the autopilot feeds free slots from the board.
    #[serde(default)]
    pub autopilot: bool,
    /// This machine in the fleet, when `fleet.enabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetSummary>,
}

/// The fleet at a glance, for `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetSummary {
    pub machine: String,
    pub backend: String,
    /// Machines seen (this one included).
    pub machines: usize,
    pub claims_here: usize,
    pub claims_elsewhere: usize,
    /// Seconds since this machine's heartbeat was last renewed; `None` before the first.
    pub renewed_secs_ago: Option<u64>,
    pub last_error: Option<String>,
}

/// `autodevctl fleet`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetReport {
    pub summary: FleetSummary,
    pub heartbeat_secs: f64,
    pub stale_after_secs: f64,
    pub machines: Vec<FleetMachine>,
    pub claims: Vec<FleetClaim>,
    /// When the store was last read (RFC 3339).
    pub read_at: Option<String>,
    /// Requests this machine sent to the store since autodevd started: writes, reads.
    pub writes: u64,
    pub reads: u64,
    /// Seconds since autodevd started (for requests per hour).
    pub uptime_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetMachine {
    pub name: String,
    /// Seconds this machine has seen its heartbeat unchanged (this machine: since its last renewal).
    pub heartbeat_unchanged_secs: u64,
    /// Its claims may be taken over (its heartbeat unchanged for `staleAfterSecs` plus a margin).
    pub stale: bool,
    pub this: bool,
    /// Slots its claims name.
    pub busy_slots: Vec<String>,
    pub claims: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetClaim {
    pub issue: u64,
    pub machine: String,
    pub slot: String,
    pub epoch: u64,
    /// `<slot>@<machine>`, as Assigned Instance shows it.
    pub instance: String,
}

/// What `history --sum` groups by.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SumBy {
    Issue,
    Llm,
    Day,
}

/// Runs added up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SumRow {
    /// The issue, LLM or day (`all` without `by`).
    pub key: String,
    pub runs: u64,
    pub cost_usd: f64,
    /// Some of the cost is tokens × pricing.
    pub cost_estimated: bool,
    /// Runs that reported no cost (and have no pricing): not in `cost_usd`.
    pub runs_without_cost: u64,
    pub tokens: crate::provider::Usage,
    pub duration_secs: u64,
}

/// `autopilot on|off|reset`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AutopilotSet {
    On,
    Off,
    /// Back to what the config says.
    Reset,
}

/// How the autopilot stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AutopilotReport {
    pub on: bool,
    /// `config` (`autopilot.enabled`) or `override` (`autodevctl autopilot on|off`, until `reset`).
    pub source: String,
    /// Why it cannot take anything even when on (GitHub off, no project), if so.
    pub blocked: Option<String>,
    pub poll_secs: f64,
    pub last_read_at: Option<String>,
    pub last_error: Option<String>,
    /// Requests the autopilot's board reads took since autodevd started.
    pub requests: u64,
    /// Turns of the autopilot's loop since autodevd started (each decides what to take).
    pub turns: u64,
}

/// One task waiting to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueEntry {
    pub issue: u64,
    pub title: Option<String>,
    pub priority: Option<String>,
    pub llm: Option<String>,
    /// `local` (`assign --queue`) or `board` (a Ready item).
    pub source: String,
    /// Why it waits, when it does (no free slot for its LLM, a usage limit until …, held elsewhere).
    pub reason: Option<String>,
}

/// Instances and tasks at a glance (seed 000's aggregated view).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub instances_total: usize,
    /// Running and not stale.
    pub instances_healthy: usize,
    pub instances_stale: usize,
    /// Tasks in the recent history plus the ones running now.
    pub tasks_total: usize,
    pub tasks_completed: usize,
    pub tasks_in_progress: usize,
    /// Completed ÷ finished, over the recent history (`None` before any task finished).
    pub success_rate: Option<f64>,
    pub average_duration_secs: Option<u64>,
}

/// One row of `status`: the slot and its current (or last) task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SlotStatus {
    pub slot: String,
    pub provider: String,
    pub state: SlotState,
    pub issue: Option<u64>,
    pub task_id: Option<String>,
    pub run_id: Option<String>,
    /// Every run of the task, oldest first: resumes add to it.
    pub runs: Vec<String>,
    /// The task's git worktree and branch, when it has one.
    pub worktree: Option<String>,
    pub branch: Option<String>,
    /// Once a run ended: commits on the branch beyond its base, and whether there is work to review (commits, or
    /// a worktree with changes). `null` before, and for tasks without a worktree.
    #[serde(default)]
    pub commits: Option<u64>,
    #[serde(default)]
    pub changes: Option<bool>,
    /// The task's pull request, once one is opened or owed; `note` says what is pending or went wrong.
    #[serde(default)]
    pub pr: Option<PullRequestRef>,
    /// With the fleet on: the issue's claim is held by another machine (`<slot>@<machine>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_elsewhere: Option<String>,
    pub pid: Option<u32>,
    /// The run was adopted after a restart of autodevd: its exit code cannot be known.
    pub adopted: bool,
    pub started_at: Option<String>,
    pub last_output_at: Option<String>,
    pub ended_at: Option<String>,
    pub session_id: Option<String>,
    pub exit_code: Option<i32>,
    /// Why an ended task ended (`succeeded`, `agent_error`, `provider_error`, `usage_limit`, `auth_error`,
    /// `cli_missing`, `spawn_failed`, `stopped`, `killed`, `lost`, `no_result`, `disk_full`, `released`); more may
    /// come: a client treats an unknown one as a failure.
    pub end_cause: Option<String>,
    pub reason: Option<String>,
    /// A waiting task goes on by itself at this time (RFC 3339; null: when a reply comes).
    pub waiting_until: Option<String>,
    /// `retry`, `usage_limit` or `reply`.
    pub waiting_for: Option<String>,
    /// Automatic restarts used of the task's allowance.
    pub restarts: Option<Restarts>,
    pub cost_usd: Option<f64>,
    /// The cost is tokens × the configured pricing (the CLI reported none).
    #[serde(default)]
    pub cost_estimated: bool,
    /// Tokens of the current (or last) run: fresh input, cached input, output.
    #[serde(default)]
    pub tokens: Option<crate::provider::Usage>,
    pub turns: Option<u64>,
    pub console_preview: Vec<String>,
    /// Last output, progress report or CPU activity.
    pub heartbeat_at: Option<String>,
    pub progress: Option<u8>,
    pub progress_message: Option<String>,
    /// CPU % and resident memory of the run's whole process tree, as last sampled.
    pub cpu_percent: Option<f64>,
    pub memory_mb: Option<f64>,
    /// Which run of the task this is (1 for the first; resumes and retries count up).
    pub attempt: u32,
    /// Deprecated alias, kept for this release: `waiting_until` of a usage-limit wait, or the limit a running CLI
    /// waits out.
    pub rate_limited_until: Option<String>,
}

/// A task's pull request as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PullRequestRef {
    pub number: Option<u64>,
    pub url: Option<String>,
    pub note: Option<String>,
}

impl From<crate::github::posts::Opened> for PullRequestRef {
    fn from(o: crate::github::posts::Opened) -> Self {
        PullRequestRef { number: o.number, url: o.url, note: o.note }
    }
}

impl SlotStatus {
    /// The row of a free slot.
    pub fn ready(slot: String, provider: String) -> SlotStatus {
        SlotStatus {
            slot,
            provider,
            state: SlotState::Ready,
            issue: None,
            task_id: None,
            run_id: None,
            runs: Vec::new(),
            worktree: None,
            branch: None,
            commits: None,
            changes: None,
            pr: None,
            held_elsewhere: None,
            pid: None,
            adopted: false,
            started_at: None,
            last_output_at: None,
            ended_at: None,
            session_id: None,
            exit_code: None,
            end_cause: None,
            reason: None,
            waiting_until: None,
            waiting_for: None,
            restarts: None,
            cost_usd: None,
            cost_estimated: false,
            tokens: None,
            turns: None,
            console_preview: Vec::new(),
            heartbeat_at: None,
            progress: None,
            progress_message: None,
            cpu_percent: None,
            memory_mb: None,
            attempt: 0,
            rate_limited_until: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectReport {
    /// Why GitHub is off, if it is (no token, no repository).
    pub github_off: Option<String>,
    pub repository: Option<String>,
    /// Where the token came from (never the token).
    pub token_source: Option<String>,
    /// The token's scopes as GitHub reports them (`x-oauth-scopes`), when known.
    pub scopes: Option<String>,
    pub project_enabled: bool,
    pub project_number: Option<u64>,
    pub project_title: Option<String>,
    pub fields: Vec<BoardField>,
    /// Configured field names the project does not have.
    pub missing_fields: Vec<String>,
    /// Why the project could not be read just now, if it could not.
    pub project_error: Option<String>,
    pub pending: Vec<PendingWrite>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub requests: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkspacesReport {
    /// The repository the worktrees belong to; `None` when the workspace is not a git repository.
    pub repository: Option<String>,
    pub worktrees: Vec<WorktreeStatus>,
    /// With `prune`: what was removed, and what was kept and why.
    pub removed: Vec<String>,
    pub kept: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorktreeStatus {
    pub path: String,
    pub slot: Option<String>,
    pub issue: Option<u64>,
    pub branch: Option<String>,
    /// `clean`, `uncommitted`, `ignored files` or `unpushed`.
    pub state: String,
    pub size_bytes: u64,
    /// The slot whose task works in it now (running or abandoned), if any.
    pub in_use_by: Option<String>,
}

/// A field of the project board, as `project` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoardField {
    pub name: String,
    /// `TEXT`, `SINGLE_SELECT`, …
    pub data_type: String,
    /// The option names of a single-select field, in the board's order.
    pub options: Vec<String>,
}

/// A board write the daemon still owes GitHub.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingWrite {
    pub issue: u64,
    pub slot: String,
    /// What the board should come to say: `in_progress`, `completed` or `failed`.
    pub target: String,
    pub since: String,
    pub attempts: u32,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderUsage {
    pub provider: String,
    pub enabled: bool,
    pub used: usize,
    pub max: usize,
    pub slots: Vec<SlotUse>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotUse {
    pub slot: String,
    pub state: SlotState,
    pub issue: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assigned {
    pub slot: String,
    pub issue: u64,
    pub run_id: String,
    pub pid: u32,
    pub session_id: Option<String>,
    pub cwd: String,
    /// Said on a resume that had no session to continue and restarted the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One decoded frame.
#[derive(Debug)]
pub enum Frame {
    Json(Vec<u8>),
    Bytes(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn header(kind: u8, len: usize) -> io::Result<[u8; 5]> {
    let len = u32::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut h = [kind, 0, 0, 0, 0];
    h[1..].copy_from_slice(&len.to_be_bytes());
    Ok(h)
}

pub fn parse_header(h: [u8; 5], max: usize) -> Result<(u8, usize), FrameError> {
    let kind = h[0];
    if kind != KIND_JSON && kind != KIND_BYTES {
        return Err(FrameError::UnknownKind(kind));
    }
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok((kind, len))
}

pub fn frame_of(kind: u8, payload: Vec<u8>) -> Frame {
    if kind == KIND_JSON { Frame::Json(payload) } else { Frame::Bytes(payload) }
}

/// Encodes a JSON frame.
pub fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    encode_json_body(&serde_json::to_vec(value).expect("protocol types always serialize"))
}

/// Encodes a JSON frame from its encoded body.
pub fn encode_json_body(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.extend_from_slice(&header(KIND_JSON, body.len()).expect("reply under 4 GiB"));
    out.extend_from_slice(body);
    out
}

/// Encodes a raw-bytes frame.
pub fn encode_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 5);
    out.extend_from_slice(&header(KIND_BYTES, bytes.len()).expect("chunk under 4 GiB"));
    out.extend_from_slice(bytes);
    out
}

/// Reads one frame from a blocking stream (the client side).
pub fn read_frame_sync<R: Read>(r: &mut R, max: usize) -> Result<Frame, FrameError> {
    let mut h = [0u8; 5];
    match r.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let (kind, len) = parse_header(h, max)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(frame_of(kind, payload))
}

/// Writes one JSON frame to a blocking stream (the client side).
pub fn write_json_sync<W: Write, T: Serialize>(w: &mut W, value: &T) -> io::Result<()> {
    w.write_all(&encode_json(value))?;
    w.flush()
}

/// Writes pre-encoded frame bytes to an async stream.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, encoded: &[u8]) -> io::Result<()> {
    w.write_all(encoded).await?;
    w.flush().await
}

/// Decodes a request payload, answering with the reply the daemon should send when it cannot.
pub fn decode_request(payload: &[u8]) -> Result<Request, ErrorReply> {
    // Look at the version first, so an old or new client is told that, not a confusing field error.
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| ErrorReply {
        kind: ErrorKind::BadRequest,
        message: format!("request is not valid JSON: {e}"),
        hint: None,
    })?;
    match value.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(ErrorReply {
                kind: ErrorKind::Version,
                message: format!("client speaks protocol version {v}, this autodevd speaks {PROTOCOL_VERSION}"),
                hint: Some("use the autodevctl that was installed with this autodevd".into()),
            });
        }
        None => {
            return Err(ErrorReply {
                kind: ErrorKind::BadRequest,
                message: "request has no protocol version field \"v\"".into(),
                hint: None,
            });
        }
    }
    serde_json::from_value::<Envelope>(value).map(|e| e.request).map_err(|e| ErrorReply {
        kind: ErrorKind::BadRequest,
        message: format!("request not understood: {e}"),
        hint: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let req = Request::Assign {
            issue: 7,
            llm: Some("codex".into()),
            slot: None,
            prompt: Some("x".into()),
            force: false,
            queue: false,
        };
        let frame = encode_json(&Envelope { v: PROTOCOL_VERSION, request: req.clone() });
        let Frame::Json(payload) = read_frame_sync(&mut &frame[..], MAX_REQUEST_FRAME).unwrap() else { panic!() };
        assert_eq!(decode_request(&payload).unwrap(), req);
    }

    #[test]
    fn wrong_version_is_named() {
        let err = decode_request(br#"{"v":9,"request":{"cmd":"status"}}"#).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Version);
        assert!(err.message.contains("version 9"), "{}", err.message);
    }

    #[test]
    fn oversized_frame_is_refused_before_reading() {
        let mut h = vec![b'J'];
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(read_frame_sync(&mut &h[..], MAX_REQUEST_FRAME), Err(FrameError::TooLarge { .. })));
    }

    /// A cheap deterministic fuzz of the decoder: random bytes, and valid frames with random bytes flipped,
    /// must give an error or a request, never a panic.
    #[test]
    fn decoder_survives_random_and_mutated_input() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid = [
            br#"{"v":1,"request":{"cmd":"status"}}"#.to_vec(),
            br#"{"v":1,"request":{"cmd":"assign","issue":5,"prompt":"p","llm":"claude"}}"#.to_vec(),
            br#"{"v":1,"request":{"cmd":"logs","slot":"claude-1","lines":5,"follow":true}}"#.to_vec(),
        ];
        for i in 0..50_000 {
            let mut bytes = if i % 2 == 0 {
                (0..(next() % 64)).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                valid[i % valid.len()].clone()
            };
            for _ in 0..(next() % 4) {
                if !bytes.is_empty() {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
            }
            let _ = decode_request(&bytes);
            let mut framed = bytes.clone();
            if !framed.is_empty() {
                framed[0] = if next() % 2 == 0 { b'J' } else { framed[0] };
            }
            let _ = read_frame_sync(&mut &framed[..], MAX_REQUEST_FRAME);
        }
    }
}
