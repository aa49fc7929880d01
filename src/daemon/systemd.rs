//! systemd: READY=1 once recovery is done and the socket answers, STATUS= with a one-line summary, WATCHDOG=1 from
//! the main loop (so a wedged loop gets restarted), STOPPING=1 on shutdown. Without NOTIFY_SOCKET it does nothing
//! and says nothing.

use std::time::Duration;

use sd_notify::NotifyState;

pub struct Notifier {
    enabled: bool,
    last_status: std::sync::Mutex<String>,
    /// A notify socket that does not work is reported once, not at every watchdog ping.
    warned: std::sync::atomic::AtomicBool,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
            last_status: std::sync::Mutex::new(String::new()),
            warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if self.enabled
            && let Err(e) = sd_notify::notify(states)
            && !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
        *self.last_status.lock().unwrap_or_else(|e| e.into_inner()) = status.to_string();
    }

    /// Sends STATUS= when the summary changed.
    pub fn status(&self, status: &str) {
        let mut last = self.last_status.lock().unwrap_or_else(|e| e.into_inner());
        if *last != status {
            self.send(&[NotifyState::Status(status)]);
            *last = status.to_string();
        }
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping every run")]);
    }

    /// How often to ping the watchdog: half its timeout, if systemd set one.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        sd_notify::watchdog_enabled().map(|d| (d / 2).max(Duration::from_millis(10)))
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }
}
