//! What survives a crash: run directories with their records, and the history of finished runs.
//!
//! Every record that must survive is written atomically: a temp file in the same directory, fsync, rename over the
//! target, fsync the directory. A reader sees the old or the new file, never half of one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the record formats below.
pub const RECORD_VERSION: u32 = 1;

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no directory"))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("record");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a JSON record atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// The files of one run.
#[derive(Debug, Clone)]
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    /// Creates the run's directory (private: prompts and output may hold secrets).
    pub fn create(runs_dir: &Path, run_id: &str) -> io::Result<RunFiles> {
        let dir = runs_dir.join(run_id);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        Ok(RunFiles { dir })
    }

    pub fn at(dir: PathBuf) -> RunFiles {
        RunFiles { dir }
    }

    pub fn prompt(&self) -> PathBuf {
        self.dir.join("prompt")
    }
    pub fn stdout(&self) -> PathBuf {
        self.dir.join("stdout")
    }
    pub fn stderr(&self) -> PathBuf {
        self.dir.join("stderr")
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("run.json")
    }
    pub fn exit_record(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
}

/// What a run is: written before the child starts, updated with its pid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub version: u32,
    pub run_id: String,
    pub slot: String,
    pub provider: String,
    pub issue: u64,
    pub program: String,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub prompt_on_stdin: bool,
    pub session_id: Option<String>,
    pub started_at: String,
    pub pid: Option<u32>,
    pub daemon_pid: u32,
}

/// A busy slot's durable truth, `slots/<slot>.lock`. Present while the slot holds a task (starting, in progress,
/// abandoned); absent when the slot is free. Read by the recovery pass after any crash.
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
    /// `starting`, `in_progress` or `abandoned`, as last written. Recovery re-derives the truth from the process
    /// (a run recorded `in_progress` whose process is gone is abandoned).
    pub state: String,
    pub reason: Option<String>,
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
    /// When automatic resumes happened (policy `onAbandoned: resume` allows 3 per hour).
    #[serde(default)]
    pub auto_resumes: Vec<String>,
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
}

impl SlotLock {
    /// A new task's record, with what is known before its first run: [`SlotLock::next_run`] names the run.
    pub fn new(slot: &str, provider: &str, issue: u64, cwd: PathBuf, prompt_file: PathBuf) -> SlotLock {
        let now = crate::timefmt::rfc3339(std::time::SystemTime::now());
        SlotLock {
            version: RECORD_VERSION,
            slot: slot.to_string(),
            provider: provider.to_string(),
            issue,
            task_id: ulid::Ulid::new().to_string(),
            run_id: String::new(),
            runs: Vec::new(),
            state: "starting".into(),
            reason: None,
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
            auto_resumes: Vec::new(),
            worktree: None,
            branch: None,
            title: None,
            comment_id: None,
        }
    }

    /// Makes the record name the task's next run (the first, a resume, a retry): the chain of runs grows and what
    /// belonged to the previous run's process goes. The conversation (session id) stays.
    pub fn next_run(&mut self, run_id: String, files: &RunFiles, boot_id: &str, daemon_pid: u32) {
        self.run_id = run_id.clone();
        self.runs.push(run_id);
        self.state = "starting".into();
        self.reason = None;
        (self.pid, self.pgid, self.start_time) = (None, None, None);
        self.boot_id = boot_id.to_string();
        self.stdout = files.stdout();
        self.stderr = files.stderr();
        self.run_started_at = crate::timefmt::rfc3339(std::time::SystemTime::now());
        self.daemon_pid = daemon_pid;
    }
}

/// Where slot lockfiles live.
pub fn slot_lock_path(slots_dir: &Path, slot: &str) -> PathBuf {
    slots_dir.join(format!("{slot}.lock"))
}

/// Removes a slot's lockfile durably (the slot is free from then on, even after a crash).
pub fn remove_slot_lock(slots_dir: &Path, slot: &str) -> io::Result<()> {
    match std::fs::remove_file(slot_lock_path(slots_dir, slot)) {
        Ok(()) => File::open(slots_dir)?.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A lockfile that could not be read as valid, moved aside.
#[derive(Debug)]
pub struct CorruptLock {
    pub slot: String,
    pub moved_to: PathBuf,
    pub error: String,
}

/// Reads every lockfile. Torn or corrupt ones are moved aside to `<slot>.lock.corrupt[-N]`, never trusted.
pub fn read_slot_locks(slots_dir: &Path) -> io::Result<(Vec<SlotLock>, Vec<CorruptLock>)> {
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    let entries = match std::fs::read_dir(slots_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((good, bad)),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(slot) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".lock")) else {
            continue;
        };
        let slot = slot.to_string();
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice::<SlotLock>(&bytes).map_err(|e| e.to_string()))
            .and_then(|lock| {
                if lock.slot != slot {
                    Err(format!("it names slot {:?}", lock.slot))
                } else if lock.version != RECORD_VERSION {
                    Err(format!("unknown format version {}", lock.version))
                } else {
                    Ok(lock)
                }
            });
        match parsed {
            Ok(lock) => good.push(lock),
            Err(error) => {
                let moved_to = free_name(&path.with_extension("lock.corrupt"));
                std::fs::rename(&path, &moved_to)?;
                bad.push(CorruptLock { slot, moved_to, error });
            }
        }
    }
    if !bad.is_empty() {
        File::open(slots_dir)?.sync_all()?;
    }
    good.sort_by(|a, b| a.slot.cmp(&b.slot));
    bad.sort_by(|a, b| a.slot.cmp(&b.slot));
    Ok((good, bad))
}

/// `path`, or `path-2`, `path-3`, … whichever does not exist yet.
fn free_name(path: &Path) -> PathBuf {
    let mut candidate = path.to_path_buf();
    let mut n = 2;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{}-{n}", path.display()));
        n += 1;
    }
    candidate
}

/// The kernel's id of this boot: a pid recorded under another boot id names nothing of ours.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// How a run ended: written once, when it has.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitRecord {
    pub version: u32,
    pub run_id: String,
    pub slot: String,
    pub issue: u64,
    pub state: String,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: String,
    pub ended_at: String,
    pub duration_secs: u64,
    pub session_id: Option<String>,
    pub cost_usd: Option<f64>,
    pub turns: Option<u64>,
    #[serde(default)]
    pub task_id: String,
    #[serde(default)]
    pub provider: String,
    /// The runs of the task up to and including this one.
    #[serde(default)]
    pub runs: Vec<String>,
    #[serde(default)]
    pub cwd: PathBuf,
    #[serde(default)]
    pub prompt_file: PathBuf,
    #[serde(default)]
    pub worktree: Option<PathBuf>,
    #[serde(default)]
    pub branch: Option<String>,
}

/// The last lines of the history (its tail is enough to know each slot's last task and whether a run is recorded).
pub fn read_history_tail(path: &Path, max_bytes: u64) -> io::Result<Vec<ExitRecord>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let size = file.metadata()?.len();
    let start = size.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut text = Vec::new();
    file.read_to_end(&mut text)?;
    let mut lines = text.split(|b| *b == b'\n');
    if start > 0 {
        lines.next(); // a fragment
    }
    // A torn last line (crash during append) or a foreign line is skipped, not fatal.
    Ok(lines.filter_map(|l| serde_json::from_slice(l).ok()).collect())
}

/// Appends one finished run to `history.jsonl` and syncs it. One line per run; a torn last line from a crash is
/// skipped by readers.
pub fn append_history(path: &Path, record: &ExitRecord) -> io::Result<()> {
    let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut file = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    file.write_all(&line)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
