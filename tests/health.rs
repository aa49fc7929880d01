//! Health end to end: stale and back, CPU and memory, progress from inside (and refused from outside), retries on
//! a fallback LLM, the INSTANCE_STATUS comment (parses, edited not duplicated across a restart, no secrets), history.

mod common;

use common::fake_github::{FakeGitHub, TOKEN};
use common::{Daemon, fake_config, wait_until};
use serde_json::{Value, json};

fn config() -> Value {
    let mut c = fake_config(1);
    c["health"] = json!({ "sampleSecs": 0.1, "staleAfterSecs": 1 });
    for llm in ["claude", "gemini", "codex"] {
        c["llms"][llm]["env"]["AUTODEVCTL"] = json!(env!("CARGO_BIN_EXE_autodevctl"));
    }
    c
}

#[test]
fn a_silent_run_goes_stale_and_comes_back_with_output() {
    let d = Daemon::start(&config());
    d.assign(1, &[], "@say start\n@sleep 2.5\n@say back\n@sleep 0.3");
    let stale = d.wait_state("claude-1", "stale");
    assert!(stale["pid"].is_i64(), "a stale run is still running: {stale}");
    wait_until("back to in_progress", || {
        let row = d.slot("claude-1");
        (row["state"] == "in_progress" && row["console_preview"].as_array()?.contains(&json!("back"))).then_some(())
    });
    d.wait_state("claude-1", "completed");
    let table = d.ctl(&["status"]);
    assert!(table.contains("instances 3 total"), "{table}");
}

#[test]
fn a_busy_run_shows_cpu_and_memory_and_is_not_stale() {
    let d = Daemon::start(&config());
    d.assign(2, &[], "@burn 3");
    let row = wait_until("CPU and memory samples", || {
        let row = d.slot("claude-1");
        (row["cpu_percent"].as_f64()? > 20.0 && row["memory_mb"].as_f64()? > 1.0).then_some(row)
    });
    assert_eq!(row["state"], "in_progress", "busy for longer than staleAfterSecs, yet not stale: {row}");
}

#[test]
fn progress_is_taken_from_inside_a_run_and_refused_from_outside() {
    let d = Daemon::start(&config());
    d.assign(3, &[], "@progress 42 Writing tests\n@sleep 3");
    let row = wait_until("the progress report", || {
        let row = d.slot("claude-1");
        (row["progress"] == 42).then_some(row)
    });
    assert_eq!(row["progress_message"], "Writing tests");
    // The fake writes the command's exit code once the command has returned.
    let rc = wait_until("autodevctl progress to return", || {
        d.record(row["run_id"].as_str().unwrap())["progress"][0]["rc"].as_i64()
    });
    assert_eq!(rc, 0);
    // The same request from a process that is not part of the run.
    let out = d
        .ctl_command(&["progress", "99", "forged"])
        .env("AUTODEV_SLOT", "claude-1")
        .env("AUTODEV_RUN", row["run_id"].as_str().unwrap())
        .env("AUTODEV_SOCKET", d.socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only taken from inside its run"));
    assert_eq!(d.slot("claude-1")["progress"], 42);
    let out = d.ctl_command(&["progress", "5"]).env_remove("AUTODEV_SLOT").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("runs inside an agent's slot"));
}

#[test]
fn a_failing_task_is_retried_on_a_fallback_llm_with_its_attempt_count() {
    let mut c = config();
    c["retry"] = json!({ "maxAttempts": 2, "fallback": ["codex"], "backoffSecs": 0.1 });
    let d = Daemon::start(&c);
    // The service fails (a typed API status): the retry goes to the fallback LLM first.
    d.assign(4, &[], "the task\n@fail-on claude 503");
    let left = d.wait_state("claude-1", "failed");
    assert_eq!(left["end_cause"], "provider_error", "{left}");
    let moved = d.wait_state("codex-1", "completed");
    assert_eq!(moved["issue"], 4);
    assert_eq!(moved["attempt"], 2, "{moved}");
    assert_eq!(moved["runs"].as_array().unwrap().len(), 2);
    let history: Value = serde_json::from_str(&d.ctl(&["history", "--json", "--issue", "4"])).unwrap();
    let states: Vec<(&str, &str, &str, usize)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let cause = h["end_cause"].as_str().unwrap();
            (h["slot"].as_str().unwrap(), h["state"].as_str().unwrap(), cause, h["runs"].as_array().unwrap().len())
        })
        .collect();
    assert_eq!(states, [("claude-1", "failed", "provider_error", 1), ("codex-1", "completed", "succeeded", 2)]);
    assert!(d.ctl(&["history"]).contains("codex-1"));
    // Errors a retry cannot fix are not retried.
    let mut c = config();
    c["retry"] = json!({ "maxAttempts": 3, "backoffSecs": 0.1 });
    c["llms"]["gemini"]["cliPath"] = json!("/nonexistent/gemini");
    let d = Daemon::start(&c);
    let _ = d.try_ctl(&["assign", "5", "--llm", "gemini", "--prompt", "x"]);
    let history: Value = serde_json::from_str(&d.ctl(&["history", "--json"])).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 1, "a missing CLI is not retried: {history}");
    assert_eq!(history[0]["end_cause"], "cli_missing", "{history}");
}

#[test]
fn an_agent_error_is_retried_in_its_own_conversation_after_a_backoff() {
    let mut c = config();
    c["retry"] = json!({ "maxAttempts": 2, "fallback": ["codex"], "backoffSecs": 1 });
    let d = Daemon::start(&c);
    // The agent's own words name statuses; only typed facts count: an agent error, retried in its own slot.
    d.assign(6, &[], "@replay-on-resume\n@result-text fixed bug #1502 and the 429 handler\n@fail\n@exit 1");
    let waiting = d.wait_state("claude-1", "waiting");
    assert_eq!(waiting["waiting_for"], "retry", "{waiting}");
    assert!(waiting["waiting_until"].is_string(), "{waiting}");
    assert_eq!(waiting["restarts"]["allowed"], 3, "{waiting}");
    let row = wait_until("the retry to end", || {
        let row = d.slot("claude-1");
        (row["state"] == "failed" && row["runs"].as_array()?.len() == 2).then_some(row)
    });
    assert_eq!(row["end_cause"], "agent_error", "{row}");
    assert_eq!(row["restarts"]["used"], 1, "{row}");
    assert_eq!(d.slot("codex-1")["state"], "ready", "an agent error does not go to the fallback");
}

#[test]
fn the_status_comment_parses_is_edited_not_duplicated_and_keeps_secrets_home() {
    let fake = FakeGitHub::start("TEXT");
    fake.add_issue(70, "Commented task", false);
    let mut c = config();
    c["health"] = json!({ "sampleSecs": 0.1, "staleAfterSecs": 30 });
    c["github"] = json!({ "owner": "octo", "repo": "widgets", "apiUrl": fake.url, "timeoutSecs": 2 });
    c["statusComments"] = json!({ "intervalSecs": 0.3, "redactPatterns": ["corp-secret-[0-9]+"] });
    c["llms"]["claude"]["apiKey"] = json!("sk-planted-api-key-value");
    let mut d = Daemon::start(&c);
    let planted = "token ghp_abcdefghijklmnopqrstuvwxyz0123 key sk-ant-api03-plantedplanted corp-secret-42 sk-planted-api-key-value";
    d.assign(70, &[], &format!("@say {planted}\n@progress 30 Half way\n@sleep 3\n@say finishing"));
    let body = wait_until("an in-progress comment", || {
        let comments = fake.comments_on(70);
        comments.first().filter(|(_, b)| b.contains("\"status\": \"in_progress\"")).map(|(_, b)| b.clone())
    });
    let start = body.find("<!-- INSTANCE_STATUS:START:claude-1 -->").expect("start marker");
    let end = body.find("<!-- INSTANCE_STATUS:END:claude-1 -->").expect("end marker");
    let block = &body[start..end];
    let json_text = block.split("```json").nth(1).unwrap().split("```").next().unwrap();
    let status: Value = serde_json::from_str(json_text).expect("the JSON in the comment parses");
    assert_eq!(status["instance_id"], "claude-1");
    assert_eq!(status["role"], "worker");
    assert_eq!(status["current_task"]["id"], "issue-70");
    for key in ["cpu_usage", "memory_mb", "last_heartbeat", "uptime_seconds"] {
        assert!(status["health"].get(key).is_some(), "health.{key} missing: {status}");
    }
    assert!(status["console_preview"].is_array());
    wait_until("the progress in the comment", || fake.comments_on(70)[0].1.contains("Half way").then_some(()));
    // A crash and a restart: the run is adopted, and the same comment is edited to its end.
    d.kill9();
    d.launch();
    d.wait_state("claude-1", "completed");
    wait_until("the final comment", || fake.comments_on(70)[0].1.contains("\"status\": \"completed\"").then_some(()));
    assert_eq!(fake.comments_on(70).len(), 1, "one comment per task, across restarts");
    let everything = fake.lock().seen.join("\n");
    for secret in [
        "ghp_abcdefghijklmnopqrstuvwxyz0123",
        "sk-ant-api03-plantedplanted",
        "corp-secret-42",
        "sk-planted-api-key-value",
    ] {
        assert!(!everything.contains(secret), "{secret} reached GitHub");
    }
    assert!(everything.contains("[redacted]"));
    // The token only ever travels in the Authorization header.
    assert!(fake.comments_on(70)[0].1.find(TOKEN).is_none());
}

#[test]
fn a_usage_limit_is_waited_out_not_failed_and_then_resumed() {
    let d = Daemon::start(&config());
    let reset = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3;
    // As claude reports it: the final result is an error whose text carries the reset time.
    d.assign(8, &[], &format!("@result-text Claude AI usage limit reached|{reset}\n@fail\n@exit 1"));
    let row = d.wait_state("claude-1", "waiting");
    assert_eq!(row["waiting_for"], "usage_limit", "not failed: {row}");
    let until = humantime::parse_rfc3339(row["waiting_until"].as_str().unwrap()).unwrap();
    assert_eq!(until.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), reset, "{row}");
    assert_eq!(row["rate_limited_until"], row["waiting_until"], "the old name stays for this release: {row}");
    let resumed = d.wait_state("claude-1", "completed");
    assert_eq!(resumed["runs"].as_array().unwrap().len(), 2, "resumed after the reset: {resumed}");
}

#[test]
fn an_agent_talking_about_rate_limits_is_not_rate_limited() {
    let mut c = config();
    c["health"] = json!({ "sampleSecs": 0.1, "staleAfterSecs": 1 });
    let d = Daemon::start(&c);
    d.assign(9, &[], "@say Adding a rate limit: usage limit reached errors now say try again in 5 minutes\n@sleep 2.5");
    // Silent after that line: it goes stale, because nothing the CLI reported was a usage limit.
    let row = d.wait_state("claude-1", "stale");
    assert_eq!(row["rate_limited_until"], Value::Null, "{row}");
}

#[test]
fn cpu_and_memory_show_from_the_first_second_of_a_run_not_after_a_sample_period() {
    let mut c = fake_config(1);
    // The periodic sample is an hour away (and its first tick was at start-up, before the run).
    c["health"] = json!({ "sampleSecs": 3600 });
    let d = Daemon::start(&c);
    d.assign(1, &[], "@burn 20");
    wait_until("CPU and memory in status", || {
        let row = d.slot("claude-1");
        (row["cpu_percent"].as_f64()? > 10.0 && row["memory_mb"].as_f64()? > 0.0).then_some(())
    });
    d.ctl(&["stop", "claude-1"]);
}
