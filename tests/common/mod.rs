//! Test harness: starts the real autodevd in a temp dir with a config that points at the fake CLIs, drives it with
//! the real autodevctl, and waits on conditions with deadlines (never fixed sleeps).

#![allow(dead_code)]

pub mod fake_github;
pub mod git;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A config whose built-in providers run the fake CLIs. `extra` is merged into each `llms` entry.
pub fn fake_config(slots: u32) -> Value {
    let bin = fixtures().join("bin");
    let mut llms = serde_json::Map::new();
    for name in ["claude", "gemini", "codex"] {
        llms.insert(
            name.into(),
            serde_json::json!({
                "enabled": true,
                "maxConcurrentIssues": slots,
                "cliPath": bin.join(name).display().to_string(),
            }),
        );
    }
    serde_json::json!({ "llms": llms, "supervisor": { "stopGraceSecs": 1 } })
}

/// Polls `check` until it returns Some or the deadline passes.
pub fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out after {DEADLINE:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub process: Option<Child>,
    pub workspace: PathBuf,
    /// Where the fake CLIs write their records (outside any worktree).
    pub records: PathBuf,
    pub config_path: PathBuf,
    /// More environment for the daemon (NOTIFY_SOCKET, WATCHDOG_USEC, …).
    pub extra_env: Vec<(String, String)>,
}

impl Daemon {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir().join("autodevd.sock")
    }
    pub fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("autodevd.stderr")
    }

    /// Writes `config` and starts autodevd; returns once it answers `status`.
    pub fn start(config: &Value) -> Daemon {
        Daemon::start_in(config, None)
    }

    /// Starts with `workspace` (e.g. a git clone) as the runs' working directory.
    pub fn start_in(config: &Value, workspace: Option<&Path>) -> Daemon {
        Daemon::start_full(config, workspace, &[])
    }

    pub fn start_full(config: &Value, workspace: Option<&Path>, env: &[(&str, &str)]) -> Daemon {
        let mut daemon = Daemon::prepare(config, workspace, env);
        daemon.launch();
        daemon
    }

    /// Writes the config and makes the directories, without starting autodevd (`launch` does).
    pub fn prepare(config: &Value, workspace: Option<&Path>, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let workspace = workspace.map(Path::to_path_buf).unwrap_or_else(|| dir.path().join("work"));
        let records = dir.path().join("records");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::create_dir_all(&records).unwrap();
        let mut config = config.clone();
        if config.get("workspace").is_none() {
            config["workspace"] = serde_json::json!({ "dir": workspace.display().to_string() });
        }
        for llm in config["llms"].as_object_mut().into_iter().flat_map(|m| m.values_mut()) {
            llm["env"]["FAKE_RECORD_DIR"] = serde_json::json!(records.display().to_string());
        }
        let config_path = dir.path().join("autonomous-config.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let extra_env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Daemon { dir, process: None, workspace, records, config_path, extra_env }
    }

    /// Starts (or restarts) the daemon process on the same dirs.
    pub fn launch(&mut self) {
        let child = self.daemon_command().spawn().expect("start autodevd");
        self.process = Some(child);
        wait_until("autodevd to answer", || self.try_ctl(&["status", "--json"]).status.success().then_some(()));
    }

    pub fn daemon_command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_autodevd"));
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--runtime-dir")
            .arg(self.runtime_dir())
            .env("RUST_LOG", "info")
            // Secrets of the daemon's own environment that no child may see.
            .env("GITHUB_TOKEN", "ghp_daemon_secret")
            .env("CLAUDECODE", "1")
            .env("ANTHROPIC_API_KEY", "sk-ant-test")
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(self.stderr_path()).unwrap());
        cmd
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("daemon running").id()
    }

    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_autodevctl"));
        cmd.args(args)
            .env("AUTODEV_STATE_DIR", self.state_dir())
            .env("AUTODEV_RUNTIME_DIR", self.runtime_dir())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs autodevctl and returns its output, whatever its exit code.
    pub fn try_ctl(&self, args: &[&str]) -> Output {
        self.ctl_command(args).output().expect("run autodevctl")
    }

    /// Runs autodevctl and insists it succeeds.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.try_ctl(args);
        assert!(
            out.status.success(),
            "autodevctl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ctl(&["status", "--json"])).unwrap()
    }

    pub fn slot(&self, name: &str) -> Value {
        let status = self.status();
        status["slots"].as_array().unwrap().iter().find(|s| s["slot"] == name).cloned().unwrap_or_else(|| {
            panic!("no slot {name} in {status}");
        })
    }

    /// Assigns with `prompt` and returns the slot it got.
    pub fn assign(&self, issue: u64, extra: &[&str], prompt: &str) -> String {
        let issue = issue.to_string();
        let prompt = format!("--prompt={prompt}");
        let mut args = vec!["assign", issue.as_str(), "--json", prompt.as_str()];
        args.extend_from_slice(extra);
        let reply: Value = serde_json::from_str(&self.ctl(&args)).unwrap();
        reply["slot"].as_str().unwrap().to_string()
    }

    /// Waits until `slot` is in `state` and returns its row.
    pub fn wait_state(&self, slot: &str, state: &str) -> Value {
        wait_until(&format!("{slot} to be {state}"), || {
            let row = self.slot(slot);
            (row["state"] == state).then_some(row)
        })
    }

    /// The fake CLI's record of the run (argv, env, prompt, pid).
    pub fn record(&self, run_id: &str) -> Value {
        let path = self.records.join(format!("fake-record-{run_id}.json"));
        let text = wait_until("the fake CLI's record", || std::fs::read_to_string(&path).ok());
        serde_json::from_str(&text).unwrap()
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// Kills the daemon with SIGKILL (a crash) and waits for it; its children live on.
    pub fn kill9(&mut self) {
        let mut child = self.process.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the daemon to exit; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.process.take().expect("daemon running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        wait_until("autodevd to exit", || child.try_wait().unwrap())
    }
}

impl Daemon {
    /// Where the daemon put its runs' cgroups (from its log), when it contains runs with cgroups.
    pub fn cgroup_base(&self) -> Option<PathBuf> {
        let log = self.daemon_log();
        let line = log.lines().rev().find(|l| l.contains("containment: a cgroup per run"))?;
        let base = line.split_whitespace().find_map(|w| w.strip_prefix("base="))?;
        Some(PathBuf::from(base))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.process.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            let mut ended = false;
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    ended = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !ended {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // A daemon killed by a test leaves its (empty) cgroup base behind; the machine keeps no litter of tests.
        if let Some(base) = self.cgroup_base() {
            let _ = std::fs::remove_dir(base);
        }
    }
}

/// Connects to `socket` and sends a JSON frame header announcing `len` bytes, then `len - 1` of them: a client
/// stalled one byte short of a request. Stops writing once the daemon drops it.
pub fn stalled_client(socket: &Path, len: u32) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let mut header = vec![b'J'];
    header.extend_from_slice(&len.to_be_bytes());
    let _ = s.write_all(&header);
    let chunk = vec![b' '; 1 << 20];
    let mut left = len as usize - 1;
    while left > 0 && s.write_all(&chunk[..left.min(chunk.len())]).is_ok() {
        left -= left.min(chunk.len());
    }
    s
}

/// True while `pid` names a process that has not exited (zombies count as gone).
pub fn alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().and_then(|s| s.split_whitespace().next()).unwrap_or("X");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}
