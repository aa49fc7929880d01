//! Where autodev keeps things: the state dir (lockfiles, runs, history) and the runtime dir (the socket).
//!
//! Both binaries resolve them the same way, so one exported variable points both at a test instance.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

pub const SOCKET_NAME: &str = "autodevd.sock";

#[derive(Debug, Clone)]
pub struct Paths {
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
}

impl Paths {
    /// Resolves both dirs: the flag, then `$AUTODEV_*_DIR`, then systemd's `$STATE_DIRECTORY`/`$RUNTIME_DIRECTORY`,
    /// then the XDG dirs.
    pub fn resolve(state_flag: Option<&Path>, runtime_flag: Option<&Path>) -> anyhow::Result<Paths> {
        let env_dir = |name: &str| {
            std::env::var_os(name).filter(|v| !v.is_empty()).map(|v| {
                // systemd passes a colon-separated list when several dirs are configured; the first is ours.
                let s = v.to_string_lossy().into_owned();
                PathBuf::from(s.split(':').next().unwrap_or_default())
            })
        };
        let project = directories::ProjectDirs::from("", "", "autodev");
        let state_dir = state_flag
            .map(Path::to_path_buf)
            .or_else(|| env_dir("AUTODEV_STATE_DIR"))
            .or_else(|| env_dir("STATE_DIRECTORY"))
            .or_else(|| project.as_ref().and_then(|p| p.state_dir().map(Path::to_path_buf)))
            .context("no state directory: pass --state-dir or set AUTODEV_STATE_DIR (HOME is not set)")?;
        let runtime_dir = runtime_flag
            .map(Path::to_path_buf)
            .or_else(|| env_dir("AUTODEV_RUNTIME_DIR"))
            .or_else(|| env_dir("RUNTIME_DIRECTORY"))
            .or_else(|| project.as_ref().and_then(|p| p.runtime_dir().map(Path::to_path_buf)))
            // No XDG_RUNTIME_DIR (a plain su session, cron): a per-user dir that ensure_private_dir vets.
            .unwrap_or_else(|| std::env::temp_dir().join(format!("autodev-{}", nix::unistd::getuid())));
        Ok(Paths { state_dir, runtime_dir })
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join(SOCKET_NAME)
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.state_dir.join("runs")
    }

    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.runs_dir().join(run_id)
    }

    pub fn slots_dir(&self) -> PathBuf {
        self.state_dir.join("slots")
    }

    pub fn history_file(&self) -> PathBuf {
        self.state_dir.join("history.jsonl")
    }

    pub fn daemon_lock(&self) -> PathBuf {
        self.state_dir.join("daemon.lock")
    }
}

/// Creates `dir` (mode 0700) if needed and refuses one that another user owns or others can write to,
/// since the socket and run logs inside it are private.
pub fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    // Not following links: a link planted in a shared /tmp could be swapped after the check.
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if meta.file_type().is_symlink() {
        bail!("{} is a symbolic link; autodev keeps its state and socket only in real directories", dir.display());
    }
    let me = nix::unistd::getuid().as_raw();
    if meta.uid() != me {
        bail!("{} belongs to uid {}, not to you (uid {me}): choose another directory", dir.display(), meta.uid());
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (chmod 700)", dir.display()))?;
    }
    Ok(())
}

/// The mount point of the filesystem `path` is on (the longest mount point in `/proc/self/mounts` that contains
/// it), to say which filesystem is full.
pub fn mount_point(path: &Path) -> Option<PathBuf> {
    let path = std::fs::canonicalize(path).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        // Spaces and the like are octal escapes there (`\040`).
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
}
