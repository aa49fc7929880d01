//! Reading input from outside with limits: at most a given number of bytes (past it, a clear error that names the
//! file and the limit), and never forever (a FIFO without a writer, a writer that stalls: an error after a while).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// How long a FIFO or a device may take to give all it has.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads all of `path` as UTF-8 text, refusing more than `limit` bytes and anything that takes over `timeout`.
/// `what` names the input in errors ("prompt file", "config").
pub fn read_text(path: &Path, limit: usize, timeout: Duration, what: &str) -> Result<String, String> {
    let shown = path.display();
    // Non-blocking: opening a FIFO without a writer must not hang.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read {what} {shown}: {e}"))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(format!("cannot read {what} {shown}: it is a directory"));
    }
    let bytes = read_polled(&file, limit, timeout).map_err(|e| match e {
        ReadError::TooLarge => format!("{what} {shown} is larger than the limit of {} KiB", limit >> 10),
        ReadError::TimedOut => {
            format!("{what} {shown} gave no end of input within {}s (a FIFO nobody writes to?)", timeout.as_secs())
        }
        ReadError::Io(e) => format!("cannot read {what} {shown}: {e}"),
    })?;
    String::from_utf8(bytes).map_err(|_| format!("{what} {shown} is not UTF-8 text"))
}

/// Reads standard input (blocking: a person may be typing), refusing more than `limit` bytes.
pub fn read_stdin(limit: usize, what: &str) -> Result<String, String> {
    let mut bytes = Vec::new();
    io::stdin()
        .lock()
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the {what} from stdin: {e}"))?;
    if bytes.len() > limit {
        return Err(format!("the {what} on stdin is larger than the limit of {} KiB", limit >> 10));
    }
    String::from_utf8(bytes).map_err(|_| format!("the {what} on stdin is not UTF-8 text"))
}

enum ReadError {
    TooLarge,
    TimedOut,
    Io(io::Error),
}

fn read_polled(mut file: &File, limit: usize, timeout: Duration) -> Result<Vec<u8>, ReadError> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::TimedOut);
        }
        let wait = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(0) => return Err(ReadError::TimedOut),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ReadError::Io(e.into())),
        }
        match file.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                out.extend_from_slice(&chunk[..n]);
                if out.len() > limit {
                    return Err(ReadError::TooLarge);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_source_stops_at_the_limit() {
        let e = read_text(Path::new("/dev/zero"), 1 << 20, READ_TIMEOUT, "prompt file").unwrap_err();
        assert!(e.contains("larger than the limit of 1024 KiB"), "{e}");
    }

    #[test]
    fn a_fifo_without_a_writer_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = read_text(&fifo, 1 << 20, Duration::from_millis(200), "prompt file").unwrap_err();
        assert!(e.contains("no end of input"), "{e}");
    }

    #[test]
    fn files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p");
        std::fs::write(&file, "hello").unwrap();
        assert_eq!(read_text(&file, 10, READ_TIMEOUT, "prompt file").unwrap(), "hello");
        assert!(read_text(&file, 4, READ_TIMEOUT, "prompt file").unwrap_err().contains("larger"));
        assert!(read_text(dir.path(), 10, READ_TIMEOUT, "config").unwrap_err().contains("directory"));
    }
}
