//! autodevd under systemd (a fake NOTIFY_SOCKET), SIGHUP reload, `autodevctl doctor`, completions, unit files.

mod common;

use std::os::unix::net::UnixDatagram;

use common::fake_github::FakeGitHub;
use common::{Daemon, fake_config, wait_until};
use serde_json::{Value, json};

/// Collects notifications until `done` says enough.
fn collect(socket: &UnixDatagram, seen: &mut Vec<String>, what: &str, done: impl Fn(&[String]) -> bool) {
    let mut buf = [0u8; 4096];
    wait_until(what, || {
        while let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        done(seen).then_some(())
    });
}

#[test]
fn systemd_hears_ready_after_recovery_then_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_nonblocking(true).unwrap();
    // A task to recover: its run dies with the daemon.
    let mut d = Daemon::start(&fake_config(1));
    d.assign(9, &[], "@say before\n@sleep 60");
    let pid = wait_until("the run", || d.slot("claude-1")["pid"].as_i64());
    d.kill9();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("the run to die", || (!common::alive(pid)).then_some(()));
    d.extra_env = vec![("NOTIFY_SOCKET".into(), path.display().to_string()), ("WATCHDOG_USEC".into(), "200000".into())];
    d.process = Some(d.daemon_command().spawn().unwrap());
    let mut seen = Vec::new();
    collect(&socket, &mut seen, "READY=1", |s| s.iter().any(|m| m.contains("READY=1")));
    // Ready means recovered: the very first answer already knows the abandoned task.
    assert_eq!(d.slot("claude-1")["state"], "abandoned");
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=0 in progress, 1 abandoned, 2 free"), "{ready}");
    assert!(seen[0].contains("READY=1"), "nothing is said before READY=1: {seen:?}");
    d.ctl(&["release", "claude-1"]);
    collect(&socket, &mut seen, "three watchdog pings", |s| s.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3);
    d.assign(1, &[], "@say busy\n@sleep 30");
    collect(&socket, &mut seen, "a STATUS with the run", |s| {
        s.iter().any(|m| m.contains("STATUS=1 in progress, 2 free"))
    });
    assert!(d.terminate().success());
    collect(&socket, &mut seen, "STOPPING=1", |s| s.iter().any(|m| m.contains("STOPPING=1")));
    // The child's environment never carries NOTIFY_SOCKET.
    let row_env = std::fs::read_dir(&d.records).unwrap().flatten().find(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.starts_with("fake-record-") && name.ends_with(".json")
    });
    let record: Value = serde_json::from_slice(&std::fs::read(row_env.unwrap().path()).unwrap()).unwrap();
    assert!(record["env"].get("NOTIFY_SOCKET").is_none());
}

#[test]
fn without_systemd_nothing_is_said_about_it() {
    let mut d = Daemon::start(&fake_config(1));
    assert!(d.terminate().success());
    let log = d.daemon_log().to_lowercase();
    assert!(!log.contains("systemd") && !log.contains("notify"), "{log}");
}

#[test]
fn sighup_reloads_slot_counts_and_keeps_running_slots_and_refuses_a_broken_config() {
    let mut config = fake_config(2);
    config["llms"].as_object_mut().unwrap().retain(|k, _| k == "claude");
    let d = Daemon::start(&config);
    d.assign(1, &[], "@say one\n@sleep 30");
    d.assign(2, &[], "@say two\n@sleep 30");
    let hup = || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.pid() as i32), nix::sys::signal::Signal::SIGHUP).unwrap()
    };
    let names = |d: &Daemon| -> Vec<String> {
        d.status()["slots"].as_array().unwrap().iter().map(|s| s["slot"].as_str().unwrap().to_string()).collect()
    };
    // Lowered to 1: claude-2 runs on, and no new task gets a slot.
    config["llms"]["claude"]["maxConcurrentIssues"] = json!(1);
    std::fs::write(&d.config_path, config.to_string()).unwrap();
    hup();
    wait_until("the reload", || d.daemon_log().contains("SIGHUP: reloaded").then_some(()));
    assert_eq!(names(&d), ["claude-1", "claude-2"]);
    assert_eq!(d.slot("claude-2")["state"], "in_progress");
    let out = d.try_ctl(&["assign", "3", "--prompt", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("No available Claude instances (max: 1)"));
    // Raised to 3: a new slot at once.
    config["llms"]["claude"]["maxConcurrentIssues"] = json!(3);
    std::fs::write(&d.config_path, config.to_string()).unwrap();
    hup();
    wait_until("the second reload", || (d.daemon_log().matches("SIGHUP: reloaded").count() == 2).then_some(()));
    assert_eq!(names(&d), ["claude-1", "claude-2", "claude-3"]);
    assert_eq!(d.assign(3, &[], "@say three"), "claude-3");
    // Broken: refused with the reason, the running config stays.
    std::fs::write(&d.config_path, r#"{"llms":{"claude":{"maxConcurrentIssues":"lots"}}}"#).unwrap();
    hup();
    wait_until("the refusal", || d.daemon_log().contains("SIGHUP: the new config is refused").then_some(()));
    assert!(d.daemon_log().contains("llms.claude.maxConcurrentIssues"));
    assert_eq!(names(&d), ["claude-1", "claude-2", "claude-3"]);
}

fn doctor(d: &Daemon, token: &str) -> (Option<i32>, Vec<Value>, String) {
    let mut cmd = d.ctl_command(&["doctor", "--json", "--config", d.config_path.to_str().unwrap()]);
    cmd.env("GITHUB_TOKEN", token);
    let out = cmd.output().unwrap();
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut text_cmd = d.ctl_command(&["doctor", "--config", d.config_path.to_str().unwrap()]);
    text_cmd.env("GITHUB_TOKEN", token);
    let text = String::from_utf8_lossy(&text_cmd.output().unwrap().stdout).into_owned();
    (out.status.code(), checks, text)
}

fn check<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks.iter().find(|c| c["check"] == name).unwrap_or_else(|| panic!("no check {name} in {checks:?}"))
}

#[test]
fn doctor_names_what_is_missing_and_how_to_fix_it() {
    let fake = FakeGitHub::start("TEXT");
    let mut config = fake_config(1);
    config["llms"]["codex"]["cliPath"] = json!("/nonexistent/codex");
    // A gemini that is not gemini: its help lacks the flags autodev passes.
    config["llms"]["gemini"]["cliPath"] = json!(common::fixtures().join("bin/plain").display().to_string());
    config["github"] = json!({ "owner": "octo", "repo": "widgets", "apiUrl": fake.url, "timeoutSecs": 2 });
    config["project"] = json!({ "enabled": true, "projectNumber": 5, "organizationProject": true });
    let d = Daemon::start(&config);

    let (code, checks, text) = doctor(&d, "ghp_wrong");
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(check(&checks, "config")["ok"], true);
    assert_eq!(check(&checks, "state dir")["ok"], true);
    assert_eq!(check(&checks, "daemon")["ok"], true);
    let claude = check(&checks, "llm claude");
    assert_eq!(claude["ok"], true, "{claude}");
    assert!(claude["detail"].as_str().unwrap().contains("claude 9.9.9 (fake)"), "{claude}");
    let codex = check(&checks, "llm codex");
    assert_eq!(codex["ok"], false);
    assert!(codex["detail"].as_str().unwrap().contains("command not found"), "{codex}");
    assert!(codex["fix"].as_str().unwrap().contains("llms.codex.cliPath"), "{codex}");
    let gemini = check(&checks, "llm gemini");
    assert_eq!(gemini["ok"], false);
    assert!(gemini["detail"].as_str().unwrap().contains("does not mention --output-format"), "{gemini}");
    assert_eq!(check(&checks, "github token")["detail"], "from $GITHUB_TOKEN");
    let github = check(&checks, "github");
    assert!(github["detail"].as_str().unwrap().contains("refused the token"), "{github}");
    assert!(!text.contains("ghp_wrong"), "the token must never be shown: {text}");
    assert!(text.contains("✗ llm codex") && text.contains("  → install it, or set llms.codex.cliPath"), "{text}");

    let (_, checks, _) = doctor(&d, common::fake_github::TOKEN);
    assert!(check(&checks, "github scopes")["detail"].as_str().unwrap().contains("repo, project"));
    assert_eq!(check(&checks, "project")["detail"], "#5 \"Widgets board\"");
    let fields: Vec<&Value> = checks.iter().filter(|c| c["check"] == "project field").collect();
    assert_eq!(fields.len(), 2);
    assert!(fields.iter().all(|f| f["ok"] == true), "{fields:?}");
}

#[test]
fn completions_cover_the_commands() {
    let d = Daemon::start(&fake_config(1));
    let bash = d.ctl(&["completions", "bash"]);
    for word in ["autodevctl", "assign", "resume", "workspaces", "doctor"] {
        assert!(bash.contains(word), "{word} missing from the completions");
    }
}

#[test]
fn systemd_accepts_the_unit_files() {
    let analyze = std::path::Path::new("/usr/bin/systemd-analyze");
    assert!(analyze.exists(), "systemd-analyze is needed (.ci/run installs the systemd package)");
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_autodevd");
    for (unit, exec) in [
        ("systemd/autodevd.service", "%h/.cargo/bin/autodevd"),
        ("systemd/system/autodevd.service", "/usr/local/bin/autodevd"),
    ] {
        let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(unit)).unwrap();
        assert!(text.contains(&format!("ExecStart={exec}")), "{unit}");
        // verify checks that ExecStart exists: point it at the binary just built.
        let copy = dir.path().join("autodevd.service");
        std::fs::write(&copy, text.replace(exec, bin)).unwrap();
        let out = std::process::Command::new(analyze).arg("verify").arg(&copy).output().unwrap();
        assert!(out.status.success(), "{unit}: {}", String::from_utf8_lossy(&out.stderr));
        let directives: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
        for needed in
            ["Type=notify", "KillMode=process", "Delegate=yes", "UMask=0077", "WatchdogSec=60", "Restart=on-failure"]
        {
            assert!(directives.contains(&needed), "{unit} lacks {needed}");
        }
        assert!(
            !directives.iter().any(|d| d.starts_with("MemoryDenyWriteExecute") || d.starts_with("ProtectHome=yes")),
            "{unit}: that hardening breaks Node-based CLIs"
        );
    }
}

#[test]
fn doctor_flags_settings_that_fail_every_run_and_needs_no_token_without_github() {
    let mut config = fake_config(1);
    config["llms"]["claude"]["cliArgs"] = json!(["--permission-mode", "bypassPermissions"]);
    config["llms"]["gemini"]["cliArgs"] = json!(["--approval-mode", "yolo"]);
    config["llms"]["codex"]["cliArgs"] = json!(["-s", "workspace-write"]);
    let d = Daemon::start(&config);
    // No token, and nothing in the config asks for GitHub: that is not a fault.
    let mut cmd = d.ctl_command(&["doctor", "--json", "--config", d.config_path.to_str().unwrap()]);
    cmd.env_remove("GITHUB_TOKEN").env_remove("GH_TOKEN").env("HOME", d.dir.path());
    let out = cmd.output().unwrap();
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let github = check(&checks, "github");
    assert_eq!(github["ok"], true, "{github}");
    assert!(github["detail"].as_str().unwrap().contains("off"), "{github}");
    let flags = |name: &str| checks.iter().find(|c| c["check"] == format!("llm {name} flags")).cloned();
    let gemini = flags("gemini").expect("gemini without --skip-trust is flagged");
    assert!(gemini["detail"].as_str().unwrap().contains("exits 55"), "{gemini}");
    let codex = flags("codex").expect("codex outside git without --skip-git-repo-check is flagged");
    assert!(codex["fix"].as_str().unwrap().contains("--skip-git-repo-check"), "{codex}");
    if nix::unistd::geteuid().is_root() {
        let claude = flags("claude").expect("bypassPermissions as root without IS_SANDBOX is flagged");
        assert!(claude["fix"].as_str().unwrap().contains("IS_SANDBOX"), "{claude}");
    }
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn doctor_flags_a_git_workspace_without_an_identity_and_a_token_that_may_not_push() {
    let fake = FakeGitHub::start("TEXT");
    fake.lock().can_push = false;
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let init = std::process::Command::new("git").arg("-C").arg(&repo).args(["init", "-q"]).output().unwrap();
    assert!(init.status.success());
    let mut config = fake_config(1);
    config["github"] = json!({ "owner": "octo", "repo": "widgets", "apiUrl": fake.url, "timeoutSecs": 2 });
    let d = Daemon::start_in(&config, Some(&repo));
    let mut cmd = d.ctl_command(&["doctor", "--json", "--config", d.config_path.to_str().unwrap()]);
    // No global git config: the repository has no identity at all.
    cmd.env("HOME", home.path()).env("XDG_CONFIG_HOME", home.path()).env("GIT_CONFIG_NOSYSTEM", "1");
    cmd.env("GITHUB_TOKEN", common::fake_github::TOKEN).current_dir(&repo);
    let out = cmd.output().unwrap();
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let identity = check(&checks, "git identity");
    assert_eq!(identity["ok"], false, "{identity}");
    assert!(identity["fix"].as_str().unwrap().contains("git config --global user.email"), "{identity}");
    let pulls = check(&checks, "pull requests");
    assert_eq!(pulls["ok"], false, "{pulls}");
    assert!(pulls["fix"].as_str().unwrap().contains("pull requests write"), "{pulls}");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn doctor_refuses_an_autopilot_whose_failed_tasks_would_go_back_to_ready() {
    let mut config = fake_config(1);
    config["project"] = json!({ "enabled": true, "projectNumber": 5,
                                "fields": { "status": { "readyValues": ["Ready"] } } });
    config["autopilot"] = json!({ "enabled": true });
    let d = Daemon::start(&config);
    let mut cmd = d.ctl_command(&["doctor", "--json", "--config", d.config_path.to_str().unwrap()]);
    cmd.env_remove("GITHUB_TOKEN").env_remove("GH_TOKEN").env("HOME", d.dir.path());
    let checks: Vec<Value> = serde_json::from_slice(&cmd.output().unwrap().stdout).unwrap();
    let autopilot = check(&checks, "autopilot");
    assert_eq!(autopilot["ok"], false, "{autopilot}");
    assert!(autopilot["detail"].as_str().unwrap().contains("blockedValue"), "{autopilot}");
}
