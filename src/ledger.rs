//! What survives a crash: run directories with their records, and the history of finished runs.
//!
//! Every record that must survive is written atomically: a temp file in the same directory, fsync, rename over the
//! target, fsync the directory. A reader sees the old or the new file, never half of one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the run and exit records and the history lines. 1: before end causes; 2: `end_cause`.
pub const RECORD_VERSION: u32 = 2;

/// Whether an error of one of autodev's own writes means the filesystem is full (or the quota spent): then the
/// write is kept to do again, never given up. EIO and the rest are not that.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

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
    // Redacted like everything autodev writes; pretty, for people who read the state dir.
    let mut bytes = crate::redact::to_json_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// The lock file in a run's directory whose lock the run's processes hold (the child inherits a descriptor of it).
pub const RUN_LOCK: &str = "run.lock";

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

/// Reads a run's `run.json` of any version this autodevd knows (versions 1 and 2 have the same fields).
pub fn read_run_record(path: &Path) -> Option<RunRecord> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path).ok()?.take(1 << 20).read_to_end(&mut bytes).ok()?;
    let record: RunRecord = serde_json::from_slice(&bytes).ok()?;
    (record.version <= RECORD_VERSION).then_some(record)
}

/// Reads a versioned state file (`{"version": N, …}`, the outboxes). Missing: the default. Of a newer format than
/// `known`: moved aside to `<file>.v<N>`, never overwritten (the newer autodev that wrote it can still act on it),
/// and the default. Unreadable: moved aside to `<file>.unreadable` (the next write must not destroy what a person
/// may still recover), said, and the default.
pub fn load_versioned<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
    known: u32,
    version: impl Fn(&T) -> u32,
) -> T {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return T::default(),
        // Unreadable now (permissions, I/O): kept aside like a torn file, so the next write destroys nothing.
        Err(e) => {
            let aside = path.with_extension("json.unreadable");
            tracing::error!("cannot read {} ({e}); moved to {} and starting empty", path.display(), aside.display());
            if let Err(e) = std::fs::rename(path, &aside) {
                tracing::error!("cannot move {} aside ({e}): the next write replaces it", path.display());
            }
            return T::default();
        }
    };
    match serde_json::from_slice::<T>(&bytes) {
        Ok(value) if version(&value) <= known => value,
        Ok(value) => {
            let aside = path.with_extension(format!("json.v{}", version(&value)));
            tracing::error!(
                "{} has format version {}, newer than this autodevd understands ({known}); moved to {} and not acted on",
                path.display(),
                version(&value),
                aside.display()
            );
            let _ = std::fs::rename(path, aside);
            T::default()
        }
        Err(e) => {
            let aside = path.with_extension("json.unreadable");
            tracing::error!("{} is unreadable ({e}); moved to {} and starting empty", path.display(), aside.display());
            let _ = std::fs::rename(path, aside);
            T::default()
        }
    }
}

/// Reads a run's `exit.json` (bounded); `None` when it is missing or unreadable.
pub fn read_exit_record(path: &Path) -> Option<ExitRecord> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path).ok()?.take(1 << 20).read_to_end(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub use crate::task::SlotLock;
use crate::task::{EndCause, LOCK_VERSION, Phase};

/// The lockfile format before the task state machine (version 1): the phase as a `state` string and a `reason`.
/// Read only to migrate.
#[derive(Debug, Deserialize)]
struct SlotLockV1 {
    slot: String,
    provider: String,
    issue: u64,
    task_id: String,
    run_id: String,
    runs: Vec<String>,
    state: String,
    reason: Option<String>,
    pid: Option<u32>,
    pgid: Option<u32>,
    start_time: Option<u64>,
    boot_id: String,
    session_id: Option<String>,
    cwd: PathBuf,
    program: String,
    args: Vec<String>,
    prompt_file: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    started_at: String,
    run_started_at: String,
    daemon_pid: u32,
    #[serde(default)]
    auto_resumes: Vec<String>,
    #[serde(default)]
    worktree: Option<PathBuf>,
    #[serde(default)]
    branch: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    comment_id: Option<u64>,
}

impl SlotLockV1 {
    fn migrate(self) -> SlotLock {
        let phase = match self.state.as_str() {
            "starting" => Phase::Starting,
            "abandoned" => Phase::Abandoned { reason: self.reason.unwrap_or_else(|| "abandoned".into()) },
            // `in_progress`, and anything else version 1 wrote: recovery looks at the process either way.
            _ => Phase::Running { stale: false, stop: None },
        };
        SlotLock {
            version: LOCK_VERSION,
            slot: self.slot,
            provider: self.provider,
            issue: self.issue,
            task_id: self.task_id,
            run_id: self.run_id,
            runs: self.runs,
            phase,
            pid: self.pid,
            pgid: self.pgid,
            start_time: self.start_time,
            boot_id: self.boot_id,
            session_id: self.session_id,
            cwd: self.cwd,
            program: self.program,
            args: self.args,
            prompt_file: self.prompt_file,
            stdout: self.stdout,
            stderr: self.stderr,
            started_at: self.started_at,
            run_started_at: self.run_started_at,
            daemon_pid: self.daemon_pid,
            restarts: self.auto_resumes,
            worktree: self.worktree,
            branch: self.branch,
            title: self.title,
            comment_id: self.comment_id,
            base: None,
            cgroup: None,
            // Version 1 did not say; a pull request that closes the wrong issue would be worse than one that
            // closes none.
            from_issue: false,
            pr: None,
            signal: None,
            asked_at: None,
            over_budget: false,
            claim: None,
        }
    }
}

/// Why a lockfile could not be taken as it is.
#[derive(Debug, thiserror::Error)]
pub enum LockProblem {
    /// Torn, not JSON, or not a lockfile: moved aside.
    #[error("{0}")]
    Corrupt(String),
    /// Written by a newer autodev: never moved aside (that would strip an abandoned task of its slot and session).
    #[error("format version {0} is newer than this autodevd understands ({LOCK_VERSION})")]
    Newer(u32),
}

/// Reads a lockfile of any version this autodevd knows, migrating older ones in memory (persisted on the next
/// write).
pub fn parse_slot_lock(bytes: &[u8]) -> Result<SlotLock, LockProblem> {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let corrupt = |e: serde_json::Error| LockProblem::Corrupt(e.to_string());
    let Version { version } = serde_json::from_slice(bytes).map_err(corrupt)?;
    match version {
        1 => Ok(serde_json::from_slice::<SlotLockV1>(bytes).map_err(corrupt)?.migrate()),
        LOCK_VERSION => serde_json::from_slice(bytes).map_err(corrupt),
        v if v > LOCK_VERSION => Err(LockProblem::Newer(v)),
        v => Err(LockProblem::Corrupt(format!("unknown format version {v}"))),
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
            .map_err(|e| LockProblem::Corrupt(e.to_string()))
            .and_then(|bytes| parse_slot_lock(&bytes))
            .and_then(|lock| {
                if lock.slot != slot {
                    Err(LockProblem::Corrupt(format!("it names slot {:?}", lock.slot)))
                } else {
                    Ok(lock)
                }
            });
        if let Err(LockProblem::Newer(v)) = parsed {
            return Err(io::Error::other(format!(
                "{} has format version {v}, newer than this autodevd understands ({LOCK_VERSION}): it was written by \
                 a newer autodev. Run that version again (or remove the file if its task is over)",
                path.display()
            )));
        }
        match parsed {
            Ok(lock) => good.push(lock),
            Err(error) => {
                let error = error.to_string();
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
    /// How the run ended for the task: `completed`, `failed`, `abandoned`.
    pub state: String,
    /// Why, as a typed fact. `None` only in version-1 records of failed runs.
    #[serde(default)]
    pub end_cause: Option<EndCause>,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: String,
    pub ended_at: String,
    pub duration_secs: u64,
    pub session_id: Option<String>,
    pub cost_usd: Option<f64>,
    /// The cost is tokens × the configured pricing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cost_estimated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<crate::provider::Usage>,
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
    /// Commits on the branch beyond its base, and whether there was work to review, as the run's end found them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commits: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<bool>,
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
    Ok(lines.filter(|l| !l.is_empty()).filter_map(|l| parse_exit_record(l).ok()).collect())
}

/// Reads an exit record (a history line or `exit.json`) of any version this autodevd knows, migrating older ones in
/// memory. A newer one is refused with a warning: its fields may mean something else.
pub fn parse_exit_record(bytes: &[u8]) -> Result<ExitRecord, String> {
    let mut record: ExitRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    match record.version {
        1 => {
            // Version 1 knew no causes; a completed run succeeded, a failure's cause is not known.
            record.end_cause = (record.state == "completed").then_some(EndCause::Succeeded);
            record.version = RECORD_VERSION;
            Ok(record)
        }
        RECORD_VERSION => Ok(record),
        v => {
            let why =
                format!("run {}: record format version {v} is not one this autodevd knows; skipped", record.run_id);
            tracing::warn!("{why}");
            Err(why)
        }
    }
}

/// Appends one finished run to `history.jsonl` and syncs it. One line per run; a torn last line from a crash is
/// skipped by readers.
pub fn append_history(path: &Path, record: &ExitRecord) -> io::Result<()> {
    let mut line = crate::redact::to_json_vec(record).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut file = OpenOptions::new().create(true).append(true).read(true).mode(0o600).open(path)?;
    // A write cut short (a full disk, a crash) left a torn line: end it, so this record starts a line of its own.
    let size = file.metadata()?.len();
    let mut last = [0u8; 1];
    if size > 0 && std::os::unix::fs::FileExt::read_at(&file, &mut last, size - 1)? == 1 && last[0] != b'\n' {
        line.insert(0, b'\n');
    }
    file.write_all(&line)?;
    file.sync_data()
}

/// The most a task's prompt file may hold: a 1 MiB prompt, or an issue rendered into the template, plus what
/// autodev adds (the worktree note). Larger is not a prompt of ours, and is refused whole, never cut.
const MAX_PROMPT_FILE: usize = 2 << 20;

/// Reads a task's original prompt.
pub fn read_prompt(path: &Path) -> Result<String, String> {
    crate::input::read_text(path, MAX_PROMPT_FILE, crate::input::READ_TIMEOUT, "the task's original prompt")
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

/// Today's files and yesterday's: every format this autodevd reads, from checked-in files of the older versions.
#[cfg(test)]
mod format_tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats/v1").join(name)).unwrap()
    }

    #[test]
    fn a_version_1_lockfile_migrates() {
        let lock = parse_slot_lock(&fixture("claude-1.lock")).unwrap();
        assert_eq!(lock.version, LOCK_VERSION);
        assert_eq!(lock.phase, Phase::Abandoned { reason: "process 4242 ended while autodevd was not running".into() });
        assert_eq!(lock.restarts, ["2026-11-30T10:00:00Z"]);
        assert_eq!(lock.session_id.as_deref(), Some("2f6a1c1e-5d8e-4a59-9d43-0c2f1c7a9b11"));
        // It round-trips as today's format.
        let today = serde_json::to_vec(&lock).unwrap();
        assert_eq!(parse_slot_lock(&today).unwrap(), lock);
        let newer = String::from_utf8(today).unwrap().replacen("\"version\":2", "\"version\":3", 1);
        assert!(matches!(parse_slot_lock(newer.as_bytes()), Err(LockProblem::Newer(3))));
    }

    #[test]
    fn version_1_history_and_run_records_load_and_unknown_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        std::fs::write(&path, fixture("history.jsonl")).unwrap();
        let runs = read_history_tail(&path, 1 << 20).unwrap();
        let causes: Vec<_> = runs.iter().map(|r| (r.issue, r.end_cause)).collect();
        assert_eq!(causes, [(40, Some(EndCause::Succeeded)), (42, None)], "the version-7 line is skipped");
        std::fs::write(dir.path().join("run.json"), fixture("run.json")).unwrap();
        assert_eq!(read_run_record(&dir.path().join("run.json")).unwrap().pid, Some(4242));
    }

    #[test]
    fn a_torn_history_line_does_not_swallow_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        std::fs::write(&path, b"{\"version\":2,\"run_id\":\"torn").unwrap();
        let mut record = read_history_tail(
            &{
                let p = dir.path().join("h1");
                std::fs::write(&p, fixture("history.jsonl")).unwrap();
                p
            },
            1 << 20,
        )
        .unwrap()
        .remove(0);
        record.run_id = "after".into();
        append_history(&path, &record).unwrap();
        let runs = read_history_tail(&path, 1 << 20).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].run_id, "after");
    }
}
