//! `autodevctl top` as a person uses it: in a real terminal (tmux), with two busy slots: the rows and the live
//! console appear, a stop through the keys stops the slot, `q` quits. Without tmux the test says SKIPPED.

mod common;

use std::process::{Command, Output};

use common::{Daemon, fake_config, wait_until};

/// A tmux server of this test's own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().unwrap()
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn wait_for(&self, what: &str) -> String {
        wait_until(&format!("{what:?} on the screen"), || {
            let screen = self.screen();
            screen.contains(what).then_some(screen)
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn top_shows_the_slots_live_and_stops_one_from_the_keyboard() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED: tmux is not installed");
        return;
    }
    let d = Daemon::start(&fake_config(2));
    d.assign(1, &["--slot", "claude-1"], "First\n@say reading the parser\n@sleep 60");
    d.assign(2, &["--slot", "claude-2"], "Second\n@say writing the tests\n@sleep 60");
    d.wait_state("claude-1", "in_progress");
    d.wait_state("claude-2", "in_progress");
    let tmux = Tmux { socket: format!("autodev-top-{}", std::process::id()) };
    let command = format!(
        "env AUTODEV_STATE_DIR={} AUTODEV_RUNTIME_DIR={} {} top",
        d.state_dir().display(),
        d.runtime_dir().display(),
        env!("CARGO_BIN_EXE_autodevctl")
    );
    let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", "100", "-y", "30", &command]);
    assert!(started.status.success(), "{started:?}");
    let screen = tmux.wait_for("claude-2");
    assert!(screen.contains("claude-1") && screen.contains("in progress"), "{screen}");
    // The selected slot's console, live.
    tmux.wait_for("reading the parser");

    tmux.run(&["send-keys", "-t", "top", "Down"]);
    tmux.wait_for("writing the tests");
    tmux.run(&["send-keys", "-t", "top", "s"]);
    tmux.wait_for("Stop claude-2?");
    tmux.run(&["send-keys", "-t", "top", "y"]);
    d.wait_state("claude-2", "failed");
    assert_eq!(d.slot("claude-2")["end_cause"], "stopped");
    assert_eq!(d.slot("claude-1")["state"], "in_progress", "only the selected slot was stopped");
    tmux.wait_for("failed");

    tmux.run(&["send-keys", "-t", "top", "q"]);
    wait_until("top to quit", || {
        let listed = tmux.run(&["list-sessions"]);
        (!String::from_utf8_lossy(&listed.stdout).contains("top:")).then_some(())
    });
}

#[test]
fn top_without_a_terminal_says_what_to_use_instead() {
    let d = Daemon::start(&fake_config(1));
    let out = d.try_ctl(&["top"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a terminal"), "{out:?}");
}
