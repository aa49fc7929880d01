//! The board feeds the slots. When a slot is free, the local queue (`assign --queue`) goes first, first in first
//! out; then, with the autopilot on, the board's Ready items by priority: Status in `readyValues`, Assigned
//! Instance empty, an open issue of this repository that the label rules let through. Each is assigned exactly as
//! `assign` would. An issue is never taken twice: one held here is skipped, and one that ended here comes back only
//! once a person moves it to Ready again (see `queue::may_retake`).
//!
//! The board is read at most once per `autopilot.pollSecs`, and only while some LLM has a free slot that no usage
//! limit pauses. A board over one page is first asked whether it changed at all (one request), and read whole at
//! least every [`FULL_READ_EVERY`] polls anyway.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::Shared;
use super::fleet::Claiming;
use super::handle::{How, assign};
use super::queue::{Queued, Retake, may_retake};
use crate::github::board::{BoardItem, BoardRead};
use crate::protocol::{AutopilotReport, ErrorKind, QueueEntry};
use crate::timefmt::rfc3339;

/// Tasks started in one turn at most.
const MAX_STARTS_PER_TURN: usize = 256;

/// A board that seems unchanged is still read whole this often (in polls): `updatedAt` is a hint, not a promise.
const FULL_READ_EVERY: u32 = 10;

/// What the autopilot knows between polls.
#[derive(Default)]
pub(super) struct Autopilot {
    board: Option<BoardRead>,
    read_at: Option<Instant>,
    read_wall: Option<SystemTime>,
    polls_since_full: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    requests: u64,
    /// Board items refused at their take, with why: not tried again until the board is read again.
    refused: HashMap<u64, String>,
    /// Turns of the loop so far (each looks at what waits, reading the board only when it may take from it).
    turns: u64,
    /// The last board read failed: nothing is taken from the board until one succeeds.
    failing: bool,
    /// Local tasks whose start failed, with when to try again and why.
    local_backoff: HashMap<u64, (Instant, String)>,
    /// Takeovers that failed (another machine was first, the issue ended meanwhile): not before this.
    takeover_backoff: HashMap<u64, (Instant, String)>,
}

/// How long a queued task whose start failed waits before the next try.
const LOCAL_BACKOFF: Duration = Duration::from_secs(60);

impl Autopilot {
    pub(super) fn new() -> Mutex<Autopilot> {
        Mutex::new(Autopilot::default())
    }
}

/// Where a waiting task comes from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Local(Queued),
    Board,
    /// A stale machine's claim (the fleet), at this version.
    Takeover(String),
}

/// Why an LLM cannot take a task now.
#[derive(Debug, Clone)]
enum Wait {
    UsageLimit(SystemTime),
    /// The day's budget (all LLMs, or this one) is spent: why.
    Budget(String),
    NoFreeSlot,
}

impl Wait {
    fn say(self, llm: &str) -> String {
        match self {
            Wait::UsageLimit(until) => format!("{llm} waits out a usage limit until {}", rfc3339(until)),
            Wait::Budget(why) => format!("{why}; nothing new until tomorrow"),
            Wait::NoFreeSlot => format!("no free {llm} slot"),
        }
    }
}

/// One task in the order it would be taken, and why it waits if it does.
#[derive(Debug, Clone)]
struct Planned {
    issue: u64,
    title: Option<String>,
    priority: Option<String>,
    llm: Option<String>,
    source: Source,
    reason: Option<String>,
}

impl From<Planned> for QueueEntry {
    fn from(p: Planned) -> QueueEntry {
        QueueEntry {
            issue: p.issue,
            title: p.title,
            priority: p.priority,
            llm: p.llm,
            source: match p.source {
                Source::Local(_) => "local",
                Source::Board => "board",
                Source::Takeover(_) => "takeover",
            }
            .into(),
            reason: p.reason,
        }
    }
}

/// Whether the autopilot is on, and what says so.
pub(super) fn in_force(shared: &Shared) -> (bool, &'static str) {
    match shared.queue.autopilot_override() {
        Some(on) => (on, "override"),
        None => (shared.config.raw.autopilot.enabled, "config"),
    }
}

/// Why the autopilot could not take anything from the board even when on.
fn blocked(shared: &Shared) -> Option<String> {
    match &shared.github {
        Err(why) => Some(format!("GitHub is off: {why}")),
        Ok(_) if !shared.config.raw.project.enabled => Some("project.enabled is false: there is no board".into()),
        Ok(_) => None,
    }
}

pub(super) fn report(shared: &Shared) -> AutopilotReport {
    let (on, source) = in_force(shared);
    let state = shared.autopilot.lock().unwrap_or_else(|e| e.into_inner());
    AutopilotReport {
        on,
        source: source.into(),
        blocked: blocked(shared),
        poll_secs: shared.config.raw.autopilot.poll_secs,
        last_read_at: state.read_wall.map(rfc3339),
        last_error: state.last_error.clone(),
        requests: state.requests,
        turns: state.turns,
    }
}

/// Runs while the daemon does: takes what fits whenever a slot may have come free, and at every poll.
pub(super) async fn run(shared: Arc<Shared>) {
    let every = Duration::from_secs_f64(shared.config.raw.autopilot.poll_secs);
    loop {
        take_what_fits(&shared).await;
        shared.autopilot.lock().unwrap_or_else(|e| e.into_inner()).turns += 1;
        let _ = tokio::time::timeout(every, shared.queue.wake.notified()).await;
    }
}

/// The waiting tasks in the order they will be taken, for `autodevctl queue` (reading the board if its last
/// read is older than the poll interval).
pub(super) async fn entries(shared: &Shared) -> Vec<QueueEntry> {
    let board = if in_force(shared).0 && blocked(shared).is_none() { fresh_board(shared, true).await } else { None };
    plan(shared, board.as_ref()).into_iter().map(Into::into).collect()
}

/// The local queue as `status` shows it (no GitHub request).
pub(super) fn local_entries(shared: &Shared) -> Vec<QueueEntry> {
    // On every status reply: an empty queue costs nothing.
    if shared.queue.is_empty() {
        return Vec::new();
    }
    plan(shared, None).into_iter().map(Into::into).collect()
}

async fn take_what_fits(shared: &Arc<Shared>) {
    if shared.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    if shared.config.raw.budget.per_day_usd.is_some()
        && let Some(why) = super::budget::day_over(shared, "")
    {
        // Once a day (the key is the day).
        let mut event = super::notify::Event::new("budget");
        event.reason = Some(why);
        shared.notifier.emit(&format!("budget-day:{}", crate::timefmt::local_day(SystemTime::now())), event);
    }
    let mut board: Option<BoardRead> = None;
    let mut board_read = false;
    // Each start takes a slot, so a turn ends by itself; the bound only guards against a plan and the slot table
    // disagreeing about a free slot.
    for _ in 0..MAX_STARTS_PER_TURN {
        let next = plan(shared, board.as_ref()).into_iter().find(|p| p.reason.is_none());
        let Some(next) = next else {
            // Nothing from what is known fits: read the board (once) if the autopilot may take from it and some
            // LLM could take work.
            let (free, paused) = {
                let table = shared.lock_table();
                (table.llms_with_free_slots(), table.paused_llms(SystemTime::now()))
            };
            let can_take = free.iter().any(|l| !paused.contains_key(l) && super::budget::day_over(shared, l).is_none());
            if board_read || !can_take || !in_force(shared).0 || blocked(shared).is_some() {
                return;
            }
            board_read = true;
            board = fresh_board(shared, false).await;
            if board.is_none() {
                return;
            }
            continue;
        };
        let started = match &next.source {
            Source::Local(q) => {
                // The LLM the plan chose (never one a usage limit pauses), unless the task named its slot.
                let llm = if q.slot.is_some() { q.llm.as_deref() } else { next.llm.as_deref() };
                let how = How { force: q.force, ..How::default() };
                assign(shared, q.issue, llm, q.slot.as_deref(), q.prompt.as_deref(), how).await
            }
            Source::Board => {
                let claiming = Claiming::New { force: false, from_board: true };
                let how = How { claiming: Some(claiming), ..How::default() };
                assign(shared, next.issue, next.llm.as_deref(), None, None, how).await
            }
            // Assigned Instance names the stale holder: the claim, not the board, says it may be taken.
            Source::Takeover(version) => {
                let claiming = Claiming::Takeover { version: version.clone() };
                let how = How { force: true, queue: false, claiming: Some(claiming) };
                assign(shared, next.issue, next.llm.as_deref(), None, None, how).await
            }
        };
        match (&next.source, started) {
            (Source::Local(_), Ok(_)) => {
                tracing::info!(issue = next.issue, "started the queued task");
                shared.queue.remove(next.issue);
            }
            (Source::Board, Ok(_)) => {
                tracing::info!(issue = next.issue, llm = ?next.llm, "autopilot took a Ready item")
            }
            // GitHub could not be asked, or the run could not start: the queued task stays for the next turn.
            (Source::Local(q), Err(e)) => {
                let request =
                    super::slots::SlotRequest { issue: q.issue, llm: q.llm.as_deref(), slot: q.slot.as_deref() };
                // A slot taken meanwhile: it waits on as it was.
                if shared.lock_table().lacks_free_slot(&request) {
                    continue;
                }
                // A run that was set up and ended at once (a missing CLI) is a task now, shown in its slot: the
                // queue's part is over. A failure that may pass (GitHub away) is tried again later; the others go
                // first.
                let became_task = shared.lock_table().slots.iter().any(|s| {
                    s.task.as_ref().is_some_and(|t| t.issue() == q.issue && rfc3339(t.run_started_at) >= q.queued_at)
                });
                if became_task || e.kind != ErrorKind::Failed {
                    tracing::warn!(issue = next.issue, "queued task ended its wait: {}", e.message);
                    shared.queue.remove(next.issue);
                } else {
                    tracing::warn!(issue = next.issue, "queued task not started yet: {}", e.message);
                    let mut state = shared.autopilot.lock().unwrap_or_else(|e| e.into_inner());
                    state.local_backoff.insert(q.issue, (Instant::now() + LOCAL_BACKOFF, e.message));
                }
            }
            (Source::Takeover(_), Ok(_)) => {
                tracing::info!(issue = next.issue, "autopilot took over a stale machine's issue")
            }
            (Source::Takeover(_), Err(e)) => {
                tracing::warn!(issue = next.issue, "autopilot did not take it over: {}", e.message);
                if let Some(fleet) = &shared.fleet {
                    // Refused for good (closed, done meanwhile), or a task that ended at once (a missing CLI): a
                    // claim taken over for it is let go; other failures are tried again, a few times.
                    let became_task = shared
                        .lock_table()
                        .slots
                        .iter()
                        .any(|s| s.task.as_ref().is_some_and(|t| t.issue() == next.issue && !t.holds_slot()));
                    if e.kind == ErrorKind::Conflict || became_task {
                        fleet.forget_pending(next.issue);
                    } else {
                        fleet.pending_failed(next.issue);
                    }
                }
                let again = Instant::now() + Duration::from_secs_f64(shared.config.raw.fleet.heartbeat_secs);
                let mut state = shared.autopilot.lock().unwrap_or_else(|e| e.into_inner());
                state.takeover_backoff.insert(next.issue, (again, e.message));
            }
            (Source::Board, Err(e)) => {
                tracing::warn!(issue = next.issue, "autopilot did not take it: {}", e.message);
                let mut state = shared.autopilot.lock().unwrap_or_else(|e| e.into_inner());
                state.refused.insert(next.issue, e.message);
            }
        }
    }
}

/// The board, read now if the last read is older than the poll interval (and GitHub allows); `None` when it
/// cannot be had. `cached_ok`: a read of any age will do if a new one fails.
async fn fresh_board(shared: &Shared, cached_ok: bool) -> Option<BoardRead> {
    let Ok(github) = &shared.github else { return None };
    let every = Duration::from_secs_f64(shared.config.raw.autopilot.poll_secs);
    let (cached, due, probe, failing) = {
        let state = shared.autopilot.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = state.read_at.is_some_and(|t| t.elapsed() < every);
        let waiting = state.retry_at.is_some_and(|t| t > Instant::now());
        let large = state.board.as_ref().is_some_and(|b| b.total > 100);
        (state.board.clone(), !fresh && !waiting, large && state.polls_since_full < FULL_READ_EVERY, state.failing)
    };
    if !due {
        // After a failed read the old board is only shown, never taken from.
        return cached.filter(|_| !failing || cached_ok);
    }
    let reconciler = &github.reconciler;
    let project_id = match reconciler.board().await {
        Ok(board) => board.project_id,
        Err(e) => return note_error(shared, e, cached.filter(|_| cached_ok)),
    };
    // After a failed read only a whole read counts again: an unchanged probe must not revive the old board.
    if probe
        && !failing
        && let Some(previous) = &cached
    {
        reconciler.count_request();
        match crate::github::board::changed(reconciler.github(), &project_id).await {
            Ok((updated_at, total)) if updated_at == previous.updated_at && total == previous.total => {
                let mut state = shared.autopilot.lock().unwrap_or_else(|e| e.into_inner());
                state.requests += 1;
                state.polls_since_full += 1;
                state.read_at = Some(Instant::now());
                return cached;
            }
            Ok(_) => shared.autopilot.lock().unwrap_or_else(|e| e.into_inner()).requests += 1,
            Err(e) => return note_error(shared, e, cached.filter(|_| cached_ok)),
        }
    }
    match crate::github::board::read_items(reconciler.github(), &project_id, reconciler.project()).await {
        Ok(read) => {
            reconciler.count_requests(read.requests);
            note_ended_items(shared, &read.items);
            let mut state = shared.autopilot.lock().unwrap_or_else(|e| e.into_inner());
            state.requests += read.requests;
            state.polls_since_full = 0;
            state.read_at = Some(Instant::now());
            state.read_wall = Some(SystemTime::now());
            state.last_error = None;
            state.failing = false;
            state.refused.clear();
            state.board = Some(read.clone());
            Some(read)
        }
        Err(e) => note_error(shared, e, cached.filter(|_| cached_ok)),
    }
}

/// GitHub refused or failed a read: nothing new starts from the board until it answers (running tasks are not
/// touched); rate limits are waited out as GitHub says.
fn note_error(shared: &Shared, e: crate::github::client::GhError, fallback: Option<BoardRead>) -> Option<BoardRead> {
    tracing::warn!("autopilot: cannot read the board: {e}");
    let mut state = shared.autopilot.lock().unwrap_or_else(|e| e.into_inner());
    let every = Duration::from_secs_f64(shared.config.raw.autopilot.poll_secs);
    state.retry_at = Some(Instant::now() + e.wait_hint().unwrap_or(every).max(every));
    state.read_at = Some(Instant::now());
    state.last_error = Some(e.to_string());
    state.failing = true;
    fallback
}

/// For issues that ended here: records the Status the end's write left (the baseline a person's move is told
/// from), or forgets the end once a person moved the issue back to Ready.
fn note_ended_items(shared: &Shared, items: &[BoardItem]) {
    let Ok(github) = &shared.github else { return };
    let ready = &shared.config.raw.project.fields.status.ready_values;
    for item in items {
        let Some(issue) = item.issue else { continue };
        let Some(ended) = shared.queue.ended(issue) else { continue };
        let is_ready = item.status.as_ref().is_some_and(|s| ready.contains(s));
        match may_retake(
            &ended,
            item.status.as_deref(),
            item.status_updated_at.as_deref(),
            is_ready,
            github.reconciler.owes(issue) || github.posts.owes_issue(issue),
        ) {
            Retake::Yes => shared.queue.forget_ended(issue),
            Retake::Record(seen) => shared.queue.set_seen(issue, seen),
            Retake::No(_) => {}
        }
    }
}

/// Is this item Ready for the autopilot, and if not, is it worth saying why? Items that are not Ready at all
/// (another Status, someone on it, not an open issue of this repository) are simply left out.
fn is_ready(shared: &Shared, item: &BoardItem) -> bool {
    let Ok(github) = &shared.github else { return false };
    let status = &shared.config.raw.project.fields.status;
    let rules = &shared.config.raw.github;
    let this_repo = format!("{}/{}", github.owner, github.repo);
    item.kind == "ISSUE"
        && !item.archived
        && item.open
        && item.issue.is_some()
        && item.repository.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(&this_repo))
        && item.status.as_ref().is_some_and(|s| status.ready_values.contains(s))
        && item.assigned.as_deref().is_none_or(|a| a.trim().is_empty())
        && !item.labels.iter().any(|l| rules.exclude_labels.contains(l))
        && (rules.labels.is_empty() || item.labels.iter().any(|l| rules.labels.contains(l)))
}

/// Every waiting task in the order it will be taken, with why it waits when it does. Pure: reads the table, the
/// queue and the given board, changes nothing.
fn plan(shared: &Shared, board: Option<&BoardRead>) -> Vec<Planned> {
    let now = SystemTime::now();
    let config = &shared.config.raw;
    let (mut free, paused, llms, held) = {
        let table = shared.lock_table();
        let mut free: BTreeMap<String, usize> = BTreeMap::new();
        for slot in table.slots.iter().filter(|s| !s.extra && !s.is_held()) {
            let provider = &table.providers[slot.provider];
            if provider.enabled {
                *free.entry(provider.name.clone()).or_default() += 1;
            }
        }
        let held: HashMap<u64, String> = table
            .slots
            .iter()
            .filter(|s| s.is_held())
            .filter_map(|s| Some((s.task.as_ref()?.issue(), s.name.clone())))
            .collect();
        let busy_slots: Vec<String> = table.slots.iter().filter(|s| s.is_held()).map(|s| s.name.clone()).collect();
        (free, table.paused_llms(now), table.llm_names(), (held, busy_slots))
    };
    let (held, busy_slots) = held;
    let waits_for = |llm: &str, free: &BTreeMap<String, usize>| -> Option<Wait> {
        if let Some(until) = paused.get(llm) {
            return Some(Wait::UsageLimit(*until));
        }
        (free.get(llm).copied().unwrap_or(0) == 0).then_some(Wait::NoFreeSlot)
    };
    // No LLM named: the default one, else the first that can take it now.
    let pick = |named: Option<&str>, free: &BTreeMap<String, usize>| -> Option<String> {
        named
            .or(config.default_llm.as_deref())
            .map(str::to_string)
            .or_else(|| llms.iter().find(|l| waits_for(l, free).is_none()).cloned())
            .or_else(|| llms.first().cloned())
    };
    let mut out = Vec::new();
    let queued = shared.queue.queued();
    let backoff = shared.autopilot.lock().unwrap_or_else(|e| e.into_inner()).local_backoff.clone();
    for q in &queued {
        let llm = match &q.slot {
            Some(_) => q.llm.clone(),
            None => pick(q.llm.as_deref(), &free),
        };
        let backoff = backoff.get(&q.issue).filter(|(at, _)| *at > Instant::now());
        let reason = if let Some(slot) = held.get(&q.issue) {
            Some(format!("issue #{} is held by {slot}", q.issue))
        } else if let Some((_, why)) = backoff {
            Some(format!("its start failed ({why}); tried again within a minute"))
        } else if let Some(slot) = q.slot.as_ref().filter(|s| busy_slots.contains(s)) {
            Some(format!("slot {slot} is busy"))
        } else if q.slot.is_some() {
            None
        } else {
            llm.as_deref().and_then(|l| Some(waits_for(l, &free)?.say(l)))
        };
        if reason.is_none()
            && q.slot.is_none()
            && let Some(l) = &llm
        {
            free.entry(l.clone()).and_modify(|n| *n = n.saturating_sub(1));
        }
        let title = q.prompt.as_deref().and_then(|p| p.lines().find(|l| !l.trim().is_empty())).map(str::to_string);
        out.push(Planned { issue: q.issue, title, priority: None, llm, source: Source::Local(q.clone()), reason });
    }
    // Stale machines' claims go on here before anything new from the board (only with the autopilot on).
    if let Some(fleet) = shared.fleet.as_ref().filter(|_| in_force(shared).0) {
        let backoff = shared.autopilot.lock().unwrap_or_else(|e| e.into_inner()).takeover_backoff.clone();
        for claim in fleet.takeover_candidates() {
            if held.contains_key(&claim.issue) || queued.iter().any(|q| q.issue == claim.issue) {
                continue;
            }
            let llm = pick(None, &free);
            let reason = match backoff.get(&claim.issue).filter(|(at, _)| *at > Instant::now()) {
                Some((_, why)) => Some(format!("its takeover failed ({why}); tried again shortly")),
                None => llm.as_deref().and_then(|l| Some(waits_for(l, &free)?.say(l))),
            };
            if reason.is_none()
                && let Some(l) = &llm
            {
                free.entry(l.clone()).and_modify(|n| *n = n.saturating_sub(1));
            }
            out.push(Planned {
                issue: claim.issue,
                title: Some(format!(
                    "taken over from {}@{} (its heartbeat stopped)",
                    claim.holder.slot, claim.holder.machine
                )),
                priority: None,
                llm,
                source: Source::Takeover(claim.version),
                reason,
            });
        }
    }
    let Some(board) = board else { return out };
    // The day budgets stop the board feeding new work, not the local queue (a person's explicit wish).
    let spent: BTreeMap<String, String> =
        llms.iter().filter_map(|l| Some((l.clone(), super::budget::day_over(shared, l)?))).collect();
    let refused = shared.autopilot.lock().unwrap_or_else(|e| e.into_inner()).refused.clone();
    let priority_order: Vec<String> = shared
        .github
        .as_ref()
        .ok()
        .and_then(|g| g.reconciler.cached_board())
        .and_then(|b| {
            b.field(&config.project.fields.priority_name())
                .ok()
                .map(|f| f.options.iter().map(|o| o.name.clone()).collect())
        })
        .unwrap_or_default();
    let rank = |item: &BoardItem| {
        let priority = item.priority.as_ref().and_then(|p| priority_order.iter().position(|o| o == p));
        (priority.unwrap_or(usize::MAX), item.position)
    };
    let mut ready: Vec<&BoardItem> = board.items.iter().filter(|i| is_ready(shared, i)).collect();
    ready.sort_by_key(|i| rank(i));
    for item in ready {
        let Some(issue) = item.issue else { continue };
        // Held here (the board may not say so yet) or queued here: not waiting on the board.
        if queued.iter().any(|q| q.issue == issue) || held.contains_key(&issue) {
            continue;
        }
        let labelled = item.labels.iter().find_map(|l| config.autopilot.llm_labels.get(l)).map(String::as_str);
        let mut llm = pick(labelled, &free);
        let mut wait = llm.as_deref().and_then(|l| match spent.get(l) {
            Some(why) => Some(Wait::Budget(why.clone())),
            None => waits_for(l, &free),
        });
        // A paused LLM's items go elsewhere only where retry.fallback says so.
        if matches!(wait, Some(Wait::UsageLimit(_)))
            && let Some(other) =
                config.retry.fallback.iter().find(|f| waits_for(f, &free).is_none() && !spent.contains_key(*f))
        {
            (llm, wait) = (Some(other.clone()), None);
        }
        let elsewhere = shared.fleet.as_ref().and_then(|f| f.holder_elsewhere(issue));
        let reason = if let Some(why) = refused.get(&issue) {
            Some(why.clone())
        } else if let Some(holder) = elsewhere {
            Some(format!("held by {holder} (the fleet's claim)"))
        } else if shared.queue.ended(issue).is_some() {
            Some("it ended here; move it back to Ready to run it again".into())
        } else {
            wait.zip(llm.as_deref()).map(|(w, l)| w.say(l))
        };
        if reason.is_none()
            && let Some(l) = &llm
        {
            free.entry(l.clone()).and_modify(|n| *n = n.saturating_sub(1));
        }
        out.push(Planned {
            issue,
            title: Some(item.title.clone()),
            priority: item.priority.clone(),
            llm,
            source: Source::Board,
            reason,
        });
    }
    out
}
