//! Tells people: one event per transition (`completed`, `failed`, `stale`, `needs_info`, `blocked`,
//! `usage_limit`, `abandoned`, `pr_opened`, `budget`) to `notifications.command` (argv, the event's JSON on stdin,
//! a clean environment), `notifications.webhooks` (a JSON POST) and the seed's Slack and Discord webhooks.
//!
//! An event is written to `notifications.json` before anything is sent and leaves it once every sink took it, so a
//! crash never loses one; delivery is at least once (receivers drop duplicates by `id`). Each transition has a key
//! that is remembered, so a restart that finds the same facts (a run found dead again) never sends it twice.
//! Sinks are tried in the background with a timeout and a few retries: a dead receiver delays nothing.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use serde::{Deserialize, Serialize};

use crate::config::NotificationsConfig;
use crate::task::{AgentSignal, EndCause, Event as TaskEvent, Phase, WaitFor};
use crate::timefmt::rfc3339;

/// How long one delivery may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries per sink before an event is given up for it (1, 2, 4, 8 s apart).
const MAX_ATTEMPTS: u32 = 5;
/// Transitions remembered as sent (the newest).
const KEYS_KEPT: usize = 2_000;
/// Events waiting at most; beyond it the oldest are dropped (a sink dead for days must not fill the disk).
const MAX_PENDING: usize = 200;
const FORMAT_VERSION: u32 = 1;

/// What people are told.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub id: String,
    pub event: String,
    pub slot: Option<String>,
    pub issue: Option<u64>,
    pub title: Option<String>,
    pub state: Option<String>,
    pub end_cause: Option<String>,
    pub reason: Option<String>,
    pub pr_url: Option<String>,
    pub run_id: Option<String>,
    pub machine: String,
    pub at: String,
}

impl Event {
    /// A new event of `kind` (its id and time are set; the rest is the caller's).
    pub fn new(kind: &str) -> Event {
        Event {
            id: ulid::Ulid::new().to_string(),
            event: kind.to_string(),
            slot: None,
            issue: None,
            title: None,
            state: None,
            end_cause: None,
            reason: None,
            pr_url: None,
            run_id: None,
            machine: machine().to_string(),
            at: rfc3339(SystemTime::now()),
        }
    }

    /// One line for chat: `claude-1 completed #12 Fix the login bug: … (PR …)`.
    fn line(&self) -> String {
        let mut line = format!("autodev: {} {}", self.slot.as_deref().unwrap_or("-"), self.event.replace('_', " "));
        if let Some(issue) = self.issue {
            line.push_str(&format!(" #{issue}"));
        }
        if let Some(title) = &self.title {
            line.push_str(&format!(" {title}"));
        }
        if let Some(reason) = &self.reason {
            line.push_str(&format!(": {}", reason.chars().take(300).collect::<String>()));
        }
        if let Some(url) = &self.pr_url {
            line.push_str(&format!(" ({url})"));
        }
        line
    }
}

/// This machine's name, for events (several machines may share one board).
fn machine() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
        let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        if ok { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() }
    })
}

/// Where events go.
#[derive(Debug, Clone)]
enum Sink {
    Command(Vec<String>),
    /// `label`: where the config names it, with the URL's host (the URL is a secret).
    Webhook {
        url: String,
        events: Option<Vec<String>>,
        style: Style,
        label: String,
    },
}

#[derive(Debug, Clone, Copy)]
enum Style {
    /// The event's JSON.
    Json,
    /// `{"text": …}`
    Slack,
    /// `{"content": …}`
    Discord,
}

impl Sink {
    fn wants(&self, event: &str) -> bool {
        match self {
            Sink::Webhook { events: Some(events), .. } => events.iter().any(|e| e == event),
            _ => true,
        }
    }

    /// What `status` may show of it: a webhook's place in the config and host, never its URL (the secret).
    fn name(&self, _index: usize) -> String {
        match self {
            Sink::Command(argv) => format!("notifications.command ({})", argv.first().map_or("", String::as_str)),
            Sink::Webhook { label, .. } => label.clone(),
        }
    }
}

fn webhook(url: &str, events: Option<Vec<String>>, style: Style, place: &str) -> Sink {
    let host = url.parse::<http::Uri>().ok().and_then(|u| u.host().map(str::to_string)).unwrap_or_default();
    Sink::Webhook { url: url.to_string(), events, style, label: format!("{place} ({host})") }
}

/// The sinks the config names, in a fixed order (their index is what `notifications.json` remembers).
fn sinks(config: &NotificationsConfig) -> Vec<Sink> {
    let mut sinks = Vec::new();
    if let Some(argv) = config.command.as_ref().filter(|a| !a.is_empty()) {
        sinks.push(Sink::Command(argv.clone()));
    }
    for (i, hook) in config.webhooks.iter().enumerate() {
        sinks.push(webhook(&hook.url, hook.events.clone(), Style::Json, &format!("notifications.webhooks[{i}]")));
    }
    if let Some(url) = &config.slack.webhook_url {
        sinks.push(webhook(url, None, Style::Slack, "notifications.slack"));
    }
    if let Some(url) = &config.discord.webhook_url {
        sinks.push(webhook(url, None, Style::Discord, "notifications.discord"));
    }
    sinks
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    event: Event,
    /// Sinks (by index) that have not taken it yet.
    sinks: Vec<usize>,
    /// Tries so far, per sink.
    #[serde(default)]
    tries: BTreeMap<usize, u32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    version: u32,
    pending: Vec<Pending>,
    /// Keys of transitions already notified.
    sent: VecDeque<String>,
}

impl Default for Stored {
    fn default() -> Self {
        Stored { version: FORMAT_VERSION, pending: Vec::new(), sent: VecDeque::new() }
    }
}

pub(super) struct Notifier {
    sinks: Vec<Sink>,
    path: PathBuf,
    stored: Mutex<Stored>,
    /// Bumped when an event is added: wakes every sink's worker.
    wake: tokio::sync::watch::Sender<u64>,
    /// The last failure of each sink, for `status`; cleared when it takes an event again.
    failing: Mutex<BTreeMap<usize, String>>,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

impl Notifier {
    pub(super) fn load(config: &NotificationsConfig, path: PathBuf) -> Notifier {
        let stored = crate::ledger::load_versioned(&path, FORMAT_VERSION, |s: &Stored| s.version);
        Notifier {
            sinks: sinks(config),
            path,
            stored: Mutex::new(stored),
            wake: tokio::sync::watch::Sender::new(0),
            failing: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.stored.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, stored: &Stored) {
        if let Err(e) = crate::ledger::write_json(&self.path, stored) {
            tracing::error!("cannot write {}: {e}", self.path.display());
        }
    }

    /// Sends `event` for the transition `key`, unless that transition was notified before.
    pub(super) fn emit(&self, key: &str, event: Event) {
        if self.sinks.is_empty() {
            return;
        }
        let mut stored = self.lock();
        if stored.sent.iter().any(|k| k == key) {
            return;
        }
        let sinks: Vec<usize> = (0..self.sinks.len()).filter(|i| self.sinks[*i].wants(&event.event)).collect();
        stored.sent.push_back(key.to_string());
        while stored.sent.len() > KEYS_KEPT {
            stored.sent.pop_front();
        }
        if !sinks.is_empty() {
            tracing::info!(event = %event.event, issue = ?event.issue, "notifying");
            stored.pending.push(Pending { event, sinks, tries: BTreeMap::new() });
            let excess = stored.pending.len().saturating_sub(MAX_PENDING);
            stored.pending.drain(..excess);
        }
        self.persist(&stored);
        drop(stored);
        self.wake.send_modify(|n| *n += 1);
    }

    /// The sinks that failed last, for `status` warnings.
    pub(super) fn warnings(&self) -> Vec<String> {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        failing.iter().map(|(i, why)| format!("notifications: {} failed: {why}", self.sinks[*i].name(*i))).collect()
    }

    /// Delivers what waits, in the background, until the daemon ends: one worker per sink, so a sink that hangs
    /// delays only itself.
    pub(super) async fn run(self: std::sync::Arc<Self>) {
        let client = match http_client() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!("notifications: no HTTP client ({e}); webhooks cannot be sent");
                None
            }
        };
        for index in 0..self.sinks.len() {
            tokio::spawn(self.clone().work(index, client.clone()));
        }
    }

    /// Delivers to sink `index` every event that waits for it.
    async fn work(self: std::sync::Arc<Self>, index: usize, client: Option<HttpClient>) {
        let sink = self.sinks[index].clone();
        let mut wake = self.wake.subscribe();
        let mut retry_at: BTreeMap<String, Instant> = BTreeMap::new();
        loop {
            let now = Instant::now();
            let due: Vec<Pending> = self
                .lock()
                .pending
                .iter()
                .filter(|p| p.sinks.contains(&index) && retry_at.get(&p.event.id).is_none_or(|t| *t <= now))
                .cloned()
                .collect();
            for pending in due {
                let body = crate::redact::to_json_vec(&pending.event).unwrap_or_default();
                let result = deliver(&sink, &pending.event, &body, client.as_ref()).await;
                let mut stored = self.lock();
                let Some(entry) = stored.pending.iter_mut().find(|p| p.event.id == pending.event.id) else { continue };
                let tries = entry.tries.entry(index).or_default();
                *tries += 1;
                let tries = *tries;
                match result {
                    Ok(()) => {
                        entry.sinks.retain(|i| *i != index);
                        self.failing.lock().unwrap_or_else(|e| e.into_inner()).remove(&index);
                    }
                    Err(why) => {
                        let why = crate::redact::current().clean(&why).into_owned();
                        tracing::warn!("notifications: {} failed: {why}", sink.name(index));
                        self.failing.lock().unwrap_or_else(|e| e.into_inner()).insert(index, why);
                        if tries >= MAX_ATTEMPTS {
                            tracing::error!(event = %entry.event.id, "notifications: {} given up after {MAX_ATTEMPTS} tries", sink.name(index));
                            entry.sinks.retain(|i| *i != index);
                        } else {
                            retry_at.insert(
                                entry.event.id.clone(),
                                Instant::now() + Duration::from_secs(1 << (tries - 1).min(6)),
                            );
                        }
                    }
                }
                let id = entry.event.id.clone();
                if entry.sinks.is_empty() {
                    stored.pending.retain(|p| p.event.id != id);
                    retry_at.remove(&id);
                }
                self.persist(&stored);
            }
            let next = {
                let stored = self.lock();
                stored
                    .pending
                    .iter()
                    .filter(|p| p.sinks.contains(&index))
                    .filter_map(|p| retry_at.get(&p.event.id))
                    .min()
                    .copied()
            };
            match next {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at.into(), wake.changed()).await;
                }
                None => {
                    if wake.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

fn http_client() -> Result<HttpClient, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("no TLS roots: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

/// One delivery to one sink; `Err` says why in words that never hold the URL.
async fn deliver(sink: &Sink, event: &Event, body: &[u8], client: Option<&HttpClient>) -> Result<(), String> {
    match sink {
        Sink::Command(argv) => {
            let (argv, body) = (argv.clone(), body.to_vec());
            tokio::task::spawn_blocking(move || run_command(&argv, &body)).await.map_err(|e| e.to_string())?
        }
        Sink::Webhook { url, style, .. } => {
            let client = client.ok_or("no HTTP client")?;
            let payload = match style {
                Style::Json => body.to_vec(),
                Style::Slack => serde_json::to_vec(&serde_json::json!({ "text": event.line() })).unwrap_or_default(),
                Style::Discord => {
                    serde_json::to_vec(&serde_json::json!({ "content": event.line() })).unwrap_or_default()
                }
            };
            let payload = crate::redact::current().clean(&String::from_utf8_lossy(&payload)).into_owned();
            let request = http::Request::post(url.as_str())
                .header("content-type", "application/json")
                .header("user-agent", concat!("autodevd/", env!("CARGO_PKG_VERSION")))
                .body(Full::new(Bytes::from(payload)))
                .map_err(|_| "the webhook URL is not a valid URL".to_string())?;
            match tokio::time::timeout(SEND_TIMEOUT, client.request(request)).await {
                Err(_) => Err(format!("no answer within {}s", SEND_TIMEOUT.as_secs())),
                // hyper's error text names no URL.
                Ok(Err(e)) => Err(format!("cannot connect: {e}")),
                Ok(Ok(response)) if response.status().is_success() => Ok(()),
                Ok(Ok(response)) => Err(format!("answered HTTP {}", response.status().as_u16())),
            }
        }
    }
}

/// Runs the command with the event on stdin and a clean environment, at most [`SEND_TIMEOUT`].
fn run_command(argv: &[String], body: &[u8]) -> Result<(), String> {
    let mut command = std::process::Command::new(&argv[0]);
    command.args(&argv[1..]).env_clear().envs(crate::supervisor::child_env(&[], &BTreeMap::new(), &[]));
    let output = crate::supervisor::run_command_with_input(&mut command, Some(body), SEND_TIMEOUT)
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    match output.status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(format!("{} exited with {code}", argv[0])),
        None => Err(format!("{} was killed (over {}s?)", argv[0], SEND_TIMEOUT.as_secs())),
    }
}

/// Which event, if any, a transition of a task is worth telling people: the new phase says it, with the event that
/// led there (a question is told when asked, not when the run ends).
pub(super) fn kind_of(before: &Phase, after: &Phase, event: &TaskEvent) -> Option<&'static str> {
    if let TaskEvent::Signal(AgentSignal::NeedsInfo { .. }) = event {
        return Some("needs_info");
    }
    if before == after {
        return None;
    }
    Some(match after {
        Phase::Ended { cause: EndCause::Succeeded, .. } => "completed",
        Phase::Ended { cause: EndCause::Blocked, .. } => "blocked",
        Phase::Ended { cause: EndCause::Budget, .. } => "budget",
        Phase::Ended { .. } => "failed",
        Phase::Running { stale: true, .. } if !matches!(before, Phase::Running { stale: true, .. }) => "stale",
        Phase::Waiting { waiting_for: WaitFor::UsageLimit, .. } => "usage_limit",
        Phase::Abandoned { .. } if !matches!(before, Phase::Abandoned { .. }) => "abandoned",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_transition_worth_telling_is_one_event() {
        let running = |stale| Phase::Running { stale, stop: None };
        let ended = |cause| Phase::Ended { cause, reason: None, exit_code: None };
        let waiting = |waiting_for| Phase::Waiting {
            until: None,
            waiting_for,
            after: EndCause::UsageLimit,
            reason: "r".into(),
            fallback: false,
        };
        let ran = TaskEvent::RunEnded(crate::task::Verdict::new(EndCause::Succeeded, "x"));
        let ask = TaskEvent::Signal(AgentSignal::NeedsInfo { question: "q".into() });
        let abandoned = |r: &str| Phase::Abandoned { reason: r.into() };
        let table = [
            (running(false), ended(EndCause::Succeeded), ran.clone(), Some("completed")),
            (running(false), ended(EndCause::NoChanges), ran.clone(), Some("failed")),
            (running(false), ended(EndCause::Blocked), ran.clone(), Some("blocked")),
            (running(false), ended(EndCause::Budget), ran.clone(), Some("budget")),
            (running(false), running(true), TaskEvent::Silent, Some("stale")),
            (running(true), running(false), TaskEvent::Alive, None),
            (running(false), waiting(WaitFor::UsageLimit), ran.clone(), Some("usage_limit")),
            (running(false), waiting(WaitFor::Retry), ran.clone(), None),
            (running(false), abandoned("r"), ran.clone(), Some("abandoned")),
            // Found dead again at a later start: the same facts, nothing new to tell.
            (abandoned("r"), abandoned("r2"), TaskEvent::FoundDead { reason: "r2".into() }, None),
            (running(false), running(false), ask, Some("needs_info")),
            (Phase::Starting, running(false), TaskEvent::Spawned, None),
        ];
        for (i, (before, after, event, kind)) in table.into_iter().enumerate() {
            assert_eq!(kind_of(&before, &after, &event), kind, "row {i}");
        }
    }
}
