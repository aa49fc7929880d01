//! A control socket no client can wedge: clients that stall mid-request, a thousand idle connections, a request
//! that never finishes. Each time `status` still answers, and the daemon says why it closed a connection.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::{Daemon, fake_config, stalled_client, wait_until};

/// A frame header: kind `J` (JSON) and a big-endian length.
fn header(len: u32) -> Vec<u8> {
    let mut h = vec![b'J'];
    h.extend_from_slice(&len.to_be_bytes());
    h
}

/// What the daemon says before it closes `stream` (the text of its error frame), or "" if it just closes.
fn last_words(stream: &mut UnixStream) -> String {
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn clients_stalled_one_byte_short_of_a_big_request_are_dropped_and_status_still_answers() {
    let d = Daemon::start(&fake_config(1));
    let len: u32 = 6 << 20;
    let writers: Vec<_> = (0..100)
        .map(|_| {
            let socket = d.socket();
            std::thread::spawn(move || stalled_client(&socket, len))
        })
        .collect();
    let mut stalled: Vec<UnixStream> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    // Every one of them holds a stalled request; together they would hold 600 MiB: most are dropped, with a reason.
    let status = d.status();
    assert_eq!(status["slots"][0]["state"], "ready");
    let dropped = stalled
        .iter_mut()
        .take(10)
        .map(last_words)
        .filter(|w| w.contains("too much memory") || w.contains("make room"))
        .count();
    assert!(dropped > 0, "no stalled client was dropped");
}

#[test]
fn a_thousand_idle_connections_never_keep_status_from_answering() {
    let d = Daemon::start(&fake_config(1));
    let mut idle: Vec<UnixStream> = (0..1100).map(|_| UnixStream::connect(d.socket()).unwrap()).collect();
    // Each new client makes room by closing the longest-idle one (supervisor.maxClients, default 64).
    d.status();
    assert!(d.ctl(&["assign", "1", "--prompt", "@say hello"]).contains("claude-1"));
    let words = last_words(&mut idle[0]);
    assert!(words.contains("make room"), "{words:?}");
}

#[test]
fn a_request_that_never_finishes_is_closed_after_ten_seconds_with_the_reason() {
    let d = Daemon::start(&fake_config(1));
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.write_all(&header(100)).unwrap();
    s.write_all(b"{\"v\":").unwrap();
    let words = last_words(&mut s);
    assert!(words.contains("did not arrive whole within 10s"), "{words:?}");
    d.status();
}

#[test]
fn children_get_back_the_descriptor_limit_autodevd_started_with() {
    let mut d = Daemon::prepare(&fake_config(1), None, &[]);
    let mut command = d.daemon_command();
    // SAFETY: setrlimit between fork and exec, on a struct on the stack.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 1024, rlim_max: 4096 };
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            Ok(())
        });
    }
    d.process = Some(command.spawn().unwrap());
    wait_until("autodevd to answer", || d.try_ctl(&["status"]).status.success().then_some(()));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    assert_eq!(line.split_whitespace().nth(3), Some("4096"), "autodevd did not raise its own limit: {line}");
    d.assign(1, &[], "@say hi");
    let row = d.wait_state("claude-1", "completed");
    let record = d.record(row["run_id"].as_str().unwrap());
    assert_eq!(record["nofile"][0], 1024, "the child did not get the old limit back: {record}");
}

#[test]
fn a_follower_that_hangs_up_gives_its_place_back_even_while_the_run_is_silent() {
    let mut c = fake_config(1);
    c["supervisor"]["maxStreams"] = serde_json::json!(1);
    let d = Daemon::start(&c);
    d.assign(1, &[], "@say up\n@sleep 60");
    d.wait_state("claude-1", "in_progress");
    let mut follower = d.ctl_command(&["logs", "-f", "claude-1"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    // It follows once its first line arrived.
    let mut line = String::new();
    let mut out = std::io::BufReader::new(follower.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(!line.is_empty());
    // While it follows, a second follower is refused: one stream at most.
    let refused = d.ctl_command(&["logs", "-f", "claude-1"]).output().unwrap();
    assert!(String::from_utf8_lossy(&refused.stderr).contains("follow logs already"), "{refused:?}");
    follower.kill().unwrap();
    follower.wait().unwrap();
    // The run prints nothing more, yet the place comes back.
    let mut second = d.ctl_command(&["logs", "-f", "claude-1"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut first_line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(second.stdout.take().unwrap()), &mut first_line).unwrap();
    assert!(!first_line.is_empty(), "the second follower got no log line (refused?)");
    second.kill().unwrap();
    let _ = second.wait();
    d.ctl(&["stop", "claude-1"]);
}
