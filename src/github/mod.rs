//! GitHub: issues become prompts, and the Projects v2 fields "Assigned Instance" and "Status" stay true.
//! `client` talks to GitHub, `board` knows the project and an issue's item, `sync` pushes owed field values.

pub mod board;
pub mod client;
pub mod comments;
pub mod posts;
pub mod sync;

use std::path::Path;
use std::sync::Arc;

use crate::config::Config;
use board::IssueView;
use client::{GitHub, TokenSource};
use sync::Reconciler;

/// GitHub as the daemon uses it.
pub struct GitHubCtx {
    pub owner: String,
    pub repo: String,
    pub token_source: TokenSource,
    /// Kept for the redactor, which must know it again when the config is reloaded.
    pub token: client::Token,
    pub gh: Arc<GitHub>,
    /// Reads issues (with their board item) and, when `project.enabled`, keeps the board true.
    pub reconciler: Arc<Reconciler>,
    pub sync_enabled: bool,
    /// The INSTANCE_STATUS comments, unless `statusComments.enabled` is false.
    pub comments: Option<Arc<comments::Comments>>,
    /// Pull requests of completed tasks and the notes of agents' signals, through their outbox.
    pub posts: Arc<posts::Posts>,
    /// `push.enabled` (by default on with GitHub): completed tasks' branches are pushed and get pull requests.
    pub pull_requests: bool,
}

/// Why GitHub is off, when it is.
pub type Off = String;

/// Sets GitHub up from the config: token, owner/repo (config, else the `origin` remote), client, reconciler.
/// Starts the reconciler when `project.enabled`. Must run inside the runtime.
pub fn setup(config: &Config, workspace: &Path, state_dir: &Path) -> Result<GitHubCtx, Off> {
    let github = &config.raw.github;
    let config_dir = config.path.as_ref().and_then(|p| p.parent());
    let (token, token_source) = client::find_token(github, config_dir).ok_or_else(|| {
        "no GitHub token: set GITHUB_TOKEN (or GH_TOKEN), a systemd credential github-token, github.tokenFile, \
         or log in with `gh auth login`"
            .to_string()
    })?;
    // From here on no text that holds the token leaves autodevd: logs, replies, files, GitHub writes.
    install_redactor(config, Some(&token));
    let (owner, repo) = match (&github.owner, &github.repo) {
        (Some(o), Some(r)) => (o.clone(), r.clone()),
        _ => origin_repo(workspace).ok_or_else(|| {
            format!(
                "no GitHub repository: set github.owner and github.repo, or give {} an `origin` remote on GitHub",
                workspace.display()
            )
        })?,
    };
    let gh = Arc::new(GitHub::new(github, &token)?);
    let reconciler = Reconciler::new(
        gh.clone(),
        github.owner.clone().unwrap_or_else(|| owner.clone()),
        repo.clone(),
        config.raw.project.clone(),
        state_dir.join("github-sync.json"),
        std::time::Duration::from_secs_f64(github.retry_max_secs),
    );
    let sync_enabled = config.raw.project.enabled;
    if sync_enabled {
        tokio::spawn(reconciler.clone().run());
    }
    let settings = &config.raw.status_comments;
    let comments = settings.enabled.then(|| {
        let worker = comments::Comments::new(
            gh.clone(),
            owner.clone(),
            repo.clone(),
            std::time::Duration::from_secs_f64(settings.interval_secs),
        );
        tokio::spawn(worker.clone().run());
        worker
    });
    let posts = posts::Posts::new(
        gh.clone(),
        (owner.clone(), repo.clone()),
        config.raw.push.draft,
        state_dir.join("github-posts.json"),
        std::time::Duration::from_secs_f64(github.retry_max_secs),
        sync_enabled.then(|| reconciler.clone()),
    );
    tokio::spawn(posts.clone().run());
    let pull_requests = config.raw.push.enabled.unwrap_or(true);
    Ok(GitHubCtx { owner, repo, token_source, token, gh, reconciler, sync_enabled, comments, posts, pull_requests })
}

/// Makes the one redactor know the secrets of `config` and the GitHub token (when there is one).
pub fn install_redactor(config: &Config, token: Option<&client::Token>) {
    let secrets = crate::redact::known_secrets(config, token.map(client::Token::expose));
    crate::redact::install(crate::redact::Redactor::new(&config.raw.status_comments.redact_patterns, secrets));
}

fn origin_repo(workspace: &Path) -> Option<(String, String)> {
    let mut git = std::process::Command::new("git");
    git.arg("-C").arg(workspace).args(["remote", "get-url", "origin"]);
    let out = crate::supervisor::run_command(&mut git, std::time::Duration::from_secs(10)).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        .and_then(|u| board::parse_remote(&u))
}

/// The default prompt for an issue; `github.promptTemplate` replaces it.
pub const DEFAULT_PROMPT: &str = "\
You are working on GitHub issue #{number}: {title}
{url}

{body}

---
Resolve this issue in this repository. Read the relevant code first, make focused changes, add or update tests, \
and run the project's test suite. Commit your work on branch {branch} with messages that reference #{number}. \
Now and then report how far you are with `autodevctl progress <percent> \"<what you are doing>\"` (it knows your \
slot, {slot}). When you are done, end with a short summary of what you changed and anything left open.";

/// Fills a prompt template; unknown placeholders stay as they are, and issue text is never expanded again.
pub fn render_prompt(template: &str, issue: &IssueView, slot: &str, branch: Option<&str>) -> String {
    crate::template::expand(template, |name| {
        Some(match name {
            "number" => issue.number.to_string(),
            "title" => issue.title.clone(),
            "body" => issue.body.clone(),
            "url" => issue.url.clone(),
            "slot" => slot.to_string(),
            "branch" => branch.unwrap_or("(the current branch)").to_string(),
            "labels" => issue.labels.join(", "),
            _ => return None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_template_fills_once() {
        let issue = IssueView {
            node_id: "I".into(),
            number: 7,
            title: "Login {slot} bug".into(),
            body: "It breaks {number}".into(),
            url: "https://x/7".into(),
            open: true,
            labels: vec!["bug".into()],
            item: None,
        };
        let p =
            render_prompt("#{number} {title} [{labels}] {body} {slot} {branch} {nope}", &issue, "claude-1", Some("b"));
        assert_eq!(p, "#7 Login {slot} bug [bug] It breaks {number} claude-1 b {nope}");
    }
}
