//! Per-CLI knowledge as data: how to launch a new or resumed run, which environment it needs, and the parser that
//! turns its output events into preview lines, a session id and an outcome. Adding a CLI touches this file only.
//!
//! Facts come from ../shared/reference/llm-clis.md (measured on the real CLIs).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::config::ProviderEntry;
use crate::timefmt::short_duration;

/// gemini's `-p` text, appended to the task it reads on stdin.
const GEMINI_PROMPT_TAIL: &str = "Carry out the task given above.";

/// How a provider's stdout is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFormat {
    Claude,
    Gemini,
    Codex,
    /// Plain text: every line is a preview line, the exit code alone is the outcome.
    Text,
}

impl EventFormat {
    fn from_name(name: &str) -> EventFormat {
        match name {
            "claude" => EventFormat::Claude,
            "gemini" => EventFormat::Gemini,
            "codex" => EventFormat::Codex,
            _ => EventFormat::Text,
        }
    }
}

/// The fixed facts of a built-in CLI.
struct Builtin {
    name: &'static str,
    display: &'static str,
    /// Arguments that select the structured, headless mode; never replaced by config.
    mode_args: &'static [&'static str],
    /// Permission flags so the agent can work unattended; `cliArgs` replaces them.
    default_args: &'static [&'static str],
    model_flag: &'static str,
    /// The variable `llms.<p>.apiKey` is passed in.
    api_key_var: &'static str,
    /// Variables of the daemon's environment this CLI may see.
    env_keys: &'static [&'static str],
    /// How to ask for the help that lists the flags autodev relies on (`doctor` reads it).
    help_args: &'static [&'static str],
    /// Flags (and subcommands) autodev passes that the help must mention.
    relies_on: &'static [&'static str],
}

const BUILTINS: [Builtin; 3] = [
    Builtin {
        name: "claude",
        display: "Claude",
        mode_args: &["-p", "--output-format", "stream-json", "--verbose"],
        // acceptEdits denies `git commit`; autodev commits what the agent leaves (with its checks for secrets and
        // size, and the hooks) rather than allowing git commands whose options reach beyond the worktree.
        default_args: &["--permission-mode", "acceptEdits"],
        model_flag: "--model",
        api_key_var: "ANTHROPIC_API_KEY",
        env_keys: &[
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_AUTH_TOKEN",
            "ANTHROPIC_BASE_URL",
            "ANTHROPIC_MODEL",
            "CLAUDE_CONFIG_DIR",
            "CLAUDE_CODE_MAX_RETRIES",
            "CLAUDE_CODE_USE_BEDROCK",
            "CLAUDE_CODE_USE_VERTEX",
            "IS_SANDBOX",
        ],
        help_args: &["--help"],
        relies_on: &["--output-format", "--verbose", "--session-id", "--resume"],
    },
    Builtin {
        name: "gemini",
        display: "Gemini",
        mode_args: &["-o", "stream-json"],
        default_args: &["--approval-mode", "yolo", "--skip-trust"],
        model_flag: "-m",
        api_key_var: "GEMINI_API_KEY",
        env_keys: &[
            "GEMINI_API_KEY",
            "GOOGLE_API_KEY",
            "GOOGLE_GEMINI_BASE_URL",
            "GEMINI_CLI_HOME",
            "GOOGLE_CLOUD_PROJECT",
            "GOOGLE_CLOUD_LOCATION",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "GOOGLE_GENAI_USE_VERTEXAI",
        ],
        help_args: &["--help"],
        relies_on: &["--output-format", "--resume", "--prompt"],
    },
    Builtin {
        name: "codex",
        display: "Codex",
        mode_args: &["exec", "--json"],
        default_args: &["-s", "workspace-write", "--skip-git-repo-check"],
        model_flag: "-m",
        api_key_var: "CODEX_API_KEY",
        env_keys: &["CODEX_API_KEY", "OPENAI_API_KEY", "CODEX_HOME", "OPENAI_BASE_URL"],
        help_args: &["exec", "--help"],
        relies_on: &["--json", "resume"],
    },
];

/// A provider ready to launch runs.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub display_name: String,
    pub enabled: bool,
    pub slots: usize,
    /// `cliPath`: a name looked up on PATH, or a path.
    pub program: String,
    pub format: EventFormat,
    kind: Kind,
    model: Option<String>,
    /// Variables taken from the daemon's environment when set there.
    pub passthrough_env: Vec<&'static str>,
    /// Variables set from config (`env`, `apiKey`).
    pub config_env: BTreeMap<String, String>,
    /// Limits of each run's cgroup.
    pub limits: crate::cgroup::Limits,
    /// Dollars per million tokens, for a cost the CLI does not report.
    pub pricing: Option<crate::config::Pricing>,
    /// `llms.<name>.budget.perDayUsd`.
    pub day_budget: Option<f64>,
}

#[derive(Debug, Clone)]
enum Kind {
    Builtin { index: usize, extra_args: Vec<String> },
    Custom { template: Vec<String> },
}

/// What to run for one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub program: String,
    pub args: Vec<String>,
    /// True when the prompt file is the child's stdin; otherwise stdin is /dev/null.
    pub prompt_on_stdin: bool,
    /// The session id chosen before the run (claude), if any.
    pub session_id: Option<String>,
}

/// The facts of the run a launch is for.
pub struct LaunchContext<'a> {
    pub prompt: &'a str,
    pub prompt_file: &'a Path,
    pub issue: u64,
    pub slot: &'a str,
}

impl Provider {
    pub fn from_entry(entry: &ProviderEntry) -> Provider {
        let llm = &entry.llm;
        let builtin = BUILTINS.iter().position(|b| b.name == entry.name);
        let mut config_env = llm.env.clone();
        let (kind, format, display_name, passthrough_env) = match builtin {
            Some(index) => {
                let b = &BUILTINS[index];
                if let Some(key) = &llm.api_key {
                    config_env.insert(b.api_key_var.to_string(), key.clone());
                }
                let extra_args =
                    llm.cli_args.clone().unwrap_or_else(|| b.default_args.iter().map(|s| s.to_string()).collect());
                (
                    Kind::Builtin { index, extra_args },
                    EventFormat::from_name(b.name),
                    b.display.to_string(),
                    b.env_keys.to_vec(),
                )
            }
            None => {
                let format = EventFormat::from_name(llm.output_format.as_deref().unwrap_or("text"));
                let mut display = entry.name.clone();
                if let Some(first) = display.get_mut(0..1) {
                    first.make_ascii_uppercase();
                }
                (Kind::Custom { template: llm.cli_args.clone().unwrap_or_default() }, format, display, Vec::new())
            }
        };
        Provider {
            name: entry.name.clone(),
            display_name,
            enabled: entry.enabled,
            slots: entry.slots,
            program: llm.cli_path.clone().unwrap_or_else(|| entry.name.clone()),
            format,
            kind,
            model: llm.model.clone(),
            passthrough_env,
            config_env,
            limits: llm.limits.to_cgroup(),
            pricing: llm.pricing,
            day_budget: llm.budget.per_day_usd,
        }
    }

    /// The launch of a new conversation.
    pub fn launch_new(&self, ctx: &LaunchContext) -> Launch {
        match &self.kind {
            Kind::Builtin { index, extra_args } => {
                let b = &BUILTINS[*index];
                let mut args: Vec<String> = b.mode_args.iter().map(|s| s.to_string()).collect();
                let mut session_id = None;
                if self.format == EventFormat::Claude {
                    // Chosen up front so the conversation can be resumed even if the run dies before its first event.
                    let id = uuid::Uuid::new_v4().to_string();
                    args.extend(["--session-id".to_string(), id.clone()]);
                    session_id = Some(id);
                }
                if let Some(model) = &self.model {
                    args.extend([b.model_flag.to_string(), model.clone()]);
                }
                args.extend(extra_args.iter().cloned());
                let prompt_on_stdin = self.push_prompt(&mut args, ctx.prompt);
                Launch { program: self.program.clone(), args, prompt_on_stdin, session_id }
            }
            Kind::Custom { template } => self.launch_custom(template, ctx, None),
        }
    }

    /// For `doctor`: the arguments that print the help, and the flags that help must mention (the structured mode,
    /// resume, the model flag if a model is set, and the default permission flags unless `cliArgs` replaces them).
    /// `None` for custom providers: autodev knows nothing of their flags.
    pub fn help_check(&self) -> Option<(Vec<String>, Vec<String>)> {
        let Kind::Builtin { index, extra_args } = &self.kind else { return None };
        let b = &BUILTINS[*index];
        let mut flags: Vec<String> = b.relies_on.iter().map(|s| s.to_string()).collect();
        if self.model.is_some() {
            flags.push(b.model_flag.to_string());
        }
        flags.extend(
            extra_args.iter().filter(|a| a.starts_with("--")).map(|a| a.split('=').next().unwrap_or(a).to_string()),
        );
        Some((b.help_args.iter().map(|s| s.to_string()).collect(), flags))
    }

    /// The launch that continues conversation `session_id` with `ctx.prompt` as the next user message.
    pub fn launch_resume(&self, ctx: &LaunchContext, session_id: &str) -> Launch {
        match &self.kind {
            Kind::Builtin { index, extra_args } => {
                let b = &BUILTINS[*index];
                let mut args: Vec<String> = b.mode_args.iter().map(|s| s.to_string()).collect();
                if let Some(model) = &self.model {
                    args.extend([b.model_flag.to_string(), model.clone()]);
                }
                args.extend(extra_args.iter().cloned());
                match self.format {
                    // codex: `codex exec [opts] --json resume <thread_id> <prompt>`
                    EventFormat::Codex => args.extend(["resume".to_string(), session_id.to_string()]),
                    _ => args.extend(["--resume".to_string(), session_id.to_string()]),
                }
                let prompt_on_stdin = self.push_prompt(&mut args, ctx.prompt);
                Launch { program: self.program.clone(), args, prompt_on_stdin, session_id: Some(session_id.into()) }
            }
            Kind::Custom { template } => self.launch_custom(template, ctx, Some(session_id)),
        }
    }

    /// Adds the prompt the way this CLI takes it; returns whether the prompt goes on stdin.
    fn push_prompt(&self, args: &mut Vec<String>, _prompt: &str) -> bool {
        match self.format {
            // claude -p with no prompt argument reads the prompt from stdin: no argv limit, no flag injection.
            EventFormat::Claude => true,
            // codex reads the prompt from stdin when the prompt argument is "-".
            EventFormat::Codex => {
                args.push("-".into());
                true
            }
            // gemini reads stdin and appends -p to it. The task goes on stdin, not in argv, where every local user
            // could read it in /proc/*/cmdline (and argv is capped at 128 KiB).
            EventFormat::Gemini => {
                args.push(format!("--prompt={GEMINI_PROMPT_TAIL}"));
                true
            }
            EventFormat::Text => true,
        }
    }

    fn launch_custom(&self, template: &[String], ctx: &LaunchContext, session: Option<&str>) -> Launch {
        let mut prompt_in_args = false;
        let args = template
            .iter()
            .map(|arg| {
                prompt_in_args |= arg.contains("{prompt}") || arg.contains("{prompt_file}");
                // One pass over the template: a placeholder inside the prompt text is never expanded again.
                crate::template::expand(arg, |name| match name {
                    "prompt" => Some(ctx.prompt.to_string()),
                    "prompt_file" => Some(ctx.prompt_file.display().to_string()),
                    "model" => Some(self.model.clone().unwrap_or_default()),
                    "session_id" => Some(session.unwrap_or_default().to_string()),
                    "issue" => Some(ctx.issue.to_string()),
                    "slot" => Some(ctx.slot.to_string()),
                    _ => None,
                })
            })
            .collect();
        Launch {
            program: self.program.clone(),
            args,
            prompt_on_stdin: !prompt_in_args,
            session_id: session.map(str::to_string),
        }
    }
}

/// How a run ended, as its final event says.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub success: bool,
    /// Tokens the run used, as its final event counts them.
    pub usage: Option<Usage>,
    /// One line for people: `success (12 turns, $0.42, 3m10s)` or the error.
    pub summary: String,
    pub cost_usd: Option<f64>,
    pub turns: Option<u64>,
    /// What went wrong, from the event's typed fields (never from the words of its text).
    pub failure: Option<Failure>,
}

/// Tokens, split as they are priced: fresh input, input read from a cache, output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        self.input += other.input;
        self.cached_input += other.cached_input;
        self.output += other.output;
    }

    pub fn total(&self) -> u64 {
        self.input + self.cached_input + self.output
    }

    /// Its price at `pricing` (dollars per million tokens).
    pub fn cost(&self, pricing: &crate::config::Pricing) -> f64 {
        (self.input as f64 * pricing.input
            + self.cached_input as f64 * pricing.cached_input
            + self.output as f64 * pricing.output)
            / 1e6
    }

    /// Counts where cached input is part of the input count (the Responses API, gemini's stats).
    fn with_cached_inside(input: u64, cached: u64, output: u64) -> Usage {
        Usage { input: input.saturating_sub(cached), cached_input: cached, output }
    }

    /// claude's and the Anthropic API's `usage` object.
    fn of_anthropic(u: &Value) -> Option<Usage> {
        let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        u.is_object().then(|| Usage {
            input: n("input_tokens") + n("cache_creation_input_tokens"),
            cached_input: n("cache_read_input_tokens"),
            output: n("output_tokens"),
        })
    }
}

/// What a failed final event says went wrong, as typed facts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Failure {
    /// The model service answered with an HTTP error (claude `api_error_status`, gemini `error.code`), or a turn
    /// failed in the service (codex `turn.failed`).
    Api { status: Option<u16> },
    /// The account's usage limit (claude's `…|<epoch>` marker or a 429; codex `usage_limit_exceeded`).
    UsageLimit { resets_at: Option<std::time::SystemTime> },
    /// The CLI is not logged in or its key is refused.
    Auth,
    /// The agent's own turn failed.
    Agent,
}

/// What one output line says.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub session_id: Option<String>,
    /// Readable lines for the preview.
    pub lines: Vec<String>,
    /// True when `lines` continue the previous preview line (streamed text deltas).
    pub continues: bool,
    pub outcome: Option<Outcome>,
    /// A plan's progress (codex todo_list): percent done, and the next step.
    pub progress: Option<(u8, String)>,
    /// The CLI is waiting out a rate limit it reported as a typed fact (claude `api_retry` with status 429): until
    /// when, if it said.
    pub rate_limited: Option<Option<std::time::SystemTime>>,
    /// The agent's own words: the text of an assistant message (never tool output or stderr). With `continues`, a
    /// streamed piece of the message before.
    pub said: Option<String>,
    /// Tokens reported while the run goes on (claude: each message's `usage`), by message id: a message reported in
    /// several events counts once.
    pub usage: Option<(String, Usage)>,
}

/// Reads one complete output line. Lines that are not JSON events are shown as they are.
pub fn parse_line(format: EventFormat, line: &str) -> Parsed {
    let mut parsed = Parsed::default();
    if format == EventFormat::Text || !line.trim_start().starts_with('{') {
        parsed.lines.push(line.to_string());
        return parsed;
    }
    let Ok(event) = serde_json::from_str::<Value>(line) else {
        parsed.lines.push(line.to_string());
        return parsed;
    };
    match format {
        EventFormat::Claude => claude_event(&event, &mut parsed),
        EventFormat::Gemini => gemini_event(&event, &mut parsed),
        EventFormat::Codex => codex_event(&event, &mut parsed),
        EventFormat::Text => unreachable!("handled above"),
    }
    parsed
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// `tool Bash: npm test`, `tool Edit: src/main.rs`: the tool's most telling argument.
fn tool_line(name: &str, input: &Value) -> String {
    let detail = ["command", "file_path", "path", "absolute_path", "pattern", "url", "query", "description"]
        .iter()
        .find_map(|k| input.get(*k).and_then(Value::as_str));
    match detail {
        Some(d) => format!("tool {name}: {d}"),
        None => format!("tool {name}"),
    }
}

fn push_text(parsed: &mut Parsed, text: &str) {
    parsed.lines.extend(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
}

fn claude_event(e: &Value, parsed: &mut Parsed) {
    match str_at(e, "/type") {
        Some("system") => match str_at(e, "/subtype") {
            Some("init") => {
                parsed.session_id = str_at(e, "/session_id").map(str::to_string);
                let model = str_at(e, "/model").unwrap_or("?");
                parsed.lines.push(format!("session started (model {model})"));
            }
            Some("api_retry") => {
                let status = e.get("error_status").and_then(Value::as_u64);
                let attempt = e.get("attempt").and_then(Value::as_u64).unwrap_or(0);
                let max = e.get("max_retries").and_then(Value::as_u64).unwrap_or(0);
                let delay = e.get("retry_delay_ms").and_then(Value::as_u64).unwrap_or(0);
                let what = status.map_or_else(|| "API error".to_string(), |s| format!("API error {s}"));
                parsed.lines.push(format!("{what}, retry {attempt}/{max} in {}", short_duration(delay.div_ceil(1000))));
                if status == Some(429) {
                    let until = std::time::SystemTime::now() + std::time::Duration::from_millis(delay);
                    parsed.rate_limited = Some(Some(until));
                }
            }
            Some("permission_denied") => {
                let tool = str_at(e, "/tool_name").unwrap_or("a tool");
                parsed.lines.push(format!("permission denied: {tool}"));
            }
            _ => {}
        },
        Some("assistant") => {
            if let Some(usage) = e.pointer("/message/usage").and_then(Usage::of_anthropic) {
                parsed.usage = Some((str_at(e, "/message/id").unwrap_or_default().to_string(), usage));
            }
            for block in e.pointer("/message/content").and_then(Value::as_array).into_iter().flatten() {
                match str_at(block, "/type") {
                    Some("text") => {
                        let text = str_at(block, "/text").unwrap_or_default();
                        push_text(parsed, text);
                        match &mut parsed.said {
                            Some(said) => {
                                said.push('\n');
                                said.push_str(text);
                            }
                            None => parsed.said = Some(text.to_string()),
                        }
                    }
                    Some("tool_use") => parsed.lines.push(tool_line(
                        str_at(block, "/name").unwrap_or("?"),
                        block.get("input").unwrap_or(&Value::Null),
                    )),
                    _ => {}
                }
            }
        }
        Some("user") => {
            let blocks = e.pointer("/message/content").and_then(Value::as_array);
            for block in blocks.into_iter().flatten() {
                if block.get("is_error").and_then(Value::as_bool) == Some(true) {
                    let text = str_at(block, "/content").unwrap_or("(no detail)");
                    parsed.lines.push(format!("tool error: {}", first_line(text)));
                }
            }
        }
        Some("result") => {
            let is_error = e.get("is_error").and_then(Value::as_bool).unwrap_or(true);
            let turns = e.get("num_turns").and_then(Value::as_u64);
            let cost = e.get("total_cost_usd").and_then(Value::as_f64);
            let duration = e.get("duration_ms").and_then(Value::as_u64);
            let mut facts = Vec::new();
            if let Some(t) = turns {
                facts.push(format!("{t} turn{}", if t == 1 { "" } else { "s" }));
            }
            if let Some(c) = cost {
                facts.push(format!("${c:.2}"));
            }
            if let Some(ms) = duration {
                facts.push(short_duration(ms / 1000));
            }
            let mut facts = if facts.is_empty() { String::new() } else { format!(" ({})", facts.join(", ")) };
            // Actions the CLI's permission mode refused (claude still calls the run a success): the user must see
            // them, or uncommitted work looks like finished work.
            let denied = claude_denials(e);
            for d in denied.iter().take(MAX_DENIALS_SHOWN) {
                parsed.lines.push(format!("denied: {d}"));
            }
            if !denied.is_empty() {
                let more = denied.len().saturating_sub(MAX_DENIALS_SHOWN);
                let more = if more > 0 { format!(", and {more} more") } else { String::new() };
                let plural = if denied.len() == 1 { "" } else { "s" };
                let shown: Vec<&str> = denied.iter().take(MAX_DENIALS_SHOWN).map(String::as_str).collect();
                facts.push_str(&format!(" · {} action{plural} denied: {}{more}", denied.len(), shown.join("; ")));
            }
            let summary = if is_error {
                // API errors come as subtype "success" with is_error: say what the CLI said.
                let why = str_at(e, "/result")
                    .map(first_line)
                    .or_else(|| e.get("api_error_status").filter(|v| !v.is_null()).map(|v| format!("API error {v}")))
                    .unwrap_or_else(|| str_at(e, "/subtype").unwrap_or("error").to_string());
                format!("error: {why}{facts}")
            } else {
                format!("success{facts}")
            };
            if parsed.session_id.is_none() {
                parsed.session_id = str_at(e, "/session_id").map(str::to_string);
            }
            parsed.lines.push(format!("result: {summary}"));
            let failure = is_error.then(|| claude_failure(e));
            let usage = e.get("usage").and_then(Usage::of_anthropic);
            parsed.outcome = Some(Outcome { success: !is_error, usage, summary, cost_usd: cost, turns, failure });
        }
        _ => {}
    }
}

/// How many denied actions a summary names (the count is always whole).
const MAX_DENIALS_SHOWN: usize = 3;

/// claude's `permission_denials` [{tool_name, tool_input}], each as `Bash git commit -m …` (the command's first line,
/// at most 80 characters), else the tool's name.
fn claude_denials(e: &Value) -> Vec<String> {
    let Some(denials) = e.get("permission_denials").and_then(Value::as_array) else { return Vec::new() };
    denials
        .iter()
        .map(|d| {
            let tool = str_at(d, "/tool_name").unwrap_or("a tool");
            let what = str_at(d, "/tool_input/command")
                .or_else(|| str_at(d, "/tool_input/file_path"))
                .map(|c| first_line(c).chars().take(80).collect::<String>());
            match what {
                Some(what) => format!("{tool} {what}"),
                None => tool.to_string(),
            }
        })
        .collect()
}

/// What claude's failed result says: its `api_error_status`, else its usage-limit marker (the CLI's own error
/// string ends in `|<epoch of the reset>`), else the agent's turn failed.
fn claude_failure(e: &Value) -> Failure {
    let text = str_at(e, "/result").unwrap_or_default();
    let marker = text.rsplit_once('|').and_then(|(_, epoch)| {
        (epoch.len() == 10 && epoch.bytes().all(|b| b.is_ascii_digit())).then(|| epoch.parse::<u64>().ok()).flatten()
    });
    let resets_at = || {
        marker
            .map(|s| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s))
            .or_else(|| rate_limit_in(text).flatten())
    };
    match e.get("api_error_status").and_then(Value::as_u64) {
        Some(429) => Failure::UsageLimit { resets_at: resets_at() },
        Some(status) => Failure::Api { status: u16::try_from(status).ok() },
        None if marker.is_some() => Failure::UsageLimit { resets_at: resets_at() },
        None => Failure::Agent,
    }
}

fn gemini_event(e: &Value, parsed: &mut Parsed) {
    match str_at(e, "/type") {
        Some("init") => {
            parsed.session_id = str_at(e, "/session_id").map(str::to_string);
            parsed.lines.push(format!("session started (model {})", str_at(e, "/model").unwrap_or("?")));
        }
        Some("message") if str_at(e, "/role") == Some("assistant") => {
            let text = str_at(e, "/content").unwrap_or_default();
            parsed.continues = e.get("delta").and_then(Value::as_bool) == Some(true);
            parsed.said = Some(text.to_string());
            if parsed.continues {
                // A streamed chunk: keep its line breaks so the preview can join chunks into lines.
                parsed.lines.extend(text.split('\n').map(str::to_string));
            } else {
                push_text(parsed, text);
            }
        }
        Some("tool_use") => parsed
            .lines
            .push(tool_line(str_at(e, "/tool_name").unwrap_or("?"), e.get("parameters").unwrap_or(&Value::Null))),
        Some("tool_result") if str_at(e, "/status") == Some("error") => {
            let why = e.get("error").map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
            parsed.lines.push(format!("tool error: {}", first_line(&why.unwrap_or_default())));
        }
        Some("error") => {
            parsed.lines.push(format!("error: {}", first_line(str_at(e, "/message").unwrap_or("?"))));
        }
        Some("result") => {
            let success = str_at(e, "/status") == Some("success");
            let mut facts = Vec::new();
            if let Some(n) = e.pointer("/stats/tool_calls").and_then(Value::as_u64) {
                facts.push(format!("{n} tool call{}", if n == 1 { "" } else { "s" }));
            }
            if let Some(ms) = e.pointer("/stats/duration_ms").and_then(Value::as_u64) {
                facts.push(short_duration(ms / 1000));
            }
            let facts = if facts.is_empty() { String::new() } else { format!(" ({})", facts.join(", ")) };
            let summary = if success {
                format!("success{facts}")
            } else {
                let why = e
                    .get("error")
                    .map(|v| v.get("message").and_then(Value::as_str).map_or_else(|| v.to_string(), str::to_string))
                    .unwrap_or_else(|| "error".into());
                format!("error: {}{facts}", first_line(&why))
            };
            parsed.lines.push(format!("result: {summary}"));
            let failure = (!success).then(|| {
                match e.pointer("/error/code").and_then(Value::as_u64).and_then(|c| u16::try_from(c).ok()) {
                    Some(status) => Failure::Api { status: Some(status) },
                    None => Failure::Agent,
                }
            });
            let n = |k: &str| e.pointer(&format!("/stats/{k}")).and_then(Value::as_u64);
            let usage = n("input_tokens").map(|input| {
                Usage::with_cached_inside(input, n("cached").unwrap_or(0), n("output_tokens").unwrap_or(0))
            });
            parsed.outcome = Some(Outcome { success, usage, summary, cost_usd: None, turns: None, failure });
        }
        _ => {}
    }
}

fn codex_event(e: &Value, parsed: &mut Parsed) {
    match str_at(e, "/type") {
        Some("thread.started") => {
            parsed.session_id = str_at(e, "/thread_id").map(str::to_string);
            parsed.lines.push("session started".into());
        }
        Some("item.started") if str_at(e, "/item/type") == Some("command_execution") => {
            parsed.lines.push(format!("tool shell: {}", str_at(e, "/item/command").unwrap_or("?")));
        }
        Some("item.completed") => {
            let item = e.get("item").unwrap_or(&Value::Null);
            match str_at(item, "/type") {
                Some("agent_message") => {
                    let text = str_at(item, "/text").unwrap_or_default();
                    push_text(parsed, text);
                    parsed.said = Some(text.to_string());
                }
                Some("command_execution") => {
                    if let Some(code) = item.get("exit_code").and_then(Value::as_i64).filter(|c| *c != 0) {
                        parsed.lines.push(format!("command exited {code}"));
                    }
                }
                Some("file_change") => {
                    for change in item.get("changes").and_then(Value::as_array).into_iter().flatten() {
                        let path = str_at(change, "/path").unwrap_or("?");
                        let kind = str_at(change, "/kind").unwrap_or("update");
                        parsed.lines.push(format!("file {kind}: {path}"));
                    }
                }
                Some("todo_list") => {
                    let items = item.get("items").and_then(Value::as_array);
                    let total = items.map_or(0, Vec::len);
                    let done = items
                        .into_iter()
                        .flatten()
                        .filter(|i| i.get("completed").and_then(Value::as_bool) == Some(true))
                        .count();
                    parsed.lines.push(format!("plan: {done}/{total} done"));
                    if let Some(percent) = (done * 100).checked_div(total) {
                        let next = items
                            .into_iter()
                            .flatten()
                            .find(|i| i.get("completed").and_then(Value::as_bool) != Some(true))
                            .and_then(|i| i.get("text").and_then(Value::as_str))
                            .unwrap_or("plan done");
                        parsed.progress = Some((percent as u8, next.to_string()));
                    }
                }
                Some("error") => {
                    parsed.lines.push(format!("warning: {}", first_line(str_at(item, "/message").unwrap_or("?"))));
                }
                _ => {}
            }
        }
        Some("turn.completed") => {
            let summary = match e.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                Some(t) => format!("success ({t} output tokens)"),
                None => "success".to_string(),
            };
            parsed.lines.push(format!("result: {summary}"));
            let n = |k: &str| e.pointer(&format!("/usage/{k}")).and_then(Value::as_u64);
            // The Responses API counts cached tokens inside input_tokens.
            let usage = n("input_tokens").map(|input| {
                Usage::with_cached_inside(input, n("cached_input_tokens").unwrap_or(0), n("output_tokens").unwrap_or(0))
            });
            parsed.outcome =
                Some(Outcome { success: true, usage, summary, cost_usd: None, turns: None, failure: None });
        }
        Some("turn.failed") => {
            let summary = format!("error: {}", first_line(str_at(e, "/error/message").unwrap_or("turn failed")));
            parsed.lines.push(format!("result: {summary}"));
            // A codex turn fails only when the model service does (tool failures go back to the model); its typed
            // error kind, where the CLI gives one, tells a usage limit or a refused key apart.
            let failure = match str_at(e, "/error/codex_error_info") {
                Some("usage_limit_exceeded") => Failure::UsageLimit { resets_at: None },
                Some("unauthorized") => Failure::Auth,
                _ => Failure::Api { status: None },
            };
            parsed.outcome = Some(Outcome {
                success: false,
                usage: None,
                summary,
                cost_usd: None,
                turns: None,
                failure: Some(failure),
            });
        }
        Some("error") => parsed.lines.push(format!("error: {}", first_line(str_at(e, "/message").unwrap_or("?")))),
        _ => {}
    }
}

fn first_line(text: &str) -> String {
    text.lines().find(|l| !l.trim().is_empty()).unwrap_or_default().trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn samples(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cli-samples").join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn parse_all(format: EventFormat, text: &str) -> (Option<String>, Vec<String>, Option<Outcome>) {
        let (mut session, mut lines, mut outcome) = (None, Vec::new(), None);
        for line in text.lines() {
            let p = parse_line(format, line);
            session = session.or(p.session_id);
            lines.extend(p.lines);
            outcome = p.outcome.or(outcome);
        }
        (session, lines, outcome)
    }

    #[test]
    fn tokens_and_cost_come_from_each_clis_own_events() {
        let pricing = crate::config::Pricing { input: 3.0, cached_input: 0.3, output: 15.0 };
        // (sample, format, tokens, cost the CLI reported)
        let table = [
            ("claude-text.jsonl", EventFormat::Claude, Usage { input: 12, cached_input: 0, output: 7 }, Some(0.000188)),
            (
                "claude-tool-use.jsonl",
                EventFormat::Claude,
                Usage { input: 24, cached_input: 0, output: 16 },
                Some(0.000416),
            ),
            // The Responses API counts cached tokens inside input_tokens.
            ("codex-text.jsonl", EventFormat::Codex, Usage { input: 15, cached_input: 5, output: 8 }, None),
            ("codex-tool-use.jsonl", EventFormat::Codex, Usage { input: 30, cached_input: 10, output: 16 }, None),
            ("gemini-text.jsonl", EventFormat::Gemini, Usage { input: 22, cached_input: 0, output: 12 }, None),
        ];
        for (sample, format, tokens, cost) in table {
            let (_, _, outcome) = parse_all(format, &samples(sample));
            let outcome = outcome.unwrap_or_else(|| panic!("{sample}: no outcome"));
            assert_eq!(outcome.usage, Some(tokens), "{sample}");
            assert_eq!(outcome.cost_usd.map(|c| (c * 1e6).round()), cost.map(|c| (c * 1e6_f64).round()), "{sample}");
        }
        let codex = Usage { input: 15, cached_input: 5, output: 8 };
        assert!((codex.cost(&pricing) - (15.0 * 3.0 + 5.0 * 0.3 + 8.0 * 15.0) / 1e6).abs() < 1e-12);
        // While a claude run goes on: each message's usage, counted once per message id.
        let line = r#"{"type":"assistant","message":{"id":"m1","usage":{"input_tokens":12,"cache_read_input_tokens":100,"output_tokens":1},"content":[]}}"#;
        assert_eq!(
            parse_line(EventFormat::Claude, line).usage,
            Some(("m1".into(), Usage { input: 12, cached_input: 100, output: 1 }))
        );
    }

    #[test]
    fn claude_sample_gives_session_tool_and_result() {
        let (session, lines, outcome) = parse_all(EventFormat::Claude, &samples("claude-tool-use.jsonl"));
        assert_eq!(session.as_deref(), Some("23ef5e45-92e0-475e-8ba7-6859b8f4ab3a"));
        assert!(lines.iter().any(|l| l == "tool Bash: echo tool-ran > marker.txt; echo done"), "{lines:?}");
        assert!(lines.iter().any(|l| l == "permission denied: Bash"), "{lines:?}");
        let outcome = outcome.unwrap();
        assert!(outcome.success);
        assert_eq!(outcome.turns, Some(2));
        assert!(lines.last().unwrap().starts_with("result: success (2 turns, $0.00"), "{lines:?}");
    }

    #[test]
    fn claude_permission_denials_are_counted_named_and_shown() {
        let line = r#"{"type":"result","subtype":"success","is_error":false,"num_turns":3,"result":"done",
            "permission_denials":[{"tool_name":"Bash","tool_input":{"command":"git commit -m 'fix #7'\nmore"}},
            {"tool_name":"Bash","tool_input":{"command":"npm --version"}},{"tool_name":"Write","tool_input":{"file_path":"/etc/x"}},
            {"tool_name":"WebFetch","tool_input":{}}]}"#
            .replace('\n', " ");
        let parsed = parse_line(EventFormat::Claude, &line);
        let outcome = parsed.outcome.unwrap();
        assert!(outcome.success, "a denial does not make the run fail");
        assert_eq!(
            outcome.summary,
            "success (3 turns) · 4 actions denied: Bash git commit -m 'fix #7'; Bash npm --version; Write /etc/x, and 1 more"
        );
        assert_eq!(parsed.lines[0], "denied: Bash git commit -m 'fix #7'");
        assert_eq!(parsed.lines.iter().filter(|l| l.starts_with("denied: ")).count(), 3);
    }

    #[test]
    fn claude_api_error_is_failure_despite_success_subtype() {
        let line = r#"{"type":"result","subtype":"success","is_error":true,"result":"API Error: 401","num_turns":1}"#;
        let outcome = parse_line(EventFormat::Claude, line).outcome.unwrap();
        assert!(!outcome.success);
        assert!(outcome.summary.contains("API Error: 401"), "{}", outcome.summary);
    }

    #[test]
    fn gemini_and_codex_samples() {
        let (session, lines, outcome) = parse_all(EventFormat::Gemini, &samples("gemini-text.jsonl"));
        assert_eq!(session.as_deref(), Some("fd1df96c-fb67-4289-b0e7-3bf751c22d9d"));
        assert!(lines.iter().any(|l| l.contains("FAKE-GEMINI-REPLY")));
        assert!(outcome.unwrap().success);

        let (session, lines, outcome) = parse_all(EventFormat::Codex, &samples("codex-tool-use.jsonl"));
        assert_eq!(session.as_deref(), Some("01a1fd08-2f3e-79e1-85e2-f9217f9060b0"));
        assert!(lines.iter().any(|l| l.starts_with("tool shell: /bin/bash -lc")), "{lines:?}");
        assert!(outcome.unwrap().success);
        let failed = parse_line(EventFormat::Codex, r#"{"type":"turn.failed","error":{"message":"quota"}}"#);
        assert_eq!(failed.outcome.unwrap().summary, "error: quota");
    }

    #[test]
    fn non_json_lines_are_shown_as_they_are() {
        let p = parse_line(EventFormat::Claude, "{not json at all");
        assert_eq!(p.lines, vec!["{not json at all".to_string()]);
        assert_eq!(parse_line(EventFormat::Codex, "warning: x").lines, vec!["warning: x".to_string()]);
    }

    fn provider(json: &str, name: &str) -> Provider {
        let config = Config::parse(json, None).unwrap();
        Provider::from_entry(config.providers().iter().find(|p| p.name == name).unwrap())
    }

    #[test]
    fn launches_follow_the_reference_flags() {
        let ctx = LaunchContext { prompt: "--help me", prompt_file: Path::new("/r/prompt"), issue: 5, slot: "x-1" };
        let claude = provider(r#"{"llms":{"claude":{"model":"opus"}}}"#, "claude").launch_new(&ctx);
        let sid = claude.session_id.clone().unwrap();
        assert_eq!(
            claude.args,
            ["-p", "--output-format", "stream-json", "--verbose", "--session-id", &sid, "--model", "opus"]
                .iter()
                .chain(&["--permission-mode", "acceptEdits"])
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        );
        assert!(claude.prompt_on_stdin);

        let codex = provider(r#"{"llms":{"codex":{"cliArgs":["-s","read-only"]}}}"#, "codex").launch_new(&ctx);
        assert_eq!(codex.args, ["exec", "--json", "-s", "read-only", "-"]);
        let resumed = provider("{}", "codex").launch_resume(&ctx, "T1");
        assert_eq!(&resumed.args[resumed.args.len() - 3..], ["resume", "T1", "-"]);

        let gemini = provider("{}", "gemini").launch_new(&ctx);
        assert_eq!(gemini.args.last().unwrap(), "--prompt=Carry out the task given above.");
        assert!(gemini.prompt_on_stdin, "the task never goes in argv");
    }

    #[test]
    fn custom_template_expands_once() {
        let p = provider(r#"{"llms":{"aider":{"cliPath":"aider","cliArgs":["--msg","{prompt}","{nope}"]}}}"#, "aider");
        let ctx = LaunchContext { prompt: "fix {slot}", prompt_file: Path::new("/p"), issue: 1, slot: "aider-1" };
        let launch = p.launch_new(&ctx);
        assert_eq!(launch.args, ["--msg", "fix {slot}", "{nope}"]);
        assert!(!launch.prompt_on_stdin);
        assert_eq!(p.display_name, "Aider");
    }
}

/// If `text` says a usage or rate limit was hit: `Some(reset time)` (`Some(None)` when it gives none). Understands
/// claude's `limit reached|<epoch>` and `resets 7pm`, and `try again in N minutes|hours`.
pub fn rate_limit_in(text: &str) -> Option<Option<std::time::SystemTime>> {
    use std::sync::OnceLock;
    use std::time::{Duration, SystemTime};
    static PATTERNS: OnceLock<[regex::Regex; 4]> = OnceLock::new();
    let [hit, epoch, clock, within] = PATTERNS.get_or_init(|| {
        [
            regex::Regex::new(
                r"(?i)(usage limit|rate limit|limit reached|quota exceeded|resource_exhausted|too many requests)",
            )
            .unwrap(),
            regex::Regex::new(r"\|(\d{10})\b").unwrap(),
            regex::Regex::new(r"(?i)resets?\s+(?:at\s+)?(\d{1,2})(?::(\d{2}))?\s*(am|pm)?").unwrap(),
            regex::Regex::new(r"(?i)(?:try again|retry) in (\d+)\s*(second|minute|hour)").unwrap(),
        ]
    });
    if !hit.is_match(text) {
        return None;
    }
    let now = SystemTime::now();
    if let Some(c) = epoch.captures(text) {
        return Some(c[1].parse::<u64>().ok().map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)));
    }
    if let Some(c) = within.captures(text) {
        let n: u64 = c[1].parse().unwrap_or(0);
        let unit = match c[2].to_lowercase().as_str() {
            "hour" => 3600,
            "minute" => 60,
            _ => 1,
        };
        return Some(Some(now + Duration::from_secs(n * unit)));
    }
    if let Some(c) = clock.captures(text) {
        let mut hour: u64 = c[1].parse().unwrap_or(0);
        let minute: u64 = c.get(2).and_then(|m| m.as_str().parse().ok()).unwrap_or(0);
        match c.get(3).map(|m| m.as_str().to_lowercase()) {
            Some(ref p) if p == "pm" && hour < 12 => hour += 12,
            Some(ref p) if p == "am" && hour == 12 => hour = 0,
            _ => {}
        }
        if hour < 24 && minute < 60 {
            return Some(Some(next_local_time(now, hour * 3600 + minute * 60)));
        }
    }
    Some(None)
}

/// The next moment after `now` at `secs` past local midnight.
fn next_local_time(now: std::time::SystemTime, secs: u64) -> std::time::SystemTime {
    use std::time::Duration;
    let unix = now.duration_since(std::time::SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    // SAFETY: localtime_r only writes the tm we pass; time_t is a plain integer.
    let offset = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        let t: libc::time_t = unix as libc::time_t;
        libc::localtime_r(&t, &mut tm);
        tm.tm_gmtoff
    };
    let local = unix + offset;
    let midnight = local - local.rem_euclid(86_400);
    let mut target = midnight + secs as i64;
    if target <= local {
        target += 86_400;
    }
    std::time::SystemTime::UNIX_EPOCH + Duration::from_secs((target - offset).max(0) as u64)
}

#[cfg(test)]
mod rate_limit_tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn finds_limits_and_their_reset() {
        assert_eq!(rate_limit_in("all good"), None);
        assert_eq!(
            rate_limit_in("Claude AI usage limit reached|1900000000"),
            Some(Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000)))
        );
        let later = rate_limit_in("Rate limit hit, try again in 2 hours").unwrap().unwrap();
        let secs = later.duration_since(SystemTime::now()).unwrap().as_secs();
        assert!((7190..=7200).contains(&secs), "{secs}");
        let at = rate_limit_in("5-hour limit reached ∙ resets 7pm").unwrap().unwrap();
        assert!(at > SystemTime::now() && at < SystemTime::now() + Duration::from_secs(86_400));
        assert_eq!(rate_limit_in("quota exceeded"), Some(None));
    }
}
