//! The slot table: which slots exist, which task each holds, and the rules for taking one.
//!
//! All slot choice happens in [`SlotTable::reserve`] under the daemon's one lock, so two `assign` requests at the
//! same instant can never get the same slot, and an issue can never hold two slots.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use crate::ledger::{ExitRecord, SlotLock};
use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply, ProviderUsage, Restarts, SlotState, SlotStatus, SlotUse};
use crate::provider::Provider;
use crate::supervisor::{self, ExitInfo};
use crate::task::{Allowance, EndCause, Phase, WaitFor};
use crate::timefmt::rfc3339;

/// Progress of a run, published for `logs -f`: bumps whenever output arrives, `ended` once it is over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSignal {
    pub batches: u64,
    pub ended: bool,
}

/// The work on one issue in one slot, and its current (or last) run: the durable record (with its phase) plus what
/// only the running daemon knows.
#[derive(Debug)]
pub struct Task {
    /// What survives a crash: written to `slots/<slot>.lock` while the slot holds the task. Its `phase` is changed
    /// only by the state machine (`life::drive`).
    pub record: SlotLock,
    /// When the current run started.
    pub run_started_at: SystemTime,
    pub last_output_at: Option<SystemTime>,
    pub ended_at: Option<SystemTime>,
    /// How the current run's process ended, once it has.
    pub exit: Option<ExitInfo>,
    pub cost_usd: Option<f64>,
    /// The cost is tokens × `llms.<name>.pricing`, not what the CLI reported.
    pub cost_estimated: bool,
    /// Tokens of the current run: its final count, or what it reported so far.
    pub usage: Option<crate::provider::Usage>,
    pub turns: Option<u64>,
    /// The console preview as of the follower's last batch.
    pub preview: Vec<String>,
    /// Set (under the table lock) once the run's process group id may belong to a stranger: after our leader
    /// is reaped, or once an adopted leader has exited. From then on the group is never signalled.
    pub group_released: bool,
    /// After the last run ended: commits on the task's branch beyond its base, and whether that or a dirty worktree
    /// means there is work to review.
    pub commits: Option<u64>,
    pub changes: Option<bool>,
    /// The agent's last message in its current run (bounded): for its pull request and its issue.
    pub said: Option<String>,
    /// What the task's finished runs cost, read once per run for its budget.
    pub finished_cost: std::sync::OnceLock<f64>,
    /// Adopted after a restart: not our child, so its exit code cannot be known.
    pub adopted: bool,
    pub signal: Arc<watch::Sender<RunSignal>>,
    pub health: Health,
    /// The end of the last run, kept while it cannot be written (a full disk): the slot stays held until it is.
    pub unrecorded: Option<ExitRecord>,
    /// The lockfile lags behind the task (a write failed on a full disk): written again once there is room.
    pub unsaved: bool,
    /// How the current run is already in the history (`state`, cause): a record that says the same is not appended
    /// twice (recovery finishing what a crash interrupted).
    pub recorded_as: Option<(String, Option<EndCause>)>,
}

/// What the health sampler and progress reports know of a run.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub progress: Option<u8>,
    pub progress_message: Option<String>,
    pub last_progress_at: Option<SystemTime>,
    pub cpu_percent: Option<f64>,
    pub memory_mb: Option<f64>,
    /// CPU seconds the run has used at the last sample, and when the count last moved.
    pub cpu_secs: Option<f64>,
    pub last_cpu_at: Option<SystemTime>,
    pub sampled_at: Option<std::time::Instant>,
    /// The CLI hit a usage or rate limit; not stale or failed until then.
    pub rate_limited_until: Option<SystemTime>,
}

impl Task {
    /// Whether `pgid` is still the run's group: for our own runs until the leader is reaped; for an adopted run
    /// while its leader is alive and still the process on record (it is not our child, so nothing holds its id).
    pub(super) fn group_is_ours(&self, pgid: i32) -> bool {
        if self.group_released {
            return false;
        }
        !self.adopted
            || supervisor::proc_stat(pgid)
                .is_some_and(|s| s.state != 'Z' && s.pgrp == pgid && Some(s.start_time) == self.record.start_time)
    }

    /// A task as a new run starts: `record` already names the run.
    pub fn starting(record: SlotLock) -> Task {
        Task {
            record,
            run_started_at: SystemTime::now(),
            last_output_at: None,
            ended_at: None,
            exit: None,
            cost_usd: None,
            cost_estimated: false,
            usage: None,
            turns: None,
            preview: Vec::new(),
            group_released: false,
            commits: None,
            changes: None,
            said: None,
            finished_cost: std::sync::OnceLock::new(),
            adopted: false,
            signal: Arc::new(watch::channel(RunSignal::default()).0),
            health: Health::default(),
            unrecorded: None,
            unsaved: false,
            recorded_as: None,
        }
    }

    /// The state users see. A task whose end waits for disk space shows as failed with cause `disk_full`.
    pub fn state(&self) -> SlotState {
        if self.unrecorded.is_some() { SlotState::Failed } else { self.record.state().into() }
    }

    /// The slot belongs to the task's issue (also while its end waits to be written).
    pub fn holds_slot(&self) -> bool {
        self.record.state().holds_slot() || self.unrecorded.is_some()
    }

    pub fn is_running(&self) -> bool {
        self.record.state().is_running()
    }

    /// The last sign of life: output, a progress report, CPU use, or the start.
    pub fn heartbeat(&self) -> SystemTime {
        [self.last_output_at, self.health.last_progress_at, self.health.last_cpu_at]
            .into_iter()
            .flatten()
            .fold(self.run_started_at, SystemTime::max)
    }

    /// A task found at start-up with no run going (abandoned, waiting, or ended before this daemon started).
    pub fn idle(record: SlotLock) -> Task {
        let mut task = Task::starting(record);
        task.ended_at = Some(SystemTime::now());
        task.signal.send_modify(|s| s.ended = true);
        task
    }

    pub fn issue(&self) -> u64 {
        self.record.issue
    }

    pub fn run_dir(&self) -> PathBuf {
        self.record.stdout.parent().map(PathBuf::from).unwrap_or_default()
    }
}

#[derive(Debug)]
pub struct Slot {
    pub name: String,
    /// Index into the daemon's provider list.
    pub provider: usize,
    pub task: Option<Task>,
    /// Not in the config any more (fewer slots configured): kept only while a lockfile holds it.
    pub extra: bool,
}

impl Slot {
    pub fn state(&self) -> SlotState {
        self.task.as_ref().map_or(SlotState::Ready, Task::state)
    }

    pub fn is_held(&self) -> bool {
        self.task.as_ref().is_some_and(Task::holds_slot)
    }
}

/// What `assign` asked for.
pub struct SlotRequest<'a> {
    pub issue: u64,
    pub llm: Option<&'a str>,
    pub slot: Option<&'a str>,
}

#[derive(Debug)]
pub struct SlotTable {
    pub slots: Vec<Slot>,
    pub providers: Vec<Provider>,
    /// Issues held by lockfiles recovery could not place in a slot (their LLM left the config): never assigned.
    pub orphans: Vec<(String, u64)>,
    default_llm: Option<String>,
    config_name: String,
}

impl SlotTable {
    /// One slot `<provider>-<n>` per allowed concurrent issue of every provider (disabled ones included, so
    /// `--slot` can say "disabled" rather than "unknown").
    pub fn new(providers: Vec<Provider>, default_llm: Option<String>, config_name: String) -> SlotTable {
        let slots = providers
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                (1..=p.slots).map(move |n| Slot {
                    name: format!("{}-{n}", p.name),
                    provider: i,
                    task: None,
                    extra: false,
                })
            })
            .collect();
        SlotTable { slots, providers, orphans: Vec::new(), default_llm, config_name }
    }

    pub fn get(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.name == name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.name == name)
    }

    /// The task whose current run is `run_id`.
    pub fn task_of_run(&mut self, run_id: &str) -> Option<&mut Task> {
        self.slots.iter_mut().filter_map(|s| s.task.as_mut()).find(|t| t.record.run_id == run_id)
    }

    /// The slot holding `issue`, if any.
    pub fn holder_of(&self, issue: u64) -> Option<&Slot> {
        self.slots.iter().find(|s| s.is_held() && s.task.as_ref().is_some_and(|t| t.issue() == issue))
    }

    /// Applies a reloaded config: new providers and slot counts. A held slot that the new config no longer has
    /// stays (as an extra, never assigned) until its task ends; a free one goes.
    pub fn reconfigure(&mut self, mut providers: Vec<Provider>, default_llm: Option<String>) {
        let old = std::mem::take(&mut self.slots);
        // A provider dropped from the config stays known while one of its slots is held.
        for slot in old.iter().filter(|s| s.is_held()) {
            let name = &self.providers[slot.provider].name;
            if !providers.iter().any(|p| &p.name == name) {
                let mut kept = self.providers[slot.provider].clone();
                kept.enabled = false;
                kept.slots = 0;
                providers.push(kept);
            }
        }
        let mut by_name: std::collections::HashMap<String, Slot> =
            old.into_iter().map(|s| (s.name.clone(), s)).collect();
        let mut slots = Vec::new();
        for (index, p) in providers.iter().enumerate() {
            for n in 1..=p.slots {
                let name = format!("{}-{n}", p.name);
                let mut slot =
                    by_name.remove(&name).unwrap_or(Slot { name, provider: index, task: None, extra: false });
                (slot.provider, slot.extra) = (index, false);
                slots.push(slot);
            }
            let mut leftovers: Vec<Slot> = by_name
                .extract_if(|name, s| s.is_held() && name.rsplit_once('-').is_some_and(|(prov, _)| prov == p.name))
                .map(|(_, s)| s)
                .collect();
            leftovers.sort_by(|a, b| a.name.cmp(&b.name));
            for mut slot in leftovers {
                (slot.provider, slot.extra) = (index, true);
                slots.push(slot);
            }
        }
        self.slots = slots;
        self.providers = providers;
        self.default_llm = default_llm;
    }

    /// The slot a lockfile names, added as an extra slot if the config no longer has it. `None` when the
    /// provider itself is gone from the config.
    pub fn slot_for_lock(&mut self, name: &str, provider: &str) -> Option<&mut Slot> {
        if let Some(index) = self.slots.iter().position(|s| s.name == name) {
            return Some(&mut self.slots[index]);
        }
        let provider = self.providers.iter().position(|p| p.name == provider)?;
        self.slots.push(Slot { name: name.to_string(), provider, task: None, extra: true });
        self.slots.last_mut()
    }

    fn provider_index(&self, name: &str) -> Result<usize, ErrorReply> {
        let index = self.providers.iter().position(|p| p.name == name).ok_or_else(|| {
            let known: Vec<_> = self.providers.iter().map(|p| p.name.as_str()).collect();
            refuse(
                ErrorKind::NotFound,
                format!("unknown LLM {name:?} (configured: {})", known.join(", ")),
                Some(format!("add it under llms in {}", self.config_name)),
            )
        })?;
        if !self.providers[index].enabled || self.providers[index].slots == 0 {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("LLM {name:?} is disabled"),
                Some(format!("set llms.{name}.enabled to true in {}", self.config_name)),
            ));
        }
        Ok(index)
    }

    fn no_free_slot(&self, provider: usize) -> ErrorReply {
        let p = &self.providers[provider];
        refuse(
            ErrorKind::Conflict,
            format!("No available {} instances (max: {})", p.display_name, p.slots),
            Some(format!("Try increasing maxConcurrentIssues in {}", self.config_name)),
        )
    }

    /// Picks the slot for an assignment and returns its index. Does not mark it; the caller does, under the
    /// same lock.
    pub fn choose(&self, req: &SlotRequest) -> Result<usize, ErrorReply> {
        if let Some((slot, _)) = self.orphans.iter().find(|(_, issue)| *issue == req.issue) {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("issue #{} is held by {slot}, whose LLM is no longer configured", req.issue),
                Some("see `autodevctl status` for the warning, and restore that LLM in the config".into()),
            ));
        }
        if let Some(holder) = self.holder_of(req.issue) {
            let hint = if matches!(holder.state(), SlotState::Abandoned | SlotState::Waiting) {
                format!("its run was abandoned: `autodevctl resume {0}` or `autodevctl release {0}`", holder.name)
            } else {
                format!("stop it first with `autodevctl stop {}`", holder.name)
            };
            return Err(refuse(
                ErrorKind::Conflict,
                format!("issue #{} is already assigned to {}", req.issue, holder.name),
                Some(hint),
            ));
        }
        if let Some(name) = req.slot {
            let index = self.slots.iter().position(|s| s.name == name).ok_or_else(|| {
                let names: Vec<_> = self.slots.iter().map(|s| s.name.as_str()).collect();
                refuse(ErrorKind::NotFound, format!("unknown slot {name:?} (slots: {})", names.join(", ")), None)
            })?;
            let slot = &self.slots[index];
            let provider = &self.providers[slot.provider];
            if let Some(llm) = req.llm
                && llm != provider.name
            {
                return Err(refuse(
                    ErrorKind::BadRequest,
                    format!("slot {name} belongs to {}, not to {llm}", provider.name),
                    None,
                ));
            }
            self.provider_index(&provider.name)?;
            if let Some(task) = slot.task.as_ref().filter(|t| t.holds_slot()) {
                let what = match task.state() {
                    SlotState::Abandoned => "holds the abandoned",
                    SlotState::Waiting => "holds the waiting",
                    _ => "is busy with",
                };
                return Err(refuse(
                    ErrorKind::Conflict,
                    format!("slot {name} {what} issue #{}", task.issue()),
                    Some("pick another slot, or leave out --slot to get a free one".into()),
                ));
            }
            return Ok(index);
        }
        let first_free =
            |provider: usize| self.slots.iter().position(|s| s.provider == provider && !s.extra && !s.is_held());
        if let Some(llm) = req.llm.or(self.default_llm.as_deref()) {
            let provider = self.provider_index(llm)?;
            return first_free(provider).ok_or_else(|| self.no_free_slot(provider));
        }
        let enabled: Vec<usize> =
            (0..self.providers.len()).filter(|i| self.providers[*i].enabled && self.providers[*i].slots > 0).collect();
        if let Some(index) = enabled.iter().find_map(|p| first_free(*p)) {
            return Ok(index);
        }
        match enabled.as_slice() {
            [] => Err(refuse(
                ErrorKind::Conflict,
                "no LLM is enabled".into(),
                Some(format!("enable one under llms in {}", self.config_name)),
            )),
            [only] => Err(self.no_free_slot(*only)),
            all => {
                let maxes: Vec<String> = all
                    .iter()
                    .map(|p| format!("{} max {}", self.providers[*p].name, self.providers[*p].slots))
                    .collect();
                Err(refuse(
                    ErrorKind::Conflict,
                    format!("No available instances of any enabled LLM ({})", maxes.join(", ")),
                    Some(format!("Try increasing maxConcurrentIssues in {}", self.config_name)),
                ))
            }
        }
    }

    /// Whether `req` is refused only because every slot it could have is busy (what `assign --queue` waits out).
    pub fn lacks_free_slot(&self, req: &SlotRequest) -> bool {
        if self.holder_of(req.issue).is_some() || self.orphans.iter().any(|(_, issue)| *issue == req.issue) {
            return false;
        }
        let usable = |p: &Provider| p.enabled && p.slots > 0;
        if let Some(name) = req.slot {
            return self.slots.iter().any(|s| {
                s.name == name
                    && s.is_held()
                    && usable(&self.providers[s.provider])
                    && req.llm.is_none_or(|l| l == self.providers[s.provider].name)
            });
        }
        let free_of = |provider: usize| self.slots.iter().any(|s| s.provider == provider && !s.extra && !s.is_held());
        match req.llm.or(self.default_llm.as_deref()) {
            Some(llm) => self
                .providers
                .iter()
                .position(|p| p.name == llm)
                .is_some_and(|i| usable(&self.providers[i]) && !free_of(i)),
            None => {
                let enabled: Vec<usize> = (0..self.providers.len()).filter(|i| usable(&self.providers[*i])).collect();
                !enabled.is_empty() && !enabled.iter().any(|i| free_of(*i))
            }
        }
    }

    /// The enabled LLMs with a free slot, in config order.
    pub fn llms_with_free_slots(&self) -> Vec<String> {
        (0..self.providers.len())
            .filter(|i| self.providers[*i].enabled && self.providers[*i].slots > 0)
            .filter(|i| self.slots.iter().any(|s| s.provider == *i && !s.extra && !s.is_held()))
            .map(|i| self.providers[i].name.clone())
            .collect()
    }

    /// The enabled LLMs, in config order.
    pub fn llm_names(&self) -> Vec<String> {
        self.providers.iter().filter(|p| p.enabled && p.slots > 0).map(|p| p.name.clone()).collect()
    }

    /// LLMs whose account reported a usage limit, and until when: a task of theirs waits for the reset, or a
    /// running CLI waits one out. Derived from the tasks: nothing to keep in step.
    pub fn paused_llms(&self, now: SystemTime) -> BTreeMap<String, SystemTime> {
        let mut paused = BTreeMap::new();
        for slot in &self.slots {
            let Some(task) = &slot.task else { continue };
            let until = match &task.record.phase {
                Phase::Waiting { waiting_for: WaitFor::UsageLimit, until, .. } => *until,
                _ if task.is_running() => task.health.rate_limited_until,
                _ => None,
            };
            if let Some(until) = until.filter(|u| *u > now) {
                let entry = paused.entry(self.providers[slot.provider].name.clone()).or_insert(until);
                *entry = (*entry).max(until);
            }
        }
        paused
    }

    pub fn status_rows(&self, allowance: &Allowance) -> Vec<SlotStatus> {
        self.slots.iter().map(|s| self.status_row(s, allowance)).collect()
    }

    pub fn status_row(&self, slot: &Slot, allowance: &Allowance) -> SlotStatus {
        let provider = self.providers[slot.provider].name.clone();
        let Some(t) = &slot.task else {
            return SlotStatus::ready(slot.name.clone(), provider);
        };
        let now = SystemTime::now();
        let running = t.is_running();
        let (waiting_until, waiting_for) = match &t.record.phase {
            Phase::Waiting { until, waiting_for, .. } => (*until, Some(*waiting_for)),
            _ => (None, None),
        };
        // Kept for this release under its old name: a usage-limit wait, or a limit the running CLI waits out.
        let rate_limited_until = match waiting_for {
            Some(WaitFor::UsageLimit) => waiting_until,
            _ => t.health.rate_limited_until.filter(|u| running && *u > now),
        };
        let (end_cause, reason) = match &t.unrecorded {
            Some(exit) => (
                Some(EndCause::DiskFull),
                Some(format!(
                    "the run ended ({}) but its record cannot be written: the state dir's filesystem is full; the slot \
                     stays held until it is",
                    exit.reason.as_deref().unwrap_or(&exit.state)
                )),
            ),
            None => (t.record.phase.end_cause(), t.record.phase.reason().map(str::to_string)),
        };
        SlotStatus {
            slot: slot.name.clone(),
            provider,
            state: t.state(),
            issue: Some(t.issue()),
            task_id: Some(t.record.task_id.clone()),
            run_id: Some(t.record.run_id.clone()),
            runs: t.record.runs.clone(),
            worktree: t.record.worktree.as_ref().map(|p| p.display().to_string()),
            branch: t.record.branch.clone(),
            commits: t.commits,
            changes: t.changes,
            pr: None,
            held_elsewhere: None,
            pid: t.record.pid.filter(|_| running),
            adopted: t.adopted,
            started_at: Some(rfc3339(t.run_started_at)),
            last_output_at: t.last_output_at.map(rfc3339),
            ended_at: t.ended_at.map(rfc3339),
            session_id: t.record.session_id.clone(),
            exit_code: match &t.record.phase {
                Phase::Ended { exit_code, .. } => *exit_code,
                _ => None,
            },
            end_cause: end_cause.map(|c| c.as_str().to_string()),
            reason,
            waiting_until: waiting_until.map(rfc3339),
            waiting_for: waiting_for.map(|w| w.as_str().to_string()),
            restarts: Some(Restarts {
                used: allowance.used(&t.record.restarts, now),
                allowed: allowance.count,
                per_secs: allowance.per.as_secs(),
            }),
            cost_usd: t.cost_usd,
            cost_estimated: t.cost_estimated,
            tokens: t.usage,
            turns: t.turns,
            console_preview: t.preview.clone(),
            heartbeat_at: Some(rfc3339(t.heartbeat())),
            progress: t.health.progress,
            progress_message: t.health.progress_message.clone(),
            cpu_percent: t.health.cpu_percent.filter(|_| running),
            memory_mb: t.health.memory_mb.filter(|_| running),
            attempt: t.record.runs.len() as u32,
            rate_limited_until: rate_limited_until.map(rfc3339),
        }
    }

    pub fn usage(&self) -> Vec<ProviderUsage> {
        self.providers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let slots: Vec<SlotUse> = self
                    .slots
                    .iter()
                    .filter(|s| s.provider == i)
                    .map(|s| SlotUse {
                        slot: s.name.clone(),
                        state: s.state(),
                        issue: s.task.as_ref().filter(|t| t.holds_slot()).map(|t| t.issue()),
                    })
                    .collect();
                ProviderUsage {
                    provider: p.name.clone(),
                    enabled: p.enabled,
                    used: slots.iter().filter(|s| s.state.holds_slot()).count(),
                    max: p.slots,
                    slots,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(json: &str) -> SlotTable {
        let config = Config::parse(json, None).unwrap();
        let providers = config.providers().iter().map(Provider::from_entry).collect();
        SlotTable::new(providers, config.raw.default_llm.clone(), ".autonomous-config.json".into())
    }

    fn occupy(t: &mut SlotTable, index: usize, issue: u64) {
        let mut record = SlotLock::new("", "", issue, PathBuf::new(), PathBuf::new());
        record.phase = Phase::Running { stale: false, stop: None };
        t.slots[index].task = Some(Task::starting(record));
    }

    fn req(issue: u64, llm: Option<&'static str>, slot: Option<&'static str>) -> SlotRequest<'static> {
        SlotRequest { issue, llm, slot }
    }

    #[test]
    fn lowest_free_slot_then_seed_message() {
        let mut t = table(r#"{"llms":{"claude":{"maxConcurrentIssues":2}}}"#);
        assert_eq!(t.slots[t.choose(&req(1, None, None)).unwrap()].name, "claude-1");
        occupy(&mut t, 0, 1);
        assert_eq!(t.slots[t.choose(&req(2, None, None)).unwrap()].name, "claude-2");
        occupy(&mut t, 1, 2);
        let e = t.choose(&req(3, None, None)).unwrap_err();
        assert_eq!(e.message, "No available Claude instances (max: 2)");
        assert_eq!(e.hint.unwrap(), "Try increasing maxConcurrentIssues in .autonomous-config.json");
    }

    #[test]
    fn an_issue_never_holds_two_slots() {
        let mut t = table(r#"{"llms":{"claude":{"maxConcurrentIssues":2}}}"#);
        occupy(&mut t, 0, 7);
        let e = t.choose(&req(7, None, Some("claude-2"))).unwrap_err();
        assert!(e.message.contains("already assigned to claude-1"), "{}", e.message);
    }

    #[test]
    fn slot_override_errors_name_the_slot() {
        let mut t = table(r#"{"llms":{"claude":{"maxConcurrentIssues":2},"codex":{"enabled":false}}}"#);
        occupy(&mut t, 1, 5);
        assert!(t.choose(&req(1, None, Some("claude-2"))).unwrap_err().message.contains("claude-2 is busy"));
        assert!(t.choose(&req(1, None, Some("claude-9"))).unwrap_err().message.contains("unknown slot \"claude-9\""));
        assert!(t.choose(&req(1, None, Some("codex-1"))).unwrap_err().message.contains("disabled"));
        assert!(t.choose(&req(1, Some("gemini"), None)).unwrap_err().message.contains("unknown LLM"));
    }

    #[test]
    fn without_llm_the_first_enabled_provider_with_room_wins() {
        let mut t = table("{}");
        occupy(&mut t, 0, 1);
        assert_eq!(t.slots[t.choose(&req(2, None, None)).unwrap()].name, "gemini-1");
        occupy(&mut t, 1, 2);
        occupy(&mut t, 2, 3);
        assert!(t.choose(&req(4, None, None)).unwrap_err().message.starts_with("No available instances of any"));
    }
}
