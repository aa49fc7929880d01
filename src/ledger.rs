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
