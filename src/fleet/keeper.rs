//! The lease when autodevd itself is gone. Runs outlive a dead daemon (it adopts them when it comes back), but they
//! must not outlive its claims: a small process of its own (`autodevd --lease-keeper`, in a session of its own)
//! watches the daemon and `fleet.json`, and once the daemon is gone and its last renewal is older than the holder's
//! stop limit, it kills every run the lockfiles name, before another machine may take their issues over. While the
//! daemon lives it does nothing: the daemon's own lease watch stops its runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;

use crate::supervisor::{proc_stat, signal_group};
use crate::task::Phase;

/// How often the keeper looks.
const EVERY: Duration = Duration::from_millis(250);

/// The keeper of a state dir: its files, its token, and the stop limit
/// (`staleAfterSecs - heartbeatSecs - stopGraceSecs`).
pub struct Keeper {
    pub state_dir: PathBuf,
    pub token: String,
    pub stop_after: Duration,
}

/// The file naming the current keeper (by a token the daemon wrote before starting it): an older keeper sees it is
/// not its own and leaves.
fn token_file(state_dir: &Path) -> PathBuf {
    state_dir.join("lease-keeper")
}

impl Keeper {
    /// Runs until a newer keeper takes over, or the daemon is gone and no run is left to end.
    pub fn run(&self) {
        loop {
            std::thread::sleep(EVERY);
            let newest = std::fs::read_to_string(token_file(&self.state_dir)).unwrap_or_default();
            if newest.trim() != self.token {
                return;
            }
            if self.daemon_alive() {
                continue;
            }
            let live = self.live_runs();
            if live.is_empty() {
                return;
            }
            if self.renewal_age().is_none_or(|age| age >= self.stop_after) {
                for run in &live {
                    run.kill();
                }
            }
        }
    }

    /// Whether the daemon of this state dir runs: the pid in `daemon.lock` is a live autodevd.
    fn daemon_alive(&self) -> bool {
        let pid = std::fs::read_to_string(self.state_dir.join("daemon.lock"))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .filter(|p| *p > 0);
        let Some(pid) = pid else { return false };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        proc_stat(pid).is_some_and(|s| s.state != 'Z') && comm.trim() == "autodevd"
    }

    /// How long ago the daemon's last renewal was sent, by the wall clock of this machine (`fleet.json`).
    fn renewal_age(&self) -> Option<Duration> {
        let text = std::fs::read_to_string(self.state_dir.join("fleet.json")).ok()?;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        let at = crate::timefmt::parse_rfc3339(value["renewed_at"].as_str()?)?;
        Some(SystemTime::now().duration_since(at).unwrap_or_default())
    }

    /// The runs the lockfiles say are running whose processes still live.
    fn live_runs(&self) -> Vec<LiveRun> {
        let Ok((locks, _)) = crate::ledger::read_slot_locks(&self.state_dir.join("slots")) else { return Vec::new() };
        let boot = crate::ledger::boot_id();
        locks
            .into_iter()
            .filter(|l| matches!(l.phase, Phase::Running { .. }) && l.boot_id == boot)
            .filter_map(|l| {
                let leader = l.pgid.or(l.pid)? as i32;
                // Only the very process the run started (a pid reused since is someone else's).
                let alive = proc_stat(leader)
                    .is_some_and(|s| s.state != 'Z' && Some(s.start_time) == l.start_time && s.pgrp == leader);
                // A cgroup is only ours when it is named after the run.
                let cgroup = l.cgroup.filter(|c| c.file_name().is_some_and(|n| n == l.run_id.as_str()));
                let populated = cgroup.as_ref().is_some_and(|c| {
                    std::fs::read_to_string(c.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
                });
                (alive || populated).then_some(LiveRun { leader, cgroup: cgroup.filter(|_| populated) })
            })
            .collect()
    }
}

struct LiveRun {
    leader: i32,
    cgroup: Option<PathBuf>,
}

impl LiveRun {
    /// SIGKILL to all of the run: its cgroup at once where it has one, and its process group.
    fn kill(&self) {
        if let Some(cgroup) = &self.cgroup
            && std::fs::write(cgroup.join("cgroup.kill"), "1").is_err()
        {
            let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        signal_group(self.leader, Signal::SIGKILL);
    }
}

/// Starts the keeper of `state_dir` beside the daemon, in a session of its own so it outlives the daemon.
pub fn spawn(state_dir: &Path, stop_after: Duration) -> std::io::Result<u32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let token = ulid::Ulid::new().to_string();
    // Written first: the new keeper finds its own token, and an older one finds it is not its own.
    crate::ledger::write_atomic(&token_file(state_dir), token.as_bytes())?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("--lease-keeper")
        .arg(state_dir)
        .arg(&token)
        .arg(stop_after.as_millis().to_string())
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches nothing of the parent's.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    // Reaped by the daemon's reaper when it leaves; nothing waits for it here.
    let child = command.spawn()?;
    Ok(child.id())
}

/// `autodevd --lease-keeper <state dir> <token> <stop after, ms>`: the keeper's entry point.
pub fn main_from_args(args: &[String]) -> Option<()> {
    let state_dir = PathBuf::from(args.first()?);
    let token = args.get(1)?.clone();
    let stop_after = Duration::from_millis(args.get(2)?.parse().ok()?);
    Keeper { state_dir, token, stop_after }.run();
    Some(())
}
