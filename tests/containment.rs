//! A cgroup per run: whatever a run starts (daemons that double-fork, call setsid and close every descriptor;
//! hundreds of children; processes that ignore SIGTERM) ends with the run: after `stop`, after the CLI's own exit,
//! after SIGTERM to autodevd, and after a crash of autodevd and a restart.

mod common;

use common::*;

/// The run's processes the fake CLI recorded: the daemonized grandchild and its forks.
fn tree(record: &serde_json::Value) -> Vec<i64> {
    let mut pids: Vec<i64> = record["forks"].as_array().into_iter().flatten().filter_map(|p| p.as_i64()).collect();
    pids.extend(record["daemon"].as_i64());
    pids
}

/// Starts a daemon; `None` (with a message) where this machine gives it no cgroups to make.
fn daemon_with_cgroups() -> Option<Daemon> {
    let d = Daemon::start(&fake_config(2));
    let status = d.status();
    if status["containment"] != "cgroup" {
        eprintln!(
            "SKIPPED: no cgroup containment here ({}): runs are contained by process groups",
            status["containment_note"]
        );
        return None;
    }
    Some(d)
}

/// Waits until the fake CLI has recorded its daemon and its forks, and checks they all live.
fn started_tree(d: &Daemon, slot: &str, forks: usize) -> (serde_json::Value, Vec<i64>) {
    let row = d.wait_state(slot, "in_progress");
    let run_id = row["run_id"].as_str().unwrap().to_string();
    let record = wait_until("the run's daemon and forks", || {
        let record = d.record(&run_id);
        (record["daemon"].is_i64() && record["forks"].as_array().is_some_and(|f| f.len() == forks)).then_some(record)
    });
    let pids = tree(&record);
    assert_eq!(pids.len(), forks + 1);
    assert!(pids.iter().all(|p| alive(*p)), "the run's tree did not start whole");
    (record, pids)
}

fn all_dead(pids: &[i64]) -> bool {
    pids.iter().all(|p| !alive(*p))
}

#[test]
fn stop_ends_a_daemonized_grandchild_200_forks_and_a_cli_that_ignores_sigterm() {
    let Some(d) = daemon_with_cgroups() else { return };
    d.assign(1, &[], "@ignore-term\n@daemonize\n@forks 200 ignore-term\n@say up\n@sleep 120");
    let (record, pids) = started_tree(&d, "claude-1", 200);
    let cli = record["pid"].as_i64().unwrap();
    d.ctl(&["stop", "claude-1"]);
    // `stop` answers once the run is over, and a run is over only when its cgroup is empty.
    assert!(all_dead(&pids) && !alive(cli), "a process of the run outlived `stop`");
    let row = d.slot("claude-1");
    assert_eq!(row["end_cause"], "stopped", "{row}");
    // The run's cgroup is gone with it.
    let base = d.cgroup_base().expect("the daemon names its cgroup base");
    assert!(!base.join(row["run_id"].as_str().unwrap()).exists(), "the run's cgroup was left behind");
}

#[test]
fn what_a_run_leaves_behind_ends_when_the_cli_exits_by_itself() {
    let Some(d) = daemon_with_cgroups() else { return };
    d.assign(2, &[], "@daemonize\n@forks 20\n@say bye");
    let row = d.wait_state("claude-1", "completed");
    let record = d.record(row["run_id"].as_str().unwrap());
    let pids = tree(&record);
    assert_eq!(pids.len(), 21, "{record}");
    assert!(all_dead(&pids), "a daemon started by the run outlived it");
    assert!(d.daemon_log().contains("the run left behind"), "{}", d.daemon_log());
}

#[test]
fn sigterm_to_autodevd_ends_every_process_of_every_run() {
    let Some(mut d) = daemon_with_cgroups() else { return };
    d.assign(3, &["--slot", "claude-1"], "@ignore-term\n@daemonize\n@forks 30 ignore-term\n@sleep 120");
    d.assign(4, &["--slot", "claude-2"], "@daemonize\n@sleep 120");
    let (_, mut pids) = started_tree(&d, "claude-1", 30);
    let second = wait_until("the second run's daemon", || {
        let row = d.slot("claude-2");
        d.record(row["run_id"].as_str()?)["daemon"].as_i64()
    });
    pids.push(second);
    assert!(d.terminate().success());
    assert!(all_dead(&pids), "a process of a run outlived autodevd's shutdown");
}

#[test]
fn after_a_crash_the_run_is_adopted_through_its_cgroup_and_leftovers_of_a_dead_run_are_stopped() {
    let Some(mut d) = daemon_with_cgroups() else { return };
    // One run lives on through the crash; the other's CLI dies meanwhile and leaves its daemon behind.
    d.assign(5, &["--slot", "claude-1"], "@close-fds\n@daemonize\n@forks 5\n@say up\n@sleep 120");
    d.assign(6, &["--slot", "claude-2"], "@daemonize\n@say up\n@sleep 120");
    let (record, living) = started_tree(&d, "claude-1", 5);
    let dying = wait_until("the second run's daemon", || {
        let row = d.slot("claude-2");
        let record = d.record(row["run_id"].as_str()?);
        Some((record["pid"].as_i64()?, record["daemon"].as_i64()?))
    });
    d.kill9();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dying.0 as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("the dead run's CLI to end", || (!alive(dying.0)).then_some(()));
    assert!(alive(dying.1), "the daemon of the dead run should still live before the restart");
    d.launch();
    // The CLI that closed every descriptor (its run lock too) is adopted: its cgroup proves it is the run.
    assert_eq!(d.slot("claude-1")["state"], "in_progress");
    assert_eq!(d.slot("claude-2")["state"], "abandoned");
    wait_until("the dead run's daemon to be stopped", || (!alive(dying.1)).then_some(()));
    d.ctl(&["stop", "claude-1"]);
    assert!(
        all_dead(&living) && !alive(record["pid"].as_i64().unwrap()),
        "a process of the adopted run outlived `stop`"
    );
}

#[test]
fn a_live_run_whose_lockfile_does_not_name_its_cgroup_is_adopted_not_swept() {
    let Some(mut d) = daemon_with_cgroups() else { return };
    d.assign(7, &[], "@say up\n@sleep 120");
    let row = d.wait_state("claude-1", "in_progress");
    let pid = d.record(row["run_id"].as_str().unwrap())["pid"].as_i64().unwrap();
    d.kill9();
    // As an autodevd from before cgroups wrote it.
    let lockfile = d.state_dir().join("slots/claude-1.lock");
    let mut lock: serde_json::Value = serde_json::from_slice(&std::fs::read(&lockfile).unwrap()).unwrap();
    assert!(lock.as_object_mut().unwrap().remove("cgroup").is_some(), "the lockfile names the run's cgroup");
    std::fs::write(&lockfile, serde_json::to_vec(&lock).unwrap()).unwrap();
    d.launch();
    assert_eq!(d.slot("claude-1")["state"], "in_progress");
    // Stray cgroups are swept right after start-up; give that every chance to (wrongly) hit this run.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        assert!(alive(pid), "the adopted run was swept away as a stray cgroup");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    d.ctl(&["stop", "claude-1"]);
    assert!(!alive(pid));
}

#[test]
fn a_run_whose_llm_left_the_config_is_kept_alive_through_a_restart() {
    let Some(mut d) = daemon_with_cgroups() else { return };
    d.assign(8, &["--llm", "gemini"], "@say up\n@sleep 120");
    let row = d.wait_state("gemini-1", "in_progress");
    let pid = d.record(row["run_id"].as_str().unwrap())["pid"].as_i64().unwrap();
    d.kill9();
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&d.config_path).unwrap()).unwrap();
    config["llms"].as_object_mut().unwrap().remove("gemini");
    std::fs::write(&d.config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    d.launch();
    // Its lockfile is kept and its issue held; its cgroup is not a stray to sweep.
    assert!(d.status()["warnings"].to_string().contains("no longer in the config"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        assert!(alive(pid), "the run of an LLM gone from the config was swept away");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
}
