//! Several machines, one board: two and three real autodevd on one fake GitHub (each its own state dir, token and
//! `fleet.machine`), with the claims in git refs (`github`) or in a real `nats-server -js` on 127.0.0.1 (`nats`).
//! Every Ready item runs exactly once; a machine killed with its children is taken over, and after a restart runs
//! and writes nothing of what it lost; a machine cut off from GitHub stops its runs before another takes them; and
//! machines racing for one issue at the same instant, many times, have exactly one winner each time.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_github::{FakeGitHub, TOKEN};
use common::{Daemon, wait_until};
use serde_json::{Value, json};

/// A real `nats-server -js` on 127.0.0.1, stopped when dropped. `None` (the test says SKIPPED) without the binary.
struct Nats {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    fn start() -> Option<Nats> {
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let nats = Nats { child, url: format!("nats://127.0.0.1:{port}"), _dir: dir };
        wait_until("nats-server to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        Some(nats)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay to the NATS server that a test can cut: one machine loses the store while the others keep it.
struct Relay {
    url: String,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn to(nats: &Nats) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let target = nats.url.trim_start_matches("nats://").to_string();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if flag.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else { continue };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            // Polls the flag between reads, so a cut also ends connections that are idle.
                            from.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                            if flag.load(Ordering::SeqCst) {
                                let _ = from.shutdown(std::net::Shutdown::Both);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        Relay { url, cut }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn mend(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Github,
    Nats,
}

/// The claims' store for a test: the fake GitHub's refs, or a NATS server of its own.
fn store(backend: Backend) -> Option<Option<Nats>> {
    match backend {
        Backend::Github => Some(None),
        Backend::Nats => match Nats::start() {
            Some(n) => Some(Some(n)),
            None => {
                eprintln!("SKIPPED: no nats-server (apt-get install nats-server)");
                None
            }
        },
    }
}

/// One machine: claude and codex with one slot each, the autopilot on, the fleet on with a fast heartbeat.
fn config(fake: &FakeGitHub, machine: &str, nats: Option<&Nats>) -> Value {
    let mut c = fake.board_config(1);
    c["llms"]["gemini"]["enabled"] = json!(false);
    c["github"]["writeSpacingSecs"] = json!(0);
    c["autopilot"] = json!({ "enabled": true, "pollSecs": 0.3 });
    c["fleet"] = json!({ "enabled": true, "machine": machine, "heartbeatSecs": 0.5, "staleAfterSecs": 5 });
    if let Some(nats) = nats {
        c["fleet"]["backend"] = json!("nats");
        c["fleet"]["nats"] = json!({ "url": nats.url });
    }
    c
}

/// Starts machine `name` with a token of its own (the fake accepts it).
fn machine(fake: &FakeGitHub, name: &str, nats: Option<&Nats>) -> Daemon {
    machine_via(fake, name, nats, None)
}

/// The same, reaching NATS through `relay` when given.
fn machine_via(fake: &FakeGitHub, name: &str, nats: Option<&Nats>, relay: Option<&Relay>) -> Daemon {
    let token = token_of(name);
    fake.lock().tokens.push(token.clone());
    let mut config = config(fake, name, nats);
    if let Some(relay) = relay {
        config["fleet"]["nats"]["url"] = json!(relay.url);
    }
    Daemon::start_full(&config, None, &[("GITHUB_TOKEN", &token)])
}

fn token_of(machine: &str) -> String {
    if machine == "m-a" { TOKEN.to_string() } else { format!("ghp_token_of_{machine}") }
}

fn ready_items(fake: &FakeGitHub, issues: std::ops::RangeInclusive<u64>, body: &str) {
    for n in issues {
        fake.add_issue(n, &format!("Item {n}"), true);
        fake.lock().issues.get_mut(&n).unwrap().body = body.into();
    }
}

/// Runs of `issue` the fake CLIs of these machines started.
fn runs_of(machines: &[&Daemon], issue: u64) -> usize {
    machines
        .iter()
        .flat_map(|d| std::fs::read_dir(&d.records).unwrap().flatten())
        .filter(|e| {
            // A record being written is `….json.tmp` until its rename: only finished ones count.
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("fake-record-") && name.ends_with(".json")
        })
        .filter_map(|e| serde_json::from_str::<Value>(&std::fs::read_to_string(e.path()).ok()?).ok())
        .filter(|r| r["env"]["AUTODEV_ISSUE"].as_str() == Some(issue.to_string().as_str()))
        .count()
}

/// Issues in progress on a machine (their CLI runs), by slot.
fn running(d: &Daemon) -> Vec<(String, u64)> {
    d.status()["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "in_progress")
        .filter_map(|s| Some((s["slot"].as_str()?.to_string(), s["issue"].as_u64()?)))
        .collect()
}

fn done(fake: &FakeGitHub, issue: u64) -> bool {
    fake.value(issue, "Status").as_deref() == Some("Done")
}

/// Requests the fake got with `token`.
fn requests_by(fake: &FakeGitHub, token: &str) -> usize {
    fake.lock().log.iter().filter(|l| l.token.as_deref() == Some(token)).count()
}

/// Board writes, comments and pull requests sent with `token` since log entry `from`.
fn issue_writes(fake: &FakeGitHub, token: &str, from: usize) -> Vec<String> {
    let s = fake.lock();
    s.log[from..]
        .iter()
        .filter(|l| l.token.as_deref() == Some(token))
        .filter(|l| {
            matches!(l.operation.as_deref(), Some("SetFields" | "Finish" | "SetStatus" | "AddItem"))
                || (l.method != "GET" && (l.path.contains("/issues/") || l.path.contains("/pulls")))
        })
        .map(|l| format!("{} {} {:?}", l.method, l.path, l.operation))
        .collect()
}

fn claims_left(fake: &FakeGitHub, nats: Option<&Nats>, machines: &[&Daemon]) -> usize {
    match nats {
        None => fake.lock().claims().len(),
        // With NATS the fake holds no claims: ask a machine how many it sees.
        Some(_) => machines
            .iter()
            .map(|d| {
                let report: Value = serde_json::from_str(&d.ctl(&["fleet", "--json"])).unwrap();
                report["claims"].as_array().unwrap().len()
            })
            .max()
            .unwrap_or(0),
    }
}

fn each_item_runs_exactly_once(backend: Backend) {
    let Some(nats) = store(backend) else { return };
    let fake = FakeGitHub::start("TEXT");
    ready_items(&fake, 1..=6, "@sleep 0.5");
    let a = machine(&fake, "m-a", nats.as_ref());
    let b = machine(&fake, "m-b", nats.as_ref());
    let c = machine(&fake, "m-c", nats.as_ref());
    wait_until("all six items to be done", || (1..=6).all(|n| done(&fake, n)).then_some(()));
    for n in 1..=6 {
        assert_eq!(runs_of(&[&a, &b, &c], n), 1, "issue #{n} ran exactly once across the three machines");
    }
    wait_until("every claim to be released", || (claims_left(&fake, nats.as_ref(), &[&a]) == 0).then_some(()));
    // Assigned Instance said which machine: `<slot>@<machine>`.
    let seen = fake.lock().seen.join("\n");
    assert!(["@m-a", "@m-b", "@m-c"].iter().any(|m| seen.contains(m)), "Assigned Instance names slot@machine");
    let fleet: Value = serde_json::from_str(&a.ctl(&["fleet", "--json"])).unwrap();
    assert_eq!(fleet["summary"]["machines"], 3, "{fleet}");
    assert!(a.ctl(&["fleet"]).contains("m-b"));
}

#[test]
fn each_ready_item_runs_exactly_once_on_three_machines_github() {
    each_item_runs_exactly_once(Backend::Github);
}

#[test]
fn each_ready_item_runs_exactly_once_on_three_machines_nats() {
    each_item_runs_exactly_once(Backend::Nats);
}

/// Waits until each of two machines runs two items; returns what the first one runs.
fn two_each(a: &Daemon, b: &Daemon) -> Vec<(String, u64)> {
    wait_until("each machine to run two items", || {
        let (on_a, on_b) = (running(a), running(b));
        (on_a.len() == 2 && on_b.len() == 2).then_some(on_a)
    })
}

/// Kills a daemon and every process of its runs, as a machine dying would.
fn kill_machine(d: &mut Daemon) {
    let pids: Vec<i32> =
        d.status()["slots"].as_array().unwrap().iter().filter_map(|s| s["pid"].as_i64()).map(|p| p as i32).collect();
    d.kill9();
    for pid in pids {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

fn a_dead_machine_is_taken_over(backend: Backend) {
    let Some(nats) = store(backend) else { return };
    let fake = FakeGitHub::start("TEXT");
    ready_items(&fake, 1..=4, "@sleep 2");
    let mut a = machine(&fake, "m-a", nats.as_ref());
    let b = machine(&fake, "m-b", nats.as_ref());
    let on_a = two_each(&a, &b);
    // Their CLIs are running (each has written its record), not only spawned.
    wait_until("the first machine's runs to be under way", || {
        on_a.iter().all(|(_, issue)| runs_of(&[&a], *issue) == 1).then_some(())
    });
    kill_machine(&mut a);
    let killed_at = Instant::now();
    // Taken over only once the other machine has seen the heartbeat unchanged for staleAfterSecs plus a heartbeat
    // (5.5 s here, less the up to 0.5 s between the last beat and the kill), then run again from the issue.
    let first = on_a[0].1;
    wait_until("the other machine to take one over", || running(&b).iter().any(|(_, i)| *i == first).then_some(()));
    let waited = killed_at.elapsed();
    assert!(waited >= Duration::from_millis(4500), "taken over after {waited:?}: before the lease ran out");
    wait_until("all four items to be done", || (1..=4).all(|n| done(&fake, n)).then_some(()));
    for (_, issue) in &on_a {
        assert_eq!(runs_of(&[&a, &b], *issue), 2, "#{issue}: the killed run, then the takeover");
    }
    assert!(b.daemon_log().contains("took over the claim"), "{}", b.daemon_log());

    // The dead machine comes back: it runs none of them again and writes nothing for them.
    let from = fake.lock().log.len();
    a.launch();
    wait_until("the restarted machine to end what it lost", || {
        let slots = a.status()["slots"].as_array().unwrap().clone();
        let lost = slots.iter().filter(|s| s["end_cause"] == "claim_lost").count();
        (lost == on_a.len()).then_some(())
    });
    let token = token_of("m-a");
    let before = requests_by(&fake, &token);
    wait_until("a few more requests of the restarted machine", || {
        (requests_by(&fake, &token) > before + 10).then_some(())
    });
    for (_, issue) in &on_a {
        assert_eq!(runs_of(&[&a, &b], *issue), 2, "#{issue} did not run again on the restarted machine");
    }
    let writes = issue_writes(&fake, &token_of("m-a"), from);
    assert!(writes.is_empty(), "the restarted machine wrote for issues it lost: {writes:?}");
    let row = a.status()["slots"].as_array().unwrap().iter().find(|s| s["end_cause"] == "claim_lost").cloned().unwrap();
    assert!(row["reason"].as_str().unwrap().contains("claim"), "{row}");
}

#[test]
fn a_killed_machine_is_taken_over_and_after_a_restart_runs_and_writes_nothing_of_it_github() {
    a_dead_machine_is_taken_over(Backend::Github);
}

#[test]
fn a_killed_machine_is_taken_over_and_after_a_restart_runs_and_writes_nothing_of_it_nats() {
    a_dead_machine_is_taken_over(Backend::Nats);
}

#[test]
fn the_runs_of_a_dead_daemon_end_before_another_machine_takes_them() {
    let fake = FakeGitHub::start("TEXT");
    ready_items(&fake, 1..=4, "@sleep 60");
    let mut a = machine(&fake, "m-a", None);
    let b = machine(&fake, "m-b", None);
    let on_a = two_each(&a, &b);
    let pids: Vec<i64> = on_a.iter().map(|(slot, _)| a.slot(slot)["pid"].as_i64().unwrap()).collect();
    // The daemon dies; its agents run on (as after an OOM kill), and only its lease keeper is left to end them.
    a.kill9();
    assert!(pids.iter().all(|p| common::alive(*p)), "the runs outlive the daemon at first");
    let c = machine(&fake, "m-c", None);
    let (_, issue) = on_a[0];
    wait_until("a live machine to take one over", || running(&c).iter().any(|(_, i)| *i == issue).then_some(()));
    assert!(pids.iter().all(|p| !common::alive(*p)), "the dead daemon's runs had ended before the takeover");
}

fn a_cut_off_machine_stops_first(backend: Backend) {
    let Some(nats) = store(backend) else { return };
    let fake = FakeGitHub::start("TEXT");
    ready_items(&fake, 1..=4, "@sleep 8");
    let relay = nats.as_ref().map(Relay::to);
    let a = machine_via(&fake, "m-a", nats.as_ref(), relay.as_ref());
    let b = machine(&fake, "m-b", nats.as_ref());
    let on_a = two_each(&a, &b);
    let token = token_of("m-a");
    // Cut off from the store: GitHub refuses its token, or its way to NATS is cut.
    match &relay {
        Some(relay) => relay.cut(),
        None => fake.lock().refused.push(token.clone()),
    }
    let (slot, issue) = on_a[0].clone();
    // The moment the other machine starts one of them, the cut-off one has stopped it already.
    wait_until("the other machine to take one over", || running(&b).iter().any(|(_, i)| *i == issue).then_some(()));
    let row = a.slot(&slot);
    assert_eq!(row["state"], "failed", "{row}");
    assert_eq!(row["end_cause"], "claim_lost", "{row}");
    assert!(row["reason"].as_str().unwrap().contains("could not renew"), "{row}");

    // Back on the store, it writes nothing for the issues it lost.
    let from = fake.lock().log.len();
    match &relay {
        Some(relay) => relay.mend(),
        None => fake.lock().refused.clear(),
    }
    wait_until("the cut-off machine to read the claims again", || {
        let report: Value = serde_json::from_str(&a.ctl(&["fleet", "--json"])).ok()?;
        report["summary"]["last_error"].is_null().then_some(())
    });
    let before = requests_by(&fake, &token);
    wait_until("a few more requests of the cut-off machine", || {
        (requests_by(&fake, &token) > before + 10).then_some(())
    });
    let writes = issue_writes(&fake, &token, from);
    assert!(writes.is_empty(), "the cut-off machine wrote for issues it lost: {writes:?}");
    let status = b.ctl(&["status"]);
    let backend = if nats.is_some() { "nats" } else { "github" };
    assert!(status.contains(&format!("fleet m-b ({backend}) · 2 machines")), "{status}");
}

#[test]
fn a_machine_cut_off_from_github_stops_its_runs_before_another_takes_them() {
    a_cut_off_machine_stops_first(Backend::Github);
}

#[test]
fn a_machine_cut_off_from_nats_stops_its_runs_before_another_takes_them() {
    a_cut_off_machine_stops_first(Backend::Nats);
}

/// N stores on N machines claim one issue at the same instant; then all try to take it over from the winner at the
/// same instant. Each time exactly one wins.
fn race(make: impl FnOnce() -> Vec<Arc<dyn autodev::fleet::Store>>, rounds: u64) {
    use autodev::fleet::{Holder, StoreError};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        // Made inside the runtime: the GitHub client needs one.
        let stores = make();
        for round in 1..=rounds {
            let issue = 1000 + round;
            let barrier = Arc::new(tokio::sync::Barrier::new(stores.len()));
            let tries = stores.iter().enumerate().map(|(i, store)| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    let holder = Holder { machine: format!("m-{i}"), slot: "claude-1".into(), epoch: 1 };
                    barrier.wait().await;
                    store.create(issue, &holder).await
                })
            });
            let results: Vec<_> = futures_join(tries).await;
            let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(won.len(), 1, "round {round}: exactly one claim: {results:?}");
            assert!(
                results.iter().filter(|r| r.is_err()).all(|r| matches!(r, Err(StoreError::Conflict(_)))),
                "round {round}: the others are told it is taken: {results:?}"
            );
            let version = won[0].version.clone();
            let swaps = stores.iter().enumerate().map(|(i, store)| {
                let (store, barrier, version) = (store.clone(), barrier.clone(), version.clone());
                tokio::spawn(async move {
                    let holder = Holder { machine: format!("m-{i}"), slot: "codex-1".into(), epoch: 2 };
                    barrier.wait().await;
                    store.swap(issue, &version, &holder).await
                })
            });
            let results: Vec<_> = futures_join(swaps).await;
            let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(won.len(), 1, "round {round}: exactly one takeover: {results:?}");
            // A release that names an old version never removes the new holder's claim.
            assert!(matches!(stores[0].release(issue, &version).await, Err(StoreError::Conflict(_))));
            assert_eq!(stores[0].check(issue).await.unwrap().as_deref(), Some(won[0].version.as_str()));
            stores[0].release(issue, &won[0].version).await.unwrap();
            assert_eq!(stores[0].check(issue).await.unwrap(), None);
        }
    });
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.unwrap());
    }
    out
}

#[test]
fn machines_racing_for_one_issue_have_exactly_one_winner_github() {
    let fake = FakeGitHub::start("TEXT");
    let make = || -> Vec<Arc<dyn autodev::fleet::Store>> {
        (0..5)
            .map(|i| {
                let github = autodev::config::GithubConfig {
                    api_url: fake.url.clone(),
                    timeout_secs: 5.0,
                    write_spacing_secs: 0.0,
                    ..Default::default()
                };
                let token = autodev::github::client::Token::new(TOKEN.into());
                let gh = Arc::new(autodev::github::client::GitHub::new(&github, &token).unwrap());
                let store =
                    autodev::fleet::github::GithubStore::new(gh, "octo".into(), "widgets".into(), format!("m-{i}"));
                Arc::new(store) as Arc<dyn autodev::fleet::Store>
            })
            .collect()
    };
    race(make, 30);
}

#[test]
fn machines_racing_for_one_issue_have_exactly_one_winner_nats() {
    let Some(Some(nats)) = store(Backend::Nats) else { return };
    let make = || -> Vec<Arc<dyn autodev::fleet::Store>> {
        (0..5)
            .map(|i| {
                let url = nats.url.clone();
                let store = autodev::fleet::nats::NatsStore::new(url, format!("m-{i}"), Duration::from_secs(3));
                Arc::new(store) as Arc<dyn autodev::fleet::Store>
            })
            .collect()
    };
    race(make, 30);
}

#[test]
fn three_daemons_assigning_one_issue_at_once_start_it_once() {
    let fake = FakeGitHub::start("TEXT");
    let machines: Vec<Daemon> = ["m-a", "m-b", "m-c"]
        .iter()
        .map(|m| {
            let token = token_of(m);
            fake.lock().tokens.push(token.clone());
            let mut c = config(&fake, m, None);
            c["autopilot"]["enabled"] = json!(false);
            Daemon::start_full(&c, None, &[("GITHUB_TOKEN", &token)])
        })
        .collect();
    for issue in 20..23u64 {
        fake.add_issue(issue, &format!("Raced {issue}"), true);
        fake.lock().issues.get_mut(&issue).unwrap().body = "@sleep 0.2".into();
        let barrier = Arc::new(std::sync::Barrier::new(machines.len()));
        let outcomes: Vec<std::process::Output> = std::thread::scope(|scope| {
            let handles: Vec<_> = machines
                .iter()
                .map(|d| {
                    let barrier = barrier.clone();
                    let mut cmd = d.ctl_command(&["assign", &issue.to_string(), "--force"]);
                    scope.spawn(move || {
                        barrier.wait();
                        cmd.output().unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won = outcomes.iter().filter(|o| o.status.success()).count();
        assert_eq!(won, 1, "issue #{issue}: exactly one machine starts it: {outcomes:?}");
        for o in outcomes.iter().filter(|o| !o.status.success()) {
            let said = String::from_utf8_lossy(&o.stderr);
            assert!(said.contains("held by") || said.contains("claim"), "a clear refusal: {said}");
        }
        wait_until("the run to end and its claim to go", || {
            (fake.lock().claims().is_empty() && done(&fake, issue)).then_some(())
        });
        let all: Vec<&Daemon> = machines.iter().collect();
        assert_eq!(runs_of(&all, issue), 1);
    }
}
