//! Real git repositories for tests: a repository with one commit, and a bare `origin` it pushes to.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().unwrap();
    assert!(out.status.success(), "git {args:?} in {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A repository at `<top>/repo` with one commit on `branch`, committed as Dev.
pub fn init_repo(top: &Path, branch: &str) -> PathBuf {
    let repo = top.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "--quiet", "-b", branch]);
    git(&repo, &["config", "user.email", "dev@example.invalid"]);
    git(&repo, &["config", "user.name", "Dev"]);
    std::fs::write(repo.join("README.md"), "hello\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "--quiet", "-m", "first"]);
    repo
}

/// A bare `origin` and a clone of it with one commit on main; returns (root temp dir, clone path).
pub fn repo_with_origin(origin: bool) -> (tempfile::TempDir, PathBuf) {
    let top = tempfile::tempdir().unwrap();
    let clone = init_repo(top.path(), "main");
    if origin {
        let bare = top.path().join("origin.git");
        git(top.path(), &["init", "--quiet", "--bare", "-b", "main", bare.to_str().unwrap()]);
        git(&clone, &["remote", "add", "origin", bare.to_str().unwrap()]);
        git(&clone, &["push", "--quiet", "-u", "origin", "main"]);
        git(&clone, &["remote", "set-head", "origin", "main"]);
    }
    (top, clone)
}
