//! Secrets never appear anywhere: a GitHub that echoes the Authorization header in its errors, an agent that
//! prints the token and its API key. A grep over every output of autodevctl, the daemon's log and every file in
//! the state and runtime dirs finds neither, except the run's raw output files (and `logs --raw`, documented).

mod common;

use std::path::Path;

use common::fake_github::{Failure, FakeGitHub, TOKEN};
use common::{Daemon, fake_config};
use serde_json::json;

const API_KEY: &str = "sk-ant-test-key-0123456789";
const ENV_SECRET: &str = "hunter2-database-password";

/// Every file under `dir` (recursively) whose content holds `needle`, except the runs' raw files.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_holding(&path, needle));
            continue;
        }
        let raw = ["stdout", "stderr", "prompt"].iter().any(|n| path.file_name().is_some_and(|f| f == *n));
        let bytes = std::fs::read(&path).unwrap_or_default();
        if !raw && String::from_utf8_lossy(&bytes).contains(needle) {
            found.push(path.display().to_string());
        }
    }
    found
}

#[test]
fn the_token_and_the_keys_appear_in_no_output_no_file_and_no_log() {
    let fake = FakeGitHub::start("TEXT");
    fake.add_issue(1, "an issue", true);
    fake.add_issue(2, "another issue", true);
    let mut c = fake_config(2);
    c["github"] =
        json!({ "owner": "octo", "repo": "widgets", "apiUrl": fake.url, "timeoutSecs": 2, "retryMaxSecs": 1 });
    c["project"] = json!({ "enabled": true, "projectNumber": 5, "organizationProject": true });
    c["llms"]["claude"]["apiKey"] = json!(API_KEY);
    c["llms"]["claude"]["env"] = json!({ "DB_PASSWORD": ENV_SECRET });
    let d = Daemon::start(&c);
    let secrets = [TOKEN, API_KEY, ENV_SECRET];

    // GitHub refuses the intake of issue 2 with the token in its message: the error reaches the user redacted.
    fake.lock().failing = Some(Failure::EchoAuthorization);
    let refused = d.try_ctl(&["assign", "2"]);
    assert!(!refused.status.success());
    let refusal = format!("{}{}", String::from_utf8_lossy(&refused.stdout), String::from_utf8_lossy(&refused.stderr));
    assert!(refusal.contains("[redacted]"), "the echo was expected in the refusal: {refusal}");
    let project = d.ctl(&["project", "status", "--json"]);
    fake.lock().failing = None;

    // The agent prints every secret it can see, on stdout and stderr, and as its progress message.
    d.assign(
        1,
        &[],
        &format!("@say env: GITHUB_TOKEN={TOKEN} key {API_KEY}\n@stderr db {ENV_SECRET}\n@say {TOKEN}\n@sleep 30"),
    );
    let row = d.wait_state("claude-1", "in_progress");
    common::wait_until("the preview to show the agent's lines", || {
        d.slot("claude-1")["console_preview"].as_array().is_some_and(|p| p.len() >= 2).then_some(())
    });
    let mut outputs = vec![
        refusal,
        project,
        d.ctl(&["status", "--json"]),
        d.ctl(&["status", "--preview"]),
        d.ctl(&["logs", "claude-1"]),
        d.ctl(&["logs", "--stderr", "claude-1"]),
        d.ctl(&["history", "--json"]),
    ];
    d.ctl(&["stop", "claude-1"]);
    outputs.push(d.ctl(&["status", "--json"]));
    outputs.push(d.ctl(&["history", "--json"]));
    // doctor asks GitHub itself, which echoes the header again; its checks may fail, its text must be clean.
    fake.lock().failing = Some(Failure::EchoAuthorization);
    let doctor = d
        .ctl_command(&["doctor", "--config", d.config_path.to_str().unwrap()])
        .env("GITHUB_TOKEN", TOKEN)
        .output()
        .unwrap();
    fake.lock().failing = None;
    let doctor = format!("{}{}", String::from_utf8_lossy(&doctor.stdout), String::from_utf8_lossy(&doctor.stderr));
    assert!(doctor.contains("[redacted]"), "doctor was expected to show the echo: {doctor}");
    outputs.push(doctor);
    outputs.push(d.daemon_log());
    // The raw log is the exception, on purpose: it is what the agent wrote.
    assert!(d.ctl(&["logs", "--raw", "claude-1"]).contains(API_KEY));
    for secret in secrets {
        for (i, out) in outputs.iter().enumerate() {
            assert!(!out.contains(secret), "output {i} shows {secret}:\n{out}");
        }
        for dir in [d.state_dir(), d.runtime_dir()] {
            assert_eq!(files_holding(&dir, secret), Vec::<String>::new(), "{secret} is in a file");
        }
        for (_, body) in fake.comments_on(1) {
            assert!(!body.contains(secret), "a status comment shows {secret}");
        }
    }
    let _ = row;
}
