//! The supervisor core end to end: the real autodevd and autodevctl with fake CLIs.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;

use common::{Daemon, alive, fake_config, wait_until};
use serde_json::{Value, json};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn claude_run_completes_with_session_cost_and_clean_environment() {
    let d = Daemon::start(&fake_config(1));
    let slot = d.assign(123, &[], "Fix the login bug\n@say looking at login.rs\n@tool cargo test");
    assert_eq!(slot, "claude-1");
    let row = d.wait_state("claude-1", "completed");
    assert_eq!(row["issue"], 123);
    assert_eq!(row["cost_usd"], 0.42);
    let preview: Vec<String> = serde_json::from_value(row["console_preview"].clone()).unwrap();
    assert!(preview.contains(&"looking at login.rs".to_string()), "{preview:?}");
    assert!(preview.contains(&"tool Bash: cargo test".to_string()), "{preview:?}");
    assert!(preview.last().unwrap().starts_with("result: success (1 turn, $0.42, 3m10s)"), "{preview:?}");

    let record = d.record(row["run_id"].as_str().unwrap());
    let argv: Vec<String> = serde_json::from_value(record["argv"].clone()).unwrap();
    let session = row["session_id"].as_str().unwrap();
    for flag in ["-p", "--output-format", "stream-json", "--verbose", "--session-id", session] {
        assert!(argv.contains(&flag.to_string()), "{flag} missing from {argv:?}");
    }
    assert!(record["prompt"].as_str().unwrap().starts_with("Fix the login bug"), "prompt travels on stdin");
    let env = record["env"].as_object().unwrap();
    assert_eq!(env["AUTODEV_SLOT"], "claude-1");
    assert_eq!(env["AUTODEV_ISSUE"], "123");
    assert_eq!(env["AUTODEV_RUN"], row["run_id"]);
    assert!(env["AUTODEV_SOCKET"].as_str().unwrap().ends_with("autodevd.sock"));
    assert_eq!(env["ANTHROPIC_API_KEY"], "sk-ant-test", "the provider's own key passes");
    for secret in ["GITHUB_TOKEN", "CLAUDECODE"] {
        assert!(!env.contains_key(secret), "{secret} leaked into the child: {env:?}");
    }
    assert_eq!(record["cwd"], d.workspace.display().to_string());
    assert_ne!(record["pgid"], Value::from(d.pid()), "child runs in its own process group");
    assert_eq!(record["pgid"], record["pid"]);

    let history = std::fs::read_to_string(d.state_dir().join("history.jsonl")).unwrap();
    let line: Value = serde_json::from_str(history.lines().last().unwrap()).unwrap();
    assert_eq!((line["state"].as_str(), line["issue"].as_u64()), (Some("completed"), Some(123)));
}

#[test]
fn gemini_and_codex_sessions_come_from_their_events() {
    let d = Daemon::start(&fake_config(1));
    assert_eq!(d.assign(5, &["--llm", "gemini"], "@say streamed reply"), "gemini-1");
    assert_eq!(d.assign(6, &["--llm", "codex"], "@say codex reply\n@tool make"), "codex-1");
    let gemini = d.wait_state("gemini-1", "completed");
    let codex = d.wait_state("codex-1", "completed");
    let gemini_record = d.record(gemini["run_id"].as_str().unwrap());
    assert!(gemini["session_id"].as_str().is_some_and(|s| s.len() == 36), "{gemini}");
    assert!(gemini["console_preview"].as_array().unwrap().contains(&json!("streamed reply")), "{gemini}");
    assert!(gemini_record["argv"].as_array().unwrap().contains(&json!("stream-json")));
    assert!(codex["session_id"].as_str().is_some_and(|s| s.len() == 36), "{codex}");
    assert!(codex["console_preview"].as_array().unwrap().contains(&json!("tool shell: make")), "{codex}");
    let codex_argv = d.record(codex["run_id"].as_str().unwrap())["argv"].as_array().unwrap().clone();
    assert_eq!(codex_argv[1..3], [json!("exec"), json!("--json")]);
}

#[test]
fn slot_rules_and_their_messages() {
    let mut config = fake_config(2);
    config["llms"]["gemini"]["enabled"] = json!(false);
    let d = Daemon::start(&config);
    assert_eq!(d.assign(1, &[], "@sleep 30"), "claude-1");
    assert_eq!(d.assign(2, &["--slot", "claude-2"], "@sleep 30"), "claude-2");

    let full = d.try_ctl(&["assign", "3", "--llm", "claude", "--prompt", "x"]);
    assert_eq!(full.status.code(), Some(1));
    assert_eq!(
        stderr_of(&full),
        "✗ No available Claude instances (max: 2)\nTry increasing maxConcurrentIssues in .autonomous-config.json\n"
            .replace(".autonomous-config.json", &d.config_path.display().to_string())
    );
    for (args, needle) in [
        (vec!["assign", "1", "--llm", "codex", "--prompt", "x"], "issue #1 is already assigned to claude-1"),
        (vec!["assign", "4", "--slot", "claude-2", "--prompt", "x"], "slot claude-2 is busy with issue #2"),
        (vec!["assign", "4", "--slot", "claude-7", "--prompt", "x"], "unknown slot \"claude-7\""),
        (vec!["assign", "4", "--slot", "gemini-1", "--prompt", "x"], "LLM \"gemini\" is disabled"),
        (vec!["assign", "4", "--llm", "aider", "--prompt", "x"], "unknown LLM \"aider\""),
        (vec!["assign", "4"], "cannot take issue #4 from GitHub: no GitHub repository"),
    ] {
        let out = d.try_ctl(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr_of(&out).contains(needle), "{args:?}: {}", stderr_of(&out));
    }
    let instances: Value = serde_json::from_str(&d.ctl(&["instances", "--json"])).unwrap();
    assert_eq!(instances[0]["used"], 2);
    assert_eq!(instances[0]["max"], 2);
    assert!(d.ctl(&["instances"]).contains("#1 (claude-1), #2 (claude-2)"));
}

#[test]
fn simultaneous_assigns_never_share_a_slot() {
    let mut config = fake_config(4);
    config["llms"].as_object_mut().unwrap().retain(|k, _| k == "claude");
    let d = Daemon::start(&config);
    let children: Vec<_> = (0..10)
        .map(|i| {
            d.ctl_command(&["assign", &(100 + i).to_string(), "--json", "--prompt", "@sleep 30"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let mut slots: Vec<String> = outputs
        .iter()
        .filter(|o| o.status.success())
        .map(|o| serde_json::from_slice::<Value>(&o.stdout).unwrap()["slot"].as_str().unwrap().to_string())
        .collect();
    slots.sort();
    assert_eq!(slots, ["claude-1", "claude-2", "claude-3", "claude-4"]);
    assert_eq!(outputs.iter().filter(|o| stderr_of(o).contains("No available Claude instances (max: 4)")).count(), 6);
}

#[test]
fn missing_cli_fails_the_slot_and_the_daemon_goes_on() {
    let mut config = fake_config(1);
    config["llms"]["claude"]["cliPath"] = json!("claude-not-installed-here");
    let d = Daemon::start(&config);
    let out = d.try_ctl(&["assign", "9", "--prompt", "go"]);
    assert_eq!(out.status.code(), Some(1));
    let expected =
        "claude: command not found (cliPath \"claude-not-installed-here\") — install it or set llms.claude.cliPath";
    assert!(stderr_of(&out).contains(expected), "{}", stderr_of(&out));
    let row = d.slot("claude-1");
    assert_eq!(row["state"], "failed");
    assert_eq!(row["reason"], expected);
    assert_eq!(d.assign(10, &["--llm", "codex"], "@say still here"), "codex-1");
}

#[test]
fn stop_ends_the_whole_tree_even_when_it_ignores_sigterm() {
    let d = Daemon::start(&fake_config(1));
    d.assign(7, &[], "@ignore-term\n@grandchild\n@say started\n@sleep 60");
    let row = wait_until("the run to start its grandchild", || {
        let row = d.slot("claude-1");
        let record_path = d.records.join(format!("fake-record-{}.json", row["run_id"].as_str()?));
        let record: Value = serde_json::from_str(&std::fs::read_to_string(record_path).ok()?).ok()?;
        record.get("grandchild").is_some().then_some(row)
    });
    let record = d.record(row["run_id"].as_str().unwrap());
    let (pid, grandchild) = (record["pid"].as_i64().unwrap(), record["grandchild"].as_i64().unwrap());
    assert!(alive(pid) && alive(grandchild));
    assert!(d.ctl(&["stop", "claude-1"]).contains("Stopped claude-1 (issue #7)"));
    assert!(!alive(pid), "the CLI survived stop");
    assert!(!alive(grandchild), "the grandchild survived stop");
    let zombies = wait_until("the daemon to reap every child", || {
        let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", d.pid(), d.pid())).ok()?;
        children.trim().is_empty().then_some(children)
    });
    assert_eq!(zombies.trim(), "", "zombies left under the daemon");
    let row = d.slot("claude-1");
    assert_eq!(row["state"], "failed");
    assert_eq!(row["reason"], "stopped by autodevctl stop");
    assert_eq!(row["pid"], Value::Null);
    // The slot is free again, and stopping a stopped slot is a clear error.
    let again = d.try_ctl(&["stop", "claude-1"]);
    assert!(stderr_of(&again).contains("slot claude-1 is not running (it is failed)"));
    assert_eq!(d.assign(8, &[], "@say next"), "claude-1");
}

#[test]
fn leftover_grandchildren_are_cleared_when_the_cli_exits() {
    let d = Daemon::start(&fake_config(1));
    d.assign(7, &[], "@grandchild\n@say bye");
    let row = d.wait_state("claude-1", "completed");
    let grandchild = d.record(row["run_id"].as_str().unwrap())["grandchild"].as_i64().unwrap();
    assert!(!alive(grandchild), "a process left behind by the run outlived it");
}

#[test]
fn outcome_needs_exit_code_and_final_event_to_agree() {
    let d = Daemon::start(&fake_config(1));
    d.assign(1, &[], "@stderr Error: invalid API key\n@no-result\n@exit 3");
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["reason"], "exit code 3: Error: invalid API key");
    assert_eq!(row["exit_code"], 3);

    d.assign(2, &[], "@fail");
    let row = d.wait_state("claude-1", "failed");
    assert!(row["reason"].as_str().unwrap().contains("API Error: fake failure"), "{row}");

    d.assign(3, &[], "@no-result");
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["reason"], "exited 0 without a final result event");

    d.assign(4, &["--llm", "codex"], "@fail\n@exit 1");
    assert_eq!(d.wait_state("codex-1", "failed")["reason"], "exit code 1, error: fake failure");

    d.assign(5, &["--llm", "gemini"], "@crash");
    assert_eq!(d.wait_state("gemini-1", "failed")["reason"], "killed by SIGKILL");
}

#[test]
fn preview_survives_floods_huge_lines_and_binary_noise() {
    let d = Daemon::start(&fake_config(1));
    let prompt = "@ansi\n@binary 100000\n@bigline 100000000\n@flood 300000000\n@say the end is near";
    d.assign(1, &[], prompt);
    let row = d.wait_state("claude-1", "completed");
    let preview: Vec<String> = serde_json::from_value(row["console_preview"].clone()).unwrap();
    assert_eq!(preview.len(), 10);
    assert_eq!(preview[preview.len() - 2], "the end is near");
    assert!(preview.iter().all(|l| l.chars().count() <= 240 && !l.contains('\x1b')), "{preview:?}");
    let stdout = d.state_dir().join("runs").join(row["run_id"].as_str().unwrap()).join("stdout");
    assert!(std::fs::metadata(stdout).unwrap().len() > 400_000_000, "the raw log keeps every byte");
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let hwm_kb: u64 =
        status.lines().find(|l| l.starts_with("VmHWM")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(hwm_kb < 64 * 1024, "daemon peak RSS {hwm_kb} kB after a 100 MB line and 300 MB of output");

    d.assign(2, &["--llm", "gemini"], "@ansi");
    let row = d.wait_state("gemini-1", "completed");
    let preview = row["console_preview"].as_array().unwrap();
    assert!(preview.contains(&json!("green plain")) && preview.contains(&json!("progress 100%")), "{preview:?}");
}

#[test]
fn logs_show_readable_lines_raw_bytes_and_follow_to_the_end() {
    let d = Daemon::start(&fake_config(1));
    d.assign(1, &[], "@say first\n@say second\n@stderr oops");
    d.wait_state("claude-1", "completed");
    let all = d.ctl(&["logs", "claude-1"]);
    assert_eq!(all, "session started (model fake-model)\nfirst\nsecond\nresult: success (2 turns, $0.42, 3m10s)\n");
    assert_eq!(d.ctl(&["logs", "claude-1", "-n", "2"]), "second\nresult: success (2 turns, $0.42, 3m10s)\n");
    let raw = d.ctl(&["logs", "claude-1", "--raw", "-n", "1"]);
    assert!(raw.starts_with("{\"type\": \"result\"") && raw.ends_with("}\n"), "{raw}");
    assert_eq!(d.ctl(&["logs", "claude-1", "--stderr"]), "oops\n");

    d.assign(2, &[], "@ticks 5 0.2");
    let followed = d.ctl(&["logs", "claude-1", "-f"]);
    let ticks: Vec<&str> = followed.lines().filter(|l| l.starts_with("tick")).collect();
    assert_eq!(ticks, ["tick 0", "tick 1", "tick 2", "tick 3", "tick 4"], "{followed}");
    assert!(followed.ends_with("result: success (5 turns, $0.42, 3m10s)\n"), "{followed}");
    let out = d.try_ctl(&["logs", "gemini-1"]);
    assert!(stderr_of(&out).contains("slot gemini-1 has not run anything yet"));
}

#[test]
fn prompt_text_never_reaches_a_shell() {
    let d = Daemon::start(&fake_config(1));
    let evil = "$(touch pwned-a) `touch pwned-b`; touch pwned-c && rm -rf / --no-preserve-root";
    d.assign(1, &["--llm", "gemini"], &format!("-{evil}"));
    d.assign(2, &["--llm", "claude"], evil);
    let gemini = d.wait_state("gemini-1", "completed");
    let claude = d.wait_state("claude-1", "completed");
    assert!(d.record(gemini["run_id"].as_str().unwrap())["prompt"].as_str().unwrap().contains(evil));
    assert_eq!(d.record(claude["run_id"].as_str().unwrap())["prompt"], evil);
    for marker in ["pwned-a", "pwned-b", "pwned-c"] {
        assert!(!d.workspace.join(marker).exists(), "{marker} was created");
    }
}

#[test]
fn custom_provider_with_a_template_and_plain_text_output() {
    let bin = common::fixtures().join("bin/plain");
    let config = json!({
        "llms": { "tool": { "cliPath": bin.display().to_string(), "cliArgs": ["--task", "{prompt}", "--issue={issue}"],
                            "env": { "TOOL_MODE": "fast" } } }
    });
    let d = Daemon::start(&config);
    assert_eq!(d.assign(42, &[], "@say plain words"), "tool-1");
    let row = d.wait_state("tool-1", "completed");
    assert_eq!(row["console_preview"], json!(["plain words"]));
    let record = d.record(row["run_id"].as_str().unwrap());
    assert_eq!(
        record["argv"].as_array().unwrap()[1..],
        [json!("--task"), json!("@say plain words"), json!("--issue=42")]
    );
    assert_eq!(record["env"]["TOOL_MODE"], "fast");
}

#[test]
fn client_without_daemon_says_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_autodevctl"))
        .args(["status"])
        .env("AUTODEV_STATE_DIR", dir.path().join("s"))
        .env("AUTODEV_RUNTIME_DIR", dir.path().join("r"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = stderr_of(&out);
    assert!(err.contains("autodevd is not running") && err.contains("Start it with `autodevd`"), "{err}");
}

#[test]
fn socket_is_private_and_bad_frames_get_error_replies() {
    let d = Daemon::start(&fake_config(1));
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let exchange = |bytes: &[u8]| -> Vec<u8> {
        let mut s = UnixStream::connect(d.socket()).unwrap();
        s.write_all(bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        // The daemon hangs up after a frame it cannot resynchronise from; a reset after the reply is fine.
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        reply
    };
    let frame = |kind: u8, body: &[u8]| {
        let mut f = vec![kind];
        f.extend_from_slice(&(body.len() as u32).to_be_bytes());
        f.extend_from_slice(body);
        f
    };
    for (input, needle) in [
        (frame(b'J', b"{not json"), "not valid JSON"),
        (frame(b'J', br#"{"v":1,"request":{"cmd":"explode"}}"#), "not understood"),
        (frame(b'J', br#"{"v":99,"request":{"cmd":"status"}}"#), "protocol version 99"),
        (frame(b'B', b"bytes"), "requests are JSON frames"),
        (b"Z\x00\x00\x00\x01x".to_vec(), "unknown frame kind"),
        (b"J\xff\xff\xff\xff".to_vec(), "larger than the limit"),
    ] {
        let reply = String::from_utf8_lossy(&exchange(&input)).into_owned();
        assert!(reply.contains(needle), "{input:?} → {reply}");
    }
    // A truncated frame and random garbage: the daemon keeps serving.
    exchange(b"J\x00\x00\x01\x00{\"v\"");
    exchange(&[0x4a, 0, 0, 0, 3, 0xff, 0xfe, 0x00]);
    assert_eq!(d.slot("claude-1")["state"], "ready");
}

#[test]
fn bad_config_names_file_and_path_and_unknown_keys_warn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.json");
    std::fs::write(&path, r#"{"llms":{"claude":{"maxConcurrentIssues":"two"}}}"#).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_autodevd"))
        .args(["--config".as_ref(), path.as_os_str(), "--state-dir".as_ref(), dir.path().join("s").as_os_str()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(err.contains(&path.display().to_string()) && err.contains("llms.claude.maxConcurrentIssues"), "{err}");

    let mut config = fake_config(1);
    config["llms"]["claude"]["flavour"] = json!("spicy");
    let d = Daemon::start(&config);
    assert!(d.daemon_log().contains("unknown key llms.claude.flavour is ignored"), "{}", d.daemon_log());
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let d = Daemon::start(&fake_config(1));
    let out = d.daemon_command().stderr(std::process::Stdio::piped()).output().unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains(&format!("autodevd pid {} is already running", d.pid())), "{err}");
    assert_eq!(d.slot("claude-1")["state"], "ready", "the first daemon still answers");
}

#[test]
fn sigterm_stops_every_child_and_removes_the_socket() {
    let mut d = Daemon::start(&fake_config(1));
    d.assign(1, &[], "@grandchild\n@sleep 60");
    d.assign(2, &["--llm", "codex"], "@ignore-term\n@sleep 60");
    let rows = [d.wait_state("claude-1", "in_progress"), d.wait_state("codex-1", "in_progress")];
    let records: Vec<Value> = rows.iter().map(|r| d.record(r["run_id"].as_str().unwrap())).collect();
    let grandchild =
        wait_until("the grandchild", || d.record(rows[0]["run_id"].as_str().unwrap())["grandchild"].as_i64());
    assert!(d.terminate().success());
    for r in &records {
        assert!(!alive(r["pid"].as_i64().unwrap()), "a CLI survived the daemon's shutdown");
    }
    assert!(!alive(grandchild), "a grandchild survived the daemon's shutdown");
    assert!(!d.socket().exists());
}

#[test]
fn status_table_reads_at_a_glance() {
    let d = Daemon::start(&fake_config(1));
    d.assign(77, &[], "@say working hard\n@sleep 30");
    wait_until("the preview", || {
        let row = d.slot("claude-1");
        (row["console_preview"].as_array()?.last()? == "working hard").then_some(())
    });
    let table = d.ctl(&["status"]);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("3 slots · 1 in progress · 2 ready"), "{table}");
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("instances 3 total, 1 healthy, 0 stale · tasks 1 total, 0 completed, 1 in progress"),
        "{table}"
    );
    assert!(lines.next().unwrap().starts_with("SLOT"), "{table}");
    let claude = lines.next().unwrap();
    assert!(claude.starts_with("claude-1") && claude.contains("in_progress") && claude.contains("#77"), "{table}");
    assert!(claude.ends_with("working hard"), "{table}");
    assert!(d.ctl(&["status", "--preview"]).contains("    │ working hard"));
}

#[test]
fn a_reader_that_goes_away_is_not_an_error() {
    let d = Daemon::start(&fake_config(1));
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    drop(read_end);
    let out = d
        .ctl_command(&["status", "--json"])
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(!stderr_of(&out).contains("panicked"), "{}", stderr_of(&out));
}

#[test]
fn a_process_that_left_the_group_but_holds_the_run_lock_is_stopped_too() {
    let d = Daemon::start(&fake_config(1));
    d.assign(3, &[], "@escape\n@say bye");
    let row = d.wait_state("claude-1", "completed");
    let escapee = d.record(row["run_id"].as_str().unwrap())["escapee"].as_i64().unwrap();
    assert!(!alive(escapee), "a setsid child of the run outlived it");
    // Stopped by the run's cgroup where there is one, else found through the run lock.
    let log = d.daemon_log();
    assert!(log.contains("outside its process group") || log.contains("the run left behind"), "{log}");
}

#[test]
fn actions_the_permission_mode_denied_show_in_the_preview_and_the_outcome() {
    let d = Daemon::start(&fake_config(1));
    d.assign(9, &[], "@say edited the file\n@denied git commit -m 'fix #9'\n@denied npm --version");
    let row = d.wait_state("claude-1", "completed");
    let reason = row["reason"].as_str().unwrap();
    assert!(reason.contains("2 actions denied: Bash git commit -m 'fix #9'; Bash npm --version"), "{reason}");
    let preview = row["console_preview"].to_string();
    assert!(preview.contains("denied: Bash git commit -m 'fix #9'"), "{preview}");
    assert!(d.ctl(&["status"]).contains("denied"), "the table shows the denials");
}

#[test]
fn stderr_shows_marked_in_the_preview_and_never_as_the_activity() {
    let d = Daemon::start(&fake_config(1));
    d.assign(1, &[], "@say reading the code\n@stderr Warning: 256-color support not detected\n@stderr }\n@sleep 30");
    let row = wait_until("the stderr lines in the preview", || {
        let row = d.slot("claude-1");
        row["console_preview"].to_string().contains("stderr: }").then_some(row)
    });
    assert!(row["console_preview"].to_string().contains("stderr: Warning: 256-color"), "{row}");
    let table = d.ctl(&["status"]);
    let line = table.lines().find(|l| l.starts_with("claude-1")).unwrap();
    assert!(line.trim_end().ends_with("reading the code"), "ACTIVITY is the agent's last line: {line}");
    d.ctl(&["stop", "claude-1"]);
}
