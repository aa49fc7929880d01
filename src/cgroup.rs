//! A cgroup v2 per run: where the runs' cgroups live, joining one before exec, signalling and killing everything
//! in one (setsid'd and fd-closing daemons too), reading its CPU and memory, and removing it once it is empty.
//!
//! Containment needs no controllers: `cgroup.procs`, `cgroup.events` and `cgroup.kill` exist in every cgroup.
//! Controllers (memory, cpu, pids) are used where they are delegated to us, for figures and limits.
//!
//! Where the runs' cgroups live, in order of preference:
//! 1. under autodevd's own cgroup when systemd delegated it (`Delegate=yes`): the daemon moves itself into the leaf
//!    `<own>/daemon` (cgroup v2 allows controllers for children only in a cgroup without processes of its own)
//!    and each run gets `<own>/runs/<run id>`;
//! 2. else under the root of a writable cgroup2 mount, in `autodev-<hash of the state dir>/<run id>`, so daemons of
//!    different state dirs never meet.
//!
//! Where neither works, runs fall back to process groups and the run lock (see `supervisor`).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// Controllers a run's cgroup uses where they are delegated.
const WANTED_CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];
/// How often a stop checks whether a cgroup is empty.
const EMPTY_POLL: Duration = Duration::from_millis(20);
/// How long to wait for a killed cgroup to empty before calling its processes stuck.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// No cgroup file autodev reads is larger than this (`cgroup.procs` of 200 processes is about 1.4 KB).
const MAX_READ: u64 = 1 << 20;

/// Where this daemon's runs get their cgroups.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// Where the cgroup2 filesystem is mounted.
    mount: PathBuf,
    /// The directory under which each run gets `<run id>`.
    pub base: PathBuf,
    /// Controllers enabled for the runs' cgroups.
    pub controllers: Vec<String>,
    /// How the base was found: `delegated` or `mount root`.
    pub how: &'static str,
}

/// Limits for a run's cgroup, each applied where its controller is enabled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// `memory.max`, e.g. `4G` or a byte count.
    pub memory_max: Option<String>,
    /// `cpu.max`, e.g. `200000 100000` (two cores).
    pub cpu_max: Option<String>,
    /// `pids.max`.
    pub tasks_max: Option<u64>,
}

impl Cgroups {
    /// Finds (and prepares) where runs' cgroups go; the error says why there is no cgroup containment here and
    /// how to get it.
    pub fn setup(state_dir: &Path) -> Result<Cgroups, String> {
        let mount = cgroup2_mount().ok_or(
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo); runs are contained by process groups",
        )?;
        let own = own_cgroup().ok_or("cannot read this process's cgroup from /proc/self/cgroup")?;
        let own_dir = mount.join(own.trim_start_matches('/'));
        // systemd ≥ 254 with `DelegateSubgroup=daemon` starts us in the leaf already.
        let placed_in_leaf = own_dir.file_name().is_some_and(|n| n == "daemon")
            && own_dir.parent().is_some_and(|unit| unit != mount && is_delegated(unit));
        let unit = if placed_in_leaf { own_dir.parent().map(Path::to_path_buf) } else { Some(own_dir.clone()) };
        if let Some(unit) = unit.filter(|u| *u != mount && is_delegated(u)) {
            match setup_delegated(&mount, &unit, placed_in_leaf) {
                Ok(cgroups) => return Ok(cgroups),
                Err(e) => tracing::warn!("cannot use the delegated cgroup {}: {e}", unit.display()),
            }
        }
        let base = mount.join(format!("autodev-{:016x}", fnv1a(state_dir.as_os_str().as_encoded_bytes())));
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "cannot create {} ({e}): run autodevd under systemd with Delegate=yes (see systemd/ in the \
                     repository), or as a user who may write the cgroup2 mount {}",
                    base.display(),
                    mount.display()
                ));
            }
        }
        let controllers = enable_controllers(&base);
        Ok(Cgroups { mount, base, controllers, how: "mount root" })
    }

    /// The cgroup of run `run_id` (not created yet).
    pub fn run(&self, run_id: &str) -> RunCgroup {
        self.at(self.base.join(run_id))
    }

    fn at(&self, path: PathBuf) -> RunCgroup {
        let relative = path.strip_prefix(&self.mount).map(|r| format!("/{}", r.display())).unwrap_or_default();
        RunCgroup { path, relative }
    }

    /// The cgroups of runs under the base.
    pub fn runs(&self) -> Vec<RunCgroup> {
        let Ok(entries) = std::fs::read_dir(&self.base) else { return Vec::new() };
        entries.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).map(|e| self.at(e.path())).collect()
    }

    /// Removes the base if nothing is left in it (at shutdown, when no run outlives the daemon).
    pub fn remove_if_empty(&self) {
        if self.how == "mount root" {
            let _ = std::fs::remove_dir(&self.base);
        }
    }
}

/// One run's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCgroup {
    pub path: PathBuf,
    /// The path as `/proc/<pid>/cgroup` names it (from the mount's root).
    relative: String,
}

impl RunCgroup {
    /// Creates the cgroup and applies `limits` where their controllers are enabled; returns what could not be
    /// applied, to be said.
    pub fn create(&self, limits: &Limits) -> io::Result<Vec<String>> {
        match std::fs::create_dir(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let mut unapplied = Vec::new();
        let tasks = limits.tasks_max.map(|n| n.to_string());
        for (file, value) in [
            ("memory.max", limits.memory_max.as_deref()),
            ("cpu.max", limits.cpu_max.as_deref()),
            ("pids.max", tasks.as_deref()),
        ] {
            let Some(value) = value else { continue };
            if let Err(e) = std::fs::write(self.path.join(file), value) {
                unapplied
                    .push(format!("{file} = {value:?}: {e} (is the controller delegated? see `autodevctl doctor`)"));
            }
        }
        Ok(unapplied)
    }

    /// `cgroup.procs`, opened for writing: the child writes "0" to it between fork and exec to join.
    pub fn procs_for_joining(&self) -> io::Result<File> {
        std::fs::OpenOptions::new().write(true).open(self.path.join("cgroup.procs"))
    }

    /// The run id the cgroup is named after.
    pub fn run_id(&self) -> Option<&str> {
        self.path.file_name()?.to_str()
    }

    pub fn exists(&self) -> bool {
        self.path.join("cgroup.procs").exists()
    }

    /// The processes in the cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        read_small(&self.path.join("cgroup.procs"))
            .map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether any process is left (`populated` in `cgroup.events`); a cgroup that is gone is empty.
    pub fn populated(&self) -> bool {
        read_small(&self.path.join("cgroup.events"))
            .map(|text| key_value(&text, "populated") == Some(1))
            .unwrap_or(false)
    }

    /// Whether `pid` is in this cgroup: its `/proc/<pid>/cgroup` names exactly this one.
    pub fn contains(&self, pid: i32) -> bool {
        let Some(own) = read_small(Path::new(&format!("/proc/{pid}/cgroup"))) else { return false };
        let Some(theirs) = own.lines().find_map(|l| l.strip_prefix("0::")) else { return false };
        !self.relative.is_empty() && theirs.trim_end() == self.relative
    }

    /// Sends `signal` to every process in the cgroup, through a pidfd checked for membership, so a pid recycled
    /// since the list was read is never hit.
    pub fn signal_all(&self, signal: Signal) -> usize {
        let mut sent = 0;
        for pid in self.pids() {
            // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if fd < 0 {
                continue;
            }
            if self.contains(pid) {
                // SAFETY: a pidfd we own, a signal number, a null siginfo and flags; no memory is shared.
                unsafe {
                    libc::syscall(libc::SYS_pidfd_send_signal, fd as i32, signal as i32, std::ptr::null::<u8>(), 0);
                }
                sent += 1;
            }
            // SAFETY: closes the fd pidfd_open returned above, which nothing else owns.
            unsafe { libc::close(fd as i32) };
        }
        sent
    }

    /// SIGKILL to everything in the cgroup at once: `cgroup.kill` (Linux 5.14+), else freeze, KILL each, thaw.
    pub fn kill(&self) {
        if std::fs::write(self.path.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        let frozen = std::fs::write(self.path.join("cgroup.freeze"), "1").is_ok();
        self.signal_all(Signal::SIGKILL);
        if frozen {
            let _ = std::fs::write(self.path.join("cgroup.freeze"), "0");
        }
    }

    /// Ends everything in the cgroup: TERM to every process, then `cgroup.kill` after `grace`; returns once it is
    /// empty (or after the kill and a short wait, for processes stuck in the kernel). Returns how many processes
    /// were there.
    pub async fn stop(&self, grace: Duration) -> usize {
        let found = self.pids().len();
        if !self.populated() {
            return found;
        }
        self.signal_all(Signal::SIGTERM);
        if !self.wait_empty(grace).await {
            self.kill();
            if !self.wait_empty(KILL_WAIT).await {
                tracing::warn!(cgroup = %self.path.display(), "processes of the run survive SIGKILL (stuck in the kernel?)");
            }
        }
        found
    }

    async fn wait_empty(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if !self.populated() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(EMPTY_POLL).await;
        }
    }

    /// CPU time used by everything that ever ran in the cgroup, in microseconds (`cpu.stat` `usage_usec`, present
    /// without the cpu controller).
    pub fn cpu_usec(&self) -> Option<u64> {
        key_value(&read_small(&self.path.join("cpu.stat"))?, "usage_usec")
    }

    /// Memory in use by the cgroup (`memory.current`), where the memory controller is enabled.
    pub fn memory_bytes(&self) -> Option<u64> {
        read_small(&self.path.join("memory.current"))?.trim().parse().ok()
    }

    /// Whether the kernel's OOM killer killed a process of the cgroup (`memory.events` `oom_kill`).
    pub fn oom_killed(&self) -> bool {
        read_small(&self.path.join("memory.events")).and_then(|t| key_value(&t, "oom_kill")).is_some_and(|n| n > 0)
    }

    /// `memory.max` as set, for the message of an OOM kill.
    pub fn memory_max(&self) -> Option<String> {
        read_small(&self.path.join("memory.max")).map(|t| t.trim().to_string())
    }

    /// Removes the cgroup; only an empty one can go (the kernel refuses otherwise).
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// Where the cgroup2 filesystem is mounted; `/sys/fs/cgroup` when it is there, else the first one (e.g. the hybrid
/// hierarchy's `/sys/fs/cgroup/unified`).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = read_small(Path::new("/proc/self/mountinfo"))?;
    let mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    mounts.iter().find(|m| m.as_path() == Path::new("/sys/fs/cgroup")).or(mounts.first()).cloned()
}

/// This process's cgroup v2 path, from its `0::` line.
fn own_cgroup() -> Option<String> {
    read_small(Path::new("/proc/self/cgroup"))?.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

/// Whether systemd delegated `dir` to us: it marks delegated cgroups with a `trusted.delegate` (root's units) or
/// `user.delegate` (user units) extended attribute.
fn is_delegated(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let name = std::ffi::CString::new(*name).expect("no NUL in a constant");
        let mut value = [0u8; 8];
        // SAFETY: both strings are NUL-terminated and live across the call; the buffer is ours and its size given.
        let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        n > 0 && value[0] == b'1'
    })
}

/// Moves the daemon into `<unit>/daemon` and prepares `<unit>/runs`.
///
/// Controllers are enabled for the runs only when systemd itself starts the daemon in the leaf
/// (`DelegateSubgroup=daemon`, systemd ≥ 254): with controllers enabled in the unit's cgroup, the kernel refuses
/// processes in it, and systemd 252, which starts the main process there, could not restart autodevd after a crash
/// while runs live on. Without controllers, containment and CPU figures still work; limits do not (`doctor`).
fn setup_delegated(mount: &Path, unit: &Path, placed_in_leaf: bool) -> io::Result<Cgroups> {
    let leaf = unit.join("daemon");
    let runs = unit.join("runs");
    for dir in [&leaf, &runs] {
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    if !placed_in_leaf {
        // "0" moves the writing process, with all its threads.
        std::fs::write(leaf.join("cgroup.procs"), "0")?;
    }
    let controllers = if placed_in_leaf {
        enable_controllers(unit);
        enable_controllers(&runs)
    } else {
        Vec::new()
    };
    Ok(Cgroups { mount: mount.to_path_buf(), base: runs, controllers, how: "delegated" })
}

/// Enables the wanted controllers that `dir` has for its children; returns those enabled.
fn enable_controllers(dir: &Path) -> Vec<String> {
    let available = read_small(&dir.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<&str> = available.split_whitespace().filter(|c| WANTED_CONTROLLERS.contains(c)).collect();
    let mut enabled = Vec::new();
    for controller in wanted {
        // One at a time: one that cannot be enabled must not keep the others off.
        if std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}")).is_ok() {
            enabled.push(controller.to_string());
        }
    }
    enabled
}

/// The number after `key ` in a flat-keyed cgroup file (`cgroup.events`, `cpu.stat`, `memory.events`).
fn key_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

fn read_small(path: &Path) -> Option<String> {
    let mut text = String::new();
    File::open(path).ok()?.take(MAX_READ).read_to_string(&mut text).ok()?;
    Some(text)
}

/// FNV-1a, 64 bits: a stable short name for a state dir (std's hasher may change between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_files() {
        let events = "populated 1\nfrozen 0\n";
        assert_eq!(key_value(events, "populated"), Some(1));
        assert_eq!(key_value(events, "frozen"), Some(0));
        assert_eq!(key_value("usage_usec 1208\nuser_usec 1208\n", "usage_usec"), Some(1208));
        // A key that is a prefix of another is not mistaken for it.
        assert_eq!(key_value("oom_kill_disable 0\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(key_value("", "populated"), None);
    }

    #[test]
    fn state_dir_names_are_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(fnv1a(b"/var/lib/autodev"), fnv1a(b"/var/lib/autodev2"));
    }
}
