//! Tokens, cost and budgets end to end: a task budget stops a run of the fake claude that reports usage while it
//! runs, refuses its next run until a person says so; `history --sum` adds runs up; a day budget stops the
//! autopilot taking new work.

mod common;

use common::fake_github::FakeGitHub;
use common::{Daemon, fake_config, wait_until};
use serde_json::{Value, json};

#[test]
fn a_task_budget_stops_the_run_that_spends_it_and_refuses_the_next_until_a_person_says_so() {
    let mut c = fake_config(1);
    // $1 per thousand input tokens: 1,000 tokens reported while it runs are $1.
    c["llms"]["claude"]["pricing"] = json!({ "input": 1000.0, "cachedInput": 100.0, "output": 1000.0 });
    c["budget"] = json!({ "perTaskUsd": 0.5 });
    let d = Daemon::start(&c);
    d.assign(1, &["--llm", "claude"], "@usage 400 0\n@sleep 1\n@usage 1000 20\n@sleep 60");
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["end_cause"], "budget", "{row}");
    assert!(row["reason"].as_str().unwrap().contains("budget.perTaskUsd"), "{row}");
    assert_eq!(row["tokens"], json!({ "input": 1400, "cached_input": 0, "output": 20 }), "{row}");
    assert_eq!(row["cost_estimated"], true);
    assert!((row["cost_usd"].as_f64().unwrap() - 1.42).abs() < 1e-9, "{row}");

    let refused = d.try_ctl(&["resume", "claude-1"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("budget") && said.contains("--over-budget"), "{said}");
    d.ctl(&["resume", "claude-1", "--over-budget"]);
    d.wait_state("claude-1", "in_progress");
    d.ctl(&["stop", "claude-1"]);
    d.wait_state("claude-1", "failed");

    // Added up: one issue, two runs (the first priced from tokens, so estimated).
    let sums: Vec<Value> = serde_json::from_str(&d.ctl(&["history", "--sum", "--by", "issue", "--json"])).unwrap();
    assert_eq!(sums.len(), 1, "{sums:?}");
    assert_eq!((sums[0]["key"].clone(), sums[0]["runs"].clone()), (json!("#1"), json!(2)), "{sums:?}");
    assert_eq!(sums[0]["cost_estimated"], true);
    let text = d.ctl(&["history", "--sum", "--by", "llm"]);
    assert!(text.contains("claude") && text.contains("~$"), "{text}");
    // The plain history keeps its shape.
    let runs: Vec<Value> = serde_json::from_str(&d.ctl(&["history", "--json"])).unwrap();
    assert_eq!(runs.len(), 2);
}

#[test]
fn a_spent_day_budget_stops_the_autopilot_taking_new_work() {
    let fake = FakeGitHub::start("TEXT");
    for (n, p) in [(1, "P0"), (2, "P1")] {
        fake.add_issue(n, &format!("Issue {n}"), true);
        fake.lock().issues.get_mut(&n).unwrap().body = "@say done".into();
        fake.set_value(n, "Priority", p);
    }
    let mut c = fake_config(1);
    c["llms"]["gemini"]["enabled"] = json!(false);
    c["llms"]["codex"]["enabled"] = json!(false);
    c["github"] = json!({ "owner": "octo", "repo": "widgets", "apiUrl": fake.url, "timeoutSecs": 2 });
    c["statusComments"] = json!({ "enabled": false });
    c["project"] = json!({ "enabled": true, "projectNumber": 5, "organizationProject": true,
        "fields": { "status": { "fieldName": "Status", "readyValues": ["Ready"], "inProgressValue": "In Progress",
                                "doneValue": "Done", "blockedValue": "Blocked" } } });
    c["autopilot"] = json!({ "enabled": true, "pollSecs": 0.3 });
    // The fake claude reports $0.42 a run: one run spends the day.
    c["budget"] = json!({ "perDayUsd": 0.4 });
    let d = Daemon::start(&c);
    wait_until("#1 to be done", || (fake.value(1, "Status").as_deref() == Some("Done")).then_some(()));
    let waiting = wait_until("the queue to say why #2 waits", || {
        let q: Vec<Value> = serde_json::from_str(&d.ctl(&["queue", "--json"])).ok()?;
        q.into_iter().find(|e| e["issue"] == 2 && e["reason"].as_str().is_some_and(|r| r.contains("budget")))
    });
    assert!(waiting["reason"].as_str().unwrap().contains("today's budget is spent ($0.42 of $0.40"), "{waiting}");
    let status = d.status();
    assert!(status["warnings"].to_string().contains("the autopilot takes nothing new until tomorrow"), "{status}");
    let turns = |d: &Daemon| -> u64 {
        let r: Value = serde_json::from_str(&d.ctl(&["autopilot", "status", "--json"])).unwrap();
        r["turns"].as_u64().unwrap()
    };
    let start = turns(&d);
    wait_until("three more turns", || (turns(&d) >= start + 3).then_some(()));
    let history: Vec<Value> = serde_json::from_str(&d.ctl(&["history", "--json"])).unwrap();
    assert_eq!(history.len(), 1, "only #1 ran: {history:?}");
}
