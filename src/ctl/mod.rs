//! autodevctl: the command line, the blocking client of the control socket, and the exit codes. It knows only the
//! protocol and how to render replies; it never reads the daemon's state files.

mod doctor;
mod render;
mod top;

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::paths::Paths;
use crate::protocol::{
    self, AutopilotSet, Envelope, ErrorReply, Frame, FrameError, MAX_REPLY_FRAME, PROTOCOL_VERSION, Reply, Request,
};
use crate::task::AgentSignal;

/// Exit codes scripts can rely on.
pub mod exit {
    pub const OK: u8 = 0;
    /// The daemon refused or failed the request.
    pub const FAILED: u8 = 1;
    /// Bad usage (clap's own code).
    pub const USAGE: u8 = 2;
    /// The daemon is not running or not reachable.
    pub const UNREACHABLE: u8 = 3;
}

#[derive(Debug, Parser)]
#[command(name = "autodevctl", version, about = "Drive autodevd: assign issues to agent slots, watch and stop them")]
pub struct Cli {
    /// State directory of the daemon to talk to [env: AUTODEV_STATE_DIR]
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// Runtime directory holding the socket [env: AUTODEV_RUNTIME_DIR]
    #[arg(long, global = true)]
    pub runtime_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum DashboardAction {
    /// Print the dashboard's URL, token included (keep it private)
    Url {
        /// Make a new token first: links and bookmarks with the old one stop working
        #[arg(long)]
        rotate: bool,
    },
}

/// What `history --sum` groups by.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SumByArg {
    Issue,
    Llm,
    Day,
}

/// What `autodevctl signal` says.
#[derive(Debug, Subcommand)]
pub enum SignalWhat {
    /// The agent needs a person's answer: the question is posted on the issue, and the task waits for a reply
    NeedsInfo {
        #[arg(required = true, allow_hyphen_values = true)]
        question: Vec<String>,
    },
    /// The agent cannot go on: the task ends blocked with this reason
    Blocked {
        #[arg(required = true, allow_hyphen_values = true)]
        why: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start an agent on an issue in a free slot
    Assign {
        /// The GitHub issue number the task is about
        #[arg(allow_negative_numbers = true, value_parser = issue_number)]
        issue: u64,
        /// Which LLM to use (claude, gemini, codex or a custom one); default: the config's, else the first free
        #[arg(long)]
        llm: Option<String>,
        /// Use this slot (e.g. claude-2) instead of the lowest free one
        #[arg(long)]
        slot: Option<String>,
        /// The task, as text (may start with '-')
        #[arg(long, conflicts_with = "prompt_file", allow_hyphen_values = true)]
        prompt: Option<String>,
        /// The task, from a file ("-" for stdin)
        #[arg(long)]
        prompt_file: Option<PathBuf>,
        /// Take over an issue whose Assigned Instance names someone else, and ignore github.labels rules
        #[arg(long)]
        force: bool,
        /// With no free slot, wait in the local queue (it holds no slot) instead of being refused
        #[arg(long)]
        queue: bool,
        #[arg(long)]
        json: bool,
    },
    /// What waits to run, in the order it will be taken: the local queue, then the board's Ready items
    Queue {
        #[arg(long)]
        json: bool,
    },
    /// Take an issue out of the local queue
    Unqueue {
        #[arg(allow_negative_numbers = true, value_parser = issue_number)]
        issue: u64,
    },
    /// The autopilot, which feeds free slots from the board's Ready column: on, off, reset (back to the config), status
    Autopilot {
        #[command(subcommand)]
        action: AutopilotAction,
    },
    /// The fleet (several machines, one board): the machines seen, their heartbeats, busy slots and claims
    Fleet {
        #[arg(long)]
        json: bool,
    },
    /// The GitHub Projects v2 side: project, fields, token scopes, pending board updates
    Project {
        #[command(subcommand)]
        action: ProjectAction,
    },
    /// One line per slot: who works on what, and how it goes
    Status {
        /// Show each busy slot's console preview
        #[arg(long, short = 'p')]
        preview: bool,
        #[arg(long)]
        json: bool,
    },
    /// Slot use per LLM: used/max and which issues
    Instances {
        #[arg(long)]
        json: bool,
    },
    /// Continue a slot's abandoned, failed or stopped task in the same conversation
    Resume {
        slot: String,
        /// What the conversation continues with: the answer to the agent's question (may start with '-')
        #[arg(long, allow_hyphen_values = true)]
        prompt: Option<String>,
        /// Go on although the task spent its budget (budget.perTaskUsd)
        #[arg(long)]
        over_budget: bool,
        #[arg(long)]
        json: bool,
    },
    /// End a slot's abandoned task and free the slot (as failed; --done records it as completed)
    Release {
        slot: String,
        /// The work is done: record the task as completed
        #[arg(long)]
        done: bool,
        #[arg(long)]
        json: bool,
    },
    /// The git worktrees autodev made: slot, issue, branch, clean/uncommitted/unpushed, size
    Workspaces {
        #[command(subcommand)]
        action: Option<WorkspacesAction>,
        #[arg(long, global = true)]
        json: bool,
    },
    /// Report progress from inside a slot (the agent runs this; its environment names the slot and the run)
    Progress {
        /// Percent done, 0 to 100
        #[arg(value_parser = clap::value_parser!(u8).range(0..=100))]
        percent: u8,
        /// What is being done now
        message: Vec<String>,
    },
    /// A live full-screen view: every slot, the selected one's console, keys to stop, resume and assign
    Top,
    /// The web dashboard: `url` prints the address to open (with its token; --rotate makes a new token)
    Dashboard {
        #[command(subcommand)]
        action: DashboardAction,
    },
    /// From inside a slot: say the agent needs a person's answer, or is blocked (the agent runs this)
    Signal {
        #[command(subcommand)]
        what: SignalWhat,
    },
    /// Finished runs: outcome, duration, attempts, cost
    History {
        /// Only this issue's runs
        #[arg(long)]
        issue: Option<u64>,
        /// The last N runs
        #[arg(short = 'n', long = "lines", default_value_t = 50)]
        lines: usize,
        /// Add the runs up: cost, tokens, time (of the history's last 8 MiB)
        #[arg(long)]
        sum: bool,
        /// With --sum: one line per issue, LLM or local day
        #[arg(long, requires = "sum")]
        by: Option<SumByArg>,
        #[arg(long)]
        json: bool,
    },
    /// Check the setup: config, directories, daemon, each CLI and its flags, GitHub token, project and fields
    Doctor {
        /// The config file to check [default: the one autodevd would find from here]
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Show a slot's output (its current or last run)
    Logs {
        slot: String,
        /// Only the last N lines
        #[arg(short = 'n', long = "lines")]
        lines: Option<usize>,
        /// Keep printing new output until the run ends
        #[arg(short = 'f', long)]
        follow: bool,
        /// The bytes as the CLI wrote them, instead of readable lines
        #[arg(long)]
        raw: bool,
        /// The run's stderr instead of its stdout
        #[arg(long)]
        stderr: bool,
    },
    /// Stop a slot's run (its whole process tree) and free the slot
    Stop {
        slot: String,
        #[arg(long)]
        json: bool,
    },
}

/// The largest prompt `assign` sends: the request frame limit less room for the rest of the request.
/// The largest prompt `assign` takes, from any source (the daemon reads no more of a task's prompt file either).
const MAX_PROMPT_BYTES: usize = 1 << 20;

#[derive(Debug, Subcommand)]
pub enum AutopilotAction {
    /// Take Ready items from now on (kept across restarts and reloads until `reset`)
    On,
    /// Start nothing new from the board (running tasks go on; kept until `reset`)
    Off,
    /// Back to what the config's autopilot.enabled says
    Reset,
    /// Which is in force, and why
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectAction {
    /// Project title and number, its fields, missing fields, token scopes, pending sync work, the last error
    Status {
        /// Also show every field's options
        #[arg(long, short = 'v')]
        verbose: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkspacesAction {
    /// Remove the worktrees that are safe to remove (no task uses them; no uncommitted or unpushed work)
    Prune,
}

/// Why a command did not succeed, mapped to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Unreachable(String),
    #[error("{}", .0.message)]
    Refused(ErrorReply),
    #[error("{0}")]
    Failed(String),
    /// A failure already shown in full on stdout (doctor): only the exit code is left to give.
    #[error("{0}")]
    Quiet(String),
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Unreachable(_) => exit::UNREACHABLE,
            _ => exit::FAILED,
        }
    }

    /// The error as the user sees it: `✗ what`, then the hint.
    pub fn render(&self) -> String {
        match self {
            CtlError::Quiet(_) => String::new(),
            CtlError::Refused(e) => match &e.hint {
                Some(hint) => format!("✗ {}\n{hint}", e.message),
                None => format!("✗ {}", e.message),
            },
            other => format!("✗ {other}"),
        }
    }
}

/// A connection to autodevd.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    pub fn connect(paths: &Paths) -> Result<Client, CtlError> {
        Client::connect_socket(&paths.socket())
    }

    pub fn connect_socket(socket: &Path) -> Result<Client, CtlError> {
        let stream = UnixStream::connect(socket).map_err(|e| {
            let why = match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => "autodevd is not running".to_string(),
                _ => format!("cannot reach autodevd: {e}"),
            };
            CtlError::Unreachable(format!(
                "{why} (no answer on {}).\nStart it with `autodevd` (or `systemctl --user start autodevd`); \
                 if it runs with another --runtime-dir, pass the same one here.",
                socket.display()
            ))
        })?;
        Ok(Client { stream })
    }

    pub fn send(&mut self, request: Request) -> Result<(), CtlError> {
        protocol::write_json_sync(&mut self.stream, &Envelope { v: PROTOCOL_VERSION, request })
            .map_err(|e| CtlError::Unreachable(format!("lost the connection to autodevd: {e}")))
    }

    pub fn set_timeout(&self, timeout: Option<Duration>) {
        let _ = self.stream.set_read_timeout(timeout);
    }

    /// Reads the next frame: raw bytes (log chunks) or a reply.
    pub fn next_frame(&mut self) -> Result<Frame, CtlError> {
        protocol::read_frame_sync(&mut self.stream, MAX_REPLY_FRAME).map_err(|e| match e {
            FrameError::Closed => CtlError::Unreachable("autodevd closed the connection".into()),
            FrameError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                CtlError::Unreachable("autodevd did not answer in time".into())
            }
            other => CtlError::Unreachable(format!("bad reply from autodevd: {other}")),
        })
    }

    /// Sends a request and reads its one reply; an error reply becomes `Err`.
    pub fn call(&mut self, request: Request) -> Result<Reply, CtlError> {
        decode_reply(&self.call_raw(request)?)
    }

    /// The reply's JSON as the daemon sent it (for `--json`, which prints it without decoding it).
    pub fn call_raw(&mut self, request: Request) -> Result<Vec<u8>, CtlError> {
        self.send(request)?;
        loop {
            match self.next_frame()? {
                Frame::Json(payload) => return Ok(payload),
                Frame::Bytes(_) => continue,
            }
        }
    }
}

fn decode_reply(payload: &[u8]) -> Result<Reply, CtlError> {
    match serde_json::from_slice::<Reply>(payload) {
        Ok(Reply::Error(e)) => Err(CtlError::Refused(e)),
        Ok(reply) => Ok(reply),
        Err(e) => Err(CtlError::Failed(format!(
            "cannot read autodevd's reply ({e}); is autodevctl the same version as autodevd?"
        ))),
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CtlError::Failed(e.to_string()))?;
    emit(&format!("{text}\n"))
}

/// Writes to stdout. A reader that went away (`| head`, `| grep -q`) is a normal end, not an error or a panic.
fn emit(text: &str) -> Result<(), CtlError> {
    emit_bytes(&[text.as_bytes()])
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn emit_bytes(parts: &[&[u8]]) -> Result<(), CtlError> {
    let mut out = io::stdout().lock();
    match parts.iter().try_for_each(|p| out.write_all(p)).and_then(|_| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(CtlError::Failed(format!("cannot write output: {e}"))),
        _ => Ok(()),
    }
}

fn unexpected(reply: Reply) -> CtlError {
    CtlError::Failed(format!("unexpected reply from autodevd: {reply:?}"))
}

/// What a binary's `main` returns for a command's result: the exit code, after the error (if any) on stderr.
/// autodevctl as git's `GIT_ASKPASS` during autodevd's push: git runs it with its prompt as the one argument, and
/// the answer is the token autodevd put in the environment (or the user name GitHub takes with a token). `None`
/// for every ordinary command line.
pub fn askpass_answer() -> Option<String> {
    let token = std::env::var(protocol::ASKPASS_TOKEN_VAR).ok()?;
    let host = std::env::var(protocol::ASKPASS_HOST_VAR).ok()?;
    let mut args = std::env::args_os().skip(1);
    let prompt = args.next()?.into_string().ok()?;
    if args.next().is_some() {
        return None;
    }
    // git's prompt names the URL it asks for (`Password for 'https://x-access-token@github.com': `): the token
    // goes only to the GitHub host autodevd pushes to, never to a host a rewritten remote points at.
    let for_host = prompt.contains(&format!("//{host}'")) || prompt.contains(&format!("@{host}'"));
    if !for_host {
        return None;
    }
    if prompt.starts_with("Username") {
        Some("x-access-token".into())
    } else if prompt.starts_with("Password") {
        Some(token)
    } else {
        None
    }
}

/// The connection of a command the agent runs inside its slot, with the slot and run its environment names.
fn inside_slot(command: &str) -> Result<(Client, String, String), CtlError> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| {
            CtlError::Failed(format!(
                "autodevctl {command} runs inside an agent's slot: {name} is not set (autodevd sets it for the agent)"
            ))
        })
    };
    let (slot, run_id, socket) = (var("AUTODEV_SLOT")?, var("AUTODEV_RUN")?, var("AUTODEV_SOCKET")?);
    let client = Client::connect_socket(Path::new(&socket))?;
    client.set_timeout(Some(Duration::from_secs(10)));
    Ok((client, slot, run_id))
}

pub fn finish(result: Result<(), CtlError>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::from(exit::OK),
        Err(e) => {
            let message = e.render();
            if !message.is_empty() {
                eprintln!("{message}");
            }
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

/// The name of the doctor's binary, installed beside autodevctl.
pub const DOCTOR_BINARY: &str = "autodev-doctor";
/// The binary `autodevctl top` runs: the terminal stack stays out of every other command.
pub const TOP_BINARY: &str = "autodev-top";

/// Replaces this process with `autodev-doctor` and the same arguments (found beside autodevctl, else on PATH).
/// Returns only if that fails.
/// Runs a command's own binary (installed beside autodevctl) in this process's place.
fn exec_helper(binary: &str) -> CtlError {
    use std::os::unix::process::CommandExt;
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join(binary)));
    let program = beside.filter(|p| p.is_file()).unwrap_or_else(|| PathBuf::from(binary));
    let error = std::process::Command::new(&program).args(std::env::args_os().skip(1)).exec();
    CtlError::Failed(format!(
        "cannot run {} ({error}): install it beside autodevctl (`cargo install --path .` installs both)",
        program.display()
    ))
}

/// Runs `top` (the `autodev-top` binary's whole job).
pub fn run_top(cli: Cli) -> Result<(), CtlError> {
    let paths = Paths::resolve(cli.state_dir.as_deref(), cli.runtime_dir.as_deref())
        .map_err(|e| CtlError::Unreachable(e.to_string()))?;
    match cli.command {
        Command::Top => top::run(&paths),
        _ => Err(CtlError::Failed("autodev-top runs `top` only: `autodevctl top`".into())),
    }
}

/// Runs `doctor` (the `autodev-doctor` binary's whole job) and maps the checks to the exit status.
pub fn run_doctor(cli: Cli) -> Result<(), CtlError> {
    let paths = Paths::resolve(cli.state_dir.as_deref(), cli.runtime_dir.as_deref())
        .map_err(|e| CtlError::Unreachable(e.to_string()))?;
    let Command::Doctor { config, json } = cli.command else {
        return Err(CtlError::Failed("autodev-doctor runs `doctor` only: `autodevctl doctor`".into()));
    };
    let checks = doctor::run(config.as_deref(), &paths);
    if json {
        print_json(&checks)?
    } else {
        emit(&doctor::render(&checks))?
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed == 0 { Ok(()) } else { Err(CtlError::Quiet(format!("{failed} check(s) failed"))) }
}

/// An issue number as a person types it: GitHub numbers issues from 1.
fn issue_number(text: &str) -> Result<u64, String> {
    match text.trim().parse::<i128>() {
        Ok(n) if n >= 1 && n <= u64::MAX as i128 => Ok(n as u64),
        Ok(_) => Err("issue numbers start at 1".into()),
        Err(_) => Err("not a number: give the issue's number, e.g. 123".into()),
    }
}

/// The task from `--prompt` or `--prompt-file`; `None` takes it from the GitHub issue.
fn read_prompt(prompt: Option<String>, file: Option<PathBuf>) -> Result<Option<String>, CtlError> {
    match (prompt, file) {
        (Some(p), _) => Ok(Some(p)),
        (None, Some(path)) if path.as_os_str() == "-" => {
            crate::input::read_stdin(MAX_PROMPT_BYTES, "prompt").map(Some).map_err(CtlError::Failed)
        }
        (None, Some(path)) => {
            crate::input::read_text(&path, MAX_PROMPT_BYTES, crate::input::READ_TIMEOUT, "prompt file")
                .map(Some)
                .map_err(CtlError::Failed)
        }
        (None, None) => Ok(None),
    }
}

/// Runs one command; the binary maps the result to an exit code.
pub fn run(cli: Cli) -> Result<(), CtlError> {
    let paths = Paths::resolve(cli.state_dir.as_deref(), cli.runtime_dir.as_deref())
        .map_err(|e| CtlError::Unreachable(e.to_string()))?;
    // Read local input before talking to the daemon, so a bad file never half-does anything.
    let prompt = match &cli.command {
        Command::Assign { prompt, prompt_file, .. } => read_prompt(prompt.clone(), prompt_file.clone())?,
        _ => None,
    };
    if let Some(p) = &prompt
        && p.len() > MAX_PROMPT_BYTES
    {
        return Err(CtlError::Failed(format!(
            "the prompt is {} KiB; the limit is {} KiB — put the details in a file in the repository and point to it",
            p.len() >> 10,
            MAX_PROMPT_BYTES >> 10
        )));
    }
    // Commands that need no daemon.
    match &cli.command {
        // Its own binary: doctor talks to GitHub, and the HTTP and TLS stack it needs must not slow every other
        // command's start.
        Command::Doctor { .. } => return Err(exec_helper(DOCTOR_BINARY)),
        Command::Top => return Err(exec_helper(TOP_BINARY)),
        Command::Progress { percent, message } => {
            let (mut client, slot, run_id) = inside_slot("progress")?;
            let message = message.join(" ");
            return match client.call(Request::Progress { slot, run_id, percent: *percent, message })? {
                Reply::ProgressNoted { slot, percent } => emit(&format!("✓ {slot}: {percent}%\n")),
                other => Err(unexpected(other)),
            };
        }
        Command::Signal { what } => {
            let (mut client, slot, run_id) = inside_slot("signal")?;
            let (signal, said) = match what {
                SignalWhat::NeedsInfo { question } => {
                    (AgentSignal::NeedsInfo { question: question.join(" ") }, "the question goes to the issue")
                }
                SignalWhat::Blocked { why } => (AgentSignal::Blocked { why: why.join(" ") }, "the task ends blocked"),
            };
            return match client.call(Request::Signal { slot, run_id, signal })? {
                Reply::SignalNoted { slot } => emit(&format!("✓ {slot}: noted; {said} when this run ends\n")),
                other => Err(unexpected(other)),
            };
        }
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut <Cli as clap::CommandFactory>::command(), "autodevctl", &mut out);
            return emit(&String::from_utf8_lossy(&out));
        }
        _ => {}
    }
    let mut client = Client::connect(&paths)?;
    client.set_timeout(Some(Duration::from_secs(30)));
    match cli.command {
        Command::Assign { issue, llm, slot, force, queue, json, .. } => {
            // Taking the issue from GitHub can take a while on a slow network.
            client.set_timeout(Some(Duration::from_secs(120)));
            match client.call(Request::Assign { issue, llm, slot, prompt, force, queue })? {
                Reply::Assigned(a) if json => print_json(&a),
                Reply::Assigned(a) => {
                    emit(&format!("✓ Issue #{} → {} (pid {}, run {})\n", a.issue, a.slot, a.pid, a.run_id))
                }
                reply @ Reply::Queued { .. } if json => print_json(&reply),
                Reply::Queued { issue, place } => {
                    emit(&format!("✓ Issue #{issue} queued (place {place}): it starts when a slot is free\n"))
                }
                other => Err(unexpected(other)),
            }
        }
        Command::Dashboard { action: DashboardAction::Url { rotate } } => {
            match client.call(Request::DashboardUrl { rotate })? {
                Reply::DashboardUrl { url } => emit(&format!("{url}\n")),
                other => Err(unexpected(other)),
            }
        }
        Command::Queue { json } => match client.call(Request::Queue)? {
            Reply::Queue { entries } if json => print_json(&entries),
            Reply::Queue { entries } => emit(&render::queue(&entries)),
            other => Err(unexpected(other)),
        },
        Command::Unqueue { issue } => match client.call(Request::Unqueue { issue })? {
            Reply::Unqueued { issue } => emit(&format!("✓ Issue #{issue} is out of the queue\n")),
            other => Err(unexpected(other)),
        },
        Command::Fleet { json } => match client.call(Request::Fleet)? {
            Reply::Fleet(report) if json => print_json(&report),
            Reply::Fleet(report) => emit(&render::fleet(&report)),
            other => Err(unexpected(other)),
        },
        Command::Autopilot { action } => {
            let (set, json) = match action {
                AutopilotAction::On => (Some(AutopilotSet::On), false),
                AutopilotAction::Off => (Some(AutopilotSet::Off), false),
                AutopilotAction::Reset => (Some(AutopilotSet::Reset), false),
                AutopilotAction::Status { json } => (None, json),
            };
            match client.call(Request::Autopilot { set })? {
                Reply::Autopilot(report) if json => print_json(&report),
                Reply::Autopilot(report) => emit(&render::autopilot(&report)),
                other => Err(unexpected(other)),
            }
        }
        // As it came: decoding and encoding 64 slots again would cost more than the request.
        Command::Status { json: true, .. } => {
            let payload = client.call_raw(Request::Status)?;
            // Only the reply's kind is read: from its first bytes as the daemon writes it, else (a redacted reply's
            // keys come sorted) by skipping over the rest without building it.
            #[derive(serde::Deserialize)]
            struct Kind {
                r#type: String,
            }
            let status = payload.starts_with(br#"{"type":"status","#)
                || serde_json::from_slice::<Kind>(&payload).is_ok_and(|k| k.r#type == "status");
            if status {
                return emit_bytes(&[&payload, b"\n"]);
            }
            Err(unexpected(decode_reply(&payload)?))
        }
        Command::Status { preview, .. } => match client.call(Request::Status)? {
            Reply::Status(report) => emit(&render::status(&report, preview)),
            other => Err(unexpected(other)),
        },
        Command::Instances { json } => match client.call(Request::Instances)? {
            Reply::Instances { providers } if json => print_json(&providers),
            Reply::Instances { providers } => emit(&render::instances(&providers)),
            other => Err(unexpected(other)),
        },
        Command::Stop { slot, json } => {
            // A stop waits out the run's grace period (config, default 10 s) before SIGKILL.
            client.set_timeout(None);
            match client.call(Request::Stop { slot })? {
                reply @ Reply::Stopped { .. } if json => print_json(&reply),
                Reply::Stopped { slot, issue, .. } => {
                    emit(&format!("✓ Stopped {slot} (issue #{issue}); the slot is free\n"))
                }
                other => Err(unexpected(other)),
            }
        }
        Command::Resume { slot, prompt, over_budget, json } => match client.call(Request::Resume {
            slot,
            prompt,
            over_budget,
        })? {
            Reply::Resumed(a) if json => print_json(&a),
            Reply::Resumed(a) => {
                let how = match &a.note {
                    Some(note) => format!("\n  {note}"),
                    None => format!(" in session {}", a.session_id.as_deref().unwrap_or("?")),
                };
                emit(&format!("✓ Resumed issue #{} in {} (pid {}, run {}){how}\n", a.issue, a.slot, a.pid, a.run_id))
            }
            other => Err(unexpected(other)),
        },
        Command::Release { slot, done, json } => match client.call(Request::Release { slot, done })? {
            reply @ Reply::Released { .. } if json => print_json(&reply),
            Reply::Released { slot, issue, state } => {
                emit(&format!("✓ Released {slot}: issue #{issue} recorded as {}; the slot is free\n", state.as_str()))
            }
            other => Err(unexpected(other)),
        },
        Command::Project { action: ProjectAction::Status { verbose, json } } => {
            client.set_timeout(Some(Duration::from_secs(120)));
            match client.call(Request::ProjectStatus)? {
                Reply::ProjectStatus(report) if json => print_json(&report),
                Reply::ProjectStatus(report) => emit(&render::project(&report, verbose)),
                other => Err(unexpected(other)),
            }
        }
        Command::Workspaces { action, json } => {
            let prune = matches!(action, Some(WorkspacesAction::Prune));
            client.set_timeout(Some(Duration::from_secs(300)));
            match client.call(Request::Workspaces { prune })? {
                Reply::Workspaces(report) if json => print_json(&report),
                Reply::Workspaces(report) => emit(&render::workspaces(&report)),
                other => Err(unexpected(other)),
            }
        }
        Command::Doctor { .. }
        | Command::Top
        | Command::Completions { .. }
        | Command::Progress { .. }
        | Command::Signal { .. } => {
            unreachable!("handled before connecting")
        }
        Command::History { issue, sum: true, by, json, .. } => {
            let by = by.map(|b| match b {
                SumByArg::Issue => protocol::SumBy::Issue,
                SumByArg::Llm => protocol::SumBy::Llm,
                SumByArg::Day => protocol::SumBy::Day,
            });
            match client.call(Request::HistorySum { issue, by })? {
                Reply::HistorySum { rows } if json => print_json(&rows),
                Reply::HistorySum { rows } => emit(&render::history_sum(&rows)),
                other => Err(unexpected(other)),
            }
        }
        Command::History { issue, lines, json, .. } => {
            match client.call(Request::History { issue, limit: Some(lines) })? {
                Reply::History { runs } if json => print_json(&runs),
                Reply::History { runs } => emit(&render::history(&runs)),
                other => Err(unexpected(other)),
            }
        }
        Command::Logs { slot, lines, follow, raw, stderr } => {
            if follow {
                client.set_timeout(None);
            }
            client.send(Request::Logs { slot, lines, follow, raw, stderr })?;
            let mut out = io::stdout().lock();
            loop {
                match client.next_frame()? {
                    Frame::Bytes(chunk) => {
                        if out.write_all(&chunk).and_then(|_| out.flush()).is_err() {
                            // The reader went away (`| head`): that is a normal end.
                            return Ok(());
                        }
                    }
                    Frame::Json(payload) => {
                        return match decode_reply(&payload)? {
                            Reply::LogEnd { .. } => Ok(()),
                            other => Err(unexpected(other)),
                        };
                    }
                }
            }
        }
    }
}
