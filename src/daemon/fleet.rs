//! This daemon in the fleet (`fleet.enabled`): takes an issue's claim before any run of it starts, renews one
//! heartbeat for all its claims, stops its runs when it could not renew in time or a claim moved, lets go of claims
//! once their tasks ended and their GitHub writes are done, offers stale machines' claims to the autopilot, and
//! checks the claim before every GitHub write for an issue (the client's write guard).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::Shared;
use super::life::drive;
use crate::fleet::lease::{Lease, Watch};
use crate::fleet::{Claim, Holder, Store, StoreError, View};
use crate::github::client::GhError;
use crate::protocol::{ErrorKind, ErrorReply, FleetClaim, FleetMachine, FleetReport, FleetSummary, refuse};
use crate::task::Event;
use crate::timefmt::rfc3339;

/// Tries a taken-over issue gets to start here before it is let go.
const MAX_PENDING_TRIES: u32 = 5;

/// How a run takes its issue's claim.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Claiming {
    /// A new task: an unclaimed issue (or one this machine holds already). `force`: a stale machine's claim may be
    /// taken over (never a live one). `from_board`: taken from the board's Ready column, so it must still be Ready
    /// once the claim is ours (another machine may have run it meanwhile).
    New { force: bool, from_board: bool },
    /// The autopilot takes over a stale machine's claim at this version.
    Takeover { version: String },
    /// The next run of a task that holds its claim already (a retry, a policy's resume): at `version`, the claim
    /// its record names (`None`: a task from before the fleet was on, which claims its issue now).
    Continue { version: Option<String> },
}

pub(super) struct Fleet {
    pub machine: String,
    store: Arc<dyn Store>,
    lease: Lease,
    started: Instant,
    /// `fleet.json`: when the heartbeat was last renewed (this machine's own clock), so a restart knows.
    path: PathBuf,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    /// Taking and letting go of claims, one at a time on this machine: a release never lands under a new claim
    /// of the same issue made here meanwhile.
    claim_ops: tokio::sync::Mutex<()>,
    /// Set once the first heartbeat was tried: a claim asked for just after start-up waits for it.
    first_beat: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    view: Option<View>,
    read_at: Option<SystemTime>,
    watch: Watch,
    /// The claims this machine holds, with when it learnt so.
    mine: BTreeMap<u64, (Claim, Instant)>,
    /// Claims found lost (moved or gone) and the tasks not yet told, with why.
    lost: BTreeMap<u64, String>,
    /// When the last successful renewal was sent.
    renewed: Option<Instant>,
    last_error: Option<String>,
    /// Issues taken over whose task has not started here yet (no slot, a failed read): kept, not let go, and
    /// offered to the autopilot again, so a taken-over issue is never left without anyone.
    pending: BTreeMap<u64, u32>,
    /// Own taken-over claims found at start-up were made pending (they have no task here after a restart).
    adopted_pending: bool,
}

/// `fleet.json`: when the last renewal was sent, for a restart and for the lease keeper.
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    /// By the wall clock (for people, and across a reboot).
    renewed_at: String,
    /// By the boot-time clock of this boot, which never steps back.
    #[serde(default)]
    boot_id: String,
    #[serde(default)]
    boottime_ms: u64,
}

impl Fleet {
    /// The fleet as the config says, or `None` when it is off. `Err` when it is on but cannot work.
    pub(super) fn setup(
        config: &crate::config::Config,
        github: &Result<crate::github::GitHubCtx, String>,
        state_dir: &std::path::Path,
    ) -> Result<Option<Arc<Fleet>>, String> {
        let settings = &config.raw.fleet;
        if !settings.enabled {
            return Ok(None);
        }
        let machine = settings.machine_name();
        let store: Arc<dyn Store> = match settings.backend {
            crate::config::FleetBackend::Github => {
                let gh = github.as_ref().map_err(|why| format!("fleet.backend \"github\" needs GitHub: {why}"))?;
                let (owner, repo) = match settings.repo.as_deref().and_then(|r| r.split_once('/')) {
                    Some((o, r)) => (o.to_string(), r.to_string()),
                    None => (gh.owner.clone(), gh.repo.clone()),
                };
                Arc::new(crate::fleet::github::GithubStore::new(gh.gh.clone(), owner, repo, machine.clone()))
            }
            crate::config::FleetBackend::Nats => Arc::new(crate::fleet::nats::NatsStore::new(
                settings.nats.url.clone(),
                machine.clone(),
                Duration::from_secs_f64(settings.stale_after_secs),
            )),
        };
        let lease = Lease {
            heartbeat: Duration::from_secs_f64(settings.heartbeat_secs),
            stale: Duration::from_secs_f64(settings.stale_after_secs),
            grace: Duration::from_secs_f64(config.raw.supervisor.stop_grace_secs),
        };
        let path = state_dir.join("fleet.json");
        // The last renewal before a restart counts: a daemon down for longer than the lease stops what it adopted.
        let renewed = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Persisted>(&b).ok())
            .and_then(|p| {
                if p.boot_id == crate::ledger::boot_id() && p.boottime_ms > 0 {
                    let now = crate::fleet::keeper::boottime();
                    return Some(now.saturating_sub(Duration::from_millis(p.boottime_ms)));
                }
                SystemTime::now().duration_since(crate::timefmt::parse_rfc3339(&p.renewed_at)?).ok()
            })
            .and_then(|ago| Instant::now().checked_sub(ago));
        let state = State { renewed, ..State::default() };
        Ok(Some(Arc::new(Fleet {
            machine,
            store,
            lease,
            started: Instant::now(),
            path,
            state: Mutex::new(state),
            wake: tokio::sync::Notify::new(),
            claim_ops: tokio::sync::Mutex::new(()),
            first_beat: tokio::sync::watch::Sender::new(false),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `<slot>@<machine>`: the slot as the board and the claims name it.
    pub(super) fn instance(&self, slot: &str) -> String {
        format!("{slot}@{}", self.machine)
    }

    /// How long ago the last renewal was sent (since start-up, with none).
    fn since_renewal(&self, now: Instant) -> Duration {
        let renewed = self.lock().renewed;
        match renewed {
            Some(at) => now.saturating_duration_since(at),
            // Never renewed: as if just past the deadline, until the first beat succeeds.
            None => self.lease.stale + now.saturating_duration_since(self.started),
        }
    }

    fn lease_ok(&self) -> bool {
        !self.lease.holder_must_stop(self.since_renewal(Instant::now()))
    }

    /// Reads the store and takes in what it says (claims learnt after the read was sent stand). `Ok(true)` when
    /// what `status` shows of the fleet changed: the claims or the machines, not merely their beats.
    async fn read(&self) -> Result<bool, StoreError> {
        let sent = Instant::now();
        let view = self.store.read().await;
        let mut state = self.lock();
        let view = match view {
            Ok(v) => v,
            Err(e) => {
                state.last_error = Some(e.to_string());
                return Err(e);
            }
        };
        let now = Instant::now();
        let holders: Vec<String> = view.claims.values().map(|c| c.holder.machine.clone()).collect();
        state.watch.observe(&view.beats, holders.iter(), sent);
        for (issue, claim) in &view.claims {
            if claim.holder.machine == self.machine && !state.mine.contains_key(issue) {
                // Ours by name: made before a restart, or an answer that was lost.
                state.mine.insert(*issue, (claim.clone(), now));
            }
        }
        let moved: Vec<(u64, String)> = state
            .mine
            .iter()
            .filter(|(_, (_, at))| *at < sent)
            .filter_map(|(issue, (claim, _))| match view.claims.get(issue) {
                Some(now) if now.version == claim.version => None,
                Some(other) => Some((
                    *issue,
                    format!(
                        "the fleet's claim on #{issue} is held by {}@{} now",
                        other.holder.slot, other.holder.machine
                    ),
                )),
                None => Some((*issue, format!("the fleet's claim on #{issue} is gone"))),
            })
            .collect();
        for (issue, why) in moved {
            state.mine.remove(&issue);
            state.lost.insert(issue, why);
        }
        let shown = |v: &View| (v.claims.clone(), v.beats.keys().cloned().collect::<Vec<_>>());
        let changed = state.last_error.is_some() || state.view.as_ref().map(shown) != Some(shown(&view));
        state.view = Some(view);
        state.read_at = Some(SystemTime::now());
        state.last_error = None;
        Ok(changed)
    }

    /// Takes the claim for a run of `issue` in `slot`, or says why it cannot be had. Before any run starts.
    pub(super) async fn acquire(
        &self,
        shared: &Shared,
        issue: u64,
        slot: &str,
        how: &Claiming,
    ) -> Result<Claim, ErrorReply> {
        if !self.lease_ok() {
            // Just started: the first beat is on its way (bounded by the store's own deadlines).
            let mut tried = self.first_beat.subscribe();
            let wait = self.lease.heartbeat + Duration::from_secs(30);
            let _ = tokio::time::timeout(wait, tried.wait_for(|t| *t)).await;
        }
        let taken = {
            let _one_at_a_time = self.claim_ops.lock().await;
            self.acquire_locked(issue, slot, how).await?
        };
        let recheck = match how {
            Claiming::New { from_board: true, .. } => Some(Recheck::Ready),
            Claiming::Takeover { .. } => Some(Recheck::InProgress),
            _ => None,
        };
        // Outside the claim lock (a GitHub read): the slot is held as starting meanwhile, so no release takes it.
        if let Some(recheck) = recheck {
            match still_wanted(shared, issue, recheck).await {
                Wanted::Yes => {}
                // Someone ran it meanwhile (and let go of its claim), or it ended before its holder died: not again.
                Wanted::No(why) => {
                    let _one_at_a_time = self.claim_ops.lock().await;
                    self.lock().pending.remove(&issue);
                    self.let_go_locked(issue).await;
                    return Err(refuse(ErrorKind::Conflict, why, None));
                }
                // Unknown for now: a taken-over claim is kept and offered again (never left to nobody); a new one
                // is let go at the next read, and the board offers the item again.
                Wanted::Unknown(why) => return Err(refuse(ErrorKind::Failed, why, None)),
            }
        }
        Ok(taken)
    }

    /// The claim itself, under `claim_ops`.
    async fn acquire_locked(&self, issue: u64, slot: &str, how: &Claiming) -> Result<Claim, ErrorReply> {
        let unavailable = |e: StoreError| {
            refuse(
                ErrorKind::Failed,
                format!("cannot take the fleet's claim on issue #{issue}: {e}"),
                Some("no run starts without its claim; see `autodevctl fleet`".into()),
            )
        };
        if self.lock().view.is_none() {
            self.read().await.map_err(unavailable)?;
        }
        if !self.lease_ok() {
            return Err(refuse(
                ErrorKind::Failed,
                format!(
                    "this machine ({}) has not renewed its fleet heartbeat for {}: no run starts until it has",
                    self.machine,
                    crate::timefmt::short_duration(self.since_renewal(Instant::now()).as_secs())
                ),
                Some("see `autodevctl fleet` for the store's last error".into()),
            ));
        }
        let lost = || {
            refuse(
                ErrorKind::Conflict,
                format!("the fleet's claim on issue #{issue} is no longer {}'s", self.machine),
                Some("`autodevctl fleet` shows who holds it".into()),
            )
        };
        let held = self.lock().mine.get(&issue).map(|(c, _)| c.clone());
        let recorded = match how {
            Claiming::Continue { version: Some(v) } => Some(v.clone()),
            _ => None,
        };
        if let Some(expected) = held.as_ref().map(|c| c.version.clone()).or(recorded) {
            // Ours already (a resume, a restart): still so?
            return match self.store.check(issue).await.map_err(unavailable)? {
                Some(version) if version == expected => {
                    let claim = held.unwrap_or_else(|| Claim { issue, holder: self.holder(slot, 1), version });
                    self.lock().mine.insert(issue, (claim.clone(), Instant::now()));
                    Ok(claim)
                }
                _ => {
                    self.lock().mine.remove(&issue);
                    Err(lost())
                }
            };
        }
        let taken = match how {
            Claiming::Takeover { version } => self.take_over(issue, version, slot).await,
            _ => match self.store.create(issue, &self.holder(slot, 1)).await {
                Err(StoreError::Conflict(_)) => {
                    // Claimed: by us (an answer lost), by a stale machine (a forced takeover), or by a live one.
                    self.read().await.map_err(unavailable)?;
                    let current = self.lock().view.as_ref().and_then(|v| v.claims.get(&issue).cloned());
                    match current {
                        Some(c) if c.holder.machine == self.machine => Ok(c),
                        Some(c) if matches!(how, Claiming::New { force: true, .. }) => {
                            self.take_over(issue, &c.version, slot).await
                        }
                        Some(c) => Err(self.held_elsewhere(&c)),
                        None => Err(refuse(
                            ErrorKind::Conflict,
                            format!("issue #{issue} was claimed and released meanwhile"),
                            Some("try again".into()),
                        )),
                    }
                }
                other => other.map_err(unavailable),
            },
        }?;
        tracing::info!(issue, slot, epoch = taken.holder.epoch, "fleet: claimed issue #{issue}");
        let mut state = self.lock();
        state.mine.insert(issue, (taken.clone(), Instant::now()));
        if matches!(how, Claiming::Takeover { .. }) {
            // Taken over by the autopilot: this machine's to finish; offered again until its task runs here.
            state.pending.entry(issue).or_insert(0);
        }
        Ok(taken)
    }

    /// The task of `issue` runs here now: a taken-over issue is no longer pending.
    pub(super) fn started(&self, issue: u64) {
        self.lock().pending.remove(&issue);
    }

    /// A taken-over issue that will not run here after all (refused for good): its claim may be let go.
    pub(super) fn forget_pending(&self, issue: u64) {
        self.lock().pending.remove(&issue);
    }

    /// A taken-over issue failed to start again; after a few tries it is let go (with a warning) rather than held
    /// by a live machine that cannot run it, which nobody else could take.
    pub(super) fn pending_failed(&self, issue: u64) {
        let mut state = self.lock();
        let Some(tries) = state.pending.get_mut(&issue) else { return };
        *tries += 1;
        if *tries >= MAX_PENDING_TRIES {
            state.pending.remove(&issue);
            tracing::warn!(
                issue,
                "fleet: a taken-over issue did not start in {MAX_PENDING_TRIES} tries: letting it go"
            );
        }
    }

    /// Whether this machine still holds `issue` at `version` with its lease in force: the last look before a run
    /// starts (no request; a claim lost since the check is caught here).
    pub(super) fn still_holds(&self, issue: u64, version: Option<&str>) -> bool {
        let held = self.lock().mine.get(&issue).map(|(c, _)| c.version.clone());
        self.lease_ok() && held.is_some() && held.as_deref() == version
    }

    /// Takes a stale machine's claim at `version`, if this machine has seen its heartbeat unchanged long enough.
    fn holder(&self, slot: &str, epoch: u64) -> Holder {
        Holder { machine: self.machine.clone(), slot: slot.to_string(), epoch }
    }

    async fn take_over(&self, issue: u64, version: &str, slot: &str) -> Result<Claim, ErrorReply> {
        // Judged on a read made now, never on old news.
        if let Err(e) = self.read().await {
            return Err(refuse(ErrorKind::Failed, format!("cannot take over issue #{issue}: {e}"), None));
        }
        let current = self.lock().view.as_ref().and_then(|v| v.claims.get(&issue).cloned());
        let Some(current) = current.filter(|c| c.version == version) else {
            return Err(refuse(ErrorKind::Conflict, format!("the claim on issue #{issue} moved meanwhile"), None));
        };
        if !self.is_stale(&current.holder.machine) {
            return Err(self.held_elsewhere(&current));
        }
        match self.store.swap(issue, version, &self.holder(slot, current.holder.epoch.saturating_add(1))).await {
            Ok(claim) => {
                tracing::warn!(
                    issue,
                    from = %format!("{}@{}", current.holder.slot, current.holder.machine),
                    "fleet: took over the claim of a machine whose heartbeat stopped"
                );
                Ok(claim)
            }
            Err(StoreError::Conflict(why)) => {
                // Perhaps it was ours, and only the answer was lost.
                if self.read().await.is_ok()
                    && let Some(c) = self.lock().view.as_ref().and_then(|v| v.claims.get(&issue).cloned())
                    && c.holder.machine == self.machine
                {
                    return Ok(c);
                }
                Err(refuse(ErrorKind::Conflict, format!("another machine took issue #{issue} first: {why}"), None))
            }
            Err(e) => Err(refuse(ErrorKind::Failed, format!("cannot take over issue #{issue}: {e}"), None)),
        }
    }

    fn is_stale(&self, machine: &str) -> bool {
        machine != self.machine && self.lock().watch.unchanged_for(machine) >= self.lease.takeover_after()
    }

    fn held_elsewhere(&self, claim: &Claim) -> ErrorReply {
        let seen = self.lock().watch.unchanged_for(&claim.holder.machine).as_secs();
        refuse(
            ErrorKind::Conflict,
            format!(
                "issue #{} is held by {}@{} (the fleet's claim, epoch {}); its heartbeat has not changed for {} here, \
                 and it may be taken over after {}",
                claim.issue,
                claim.holder.slot,
                claim.holder.machine,
                claim.holder.epoch,
                crate::timefmt::short_duration(seen),
                crate::timefmt::short_duration(self.lease.takeover_after().as_secs())
            ),
            Some("a live claim is never taken, not even with --force".into()),
        )
    }

    /// Releases the claim on `issue` if no task holds the issue here, nothing is owed to GitHub for it, and it is
    /// not a takeover waiting to start; checked again under the claim lock, right before the release.
    async fn release_if_idle(&self, shared: &Shared, issue: u64) {
        let _one_at_a_time = self.claim_ops.lock().await;
        let pending = self.lock().pending.contains_key(&issue);
        if pending || held_issues(shared, true).contains(&issue) || owed(shared, issue) {
            return;
        }
        self.let_go_locked(issue).await;
    }

    /// Releases this machine's claim on `issue` (compare-and-swap: never another's). Under `claim_ops`.
    async fn let_go_locked(&self, issue: u64) {
        let Some((claim, _)) = self.lock().mine.get(&issue).cloned() else { return };
        match self.store.release(issue, &claim.version).await {
            Ok(()) | Err(StoreError::Conflict(_)) => {
                tracing::info!(issue, "fleet: released the claim on #{issue}");
                let mut state = self.lock();
                if state.mine.get(&issue).is_some_and(|(c, _)| c.version == claim.version) {
                    state.mine.remove(&issue);
                }
            }
            Err(e) => tracing::warn!(issue, "fleet: cannot release the claim on #{issue} yet: {e}"),
        }
    }

    /// Stale machines' claims, oldest issue first, that this machine could take over now; and its own taken-over
    /// claims whose task did not start yet.
    pub(super) fn takeover_candidates(&self) -> Vec<Claim> {
        let state = self.lock();
        let Some(view) = &state.view else { return Vec::new() };
        let mut out: Vec<Claim> = view
            .claims
            .values()
            .filter(|c| c.holder.machine != self.machine)
            .filter(|c| state.watch.unchanged_for(&c.holder.machine) >= self.lease.takeover_after())
            .cloned()
            .collect();
        out.extend(state.pending.keys().filter_map(|i| state.mine.get(i).map(|(c, _)| c.clone())));
        out.sort_by_key(|c| c.issue);
        out
    }

    /// Who holds `issue` elsewhere, as `<slot>@<machine>`, from the last read.
    pub(super) fn holder_elsewhere(&self, issue: u64) -> Option<String> {
        let state = self.lock();
        let claim = state.view.as_ref()?.claims.get(&issue)?;
        (claim.holder.machine != self.machine).then(|| format!("{}@{}", claim.holder.slot, claim.holder.machine))
    }

    pub(super) fn summary(&self) -> FleetSummary {
        let state = self.lock();
        let (machines, here, elsewhere) = match &state.view {
            Some(v) => {
                let mut names: std::collections::BTreeSet<&String> = v.beats.keys().collect();
                names.extend(v.claims.values().map(|c| &c.holder.machine));
                names.insert(&self.machine);
                let here = v.claims.values().filter(|c| c.holder.machine == self.machine).count();
                (names.len(), here.max(state.mine.len()), v.claims.len().saturating_sub(here))
            }
            None => (1, state.mine.len(), 0),
        };
        FleetSummary {
            machine: self.machine.clone(),
            backend: self.store.name().into(),
            machines,
            claims_here: here,
            claims_elsewhere: elsewhere,
            renewed_secs_ago: state.renewed.map(|t| t.elapsed().as_secs()),
            last_error: state.last_error.clone(),
        }
    }

    pub(super) fn report(&self, shared: &Shared) -> FleetReport {
        let summary = self.summary();
        let state = self.lock();
        let empty = View::default();
        let view = state.view.as_ref().unwrap_or(&empty);
        let mut machines: BTreeMap<String, FleetMachine> = BTreeMap::new();
        for (name, _, unchanged) in state.watch.machines() {
            let this = name == self.machine;
            machines.insert(
                name.clone(),
                FleetMachine {
                    heartbeat_unchanged_secs: if this {
                        state.renewed.map_or(unchanged.as_secs(), |t| t.elapsed().as_secs())
                    } else {
                        unchanged.as_secs()
                    },
                    stale: !this && unchanged >= self.lease.takeover_after(),
                    this,
                    name,
                    busy_slots: Vec::new(),
                    claims: Vec::new(),
                },
            );
        }
        let claims: Vec<FleetClaim> = view
            .claims
            .values()
            .map(|c| FleetClaim {
                issue: c.issue,
                machine: c.holder.machine.clone(),
                slot: c.holder.slot.clone(),
                epoch: c.holder.epoch,
                instance: format!("{}@{}", c.holder.slot, c.holder.machine),
            })
            .collect();
        for c in &claims {
            let m = machines.entry(c.machine.clone()).or_insert_with(|| FleetMachine {
                name: c.machine.clone(),
                heartbeat_unchanged_secs: 0,
                stale: false,
                this: c.machine == self.machine,
                busy_slots: Vec::new(),
                claims: Vec::new(),
            });
            m.claims.push(c.issue);
            if !m.busy_slots.contains(&c.slot) {
                m.busy_slots.push(c.slot.clone());
            }
        }
        let (writes, reads) = self.store.requests();
        FleetReport {
            summary,
            heartbeat_secs: shared.config.raw.fleet.heartbeat_secs,
            stale_after_secs: shared.config.raw.fleet.stale_after_secs,
            machines: machines.into_values().collect(),
            claims,
            read_at: state.read_at.map(rfc3339),
            writes,
            reads,
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    /// The write guard: is the claim on `issue` still this machine's, right now?
    async fn may_write(&self, issue: u64) -> Result<(), GhError> {
        if self.lock().view.is_none() {
            // After a restart, before the first read: wait, do not drop (the claims may well be ours).
            return Err(GhError::Unavailable("the fleet's claims are not read yet".into()));
        }
        let Some((claim, _)) = self.lock().mine.get(&issue).cloned() else {
            return Err(GhError::NotOurs(format!("this machine ({}) holds no claim on issue #{issue}", self.machine)));
        };
        match self.store.check(issue).await {
            Ok(Some(version)) if version == claim.version => Ok(()),
            Ok(_) | Err(StoreError::Conflict(_)) => {
                let why = format!("the fleet's claim on issue #{issue} is no longer {}'s", self.machine);
                let mut state = self.lock();
                state.mine.remove(&issue);
                state.lost.insert(issue, why.clone());
                drop(state);
                self.wake.notify_one();
                Err(GhError::NotOurs(why))
            }
            Err(e) => Err(GhError::Unavailable(format!("cannot check the fleet's claim on #{issue}: {e}"))),
        }
    }

    fn persist_renewal(&self, sent: SystemTime, boottime: Duration) {
        let record = Persisted {
            renewed_at: rfc3339(sent),
            boot_id: crate::ledger::boot_id(),
            boottime_ms: boottime.as_millis() as u64,
        };
        if let Err(e) = crate::ledger::write_json(&self.path, &record) {
            tracing::warn!("fleet: cannot note the renewal in {}: {e}", self.path.display());
        }
    }
}

impl crate::github::client::WriteGuard for Fleet {
    fn check(&self, issue: u64) -> std::pin::Pin<Box<dyn Future<Output = Result<(), GhError>> + Send + '_>> {
        Box::pin(self.may_write(issue))
    }
}

#[derive(Debug, Clone, Copy)]
enum Recheck {
    /// Still in a Ready column (nobody ran it meanwhile).
    Ready,
    /// Still in progress (its holder did not finish it before it stopped).
    InProgress,
}

/// Whether an issue is still to be run once its claim is ours.
enum Wanted {
    Yes,
    No(String),
    /// GitHub could not say: ask again later.
    Unknown(String),
}

/// Whether the issue is still to be run once the claim is ours. Without a board, yes.
async fn still_wanted(shared: &Shared, issue: u64, recheck: Recheck) -> Wanted {
    let Some(github) = shared.github.as_ref().ok().filter(|g| g.sync_enabled) else { return Wanted::Yes };
    let view = match github.reconciler.read_issue(issue).await {
        Ok(v) => v,
        Err(e) => return Wanted::Unknown(format!("cannot read issue #{issue} to check it is still to be done: {e}")),
    };
    if !view.open {
        return Wanted::No(format!("issue #{issue} is closed"));
    }
    let status = view.item.as_ref().and_then(|i| i.status.clone());
    let fields = &shared.config.raw.project.fields.status;
    let ok = match recheck {
        Recheck::Ready => status.as_ref().is_some_and(|s| fields.ready_values.contains(s)),
        Recheck::InProgress => status.as_deref().is_none_or(|s| {
            s == fields.in_progress_value
                || fields.ready_values.iter().any(|r| r == s)
                || fields.needs_more_info_value.as_str() == Some(s)
        }),
    };
    match ok {
        true => Wanted::Yes,
        false => {
            Wanted::No(format!("issue #{issue} is {:?} on the board now: not run again", status.unwrap_or_default()))
        }
    }
}

/// Whether something is still owed to GitHub for `issue` (board fields, the pull request, notes, the status
/// comment): its claim is kept until it is written.
fn owed(shared: &Shared, issue: u64) -> bool {
    shared.github.as_ref().is_ok_and(|g| {
        g.reconciler.owes(issue) || g.posts.owes_issue(issue) || g.comments.as_ref().is_some_and(|c| c.owes(issue))
    })
}

/// Takes the claim for a run of `issue` in `slot` when the fleet is on (without it there is nothing to take), and
/// notes its version in the slot's task record (its lockfile is written when the run starts).
pub(super) async fn claim(shared: &Shared, issue: u64, slot: &str, how: &Claiming) -> Result<(), ErrorReply> {
    let Some(fleet) = &shared.fleet else { return Ok(()) };
    let claim = fleet.acquire(shared, issue, slot, how).await?;
    if let Some(task) = shared.lock_table().get_mut(slot).and_then(|s| s.task.as_mut())
        && task.issue() == issue
    {
        task.record.claim = Some(claim.version);
    }
    Ok(())
}

/// The claim version a slot's task records, for [`Claiming::Continue`].
pub(super) fn recorded(shared: &Shared, slot: &str) -> Option<String> {
    shared.lock_table().get(slot).and_then(|s| s.task.as_ref()).and_then(|t| t.record.claim.clone())
}

/// Whether a completed run's branch may be pushed: `Err(why)` when the issue is another machine's now (a push is a
/// write too). When the store cannot be asked, a machine whose lease holds still pushes (never forced).
pub(super) async fn may_push(shared: &Shared, run_id: &str) -> Result<(), String> {
    let task = shared.lock_table().task_of_run(run_id).map(|t| (t.issue(), t.record.phase.stop().cloned()));
    let Some((issue, stop)) = task else { return Ok(()) };
    if let Some(crate::task::StopBy::ClaimLost { why }) = stop {
        return Err(why);
    }
    let Some(fleet) = &shared.fleet else { return Ok(()) };
    match fleet.may_write(issue).await {
        Ok(()) => Ok(()),
        Err(GhError::NotOurs(why)) => Err(why),
        Err(_) if fleet.lease_ok() => Ok(()),
        Err(e) => Err(format!("the fleet's claim on #{issue} cannot be confirmed ({e}) and the lease ran out")),
    }
}

/// Runs while the daemon does: the heartbeat on its own timer (a slow read must not delay it), and one read per
/// `fleet.heartbeatSecs` (or sooner when a write found a claim lost) with what follows from it.
pub(super) async fn run(shared: Arc<Shared>, fleet: Arc<Fleet>) {
    // Runs outlive a dead daemon; the keeper sees they do not outlive its claims.
    match crate::fleet::keeper::spawn(&shared.paths.state_dir, fleet.lease.stop_after()) {
        Ok(pid) => tracing::info!(pid, "fleet: lease keeper started"),
        Err(e) => tracing::warn!("fleet: cannot start the lease keeper ({e}): runs would outlive a dead autodevd"),
    }
    tokio::spawn(beat(shared.clone(), fleet.clone()));
    loop {
        tick(&shared, &fleet).await;
        let _ = tokio::time::timeout(fleet.lease.heartbeat, fleet.wake.notified()).await;
    }
}

/// One renewal per heartbeat for all of this machine's claims. After the first attempt, the lease watch starts:
/// runs adopted at start-up are judged by that beat, not by its absence.
async fn beat(shared: Arc<Shared>, fleet: Arc<Fleet>) {
    let mut first = true;
    loop {
        let (sent, wall, boot) = (Instant::now(), SystemTime::now(), crate::fleet::keeper::boottime());
        match fleet.store.beat().await {
            Ok(()) => {
                fleet.lock().renewed = Some(sent);
                fleet.persist_renewal(wall, boot);
            }
            Err(e) => {
                tracing::warn!("fleet: heartbeat not renewed: {e}");
                fleet.lock().last_error = Some(e.to_string());
            }
        }
        if std::mem::take(&mut first) {
            fleet.first_beat.send_replace(true);
            tokio::spawn(watch_lease(shared.clone(), fleet.clone()));
        }
        tokio::time::sleep_until((sent + fleet.lease.heartbeat).into()).await;
    }
}

async fn tick(shared: &Arc<Shared>, fleet: &Arc<Fleet>) {
    let shown_changed = match fleet.read().await {
        Ok(changed) => changed,
        Err(e) => {
            tracing::warn!("fleet: cannot read the claims: {e}");
            true
        }
    };
    let first_read = {
        let mut state = fleet.lock();
        let first = state.view.is_some() && !state.adopted_pending;
        state.adopted_pending |= first;
        first
    };
    if first_read {
        // After a restart: issues this machine took over and whose task never started here are still its to run.
        let held = held_issues(shared, true);
        let mut state = fleet.lock();
        let taken_over: Vec<u64> = state
            .mine
            .iter()
            .filter(|(issue, (claim, _))| claim.holder.epoch > 1 && !held.contains(issue))
            .map(|(issue, _)| *issue)
            .collect();
        for issue in taken_over {
            state.pending.entry(issue).or_insert(0);
        }
    }
    // Tasks whose claim moved stop, writing nothing more for their issue.
    let lost = std::mem::take(&mut fleet.lock().lost);
    for (issue, why) in lost {
        lose(shared, issue, &why);
    }
    if fleet.lease_ok() {
        claim_unclaimed(shared, fleet).await;
    }
    let held = held_issues(shared, true);
    let mine: Vec<u64> = fleet.lock().mine.keys().copied().collect();
    for issue in mine.into_iter().filter(|i| !held.contains(i)) {
        fleet.release_if_idle(shared, issue).await;
    }
    if !fleet.takeover_candidates().is_empty() {
        shared.queue.wake.notify_one();
    }
    // Subscribers (top, the dashboard) hear of the fleet only when what they show of it changed, not every beat.
    if shown_changed {
        shared.changed();
    }
}

/// The holder's side of the lease, on its own timer (a beat that hangs must not delay it): once the last renewal
/// was sent `staleAfterSecs` minus a heartbeat and the stop's grace ago, every run here stops before another
/// machine may take its issue.
async fn watch_lease(shared: Arc<Shared>, fleet: Arc<Fleet>) {
    let limit = fleet.lease.stop_after();
    loop {
        let since = fleet.since_renewal(Instant::now());
        if since < limit {
            tokio::time::sleep((limit - since).min(fleet.lease.heartbeat)).await;
            continue;
        }
        let why = format!(
            "this machine could not renew its fleet heartbeat for {}: stopped before another machine may take the \
             issue over (resume it by hand once the fleet's store answers)",
            crate::timefmt::short_duration(since.as_secs())
        );
        for issue in held_issues(&shared, false) {
            lose(&shared, issue, &why);
        }
        // No run starts while the lease is out (`acquire` refuses), so this only catches what was already going.
        tokio::time::sleep(fleet.lease.heartbeat.min(Duration::from_secs(1))).await;
    }
}

/// Issues of tasks that hold their slot here (`starting`: also those whose run is being set up).
fn held_issues(shared: &Shared, starting: bool) -> Vec<u64> {
    let table = shared.lock_table();
    table
        .slots
        .iter()
        .filter(|s| s.is_held())
        .filter_map(|s| s.task.as_ref())
        .filter(|t| starting || t.state() != crate::protocol::SlotState::Starting)
        .map(|t| t.issue())
        .collect()
}

/// The slot whose task holds `issue` here.
fn slot_of(shared: &Shared, issue: u64) -> Option<String> {
    let table = shared.lock_table();
    table
        .slots
        .iter()
        .find(|s| s.is_held() && s.task.as_ref().is_some_and(|t| t.issue() == issue))
        .map(|s| s.name.clone())
}

/// Ends (or stops) the task of `issue` here: its claim is lost.
fn lose(shared: &Arc<Shared>, issue: u64, why: &str) {
    let Some(slot) = slot_of(shared, issue) else { return };
    // A run being set up passed its claim check a moment ago and is caught once it runs (its assign or resume is
    // still working on it); one stopping for this already needs nothing more.
    let skip = shared.lock_table().get(&slot).and_then(|s| s.task.as_ref()).is_some_and(|t| {
        matches!(
            t.record.phase,
            crate::task::Phase::Starting
                | crate::task::Phase::Running { stop: Some(crate::task::StopBy::ClaimLost { .. }), .. }
        )
    });
    if skip {
        return;
    }
    tracing::warn!(slot, issue, "fleet: {why}");
    if let Err(e) = drive(shared, &slot, Event::ClaimLost { why: why.to_string() }) {
        tracing::error!(slot, "{e}");
    }
}

/// Tasks held here that this machine does not know as claimed (after a restart, or with the fleet newly on) find
/// their claim as they recorded it, or claim their issue if they recorded none; otherwise they stop.
async fn claim_unclaimed(shared: &Arc<Shared>, fleet: &Arc<Fleet>) {
    if fleet.lock().view.is_none() {
        return;
    }
    for issue in held_issues(shared, false) {
        if fleet.lock().mine.contains_key(&issue) {
            continue;
        }
        let Some(slot) = slot_of(shared, issue) else { continue };
        // A task that recorded its claim must find it as it was; one from before the fleet claims its issue now.
        let how = Claiming::Continue { version: recorded(shared, &slot) };
        match claim(shared, issue, &slot, &how).await {
            Ok(()) => fleet.started(issue),
            Err(e) if e.kind == ErrorKind::Conflict => lose(shared, issue, &e.message),
            Err(e) => tracing::warn!(issue, "fleet: {}", e.message),
        }
    }
}
