//! From a completed run to a pull request, end to end: real git repositories with a bare `origin` on disk, the fake
//! GitHub on 127.0.0.1. The branch is pushed, one pull request is opened (or updated) across restarts and outages,
//! the board moves to review, and every reason a task's work does not reach review is shown.

mod common;

use std::path::Path;

use common::fake_github::{Failure, FakeGitHub};
use common::git::{git, repo_with_origin};
use common::{Daemon, wait_until};
use serde_json::{Value, json};

fn config(fake: &FakeGitHub) -> Value {
    fake.board_config(2)
}

fn set_body(fake: &FakeGitHub, issue: u64, body: &str) {
    fake.lock().issues.get_mut(&issue).unwrap().body = body.into();
}

fn wait_status(fake: &FakeGitHub, issue: u64, status: &str) {
    wait_until(&format!("issue #{issue} to show {status}"), || {
        (fake.value(issue, "Status").as_deref() == Some(status)).then_some(())
    });
}

/// The row of `slot` once its pull request is known (opened, or given up with a note).
fn wait_pr(d: &Daemon, slot: &str) -> Value {
    wait_until(&format!("the pull request of {slot}"), || {
        let row = d.slot(slot);
        // The URL comes only with GitHub's answer (an owed pull request may already know its number).
        row["pr"]["url"].is_string().then_some(row)
    })
}

fn remote_branch(origin: &Path, branch: &str) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(origin)
        .args(["rev-parse", "--verify", "--quiet", &format!("refs/heads/{branch}")])
        .output()
        .unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn a_completed_task_is_pushed_and_gets_one_pull_request_across_outages_restarts_and_reruns() {
    let (top, repo) = repo_with_origin(true);
    let origin = top.path().join("origin.git");
    let fake = FakeGitHub::start("TEXT");
    fake.add_issue(12, "Fix the login bug", true);
    set_body(&fake, 12, "Users cannot log in.\n@write fix.txt fixed\n@say Fixed the login check and added a test.");
    let mut d = Daemon::start_in(&config(&fake), Some(&repo));
    d.ctl(&["assign", "12", "--slot", "claude-1"]);
    wait_status(&fake, 12, "In Progress");
    // GitHub goes down before the run ends: the push happens, the pull request waits in the outbox.
    fake.lock().failing = Some(Failure::Status(502));
    let row = d.wait_state("claude-1", "completed");
    let branch = row["branch"].as_str().unwrap().to_string();
    let local = git(&repo, &["rev-parse", &branch]);
    assert_eq!(remote_branch(&origin, &branch).as_deref(), Some(local.as_str()), "the branch reached origin");
    wait_until("the outage to show on the task", || {
        let row = d.slot("claude-1");
        row["pr"]["note"].as_str().is_some_and(|n| n.contains("owed") && n.contains("502")).then_some(())
    });
    assert!(fake.pulls().is_empty());
    assert_eq!(fake.value(12, "Status").as_deref(), Some("In Progress"), "review only once a pull request exists");

    // A crash while the pull request is owed, then GitHub is back: it is opened, once.
    d.kill9();
    fake.lock().failing = None;
    d.launch();
    let row = wait_pr(&d, "claude-1");
    let pulls = fake.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    let (number, pull) = &pulls[0];
    assert_eq!(row["pr"]["number"], json!(number));
    assert_eq!(row["pr"]["url"], json!(format!("https://github.com/octo/widgets/pull/{number}")));
    assert_eq!((pull.head.as_str(), pull.base.as_str(), pull.draft), (branch.as_str(), "main", true));
    assert_eq!(pull.title, "Fix the login bug");
    assert!(pull.body.contains("Closes #12"), "{}", pull.body);
    assert!(pull.body.contains("> Fixed the login check and added a test."), "{}", pull.body);
    assert!(pull.body.contains("1 run(s)"), "{}", pull.body);
    wait_status(&fake, 12, "In Review");
    assert_eq!(fake.value(12, "Assigned Instance"), None);
    assert_eq!(row["commits"], json!(1), "{row}");

    // A person writes in the pull request; the issue is taken up again: the same pull request is updated, the
    // person's words stay, and no second one opens.
    let edited = format!("Reviewer notes: check the mobile login.\n\n{}", pull.body);
    fake.lock().pulls.get_mut(number).unwrap().body = edited;
    set_body(&fake, 12, "Users cannot log in.\n@write more.txt more\n@say Also covered the mobile login.");
    d.ctl(&["assign", "12", "--slot", "claude-1"]);
    wait_until("the pull request to be updated", || {
        let body = fake.lock().pulls[number].body.clone();
        body.contains("Also covered the mobile login.").then_some(())
    });
    let pulls = fake.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    let body = &pulls[0].1.body;
    assert!(body.starts_with("Reviewer notes: check the mobile login."), "{body}");
    assert_eq!(body.matches("Closes #12").count(), 1, "{body}");
    assert!(!body.contains("Fixed the login check"), "the section was replaced, not appended: {body}");
    assert_eq!(remote_branch(&origin, &branch), Some(git(&repo, &["rev-parse", &branch])));
    let creates = fake.operations().iter().filter(|o| *o == "POST /repos/octo/widgets/pulls").count();
    assert_eq!(creates, 1, "{:?}", fake.operations());
}

#[test]
fn a_rejected_push_and_a_secret_on_the_branch_are_the_reason_and_nothing_goes_up_for_review() {
    let (top, repo) = repo_with_origin(true);
    let fake = FakeGitHub::start("TEXT");
    fake.add_issue(20, "Refused", true);
    fake.add_issue(21, "Leaky", true);
    let hook = top.path().join("origin.git/hooks/pre-receive");
    std::fs::write(&hook, "#!/bin/sh\necho 'protected: ask the maintainers' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    set_body(&fake, 20, "@write a.txt a");
    // The agent commits the token itself: the diff is checked before anything leaves the machine.
    set_body(&fake, 21, "@write conf.txt token=ghp_daemon_secret\n@commit add conf");
    let d = Daemon::start_in(&config(&fake), Some(&repo));
    d.ctl(&["assign", "20", "--slot", "claude-1"]);
    d.ctl(&["assign", "21", "--slot", "claude-2"]);
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["end_cause"], "push_failed", "{row}");
    let reason = row["reason"].as_str().unwrap();
    assert!(reason.contains("remote rejected") && reason.contains("never forced"), "{reason}");
    assert!(reason.contains("the work is committed on the local branch"), "{reason}");
    let row = d.wait_state("claude-2", "failed");
    assert_eq!(row["end_cause"], "push_failed", "{row}");
    let reason = row["reason"].as_str().unwrap();
    assert!(reason.contains("adds a secret value") && reason.contains("conf.txt"), "{reason}");
    wait_status(&fake, 20, "Blocked");
    wait_status(&fake, 21, "Blocked");
    assert!(fake.pulls().is_empty());
    assert!(remote_branch(&top.path().join("origin.git"), row["branch"].as_str().unwrap()).is_none());
    assert!(!d.daemon_log().contains("ghp_daemon_secret"));
}

#[test]
fn a_refused_draft_opens_a_ready_pull_request_and_a_prompt_task_closes_no_issue() {
    let (_top, repo) = repo_with_origin(true);
    let fake = FakeGitHub::start("TEXT");
    fake.lock().refuse_drafts = true;
    let d = Daemon::start_in(&config(&fake), Some(&repo));
    d.assign(40, &["--slot", "claude-1"], "Tidy the docs\n@write docs.txt tidy");
    d.wait_state("claude-1", "completed");
    let row = wait_pr(&d, "claude-1");
    assert!(row["pr"]["note"].as_str().unwrap().contains("refused a draft"), "{row}");
    let pulls = fake.pulls();
    assert_eq!(pulls.len(), 1);
    let pull = &pulls[0].1;
    assert!(!pull.draft);
    assert_eq!(pull.title, "Tidy the docs");
    assert!(!pull.body.contains("Closes"), "a --prompt task closes no issue: {}", pull.body);
}

#[test]
fn a_task_that_changes_nothing_is_blocked_and_says_so_on_its_issue() {
    let (_top, repo) = repo_with_origin(true);
    let fake = FakeGitHub::start("TEXT");
    fake.add_issue(50, "Look into the flaky test", true);
    set_body(&fake, 50, "@say The test passes 200 times in a row here; I changed nothing.");
    let mut c = config(&fake);
    c["statusComments"] = json!({ "enabled": true, "intervalSecs": 1 });
    let d = Daemon::start_in(&c, Some(&repo));
    d.ctl(&["assign", "50", "--slot", "claude-1"]);
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["end_cause"], "no_changes", "{row}");
    let reason = row["reason"].as_str().unwrap();
    assert!(
        reason.contains("the agent said: \"The test passes 200 times in a row here; I changed nothing.\""),
        "{reason}"
    );
    wait_status(&fake, 50, "Blocked");
    wait_until("the issue to say that nothing changed", || {
        fake.comments_on(50)
            .iter()
            .any(|(_, b)| b.lines().any(|l| l.contains("no changes were produced") && l.contains("I changed nothing")))
            .then_some(())
    });
    assert!(fake.pulls().is_empty());
}

#[test]
fn the_pull_request_the_agent_reported_is_the_one_updated() {
    let (_top, repo) = repo_with_origin(true);
    let fake = FakeGitHub::start("TEXT");
    fake.add_issue(70, "Agent PR", true);
    let number = fake.open_pull("autodev/issue-70-agent-pr", "Opened by the agent itself.");
    set_body(&fake, 70, &format!("@write a.txt a\n@say Opened it.\n@say AUTONOMOUS_SIGNAL:PR:{number}\n@say Done."));
    let d = Daemon::start_in(&config(&fake), Some(&repo));
    d.ctl(&["assign", "70", "--slot", "claude-1"]);
    let row = wait_pr(&d, "claude-1");
    assert_eq!(row["branch"], "autodev/issue-70-agent-pr");
    assert_eq!(row["pr"]["number"], json!(number), "{row}");
    let pulls = fake.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    let body = &pulls[0].1.body;
    assert!(body.starts_with("Opened by the agent itself.") && body.contains("Closes #70"), "{body}");
    let ops = fake.operations();
    assert!(ops.contains(&format!("GET /repos/octo/widgets/pulls/{number}")), "{ops:?}");
    assert!(!ops.iter().any(|o| o.contains("pulls?")), "the reported number needs no search: {ops:?}");
    let preview = d.ctl(&["status", "--preview"]);
    assert!(
        preview.contains(&format!("⇄ pull request #{number} https://github.com/octo/widgets/pull/{number}")),
        "{preview}"
    );
}

#[test]
fn git_gets_the_token_from_autodevctl_as_its_askpass_and_only_from_that_environment() {
    let fill = |token: Option<&str>, host: &str| {
        let home = tempfile::tempdir().unwrap();
        let mut git = std::process::Command::new("git");
        git.args(["credential", "fill"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap())
            .env("HOME", home.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", env!("CARGO_BIN_EXE_autodevctl"))
            .env("AUTODEV_ASKPASS_HOST", "github.com")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(token) = token {
            git.env("AUTODEV_ASKPASS_TOKEN", token);
        }
        let mut child = git.spawn().unwrap();
        use std::io::Write;
        let request = format!("protocol=https\nhost={host}\npath=octo/widgets.git\n\n");
        child.stdin.take().unwrap().write_all(request.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, out) = fill(Some("ghp_from_the_daemon"), "github.com");
    assert!(ok, "{out}");
    assert!(out.contains("username=x-access-token\n") && out.contains("password=ghp_from_the_daemon\n"), "{out}");
    // Without the variable autodevctl is no askpass: git gets no password.
    let (ok, out) = fill(None, "github.com");
    assert!(!ok || !out.contains("password="), "{out}");
    // A remote rewritten to another host (insteadOf, an edited URL) never gets the token.
    let (ok, out) = fill(Some("ghp_from_the_daemon"), "evil.example");
    assert!(!ok || !out.contains("ghp_from_the_daemon"), "{out}");
}
