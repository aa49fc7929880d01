//! Supervisor benchmarks (not tests): `cargo bench --bench supervisor`. Prints a Markdown section for
//! BENCHMARKS.md. Ratios compare both sides in the same run, alternating, so a noisy shared machine hits both.
//!
//! `BENCH_QUICK=1` shrinks every figure (for checking the bench itself, not for numbers).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use autodev::ctl::Client;
use autodev::paths::Paths;
use autodev::protocol::{Reply, Request, SlotState};
use common::{Daemon, fixtures};
use serde_json::{Value, json};

fn quick() -> bool {
    std::env::var_os("BENCH_QUICK").is_some()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// A config with one custom provider that runs the fake CLI as a plain-text program, `slots` slots.
fn plain_config(slots: u32) -> Value {
    let bin = fixtures().join("bin/plain");
    json!({
        "llms": { "bench": { "cliPath": bin.display().to_string(), "maxConcurrentIssues": slots } },
        "supervisor": { "stopGraceSecs": 2 }
    })
}

/// Polls `status` over one library connection (cheap, so the polling does not weigh on what is measured) until
/// `slot`'s run is no longer busy.
fn wait_done(d: &Daemon, slot: &str, limit: Duration) -> Value {
    let paths = Paths::resolve(Some(&d.state_dir()), Some(&d.runtime_dir())).unwrap();
    let mut client = Client::connect(&paths).unwrap();
    let start = Instant::now();
    loop {
        let Reply::Status(report) = client.call(Request::Status).unwrap() else { panic!("not a status reply") };
        let row = report.slots.into_iter().find(|s| s.slot == slot).expect("slot exists");
        if !row.state.is_running() {
            return serde_json::to_value(row).unwrap();
        }
        assert!(start.elapsed() < limit, "{slot} still busy after {limit:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn daemon_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap().unwrap() as f64
}

fn daemon_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The benchmark's own child: this binary run as `--writer "lines BYTES"` (1 MiB writes of 100-byte lines) or
/// `--writer "per-line BYTES"` (one write(2) per line). Native, so the figures measure capture, not interpreter
/// start-up.
fn writer(spec: &str) {
    let mut parts = spec.split_whitespace();
    let (mode, total) = (parts.next().unwrap(), parts.next().unwrap().parse::<usize>().unwrap());
    let mut out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned().unwrap());
    let line = [b"w".repeat(99), b"\n".to_vec()].concat();
    match mode {
        "lines" => {
            let block = line.repeat((1 << 20) / line.len());
            let mut written = 0;
            while written < total {
                let n = block.len().min(total - written);
                out.write_all(&block[..n]).unwrap();
                written += n;
            }
        }
        "per-line" => (0..total / line.len()).for_each(|_| out.write_all(&line).unwrap()),
        // A silent run: `sleep SECS` (the number is seconds here).
        "sleep" => std::thread::sleep(Duration::from_secs(total as u64)),
        other => panic!("unknown writer mode {other}"),
    }
}

fn writer_config() -> Value {
    let exe = std::env::current_exe().unwrap();
    json!({
        "llms": { "bench": { "cliPath": exe.display().to_string(), "cliArgs": ["--writer", "{prompt}"] } },
        "supervisor": { "stopGraceSecs": 2 }
    })
}

/// The writer straight to a file, with nothing watching: the baseline.
fn alone(dir: &std::path::Path, spec: &str) -> f64 {
    let out = dir.join("alone.out");
    let start = Instant::now();
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--writer", spec])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(status.success());
    std::fs::remove_file(out).unwrap();
    secs
}

/// The same child as an autodevd run: from `assign` until `status` reports it completed.
fn supervised(d: &Daemon, issue: u64, spec: &str) -> f64 {
    let start = Instant::now();
    let slot = d.assign(issue, &[], spec);
    let row = wait_done(d, &slot, Duration::from_secs(600));
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(row["state"], "completed", "{row}");
    std::fs::remove_dir_all(d.state_dir().join("runs").join(row["run_id"].as_str().unwrap())).unwrap();
    secs
}

fn capture_cost(report: &mut Vec<String>, label: &str, spec: &str, rounds: usize) {
    let d = Daemon::start(&writer_config());
    let scratch = tempfile::tempdir().unwrap();
    let cpu_before = daemon_cpu_secs(d.pid());
    let (mut base, mut under) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        base.push(alone(scratch.path(), spec));
        under.push(supervised(&d, 1000 + i as u64, spec));
    }
    let daemon_cpu = (daemon_cpu_secs(d.pid()) - cpu_before) / rounds as f64;
    let (b, u) = (median(base), median(under));
    report.push(format!("| {label} | {b:.3} s | {u:.3} s | **{:.3}** | {daemon_cpu:.3} s |", u / b));
}

fn start_to_finished(report: &mut Vec<String>) {
    let d = Daemon::start(&writer_config());
    let scratch = tempfile::tempdir().unwrap();
    let rounds = if quick() { 5 } else { 30 };
    let (mut base, mut under) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        base.push(alone(scratch.path(), "lines 100") * 1000.0);
        under.push(supervised(&d, 5000 + i, "lines 100") * 1000.0);
    }
    report.push(format!(
        "| start one child until it is reported finished | **{:.1} ms** (the child alone: {:.1} ms) |",
        median(under),
        median(base)
    ));
}

fn status_latency(report: &mut Vec<String>, slots: u32) {
    let d = Daemon::start(&plain_config(slots));
    for i in 0..slots {
        d.assign(2000 + u64::from(i), &[], "@say busy\n@sleep 600");
    }
    // Measure the steady state, not 64 interpreters starting up.
    let start = Instant::now();
    while !d.status()["slots"].as_array().unwrap().iter().all(|s| s["console_preview"] == json!(["busy"])) {
        assert!(start.elapsed() < Duration::from_secs(120), "slots did not settle");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rounds = if quick() { 20 } else { 300 };
    let (mut times, mut trivial, mut version, mut in_process) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let paths = Paths::resolve(Some(&d.state_dir()), Some(&d.runtime_dir())).unwrap();
    let true_bin = if std::path::Path::new("/usr/bin/true").exists() { "/usr/bin/true" } else { "/bin/true" };
    // Alternating, so the noise of a shared machine hits each the same: the whole command; a trivial program (the
    // floor of any process); autodevctl doing nothing (`--version`); the request alone over an open connection.
    for _ in 0..rounds {
        let start = Instant::now();
        let out = d.ctl_command(&["status", "--json"]).output().unwrap();
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        assert!(out.status.success());
        let start = Instant::now();
        Command::new(true_bin).stdout(Stdio::piped()).output().unwrap();
        trivial.push(start.elapsed().as_secs_f64() * 1000.0);
        let start = Instant::now();
        d.ctl_command(&["--version"]).output().unwrap();
        version.push(start.elapsed().as_secs_f64() * 1000.0);
        let start = Instant::now();
        let mut client = Client::connect(&paths).unwrap();
        let Ok(Reply::Status(_)) = client.call(Request::Status) else { panic!("no status") };
        in_process.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    report.push(format!(
        "| the same, side by side: a trivial program (`true`), `autodevctl --version`, the request alone (connect, \
         status, decode, in-process) | {:.2} ms, {:.2} ms, {:.2} ms (medians, {rounds} runs each) |",
        median(trivial),
        median(version),
        median(in_process)
    ));
    let busy = d.status()["slots"].as_array().unwrap().iter().filter(|s| s["state"] == "in_progress").count();
    assert_eq!(busy, slots as usize);
    let p90 = {
        let mut t = times.clone();
        t.sort_by(|a, b| a.total_cmp(b));
        t[t.len() * 9 / 10]
    };
    report.push(format!(
        "| `autodevctl status --json`, {slots} busy slots, whole process | median **{:.2} ms**, p90 {p90:.2} ms ({rounds} runs) |",
        median(times)
    ));
}

fn flood_memory(report: &mut Vec<String>, slots: u32, bytes_each: u64) {
    let d = Daemon::start(&plain_config(slots));
    let start = Instant::now();
    for i in 0..slots {
        // Pinned slots: a quick run would otherwise free its slot for the next assignment.
        let slot = format!("bench-{}", i + 1);
        d.assign(3000 + u64::from(i), &["--slot", &slot], &format!("@flood {bytes_each}\n@ansi\n@bigline 10000000"));
    }
    for i in 1..=slots {
        let row = wait_done(&d, &format!("bench-{i}"), Duration::from_secs(900));
        assert_eq!(row["state"], "completed", "{row}");
    }
    let secs = start.elapsed().as_secs_f64();
    let hwm = daemon_kb(d.pid(), "VmHWM");
    let total_gib = (bytes_each * u64::from(slots)) as f64 / f64::from(1 << 30);
    report.push(format!(
        "| daemon peak RSS (VmHWM), {slots} slots flooding {total_gib:.1} GiB in all ({:.1} s) | **{:.1} MiB** |",
        secs,
        hwm as f64 / 1024.0
    ));
    let _ = std::fs::remove_dir_all(d.state_dir().join("runs"));
}

fn idle_cpu(report: &mut Vec<String>, slots: u32, secs: u64) {
    let d = Daemon::start(&plain_config(slots));
    for i in 0..slots {
        d.assign(4000 + u64::from(i), &[], &format!("@say ready\n@sleep {}", secs + 60));
    }
    // Let start-up output settle before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let before = daemon_cpu_secs(d.pid());
    std::thread::sleep(Duration::from_secs(secs));
    let used = daemon_cpu_secs(d.pid()) - before;
    let rss = daemon_kb(d.pid(), "VmRSS");
    report.push(format!(
        "| daemon CPU over {secs} s with {slots} silent slots | **{used:.3} s** (RSS {:.1} MiB) |",
        rss as f64 / 1024.0
    ));
}

/// A lockfile as version 1 wrote it (before the task state machine): the phase as a `state` string.
fn as_version_1(lock: &autodev::ledger::SlotLock) -> Vec<u8> {
    let mut v = serde_json::to_value(lock).unwrap();
    let map = v.as_object_mut().unwrap();
    map.remove("phase");
    let restarts = map.remove("restarts").unwrap();
    map.insert("auto_resumes".into(), restarts);
    map.insert("state".into(), json!("in_progress"));
    map.insert("reason".into(), Value::Null);
    map.insert("version".into(), json!(1));
    serde_json::to_vec(&v).unwrap()
}

/// Start-up recovery: autodevd killed with 256 lockfiles in its state dir (a third alive runs to adopt, a third
/// dead runs whose output holds no final event, a third corrupt files), restarted; the time until `status`
/// answers. With `old_format`, every lockfile is of version 1 and migrates in memory.
fn recovery_startup(report: &mut Vec<String>, old_format: bool) {
    let (alive, dead, corrupt) = (86usize, 85usize, 85usize);
    let mut config = writer_config();
    config["llms"]["bench"]["maxConcurrentIssues"] = json!(alive + dead);
    let mut d = Daemon::start(&config);
    for i in 0..alive {
        d.assign(6000 + i as u64, &["--slot", &format!("bench-{}", i + 1)], "sleep 900");
    }
    let template: autodev::ledger::SlotLock =
        serde_json::from_str(&std::fs::read_to_string(d.state_dir().join("slots/bench-1.lock")).unwrap()).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let rounds = if quick() { 3 } else { 15 };
    let mut times = Vec::new();
    let slots = d.state_dir().join("slots");
    if old_format {
        for i in 0..alive {
            let path = slots.join(format!("bench-{}.lock", i + 1));
            let lock: autodev::ledger::SlotLock = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            std::fs::write(&path, as_version_1(&lock)).unwrap();
        }
    }
    // A dead run's output, without a final event: recovery reads its tail to know it did not finish.
    let output: String = (0..400).map(|i| format!("{{\"type\":\"assistant\",\"message\":{{\"content\":[{{\"type\":\"text\",\"text\":\"line {i} of a run that died\"}}]}}}}\n")).collect();
    for _ in 0..rounds {
        d.kill9();
        for i in 0..dead {
            let slot = format!("bench-{}", alive + i + 1);
            let mut lock = template.clone();
            (lock.slot, lock.issue, lock.pid, lock.pgid) =
                (slot.clone(), 7000 + i as u64, Some(dead_pid), Some(dead_pid));
            lock.run_id = format!("01DEAD{i:020}");
            let run_dir = d.state_dir().join("runs").join(&lock.run_id);
            std::fs::create_dir_all(&run_dir).unwrap();
            std::fs::write(run_dir.join("stdout"), &output).unwrap();
            lock.stdout = run_dir.join("stdout");
            let bytes = if old_format { as_version_1(&lock) } else { serde_json::to_vec(&lock).unwrap() };
            std::fs::write(slots.join(format!("{slot}.lock")), bytes).unwrap();
        }
        for i in 0..corrupt {
            std::fs::write(slots.join(format!("bench-{}.lock", 500 + i)), b"{\"version\": 1, \"slot\": tor").unwrap();
        }
        let paths = Paths::resolve(Some(&d.state_dir()), Some(&d.runtime_dir())).unwrap();
        let start = Instant::now();
        d.process = Some(d.daemon_command().spawn().unwrap());
        let report = loop {
            if let Ok(mut client) = Client::connect(&paths)
                && let Ok(Reply::Status(report)) = client.call(Request::Status)
            {
                break report;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "autodevd did not answer");
            std::thread::sleep(Duration::from_micros(200));
        };
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            let log = std::fs::read_to_string(d.stderr_path()).unwrap_or_default();
            if let Some(line) = log.lines().rev().find(|l| l.contains("recovery: ")) {
                eprintln!("{:.1} ms: {line}", times.last().unwrap());
            }
        }
        let count = |state: SlotState| report.slots.iter().filter(|s| s.state == state).count();
        if count(SlotState::InProgress) != alive {
            for s in
                report.slots.iter().filter(|s| s.state != SlotState::InProgress && s.issue.is_some_and(|i| i < 7000))
            {
                eprintln!("NOT ALIVE: {} {:?} {:?} {:?}", s.slot, s.state, s.reason, s.pid);
            }
            for line in d.daemon_log().lines().filter(|l| {
                !l.contains("abandoned: process") && !l.contains("lockfile was unreadable") && !l.contains("01DEAD")
            }) {
                eprintln!("LOG {line}");
            }
        }
        assert_eq!((count(SlotState::InProgress), count(SlotState::Abandoned)), (alive, dead));
        assert_eq!(report.warnings.len(), corrupt);
    }
    let which = if old_format { "format version 1, migrated in memory" } else { "today's format" };
    report.push(format!(
        "| start-up recovery of 256 lockfiles ({alive} alive, {dead} dead, {corrupt} corrupt; {which}) until \
         `status` answers, whole daemon start | median **{:.1} ms** ({rounds} restarts) |",
        median(times)
    ));
}

/// `autodevctl stop` of a run whose tree is 200 processes (`sleep`s the fake CLI forked), until the reply: with a
/// cgroup per run and with process groups only, alternating. `ignoring`: the 200 ignore SIGTERM, so the stop
/// takes the grace period (2 s) and then kills.
fn stop_tree(report: &mut Vec<String>, ignoring: bool) {
    let rounds = if quick() { 1 } else { 5 };
    let mode = if ignoring { " ignore-term" } else { "" };
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut daemons: Vec<Daemon> = ["auto", "process-group"]
        .iter()
        .map(|containment| {
            let mut c = plain_config(1);
            c["supervisor"]["containment"] = json!(containment);
            Daemon::start(&c)
        })
        .collect();
    assert_eq!(daemons[0].status()["containment"], "cgroup", "this machine gives no cgroups to compare");
    for round in 0..rounds {
        for (i, d) in daemons.iter_mut().enumerate() {
            let slot = d.assign(900 + round as u64, &[], &format!("@forks 200{mode}\n@say up\n@sleep 600"));
            let run_id = d.slot(&slot)["run_id"].as_str().unwrap().to_string();
            let record = common::wait_until("the 200 forks", || {
                let text = std::fs::read_to_string(d.records.join(format!("fake-record-{run_id}.json"))).ok()?;
                let record: Value = serde_json::from_str(&text).ok()?;
                (record["forks"].as_array()?.len() == 200).then_some(record)
            });
            let start = Instant::now();
            d.ctl(&["stop", &slot]);
            times[i].push(start.elapsed().as_secs_f64() * 1000.0);
            let forks = record["forks"].as_array().unwrap();
            assert!(forks.iter().all(|p| !common::alive(p.as_i64().unwrap())), "a fork outlived stop");
        }
    }
    let which = if ignoring { "ignoring SIGTERM (2 s grace, then kill)" } else { "ending on SIGTERM" };
    report.push(format!(
        "| `stop` of a run with a tree of 200 processes {which}, until the reply | cgroup **{:.0} ms**, process group \
         {:.0} ms (medians of {rounds}) |",
        median(times[0].clone()),
        median(times[1].clone())
    ));
}

/// Daemon memory while 100 clients each stall one byte short of a 6 MiB request (the largest a request may be), and
/// whether `status` still answers meanwhile (by time to answer).
fn stalled_clients(report: &mut Vec<String>) {
    use std::os::unix::net::UnixStream;
    let d = Daemon::start(&plain_config(1));
    let pid = d.pid();
    let before = daemon_kb(pid, "VmRSS:");
    let len: u32 = 6 << 20;
    let writers: Vec<_> = (0..100)
        .map(|_| {
            let socket = d.socket();
            std::thread::spawn(move || common::stalled_client(&socket, len))
        })
        .collect();
    let _held: Vec<UnixStream> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let start = Instant::now();
    d.status();
    let status_ms = start.elapsed().as_secs_f64() * 1000.0;
    let peak = daemon_kb(pid, "VmHWM:");
    report.push(format!(
        "| daemon peak RSS (VmHWM) while 100 clients stall one byte short of a 6 MiB request | **{:.1} MiB** (before: \
         {:.1} MiB); `autodevctl status` meanwhile: {status_ms:.0} ms |",
        peak as f64 / 1024.0,
        before as f64 / 1024.0
    ));
}

/// Daemon memory across `logs -n 100000000` (rendered and raw) of a 200 MiB log: it must not grow with the count
/// or the log.
fn logs_memory(report: &mut Vec<String>) {
    let bytes: u64 = if quick() { 20 << 20 } else { 200 << 20 };
    let d = Daemon::start(&plain_config(1));
    let slot = d.assign(1, &[], &format!("@flood {bytes}"));
    wait_done(&d, &slot, Duration::from_secs(600));
    let pid = d.pid();
    let before = daemon_kb(pid, "VmHWM:");
    let mut times = Vec::new();
    for args in [vec!["logs", "-n", "100000000", &slot], vec!["logs", "--raw", "-n", "100000000", &slot]] {
        let start = Instant::now();
        let status = d.ctl_command(&args).stdout(Stdio::null()).status().unwrap();
        assert!(status.success());
        times.push(start.elapsed().as_secs_f64());
    }
    let after = daemon_kb(pid, "VmHWM:");
    report.push(format!(
        "| daemon peak RSS (VmHWM) before and after `logs -n 100000000` and `logs --raw -n 100000000` of a {} MiB \
         log | **{:.1} → {:.1} MiB** ({:.1} s and {:.1} s to stream it) |",
        bytes >> 20,
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        times[0],
        times[1]
    ));
}

/// Preparing a reused worktree for a new task in a repository of 10,000 files (fetch from a local `origin`, safety
/// checks, switch to the new branch), through the library call autodevd makes.
fn worktree_reuse(report: &mut Vec<String>) {
    let files = if quick() { 1_000 } else { 10_000 };
    let top = tempfile::tempdir().unwrap();
    let repo = top.path().join("repo");
    let git = |dir: &std::path::Path, args: &[&str]| {
        let out = Command::new("git").arg("-C").arg(dir).args(args).output().unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "--quiet", "-b", "main"]);
    git(&repo, &["config", "user.email", "bench@example.invalid"]);
    git(&repo, &["config", "user.name", "Bench"]);
    for i in 0..files {
        let dir = repo.join(format!("src/m{:03}", i / 100));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}.rs")), format!("pub fn f{i}() -> u32 {{ {i} }}\n")).unwrap();
    }
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "--quiet", "-m", "ten thousand files"]);
    let bare = top.path().join("origin.git");
    git(top.path(), &["clone", "--quiet", "--bare", repo.to_str().unwrap(), bare.to_str().unwrap()]);
    git(&repo, &["remote", "add", "origin", bare.to_str().unwrap()]);
    git(&repo, &["fetch", "--quiet", "origin"]);
    git(&repo, &["remote", "set-head", "origin", "main"]);
    let config = autodev::config::WorktreeConfig::default();
    let first = autodev::workspace::prepare(&repo, &config, "claude-1", 1, "first task", &[], false).unwrap();
    let rounds = if quick() { 3 } else { 15 };
    let mut times = Vec::new();
    for i in 0..rounds {
        let start = Instant::now();
        let p =
            autodev::workspace::prepare(&repo, &config, "claude-1", 2 + i, &format!("task {i}"), &[], false).unwrap();
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(p.path, first.path, "the clean worktree is reused");
    }
    report.push(format!(
        "| preparing a reused worktree for a new task, repository of {files} files (fetch, safety checks, new \
         branch) | median **{:.0} ms** ({rounds} tasks) |",
        median(times)
    ));
}

/// Health sampling of 64 running slots: daemon CPU over a period, as a share of one core, at a sample every
/// second (ten times the default rate) and at the default 10 s.
fn health_sampling(report: &mut Vec<String>) {
    let slots = 64u32;
    let secs = if quick() { 5 } else { 30 };
    for sample_secs in [1.0, 10.0] {
        let mut config = writer_config();
        config["llms"]["bench"]["maxConcurrentIssues"] = json!(slots);
        config["health"] = json!({ "sampleSecs": sample_secs });
        let d = Daemon::start(&config);
        for i in 0..slots {
            d.assign(8000 + u64::from(i), &[], "sleep 900");
        }
        std::thread::sleep(Duration::from_secs(2));
        let before = daemon_cpu_secs(d.pid());
        std::thread::sleep(Duration::from_secs(secs));
        let used = daemon_cpu_secs(d.pid()) - before;
        let sampled = d.status()["slots"].as_array().unwrap().iter().filter(|s| s["memory_mb"].is_number()).count();
        assert_eq!(sampled, slots as usize, "every slot is sampled");
        report.push(format!(
            "| health sampling of {slots} running slots, a sample every {sample_secs} s | **{:.3}% of one core** ({used:.3} s CPU in {secs} s) |",
            used / secs as f64 * 100.0
        ));
    }
}

/// GitHub requests of the autopilot at idle (a free slot, nothing Ready) on boards of 100 and 1,000 items, per
/// poll and per hour at the default poll of 60 s; and the requests of one task's life with a warm cache.
fn autopilot_requests(report: &mut Vec<String>) {
    use common::fake_github::FakeGitHub;
    let config = |fake: &FakeGitHub| {
        let mut c = fake.board_config(1);
        c["push"] = json!({ "enabled": false });
        c["autopilot"] = json!({ "enabled": true, "pollSecs": 0.2 });
        c
    };
    let turns = |d: &Daemon| -> u64 {
        let r: Value = serde_json::from_str(&d.ctl(&["autopilot", "status", "--json"])).unwrap();
        r["turns"].as_u64().unwrap()
    };
    let polls = if quick() { 22 } else { 110 };
    for items in [100u64, 1000] {
        let fake = FakeGitHub::start("TEXT");
        for n in 1..=items {
            fake.add_issue(n, &format!("Issue {n}"), true);
            fake.set_value(n, "Status", "Done");
        }
        let d = Daemon::start(&config(&fake));
        // Warm: the first read of the board and its fields.
        let start = turns(&d);
        common::wait_until("a first poll", || (turns(&d) > start + 1).then_some(()));
        let (t0, r0) = (turns(&d), fake.operations().len());
        let began = Instant::now();
        while turns(&d) < t0 + polls {
            std::thread::sleep(Duration::from_millis(50));
        }
        let r1 = fake.operations().len();
        let elapsed = began.elapsed().as_secs_f64();
        // Turns also come from wake-ups; the board is read at most once per poll interval.
        let poll_intervals = (elapsed / 0.2).max(1.0);
        let per_poll = (r1 - r0) as f64 / poll_intervals;
        report.push(format!(
            "| autopilot at idle, board of {items} items (none Ready), a free slot | **{:.2} requests per poll → {:.0} per hour** at the default poll of 60 s ({} requests in {:.1} s of polls every 0.2 s) |",
            per_poll,
            per_poll * 60.0,
            r1 - r0,
            elapsed
        ));
        if items == 100 {
            // One task's life with a warm cache: taken from the board, run, done on the board.
            fake.set_value(7, "Status", "Ready");
            fake.lock().issues.get_mut(&7).unwrap().body = "@say done".into();
            let before = fake.operations().len();
            common::wait_until("#7 to be done on the board", || {
                (fake.value(7, "Status").as_deref() == Some("Done") && fake.value(7, "Assigned Instance").is_none())
                    .then_some(())
            });
            let ops: Vec<String> =
                fake.operations()[before..].iter().filter(|o| !o.starts_with("Board")).cloned().collect();
            report.push(format!(
                "| one task's life from the board with a warm cache (push off), besides the polls' board reads | **{} requests**: {} |",
                ops.len(),
                ops.join(", ")
            ));
        }
    }
}

/// What the fleet (GitHub backend) costs one machine in GitHub requests: at idle, per heartbeat (scaled to the
/// default 60 s), and for one task's claim, checks and release.
fn fleet_requests(report: &mut Vec<String>) {
    use common::fake_github::FakeGitHub;
    let fake = FakeGitHub::start("TEXT");
    for n in 1..=100 {
        fake.add_issue(n, &format!("Issue {n}"), true);
        fake.set_value(n, "Status", "Done");
    }
    let mut c = fake.board_config(1);
    c["github"]["writeSpacingSecs"] = json!(0);
    c["statusComments"] = json!({ "enabled": true, "intervalSecs": 60 });
    c["push"] = json!({ "enabled": false });
    c["autopilot"] = json!({ "enabled": true, "pollSecs": 0.2 });
    let beat = 0.2;
    c["fleet"] = json!({ "enabled": true, "machine": "bench", "heartbeatSecs": beat, "staleAfterSecs": 4 });
    let d = Daemon::start(&c);
    let fleet_ops = |from: usize| -> (usize, usize, Vec<String>) {
        let s = fake.lock();
        let mut texts = Vec::new();
        let (mut writes, mut reads) = (0, 0);
        for (l, seen) in s.log[from..].iter().zip(&s.seen[from..]) {
            let op = l.operation.clone().unwrap_or_else(|| format!("{} {}", l.method, l.path));
            let fleet = matches!(l.operation.as_deref(), Some("FleetRefs" | "UpdateRefs")) || l.path.contains("/git/");
            if fleet {
                if l.method == "GET" || l.operation.as_deref() == Some("FleetRefs") {
                    reads += 1;
                } else {
                    writes += 1;
                }
                if seen.contains("claims/7") || seen.contains("claim #7") || l.path.contains("claims/7") {
                    texts.push(op);
                }
            }
        }
        (writes, reads, texts)
    };
    std::thread::sleep(Duration::from_secs(2));
    let beats = if quick() { 25.0 } else { 150.0 };
    let from = fake.lock().log.len();
    let began = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(beats * beat));
    let (writes, reads, _) = fleet_ops(from);
    let intervals = began.elapsed().as_secs_f64() / beat;
    report.push(format!(
        "| fleet (github) at idle, one machine | **{:.2} writes and {:.2} reads per heartbeat → {:.0} writes and {:.0} reads an hour** at the default heartbeat of 60 s ({writes} writes, {reads} reads in {:.0} heartbeats of {beat} s) |",
        writes as f64 / intervals,
        reads as f64 / intervals,
        writes as f64 / intervals * 60.0,
        reads as f64 / intervals * 60.0,
        intervals
    ));
    // One task's life from the board: what its claim costs besides the heartbeats.
    fake.set_value(7, "Status", "Ready");
    fake.lock().issues.get_mut(&7).unwrap().body = "@say done".into();
    let from = fake.lock().log.len();
    common::wait_until("#7 to be done and its claim released", || {
        let released = !fake.lock().refs.keys().any(|r| r.ends_with("claims/7"));
        (fake.value(7, "Status").as_deref() == Some("Done") && released && !fake.lock().refs.is_empty()).then_some(())
    });
    let (_, _, claim_ops) = fleet_ops(from);
    let checks = claim_ops.iter().filter(|o| o.starts_with("GET")).count();
    report.push(format!(
        "| one task's claim from the board (status comments on), besides heartbeats | **{} requests**: {} write(s) to claim and release, {checks} check(s) before the task's GitHub writes ({}) |",
        claim_ops.len(),
        claim_ops.len() - checks,
        claim_ops.join(", ")
    ));
    drop(d);
}

/// The live feed with 64 busy slots, each printing 100 lines a second: frames and bytes per second a subscriber
/// gets, and the daemon's CPU with one subscriber (what `top` or the dashboard hold) against none, alternating.
fn feed_cost(report: &mut Vec<String>) {
    let slots = 64;
    let secs = if quick() { 3 } else { 10 };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut config = plain_config(slots);
    config["dashboard"] = json!({ "listen": format!("127.0.0.1:{port}") });
    let d = Daemon::start(&config);
    for i in 0..slots {
        d.assign(9000 + u64::from(i), &[], "@ticks 1000000 0.01");
    }
    std::thread::sleep(Duration::from_secs(2));
    let paths = Paths::resolve(Some(&d.state_dir()), Some(&d.runtime_dir())).unwrap();
    let (mut with, mut without, mut frames, mut bytes) = (Vec::new(), Vec::new(), 0u64, 0u64);
    for _ in 0..2 {
        let before = daemon_cpu_secs(d.pid());
        std::thread::sleep(Duration::from_secs(secs));
        without.push(daemon_cpu_secs(d.pid()) - before);

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counted = std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64)));
        let (stop2, counted2, paths2) = (stop.clone(), counted.clone(), paths.clone());
        let reader = std::thread::spawn(move || {
            let mut client = Client::connect(&paths2).unwrap();
            client.send(Request::Subscribe).unwrap();
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok(autodev::protocol::Frame::Json(payload)) = client.next_frame() else { break };
                let mut c = counted2.lock().unwrap();
                c.0 += 1;
                c.1 += payload.len() as u64;
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        *counted.lock().unwrap() = (0, 0);
        let before = daemon_cpu_secs(d.pid());
        std::thread::sleep(Duration::from_secs(secs));
        with.push(daemon_cpu_secs(d.pid()) - before);
        let (f, b) = *counted.lock().unwrap();
        (frames, bytes) = (frames + f, bytes + b);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(reader);
    }
    // A browser's part: the dashboard's event stream, read as fast as it comes.
    let url = d.ctl(&["dashboard", "url"]);
    let session = {
        use std::io::Read;
        let path = url.trim().split_once(&format!("{port}")).unwrap().1.to_string();
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut head = String::new();
        stream.read_to_string(&mut head).unwrap();
        let line = head.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap().to_string();
        line.split_once(": ").unwrap().1.split(';').next().unwrap().to_string()
    };
    let mut browser_cpu = Vec::new();
    let mut sse_bytes = 0u64;
    for _ in 0..2 {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop2, counted2, session2) = (stop.clone(), counted.clone(), session.clone());
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let request = format!("GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {session2}\r\n\r\n");
            stream.write_all(request.as_bytes()).unwrap();
            stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                match stream.read(&mut buf) {
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        counted2.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        counted.store(0, std::sync::atomic::Ordering::SeqCst);
        let before = daemon_cpu_secs(d.pid());
        std::thread::sleep(Duration::from_secs(secs));
        browser_cpu.push(daemon_cpu_secs(d.pid()) - before);
        sse_bytes += counted.load(std::sync::atomic::Ordering::SeqCst);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = reader.join();
    }
    let total = (2 * secs) as f64;
    let browser = browser_cpu.iter().sum::<f64>() / total * 100.0;
    report.push(format!(
        "| dashboard `/events` with those {slots} slots, one reader | **{:.0} KiB/s; daemon CPU {browser:.1}% of one core** |",
        sse_bytes as f64 / total / 1024.0
    ));
    let (with, without) = (with.iter().sum::<f64>() / total * 100.0, without.iter().sum::<f64>() / total * 100.0);
    report.push(format!(
        "| live feed, {slots} slots printing 100 lines/s each, one subscriber | **{:.1} frames/s, {:.0} KiB/s** |",
        frames as f64 / total,
        bytes as f64 / total / 1024.0
    ));
    report.push(format!(
        "| daemon CPU with those {slots} slots: no subscriber → one subscriber (alternating, {} s each) | **{without:.1}% → {with:.1}% of one core** |",
        2 * secs
    ));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--writer") {
        return writer(&args[i + 1]);
    }
    // BENCH_ONLY=capture,status,memory,idle,latency,recovery,worktree,health,stop,socket,logs,autopilot,feed,fleet runs only
    // those sections.
    let only = std::env::var("BENCH_ONLY").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == name));
    let (gib, rounds) = if quick() { (64u64 << 20, 2) } else { (1u64 << 30, 5) };
    let mut capture = vec![
        "| child output | child alone, to a file | under autodevd | ratio | daemon CPU per run |".to_string(),
        "|---|---|---|---|---|".to_string(),
    ];
    if wanted("capture") {
        capture_cost(&mut capture, &format!("{} MiB of 100-byte lines", gib >> 20), &format!("lines {gib}"), rounds);
        let per_line = if quick() { 8u64 << 20 } else { 200u64 << 20 };
        capture_cost(
            &mut capture,
            &format!("{} MiB, one write(2) per line", per_line >> 20),
            &format!("per-line {per_line}"),
            rounds,
        );
    }

    let mut other = vec!["| figure | result |".to_string(), "|---|---|".to_string()];
    // Each section by its BENCH_ONLY name, in the order the report lists them.
    type Section = fn(&mut Vec<String>);
    let sections: [(&str, Section); 13] = [
        ("status", |o| status_latency(o, 64)),
        ("memory", |o| flood_memory(o, 64, if quick() { 4 << 20 } else { 64 << 20 })),
        ("idle", |o| idle_cpu(o, 64, if quick() { 5 } else { 60 })),
        ("latency", start_to_finished),
        ("recovery", |o| {
            recovery_startup(o, false);
            recovery_startup(o, true);
        }),
        ("worktree", worktree_reuse),
        ("health", health_sampling),
        ("logs", logs_memory),
        ("socket", stalled_clients),
        ("stop", |o| {
            stop_tree(o, false);
            stop_tree(o, true);
        }),
        ("autopilot", autopilot_requests),
        ("feed", feed_cost),
        ("fleet", fleet_requests),
    ];
    for (name, run) in sections {
        if wanted(name) {
            run(&mut other);
        }
    }

    println!("\n## Capture cost (medians of {rounds} alternating rounds)\n");
    println!("{}", capture.join("\n"));
    println!("\n## Status, memory, idle CPU, latency\n");
    println!("{}", other.join("\n"));
}
