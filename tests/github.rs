//! GitHub end to end against a stateful fake on 127.0.0.1: issue intake, the board's Status and Assigned Instance
//! through every transition (TEXT and SINGLE_SELECT), conflicts, failures for a while, restarts, request counts.

mod common;

use std::time::Duration;

use common::fake_github::{Failure, FakeGitHub, TOKEN};
use common::{Daemon, fake_config, wait_until};
use serde_json::{Value, json};

fn config(fake: &FakeGitHub) -> Value {
    let mut c = fake_config(3);
    c["github"] = json!({ "owner": "octo", "repo": "widgets", "apiUrl": fake.url, "timeoutSecs": 2, "retryMaxSecs": 2,
                          "excludeLabels": ["wontfix"] });
    // The board's own requests are counted here; status comments have their own tests.
    c["statusComments"] = json!({ "enabled": false });
    c["project"] = json!({
        "enabled": true, "projectNumber": 5, "organizationProject": true,
        "fields": {
            "status": { "fieldName": "Status", "readyValues": ["Ready", "Todo"], "inProgressValue": "In Progress",
                        "reviewValue": "In Review", "doneValue": "Done", "blockedValue": "Blocked" },
            "assignedInstance": { "fieldName": "Assigned Instance" }
        }
    });
    c
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn wait_board(fake: &FakeGitHub, issue: u64, status: &str, assigned: Option<&str>) {
    wait_until(&format!("issue #{issue} to show {status}/{assigned:?}"), || {
        (fake.value(issue, "Status").as_deref() == Some(status)
            && fake.value(issue, "Assigned Instance").as_deref() == assigned)
            .then_some(())
    });
}

fn set_body(fake: &FakeGitHub, issue: u64, body: &str) {
    fake.lock().issues.get_mut(&issue).unwrap().body = body.into();
}

fn project_status(d: &Daemon) -> Value {
    serde_json::from_str(&d.ctl(&["project", "status", "--json"])).unwrap()
}

#[test]
fn an_issue_becomes_the_prompt_and_the_board_follows_its_life_in_four_requests() {
    let fake = FakeGitHub::start("TEXT");
    fake.add_issue(12, "Fix the login bug", true);
    fake.add_issue(13, "Add a logout button", true);
    set_body(&fake, 12, "Users cannot log in.\n@say on it\n@sleep 1");
    let d = Daemon::start(&config(&fake));
    d.ctl(&["assign", "12"]);
    let row = d.slot("claude-1");
    let prompt = d.record(row["run_id"].as_str().unwrap())["prompt"].as_str().unwrap().to_string();
    assert!(prompt.contains("#12: Fix the login bug") && prompt.contains("Users cannot log in."), "{prompt}");
    assert!(prompt.contains("https://github.com/octo/widgets/issues/12"), "{prompt}");
    wait_board(&fake, 12, "In Progress", Some("claude-1"));
    d.wait_state("claude-1", "completed");
    wait_board(&fake, 12, "Done", None);

    // Warm cache: a whole lifecycle of another issue.
    let before = fake.operations().len();
    set_body(&fake, 13, "@say quick");
    d.ctl(&["assign", "13"]);
    d.wait_state("claude-1", "completed");
    wait_board(&fake, 13, "Done", None);
    let ops: Vec<String> = fake.operations()[before..].to_vec();
    assert_eq!(ops, ["IssueItem", "SetFields", "IssueItem", "Finish"], "requests of one lifecycle");
    let report = project_status(&d);
    assert_eq!(report["pending"], json!([]));
    assert!(!d.daemon_log().contains(TOKEN), "the token reached the log");
    assert!(!d.ctl(&["status", "--json"]).contains(TOKEN) && !report.to_string().contains(TOKEN));
}

#[test]
fn single_select_field_failure_release_and_missing_option() {
    let fake = FakeGitHub::start("SINGLE_SELECT");
    for n in [20, 21, 22] {
        fake.add_issue(n, &format!("Issue {n}"), n != 22);
    }
    set_body(&fake, 20, "@fail\n@exit 1");
    let mut d = Daemon::start(&config(&fake));
    d.ctl(&["assign", "20"]);
    d.wait_state("claude-1", "failed");
    wait_board(&fake, 20, "Blocked", None);

    // Release of an abandoned task clears the field and blocks the issue; an abandoned task changes nothing.
    set_body(&fake, 21, "@say long\n@sleep 60");
    d.ctl(&["assign", "21", "--slot", "claude-2"]);
    wait_board(&fake, 21, "In Progress", Some("claude-2"));
    let pid = wait_until("the run", || d.slot("claude-2")["pid"].as_i64());
    d.kill9();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    wait_until("the child to die", || (!common::alive(pid)).then_some(()));
    d.launch();
    assert_eq!(d.slot("claude-2")["state"], "abandoned");
    assert_eq!(fake.value(21, "Assigned Instance").as_deref(), Some("claude-2"), "abandoned: the board keeps it");
    d.ctl(&["release", "claude-2"]);
    wait_board(&fake, 21, "Blocked", None);

    // An issue not on the board is added; a slot with no option on a SINGLE_SELECT field is a clear error.
    d.ctl(&["assign", "22", "--slot", "claude-3"]);
    d.wait_state("claude-3", "completed");
    let report = wait_until("the missing-option error", || {
        let r = project_status(&d);
        r["last_error"].as_str().is_some_and(|e| e.contains("no option \"claude-3\"")).then_some(r)
    });
    let e = report["last_error"].as_str().unwrap();
    assert!(e.contains("\"claude-1\", \"claude-2\""), "names the options that exist: {e}");
    assert!(fake.lock().items.iter().any(|i| i.issue == 22), "the issue was added to the project");
}

#[test]
fn an_instance_set_by_someone_else_is_never_overwritten() {
    let fake = FakeGitHub::start("TEXT");
    fake.add_issue(30, "Contested", true);
    fake.set_value(30, "Assigned Instance", "gemini-7");
    set_body(&fake, 30, "@say mine now\n@sleep 1");
    let d = Daemon::start(&config(&fake));
    let out = d.try_ctl(&["assign", "30"]);
    assert!(
        stderr_of(&out).contains("issue #30 is assigned to \"gemini-7\" on the project board"),
        "{}",
        stderr_of(&out)
    );
    assert!(stderr_of(&out).contains("--force"), "{}", stderr_of(&out));
    assert_eq!(d.slot("claude-1")["state"], "ready", "no slot was taken");
    d.ctl(&["assign", "30", "--force"]);
    wait_board(&fake, 30, "In Progress", Some("claude-1"));
    // Someone changes it while the agent works: at the end neither field is touched.
    fake.set_value(30, "Assigned Instance", "human");
    d.wait_state("claude-1", "completed");
    let report = wait_until("the reconciler to give up on #30", || {
        let r = project_status(&d);
        r["pending"].as_array()?.is_empty().then_some(r)
    });
    assert!(report["last_error"].as_str().unwrap().contains("now says \"human\""), "{report}");
    assert_eq!(fake.value(30, "Assigned Instance").as_deref(), Some("human"));
    assert_eq!(fake.value(30, "Status").as_deref(), Some("In Progress"));
}

#[test]
fn intake_refuses_before_any_slot_is_taken() {
    let fake = FakeGitHub::start("TEXT");
    fake.add_issue(40, "Closed one", true);
    fake.lock().issues.get_mut(&40).unwrap().open = false;
    fake.add_issue(41, "Not wanted", true);
    fake.lock().issues.get_mut(&41).unwrap().labels = vec!["wontfix".into()];
    let d = Daemon::start(&config(&fake));
    for (issue, needle) in [
        ("99", "cannot fetch issue #99 of octo/widgets: not found on GitHub"),
        ("40", "issue #40 is closed"),
        ("41", "issue #41 has the label \"wontfix\""),
    ] {
        let out = d.try_ctl(&["assign", issue]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr_of(&out).contains(needle), "{issue}: {}", stderr_of(&out));
    }
    assert!(d.status()["slots"].as_array().unwrap().iter().all(|s| s["state"] == "ready"));
}

#[test]
fn github_trouble_never_delays_supervision_and_the_board_converges() {
    let fake = FakeGitHub::start("TEXT");
    fake.add_issue(50, "Stormy", true);
    let d = Daemon::start(&config(&fake));
    d.ctl(&["project", "status"]); // warm the board cache while GitHub answers
    fake.lock().failing = Some(Failure::Status(502));
    // With a prompt, an unreachable GitHub does not stop the work.
    d.assign(50, &[], "@say working anyway");
    d.wait_state("claude-1", "completed");
    for (failure, needle) in [
        (Failure::Status(502), "HTTP 502"),
        (Failure::Hang(Duration::from_secs(4)), "unavailable"),
        (Failure::RateLimited, "rate limit reached"),
        (Failure::Secondary, "secondary rate limit"),
        (Failure::Unauthorized, "refused the token"),
        (Failure::InsufficientScopes, "lacks a scope"),
    ] {
        fake.lock().failing = Some(failure);
        wait_until(&format!("an error saying {needle}"), || {
            let r = project_status(&d);
            r["last_error"].as_str().is_some_and(|e| e.contains(needle)).then_some(())
        });
        assert_eq!(d.slot("claude-1")["state"], "completed", "supervision goes on");
    }
    let mutations_before =
        fake.operations().iter().filter(|o| ["SetFields", "Finish", "SetStatus"].contains(&o.as_str())).count();
    fake.lock().failing = None;
    wait_board(&fake, 50, "Done", None);
    wait_until("nothing pending", || project_status(&d)["pending"].as_array()?.is_empty().then_some(()));
    let applied =
        fake.operations().iter().filter(|o| ["SetFields", "Finish", "SetStatus"].contains(&o.as_str())).count()
            - mutations_before;
    assert_eq!(applied, 1, "one mutation once GitHub is back: the wishes were coalesced, none sent twice");
}

#[test]
fn a_restart_in_the_middle_loses_nothing_and_sends_nothing_twice() {
    let fake = FakeGitHub::start("TEXT");
    fake.add_issue(60, "Interrupted sync", true);
    let mut d = Daemon::start(&config(&fake));
    fake.lock().failing = Some(Failure::Status(502));
    d.assign(60, &[], "@say done before GitHub is back");
    d.wait_state("claude-1", "completed");
    wait_until("the owed update to be on disk", || {
        std::fs::read_to_string(d.state_dir().join("github-sync.json")).ok()?.contains("\"completed\"").then_some(())
    });
    d.kill9();
    fake.lock().failing = None;
    d.launch();
    wait_board(&fake, 60, "Done", None);
    wait_until("nothing pending", || project_status(&d)["pending"].as_array()?.is_empty().then_some(()));
    let count = |fake: &FakeGitHub| {
        fake.operations().iter().filter(|o| ["SetFields", "Finish", "SetStatus"].contains(&o.as_str())).count()
    };
    let applied = count(&fake);
    d.terminate();
    d.launch();
    assert_eq!(project_status(&d)["pending"], json!([]), "nothing is owed after a restart");
    assert_eq!(count(&fake), applied, "nothing was sent twice");
}

#[test]
fn project_status_shows_fields_scopes_and_what_is_missing() {
    let fake = FakeGitHub::start("SINGLE_SELECT");
    let mut c = config(&fake);
    c["project"]["fields"]["assignedInstance"]["fieldName"] = json!("Agent");
    let d = Daemon::start(&c);
    let report = project_status(&d);
    assert_eq!(report["project_title"], "Widgets board");
    assert_eq!(report["repository"], "octo/widgets");
    assert_eq!(report["token_source"], "$GITHUB_TOKEN");
    assert_eq!(report["scopes"], "repo, project");
    assert_eq!(report["missing_fields"], json!(["Agent"]));
    let names: Vec<&str> = report["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Title", "Status", "Priority", "Assigned Instance"], "all pages of fields");
    let text = d.ctl(&["project", "status", "--verbose"]);
    assert!(text.contains("✗ missing   field \"Agent\""), "{text}");
    assert!(text.contains("Todo, Ready, In Progress"), "{text}");
}

#[test]
fn a_task_for_an_issue_github_does_not_have_leaves_nothing_pending() {
    let fake = FakeGitHub::start("TEXT");
    let d = Daemon::start(&config(&fake));
    d.assign(999, &[], "@say a task of my own");
    d.wait_state("claude-1", "completed");
    let report = wait_until("the owed updates to be dropped", || {
        let r = project_status(&d);
        r["pending"].as_array()?.is_empty().then_some(r)
    });
    assert!(report["last_error"].as_str().unwrap().contains("no board update for it"), "{report}");
}
