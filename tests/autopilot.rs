//! The board feeds the slots, end to end with the fake GitHub serving a board on 127.0.0.1: the order of taking
//! (priority, then the project's order), what is never taken (drafts, pull requests, other repositories, excluded
//! labels, someone else's items), the local queue before the board, no double start across a kill -9, no re-take
//! of an item that ended here until a person moves it back, the switch across a restart, and a usage limit that
//! pauses one LLM.

mod common;

use common::fake_github::FakeGitHub;
use common::{Daemon, wait_until};
use serde_json::{Value, json};

/// Two LLMs of one slot each (claude, codex), a board, the autopilot polling fast.
fn config(fake: &FakeGitHub, enabled: bool) -> Value {
    let mut c = fake.board_config(1);
    c["llms"]["gemini"]["enabled"] = json!(false);
    c["github"]["excludeLabels"] = json!(["wontfix"]);
    c["project"]["fields"]["priority"] = json!({ "fieldName": "Priority" });
    c["autopilot"] = json!({ "enabled": enabled, "pollSecs": 0.3, "llmLabels": { "llm:codex": "codex" } });
    c
}

fn issue(fake: &FakeGitHub, number: u64, title: &str, priority: Option<&str>, body: &str) {
    fake.add_issue(number, title, true);
    fake.lock().issues.get_mut(&number).unwrap().body = body.into();
    if let Some(p) = priority {
        fake.set_value(number, "Priority", p);
    }
}

fn label(fake: &FakeGitHub, number: u64, label: &str) {
    fake.lock().issues.get_mut(&number).unwrap().labels.push(label.into());
}

fn queue(d: &Daemon) -> Vec<Value> {
    serde_json::from_str(&d.ctl(&["queue", "--json"])).unwrap()
}

fn issue_of(d: &Daemon, slot: &str) -> Option<u64> {
    let row = d.slot(slot);
    matches!(row["state"].as_str(), Some("in_progress" | "starting")).then(|| row["issue"].as_u64()).flatten()
}

/// Turns the autopilot's loop has made since autodevd started, to wait on "a few more decisions".
fn turns(d: &Daemon) -> u64 {
    let report: Value = serde_json::from_str(&d.ctl(&["autopilot", "status", "--json"])).unwrap();
    report["turns"].as_u64().unwrap()
}

fn wait_polls(d: &Daemon, n: u64) {
    let start = turns(d);
    wait_until(&format!("{n} more turns of the autopilot"), || (turns(d) >= start + n).then_some(()));
}

/// Runs of `issue` the fake CLIs started (their records; one being rewritten is read again).
fn runs_of(d: &Daemon, issue: u64) -> usize {
    let read = |path: &std::path::Path| {
        wait_until(&format!("{} to parse", path.display()), || {
            serde_json::from_str::<Value>(&std::fs::read_to_string(path).ok()?).ok()
        })
    };
    std::fs::read_dir(&d.records)
        .unwrap()
        .flatten()
        .filter(|e| {
            // A record being written is `….json.tmp` until its rename: only finished ones count.
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("fake-record-") && name.ends_with(".json")
        })
        .map(|e| read(&e.path()))
        .filter(|r| r["env"]["AUTODEV_ISSUE"].as_str() == Some(issue.to_string().as_str()))
        .count()
}

#[test]
fn ready_items_are_taken_by_priority_and_the_rest_wait_in_order() {
    let fake = FakeGitHub::start("TEXT");
    let long = "@sleep 60";
    issue(&fake, 1, "Low", Some("P2"), long);
    issue(&fake, 2, "Urgent", Some("P0"), long);
    issue(&fake, 3, "Unprioritised", None, long);
    issue(&fake, 4, "Won't fix", Some("P0"), long);
    label(&fake, 4, "wontfix");
    issue(&fake, 5, "Someone else's", Some("P0"), long);
    fake.set_value(5, "Assigned Instance", "laptop-2");
    issue(&fake, 6, "Already going", Some("P0"), long);
    fake.set_value(6, "Status", "In Progress");
    issue(&fake, 7, "For codex", Some("P1"), long);
    label(&fake, 7, "llm:codex");
    issue(&fake, 8, "Closed", Some("P0"), long);
    fake.lock().issues.get_mut(&8).unwrap().open = false;
    issue(&fake, 9, "Also low", Some("P2"), long);
    fake.add_other_item("DRAFT_ISSUE", "", 0, "A draft");
    fake.add_other_item("PULL_REQUEST", "octo/widgets", 77, "A pull request");
    fake.add_other_item("ISSUE", "octo/elsewhere", 3, "Another repository's issue");
    let d = Daemon::start(&config(&fake, false));
    assert!(queue(&d).is_empty(), "the autopilot is off: nothing from the board");

    d.ctl(&["autopilot", "on"]);
    wait_until("both slots to be taken", || {
        (issue_of(&d, "claude-1").is_some() && issue_of(&d, "codex-1").is_some()).then_some(())
    });
    assert_eq!(issue_of(&d, "claude-1"), Some(2), "P0 first");
    assert_eq!(issue_of(&d, "codex-1"), Some(7), "labelled for codex");
    let waiting = queue(&d);
    let order: Vec<u64> = waiting.iter().map(|e| e["issue"].as_u64().unwrap()).collect();
    assert_eq!(order, [1, 9, 3], "P2 in the project's order, then no priority: {waiting:?}");
    assert_eq!(waiting[0]["source"], "board");
    assert_eq!(waiting[0]["priority"], "P2");
    assert_eq!(waiting[0]["reason"], "no free claude slot", "{waiting:?}");
    assert_eq!(fake.value(2, "Assigned Instance").as_deref(), Some("claude-1"));

    // A slot comes free: the next in order, never the stopped one again.
    d.ctl(&["stop", "claude-1"]);
    wait_until("#1 to be taken", || (issue_of(&d, "claude-1") == Some(1)).then_some(()));
    wait_polls(&d, 2);
    // (The stopped run may have died before its fake CLI wrote a record: count what autodevd knows.)
    let history: Value = serde_json::from_str(&d.ctl(&["history", "--issue", "2", "--json"])).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 1, "{history}");
    assert!(!d.status()["slots"].as_array().unwrap().iter().any(|s| s["issue"] == 2 && s["state"] == "in_progress"));
    for never in [4, 5, 6, 8] {
        assert_eq!(runs_of(&d, never), 0, "#{never} is not Ready for the autopilot");
    }
    let text = d.ctl(&["queue"]);
    assert!(text.contains("#9") && text.contains("no free claude slot"), "{text}");
    let status = d.ctl(&["status"]);
    assert!(status.contains("autopilot on"), "{status}");
}

#[test]
fn the_local_queue_goes_first_and_holds_no_slot() {
    let fake = FakeGitHub::start("TEXT");
    issue(&fake, 11, "Board item", Some("P0"), "@sleep 60");
    let mut c = config(&fake, false);
    c["llms"]["codex"]["enabled"] = json!(false);
    let d = Daemon::start(&c);
    d.assign(100, &["--slot", "claude-1"], "@sleep 60");
    let rows = d.status()["slots"].as_array().unwrap().len();
    // No free slot: refused as before, unless --queue.
    let refused = d.try_ctl(&["assign", "101", "--prompt", "@say first"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("No available"), "{refused:?}");
    let queued: Value =
        serde_json::from_str(&d.ctl(&["assign", "101", "--prompt", "@say first", "--queue", "--json"])).unwrap();
    assert_eq!(queued, json!({ "type": "queued", "issue": 101, "place": 1 }));
    d.ctl(&["assign", "102", "--prompt", "@sleep 60", "--queue"]);
    d.ctl(&["assign", "103", "--prompt", "@say never", "--queue"]);
    d.ctl(&["unqueue", "103"]);
    let status = d.status();
    let local: Vec<u64> = status["queued"].as_array().unwrap().iter().map(|e| e["issue"].as_u64().unwrap()).collect();
    assert_eq!(local, [101, 102]);
    assert_eq!(status["slots"].as_array().unwrap().len(), rows, "a queued task is no slot row");
    assert!(d.ctl(&["status"]).contains("2 queued"));

    d.ctl(&["autopilot", "on"]);
    d.ctl(&["stop", "claude-1"]);
    // First in, first out, before the board's P0 item.
    wait_until("#102 to start", || (issue_of(&d, "claude-1") == Some(102)).then_some(()));
    let history: Value = serde_json::from_str(&d.ctl(&["history", "--json"])).unwrap();
    let ended: Vec<u64> = history.as_array().unwrap().iter().map(|r| r["issue"].as_u64().unwrap()).collect();
    assert_eq!(ended, [100, 101], "{history}");
    assert_eq!(runs_of(&d, 11), 0);
    assert_eq!(runs_of(&d, 103), 0, "unqueued");
    assert!(d.status()["queued"].as_array().unwrap().is_empty());
}

#[test]
fn an_item_that_ended_here_is_not_taken_again_until_a_person_moves_it_back() {
    let fake = FakeGitHub::start("TEXT");
    issue(&fake, 20, "Fails", Some("P0"), "@fail\n@exit 1");
    let mut c = config(&fake, true);
    c["llms"]["codex"]["enabled"] = json!(false);
    // Without a blocked value, a failed task's Status goes back to the first Ready value: still not taken again.
    c["project"]["fields"]["status"].as_object_mut().unwrap().remove("blockedValue");
    let d = Daemon::start(&c);
    let row = wait_until("#20 to fail", || {
        let row = d.slot("claude-1");
        (row["issue"] == 20 && row["state"] == "failed").then_some(row)
    });
    wait_until("the end to reach the board", || (fake.value(20, "Assigned Instance").is_none()).then_some(()));
    assert_eq!(fake.value(20, "Status").as_deref(), Some("Ready"));
    wait_polls(&d, 3);
    assert_eq!(runs_of(&d, 20), 1, "the board still says Ready, but nobody moved it back");
    assert_eq!(d.slot("claude-1")["run_id"], row["run_id"]);
    let waiting = queue(&d);
    assert!(waiting[0]["reason"].as_str().unwrap().contains("ended here"), "{waiting:?}");

    // A person moves it back to Ready: it is taken again.
    fake.set_value(20, "Status", "Ready");
    wait_until("#20 to run again", || (runs_of(&d, 20) == 2).then_some(()));
}

#[test]
fn a_kill_during_the_take_never_starts_an_item_twice_and_the_switch_survives_restarts() {
    let fake = FakeGitHub::start("TEXT");
    issue(&fake, 30, "Long", Some("P0"), "@sleep 60");
    let mut c = config(&fake, false);
    c["llms"]["codex"]["enabled"] = json!(false);
    c["llms"]["claude"]["maxConcurrentIssues"] = json!(2);
    // The board never hears of the take: after the crash it still shows #30 Ready and unassigned.
    fake.lock().fail_mutations = true;
    let mut d = Daemon::start(&c);
    d.ctl(&["autopilot", "on"]);
    wait_until("#30 to be taken", || (issue_of(&d, "claude-1") == Some(30)).then_some(()));
    d.kill9();
    d.launch();
    assert_eq!(fake.value(30, "Status").as_deref(), Some("Ready"));
    assert_eq!(fake.value(30, "Assigned Instance"), None);
    let report: Value = serde_json::from_str(&d.ctl(&["autopilot", "status", "--json"])).unwrap();
    assert_eq!((report["on"].clone(), report["source"].clone()), (json!(true), json!("override")), "{report}");
    wait_polls(&d, 3);
    assert_eq!(runs_of(&d, 30), 1, "taken once, across the crash, though the board still says Ready");
    assert_eq!(issue_of(&d, "claude-1"), Some(30), "the run was adopted");
    assert_eq!(issue_of(&d, "claude-2"), None);
    fake.lock().fail_mutations = false;

    d.ctl(&["autopilot", "reset"]);
    let report: Value = serde_json::from_str(&d.ctl(&["autopilot", "status", "--json"])).unwrap();
    assert_eq!((report["on"].clone(), report["source"].clone()), (json!(false), json!("config")));
    // Off starts nothing new and stops nothing.
    d.ctl(&["autopilot", "off"]);
    issue(&fake, 31, "Next", Some("P0"), "@say hi");
    d.ctl(&["stop", "claude-1"]);
    d.wait_state("claude-1", "failed");
    d.assign(200, &["--queue"], "@say the local queue still drains");
    wait_until("the queued task to run", || (runs_of(&d, 200) == 1).then_some(()));
    assert_eq!(runs_of(&d, 31), 0, "off: nothing from the board");
    d.terminate();
    d.launch();
    let report: Value = serde_json::from_str(&d.ctl(&["autopilot", "status", "--json"])).unwrap();
    assert_eq!((report["on"].clone(), report["source"].clone()), (json!(false), json!("override")));
}

#[test]
fn a_usage_limit_pauses_taking_for_that_llm_only() {
    let fake = FakeGitHub::start("TEXT");
    issue(&fake, 40, "Hits the limit", Some("P0"), "@api-error 429");
    let mut c = config(&fake, true);
    c["defaultLlm"] = json!("claude");
    c["llms"]["claude"]["maxConcurrentIssues"] = json!(2);
    let d = Daemon::start(&c);
    wait_until("#40 to wait for the limit", || {
        let row = d.slot("claude-1");
        (row["issue"] == 40 && row["waiting_for"] == "usage_limit").then_some(())
    });
    issue(&fake, 41, "Waits for claude", Some("P1"), "@say later");
    issue(&fake, 42, "For codex", Some("P2"), "@sleep 60");
    label(&fake, 42, "llm:codex");
    wait_until("#42 to go to codex", || (issue_of(&d, "codex-1") == Some(42)).then_some(()));
    wait_polls(&d, 2);
    assert_eq!(runs_of(&d, 41), 0, "claude-2 is free, but claude's account is at its limit");
    let waiting = queue(&d);
    let next = waiting.iter().find(|e| e["issue"] == 41).unwrap();
    assert!(next["reason"].as_str().unwrap().starts_with("claude waits out a usage limit until"), "{waiting:?}");
}
