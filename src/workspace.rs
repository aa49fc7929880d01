//! Git worktrees: every task works in a worktree of its slot, on a branch of its issue, so concurrent agents never
//! trample each other. A worktree holding work that exists nowhere else (uncommitted changes, commits on no other
//! branch or remote) is never reset or removed.
//!
//! git runs as the user's own `git` (their config, hooks, credentials), always with an argv, never through a shell.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::config::WorktreeConfig;
use crate::supervisor::run_command;

/// A local git command should be quick; a stuck one (a hook waiting for input) is ended.
const GIT_TIMEOUT: Duration = Duration::from_secs(60);
/// `git fetch` may find the network gone: then autodev works offline from the local default branch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest slug of an issue title in a branch name.
const SLUG_MAX: usize = 40;

/// The worktree a task runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub path: PathBuf,
    pub branch: String,
    /// What a new branch was started from (`origin/main`, `main`), or `None` for an existing branch.
    pub base: Option<String>,
    /// What the branch's work is measured against: `base`, or for an existing branch the default branch as known
    /// locally (no fetch).
    pub compare_to: String,
    /// Things to tell the user (offline, a worktree left aside because it holds unsaved work).
    pub notes: Vec<String>,
}

/// The state of one worktree autodev made.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct WorktreeInfo {
    pub path: String,
    pub slot: Option<String>,
    pub issue: Option<u64>,
    pub branch: Option<String>,
    /// `clean`, `uncommitted`, `ignored files` or `unpushed`.
    pub state: String,
    pub size_bytes: u64,
}

fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    git_with_timeout(dir, args, GIT_TIMEOUT)
}

fn git_with_timeout(dir: &Path, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut command = Command::new("git");
    command.arg("-C").arg(dir).args(args).env("GIT_TERMINAL_PROMPT", "0");
    run_git(command, args, dir, timeout)
}

/// Runs a prepared git command; its stdout, or an error with the first line git wrote to stderr.
fn run_git(mut command: Command, args: &[&str], dir: &Path, timeout: Duration) -> Result<String, String> {
    let output = run_command(&mut command, timeout).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            "git is not installed (needed for worktrees; or set worktree.enabled to false)".into()
        }
        _ => format!("cannot run git: {e}"),
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim_end().to_string())
    } else {
        let err = String::from_utf8_lossy(&output.stderr);
        let err = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim();
        Err(format!("git {} failed in {}: {err}", args.join(" "), dir.display()))
    }
}

/// The top of the git repository holding `dir`, if it is in one.
pub fn repo_root(dir: &Path) -> Option<PathBuf> {
    git(dir, &["rev-parse", "--show-toplevel"]).ok().map(PathBuf::from)
}

/// `fix the login bug!` → `fix-the-login-bug`, at most [`SLUG_MAX`] characters, cut at a dash.
pub fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let mut out = out.trim_end_matches('-').to_string();
    if out.len() > SLUG_MAX {
        out.truncate(SLUG_MAX);
        if let Some(cut) = out.rfind('-') {
            out.truncate(cut);
        }
    }
    out
}

/// Where a slot's worktrees live.
pub fn base_dir(root: &Path, config: &WorktreeConfig) -> PathBuf {
    let parent = root.parent().unwrap_or(root);
    match &config.base_dir {
        Some(dir) if dir.is_absolute() => dir.clone(),
        Some(dir) => parent.join(dir),
        None => {
            let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "repo".into());
            parent.join(format!("{name}.autodev"))
        }
    }
}

fn dir_name(config: &WorktreeConfig, slot: &str) -> String {
    let provider = slot.rsplit_once('-').map_or(slot, |(p, _)| p);
    config.naming_pattern.replace("{slot}", slot).replace("{provider}", provider)
}

/// The default branch to start from: `origin/<default>` after a successful fetch, else the local one.
fn start_point(root: &Path, notes: &mut Vec<String>) -> String {
    let remote_head = git(root, &["symbolic-ref", "--short", "refs/remotes/origin/HEAD"]).ok();
    let default = remote_head
        .as_deref()
        .and_then(|r| r.strip_prefix("origin/"))
        .map(str::to_string)
        .or_else(|| git(root, &["config", "init.defaultBranch"]).ok().filter(|b| local_branch_exists(root, b)))
        .or_else(|| ["main", "master"].iter().find(|b| local_branch_exists(root, b)).map(|b| b.to_string()));
    let has_origin = git(root, &["remote", "get-url", "origin"]).is_ok();
    if let (true, Some(default)) = (has_origin, &default) {
        match git_with_timeout(root, &["fetch", "--quiet", "origin", default], FETCH_TIMEOUT) {
            Ok(_) => return format!("origin/{default}"),
            Err(e) => notes.push(format!("origin did not answer ({e}); started from the local {default}")),
        }
    }
    default.filter(|b| local_branch_exists(root, b)).unwrap_or_else(|| "HEAD".into())
}

/// The default branch as this clone knows it, without asking `origin`: `origin/<default>` when there is one, else
/// the local default branch, else `HEAD`.
fn local_default(root: &Path) -> String {
    if let Ok(remote) = git(root, &["symbolic-ref", "--short", "refs/remotes/origin/HEAD"]) {
        return remote;
    }
    git(root, &["config", "init.defaultBranch"])
        .ok()
        .filter(|b| local_branch_exists(root, b))
        .or_else(|| ["main", "master"].iter().find(|b| local_branch_exists(root, b)).map(|b| b.to_string()))
        .unwrap_or_else(|| "HEAD".into())
}

/// The user's git identity as seen from `dir` (`user.name`, `user.email`), as the environment variables git reads
/// first: `GIT_AUTHOR_*` and `GIT_COMMITTER_*`. Empty where git or an identity is missing.
pub fn git_identity(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut env = std::collections::BTreeMap::new();
    for (key, vars) in [
        ("user.name", ["GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"]),
        ("user.email", ["GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"]),
    ] {
        if let Ok(value) = git(dir, &["config", "--get", key]).map(|v| v.trim().to_string())
            && !value.is_empty()
        {
            for var in vars {
                env.insert(var.to_string(), value.clone());
            }
        }
    }
    env
}

/// The commit `reference` names now (so `HEAD`, or a default branch that moves on, still means the task's start).
fn pinned(root: &Path, reference: String) -> String {
    git(root, &["rev-parse", "--verify", "--quiet", &format!("{reference}^{{commit}}")])
        .map(|sha| sha.trim().to_string())
        .unwrap_or(reference)
}

/// What a task's branch holds: commits beyond `base`, and whether the worktree has changes git does not ignore.
pub fn changes(worktree: &Path, base: &str) -> Result<(u64, bool), String> {
    let count = git(worktree, &["rev-list", "--count", &format!("{base}..HEAD")])?;
    let commits = count.trim().parse().map_err(|_| format!("git rev-list gave {count:?}"))?;
    let dirty = !git(worktree, &["status", "--porcelain", "--untracked-files=normal"])?.is_empty();
    Ok((commits, dirty))
}

fn local_branch_exists(root: &Path, branch: &str) -> bool {
    git(root, &["rev-parse", "--verify", "--quiet", &format!("refs/heads/{branch}")]).is_ok()
}

/// The branch that already holds this issue's work, if any: `<prefix><issue>` or `<prefix><issue>-<slug>`.
fn issue_branch(root: &Path, prefix: &str, issue: u64) -> Option<String> {
    let exact = format!("{prefix}{issue}");
    let listed = git(
        root,
        &[
            "for-each-ref",
            "--format=%(refname:short)",
            &format!("refs/heads/{exact}"),
            &format!("refs/heads/{exact}-*"),
        ],
    )
    .ok()?;
    listed.lines().map(str::to_string).find(|b| b == &exact || b.starts_with(&format!("{exact}-")))
}

/// The issue's branch on `origin`, fetched as `origin/<name>`, if there is one (bounded by the fetch timeout).
/// Without an `origin` there is none; one that does not answer is an error, said in the task's notes.
fn origin_issue_branch(root: &Path, prefix: &str, issue: u64) -> Result<Option<String>, String> {
    if git(root, &["remote", "get-url", "origin"]).is_err() {
        return Ok(None);
    }
    let exact = format!("{prefix}{issue}");
    let patterns = [format!("refs/heads/{exact}"), format!("refs/heads/{exact}-*")];
    let listed =
        git_with_timeout(root, &["ls-remote", "--heads", "origin", &patterns[0], &patterns[1]], FETCH_TIMEOUT)?;
    let name = listed
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.strip_prefix("refs/heads/"))
        .find(|b| *b == exact || b.starts_with(&format!("{exact}-")))
        .map(str::to_string);
    let Some(name) = name else { return Ok(None) };
    let spec = format!("+refs/heads/{name}:refs/remotes/origin/{name}");
    git_with_timeout(root, &["fetch", "--quiet", "origin", &spec], FETCH_TIMEOUT)?;
    Ok(Some(name))
}

/// Whether `path` is a worktree of `root` (listed by git, not merely a directory).
fn is_worktree(root: &Path, path: &Path) -> bool {
    let Ok(list) = git(root, &["worktree", "list", "--porcelain"]) else { return false };
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    list.lines().filter_map(|l| l.strip_prefix("worktree ")).any(|w| Path::new(w) == path)
}

/// What a worktree holds that exists nowhere else: `None` if nothing (safe to reset or remove).
pub fn unsaved_work(path: &Path) -> Result<Option<&'static str>, String> {
    if !git(path, &["status", "--porcelain", "--untracked-files=normal"])?.is_empty() {
        return Ok(Some("uncommitted"));
    }
    // Ignored files (.env.local, build output) are gone with the worktree too; some cannot be made again.
    if git(path, &["status", "--porcelain", "--ignored"])?.lines().any(|l| l.starts_with("!!")) {
        return Ok(Some("ignored files"));
    }
    // Commits are safe when some ref other than this worktree's own branch contains them.
    let own = git(path, &["symbolic-ref", "--quiet", "HEAD"]).unwrap_or_default();
    let containing = git(path, &["for-each-ref", "--contains", "HEAD", "--format=%(refname)"])?;
    let elsewhere = containing.lines().any(|r| r != own && !r.ends_with("/HEAD"));
    Ok(if elsewhere { None } else { Some("unpushed") })
}

/// Files larger than this are never committed by autodev (they belong in LFS or nowhere).
pub const MAX_LEFTOVER_BYTES: u64 = 50 << 20;

/// What committing a run's leftovers did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// The commit made, if there was anything to commit.
    pub commit: Option<String>,
    /// Files left out, with why (over 50 MB).
    pub left_out: Vec<String>,
}

/// Commits what a run left uncommitted in its worktree, on the branch checked out there: every change git does not
/// ignore, except files over [`MAX_LEFTOVER_BYTES`]. The user's git identity and hooks apply (a failing hook is the
/// error). Refused whole, naming the file, when a file to commit holds one of `secrets`.
pub fn commit_leftovers(
    worktree: &Path,
    message: &str,
    secrets: &[String],
    env: &[(String, String)],
) -> Result<Leftovers, String> {
    // The same clean environment as the agent's (its hooks may be files the agent edited): never the daemon's.
    let git = |args: &[&str]| {
        let mut command = Command::new("git");
        command
            .arg("-C")
            .arg(worktree)
            .arg("--literal-pathspecs")
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("GIT_TERMINAL_PROMPT", "0");
        run_git(command, args, worktree, GIT_TIMEOUT)
    };
    let status = git(&["status", "--porcelain=v1", "-z", "--untracked-files=all"])?;
    let mut paths = Vec::new();
    let mut entries = status.split('\0').filter(|e| !e.is_empty());
    while let Some(entry) = entries.next() {
        let (code, path) = (entry.get(..2).unwrap_or_default(), entry.get(3..).unwrap_or_default());
        // A rename or copy (in either column) lists its old path next; `add -A` of the new one records the move.
        if code.contains('R') || code.contains('C') {
            entries.next();
        }
        if !path.is_empty() {
            paths.push(path.to_string());
        }
    }
    let mut left_out = Vec::new();
    let mut to_add = Vec::new();
    for path in paths {
        let full = worktree.join(&path);
        if path.ends_with('/') {
            // An untracked directory git lists whole: a nested repository, which would become a dangling gitlink.
            left_out.push(format!("{path} (a nested git repository)"));
            continue;
        }
        match std::fs::symlink_metadata(&full) {
            Ok(meta) if meta.is_file() && meta.len() > MAX_LEFTOVER_BYTES => {
                left_out.push(format!("{path} ({} MB, over {} MB)", meta.len() >> 20, MAX_LEFTOVER_BYTES >> 20));
                continue;
            }
            Ok(meta) if meta.is_file() && !secrets.is_empty() => {
                let content = std::fs::read(&full).map_err(|e| format!("cannot read {path}: {e}"))?;
                if secrets.iter().any(|s| memchr::memmem::find(&content, s.as_bytes()).is_some()) {
                    return Err(format!(
                        "not committed: {path} holds a secret value autodev knows (a token or key); remove it, \
                         then commit by hand"
                    ));
                }
            }
            _ => {}
        }
        to_add.push(path);
    }
    if to_add.is_empty() {
        return Ok(Leftovers { commit: None, left_out });
    }
    for chunk in to_add.chunks(256) {
        let mut args = vec!["add", "-A", "--"];
        args.extend(chunk.iter().map(String::as_str));
        git(&args)?;
    }
    // What was left out stays out even if the agent had staged it.
    let skipped: Vec<&str> =
        left_out.iter().filter_map(|l| l.split(" (").next()).map(|p| p.trim_end_matches('/')).collect();
    for chunk in skipped.chunks(256) {
        let mut args = vec!["reset", "--quiet", "--"];
        args.extend(chunk.iter().copied());
        let _ = git(&args);
    }
    git(&["commit", "--quiet", "-m", message]).map_err(|e| format!("git commit failed: {e}"))?;
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    Ok(Leftovers { commit: Some(commit.trim().to_string()), left_out })
}

/// A push reaches the network and may run hooks: slower than local git, but never without end.
const PUSH_TIMEOUT: Duration = Duration::from_secs(180);

/// How a task's branch goes to its remote.
pub struct PushJob<'a> {
    pub worktree: &'a Path,
    pub remote: &'a str,
    pub branch: &'a str,
    /// What the branch started from: only the commits beyond it are checked for secrets.
    pub base: &'a str,
    pub secrets: &'a [String],
    /// The agent's clean environment (the user's git identity among it).
    pub env: &'a [(String, String)],
    /// `GIT_ASKPASS` program, the token it hands to git when the user's own credentials do not answer, and the
    /// only host it is for (GitHub's).
    pub askpass: Option<(&'a Path, &'a str, &'a str)>,
}

/// Pushes the task's branch to its remote, never forced. Refused, naming the file, when a commit beyond the base
/// adds a known secret value. The error is what people read: git's own words on a rejected push.
pub fn push(job: &PushJob) -> Result<(), String> {
    if !job.secrets.is_empty() {
        // What is pushed: the branch itself (not HEAD, which the agent may have moved). Every change as text, the
        // way git stores it: binary files, `-diff` attributes and textconv drivers (which the agent may have set)
        // hide nothing, and a merge shows what it brought.
        let range = format!("{}..refs/heads/{}", job.base, job.branch);
        let args = [
            "log",
            "-p",
            "--text",
            "--no-textconv",
            "--no-ext-diff",
            "--no-color",
            "--diff-merges=first-parent",
            "--format=",
            &range,
        ];
        let mut command = Command::new("git");
        command.arg("-C").arg(job.worktree).args(args).env_clear().envs(job.env.iter().map(|(k, v)| (k, v)));
        let log = run_git(command, &args, job.worktree, GIT_TIMEOUT)?;
        if let Some(file) = file_adding_secret(&log, job.secrets) {
            return Err(format!(
                "not pushed: a commit on {} adds a secret value autodev knows (a token or key) to {file}; remove it \
                 from the branch's history, then push by hand",
                job.branch
            ));
        }
    }
    let refspec = format!("refs/heads/{0}:refs/heads/{0}", job.branch);
    let failed = |why: String| {
        format!("pushing {} to {} failed (the work is committed on the local branch): {why}", job.branch, job.remote)
    };
    // The token only for an https remote on GitHub's host: the remote's URL is the repository's config, which the
    // agent could have pointed elsewhere.
    let push_url = git(job.worktree, &["remote", "get-url", "--push", job.remote]).unwrap_or_default();
    let askpass = job.askpass.filter(|(_, _, host)| {
        push_url.parse::<http::Uri>().is_ok_and(|u| u.scheme_str() == Some("https") && u.host() == Some(host))
    });
    let mut command = Command::new("git");
    command.arg("-C").arg(job.worktree);
    if askpass.is_some() {
        // The token is in this command's environment: no hook (files the agent may have written) runs with it.
        command.args(["-c", "core.hooksPath=/dev/null"]);
    }
    command.args(["push", "--porcelain"]);
    if askpass.is_some() {
        command.arg("--no-verify");
    }
    command.args(["--", job.remote, &refspec]);
    command.env_clear().envs(job.env.iter().map(|(k, v)| (k, v))).env("GIT_TERMINAL_PROMPT", "0");
    if let Some((program, token, host)) = askpass {
        // git asks its credential helpers first: the user's own credentials win; the token is the fallback, given
        // through the environment of this one command (never argv, never the remote's URL).
        command
            .env("GIT_ASKPASS", program)
            .env(crate::protocol::ASKPASS_TOKEN_VAR, token)
            .env(crate::protocol::ASKPASS_HOST_VAR, host);
    }
    let output = run_command(&mut command, PUSH_TIMEOUT).map_err(|e| failed(format!("cannot run git: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    // The porcelain line of a refused ref says why ("[rejected] (fetch first)"); else git's error line.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let refused = stdout.lines().find_map(|l| l.strip_prefix('!')).and_then(|l| l.split('\t').nth(2));
    let said = stderr.lines().map(str::trim).find(|l| l.starts_with("fatal:") || l.starts_with("error:"));
    let why = match (refused, said) {
        (Some(r), _) => format!("the remote refused it: {r}; it is never forced (merge or rebase, then push by hand)"),
        (None, Some(s)) => s.to_string(),
        (None, None) if output.status.code().is_none() => format!("no answer within {}s", PUSH_TIMEOUT.as_secs()),
        (None, None) => stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim().to_string(),
    };
    Err(failed(why))
}

/// The file whose added lines (in `git log -p` output) hold one of `secrets`.
fn file_adding_secret(log: &str, secrets: &[String]) -> Option<String> {
    let mut file = "?";
    // Between a `diff --git` line and the first hunk: header lines (`+++ b/…`), not content.
    let mut in_header = false;
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("diff --git ") {
            file = rest.rsplit_once(" b/").map_or(rest, |(_, b)| b);
            in_header = true;
        } else if line.starts_with("@@") {
            in_header = false;
        } else if !in_header && line.starts_with('+') && secrets.iter().any(|s| line.contains(s.as_str())) {
            return Some(file.to_string());
        }
    }
    None
}

#[cfg(test)]
mod secret_scan_tests {
    #[test]
    fn only_added_content_lines_count_and_the_file_is_named() {
        let secrets = vec!["ghp_0123456789abcdef".to_string()];
        let log = "diff --git a/conf.json b/conf.json\nindex 1..2 100644\n--- a/conf.json\n+++ b/conf.json\n@@ -1 +1 @@\n\
                   -old\n+++ token ghp_0123456789abcdef\n";
        // A content line that starts with "++" is content, not a header.
        assert_eq!(super::file_adding_secret(log, &secrets).as_deref(), Some("conf.json"));
        let removed = "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +0,0 @@\n-ghp_0123456789abcdef\n";
        assert_eq!(super::file_adding_secret(removed, &secrets), None, "removing a secret adds none");
    }
}

/// Gets the worktree for a task of `issue` in `slot`: the slot's worktree reused when that loses nothing, else a
/// fresh one; on the issue's existing branch, else on a new branch from the newest default branch. `from_origin`
/// (the fleet): an issue branch no local one matches is looked for on `origin` first (another machine's work so far).
pub fn prepare(
    root: &Path,
    config: &WorktreeConfig,
    slot: &str,
    issue: u64,
    title: &str,
    in_use: &[PathBuf],
    from_origin: bool,
) -> Result<Prepared, String> {
    let mut notes = Vec::new();
    let base = base_dir(root, config);
    std::fs::create_dir_all(&base)
        .map_err(|e| format!("cannot create the worktree directory {}: {e}", base.display()))?;
    if from_origin && issue_branch(root, &config.branch_prefix, issue).is_none() {
        match origin_issue_branch(root, &config.branch_prefix, issue) {
            Ok(None) => {}
            Ok(Some(name)) => match git(root, &["branch", "--no-track", &name, &format!("refs/remotes/origin/{name}")])
            {
                Ok(_) => notes.push(format!("continuing branch {name} from origin (the issue's work so far)")),
                Err(e) => notes.push(format!("cannot take branch {name} from origin ({e}); starting afresh")),
            },
            Err(e) => {
                notes.push(format!("origin could not say whether the issue has a branch there ({e}); starting afresh"))
            }
        }
    }
    let existing = issue_branch(root, &config.branch_prefix, issue);
    let (mut branch, start) = match &existing {
        Some(b) => (b.clone(), None),
        None => {
            let slug = slug(title);
            let name = if slug.is_empty() {
                format!("{}{issue}", config.branch_prefix)
            } else {
                format!("{}{issue}-{slug}", config.branch_prefix)
            };
            (name, Some(start_point(root, &mut notes)))
        }
    };

    // The slot's worktree, or the first free `<name>-N` beside it if the slot's own holds unsaved work.
    let name = dir_name(config, slot);
    let mut path = base.join(&name);
    let mut n = 2;
    loop {
        if !path.exists() {
            break;
        }
        let taken = in_use.iter().any(|p| same_path(p, &path));
        if taken {
            notes.push(format!("worktree {} is in use by another task; using a new one", path.display()));
        } else if is_worktree(root, &path) {
            let current = git(&path, &["symbolic-ref", "--quiet", "--short", "HEAD"]).ok();
            if current.as_deref() == Some(branch.as_str()) {
                // The issue's own earlier work, in the slot's own worktree: carry on there.
                let compare_to = pinned(root, local_default(root));
                return Ok(Prepared { path, branch, base: None, compare_to, notes });
            }
            match unsaved_work(&path)? {
                None => {
                    check_out(root, &path, true, &mut branch, start.as_deref(), &mut notes)?;
                    let compare_to = pinned(root, start.clone().unwrap_or_else(|| local_default(root)));
                    return Ok(Prepared { path, branch, base: start, compare_to, notes });
                }
                Some(what) => notes.push(format!(
                    "worktree {} has {what} work on {}: left as it is (needs attention); using a new worktree",
                    path.display(),
                    current.as_deref().unwrap_or("a detached HEAD")
                )),
            }
        }
        path = base.join(format!("{name}-{n}"));
        n += 1;
    }
    check_out(root, &path, false, &mut branch, start.as_deref(), &mut notes)?;
    let compare_to = pinned(root, start.clone().unwrap_or_else(|| local_default(root)));
    Ok(Prepared { path, branch, base: start, compare_to, notes })
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Puts worktree `path` on `branch`: a new branch from `start`, or the existing one. `reuse`: the worktree exists
/// and is switched; otherwise it is added. An existing branch that is checked out in another worktree is continued
/// from its tip on a branch of our own (`<name>-2`), so neither worktree loses anything.
fn check_out(
    root: &Path,
    path: &Path,
    reuse: bool,
    branch: &mut String,
    start: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let path_str = path.to_string_lossy();
    // `new`: the branch to create; `from`: what it starts from, or the existing branch when `new` is None.
    let run = |new: Option<&str>, from: &str| match (reuse, new) {
        (true, Some(new)) => git(path, &["switch", "--quiet", "-c", new, from]),
        (true, None) => git(path, &["switch", "--quiet", from]),
        (false, Some(new)) => git(root, &["worktree", "add", "--quiet", "-b", new, &path_str, from]),
        (false, None) => git(root, &["worktree", "add", "--quiet", &path_str, from]),
    };
    let result = match start {
        Some(start) => run(Some(branch.as_str()), start),
        None => run(None, branch.as_str()),
    };
    match result {
        Ok(_) => Ok(()),
        Err(e) if start.is_none() => {
            let taken = branch.clone();
            *branch = free_branch_name(root, &taken)?;
            notes.push(format!("branch {taken} is checked out elsewhere ({e}); continuing it on {branch}"));
            run(Some(branch.as_str()), &taken).map(drop)
        }
        Err(e) => Err(e),
    }
}

/// `<branch>-2`, `<branch>-3`, … whichever does not exist.
fn free_branch_name(root: &Path, branch: &str) -> Result<String, String> {
    (2..1000)
        .map(|n| format!("{branch}-{n}"))
        .find(|b| !local_branch_exists(root, b))
        .ok_or_else(|| format!("no free branch name after {branch}"))
}

/// Every worktree autodev made for `root` (those under its base dir), with what they hold.
pub fn list(root: &Path, config: &WorktreeConfig) -> Result<Vec<WorktreeInfo>, String> {
    let base = std::fs::canonicalize(base_dir(root, config)).unwrap_or_else(|_| base_dir(root, config));
    let listed = git(root, &["worktree", "list", "--porcelain"])?;
    let mut out = Vec::new();
    let mut current: Option<(PathBuf, Option<String>)> = None;
    for line in listed.lines().chain(std::iter::once("")) {
        if let Some(p) = line.strip_prefix("worktree ") {
            current = Some((PathBuf::from(p), None));
        } else if let Some(b) = line.strip_prefix("branch refs/heads/") {
            if let Some(c) = current.as_mut() {
                c.1 = Some(b.to_string());
            }
        } else if line.is_empty()
            && let Some((path, branch)) = current.take()
            && path.starts_with(&base)
            && path.exists()
        {
            let state = match unsaved_work(&path) {
                Ok(None) => "clean".to_string(),
                Ok(Some(what)) => what.to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            let dir = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let slot = Some(
                dir.rsplit_once('-')
                    .filter(|(_, n)| n.parse::<u32>().is_ok() && dir.matches('-').count() > 1)
                    .map_or(dir.clone(), |(s, _)| s.to_string()),
            );
            let issue = branch
                .as_deref()
                .and_then(|b| b.strip_prefix(&config.branch_prefix))
                .and_then(|rest| rest.split('-').next().and_then(|n| n.parse().ok()));
            out.push(WorktreeInfo {
                size_bytes: dir_size(&path),
                path: path.display().to_string(),
                slot,
                issue,
                branch,
                state,
            });
        }
    }
    Ok(out)
}

/// Removes a worktree if it holds nothing that exists nowhere else. Its branch stays.
pub fn remove_if_safe(root: &Path, path: &Path) -> Result<bool, String> {
    if unsaved_work(path)?.is_some() {
        return Ok(false);
    }
    git(root, &["worktree", "remove", &path.to_string_lossy()])?;
    Ok(true)
}

/// Bytes of the files under `dir` (not following links).
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => total += entry.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_branch_safe() {
        assert_eq!(slug("Fix the login bug!"), "fix-the-login-bug");
        assert_eq!(slug("  --weird__name.. ~^: "), "weird-name");
        assert_eq!(slug("@say hello"), "say-hello");
        let long = slug("a very long title that goes on and on past forty characters for sure");
        assert!(long.len() <= SLUG_MAX && !long.ends_with('-'), "{long}");
        assert_eq!(slug("日本語"), "");
    }

    #[test]
    fn default_base_dir_is_a_sibling() {
        let config = WorktreeConfig::default();
        assert_eq!(base_dir(Path::new("/src/repo"), &config), PathBuf::from("/src/repo.autodev"));
        assert_eq!(dir_name(&config, "claude-2"), "claude-2");
    }
}
