//! Notifications end to end: a local HTTP receiver on 127.0.0.1 (JSON and Slack's format) and a command get each
//! event once, across a kill -9 and a restart, with no secret in them; a webhook that never answers delays nothing.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{Daemon, fake_config, wait_until};
use serde_json::{Value, json};

/// What a receiver got: (path, body) of each POST.
type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// An HTTP receiver that keeps (path, body) of every POST and answers 200; or, `hang`, answers nothing.
fn receiver(hang: bool) -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let keep = got.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            if hang {
                held.push(stream);
                continue;
            }
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut length = 0;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            keep.lock().unwrap().push((path, serde_json::from_slice(&body).unwrap_or(Value::Null)));
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, got)
}

fn command_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn each_event_reaches_every_sink_once_across_a_crash_with_no_secret_and_a_dead_webhook_delays_nothing() {
    let (url, got) = receiver(false);
    let (dead, _) = receiver(true);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let mut c = fake_config(2);
    c["llms"]["claude"]["apiKey"] = json!("sk-ant-notify-secret-0123456789");
    c["notifications"] = json!({
        "command": ["sh", "-c", format!("cat >> {}; echo >> {}", log.display(), log.display())],
        "webhooks": [ { "url": format!("{dead}/never") }, { "url": format!("{url}/json") },
                      { "url": format!("{url}/only-failures"), "events": ["failed"] } ],
        "slack": { "webhookUrl": format!("{url}/slack") }
    });
    let mut d = Daemon::start(&c);
    d.assign(1, &["--slot", "claude-1"], "Fix it\n@say done");
    d.assign(2, &["--slot", "claude-2"], "Break it with sk-ant-notify-secret-0123456789\n@fail\n@exit 1");
    d.wait_state("claude-1", "completed");
    d.wait_state("claude-2", "failed");
    let json_events = |got: &Received, path: &str| -> Vec<Value> {
        got.lock().unwrap().iter().filter(|(p, _)| p == path).map(|(_, b)| b.clone()).collect()
    };
    // The dead webhook holds its own deliveries only.
    let events = wait_until("both events at the receiver and the command", || {
        let e = json_events(&got, "/json");
        (e.len() == 2 && command_events(&log).len() == 2 && json_events(&got, "/slack").len() == 2).then_some(e)
    });
    let mut kinds: Vec<(u64, String)> =
        events.iter().map(|e| (e["issue"].as_u64().unwrap(), e["event"].as_str().unwrap().to_string())).collect();
    kinds.sort();
    assert_eq!(kinds, [(1, "completed".to_string()), (2, "failed".to_string())]);
    let failed = events.iter().find(|e| e["event"] == "failed").unwrap();
    for key in ["id", "slot", "issue", "title", "state", "end_cause", "reason", "run_id", "machine", "at"] {
        assert!(!failed[key].is_null(), "{key} missing in {failed}");
    }
    assert_eq!(failed["title"], "Break it with [redacted]");
    let only = json_events(&got, "/only-failures");
    assert_eq!(only.len(), 1, "{only:?}");
    assert_eq!(only[0]["event"], "failed");
    let slack = json_events(&got, "/slack");
    assert!(slack.iter().all(|b| b["text"].as_str().is_some_and(|t| t.starts_with("autodev: claude-"))), "{slack:?}");
    // The dead webhook is shown once its delivery times out (10 s); everything else went out before.
    let warnings = wait_until("the dead webhook in the warnings", || {
        let warnings = d.status()["warnings"].to_string();
        warnings.contains("notifications.webhooks[0] (127.0.0.1) failed").then_some(warnings)
    });
    assert!(!warnings.contains("/never"), "a webhook's URL is a secret: {warnings}");

    // A crash and a restart send nothing again; a new event still goes out once.
    d.kill9();
    d.launch();
    d.assign(3, &["--slot", "claude-1"], "Again\n@say done");
    wait_until("the third event", || (json_events(&got, "/json").len() == 3).then_some(()));
    let all = json_events(&got, "/json");
    let mut ids: Vec<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each event once: {all:?}");
    wait_until("the command's third event", || (command_events(&log).len() == 3).then_some(()));
    let everything = format!("{:?}{}", got.lock().unwrap(), std::fs::read_to_string(&log).unwrap());
    assert!(!everything.contains("sk-ant-notify-secret"), "a secret reached a sink: {everything}");
    assert!(everything.contains("Break it with [redacted]"), "the title was kept, redacted: {everything}");
}
