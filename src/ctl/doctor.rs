//! `autodevctl doctor`: one ✓ or ✗ line per check, with the fix for each ✗. It runs on the user's side (their
//! PATH, their token) and needs no running daemon.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::Client;
use crate::config::{self, Config};
use crate::github::board::Board;
use crate::github::client::{self, GitHub};
use crate::paths::{Paths, ensure_private_dir};
use crate::protocol::{Reply, Request};
use crate::provider::Provider;
use crate::supervisor::run_command;

const CLI_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub ok: bool,
    pub check: String,
    pub detail: String,
    pub fix: Option<String>,
}

fn pass(check: &str, detail: String) -> Check {
    Check { ok: true, check: check.into(), detail, fix: None }
}

fn fail(check: &str, detail: String, fix: impl Into<String>) -> Check {
    Check { ok: false, check: check.into(), detail, fix: Some(fix.into()) }
}

/// Runs every check.
pub fn run(config_flag: Option<&Path>, paths: &Paths) -> Vec<Check> {
    let mut checks = Vec::new();
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let explicit = config_flag.map(Path::to_path_buf).or_else(|| std::env::var_os("AUTODEV_CONFIG").map(PathBuf::from));
    let user_dir = directories::ProjectDirs::from("", "", "autodev").map(|d| d.config_dir().to_path_buf());
    let config = match config::discover(explicit.as_deref(), &cwd, user_dir.as_deref()) {
        None => {
            checks.push(pass("config", "no config file found: built-in defaults (claude, gemini, codex)".into()));
            Config::builtin()
        }
        Some(path) => match Config::load(&path) {
            Ok(c) => {
                let unknown = if c.unknown_keys.is_empty() {
                    String::new()
                } else {
                    format!(" ({} unknown key(s) ignored: {})", c.unknown_keys.len(), c.unknown_keys.join(", "))
                };
                checks.push(pass("config", format!("{}{unknown}", path.display())));
                c
            }
            Err(e) => {
                checks.push(fail("config", e.to_string(), "fix the file at the JSON path named"));
                Config::builtin()
            }
        },
    };
    for (name, dir) in [("state dir", &paths.state_dir), ("runtime dir", &paths.runtime_dir)] {
        checks.push(match writable(dir) {
            Ok(()) => pass(name, format!("{} is writable", dir.display())),
            Err(e) => fail(name, format!("{}: {e}", dir.display()), "fix its owner and permissions, or choose another"),
        });
    }
    checks.push(daemon(paths));
    checks.extend(containment(paths, &config));
    for provider in config.providers().iter().filter(|p| p.enabled).map(Provider::from_entry) {
        checks.push(cli(&provider));
        checks.extend(launch_pitfalls(&provider, &config.workspace_dir(&cwd)));
    }
    let workspace = config.workspace_dir(&cwd);
    checks.extend(git_setup(&config, &workspace));
    let notifications = config.notifications();
    if let Some(argv) = notifications.command.as_ref().filter(|a| !a.is_empty()) {
        checks.push(match locate(&argv[0]) {
            Some(path) => pass("notifications", format!("command {}", path.display())),
            None => fail(
                "notifications",
                format!("notifications.command {:?} is not found", argv[0]),
                "install it, or give its full path",
            ),
        });
    }
    let hooks = notifications.webhooks.len()
        + usize::from(notifications.slack.webhook_url.is_some())
        + usize::from(notifications.discord.webhook_url.is_some());
    if hooks > 0 {
        // Whether they answer shows in `autodevctl status` (warnings) once an event was sent.
        checks.push(pass("notifications", format!("{hooks} webhook(s); failures show in `autodevctl status`")));
    }
    if config.raw.autopilot.enabled {
        let status = &config.raw.project.fields.status;
        checks.push(match (&status.blocked_value, config.raw.project.enabled) {
            (_, false) => fail(
                "autopilot",
                "autopilot.enabled, but project.enabled is false: there is no board to take Ready items from".into(),
                "set project.enabled and project.projectNumber, or autopilot.enabled to false",
            ),
            (None, true) => fail(
                "autopilot",
                "no project.fields.status.blockedValue: a failed task would go back to a Ready value".into(),
                "add a Blocked option to the Status field and set project.fields.status.blockedValue to it",
            ),
            (Some(blocked), true) => {
                pass("autopilot", format!("takes {:?} items; failed ones go to {blocked:?}", status.ready_values))
            }
        });
    }
    crate::github::install_redactor(&config, None);
    checks.extend(github(&config, &workspace));
    let redact = crate::redact::current();
    for check in &mut checks {
        check.detail = redact.clean(&check.detail).into_owned();
        check.fix = check.fix.as_deref().map(|f| redact.clean(f).into_owned());
    }
    checks
}

fn writable(dir: &Path) -> Result<(), String> {
    ensure_private_dir(dir).map_err(|e| format!("{e:#}"))?;
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| e.to_string())?;
    std::fs::remove_file(&probe).map_err(|e| e.to_string())
}

fn daemon(paths: &Paths) -> Check {
    let reply = Client::connect(paths).and_then(|mut c| {
        c.set_timeout(Some(Duration::from_secs(5)));
        c.call(Request::Ping)
    });
    match reply {
        Ok(Reply::Pong { daemon_pid, .. }) => {
            pass("daemon", format!("autodevd (pid {daemon_pid}) answers on {}", paths.socket().display()))
        }
        Ok(other) => {
            fail("daemon", format!("unexpected reply {other:?}"), "use the autodevctl installed with autodevd")
        }
        Err(e) => fail(
            "daemon",
            e.to_string().lines().next().unwrap_or_default().to_string(),
            "start it: `autodevd` (or `systemctl --user start autodevd`)",
        ),
    }
}

/// How the running daemon contains runs, and whether the configured limits can apply. Nothing to say without a
/// daemon (the daemon check says that).
fn containment(paths: &Paths, config: &Config) -> Vec<Check> {
    let reply = Client::connect(paths).and_then(|mut c| {
        c.set_timeout(Some(Duration::from_secs(5)));
        c.call(Request::Status)
    });
    let Ok(Reply::Status(status)) = reply else { return Vec::new() };
    let mut checks = vec![if status.containment == "cgroup" {
        pass("containment", format!("a cgroup per run under {}", status.containment_note))
    } else {
        fail(
            "containment",
            format!("process groups only: {}", status.containment_note),
            "a daemonizing tool can outlive its run this way: run autodevd under systemd with Delegate=yes (see \
             systemd/autodevd.service), or as a user who may write a cgroup2 mount",
        )
    }];
    for entry in config.providers().iter().filter(|p| p.enabled) {
        let limits = &entry.llm.limits;
        for (key, set, controller) in [
            ("memoryMax", limits.memory_max.is_some(), "memory"),
            ("cpuMax", limits.cpu_max.is_some(), "cpu"),
            ("tasksMax", limits.tasks_max.is_some(), "pids"),
        ] {
            if set && !status.cgroup_controllers.iter().any(|c| c == controller) {
                checks.push(fail(
                    "limits",
                    format!(
                        "llms.{}.limits.{key} cannot apply: the {controller} controller is not delegated",
                        entry.name
                    ),
                    "under systemd 254 or later, add DelegateSubgroup=daemon beside Delegate=yes in the unit; \
                     elsewhere, the cgroup2 hierarchy must offer that controller (cgroup.controllers)",
                ));
            }
        }
    }
    checks
}

/// Settings that make every run of a CLI fail, known from trying them: claude refuses `bypassPermissions` as root
/// without `IS_SANDBOX=1`; gemini exits 55 in a folder it does not trust unless `--skip-trust`; codex refuses to run
/// outside a git repository unless `--skip-git-repo-check`.
fn launch_pitfalls(provider: &Provider, workspace: &Path) -> Vec<Check> {
    let name = &provider.name;
    let ctx = crate::provider::LaunchContext { prompt: "", prompt_file: Path::new("prompt"), issue: 1, slot: "x" };
    let args = provider.launch_new(&ctx).args;
    let has = |flag: &str| args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    let env_is = |key: &str, value: &str| {
        provider.config_env.get(key).map(String::as_str) == Some(value)
            || (provider.passthrough_env.contains(&key) && std::env::var(key).as_deref() == Ok(value))
    };
    let check = format!("llm {name} flags");
    let problem = match name.as_str() {
        "claude"
            if (args.iter().any(|a| a == "bypassPermissions") || has("--dangerously-skip-permissions"))
                && nix::unistd::geteuid().is_root()
                && !env_is("IS_SANDBOX", "1") =>
        {
            Some((
                "bypassPermissions as root: claude exits 1 on every run unless IS_SANDBOX=1".to_string(),
                format!("set llms.{name}.env.IS_SANDBOX to \"1\" (in a sandbox), or run autodevd as a normal user"),
            ))
        }
        "gemini" if !has("--skip-trust") && !env_is("GEMINI_CLI_TRUST_WORKSPACE", "true") => Some((
            "without --skip-trust, gemini exits 55 in every folder it has not been told to trust".to_string(),
            format!("add --skip-trust to llms.{name}.cliArgs (autodev's default has it)"),
        )),
        "codex" if !has("--skip-git-repo-check") && crate::workspace::repo_root(workspace).is_none() => Some((
            format!("{} is not a git repository and codex refuses to run outside one", workspace.display()),
            format!("add --skip-git-repo-check to llms.{name}.cliArgs, or use a git workspace"),
        )),
        _ => None,
    };
    problem.map(|(detail, fix)| fail(&check, detail, fix)).into_iter().collect()
}

/// Where `program` would be found the way autodevd starts it (a path, or a name on PATH).
fn locate(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| executable(p))
}

fn output_of(program: &Path, args: &[String]) -> Option<String> {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env_remove("CLAUDECODE");
    let out = run_command(&mut cmd, CLI_TIMEOUT).ok()?;
    Some(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn cli(provider: &Provider) -> Check {
    let name = &provider.name;
    let check = format!("llm {name}");
    let Some(path) = locate(&provider.program) else {
        return fail(
            &check,
            format!("{name}: command not found (cliPath {:?})", provider.program),
            format!("install it, or set llms.{name}.cliPath"),
        );
    };
    let version = output_of(&path, &["--version".to_string()])
        .and_then(|v| v.lines().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "version unknown".into());
    let Some((help_args, flags)) = provider.help_check() else {
        return pass(&check, format!("{version} ({})", path.display()));
    };
    let help = output_of(&path, &help_args).unwrap_or_default();
    let words: std::collections::HashSet<&str> =
        help.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_')).collect();
    let missing: Vec<&String> = flags.iter().filter(|f| !words.contains(f.as_str())).collect();
    if missing.is_empty() {
        pass(&check, format!("{version} ({}): accepts {}", path.display(), flags.join(" ")))
    } else {
        let missing: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        fail(
            &check,
            format!(
                "{version} ({}): its `{}` does not mention {}",
                path.display(),
                help_args.join(" "),
                missing.join(" ")
            ),
            format!("update {name} (autodev needs those flags), or adjust llms.{name}.cliArgs"),
        )
    }
}

/// What autodev's own commits and pushes need in a git workspace: the user's identity, and the push remote.
fn git_setup(config: &Config, workspace: &Path) -> Vec<Check> {
    let git = |args: &[&str]| {
        let mut git = std::process::Command::new("git");
        git.arg("-C").arg(workspace).args(args);
        run_command(&mut git, Duration::from_secs(10))
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if git(&["rev-parse", "--show-toplevel"]).is_none() {
        return Vec::new();
    }
    let mut checks = Vec::new();
    let identity = crate::workspace::git_identity(workspace);
    checks.push(if identity.contains_key("GIT_AUTHOR_NAME") && identity.contains_key("GIT_AUTHOR_EMAIL") {
        pass("git identity", format!("commits are made as {}", identity["GIT_AUTHOR_NAME"]))
    } else {
        fail(
            "git identity",
            format!("no user.name / user.email for {}: every commit of the agents' work fails", workspace.display()),
            "git config --global user.name \"Your Name\" && git config --global user.email you@example.com",
        )
    });
    let remote = &config.raw.push.remote;
    if config.raw.push.enabled == Some(true) || (config.raw.push.enabled.is_none() && git(&["remote"]).is_some()) {
        checks.push(match git(&["remote", "get-url", remote]) {
            Some(_) => pass("push remote", format!("{remote} exists")),
            None if config.raw.push.enabled == Some(true) => fail(
                "push remote",
                format!("push.remote {remote:?} is not a remote of {}", workspace.display()),
                format!("git remote add {remote} <url>, or set push.remote"),
            ),
            None => pass("push remote", format!("no remote {remote:?}: branches stay local")),
        });
    }
    checks
}

fn github(config: &Config, workspace: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    let gh_config = &config.raw.github;
    let Some((token, source)) = client::find_token(gh_config, config.path.as_deref().and_then(Path::parent)) else {
        // Without a token GitHub is simply off; that is a fault only where the config asks for a GitHub feature.
        let wanted = config.raw.project.enabled
            || gh_config.owner.is_some()
            || gh_config.repo.is_some()
            || gh_config.token_file.is_some();
        checks.push(if wanted {
            fail(
                "github token",
                "no GitHub token, but the config uses GitHub (project, github.owner/repo or github.tokenFile)".into(),
                "set GITHUB_TOKEN, a systemd credential github-token, or github.tokenFile (scopes: repo, project)",
            )
        } else {
            pass(
                "github",
                "off: no token found, and the config asks for no GitHub feature (assign with --prompt)".into(),
            )
        });
        return checks;
    };
    checks.push(pass("github token", format!("from {source}")));
    // GitHub's answers may echo the token back: doctor's own output is redacted like the daemon's.
    crate::github::install_redactor(config, Some(&token));
    let repo = match (&gh_config.owner, &gh_config.repo) {
        (Some(o), Some(r)) => Some((o.clone(), r.clone())),
        _ => {
            let mut git = std::process::Command::new("git");
            git.arg("-C").arg(workspace).args(["remote", "get-url", "origin"]);
            run_command(&mut git, Duration::from_secs(10))
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| crate::github::board::parse_remote(&String::from_utf8_lossy(&o.stdout)))
        }
    };
    let Some((owner, repo)) = repo else {
        checks.push(fail(
            "github repository",
            "no repository".into(),
            "set github.owner and github.repo, or add an `origin` remote on GitHub",
        ));
        return checks;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            checks.push(fail("github", format!("cannot start a runtime: {e}"), "report this"));
            return checks;
        }
    };
    runtime.block_on(async {
        let gh = match GitHub::new(gh_config, &token) {
            Ok(gh) => gh,
            Err(e) => {
                checks.push(fail("github", e, "fix github.apiUrl"));
                return;
            }
        };
        match gh.rest_get(&format!("/repos/{owner}/{repo}")).await {
            Ok(answer) => {
                // What the token may do here, as GitHub says it for this repository (fine-grained tokens too).
                if config.raw.push.enabled.unwrap_or(true) {
                    checks.push(match answer.pointer("/permissions/push").and_then(serde_json::Value::as_bool) {
                        Some(false) => fail(
                            "pull requests",
                            format!("the token may not push to {owner}/{repo}: branches and pull requests fail"),
                            "give the token contents and pull requests write (classic: repo), or set push.enabled \
                             to false",
                        ),
                        _ => pass("pull requests", format!("completed tasks are pushed to {owner}/{repo} for review")),
                    });
                }
                let scopes = gh.scopes.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let detail = format!(
                    "{owner}/{repo} is reachable; token scopes: {}",
                    scopes.as_deref().unwrap_or("(not reported)")
                );
                let lacks_project = config.raw.project.enabled
                    && scopes.as_deref().is_some_and(|s| !s.split(',').any(|x| x.trim() == "project"));
                checks.push(if lacks_project {
                    fail("github scopes", detail, "give the token the `project` scope (board sync writes fields)")
                } else {
                    pass("github scopes", detail)
                });
            }
            Err(e) => {
                checks.push(fail(
                    "github",
                    e.to_string(),
                    "check the token (scopes: repo, project) and github.owner/repo",
                ));
                return;
            }
        }
        let gh = std::sync::Arc::new(gh);
        if config.raw.fleet.enabled && config.raw.fleet.backend == crate::config::FleetBackend::Github {
            checks.extend(fleet_on_github(config, gh.clone(), &owner, &repo).await);
        }
        if !config.raw.project.enabled {
            return;
        }
        match Board::load(&gh, &owner, &config.raw.project).await {
            Ok(board) => {
                checks.push(pass("project", format!("#{} {:?}", board.number, board.title)));
                let fields = &config.raw.project.fields;
                for name in [&fields.status.field_name, &fields.assigned_instance.field_name] {
                    checks.push(match board.field(name) {
                        Ok(f) => pass("project field", format!("{name:?} ({})", f.data_type)),
                        Err(e) => {
                            fail("project field", e, "create the field on the board, or fix its name in the config")
                        }
                    });
                }
                if config.raw.fleet.enabled
                    && let Ok(field) = board.field(&fields.assigned_instance.field_name)
                    && field.data_type == "SINGLE_SELECT"
                {
                    checks.push(instance_options(config, field));
                }
            }
            Err(e) => {
                checks.push(fail("project", e.to_string(), "check project.projectNumber and organizationProject"))
            }
        }
    });
    checks
}

/// With the fleet on, Assigned Instance says `<slot>@<machine>`: a single-select field needs those options.
fn instance_options(config: &Config, field: &crate::github::board::Field) -> Check {
    let machine = config.raw.fleet.machine_name();
    let mut wanted = Vec::new();
    for p in config.providers().iter().filter(|p| p.enabled) {
        wanted.extend((1..=p.slots).map(|n| format!("{}-{n}@{machine}", p.name)));
    }
    let missing: Vec<&String> = wanted.iter().filter(|w| !field.options.iter().any(|o| &o.name == *w)).collect();
    if missing.is_empty() {
        return pass("fleet board", format!("Assigned Instance has an option for each slot here ({})", wanted.len()));
    }
    let list: Vec<&str> = missing.iter().map(|m| m.as_str()).collect();
    fail(
        "fleet board",
        format!("Assigned Instance is a single-select field without the options {}", list.join(", ")),
        "add them to the field on the board (or make it a text field)",
    )
}

/// With the fleet's claims in git refs: the store answers, and the heartbeats of the machines seen stay under
/// GitHub's limit for content-creating requests if they share one token.
async fn fleet_on_github(config: &Config, gh: std::sync::Arc<GitHub>, owner: &str, repo: &str) -> Vec<Check> {
    let fleet = &config.raw.fleet;
    let (owner, repo) = match fleet.repo.as_deref().and_then(|r| r.split_once('/')) {
        Some((o, r)) => (o.to_string(), r.to_string()),
        None => (owner.to_string(), repo.to_string()),
    };
    let machine = fleet.machine_name();
    let store = crate::fleet::github::GithubStore::new(gh, owner.clone(), repo.clone(), machine.clone());
    use crate::fleet::Store;
    let view = match store.read().await {
        Ok(v) => v,
        Err(e) => {
            return vec![fail(
                "fleet",
                format!("cannot read the claims in {owner}/{repo}: {e}"),
                "the token needs contents write on that repository (fleet.repo, default the project's)",
            )];
        }
    };
    let mut machines: std::collections::BTreeSet<&String> = view.beats.keys().collect();
    machines.insert(&machine);
    let per_hour = (machines.len() as f64 * 3600.0 / fleet.heartbeat_secs).round();
    let mut checks = vec![pass(
        "fleet",
        format!(
            "machine {machine}: {} machine(s) seen in {owner}/{repo}, {} claim(s)",
            machines.len(),
            view.claims.len()
        ),
    )];
    checks.push(if per_hour > 400.0 {
        fail(
            "fleet heartbeats",
            format!(
                "{} machines beating every {}s send {per_hour} writes an hour: past 400, one shared token meets \
                 GitHub's limit of about 500 content-creating requests an hour",
                machines.len(),
                fleet.heartbeat_secs
            ),
            "raise fleet.heartbeatSecs (and staleAfterSecs), give each machine its own token, or use \
             fleet.backend \"nats\"",
        )
    } else {
        pass("fleet heartbeats", format!("{per_hour} heartbeat writes an hour for the fleet (under 400)"))
    });
    checks
}

pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!("{} {:<18} {}\n", if c.ok { "✓" } else { "✗" }, c.check, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("  → {fix}\n"));
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    out.push_str(&if failed == 0 { "all checks passed\n".to_string() } else { format!("{failed} check(s) failed\n") });
    out
}
