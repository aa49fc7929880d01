//! The `.autonomous-config.json` schema: discovery, defaults, unknown-key warnings and validation.
//!
//! The file users already have (../shared/reference/autonomous-config.md) loads as it is. Sections autodev does not
//! act on yet are kept as opaque JSON so they never warn; keys nobody defines warn; a wrong type or value is an
//! error that names the file and the JSON path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// The built-in providers, in the order `assign` tries them when no provider is named.
pub const BUILTIN_PROVIDERS: [&str; 3] = ["claude", "gemini", "codex"];
/// A safety cap on slots per provider; each slot costs a few KiB of daemon memory and a model subscription.
pub const MAX_SLOTS_PER_PROVIDER: u32 = 256;

/// Where the configuration came from, for messages and `status`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file read, or `None` for built-in defaults.
    pub path: Option<PathBuf>,
    pub raw: RawConfig,
    /// JSON paths of keys nobody defines, to warn about.
    pub unknown_keys: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawConfig {
    pub version: Option<String>,
    /// The provider `assign` uses when `--llm` is not given.
    pub default_llm: Option<String>,
    /// `None` when the file has no `llms` section: then every built-in provider is enabled with one slot.
    pub llms: Option<BTreeMap<String, LlmConfig>>,
    pub supervisor: SupervisorConfig,
    pub health: HealthConfig,
    pub status_comments: StatusCommentsConfig,
    pub retry: RetryConfig,
    pub autopilot: AutopilotConfig,
    pub fleet: FleetConfig,
    pub budget: BudgetConfig,
    pub dashboard: DashboardConfig,
    pub workspace: WorkspaceConfig,
    pub logging: LoggingConfig,
    // Sections that later issues act on, or that belong to the tool the format comes from. Kept opaque so
    // that a user's existing file never warns about keys it is entitled to have.
    pub github: GithubConfig,
    pub worktree: WorktreeConfig,
    pub project: ProjectConfig,
    pub requirements: Value,
    pub push: PushConfig,
    pub notifications: Value,
    pub merge_worker: Value,
    pub review_worker: Value,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LlmConfig {
    /// Defaults to true for a provider that is listed.
    pub enabled: Option<bool>,
    pub max_concurrent_issues: Option<u32>,
    pub cli_path: Option<String>,
    /// Built-in providers: extra arguments, replacing autodev's default permission flags.
    /// Custom providers: the whole argument template, with `{prompt}`, `{prompt_file}`, `{model}`,
    /// `{session_id}`, `{issue}`, `{slot}` placeholders; without `{prompt}`/`{prompt_file}` the prompt is on stdin.
    pub cli_args: Option<Vec<String>>,
    pub model: Option<String>,
    /// Passed to the child as the provider's API-key variable; never logged or shown.
    pub api_key: Option<String>,
    /// Extra environment for the child.
    pub env: BTreeMap<String, String>,
    /// Custom providers: which event format their stdout speaks (`claude`, `gemini`, `codex`, `text`).
    pub output_format: Option<String>,
    /// Limits of each run's cgroup, where the controller is delegated.
    pub limits: LlmLimits,
    /// Dollars per million tokens, for CLIs that report tokens but no cost (the cost is then marked estimated).
    pub pricing: Option<Pricing>,
    /// `budget.perDayUsd` of this LLM alone.
    pub budget: LlmBudget,
    // Keys of the original tool that autodev accepts and does not act on.
    pub hooks_enabled: Value,
    pub user: Value,
    pub custom_config: Value,
}

/// `push`: what happens to a run's work at its end. The seed tool's other keys are accepted as they are.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PushConfig {
    /// After a completed run, commit what the agent left uncommitted on the task's branch.
    pub commit_leftovers: bool,
    /// After a completed run with changes, push the task's branch and open (or update) its pull request. Unset:
    /// on when GitHub is on.
    pub enabled: Option<bool>,
    /// The remote the branch goes to.
    pub remote: String,
    /// Open pull requests as drafts (where GitHub refuses drafts, a normal one is opened and the task says so).
    pub draft: bool,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            commit_leftovers: true,
            enabled: None,
            remote: "origin".into(),
            draft: true,
            other: serde_json::Map::new(),
        }
    }
}

/// `notifications`: where events go. Read from the raw section (whose URLs the redactor also knows as secrets).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NotificationsConfig {
    /// argv run with the event's JSON on stdin (`["notify-send-autodev"]`).
    pub command: Option<Vec<String>>,
    pub webhooks: Vec<WebhookConfig>,
    pub slack: ChatWebhook,
    pub discord: ChatWebhook,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookConfig {
    pub url: String,
    /// Only these events (all when absent).
    #[serde(default)]
    pub events: Option<Vec<String>>,
}

/// The seed's `notifications.slack` / `notifications.discord`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ChatWebhook {
    pub webhook_url: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// The events people can be told of.
pub const NOTIFICATION_EVENTS: [&str; 9] =
    ["completed", "failed", "stale", "needs_info", "blocked", "usage_limit", "abandoned", "pr_opened", "budget"];

/// `llms.<name>.pricing`: dollars per million tokens.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Pricing {
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
}

/// `llms.<name>.budget`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct LlmBudget {
    pub per_day_usd: Option<f64>,
}

/// `dashboard`: the live web page. Off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DashboardConfig {
    /// `127.0.0.1:7777`: a loopback address (reach it from elsewhere through an SSH tunnel).
    pub listen: Option<String>,
    pub allow_remote: bool,
    pub tls: Value,
}

/// `budget`: what the agents may spend.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct BudgetConfig {
    /// All runs of one task together; a run is stopped where its CLI reports usage while it runs.
    pub per_task_usd: Option<f64>,
    /// All LLMs together, per local day: past it the autopilot takes nothing new until the next day.
    pub per_day_usd: Option<f64>,
}

/// `llms.<name>.limits`: cgroup limits of each run of that LLM (`memory.max`, `cpu.max`, `pids.max`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct LlmLimits {
    /// e.g. `"4G"`, `"512M"` or a byte count.
    pub memory_max: Option<String>,
    /// Cores, e.g. `1.5`; written as `cpu.max` quota per 100 ms period.
    pub cpu_max: Option<f64>,
    /// Processes and threads at most.
    pub tasks_max: Option<u64>,
}

impl LlmLimits {
    pub fn to_cgroup(&self) -> crate::cgroup::Limits {
        crate::cgroup::Limits {
            memory_max: self.memory_max.clone(),
            cpu_max: self.cpu_max.filter(|c| *c > 0.0).map(|cores| format!("{} 100000", (cores * 100_000.0) as u64)),
            tasks_max: self.tasks_max,
        }
    }
}

/// `supervisor.containment`: how a run's processes are kept together.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Containment {
    /// A cgroup per run where one can be made, else process groups.
    #[default]
    Auto,
    /// Process groups and the run lock only.
    ProcessGroup,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SupervisorConfig {
    /// Seconds between SIGTERM and SIGKILL when a run is stopped.
    pub stop_grace_secs: f64,
    /// Lines kept per slot as the console preview.
    pub preview_lines: usize,
    /// Characters kept per preview line.
    pub preview_line_chars: usize,
    /// What start-up does with a task whose run died unwatched.
    pub on_abandoned: OnAbandoned,
    /// Automatic restarts a task may get (stale restarts, abandoned resumes, retries after failures).
    pub restart_allowance: RestartAllowance,
    /// A cgroup per run (`auto`) or process groups only.
    pub containment: Containment,
    /// Request connections of the control socket at once; at the cap the longest-idle one is closed.
    pub max_clients: usize,
    /// Streaming connections (`logs -f`) at once.
    pub max_streams: usize,
}

/// `supervisor.restartAllowance`: at most `count` automatic restarts of one task per `perSecs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RestartAllowance {
    pub count: u32,
    pub per_secs: f64,
}

impl Default for RestartAllowance {
    fn default() -> Self {
        RestartAllowance { count: 3, per_secs: 3600.0 }
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            stop_grace_secs: 10.0,
            preview_lines: 10,
            preview_line_chars: 240,
            on_abandoned: OnAbandoned::Ask,
            restart_allowance: RestartAllowance::default(),
            containment: Containment::Auto,
            max_clients: 64,
            max_streams: 64,
        }
    }
}

/// `health`: sampling of each run, and what a silent run is.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HealthConfig {
    /// Seconds between samples of CPU and memory (only runs are sampled; idle slots cost nothing).
    pub sample_secs: f64,
    /// No output, no progress report and no CPU for this long: the run is stale (the seed's 5 minutes).
    pub stale_after_secs: f64,
    pub on_stale: OnStale,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { sample_secs: 10.0, stale_after_secs: 300.0, on_stale: OnStale::Mark }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStale {
    /// Show it as stale; new output brings it back.
    #[default]
    Mark,
    /// Stop it and resume the same conversation.
    Restart,
    /// Stop it and retry it as `retry` says (own provider first, then the fallbacks).
    Reassign,
}

/// `statusComments`: the INSTANCE_STATUS comment on each task's GitHub issue (seed 000).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatusCommentsConfig {
    pub enabled: bool,
    /// At most one edit per this many seconds while a run goes (state changes are written at once).
    pub interval_secs: f64,
    /// More patterns (regular expressions) whose matches are removed from previews before they leave the machine.
    pub redact_patterns: Vec<String>,
}

impl Default for StatusCommentsConfig {
    fn default() -> Self {
        StatusCommentsConfig { enabled: true, interval_secs: 60.0, redact_patterns: Vec::new() }
    }
}

/// `autopilot`: the board's Ready items feed free slots by themselves.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AutopilotConfig {
    /// `autodevctl autopilot on|off` overrides it until `autodevctl autopilot reset`.
    pub enabled: bool,
    /// How often the board is read while a slot is free.
    pub poll_secs: f64,
    /// Issue label → the LLM its task goes to (`{"llm:codex": "codex"}`).
    pub llm_labels: BTreeMap<String, String>,
}

impl Default for AutopilotConfig {
    fn default() -> Self {
        AutopilotConfig { enabled: false, poll_secs: 60.0, llm_labels: BTreeMap::new() }
    }
}

/// `fleet`: several machines share one board; a claim per issue that only one machine holds.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FleetConfig {
    pub enabled: bool,
    /// This machine's name in claims and in Assigned Instance (`<slot>@<machine>`); default the host name. Must be
    /// unique in the fleet.
    pub machine: Option<String>,
    /// One heartbeat per this many seconds for all of this machine's claims.
    pub heartbeat_secs: f64,
    /// A machine whose heartbeat has not changed for this long (plus a margin) loses its claims to others; one
    /// that could not renew for this long (minus a margin) stops its runs first.
    pub stale_after_secs: f64,
    pub backend: FleetBackend,
    pub nats: FleetNatsConfig,
    /// `owner/name` of a separate coordination repository for the claim refs; default the project's repository.
    pub repo: Option<String>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            enabled: false,
            machine: None,
            heartbeat_secs: 60.0,
            stale_after_secs: 300.0,
            backend: FleetBackend::Github,
            nats: FleetNatsConfig::default(),
            repo: None,
        }
    }
}

/// Where the fleet's claims and heartbeats live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FleetBackend {
    /// Git refs in a GitHub repository (compare-and-swap through `updateRefs`).
    Github,
    /// NATS JetStream key-value buckets.
    Nats,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FleetNatsConfig {
    pub url: String,
}

impl Default for FleetNatsConfig {
    fn default() -> Self {
        FleetNatsConfig { url: "nats://127.0.0.1:4222".into() }
    }
}

impl FleetConfig {
    /// This machine's name: `fleet.machine`, else the host name made safe for a ref name.
    pub fn machine_name(&self) -> String {
        self.machine.clone().unwrap_or_else(|| {
            let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
            let safe: String = host
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
                .take(63)
                .collect();
            let safe = safe.trim_start_matches(['-', '_']).to_string();
            if safe.is_empty() { "machine".into() } else { safe }
        })
    }
}

/// Whether `name` can name a machine in a git ref and a NATS key: letters, digits, `-`, `_`, `.`, at most 63,
/// starting with a letter or digit, never `..` or ending in `.lock` or `.`.
pub fn valid_machine_name(name: &str) -> bool {
    let first_ok = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    first_ok
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.contains("..")
        && !name.ends_with(".lock")
        && !name.ends_with('.')
}

/// `retry`: what happens to a failed task.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RetryConfig {
    /// Runs a task gets in all (1: never retried).
    pub max_attempts: u32,
    /// Providers to try, in order, when the task's own has no free slot.
    pub fallback: Vec<String>,
    /// Seconds before the first retry; each further one waits twice as long.
    pub backoff_secs: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { max_attempts: 1, fallback: Vec::new(), backoff_secs: 30.0 }
    }
}

/// Policy for abandoned tasks found at start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAbandoned {
    /// Leave them for the user (`autodevctl resume` or `release`).
    #[default]
    Ask,
    /// Resume them at once, within `supervisor.restartAllowance`.
    Resume,
    /// Mark them failed and free their slots.
    Fail,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkspaceConfig {
    /// Working directory of runs; relative paths are taken from the config file's directory.
    pub dir: Option<PathBuf>,
}

/// `github`: where issues come from and how to reach GitHub.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GithubConfig {
    /// Default: parsed from the repository's `origin` remote.
    pub owner: Option<String>,
    pub repo: Option<String>,
    /// A token in the config file works, but `GITHUB_TOKEN`, systemd credentials or `tokenFile` are better.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// An issue must carry one of these to be assigned (empty: any issue).
    pub labels: Vec<String>,
    /// An issue with one of these is refused.
    pub exclude_labels: Vec<String>,
    /// REST API root; GitHub Enterprise: `https://HOST/api/v3`.
    pub api_url: String,
    /// Seconds before a GitHub request is given up.
    pub timeout_secs: f64,
    /// The longest wait between attempts of a board update that failed (GitHub's own hints still win).
    pub retry_max_secs: f64,
    /// How often the issue of a task waiting for an answer is checked for a new comment.
    pub reply_poll_secs: f64,
    /// Seconds between two writes on one token (GitHub's secondary limits ask for one; GitHub Enterprise may allow
    /// less).
    pub write_spacing_secs: f64,
    /// The prompt built from an issue: `{number}`, `{title}`, `{body}`, `{url}`, `{slot}`, `{branch}`, `{labels}`.
    pub prompt_template: Option<String>,
    // Keys of the original tool that autodev accepts and does not act on.
    pub assign_to_self: Value,
    pub bot_username: Value,
}

impl Default for GithubConfig {
    fn default() -> Self {
        GithubConfig {
            owner: None,
            repo: None,
            token: None,
            token_file: None,
            labels: Vec::new(),
            exclude_labels: Vec::new(),
            api_url: "https://api.github.com".into(),
            timeout_secs: 20.0,
            reply_poll_secs: 60.0,
            write_spacing_secs: 1.0,
            retry_max_secs: 300.0,
            prompt_template: None,
            assign_to_self: Value::Null,
            bot_username: Value::Null,
        }
    }
}

/// `project`: the GitHub Projects v2 board whose fields autodev keeps true.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProjectConfig {
    pub enabled: bool,
    pub project_number: Option<u64>,
    /// True: the project belongs to the organization `github.owner`; false: to the user.
    pub organization_project: Option<bool>,
    pub fields: ProjectFields,
    /// `done` (default) or `review`: the Status a completed task gets.
    pub completed_status: Option<String>,
    pub prioritization: Value,
    pub sync: Value,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProjectFields {
    pub status: StatusField,
    pub assigned_instance: NamedField,
    pub priority: Value,
    pub size: Value,
    pub sprint: Value,
    pub issue_type: Value,
    pub effort: Value,
    pub complexity: Value,
    pub impact: Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatusField {
    pub field_name: String,
    pub ready_values: Vec<String>,
    pub in_progress_value: String,
    pub review_value: Option<String>,
    pub done_value: String,
    pub blocked_value: Option<String>,
    pub evaluate_value: Value,
    pub evaluated_value: Value,
    pub needs_more_info_value: Value,
}

impl Default for StatusField {
    fn default() -> Self {
        StatusField {
            field_name: "Status".into(),
            ready_values: vec!["Ready".into(), "Todo".into()],
            in_progress_value: "In Progress".into(),
            review_value: None,
            done_value: "Done".into(),
            blocked_value: None,
            evaluate_value: Value::Null,
            evaluated_value: Value::Null,
            needs_more_info_value: Value::Null,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NamedField {
    pub field_name: String,
}

impl Default for NamedField {
    fn default() -> Self {
        NamedField { field_name: "Assigned Instance".into() }
    }
}

/// `worktree`: each task works in its own git worktree.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorktreeConfig {
    pub enabled: bool,
    /// Where worktrees go; relative to the repository's parent. Default: `<repo>.autodev` beside the repository.
    pub base_dir: Option<PathBuf>,
    /// The worktree directory's name; `{slot}` and `{provider}` are replaced.
    pub naming_pattern: String,
    pub branch_prefix: String,
    pub cleanup: CleanupConfig,
}

impl Default for WorktreeConfig {
    fn default() -> Self {
        WorktreeConfig {
            enabled: true,
            base_dir: None,
            naming_pattern: "{slot}".into(),
            branch_prefix: "autodev/issue-".into(),
            cleanup: CleanupConfig::default(),
        }
    }
}

/// `worktree.cleanup`: remove a task's worktree when it ends (only ever when that loses nothing).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CleanupConfig {
    /// `true`/`"remove"`/`"delete"` removes; `false`/`"keep"` keeps.
    pub on_complete: Value,
    pub on_error: Value,
}

impl CleanupConfig {
    pub fn remove_on_complete(&self) -> bool {
        wants_removal(&self.on_complete)
    }

    pub fn remove_on_error(&self) -> bool {
        wants_removal(&self.on_error)
    }
}

fn wants_removal(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::String(s) => matches!(s.as_str(), "remove" | "delete" | "cleanup" | "true"),
        _ => false,
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoggingConfig {
    /// A tracing filter such as `info` or `autodev=debug`; `RUST_LOG` wins.
    pub level: Option<String>,
    pub file: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Names the file and what is wrong with it.
    #[error("{message}")]
    Read { message: String },
    #[error("config {path}: at {json_path}: {message}")]
    Invalid { path: String, json_path: String, message: String },
}

/// The largest config file autodev reads.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

impl Config {
    /// Built-in defaults: every built-in provider enabled with one slot.
    pub fn builtin() -> Config {
        Config { path: None, raw: RawConfig::default(), unknown_keys: Vec::new() }
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::input::read_text(path, MAX_CONFIG_BYTES, crate::input::READ_TIMEOUT, "config")
            .map_err(|message| ConfigError::Read { message })?;
        Config::parse(&text, Some(path.to_path_buf()))
    }

    /// Parses config text; `path` only names the source in messages.
    pub fn parse(text: &str, path: Option<PathBuf>) -> Result<Config, ConfigError> {
        let shown = path.as_ref().map_or_else(|| "(inline)".to_string(), |p| p.display().to_string());
        let mut unknown_keys = Vec::new();
        let mut de = serde_json::Deserializer::from_str(text);
        // serde_ignored writes `?` for an Option level, which is not part of the JSON path a user writes.
        let mut note_unknown = |p: serde_ignored::Path| unknown_keys.push(p.to_string().replace(".?", ""));
        let ignoring = serde_ignored::Deserializer::new(&mut de, &mut note_unknown);
        let raw: RawConfig = serde_path_to_error::deserialize(ignoring).map_err(|e| ConfigError::Invalid {
            path: shown.clone(),
            json_path: display_path(&e.path().to_string()),
            message: e.inner().to_string(),
        })?;
        de.end().map_err(|e| ConfigError::Invalid {
            path: shown.clone(),
            json_path: "(end)".into(),
            message: e.to_string(),
        })?;
        let config = Config { path, raw, unknown_keys };
        config.validate(&shown)?;
        Ok(config)
    }

    fn validate(&self, shown: &str) -> Result<(), ConfigError> {
        let invalid =
            |json_path: String, message: String| ConfigError::Invalid { path: shown.to_string(), json_path, message };
        for (name, llm) in self.raw.llms.iter().flatten() {
            if !is_valid_provider_name(name) {
                return Err(invalid(
                    format!("llms.{name}"),
                    "a provider name is lowercase letters, digits and '_' and starts with a letter".into(),
                ));
            }
            if let Some(n) = llm.max_concurrent_issues
                && n > MAX_SLOTS_PER_PROVIDER
            {
                return Err(invalid(
                    format!("llms.{name}.maxConcurrentIssues"),
                    format!("{n} is more than the limit of {MAX_SLOTS_PER_PROVIDER}"),
                ));
            }
            if let Some(format) = &llm.output_format
                && !["claude", "gemini", "codex", "text"].contains(&format.as_str())
            {
                return Err(invalid(
                    format!("llms.{name}.outputFormat"),
                    format!("unknown format {format:?}: use claude, gemini, codex or text"),
                ));
            }
            if !BUILTIN_PROVIDERS.contains(&name.as_str()) && llm.cli_path.is_none() {
                return Err(invalid(
                    format!("llms.{name}.cliPath"),
                    "a custom provider needs cliPath (the program to run)".into(),
                ));
            }
            if let Some(path) = &llm.cli_path
                && path.trim().is_empty()
            {
                return Err(invalid(format!("llms.{name}.cliPath"), "is empty".into()));
            }
        }
        if let Some(default) = &self.raw.default_llm
            && !self.providers().iter().any(|p| &p.name == default && p.enabled)
        {
            return Err(invalid("defaultLlm".into(), format!("{default:?} is not an enabled provider")));
        }
        let sup = &self.raw.supervisor;
        if !(0.0..=3600.0).contains(&sup.stop_grace_secs) {
            return Err(invalid("supervisor.stopGraceSecs".into(), "must be between 0 and 3600".into()));
        }
        if !(1..=1000).contains(&sup.preview_lines) {
            return Err(invalid("supervisor.previewLines".into(), "must be between 1 and 1000".into()));
        }
        if !(1.0..=31_536_000.0).contains(&sup.restart_allowance.per_secs) {
            return Err(invalid(
                "supervisor.restartAllowance.perSecs".into(),
                "must be between 1 and 31536000 (a year)".into(),
            ));
        }
        let project = &self.raw.project;
        if project.enabled && project.project_number.is_none() {
            return Err(invalid("project.projectNumber".into(), "is needed when project.enabled is true".into()));
        }
        if let Some(to) = &project.completed_status
            && to != "done"
            && to != "review"
        {
            return Err(invalid("project.completedStatus".into(), format!("{to:?}: use \"done\" or \"review\"")));
        }
        if to_review(project) && project.fields.status.review_value.is_none() {
            return Err(invalid(
                "project.fields.status.reviewValue".into(),
                "is needed for completedStatus \"review\"".into(),
            ));
        }
        let remote = &self.raw.push.remote;
        if remote.is_empty() || remote.starts_with('-') || remote.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(
                "push.remote".into(),
                format!("{remote:?} is not a remote name (for example \"origin\")"),
            ));
        }
        if !(1.0..=86_400.0).contains(&self.raw.github.retry_max_secs) {
            return Err(invalid("github.retryMaxSecs".into(), "must be between 1 and 86400".into()));
        }
        if !self.raw.notifications.is_null() {
            // serde's own message quotes the value it did not expect, which may be a webhook URL (a secret): only
            // the path and the expected shape are said.
            let parsed: NotificationsConfig = serde_path_to_error::deserialize(self.raw.notifications.clone())
                .map_err(|e| {
                    let at = e.path().to_string();
                    let at = if at == "." { "notifications".to_string() } else { format!("notifications.{at}") };
                    invalid(
                        at,
                        "not the expected shape: command is [program, args…], webhooks is [{\"url\": …, \"events\": \
                         […]}], slack and discord are {\"webhookUrl\": …}"
                            .into(),
                    )
                })?;
            if parsed.command.as_ref().is_some_and(|c| c.is_empty() || c[0].is_empty()) {
                return Err(invalid("notifications.command".into(), "give the program and its arguments".into()));
            }
            let urls = parsed.webhooks.iter().map(|w| Some(w.url.as_str()));
            let chats = [parsed.slack.webhook_url.as_deref(), parsed.discord.webhook_url.as_deref()];
            for (i, url) in urls.chain(chats).enumerate() {
                // The URL itself is a secret: the error names the entry, never the URL.
                if let Some(url) = url
                    && !(url.starts_with("https://") || url.starts_with("http://"))
                {
                    return Err(invalid(
                        format!("notifications (webhook {})", i + 1),
                        "a webhook URL must start with https:// or http://".into(),
                    ));
                }
            }
            for (i, hook) in parsed.webhooks.iter().enumerate() {
                for event in hook.events.iter().flatten() {
                    if !NOTIFICATION_EVENTS.contains(&event.as_str()) {
                        return Err(invalid(
                            format!("notifications.webhooks[{i}].events"),
                            format!("{event:?} is no event (events: {})", NOTIFICATION_EVENTS.join(", ")),
                        ));
                    }
                }
            }
        }
        if let Some(listen) = &self.raw.dashboard.listen {
            let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
                invalid("dashboard.listen".into(), format!("{listen:?} is not an address and port (127.0.0.1:7777)"))
            })?;
            // The token must not cross a network in clear, and autodevd serves no TLS itself.
            if !addr.ip().is_loopback() {
                return Err(invalid(
                    "dashboard.listen".into(),
                    format!(
                        "{listen} is not a loopback address: the dashboard serves plain HTTP; listen on 127.0.0.1 and \
                         reach it from elsewhere through an SSH tunnel (ssh -L 7777:127.0.0.1:7777 host)"
                    ),
                ));
            }
        }
        let autopilot = &self.raw.autopilot;
        if !(0.1..=86_400.0).contains(&autopilot.poll_secs) {
            return Err(invalid("autopilot.pollSecs".into(), "must be between 0.1 and 86400".into()));
        }
        for (label, llm) in &autopilot.llm_labels {
            if !self.providers().iter().any(|p| &p.name == llm) {
                return Err(invalid(
                    format!("autopilot.llmLabels.{label}"),
                    format!("{llm:?} is not one of the configured LLMs"),
                ));
            }
        }
        // A budget of zero, below it or not a number would stop all work without a word: refused instead.
        let budgets = [
            ("budget.perTaskUsd".to_string(), self.raw.budget.per_task_usd),
            ("budget.perDayUsd".to_string(), self.raw.budget.per_day_usd),
        ]
        .into_iter()
        .chain(
            self.providers()
                .into_iter()
                .map(|p| (format!("llms.{}.budget.perDayUsd", p.name), p.llm.budget.per_day_usd)),
        );
        for (key, value) in budgets {
            if let Some(v) = value
                && !(v.is_finite() && v > 0.0)
            {
                return Err(invalid(
                    key,
                    format!("{v} is no budget: give an amount of dollars above 0, or leave it out"),
                ));
            }
        }
        let fleet = &self.raw.fleet;
        if fleet.enabled {
            let machine = fleet.machine_name();
            if !valid_machine_name(&machine) {
                return Err(invalid(
                    "fleet.machine".into(),
                    format!(
                        "{machine:?} cannot name a machine: use letters, digits, '-', '_' and '.', at most 63, \
                         starting with a letter or digit"
                    ),
                ));
            }
            if !(0.2..=3600.0).contains(&fleet.heartbeat_secs) {
                return Err(invalid("fleet.heartbeatSecs".into(), "must be between 0.2 and 3600".into()));
            }
            let least = 3.0 * fleet.heartbeat_secs + self.raw.supervisor.stop_grace_secs;
            if !(fleet.stale_after_secs >= least && fleet.stale_after_secs <= 86_400.0) {
                return Err(invalid(
                    "fleet.staleAfterSecs".into(),
                    format!(
                        "must be at least three heartbeats plus supervisor.stopGraceSecs ({least} s) and at most \
                         86400: a holder must be able to miss a beat and still have stopped its runs before anyone \
                         takes them over"
                    ),
                ));
            }
            if let Some(repo) = &fleet.repo
                && repo.split('/').filter(|p| !p.is_empty()).count() != 2
            {
                return Err(invalid("fleet.repo".into(), format!("{repo:?} is not owner/name")));
            }
        }
        if !(0.0..=60.0).contains(&self.raw.github.write_spacing_secs) {
            return Err(invalid("github.writeSpacingSecs".into(), "must be between 0 and 60".into()));
        }
        if !(1.0..=86_400.0).contains(&self.raw.github.reply_poll_secs) {
            return Err(invalid("github.replyPollSecs".into(), "must be between 1 and 86400".into()));
        }
        if !(1.0..=600.0).contains(&self.raw.github.timeout_secs) {
            return Err(invalid("github.timeoutSecs".into(), "must be between 1 and 600".into()));
        }
        let health = &self.raw.health;
        if !(0.05..=3600.0).contains(&health.sample_secs) {
            return Err(invalid("health.sampleSecs".into(), "must be between 0.05 and 3600".into()));
        }
        if !(0.1..=86_400.0).contains(&health.stale_after_secs) {
            return Err(invalid("health.staleAfterSecs".into(), "must be between 0.1 and 86400".into()));
        }
        if !(0.1..=86_400.0).contains(&self.raw.status_comments.interval_secs) {
            return Err(invalid("statusComments.intervalSecs".into(), "must be between 0.1 and 86400".into()));
        }
        for (i, pattern) in self.raw.status_comments.redact_patterns.iter().enumerate() {
            if let Err(e) = regex::Regex::new(pattern) {
                return Err(invalid(
                    format!("statusComments.redactPatterns[{i}]"),
                    format!("not a valid pattern: {e}"),
                ));
            }
        }
        if !(1..=20).contains(&self.raw.retry.max_attempts) {
            return Err(invalid("retry.maxAttempts".into(), "must be between 1 and 20".into()));
        }
        if !(0.01..=86_400.0).contains(&self.raw.retry.backoff_secs) {
            return Err(invalid("retry.backoffSecs".into(), "must be between 0.01 and 86400".into()));
        }
        for name in &self.raw.retry.fallback {
            if !self.providers().iter().any(|p| &p.name == name) {
                return Err(invalid("retry.fallback".into(), format!("{name:?} is not a configured LLM")));
            }
        }
        let wt = &self.raw.worktree;
        if wt.naming_pattern.is_empty() || wt.naming_pattern.contains('/') || wt.naming_pattern.contains("..") {
            return Err(invalid(
                "worktree.namingPattern".into(),
                "must be a plain directory name such as {slot}".into(),
            ));
        }
        if wt.branch_prefix.contains("..") || wt.branch_prefix.contains(' ') || wt.branch_prefix.starts_with('-') {
            return Err(invalid("worktree.branchPrefix".into(), "is not usable in a git branch name".into()));
        }
        if !(16..=10_000).contains(&sup.preview_line_chars) {
            return Err(invalid("supervisor.previewLineChars".into(), "must be between 16 and 10000".into()));
        }
        Ok(())
    }

    /// Every provider with its slot count, built-ins first in their fixed order, then custom ones by name.
    pub fn providers(&self) -> Vec<ProviderEntry> {
        let mut out = Vec::new();
        match &self.raw.llms {
            None => {
                for name in BUILTIN_PROVIDERS {
                    out.push(ProviderEntry { name: name.into(), enabled: true, slots: 1, llm: LlmConfig::default() });
                }
            }
            Some(llms) => {
                let builtins = BUILTIN_PROVIDERS.iter().filter_map(|b| llms.get_key_value(*b));
                let customs = llms.iter().filter(|(k, _)| !BUILTIN_PROVIDERS.contains(&k.as_str()));
                for (name, llm) in builtins.chain(customs) {
                    out.push(ProviderEntry {
                        name: name.clone(),
                        enabled: llm.enabled.unwrap_or(true),
                        slots: llm.max_concurrent_issues.unwrap_or(1) as usize,
                        llm: llm.clone(),
                    });
                }
            }
        }
        out
    }

    /// The working directory of runs: `workspace.dir`, else the git root of the config file, else its directory,
    /// else `fallback` (the daemon's working directory).
    pub fn workspace_dir(&self, fallback: &Path) -> PathBuf {
        let config_dir = self.path.as_ref().and_then(|p| p.parent()).map(|d| {
            // `.autonomous/.autonomous-config.json` belongs to the directory above.
            if d.file_name().is_some_and(|n| n == ".autonomous") { d.parent().unwrap_or(d) } else { d }
        });
        if let Some(dir) = &self.raw.workspace.dir {
            return match config_dir {
                Some(base) if dir.is_relative() => base.join(dir),
                _ => dir.clone(),
            };
        }
        match config_dir {
            Some(d) => git_root(d).unwrap_or_else(|| d.to_path_buf()),
            None => fallback.to_path_buf(),
        }
    }
}

/// Whether a completed task goes to the review Status rather than done.
impl ProjectFields {
    /// `project.fields.priority.fieldName`: the SINGLE_SELECT field whose option order is the autopilot's order.
    pub fn priority_name(&self) -> String {
        self.priority.pointer("/fieldName").and_then(Value::as_str).unwrap_or("Priority").to_string()
    }
}

impl Config {
    /// The `notifications` section as autodevd acts on it (checked by `validate`).
    pub fn notifications(&self) -> NotificationsConfig {
        serde_json::from_value(self.raw.notifications.clone()).unwrap_or_default()
    }
}

pub fn to_review(project: &ProjectConfig) -> bool {
    project.completed_status.as_deref() == Some("review")
}

/// A provider as the config defines it.
#[derive(Debug, Clone)]
pub struct ProviderEntry {
    pub name: String,
    pub enabled: bool,
    pub slots: usize,
    pub llm: LlmConfig,
}

fn is_valid_provider_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// serde_path_to_error prints the root as "."; users read "(top level)" better.
fn display_path(path: &str) -> String {
    if path == "." || path.is_empty() { "(top level)".into() } else { path.to_string() }
}

/// The nearest directory at or above `dir` that holds `.git`.
pub fn git_root(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().find(|d| d.join(".git").exists()).map(Path::to_path_buf)
}

/// Finds the config file: `explicit` (from `--config` or `$AUTODEV_CONFIG`), then `.autonomous/` and the plain
/// file in `cwd` and in its git root, then the user's config dir. `None` means built-in defaults.
pub fn discover(explicit: Option<&Path>, cwd: &Path, user_config_dir: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let mut dirs = vec![cwd.to_path_buf()];
    if let Some(root) = git_root(cwd)
        && root != cwd
    {
        dirs.push(root);
    }
    for dir in &dirs {
        for candidate in [dir.join(".autonomous").join(".autonomous-config.json"), dir.join(".autonomous-config.json")]
        {
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    user_config_dir.map(|d| d.join("autonomous-config.json")).filter(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_EXAMPLE: &str = r#"{
      "version": "1.0.0",
      "llms": { "claude": { "enabled": true, "maxConcurrentIssues": 2, "cliPath": "claude" } },
      "project": { "enabled": true, "projectNumber": 5, "organizationProject": true,
        "fields": { "status": { "fieldName": "Status", "readyValues": ["Ready", "Todo"],
          "inProgressValue": "In Progress", "reviewValue": "In Review", "doneValue": "Done",
          "blockedValue": "Blocked" }, "assignedInstance": { "fieldName": "Assigned Instance" } } }
    }"#;

    #[test]
    fn seed_example_loads_without_warnings() {
        let c = Config::parse(SEED_EXAMPLE, None).unwrap();
        assert!(c.unknown_keys.is_empty(), "{:?}", c.unknown_keys);
        let p = c.providers();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].name.as_str(), p[0].slots, p[0].enabled), ("claude", 2, true));
    }

    #[test]
    fn unknown_keys_warn_with_their_path() {
        let c = Config::parse(r#"{"llms":{"claude":{"colour":"red"}},"extra":1}"#, None).unwrap();
        assert_eq!(c.unknown_keys, vec!["llms.claude.colour".to_string(), "extra".to_string()]);
    }

    #[test]
    fn wrong_type_names_the_json_path() {
        let e = Config::parse(r#"{"llms":{"claude":{"maxConcurrentIssues":"two"}}}"#, Some("/x/c.json".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/c.json") && e.contains("llms.claude.maxConcurrentIssues"), "{e}");
    }

    #[test]
    fn no_llms_section_enables_all_builtins() {
        let c = Config::parse("{}", None).unwrap();
        let names: Vec<_> = c.providers().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["claude", "gemini", "codex"]);
    }

    #[test]
    fn custom_provider_needs_cli_path_and_follows_builtins() {
        assert!(
            Config::parse(r#"{"llms":{"aider":{}}}"#, None).unwrap_err().to_string().contains("llms.aider.cliPath")
        );
        let c = Config::parse(r#"{"llms":{"aider":{"cliPath":"aider"},"codex":{}}}"#, None).unwrap();
        let names: Vec<_> = c.providers().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["codex", "aider"]);
    }

    #[test]
    fn discovery_order() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("repo");
        let sub = repo.join("src/deep");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::create_dir_all(repo.join(".git")).unwrap();
        let user = root.path().join("user");
        std::fs::create_dir_all(&user).unwrap();
        assert_eq!(discover(None, &sub, Some(&user)), None, "nothing anywhere: built-in defaults");
        std::fs::write(user.join("autonomous-config.json"), "{}").unwrap();
        assert_eq!(discover(None, &sub, Some(&user)), Some(user.join("autonomous-config.json")));
        std::fs::write(repo.join(".autonomous-config.json"), "{}").unwrap();
        assert_eq!(discover(None, &sub, Some(&user)), Some(repo.join(".autonomous-config.json")), "git root");
        std::fs::create_dir_all(repo.join(".autonomous")).unwrap();
        std::fs::write(repo.join(".autonomous/.autonomous-config.json"), "{}").unwrap();
        let nested = repo.join(".autonomous/.autonomous-config.json");
        assert_eq!(discover(None, &sub, Some(&user)), Some(nested.clone()), ".autonomous/ first");
        std::fs::write(sub.join(".autonomous-config.json"), "{}").unwrap();
        assert_eq!(discover(None, &sub, Some(&user)), Some(sub.join(".autonomous-config.json")), "cwd first");
        assert_eq!(discover(Some(Path::new("/x.json")), &sub, Some(&user)), Some("/x.json".into()));
        // A config in .autonomous/ belongs to the directory above it, whose git root is the workspace.
        let config = Config { path: Some(nested), raw: RawConfig::default(), unknown_keys: Vec::new() };
        assert_eq!(config.workspace_dir(Path::new("/fallback")), repo);
    }

    #[test]
    fn bad_values_are_refused() {
        for (text, needle) in [
            (r#"{"llms":{"claude":{"maxConcurrentIssues":100000}}}"#, "maxConcurrentIssues"),
            (r#"{"defaultLlm":"gemini","llms":{"claude":{}}}"#, "defaultLlm"),
            (r#"{"supervisor":{"previewLines":0}}"#, "previewLines"),
            (r#"{"llms":{"Bad-Name":{"cliPath":"x"}}}"#, "llms.Bad-Name"),
            (r#"{"llms": 5}"#, "llms"),
            ("{} trailing", "(end)"),
        ] {
            let e = Config::parse(text, None).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
