//! Child processes: spawn in a fresh process group with a clean environment and output to files, watch for exit
//! through a pidfd, stop a whole group (TERM, grace, KILL), and reap orphans as a child subreaper.
//!
//! A process group id is only ours while its leader has not been reaped: until then the kernel cannot hand the
//! number to anyone else. So an exited leader is kept as a zombie ([`Child::wait_exit`] does not reap) until the
//! rest of its group is gone, and only then reaped ([`Child::reap`]). The daemon never signals a group after that.
//!
//! Every run also holds a *run lock*: a file the daemon flocks and whose descriptor the child inherits. The kernel
//! keeps the lock while anything of the run lives, even after the daemon dies; and a process that has the file
//! open is provably part of the run. Processes found that way are signalled through a pidfd, so a pid that is
//! recycled in between can never be hit.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

/// Variables of the daemon's environment every child may see (besides `LC_*`). Everything else is dropped.
const BASE_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TERM",
    "TZ",
    "TMPDIR",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "XDG_STATE_HOME",
    "XDG_RUNTIME_DIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
];
/// Never passed on, whatever the config says: claude refuses to run nested under CLAUDECODE, and NOTIFY_SOCKET
/// would let a child speak to systemd for the daemon.
const NEVER_ENV: &[&str] = &["CLAUDECODE", "NOTIFY_SOCKET"];
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// How often a stop checks whether the group is gone.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// The soft RLIMIT_NOFILE autodevd started with (0: not raised), given back to every child: tools that loop over
/// every possible descriptor, or use select(), break under a huge limit.
static CHILD_NOFILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Raises the soft limit of open descriptors to the hard limit, remembering the old one for children.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we own; no other memory is involved.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max {
            return;
        }
        let old = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            CHILD_NOFILE.store(old, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Gives a child the descriptor limit autodevd started with (between fork and exec).
fn restore_fd_limit(command: &mut Command) {
    let soft = CHILD_NOFILE.load(std::sync::atomic::Ordering::Relaxed);
    if soft == 0 {
        return;
    }
    // SAFETY: runs in the child between fork and exec; getrlimit and setrlimit are async-signal-safe system calls
    // on a struct on the stack.
    unsafe {
        command.pre_exec(move || {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur = soft.min(limit.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
            Ok(())
        });
    }
}

/// Pids of children whose exit a run watches; the orphan reaper leaves them alone.
static TRACKED: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

fn tracked() -> std::sync::MutexGuard<'static, Option<HashSet<i32>>> {
    TRACKED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds a child's environment: the allowlist from the daemon's environment, the provider's own variables,
/// then `extra` (config `env`, then the AUTODEV_* variables, which win).
pub fn child_env(
    passthrough: &[&str],
    config_env: &BTreeMap<String, String>,
    autodev_vars: &[(&str, String)],
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| BASE_ENV.contains(&k.as_str()) || k.starts_with("LC_") || passthrough.contains(&k.as_str()))
        .collect();
    env.entry("PATH".into()).or_insert_with(|| DEFAULT_PATH.into());
    env.extend(config_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(autodev_vars.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env.retain(|k, _| !NEVER_ENV.contains(&k.as_str()));
    env.into_iter().collect()
}

/// Everything needed to start one run.
pub struct SpawnSpec<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    pub cwd: &'a Path,
    pub env: &'a [(String, String)],
    /// The child's stdin; `None` is /dev/null.
    pub stdin: Option<&'a Path>,
    pub stdout: &'a Path,
    pub stderr: &'a Path,
    /// The run lock, inherited by the child (and its descendants) so it stays held while any of them lives.
    pub run_lock: Option<&'a File>,
    /// The run's `cgroup.procs`, open for writing: the child joins the run's cgroup before exec, so nothing it
    /// starts can be outside it.
    pub cgroup: Option<&'a File>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("command not found")]
    NotFound,
    /// The program exists, but the interpreter its `#!` line names does not.
    #[error("its interpreter {0} (from its #! line) is not found")]
    NoInterpreter(String),
    #[error("permission denied (is it executable?)")]
    NotExecutable,
    #[error("it is a directory")]
    IsDirectory,
    #[error("working directory {0} does not exist")]
    NoWorkingDir(PathBuf),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
    /// The process was not our child (adopted after a restart): it ended, but how is not ours to know.
    Unknown,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit code {c}"),
            ExitInfo::Unknown => write!(f, "exit code unknown"),
            ExitInfo::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// A running process group leader we watch: spawned by us, or adopted after a restart.
pub struct Child {
    pub pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    /// Spawned by this daemon: its exit status is ours to read, and it stays a zombie until reaped.
    ours: bool,
}

/// Starts a child in its own process group. It is registered with the orphan reaper before this returns, so its
/// exit status is never taken by anyone but [`Child::reap`].
pub fn spawn(spec: &SpawnSpec) -> Result<Child, SpawnError> {
    if !spec.cwd.is_dir() {
        return Err(SpawnError::NoWorkingDir(spec.cwd.to_path_buf()));
    }
    let stdin = match spec.stdin {
        Some(path) => Stdio::from(File::open(path)?),
        None => Stdio::null(),
    };
    let stdout = append_file(spec.stdout)?;
    let stderr = append_file(spec.stderr)?;
    let mut command = Command::new(spec.program);
    command
        .args(spec.args)
        .current_dir(spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    let lock_fd = spec.run_lock.map(|f| f.as_raw_fd());
    let cgroup_fd = spec.cgroup.map(|f| f.as_raw_fd());
    if lock_fd.is_some() || cgroup_fd.is_some() {
        // SAFETY: runs in the child between fork and exec; fcntl and write are async-signal-safe, touch only these
        // fds, and allocate nothing.
        unsafe {
            command.pre_exec(move || {
                // A refused move (permissions) is not a failed start: the caller sees the child outside its
                // cgroup and falls back to the process group for this run.
                if let Some(fd) = cgroup_fd {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                }
                if let Some(fd) = lock_fd
                    && libc::fcntl(fd, libc::F_SETFD, 0) == -1
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    restore_fd_limit(&mut command);
    // Hold the reaper off between fork and registration.
    let mut tracked = tracked();
    let child = command.spawn().map_err(|e| explain(spec, e))?;
    let pid = child.id() as i32;
    tracked.get_or_insert_with(HashSet::new).insert(pid);
    drop(tracked);
    // std's Child neither waits nor kills on drop; from here the pidfd is how we know about the process.
    drop(child);
    let pidfd = pidfd_open(pid).and_then(register_readable).inspect_err(|_| {
        // Without a pidfd we cannot watch it: take it down rather than leave an unwatched run.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = waitpid(Pid::from_raw(pid), None);
        untrack(pid);
    })?;
    Ok(Child { pid, pidfd, ours: true })
}

/// Says why `spec.program` could not be started, from what is on disk (the kernel says ENOENT both for a missing
/// program and for a script whose interpreter is missing, EACCES both for a file without the x bit and for a
/// directory).
fn explain(spec: &SpawnSpec, error: io::Error) -> SpawnError {
    let path_var = spec.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or(DEFAULT_PATH);
    let found = if spec.program.contains('/') {
        Some(spec.cwd.join(spec.program)).filter(|p| p.exists())
    } else {
        std::env::split_paths(path_var).map(|d| d.join(spec.program)).find(|p| p.exists())
    };
    match (error.kind(), found) {
        (_, Some(p)) if p.is_dir() => SpawnError::IsDirectory,
        (io::ErrorKind::NotFound, Some(p)) => match interpreter_of(&p) {
            Some(interpreter) => SpawnError::NoInterpreter(interpreter),
            None => SpawnError::NotFound,
        },
        (io::ErrorKind::NotFound, None) => SpawnError::NotFound,
        (io::ErrorKind::PermissionDenied, _) => SpawnError::NotExecutable,
        _ => SpawnError::Io(error),
    }
}

/// The interpreter a script's `#!` line names (its first 256 bytes are read).
fn interpreter_of(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = Vec::new();
    File::open(path).ok()?.take(256).read_to_end(&mut head).ok()?;
    let line = head.strip_prefix(b"#!")?.split(|b| *b == b'\n').next()?;
    let line = String::from_utf8_lossy(line);
    line.split_whitespace().next().map(str::to_string)
}

/// Watches a live process we did not spawn (a run adopted after a restart).
pub fn adopt(pid: i32) -> io::Result<Child> {
    Ok(Child { pid, pidfd: pidfd_open(pid).and_then(register_readable)?, ours: false })
}

fn append_file(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn register_readable(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open and unchanged until it is dropped.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(io::Error::from)
}

/// Reaps and forgets a child whose watcher is gone (after an internal error), once it has exited.
pub fn forget_child(pid: i32) {
    if let Ok(WaitStatus::StillAlive) | Err(_) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        // Still running (or not ours): leave it tracked so the reaper does not steal a status a watcher expects.
        return;
    }
    untrack(pid);
}

fn untrack(pid: i32) {
    if let Some(set) = tracked().as_mut() {
        set.remove(&pid);
    }
}

impl Child {
    /// Waits until the child has exited and returns how, leaving it a zombie so its group id stays reserved.
    pub async fn wait_exit(&self) -> io::Result<ExitInfo> {
        loop {
            let mut guard = self.pidfd.readable().await?;
            if !self.ours {
                return Ok(ExitInfo::Unknown);
            }
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
            match waitid(Id::PIDFd(self.pidfd.get_ref().as_fd()), flags) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(ExitInfo::Code(code)),
                Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(ExitInfo::Signal(sig as i32)),
                Ok(_) => guard.clear_ready(),
                Err(e) => return Err(io::Error::from(e)),
            }
        }
    }

    /// Reaps the exited child. Call once its group is empty; the group id may be reused afterwards.
    pub fn reap(self) {
        if self.ours {
            let _ = waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG));
            untrack(self.pid);
        }
    }

    /// Whether this is a process we spawned (so its group id stays ours until reaped).
    pub fn is_ours(&self) -> bool {
        self.ours
    }
}

/// Sends `signal` to process group `pgid`. The caller guarantees the group is ours (its leader is unreaped).
pub fn signal_group(pgid: i32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pgid), signal);
}

/// Live (non-zombie) members of group `pgid` other than `except`.
pub fn live_group_members(pgid: i32, except: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != except)
        .filter(|pid| proc_stat(*pid).is_some_and(|s| s.pgrp == pgid && s.state != 'Z' && s.state != 'X'))
        .collect()
}

/// The few fields of /proc/<pid>/stat autodev needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    /// Field 22: clock ticks after boot; with the boot id it tells a process from a later one with the same pid.
    pub start_time: u64,
}

pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = text.get(text.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Ends every live member of the exited leader's group: TERM, then KILL after `grace`. Returns once none is left
/// (or after KILL plus a short wait, for members stuck in the kernel).
pub async fn clear_group(pgid: i32, grace: Duration) {
    let mut deadline: Option<Instant> = None;
    let mut killed_at: Option<Instant> = None;
    loop {
        if live_group_members(pgid, pgid).is_empty() {
            return;
        }
        let now = Instant::now();
        match (deadline, killed_at) {
            (None, _) => {
                signal_group(pgid, Signal::SIGTERM);
                deadline = Some(now + grace);
            }
            (Some(d), None) if now >= d => {
                signal_group(pgid, Signal::SIGKILL);
                killed_at = Some(now);
            }
            (_, Some(k)) if now >= k + Duration::from_secs(5) => {
                tracing::warn!(pgid, "processes of the group survive SIGKILL (stuck in the kernel?)");
                return;
            }
            _ => {}
        }
        tokio::time::sleep(GROUP_POLL).await;
    }
}

/// Makes the daemon the reaper of its descendants' orphans, so grandchildren left by a run end as our children
/// (and are reaped) instead of piling up under an init that may not reap.
pub fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag; no memory is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!("cannot become child subreaper: {}", io::Error::last_os_error());
    }
}

/// Reaps exited children that no run watches (orphans adopted as subreaper). Called on SIGCHLD.
pub fn reap_orphans() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    let children: Vec<i32> = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<i32>>())
        .collect();
    let tracked = tracked();
    for pid in children {
        if tracked.as_ref().is_some_and(|t| t.contains(&pid)) {
            continue;
        }
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }
}

/// Opens (creating) a run's lock file and takes its lock for the run's lifetime.
pub fn create_run_lock(path: &Path) -> io::Result<File> {
    use fs2::FileExt;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    file.try_lock_exclusive()?;
    Ok(file)
}

/// Whether process `pid` was started with `name=value` in its environment (`/proc/<pid>/environ`, read up to
/// 1 MiB). What autodev put there (`AUTODEV_RUN=<run id>`) proves a process is that run's even after it closed the
/// descriptors it inherited; a stranger named by a forged lockfile does not carry a run id of ours.
pub fn started_with_env(pid: i32, name: &str, value: &str) -> bool {
    use std::io::Read;
    let Ok(file) = std::fs::File::open(format!("/proc/{pid}/environ")) else { return false };
    let mut environ = Vec::new();
    if file.take(1 << 20).read_to_end(&mut environ).is_err() {
        return false;
    }
    let wanted = format!("{name}={value}");
    environ.split(|b| *b == 0).any(|entry| entry == wanted.as_bytes())
}

/// Whether anything still holds a run's lock (some process of the run lives).
pub fn run_lock_held(path: &Path) -> bool {
    use fs2::FileExt;
    let Ok(file) = std::fs::OpenOptions::new().read(true).open(path) else { return false };
    match file.try_lock_exclusive() {
        Ok(()) => {
            let _ = FileExt::unlock(&file);
            false
        }
        Err(_) => true,
    }
}

/// Processes that have `lock` open, i.e. processes of that run. `pgid` narrows the search when known.
pub fn run_lock_holders(lock: &Path, pgid: Option<i32>) -> Vec<i32> {
    let Ok(target) = std::fs::canonicalize(lock) else { return Vec::new() };
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| match (pgid, proc_stat(*pid)) {
            (_, None) => false,
            (_, Some(s)) if s.state == 'Z' || s.state == 'X' => false,
            (Some(g), Some(s)) => s.pgrp == g,
            (None, Some(_)) => true,
        })
        .filter(|pid| holds_file(*pid, &target))
        .collect()
}

/// Whether process `pid` has the run lock `lock` open (it is part of that run).
pub fn holds_run_lock(pid: i32, lock: &Path) -> bool {
    std::fs::canonicalize(lock).is_ok_and(|target| holds_file(pid, &target))
}

fn holds_file(pid: i32, target: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok()).any(|link| link == target)
}

/// Signals `pid` only if, at the moment of the signal, it is still the process that holds `lock`: the pidfd pins
/// the process, so a recycled pid is never hit.
fn signal_lock_holder(pid: i32, lock: &Path, signal: Signal) {
    let Ok(pidfd) = pidfd_open(pid) else { return };
    let Ok(target) = std::fs::canonicalize(lock) else { return };
    if !holds_file(pid, &target) {
        return;
    }
    // SAFETY: pidfd_send_signal takes an fd we own, a signal number, a null siginfo and flags; no memory is shared.
    unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal as i32, std::ptr::null::<u8>(), 0);
    }
}

/// Ends every process that still holds a run's lock: TERM, then KILL after `grace`. Used for runs whose group id
/// is not provably ours any more (adopted runs, runs found dead at start-up).
pub async fn clear_lock_holders(lock: &Path, pgid: Option<i32>, grace: Duration) -> usize {
    let first = run_lock_holders(lock, pgid);
    if first.is_empty() {
        return 0;
    }
    first.iter().for_each(|pid| signal_lock_holder(*pid, lock, Signal::SIGTERM));
    let deadline = Instant::now() + grace;
    loop {
        let left = run_lock_holders(lock, pgid);
        if left.is_empty() {
            return first.len();
        }
        if Instant::now() >= deadline {
            left.iter().for_each(|pid| signal_lock_holder(*pid, lock, Signal::SIGKILL));
            if Instant::now() >= deadline + Duration::from_secs(5) {
                tracing::warn!(lock = %lock.display(), "processes of the run survive SIGKILL");
                return first.len();
            }
        }
        tokio::time::sleep(GROUP_POLL).await;
    }
}

/// Runs a helper command (git, a CLI's --help) to completion and returns its output. The pid is registered with
/// the orphan reaper under the same lock as the spawn, so the reaper never takes its exit status; after `timeout`
/// it is killed.
pub fn run_command(command: &mut Command, timeout: Duration) -> io::Result<std::process::Output> {
    run_command_with_input(command, None, timeout)
}

/// [`run_command`] with `input` written to the command's stdin (then closed).
pub fn run_command_with_input(
    command: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<std::process::Output> {
    // Its own group, so a timeout also ends what it started (ssh, credential helpers, hooks) and the pipes close.
    let stdin = if input.is_some() { Stdio::piped() } else { Stdio::null() };
    command.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    restore_fd_limit(command);
    let mut tracked = tracked();
    let mut child = command.spawn()?;
    let pid = child.id() as i32;
    let writer = match (input, child.stdin.take()) {
        // A thread, so a command that does not read its stdin cannot block us past the timeout.
        (Some(input), Some(mut stdin)) => {
            let input = input.to_vec();
            Some(std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&input);
            }))
        }
        _ => None,
    };
    tracked.get_or_insert_with(HashSet::new).insert(pid);
    drop(tracked);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout).is_err() {
            // Still running: unreaped until wait_with_output returns, so the group id is still the command's.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    });
    let output = child.wait_with_output();
    let _ = done_tx.send(());
    let _ = watchdog.join();
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    untrack(pid);
    output
}
