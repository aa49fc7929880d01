//! The lease when autodevd itself is gone. Runs outlive a dead daemon (it adopts them when it comes back), but they
//! must not outlive its claims: a small process of its own (`autodevd --lease-keeper`, in a session of its own)
//! watches the daemon and `fleet.json`, and once the daemon is gone and its last renewal is older than the holder's
//! stop limit, it kills every run the lockfiles name, before another machine may take their issues over. While the
//! daemon lives it does nothing: the daemon's own lease watch stops its runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;

use crate::supervisor::{proc_stat, run_lock_holders, signal_group};
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

    /// Whether the daemon of this state dir runs: some process holds the flock on its `daemon.lock` (read from
    /// `/proc/locks`, never by taking the lock, which would keep a starting daemon out).
    fn daemon_alive(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(self.state_dir.join("daemon.lock")) else { return false };
        let (major, minor, inode) = (libc::major(meta.dev()) as u64, libc::minor(meta.dev()) as u64, meta.ino());
        // Unreadable: as if alive (never kill on a guess).
        let Ok(locks) = std::fs::read_to_string("/proc/locks") else { return true };
        flock_held(&locks, major, minor, inode)
    }

    /// How long ago the daemon's last renewal was sent: by the boot-time clock when it was noted in this boot
    /// (a wall clock stepped back cannot delay the kill), else by the wall clock.
    fn renewal_age(&self) -> Option<Duration> {
        let text = std::fs::read_to_string(self.state_dir.join("fleet.json")).ok()?;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        if value["boot_id"].as_str() == Some(crate::ledger::boot_id().as_str())
            && let Some(at) = value["boottime_ms"].as_u64()
        {
            return Some(boottime().saturating_sub(Duration::from_millis(at)));
        }
        let at = crate::timefmt::parse_rfc3339(value["renewed_at"].as_str()?)?;
        Some(SystemTime::now().duration_since(at).unwrap_or_default())
    }

    /// The runs the lockfiles name (running, or being started) that still have a process. Lockfiles are only read
    /// here, never moved: the daemon's recovery decides about broken ones.
    fn live_runs(&self) -> Vec<LiveRun> {
        let Ok(entries) = std::fs::read_dir(self.state_dir.join("slots")) else { return Vec::new() };
        let boot = crate::ledger::boot_id();
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".lock"))
            .filter_map(|e| serde_json::from_slice::<crate::task::SlotLock>(&std::fs::read(e.path()).ok()?).ok())
            .filter(|l| matches!(l.phase, Phase::Running { .. } | Phase::Starting) && l.boot_id == boot)
            .filter(|l| !l.run_id.is_empty() && !l.run_id.contains('/') && !l.run_id.starts_with('.'))
            .filter_map(|l| {
                // The leader only while it is the very process the run started (a pid reused since is another's).
                let leader = l.pgid.or(l.pid).map(|p| p as i32).filter(|leader| {
                    proc_stat(*leader)
                        .is_some_and(|s| s.state != 'Z' && Some(s.start_time) == l.start_time && s.pgrp == *leader)
                });
                // Whatever holds the run's lock file (its children inherit it, also those that left the group).
                let lock = self.state_dir.join("runs").join(&l.run_id).join(crate::ledger::RUN_LOCK);
                let holders = run_lock_holders(&lock, None);
                // A cgroup is only the run's when it is named after it.
                let cgroup = l
                    .cgroup
                    .filter(|c| c.file_name().is_some_and(|n| n == l.run_id.as_str()))
                    .filter(|c| std::fs::read_to_string(c.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty()));
                (leader.is_some() || !holders.is_empty() || cgroup.is_some()).then_some(LiveRun {
                    leader,
                    holders,
                    cgroup,
                })
            })
            .collect()
    }
}

/// Whether `/proc/locks` lists a flock on the file `major:minor:inode`. A line reads
/// "1: FLOCK  ADVISORY  WRITE 1234 08:01:131 0 EOF": the device in hex, the inode in decimal; a blocked waiter's
/// line has "->" after the number.
fn flock_held(locks: &str, major: u64, minor: u64, inode: u64) -> bool {
    locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().filter(|f| *f != "->").collect();
        let Some(id) = fields.get(5) else { return false };
        let parts: Vec<&str> = id.split(':').collect();
        fields.get(1) == Some(&"FLOCK")
            && !line.contains("->")
            && parts.len() == 3
            && u64::from_str_radix(parts[0], 16).ok() == Some(major)
            && u64::from_str_radix(parts[1], 16).ok() == Some(minor)
            && parts[2].parse::<u64>().ok() == Some(inode)
    })
}

struct LiveRun {
    leader: Option<i32>,
    holders: Vec<i32>,
    cgroup: Option<PathBuf>,
}

impl LiveRun {
    /// SIGKILL to all of the run: its cgroup at once where it has one, its process group while its leader is the
    /// run's, and every process holding its run lock.
    fn kill(&self) {
        if let Some(cgroup) = &self.cgroup
            && std::fs::write(cgroup.join("cgroup.kill"), "1").is_err()
        {
            let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Some(leader) = self.leader {
            signal_group(leader, Signal::SIGKILL);
        }
        for pid in &self.holders {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

/// The time since boot, suspend included (`CLOCK_BOOTTIME`): it never steps back.
pub fn boottime() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec given, which lives for the call.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0;
    if ok { Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32) } else { Duration::ZERO }
}

/// Makes any keeper of `state_dir` leave (the fleet is off here now): its token is gone, and so is the last renewal.
pub fn retire(state_dir: &Path) {
    let _ = std::fs::remove_file(token_file(state_dir));
    let _ = std::fs::remove_file(state_dir.join("fleet.json"));
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_daemon_lives_while_its_flock_is_listed() {
        let locks = "1: POSIX  ADVISORY  WRITE 900 08:01:131 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 103:0a:4096 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 1300 00:2d:777 0 EOF\n";
        // (major, minor, inode, held?)
        for (major, minor, inode, held) in
            [(0x103, 0x0a, 4096, true), (8, 1, 131, false), (0x103, 0x0a, 4097, false), (0, 0x2d, 777, false)]
        {
            assert_eq!(super::flock_held(locks, major, minor, inode), held, "{major:x}:{minor:x}:{inode}");
        }
        assert!(!super::flock_held("", 1, 1, 1));
        assert!(!super::flock_held("garbage\n: : :\n", 1, 1, 1));
    }
}
