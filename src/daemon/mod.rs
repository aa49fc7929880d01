//! autodevd: start-up (config, directories, the one-daemon lock, the socket), the main loop (connections and
//! signals), and shutdown. Callable from tests and benchmarks through [`run`].

mod autopilot;
mod budget;
mod clients;
mod dashboard;
mod fleet;
mod handle;
mod health;
mod issue_sync;
mod life;
mod notify;
mod queue;
mod recovery;
mod replies;
mod retry;
mod runs;
mod server;
mod slots;
mod systemd;
mod watch;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use fs2::FileExt;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::Config;
use crate::ledger;
use crate::paths::{Paths, ensure_private_dir};
use crate::provider::Provider;
use crate::supervisor;
use crate::task::Policy;
use slots::SlotTable;
pub use slots::Task;

/// How often the STATUS= line for systemd is refreshed (only sent when it changed).
const STATUS_REFRESH: Duration = Duration::from_secs(2);

/// Longest socket path the kernel accepts (sun_path is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// What the daemon needs to start; the binary fills it from flags and the environment.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub config: Config,
    pub paths: Paths,
}

/// State shared by every connection and run.
pub struct Shared {
    pub config: Config,
    pub paths: Paths,
    /// Working directory of runs.
    pub workspace: PathBuf,
    pub daemon_pid: u32,
    pub grace: Duration,
    pub preview_lines: usize,
    pub preview_chars: usize,
    /// This boot's id: recorded with every pid, so a pid from before a reboot is never taken for ours.
    pub boot_id: String,
    table: Mutex<SlotTable>,
    watcher: watch::Watcher,
    /// What the recovery pass found that belongs to no slot.
    warnings: Mutex<Vec<String>>,
    /// Set when shutdown begins: no run starts after that.
    shutting_down: std::sync::atomic::AtomicBool,
    /// GitHub, or why it is off.
    github: Result<crate::github::GitHubCtx, String>,
    /// Outcomes of recent runs (completed?, seconds) for the summary, newest last.
    recent: Mutex<std::collections::VecDeque<(bool, u64)>>,
    /// What the config says about a task's life (retries, restarts, stale runs).
    policy: Policy,
    /// Which filesystem is full, while some of autodev's own records wait for room.
    disk_full: Mutex<Option<String>>,
    /// The loop that writes records waiting for room runs.
    flushing: std::sync::atomic::AtomicBool,
    /// The user's git identity as `GIT_AUTHOR_*`/`GIT_COMMITTER_*`, for children: some CLIs' shells hide the
    /// user's git config (gemini sets `GIT_CONFIG_GLOBAL=/dev/null`), and commits must still be the user's.
    /// Read at the first launch, not at start-up (it runs git twice).
    git_identity: std::sync::OnceLock<std::collections::BTreeMap<String, String>>,
    /// The control socket's connections (caps, idle rules, the budget of unfinished requests).
    clients: Arc<clients::Clients>,
    /// Where runs' cgroups live, or why runs are contained by process groups only.
    cgroups: Result<crate::cgroup::Cgroups, String>,
    /// Tasks whose next run is due, for [`start_next_runs`].
    start_next: tokio::sync::mpsc::UnboundedSender<life::StartNext>,
    /// The local queue, the autopilot's switch and the issues that ended here (`queue.json`).
    queue: queue::Queue,
    /// What the autopilot knows between polls.
    autopilot: Mutex<autopilot::Autopilot>,
    /// What finished runs cost today, for the day budgets.
    spend: budget::Spend,
    /// Tells people of what happens (`notifications`).
    notifier: Arc<notify::Notifier>,
    /// Bumped whenever what `status` shows may have changed: wakes the live feed's subscribers.
    changes: tokio::sync::watch::Sender<u64>,
    /// The web dashboard's token and address, when `dashboard.listen` is set.
    dashboard: Option<Arc<dashboard::Dashboard>>,
    /// This machine in the fleet, when `fleet.enabled`: the claims every run needs.
    fleet: Option<Arc<fleet::Fleet>>,
}

/// How many finished runs the summary looks back on.
const RECENT_RUNS: usize = 100;

impl Shared {
    /// The one lock over slot state. Held only for short, non-blocking work, never across an await.
    fn lock_table(&self) -> MutexGuard<'_, SlotTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a slot's lockfile atomically. Called from one task at a time per slot, so writes never reorder.
    fn write_lock(&self, lock: &ledger::SlotLock) -> std::io::Result<()> {
        ledger::write_json(&ledger::slot_lock_path(&self.paths.slots_dir(), &lock.slot), lock)
    }

    /// Notes a finished run for the summary.
    fn note_outcome(&self, completed: bool, secs: u64) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_RUNS {
            recent.pop_front();
        }
        recent.push_back((completed, secs));
    }

    /// The seed's overall view: instances and tasks at a glance.
    fn summary(&self) -> crate::protocol::Summary {
        use crate::protocol::SlotState;
        let table = self.lock_table();
        let slots: Vec<_> = table.slots.iter().filter(|s| !s.extra || s.is_held()).collect();
        let running = slots.iter().filter(|s| s.state().is_running()).count();
        let stale = slots.iter().filter(|s| s.state() == SlotState::Stale).count();
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let completed = recent.iter().filter(|(ok, _)| *ok).count();
        crate::protocol::Summary {
            instances_total: slots.len(),
            instances_healthy: running - stale,
            instances_stale: stale,
            tasks_total: recent.len() + running,
            tasks_completed: completed,
            tasks_in_progress: running,
            success_rate: (!recent.is_empty()).then(|| completed as f64 / recent.len() as f64),
            average_duration_secs: (!recent.is_empty())
                .then(|| recent.iter().map(|(_, d)| d).sum::<u64>() / recent.len() as u64),
        }
    }

    fn warnings(&self) -> Vec<String> {
        let mut warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner()).clone();
        warnings.extend(self.notifier.warnings());
        if self.config.raw.budget.per_day_usd.is_some()
            && let Some(why) = budget::day_over(self, "")
        {
            warnings.push(format!("{why}: the autopilot takes nothing new until tomorrow"));
        }
        warnings.extend(self.disk_full.lock().unwrap_or_else(|e| e.into_inner()).clone());
        warnings
    }

    /// Notes that one of autodev's writes found the state dir's filesystem full, for `status`.
    fn note_disk_full(&self, error: &std::io::Error) {
        let mount = crate::paths::mount_point(&self.paths.state_dir)
            .map_or_else(|| "?".to_string(), |m| m.display().to_string());
        let message = format!(
            "the filesystem of the state dir {} (mounted at {mount}) is full ({error}): records of ended runs wait \
             in memory and their slots stay held until there is room; free some space",
            self.paths.state_dir.display()
        );
        *self.disk_full.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
    }

    /// The cgroup of the run `lock` names, if it has one under our base (a path elsewhere, from an edited
    /// lockfile, is never trusted).
    fn run_cgroup(&self, lock: &ledger::SlotLock) -> Option<crate::cgroup::RunCgroup> {
        let cgroups = self.cgroups.as_ref().ok()?;
        let run = cgroups.run(&lock.run_id);
        (lock.cgroup.as_deref() == Some(run.path.as_path()) && !lock.run_id.is_empty()).then_some(run)
    }

    /// A warning for `status` that belongs to no slot.
    fn warn(&self, warning: String) {
        self.warnings.lock().unwrap_or_else(|e| e.into_inner()).push(warning);
        self.changed();
    }

    /// Something `status` shows may have changed (a transition, output, a sample, progress).
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The slot as the board and the fleet name it: `<slot>@<machine>` with the fleet on, else the slot.
    fn instance(&self, slot: &str) -> String {
        match &self.fleet {
            Some(fleet) => fleet.instance(slot),
            None => slot.to_string(),
        }
    }

    /// `push.enabled`, which by default follows GitHub: a completed task's branch is pushed for review.
    fn push_enabled(&self) -> bool {
        self.config.raw.push.enabled.unwrap_or(self.github.is_ok())
    }

    fn git_identity(&self) -> &std::collections::BTreeMap<String, String> {
        self.git_identity.get_or_init(|| crate::workspace::git_identity(&self.workspace))
    }

    /// `cgroup` or `process-group`, for `status`.
    fn containment(&self) -> &'static str {
        if self.cgroups.is_ok() { "cgroup" } else { "process-group" }
    }

    fn clear_disk_full(&self) {
        *self.disk_full.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Holds `daemon.lock` for the daemon's lifetime: one daemon per state dir.
struct DaemonLock {
    _file: File,
}

fn take_daemon_lock(paths: &Paths) -> anyhow::Result<DaemonLock> {
    let path = paths.daemon_lock();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if file.try_lock_exclusive().is_err() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        let who = if holder.is_empty() { "another autodevd".to_string() } else { format!("autodevd pid {holder}") };
        bail!(
            "{who} is already running on state dir {} — stop it first, or use another --state-dir",
            paths.state_dir.display()
        );
    }
    // The pid is for people; a full disk must not keep the daemon from starting (the lock is what counts).
    let noted = (|| {
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()
    })();
    if let Err(e) = noted {
        tracing::warn!("cannot write the pid into {}: {e}", path.display());
    }
    Ok(DaemonLock { _file: file })
}

/// Runs the daemon until SIGTERM or SIGINT. Must be called inside a tokio runtime.
pub async fn run(options: DaemonOptions) -> anyhow::Result<()> {
    let DaemonOptions { config, paths } = options;
    for key in &config.unknown_keys {
        let file = config.path.as_ref().map_or_else(|| "config".into(), |p| p.display().to_string());
        tracing::warn!("{file}: unknown key {key} is ignored");
    }
    ensure_private_dir(&paths.state_dir)?;
    ensure_private_dir(&paths.runtime_dir)?;
    ensure_private_dir(&paths.runs_dir())?;
    ensure_private_dir(&paths.slots_dir())?;
    let _lock = take_daemon_lock(&paths)?;
    supervisor::become_subreaper();
    // Clients are capped, but a burst of them must not run the daemon out of descriptors; children get the old limit.
    supervisor::raise_fd_limit();

    let socket_path = paths.socket();
    if socket_path.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "socket path {} is longer than {MAX_SOCKET_PATH} bytes — use a shorter --runtime-dir",
            socket_path.display()
        );
    }

    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let workspace = config.workspace_dir(&cwd);
    let providers: Vec<Provider> = config.providers().iter().map(Provider::from_entry).collect();
    let config_name =
        config.path.as_ref().map_or_else(|| ".autonomous-config.json".into(), |p| p.display().to_string());
    let table = SlotTable::new(providers, config.raw.default_llm.clone(), config_name);
    let sup = &config.raw.supervisor;
    // Secrets known without GitHub (API keys, secret variables) are redacted from the first line on; `setup`
    // adds the token once it is found.
    crate::github::install_redactor(&config, None);
    let github = crate::github::setup(&config, &workspace, &paths.state_dir);
    match &github {
        Ok(gh) => tracing::info!(
            repository = %format!("{}/{}", gh.owner, gh.repo),
            token = %gh.token_source,
            board_sync = gh.sync_enabled,
            "GitHub is on"
        ),
        Err(why) => tracing::info!("GitHub is off: {why}"),
    }
    let cgroups = match sup.containment {
        crate::config::Containment::ProcessGroup => Err("supervisor.containment is \"process-group\"".to_string()),
        crate::config::Containment::Auto => crate::cgroup::Cgroups::setup(&paths.state_dir),
    };
    match &cgroups {
        Ok(c) => tracing::info!(
            base = %c.base.display(),
            how = c.how,
            controllers = %c.controllers.join(" "),
            "containment: a cgroup per run"
        ),
        Err(why) => tracing::warn!("containment: process groups only ({why})"),
    }
    let fleet = fleet::Fleet::setup(&config, &github, &paths.state_dir).map_err(anyhow::Error::msg)?;
    if fleet.is_none() {
        // A lease keeper left from when the fleet was on must not judge this daemon's runs by an old renewal.
        crate::fleet::keeper::retire(&paths.state_dir);
    }
    if let Some(fleet) = &fleet {
        tracing::info!(machine = %fleet.machine, backend = ?config.raw.fleet.backend, "fleet: on");
        if let Ok(gh) = &github {
            // Every GitHub write for an issue asks first whether its claim is still ours.
            gh.gh.set_guard(fleet.clone());
        }
    }
    let (start_next, due) = tokio::sync::mpsc::unbounded_channel();
    let changes = tokio::sync::watch::Sender::new(0);
    let push_on = config.raw.push.enabled.unwrap_or(github.is_ok());
    let pulls_on = github.as_ref().is_ok_and(|g| g.pull_requests);
    let shared = Arc::new(Shared {
        github,
        workspace,
        daemon_pid: std::process::id(),
        grace: Duration::from_secs_f64(sup.stop_grace_secs),
        preview_lines: sup.preview_lines,
        preview_chars: sup.preview_line_chars,
        boot_id: ledger::boot_id(),
        table: Mutex::new(table),
        watcher: watch::Watcher::start().context("cannot start inotify")?,
        warnings: Mutex::new(Vec::new()),
        shutting_down: std::sync::atomic::AtomicBool::new(false),
        recent: Mutex::new(std::collections::VecDeque::new()),
        policy: Policy { pull_requests: push_on && pulls_on, ..Policy::from_config(&config.raw) },
        disk_full: Mutex::new(None),
        flushing: std::sync::atomic::AtomicBool::new(false),
        start_next,
        cgroups,
        clients: Arc::new(clients::Clients::new(sup.max_clients, sup.max_streams)),
        git_identity: std::sync::OnceLock::new(),
        queue: queue::Queue::load(paths.state_dir.join("queue.json"), changes.clone()),
        autopilot: autopilot::Autopilot::new(),
        spend: budget::Spend::load(&paths.history_file()),
        changes,
        dashboard: match &config.raw.dashboard.listen {
            None => None,
            Some(listen) => match dashboard::Dashboard::load(&paths.state_dir, listen.clone()) {
                Ok(d) => Some(Arc::new(d)),
                Err(e) => {
                    tracing::error!("dashboard: cannot keep its token in {}: {e}", paths.state_dir.display());
                    None
                }
            },
        },
        notifier: Arc::new(notify::Notifier::load(&config.notifications(), paths.state_dir.join("notifications.json"))),
        paths: paths.clone(),
        fleet,
        config,
    });
    // Before recovery: a task recovery finds at the end of its wait starts at once.
    tokio::spawn(start_next_runs(shared.clone(), due));

    if let Some(fleet) = shared.fleet.clone() {
        // Before recovery: what it resumes needs its claims, and adopted runs are checked at the first beat.
        tokio::spawn(fleet::run(shared.clone(), fleet));
    }
    // Every lockfile is settled before anyone can ask anything: no status reply shows a guess.
    let warnings = recovery::recover(&shared).await.map_err(anyhow::Error::msg)?;
    *shared.warnings.lock().unwrap_or_else(|e| e.into_inner()) = warnings;

    // We hold the daemon lock, so a socket file left here belongs to a dead daemon.
    match std::fs::remove_file(&socket_path) {
        Ok(()) => tracing::info!("removed stale socket {}", socket_path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot remove stale socket {}: {e}", socket_path.display()),
    }
    let listener =
        UnixListener::bind(&socket_path).with_context(|| format!("cannot listen on {}", socket_path.display()))?;
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600))?;
    let slot_count = shared.lock_table().slots.len();
    let notifier = systemd::Notifier::from_env();

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigchld = signal(SignalKind::child())?;
    let mut sighup = signal(SignalKind::hangup())?;
    tracing::info!(
        socket = %socket_path.display(),
        state = %paths.state_dir.display(),
        workspace = %shared.workspace.display(),
        slots = slot_count,
        "autodevd ready"
    );
    tokio::spawn(health::run(shared.clone()));
    if shared.github.is_ok() {
        tokio::spawn(replies::run(shared.clone()));
    }
    // After recovery: every held issue is known before anything new is taken.
    tokio::spawn(autopilot::run(shared.clone()));
    tokio::spawn(shared.notifier.clone().run());
    if let Some(dashboard) = &shared.dashboard {
        tokio::spawn(dashboard::serve(shared.clone(), dashboard.clone()));
    }
    if let Ok(github) = &shared.github {
        // The pull-request outbox tells the daemon what it settled: people hear of a new pull request, and the
        // autopilot learns which Status the task's end really wrote.
        let weak = Arc::downgrade(&shared);
        github.posts.on_settled(Box::new(move |wish, opened, target| {
            let Some(shared) = weak.upgrade() else { return };
            let Ok(github) = &shared.github else { return };
            if wish.from_issue {
                shared.queue.note_ended(wish.issue, github.reconciler.status_name(target));
            }
            if opened.created {
                let mut event = notify::Event::new("pr_opened");
                (event.slot, event.issue, event.title) =
                    (Some(wish.slot.clone()), Some(wish.issue), Some(wish.title.clone()));
                event.pr_url = opened.url.clone();
                shared.notifier.emit(&format!("pr:{}:{}", wish.task_id, opened.number.unwrap_or_default()), event);
            }
        }));
    }
    // Recovery is done and the socket answers: now, and not before, systemd may call us ready.
    notifier.ready(&summary(&shared));
    let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);
    let mut status_tick = notifier.enabled().then(|| tokio::time::interval(STATUS_REFRESH));
    let why = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(server::serve(shared.clone(), stream)); }
                // Out of fds and the like: keep serving the connections we have, try again shortly.
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = sigchld.recv() => supervisor::reap_orphans(),
            _ = sighup.recv() => reload(&shared),
            // Pinged from this loop, so a wedged loop stops the pings and systemd restarts us.
            _ = tick(&mut watchdog) => notifier.watchdog(),
            _ = tick(&mut status_tick) => notifier.status(&summary(&shared)),
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
        }
    };
    tracing::info!("{why}: stopping every run and exiting");
    notifier.stopping();
    shared.shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(listener);
    let _ = std::fs::remove_file(&socket_path);
    handle::stop_all(&shared, &format!("autodevd received {why} and stopped the run")).await;
    supervisor::reap_orphans();
    if let Ok(cgroups) = &shared.cgroups {
        cgroups.remove_if_empty();
    }
    tracing::info!("autodevd stopped");
    Ok(())
}

/// Starts the next run of each task the state machine says is due (`Effect::StartNext`). Here, at the top, because
/// starting a run needs the modules (`retry`, `handle`, `runs`) that send the state machine its events.
async fn start_next_runs(shared: Arc<Shared>, mut due: tokio::sync::mpsc::UnboundedReceiver<life::StartNext>) {
    while let Some(life::StartNext { slot, fallback }) = due.recv().await {
        let shared = shared.clone();
        tokio::spawn(async move { retry::start_next(&shared, &slot, fallback).await });
    }
}

/// The next tick of an optional interval; never, without one.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// One line for systemd's STATUS=: "2 in progress, 1 abandoned, 3 free".
fn summary(shared: &Shared) -> String {
    use crate::protocol::SlotState;
    let table = shared.lock_table();
    let count = |f: &dyn Fn(SlotState) -> bool| table.slots.iter().filter(|s| f(s.state())).count();
    let running = count(&|s| s.is_running());
    let waiting = count(&|s| s == SlotState::Waiting);
    let abandoned = count(&|s| s == SlotState::Abandoned);
    let free = table.slots.iter().filter(|s| !s.extra && !s.is_held()).count();
    let mut parts = vec![format!("{running} in progress")];
    if waiting > 0 {
        parts.push(format!("{waiting} waiting"));
    }
    if abandoned > 0 {
        parts.push(format!("{abandoned} abandoned"));
    }
    parts.push(format!("{free} free"));
    parts.join(", ")
}

/// SIGHUP: reads the config file again. A broken one is refused with the reason and the running config stays.
/// The LLMs (slot counts, CLI paths, arguments, models, environment) and `defaultLlm` take effect at once; running
/// slots above a lowered `maxConcurrentIssues` finish first. Other sections take effect at the next start.
fn reload(shared: &Shared) {
    let Some(path) = &shared.config.path else {
        tracing::info!("SIGHUP: autodevd runs on built-in defaults (no config file); nothing to reload");
        return;
    };
    match Config::load(path) {
        Err(e) => tracing::error!("SIGHUP: the new config is refused, the running one stays: {e}"),
        Ok(config) => {
            for key in &config.unknown_keys {
                tracing::warn!("{}: unknown key {key} is ignored", path.display());
            }
            crate::github::install_redactor(&config, shared.github.as_ref().ok().map(|g| &g.token));
            let providers: Vec<Provider> = config.providers().iter().map(Provider::from_entry).collect();
            let mut table = shared.lock_table();
            table.reconfigure(providers, config.raw.default_llm.clone());
            let names: Vec<String> = table.slots.iter().filter(|s| !s.extra).map(|s| s.name.clone()).collect();
            tracing::info!(
                "SIGHUP: reloaded {}: slots {} (other sections take effect at the next start)",
                path.display(),
                names.join(", ")
            );
        }
    }
}
