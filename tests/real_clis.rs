//! The real Claude Code, Gemini CLI and Codex CLI through autodevd, offline: each talks to a fake model server on
//! 127.0.0.1 (`tests/fixtures/fake-llm/`, from the shared tools) that makes it run its shell tool to write a file in
//! its worktree. autodevd commits what the agent left, pushes the task's branch to a bare `origin` on disk and opens
//! the pull request on the fake GitHub.
//!
//! The CLIs come from the npm registry, pinned to the versions measured in the reference, into a cache under
//! Cargo's target dir (installed once, then reused). Without npm the test says SKIPPED and passes.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_github::FakeGitHub;
use common::git::{git, repo_with_origin};
use common::{Daemon, fake_config};
use serde_json::{Value, json};

const PACKAGES: [&str; 3] = ["@anthropic-ai/claude-code@2.1.328", "@google/gemini-cli@0.61.0", "@openai/codex@0.169.0"];
/// Real CLIs start Node, read their config and wait on the network they cannot reach: slower than the fakes.
const DEADLINE: Duration = Duration::from_secs(180);

/// The npm cache of the pinned CLIs: their `node_modules/.bin`, or why they cannot be had.
fn install_clis() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("real-clis");
    let bin = dir.join("node_modules/.bin");
    let stamp = dir.join("installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == PACKAGES.join(" ")) {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let out = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
        .arg(&dir)
        .args(PACKAGES)
        .output()
        .map_err(|e| format!("npm is not available ({e})"))?;
    if !out.status.success() {
        return Err(format!("npm install failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    std::fs::write(&stamp, PACKAGES.join(" ")).map_err(|e| e.to_string())?;
    Ok(bin)
}

/// A fake model server; killed when dropped.
struct ModelServer {
    child: Child,
    url: String,
}

impl ModelServer {
    fn start(script: &str, log: &Path) -> ModelServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("python3")
            .arg(common::fixtures().join("fake-llm").join(script))
            .arg(port.to_string())
            .env("FAKE_LLM_LOG", log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "{script} did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        ModelServer { child, url }
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn real_clis_edit_and_autodevd_commits_pushes_and_opens_their_pull_requests() {
    let bin = match install_clis() {
        Ok(bin) => bin,
        Err(why) => {
            eprintln!("SKIPPED: the real CLIs are not available: {why}");
            return;
        }
    };
    let (top, repo) = repo_with_origin(true);
    let homes = top.path().join("homes");
    let logs = top.path().join("model-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let anthropic = ModelServer::start("anthropic.py", &logs.join("anthropic.log"));
    let gemini = ModelServer::start("gemini.py", &logs.join("gemini.log"));
    let openai = ModelServer::start("openai.py", &logs.join("openai.log"));

    // Each CLI pointed at its fake (llm-clis.md, "Under autodevd"), with its own retries off so a failure is fast.
    let claude_home = homes.join("claude");
    let gemini_home = homes.join("gemini");
    let codex_home = homes.join("codex");
    std::fs::create_dir_all(gemini_home.join(".gemini")).unwrap();
    std::fs::create_dir_all(&claude_home).unwrap();
    std::fs::create_dir_all(&codex_home).unwrap();
    std::fs::write(
        gemini_home.join(".gemini/settings.json"),
        json!({ "security": { "auth": { "selectedType": "gemini-api-key" } }, "general": { "maxAttempts": 1 },
                "privacy": { "usageStatisticsEnabled": false } })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        codex_home.join("config.toml"),
        format!(
            "model_provider = \"fake\"\n[model_providers.fake]\nname = \"fake\"\nbase_url = \"{}/v1\"\n\
             env_key = \"CODEX_API_KEY\"\nwire_api = \"responses\"\nrequest_max_retries = 0\nstream_max_retries = 0\n",
            openai.url
        ),
    )
    .unwrap();
    let fake = FakeGitHub::start("TEXT");
    let mut config = fake_config(1);
    let path = |name: &str| bin.join(name).display().to_string();
    config["llms"]["claude"]["cliPath"] = json!(path("claude"));
    config["llms"]["claude"]["env"] = json!({
        "ANTHROPIC_BASE_URL": anthropic.url, "ANTHROPIC_API_KEY": "sk-ant-fake", "CLAUDE_CONFIG_DIR": claude_home,
        "CLAUDE_CODE_MAX_RETRIES": "0", "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1" });
    config["llms"]["gemini"]["cliPath"] = json!(path("gemini"));
    config["llms"]["gemini"]["env"] =
        json!({ "GOOGLE_GEMINI_BASE_URL": gemini.url, "GEMINI_API_KEY": "fake-key", "GEMINI_CLI_HOME": gemini_home });
    config["llms"]["codex"]["cliPath"] = json!(path("codex"));
    config["llms"]["codex"]["env"] = json!({ "CODEX_HOME": codex_home, "CODEX_API_KEY": "fake-key" });
    // codex sends its tools only for a model it knows; its default one gets none from a custom provider.
    config["llms"]["codex"]["model"] = json!("gpt-5-codex");
    config["github"] = json!({ "owner": "octo", "repo": "widgets", "apiUrl": fake.url, "timeoutSecs": 5,
                               "retryMaxSecs": 1 });
    config["statusComments"] = json!({ "enabled": false });
    let d = Daemon::start_in(&config, Some(&repo));

    let issues = [(61, "claude"), (62, "gemini"), (63, "codex")];
    for (issue, llm) in issues {
        fake.add_issue(issue, &format!("Write the marker with {llm}"), false);
        fake.lock().issues.get_mut(&issue).unwrap().body = "Create marker.txt with your shell tool. USETOOL".into();
        d.ctl(&["assign", &issue.to_string(), "--llm", llm]);
    }
    let origin = top.path().join("origin.git");
    for (issue, llm) in issues {
        let slot = format!("{llm}-1");
        let row: Value = wait_for(&format!("{slot} to end"), || {
            let row = d.slot(&slot);
            matches!(row["state"].as_str(), Some("completed" | "failed")).then_some(row)
        });
        let run = row["run_id"].as_str().unwrap();
        let preview = row["console_preview"].to_string();
        assert_eq!(row["state"], "completed", "{llm}: {row}\nlog: {}", d.ctl(&["logs", &slot, "--raw"]));
        assert!(row["session_id"].is_string(), "{llm}: the session id was captured: {row}");
        assert!(!preview.contains("\"type\""), "{llm}: the preview shows events, not JSON: {preview}");
        let branch = row["branch"].as_str().unwrap();
        assert_eq!(git(&repo, &["show", &format!("{branch}:marker.txt")]), "tool-ran", "{llm}: {row}");
        assert!(
            git(&repo, &["log", "--format=%s", branch]).contains(&format!("autodev: #{issue}")),
            "{llm}: the leftover commit names the issue (run {run})"
        );
        assert_eq!(
            git(&origin, &["rev-parse", branch]),
            git(&repo, &["rev-parse", branch]),
            "{llm}: the branch reached origin"
        );
        let row = wait_for(&format!("the pull request of {slot}"), || {
            let row = d.slot(&slot);
            row["pr"]["number"].is_u64().then_some(row)
        });
        let number = row["pr"]["number"].as_u64().unwrap();
        let pull = fake.lock().pulls[&number].clone();
        assert_eq!(pull.head, branch, "{llm}");
        assert!(pull.body.contains(&format!("Closes #{issue}")), "{llm}: {}", pull.body);
    }
    assert_eq!(fake.pulls().len(), 3);
}
