//! Bounded reads of every input, and small refusals that say what is wrong: endless and never-ending prompt files,
//! an endless config, issue numbers below 1, a CLI script whose interpreter is missing, a directory as `cliPath`,
//! and `logs -n` with a huge count.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, fake_config};
use serde_json::json;

/// Runs `command` to its end (at most 30 s: longer is the hang under test) and returns (success, stdout+stderr).
fn finish(mut command: Command) -> (bool, String) {
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("{command:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    (status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn endless_and_never_ending_prompt_files_are_refused_with_the_limit_or_the_wait() {
    let d = Daemon::start(&fake_config(1));
    let (ok, out) = finish(d.ctl_command(&["assign", "1", "--prompt-file", "/dev/zero"]));
    assert!(!ok && out.contains("/dev/zero is larger than the limit of 1024 KiB"), "{out}");
    let fifo = d.dir.path().join("prompt.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let (ok, out) = finish(d.ctl_command(&["assign", "1", "--prompt-file", fifo.to_str().unwrap()]));
    assert!(!ok && out.contains("no end of input within 10s"), "{out}");
    // Nothing was started by either.
    assert_eq!(d.slot("claude-1")["state"], "ready");
}

#[test]
fn an_endless_config_stops_autodevd_at_start_with_the_file_and_the_limit() {
    let d = Daemon::prepare(&fake_config(1), None, &[]);
    let mut command = Command::new(env!("CARGO_BIN_EXE_autodevd"));
    command.arg("--state-dir").arg(d.state_dir()).arg("--runtime-dir").arg(d.runtime_dir());
    command.env("AUTODEV_CONFIG", "/dev/zero");
    let (ok, out) = finish(command);
    assert!(!ok, "{out}");
    let log = format!("{out}{}", d.daemon_log());
    assert!(log.contains("config /dev/zero is larger than the limit of 1024 KiB"), "{log}");
}

#[test]
fn issue_numbers_start_at_one() {
    let d = Daemon::start(&fake_config(1));
    for bad in ["0", "-1"] {
        let (ok, out) = finish(d.ctl_command(&["assign", bad, "--prompt", "@say hi"]));
        assert!(!ok && out.contains("issue numbers start at 1"), "assign {bad}: {out}");
    }
}

#[test]
fn a_missing_interpreter_and_a_directory_as_cli_path_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("agent");
    std::fs::write(&script, "#!/nonexistent/python9\nprint('hi')\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut c = fake_config(1);
    c["llms"]["claude"]["cliPath"] = json!(script.display().to_string());
    c["llms"]["gemini"]["cliPath"] = json!(dir.path().display().to_string());
    let d = Daemon::start(&c);
    let (ok, out) = finish(d.ctl_command(&["assign", "1", "--llm", "claude", "--prompt", "@say hi"]));
    assert!(!ok && out.contains("interpreter /nonexistent/python9 (from its #! line) is not found"), "{out}");
    let (ok, out) = finish(d.ctl_command(&["assign", "2", "--llm", "gemini", "--prompt", "@say hi"]));
    assert!(!ok && out.contains("is a directory, not a program"), "{out}");
    assert_eq!(d.slot("claude-1")["end_cause"], "cli_missing");
}

#[test]
fn logs_with_a_huge_count_show_the_whole_log_and_a_small_count_its_end() {
    let d = Daemon::start(&fake_config(1));
    let prompt: String = (0..300).map(|i| format!("@say line {i}\n")).collect();
    d.assign(1, &[], &prompt);
    d.wait_state("claude-1", "completed");
    let all = d.ctl(&["logs", "-n", "100000000", "claude-1"]);
    assert!(all.contains("line 0\n") && all.contains("line 299\n"), "{all}");
    let tail = d.ctl(&["logs", "-n", "3", "claude-1"]);
    assert_eq!(tail.lines().count(), 3, "{tail}");
    assert!(tail.contains("line 299") || tail.contains("done"), "{tail}");
    let raw = d.ctl(&["logs", "--raw", "-n", "100000000", "claude-1"]);
    assert!(raw.contains("line 0") && raw.lines().count() >= 300);
}
