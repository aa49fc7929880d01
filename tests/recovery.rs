//! Lockfiles and abandoned work end to end: crashes of the daemon (kill -9), of the child, forged and corrupt
//! lockfiles, reboots, shutdown, resume and release, and a crash loop.

mod common;

use std::process::{Command, Stdio};

use autodev::ledger::SlotLock;
use common::{Daemon, alive, fake_config, wait_until};
use serde_json::{Value, json};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn lockfile(d: &Daemon, slot: &str) -> Option<SlotLock> {
    let text = std::fs::read_to_string(d.state_dir().join("slots").join(format!("{slot}.lock"))).ok()?;
    Some(serde_json::from_str(&text).expect("a lockfile autodevd wrote parses"))
}

/// Waits until the run in `slot` has printed `line` (so it is past its start-up).
fn wait_preview(d: &Daemon, slot: &str, line: &str) -> Value {
    wait_until(&format!("{slot} to print {line:?}"), || {
        let row = d.slot(slot);
        row["console_preview"].as_array()?.iter().any(|l| l == line).then_some(row)
    })
}

fn same_process_alive(pid: i64, start: u64) -> bool {
    alive(pid) && autodev::supervisor::proc_stat(pid as i32).is_some_and(|s| s.start_time == start)
}

/// SIGKILLs `pid` and waits until it is dead (a signal is delivered asynchronously; a restart that came first
/// would rightly adopt the still-living run).
fn kill(pid: i64) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    wait_until(&format!("process {pid} to die"), || (!alive(pid)).then_some(()));
}

#[test]
fn lockfile_tells_the_whole_story_and_goes_when_the_slot_is_free() {
    let d = Daemon::start(&fake_config(1));
    d.assign(12, &[], "@say working\n@sleep 30");
    let row = wait_preview(&d, "claude-1", "working");
    let lock = lockfile(&d, "claude-1").expect("a busy slot has a lockfile");
    assert_eq!((lock.slot.as_str(), lock.issue, lock.state().as_str()), ("claude-1", 12, "in_progress"));
    assert_eq!(Some(lock.run_id.as_str()), row["run_id"].as_str());
    assert_eq!(lock.runs, vec![lock.run_id.clone()]);
    assert_eq!(lock.pid, row["pid"].as_u64().map(|p| p as u32));
    assert_eq!(lock.pgid, lock.pid);
    let stat = autodev::supervisor::proc_stat(lock.pid.unwrap() as i32).unwrap();
    assert_eq!(lock.start_time, Some(stat.start_time));
    assert_eq!(lock.boot_id, std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim());
    assert_eq!(lock.session_id.as_deref(), row["session_id"].as_str());
    assert_eq!(lock.daemon_pid, d.pid());
    assert!(lock.args.contains(&"--session-id".to_string()));
    assert_eq!(lock.cwd, d.workspace);
    d.ctl(&["stop", "claude-1"]);
    assert!(lockfile(&d, "claude-1").is_none(), "a free slot has no lockfile");
}

#[test]
fn a_crash_of_the_daemon_loses_nothing_live_runs_are_adopted() {
    let mut d = Daemon::start(&fake_config(1));
    d.assign(1, &[], "@say before the crash\n@sleep 3\n@say after the crash");
    let row = wait_preview(&d, "claude-1", "before the crash");
    let pid = row["pid"].as_i64().unwrap();
    d.kill9();
    assert!(alive(pid), "the child must outlive a crash of the daemon");
    d.launch();
    let adopted = d.slot("claude-1");
    assert_eq!(adopted["state"], "in_progress", "{adopted}");
    assert_eq!(adopted["adopted"], true);
    assert_eq!(adopted["pid"], pid);
    assert_eq!(adopted["run_id"], row["run_id"]);
    assert!(adopted["console_preview"].as_array().unwrap().contains(&json!("before the crash")), "{adopted}");
    let done = d.wait_state("claude-1", "completed");
    let preview = done["console_preview"].as_array().unwrap();
    assert!(preview.contains(&json!("after the crash")), "the preview continues from the log: {done}");
    assert_eq!(done["exit_code"], Value::Null, "an adopted run's exit code is unknown, never 0");
    assert!(done["reason"].as_str().unwrap().contains("exit code unknown"), "{done}");
    assert!(lockfile(&d, "claude-1").is_none());
    // `stop` works on an adopted run too.
    d.assign(2, &[], "@ignore-term\n@grandchild\n@say up\n@sleep 60");
    let row = wait_preview(&d, "claude-1", "up");
    let record = d.record(row["run_id"].as_str().unwrap());
    let grandchild = wait_until("the grandchild", || d.record(row["run_id"].as_str().unwrap())["grandchild"].as_i64());
    d.kill9();
    d.launch();
    assert_eq!(d.slot("claude-1")["state"], "in_progress");
    d.ctl(&["stop", "claude-1"]);
    assert!(!alive(record["pid"].as_i64().unwrap()) && !alive(grandchild), "stop left part of an adopted run");
    assert_eq!(d.slot("claude-1")["state"], "failed");
}

#[test]
fn a_run_that_died_with_the_daemon_is_abandoned_and_resumes_its_conversation() {
    let mut d = Daemon::start(&fake_config(1));
    for (slot, llm) in [("claude-1", "claude"), ("gemini-1", "gemini"), ("codex-1", "codex")] {
        let issue = match llm {
            "claude" => 1,
            "gemini" => 2,
            _ => 3,
        };
        d.assign(issue, &["--llm", llm], "@say first run\n@sleep 60");
        wait_preview(&d, slot, "first run");
    }
    let before: Vec<Value> = ["claude-1", "gemini-1", "codex-1"].iter().map(|s| d.slot(s)).collect();
    d.kill9();
    for row in &before {
        kill(row["pid"].as_i64().unwrap());
    }
    d.launch();
    for (row, slot) in before.iter().zip(["claude-1", "gemini-1", "codex-1"]) {
        let now = d.slot(slot);
        assert_eq!(now["state"], "abandoned", "{now}");
        assert!(now["reason"].as_str().unwrap().contains("ended while autodevd was not running"), "{now}");
        assert_eq!(now["session_id"], row["session_id"], "the session id is kept");
        assert_eq!(now["issue"], row["issue"]);
        assert!(lockfile(&d, slot).is_some(), "the slot stays held on disk too");
    }
    // The slot stays held by its issue: neither the slot nor the issue can be taken.
    let out = d.try_ctl(&["assign", "9", "--slot", "claude-1", "--prompt", "x"]);
    assert!(stderr_of(&out).contains("slot claude-1 holds the abandoned issue #1"), "{}", stderr_of(&out));
    let out = d.try_ctl(&["assign", "1", "--llm", "codex", "--prompt", "x"]);
    assert!(stderr_of(&out).contains("issue #1 is already assigned to claude-1"), "{}", stderr_of(&out));
    assert!(d.ctl(&["status"]).contains("abandoned"));

    for (row, slot) in before.iter().zip(["claude-1", "gemini-1", "codex-1"]) {
        let out: Value = serde_json::from_str(&d.ctl(&["resume", slot, "--json"])).unwrap();
        assert_eq!(out["session_id"], row["session_id"]);
        let done = d.wait_state(slot, "completed");
        let argv: Vec<String> =
            serde_json::from_value(d.record(done["run_id"].as_str().unwrap())["argv"].clone()).unwrap();
        let session = row["session_id"].as_str().unwrap().to_string();
        let resumed = match slot {
            "codex-1" => argv.windows(2).any(|w| w == ["resume".to_string(), session.clone()]),
            _ => argv.windows(2).any(|w| w == ["--resume".to_string(), session.clone()]),
        };
        assert!(resumed, "{slot} was not resumed in session {session}: {argv:?}");
        assert!(!argv.contains(&"--session-id".to_string()), "{argv:?}");
        let prompt = d.record(done["run_id"].as_str().unwrap())["prompt"].as_str().unwrap().to_string();
        assert!(prompt.contains("interrupted"), "a continuation prompt: {prompt}");
        assert_eq!(done["runs"].as_array().unwrap().len(), 2, "the chain of runs: {done}");
        assert_eq!(done["task_id"], row["task_id"]);
        assert_eq!(done["cwd"], Value::Null, "cwd is not a status field");
        assert!(lockfile(&d, slot).is_none());
    }
    let history = std::fs::read_to_string(d.state_dir().join("history.jsonl")).unwrap();
    let claude_lines: Vec<Value> = history
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["slot"] == "claude-1")
        .collect();
    assert_eq!(claude_lines.last().unwrap()["runs"].as_array().unwrap().len(), 2, "history shows the chain");
}

#[test]
fn a_forged_lockfile_about_a_stranger_never_signals_it() {
    let mut d = Daemon::start(&fake_config(3));
    d.terminate();
    // A live process nobody asked autodevd to run, and lockfiles naming it: with its true identity (pid, start
    // time, boot), with a wrong start time (pid reuse), and from another boot.
    let mut stranger = Command::new("sleep").arg("1000").stdin(Stdio::null()).spawn().unwrap();
    let pid = stranger.id();
    let start_time = autodev::supervisor::proc_stat(pid as i32).unwrap().start_time;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim().to_string();
    let state = d.state_dir();
    let forge = |slot: &str, start: u64, boot_id: &str| {
        let run_id = format!("01FORGED{:0>18}", slot.len() as u64 * 1000 + start % 1000 + slot.as_bytes()[7] as u64);
        let run = state.join("runs").join(&run_id);
        std::fs::create_dir_all(&run).unwrap();
        let lock = json!({
            "version": 1, "slot": slot, "provider": "claude", "issue": 50 + slot.len() as u64 + start % 7,
            "task_id": "t", "run_id": run_id, "runs": [run_id],
            "state": "in_progress", "reason": null, "pid": pid, "pgid": pid, "start_time": start, "boot_id": boot_id,
            "session_id": "s-1", "cwd": "/", "program": "claude", "args": [], "prompt_file": run.join("prompt"),
            "stdout": run.join("stdout"), "stderr": run.join("stderr"), "started_at": "2026-11-21T00:00:00Z",
            "run_started_at": "2026-11-21T00:00:00Z", "daemon_pid": 1
        });
        std::fs::write(state.join("slots").join(format!("{slot}.lock")), lock.to_string()).unwrap();
    };
    forge("claude-1", start_time, &boot);
    forge("claude-2", start_time + 1, &boot);
    forge("claude-3", start_time, "00000000-0000-0000-0000-000000000000");
    d.launch();
    for slot in ["claude-1", "claude-2", "claude-3"] {
        let row = d.slot(slot);
        assert_eq!(row["state"], "abandoned", "{slot}: {row}");
    }
    assert!(d.slot("claude-3")["reason"].as_str().unwrap().contains("machine restarted"));
    assert!(stranger.try_wait().unwrap().is_none(), "the stranger was signalled");
    let out = d.try_ctl(&["stop", "claude-1"]);
    assert!(stderr_of(&out).contains("not running (it is abandoned)"), "{}", stderr_of(&out));
    let out = d.try_ctl(&["resume", "claude-1"]);
    let err = stderr_of(&out);
    assert!(err.contains(&format!("process {pid} of the previous run in claude-1 is still alive")), "{err}");
    d.ctl(&["release", "claude-1"]);
    d.terminate();
    assert!(stranger.try_wait().unwrap().is_none(), "the stranger was signalled");
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

#[test]
fn a_corrupt_lockfile_is_moved_aside_and_reported() {
    let mut d = Daemon::start(&fake_config(2));
    d.terminate();
    let slots = d.state_dir().join("slots");
    std::fs::write(slots.join("claude-1.lock"), b"{\"version\":1,\"slot\":\"claude-1\",\"iss").unwrap();
    std::fs::write(slots.join("claude-2.lock"), b"\x00\xffnot json").unwrap();
    d.launch();
    let status = d.status();
    let warnings = status["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].as_str().unwrap().contains("claude-1: its lockfile was unreadable"), "{warnings:?}");
    assert!(slots.join("claude-1.lock.corrupt").exists() && slots.join("claude-2.lock.corrupt").exists());
    assert!(d.ctl(&["status"]).contains("! slot claude-1: its lockfile was unreadable"));
    assert_eq!(d.assign(3, &[], "@say fine"), "claude-1", "the daemon carries on");
}

#[test]
fn sigterm_leaves_no_child_and_every_task_resumable() {
    let mut d = Daemon::start(&fake_config(1));
    d.assign(1, &[], "@grandchild\n@say hello\n@sleep 60");
    d.assign(2, &["--llm", "codex"], "@ignore-term\n@say hello\n@sleep 60");
    let rows = [wait_preview(&d, "claude-1", "hello"), wait_preview(&d, "codex-1", "hello")];
    let pids: Vec<i64> = rows.iter().map(|r| r["pid"].as_i64().unwrap()).collect();
    assert!(d.terminate().success());
    assert!(pids.iter().all(|p| !alive(*p)));
    d.launch();
    for (row, slot) in rows.iter().zip(["claude-1", "codex-1"]) {
        let now = d.slot(slot);
        assert_eq!(now["state"], "abandoned", "{now}");
        assert!(now["reason"].as_str().unwrap().contains("SIGTERM"), "{now}");
        assert_eq!(now["session_id"], row["session_id"]);
    }
    d.ctl(&["resume", "codex-1"]);
    let done = d.wait_state("codex-1", "completed");
    assert_eq!(done["runs"].as_array().unwrap().len(), 2);
}

#[test]
fn resume_and_release_refuse_what_they_cannot_do() {
    let d = Daemon::start(&fake_config(1));
    let out = d.try_ctl(&["resume", "claude-1"]);
    assert!(stderr_of(&out).contains("slot claude-1 has no task to resume"), "{}", stderr_of(&out));
    d.assign(1, &[], "@say busy\n@sleep 30");
    wait_preview(&d, "claude-1", "busy");
    let out = d.try_ctl(&["resume", "claude-1"]);
    assert!(stderr_of(&out).contains("cannot be resumed: its task is in_progress"), "{}", stderr_of(&out));
    let out = d.try_ctl(&["release", "claude-1"]);
    assert!(stderr_of(&out).contains("slot claude-1 is running issue #1"), "{}", stderr_of(&out));
    d.ctl(&["stop", "claude-1"]);
    // A stopped task can be resumed: same conversation, same slot.
    let session = d.slot("claude-1")["session_id"].clone();
    let resumed: Value = serde_json::from_str(&d.ctl(&["resume", "claude-1", "--json"])).unwrap();
    assert_eq!(resumed["session_id"], session);
    d.wait_state("claude-1", "completed");
    let out = d.try_ctl(&["resume", "claude-1"]);
    assert!(stderr_of(&out).contains("its task is completed"), "{}", stderr_of(&out));
    let out = d.try_ctl(&["release", "claude-9"]);
    assert!(stderr_of(&out).contains("unknown slot"), "{}", stderr_of(&out));
}

#[test]
fn release_frees_an_abandoned_slot_as_failed_or_done() {
    let mut d = Daemon::start(&fake_config(1));
    d.assign(1, &[], "@say a\n@sleep 60");
    d.assign(2, &["--llm", "codex"], "@say b\n@sleep 60");
    let pids = [
        wait_preview(&d, "claude-1", "a")["pid"].as_i64().unwrap(),
        wait_preview(&d, "codex-1", "b")["pid"].as_i64().unwrap(),
    ];
    d.kill9();
    pids.iter().for_each(|p| kill(*p));
    d.launch();
    assert!(d.ctl(&["release", "claude-1"]).contains("recorded as failed"));
    assert!(d.ctl(&["release", "codex-1", "--done"]).contains("recorded as completed"));
    assert_eq!(d.slot("claude-1")["state"], "failed");
    assert_eq!(d.slot("codex-1")["state"], "completed");
    assert!(lockfile(&d, "claude-1").is_none() && lockfile(&d, "codex-1").is_none());
    assert_eq!(d.assign(1, &[], "@say again"), "claude-1", "the issue and the slot are free again");
}

#[test]
fn a_task_without_a_session_restarts_with_its_original_prompt() {
    let bin = common::fixtures().join("bin/plain");
    let config = json!({ "llms": { "tool": { "cliPath": bin.display().to_string() } } });
    let mut d = Daemon::start(&config);
    d.assign(4, &[], "the original task\n@say go\n@sleep 60");
    let pid = wait_preview(&d, "tool-1", "go")["pid"].as_i64().unwrap();
    d.kill9();
    kill(pid);
    d.launch();
    assert_eq!(d.slot("tool-1")["state"], "abandoned");
    let out = d.ctl(&["resume", "tool-1"]);
    assert!(out.contains("no session was captured for this task: restarted it with its original prompt"), "{out}");
    let row = wait_preview(&d, "tool-1", "go");
    assert!(d.record(row["run_id"].as_str().unwrap())["prompt"].as_str().unwrap().starts_with("the original task"));
}

#[test]
fn policy_resume_resumes_at_most_three_times_an_hour_and_policy_fail_frees() {
    let mut config = fake_config(1);
    config["supervisor"]["onAbandoned"] = json!("resume");
    let mut d = Daemon::start(&config);
    d.assign(1, &[], "@replay-on-resume\n@say alive\n@sleep 60");
    for round in 1..=4 {
        let row = wait_preview(&d, "claude-1", "alive");
        d.kill9();
        kill(row["pid"].as_i64().unwrap());
        d.launch();
        let now = d.slot("claude-1");
        if round <= 3 {
            assert_eq!(now["state"], "in_progress", "round {round}: {now}");
            assert_eq!(now["runs"].as_array().unwrap().len(), round + 1);
        } else {
            assert_eq!(now["state"], "abandoned", "round {round}: {now}");
            assert!(now["reason"].as_str().unwrap().contains("3 automatic restarts in 1h00m"), "{now}");
        }
    }
    d.kill9();
    let mut text: Value = serde_json::from_str(&std::fs::read_to_string(d.config_path.clone()).unwrap()).unwrap();
    text["supervisor"]["onAbandoned"] = json!("fail");
    std::fs::write(&d.config_path, text.to_string()).unwrap();
    d.launch();
    let row = d.slot("claude-1");
    assert_eq!(row["state"], "failed");
    assert!(row["reason"].as_str().unwrap().contains("failed by policy onAbandoned=fail"), "{row}");
    assert!(lockfile(&d, "claude-1").is_none());
}

/// A hundred crashes of the daemon at random moments across assign, run, exit, resume, retry backoffs and
/// usage-limit waits. After each restart every task is in exactly one state, no slot holds two tasks, no issue two
/// slots, a waiting task still waits for the same moment, and no task completes twice (a run that finished while
/// autodevd was down is never run again); after a final stop no process is left.
#[test]
fn crash_loop_keeps_every_invariant() {
    let mut config = fake_config(2);
    config["llms"]["gemini"]["enabled"] = json!(false);
    config["retry"] = json!({ "maxAttempts": 2, "backoffSecs": 0.4 });
    let mut d = Daemon::start(&config);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // (pid, start time): a pid alone could be reused by an unrelated process during the test.
    let mut seen: Vec<(i64, u64)> = Vec::new();
    for cycle in 0..100u64 {
        // Some work: new assignments, resumes of abandoned or failed tasks, stops.
        for _ in 0..rand(3) + 1 {
            let issue = rand(6) + 1;
            let action = rand(4);
            let slot = ["claude-1", "claude-2", "codex-1", "codex-2"][rand(4) as usize];
            let ending = match rand(4) {
                0 => "\n@fail\n@exit 1".to_string(),
                1 => {
                    let reset = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                    format!("\n@result-text Claude AI usage limit reached|{}\n@fail\n@exit 1", reset + 1)
                }
                _ => String::new(),
            };
            let prompt = format!("--prompt=@say cycle {cycle}\n@sleep 0.{}{ending}", rand(9));
            let args: Vec<String> = match action {
                0 | 1 => vec!["assign".into(), issue.to_string(), prompt],
                2 => vec!["resume".into(), slot.into()],
                _ => vec!["release".into(), slot.into()],
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = d.try_ctl(&args);
        }
        // A crash at a random moment (the point of this test is the randomness of the moment).
        std::thread::sleep(std::time::Duration::from_millis(rand(150)));
        let before = d.status();
        let waits: Vec<(String, Value)> = before["slots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "waiting")
            .map(|r| (r["run_id"].as_str().unwrap().to_string(), r["waiting_until"].clone()))
            .collect();
        for row in before["slots"].as_array().unwrap() {
            if let Some(pid) = row["pid"].as_i64()
                && let Some(stat) = autodev::supervisor::proc_stat(pid as i32)
            {
                seen.push((pid, stat.start_time));
            }
        }
        d.kill9();
        if rand(2) == 0 {
            // The children die with it sometimes (OOM killer, reboot-like).
            for (pid, start) in &seen {
                if same_process_alive(*pid, *start) {
                    kill(*pid);
                }
            }
        }
        d.launch();
        let status = d.status();
        let rows = status["slots"].as_array().unwrap();
        let mut issues_held = std::collections::HashSet::new();
        for row in rows {
            let state = row["state"].as_str().unwrap();
            assert!(
                ["ready", "starting", "in_progress", "waiting", "abandoned", "completed", "failed"].contains(&state),
                "cycle {cycle}: {row}"
            );
            if let Some((_, until)) = waits.iter().find(|(run, _)| row["run_id"] == run.as_str())
                && state == "waiting"
            {
                assert_eq!(&row["waiting_until"], until, "cycle {cycle}: the wait moved: {row}");
            }
            if ["starting", "in_progress", "waiting", "abandoned"].contains(&state) {
                let issue = row["issue"].as_u64().unwrap();
                assert!(issues_held.insert(issue), "cycle {cycle}: issue #{issue} holds two slots: {status}");
                let slot = row["slot"].as_str().unwrap();
                if lockfile(&d, slot).is_none() {
                    // The run may have ended between the answer and this look at the disk; then the slot no
                    // longer holds its issue. A held slot without a lockfile is what must never be.
                    let now = d.slot(slot);
                    assert!(
                        !["starting", "in_progress", "waiting", "abandoned"].contains(&now["state"].as_str().unwrap())
                            || lockfile(&d, slot).is_some(),
                        "cycle {cycle}: held without a lockfile: {now}"
                    );
                }
            } else {
                assert!(lockfile(&d, row["slot"].as_str().unwrap()).is_none(), "cycle {cycle}: {row}");
            }
            if state == "in_progress" && !alive(row["pid"].as_i64().unwrap()) {
                // A run may end in the instant between two answers; a ghost is one that stays "in progress".
                let slot = row["slot"].as_str().unwrap().to_string();
                wait_until(&format!("cycle {cycle}: {slot} to leave in_progress once its process is gone"), || {
                    (d.slot(&slot)["state"] != "in_progress").then_some(())
                });
            }
        }
        let mut completed = std::collections::HashSet::new();
        for line in history(&d).iter().filter(|h| h["state"] == "completed" && h["end_cause"] == "succeeded") {
            assert!(completed.insert(line["task_id"].clone()), "cycle {cycle}: a task completed twice: {line}");
        }
    }
    // A final stop: every run ends, and nothing of any run is left.
    assert!(d.terminate().success());
    for (pid, start) in seen {
        assert!(!same_process_alive(pid, start), "process {pid} outlived the final stop");
    }
}

#[test]
fn an_issue_stays_held_when_its_llm_leaves_the_config() {
    let mut d = Daemon::start(&fake_config(1));
    d.assign(3, &["--llm", "codex"], "@say hi\n@sleep 60");
    let pid = wait_preview(&d, "codex-1", "hi")["pid"].as_i64().unwrap();
    d.kill9();
    kill(pid);
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&d.config_path).unwrap()).unwrap();
    config["llms"].as_object_mut().unwrap().remove("codex");
    std::fs::write(&d.config_path, config.to_string()).unwrap();
    d.launch();
    let status = d.status();
    assert!(status["warnings"][0].as_str().unwrap().contains("LLM \"codex\" is no longer in the config"), "{status}");
    let out = d.try_ctl(&["assign", "3", "--prompt", "again"]);
    assert!(stderr_of(&out).contains("issue #3 is held by codex-1"), "{}", stderr_of(&out));
    assert!(lockfile(&d, "codex-1").is_some(), "the lockfile is kept as it is");
}

/// The lines of the history (all of them, as `history --json` shows them).
fn history(d: &Daemon) -> Vec<Value> {
    serde_json::from_str::<Value>(&d.ctl(&["history", "--json", "-n", "1000"])).unwrap().as_array().unwrap().clone()
}

#[test]
fn a_run_that_finished_while_autodevd_was_down_is_never_run_again() {
    let mut config = fake_config(1);
    // The policy that would resume an interrupted task: a finished one must not be.
    config["supervisor"]["onAbandoned"] = json!("resume");
    let mut d = Daemon::start(&config);
    d.assign(1, &["--llm", "claude"], "@say working\n@sleep 1\n@say done");
    d.assign(2, &["--llm", "codex"], "@say working\n@sleep 1\n@fail\n@exit 1");
    let pids: Vec<i64> =
        ["claude-1", "codex-1"].iter().map(|s| wait_preview(&d, s, "working")["pid"].as_i64().unwrap()).collect();
    d.kill9();
    for pid in pids {
        wait_until("the run to finish by itself", || (!alive(pid)).then_some(()));
    }
    d.launch();
    let done = d.slot("claude-1");
    assert_eq!((done["state"].as_str(), done["end_cause"].as_str()), (Some("completed"), Some("succeeded")), "{done}");
    assert_eq!(done["exit_code"], Value::Null, "the exit code of a run nobody watched is unknown, never 0: {done}");
    assert_eq!(done["runs"].as_array().unwrap().len(), 1, "never run again: {done}");
    let failed = d.slot("codex-1");
    assert_eq!(
        (failed["state"].as_str(), failed["end_cause"].as_str()),
        (Some("failed"), Some("provider_error")),
        "{failed}"
    );
    assert!(lockfile(&d, "claude-1").is_none() && lockfile(&d, "codex-1").is_none());
    let lines = history(&d);
    assert_eq!(lines.len(), 2, "one history line each: {lines:?}");
    // Another restart changes nothing.
    d.kill9();
    d.launch();
    assert_eq!(history(&d).len(), 2);
    assert_eq!(d.slot("claude-1")["runs"].as_array().unwrap().len(), 1);
}

#[test]
fn a_cli_that_closes_its_descriptors_is_still_adopted_held_and_stoppable() {
    let mut d = Daemon::start(&fake_config(1));
    d.assign(5, &[], "@close-fds\n@say closed\n@sleep 60");
    let before = wait_preview(&d, "claude-1", "closed");
    let pid = before["pid"].as_i64().unwrap();
    d.kill9();
    d.launch();
    let row = d.slot("claude-1");
    assert_eq!((row["state"].as_str(), row["adopted"].as_bool()), (Some("in_progress"), Some(true)), "{row}");
    assert_eq!(row["pid"].as_i64(), Some(pid));
    // While it lives, neither its slot nor its issue goes to anyone else.
    let out = d.try_ctl(&["release", "claude-1"]);
    assert!(stderr_of(&out).contains("is running issue #5"), "{}", stderr_of(&out));
    let out = d.try_ctl(&["assign", "5", "--llm", "codex", "--prompt", "x"]);
    assert!(stderr_of(&out).contains("already assigned to claude-1"), "{}", stderr_of(&out));
    d.ctl(&["stop", "claude-1"]);
    assert!(!alive(pid), "stopped through its pidfd");
    assert_eq!(d.slot("claude-1")["end_cause"], "stopped");
}

#[test]
fn a_wait_survives_a_restart_and_ends_at_the_same_moment() {
    let mut config = fake_config(1);
    config["retry"] = json!({ "maxAttempts": 2, "backoffSecs": 4 });
    let mut d = Daemon::start(&config);
    d.assign(6, &[], "@fail\n@exit 1");
    let waiting = d.wait_state("claude-1", "waiting");
    let until = waiting["waiting_until"].as_str().unwrap().to_string();
    assert_eq!(waiting["waiting_for"], "retry");
    assert_eq!(lockfile(&d, "claude-1").unwrap().state().as_str(), "waiting", "the wait is on disk");
    d.kill9();
    d.launch();
    let after = d.slot("claude-1");
    assert_eq!(
        (after["state"].as_str(), after["waiting_until"].as_str()),
        (Some("waiting"), Some(until.as_str())),
        "{after}"
    );
    // Then it goes on by itself, not before the moment it waited for.
    let done = d.wait_state("claude-1", "completed");
    assert_eq!(done["runs"].as_array().unwrap().len(), 2, "{done}");
    let started = humantime::parse_rfc3339(done["started_at"].as_str().unwrap()).unwrap();
    assert!(started >= humantime::parse_rfc3339(&until).unwrap(), "started {done} before {until}");
}

#[test]
fn a_lockfile_of_a_newer_format_stops_startup_and_stays() {
    let mut d = Daemon::start(&fake_config(1));
    d.kill9();
    let path = d.state_dir().join("slots/claude-1.lock");
    std::fs::write(&path, r#"{"version": 99, "slot": "claude-1", "whatever": "a newer autodev wrote"}"#).unwrap();
    let out = d.daemon_command().stderr(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("format version 99, newer than this autodevd understands"), "{}", stderr_of(&out));
    assert!(path.exists(), "never moved aside as corrupt");
}

#[test]
fn a_lockfile_of_the_first_format_loads_and_its_task_resumes() {
    let mut d = Daemon::start(&fake_config(1));
    d.kill9();
    let fixture = std::fs::read_to_string(common::fixtures().join("formats/v1/claude-1.lock")).unwrap();
    let mut lock: Value = serde_json::from_str(&fixture).unwrap();
    lock["cwd"] = json!(d.workspace.display().to_string());
    std::fs::write(d.state_dir().join("slots/claude-1.lock"), lock.to_string()).unwrap();
    d.launch();
    let row = d.slot("claude-1");
    assert_eq!((row["state"].as_str(), row["issue"].as_u64()), (Some("abandoned"), Some(41)), "{row}");
    assert_eq!(row["restarts"]["allowed"], 3, "{row}");
    let resumed: Value = serde_json::from_str(&d.ctl(&["resume", "claude-1", "--json"])).unwrap();
    let argv = d.record(resumed["run_id"].as_str().unwrap())["argv"].clone();
    assert!(argv.as_array().unwrap().contains(&json!("2f6a1c1e-5d8e-4a59-9d43-0c2f1c7a9b11")), "{argv}");
    d.wait_state("claude-1", "completed");
    assert_eq!(lockfile(&d, "claude-1"), None);
}

/// Unmounts the test's tmpfs, also when the test fails.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` with one file until a write fails for want of space.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_data()) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            return path;
        }
    }
}

#[test]
fn a_full_state_disk_loses_no_task() {
    let mut d = Daemon::prepare(&fake_config(1), None, &[]);
    let state = d.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m,mode=0700", "autodev-test"])
        .arg(&state)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root and a kernel that allows it)");
        return;
    }
    let _unmount = Mounted(state.clone());
    d.launch();
    for (issue, llm) in [(1, "claude"), (2, "codex")] {
        d.assign(issue, &["--llm", llm], "@say one\n@sleep 1.5\n@say two\n@say three");
    }
    wait_preview(&d, "claude-1", "one");
    wait_preview(&d, "codex-1", "one");
    let filler = fill(&state);
    // Both runs end while nothing can be written: their ends wait, their slots stay held, and autodevd answers.
    for slot in ["claude-1", "codex-1"] {
        let row = wait_until(&format!("{slot} to end unrecorded"), || {
            let row = d.slot(slot);
            (row["end_cause"] == "disk_full").then_some(row)
        });
        assert!(row["reason"].as_str().unwrap().contains("cannot be written"), "{row}");
        assert!(lockfile(&d, slot).is_some(), "the lockfile stays until the end is recorded");
    }
    let status = d.status();
    let warning =
        status["warnings"].as_array().unwrap().iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n");
    assert!(warning.contains("is full") && warning.contains(state.to_str().unwrap()), "{status}");
    let out = d.try_ctl(&["assign", "1", "--llm", "gemini", "--prompt", "x"]);
    assert!(stderr_of(&out).contains("already assigned to claude-1"), "the issue is still held: {}", stderr_of(&out));
    // A crash while the disk is full loses nothing either.
    d.kill9();
    d.launch();
    for (slot, issue) in [("claude-1", 1), ("codex-1", 2)] {
        let row = d.slot(slot);
        assert_eq!(row["issue"], issue, "{row}");
        assert!(lockfile(&d, slot).is_some(), "{row}");
    }
    // Room again: what waited is written, and every task is either recorded or still held.
    std::fs::remove_file(filler).unwrap();
    wait_until("the pending records to be written", || {
        let held = ["claude-1", "codex-1"].iter().filter(|s| lockfile(&d, s).is_some()).count();
        let recorded = history(&d).len();
        (held + recorded >= 2
            && d.status()["warnings"].as_array()?.iter().all(|w| !w.as_str().unwrap_or("").contains("is full")))
        .then_some(())
    });
    for (slot, issue) in [("claude-1", 1u64), ("codex-1", 2)] {
        let in_history = history(&d).iter().any(|h| h["issue"] == issue);
        let held = lockfile(&d, slot).is_some_and(|l| l.issue == issue);
        assert!(in_history || held, "task #{issue} vanished: {}", d.slot(slot));
    }
}
