//! Git worktrees end to end, on real repositories in temp dirs with a bare repository as `origin`.

mod common;

use std::path::{Path, PathBuf};

use common::git::{git, init_repo, repo_with_origin};
use common::{Daemon, fake_config};
use serde_json::{Value, json};

fn config() -> Value {
    fake_config(2)
}

fn run_record(d: &Daemon, row: &Value) -> Value {
    d.record(row["run_id"].as_str().unwrap())
}

#[test]
fn concurrent_tasks_work_in_their_own_worktrees_and_branches() {
    let (top, repo) = repo_with_origin(true);
    let d = Daemon::start_in(&config(), Some(&repo));
    d.assign(1, &[], "Fix the login bug\n@write one.txt from task one\n@commit task one\n@sleep 0.5");
    d.assign(2, &[], "Add a logout button\n@write two.txt from task two\n@commit task two\n@sleep 0.5");
    let one = d.wait_state("claude-1", "completed");
    let two = d.wait_state("claude-2", "completed");
    let base = top.path().join("repo.autodev");
    assert_eq!(one["worktree"], json!(base.join("claude-1").display().to_string()));
    assert_eq!(two["worktree"], json!(base.join("claude-2").display().to_string()));
    assert_eq!(one["branch"], "autodev/issue-1-fix-the-login-bug");
    assert_eq!(two["branch"], "autodev/issue-2-add-a-logout-button");
    let (r1, r2) = (run_record(&d, &one), run_record(&d, &two));
    assert_eq!(r1["cwd"], one["worktree"]);
    assert_eq!(r1["files"], json!(["README.md", "one.txt"]), "task one sees only its own files");
    assert_eq!(r2["files"], json!(["README.md", "two.txt"]), "task two sees only its own files");
    assert!(r1["prompt"].as_str().unwrap().contains("on branch autodev/issue-1-fix-the-login-bug"), "told its branch");
    assert_eq!(git(&repo, &["log", "-1", "--format=%s", "autodev/issue-1-fix-the-login-bug"]), "task one");
    assert_eq!(git(&repo, &["log", "-1", "--format=%s", "autodev/issue-2-add-a-logout-button"]), "task two");
    assert!(!repo.join("one.txt").exists() && !repo.join("two.txt").exists(), "the main checkout is untouched");
    assert_eq!(git(&repo, &["status", "--porcelain"]), "");
    let listed: Value = serde_json::from_str(&d.ctl(&["workspaces", "--json"])).unwrap();
    let states: Vec<(&str, &str)> = listed["worktrees"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["slot"].as_str().unwrap(), w["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("claude-1", "unpushed"), ("claude-2", "unpushed")]);
    assert!(d.ctl(&["status", "--preview"]).contains("⎇ autodev/issue-1-fix-the-login-bug in"));
}

#[test]
fn a_clean_worktree_is_reused_and_one_with_unsaved_work_never_is() {
    let (top, repo) = repo_with_origin(true);
    let d = Daemon::start_in(&config(), Some(&repo));
    let base = top.path().join("repo.autodev");
    // A task that pushes its work leaves a worktree that loses nothing when reset: reused.
    d.assign(1, &["--slot", "claude-1"], "Pushed work\n@write p.txt x\n@commit p\n@push");
    d.wait_state("claude-1", "completed");
    d.assign(2, &["--slot", "claude-1"], "Next task\n@say hi");
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["worktree"], json!(base.join("claude-1").display().to_string()), "{row}");
    assert_eq!(row["branch"], "autodev/issue-2-next-task");
    assert_eq!(run_record(&d, &row)["files"], json!(["README.md"]), "the new branch starts from main");
    // Uncommitted work (a failed run: autodev commits leftovers of completed runs only): never reset; the next task
    // gets a fresh worktree.
    d.assign(3, &["--slot", "claude-1"], "Dirty\n@write wip.txt unsaved\n@fail");
    d.wait_state("claude-1", "failed");
    d.assign(4, &["--slot", "claude-1"], "After dirty\n@say hi");
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["worktree"], json!(base.join("claude-1-2").display().to_string()), "{row}");
    assert_eq!(std::fs::read_to_string(base.join("claude-1/wip.txt")).unwrap(), "unsaved\n", "the work is kept");
    // Unpushed commits: never reset either.
    d.assign(5, &["--slot", "claude-1"], "Unpushed\n@write u.txt y\n@commit u");
    d.wait_state("claude-1", "completed");
    d.assign(6, &["--slot", "claude-1"], "After unpushed\n@say hi");
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["worktree"], json!(base.join("claude-1-3").display().to_string()), "{row}");

    // Prune removes only what is safe: the clean claude-1-3 goes; dirty claude-1 and unpushed claude-1-2 stay.
    let pruned: Value = serde_json::from_str(&d.ctl(&["workspaces", "prune", "--json"])).unwrap();
    assert_eq!(pruned["removed"], json!([base.join("claude-1-3").display().to_string()]), "{pruned}");
    assert!(base.join("claude-1/wip.txt").exists());
    assert!(base.join("claude-1-2").exists());
    let kept = pruned["kept"].as_array().unwrap();
    assert!(kept.iter().any(|k| k.as_str().unwrap().ends_with("claude-1: uncommitted")), "{pruned}");
    assert!(kept.iter().any(|k| k.as_str().unwrap().ends_with("claude-1-2: unpushed")), "{pruned}");
    assert_eq!(git(&repo, &["log", "-1", "--format=%s", "autodev/issue-5-unpushed"]), "u", "branches stay");
}

#[test]
fn resume_lands_in_the_same_worktree_and_branch() {
    let (_top, repo) = repo_with_origin(true);
    let d = Daemon::start_in(&config(), Some(&repo));
    d.assign(8, &[], "Long task\n@write half.txt done-half\n@ignore-term\n@say halfway\n@sleep 60");
    let row = common::wait_until("halfway", || {
        let row = d.slot("claude-1");
        row["console_preview"].as_array()?.iter().any(|l| l == "halfway").then_some(row)
    });
    d.ctl(&["stop", "claude-1"]);
    d.ctl(&["resume", "claude-1"]);
    let resumed = d.wait_state("claude-1", "completed");
    assert_eq!(resumed["worktree"], row["worktree"]);
    assert_eq!(resumed["branch"], row["branch"]);
    let record = run_record(&d, &resumed);
    assert_eq!(record["cwd"], row["worktree"]);
    assert_eq!(record["files"], json!(["README.md", "half.txt"]), "the earlier work is there");
    let worktree = PathBuf::from(row["worktree"].as_str().unwrap());
    assert_eq!(git(&worktree, &["branch", "--show-current"]), row["branch"].as_str().unwrap());
    // The same issue again in the same slot carries on in its worktree and branch.
    d.assign(8, &[], "More of the same\n@say again");
    let again = d.wait_state("claude-1", "completed");
    assert_eq!((&again["worktree"], &again["branch"]), (&row["worktree"], &row["branch"]));
}

#[test]
fn offline_and_without_origin_branches_start_from_local_main() {
    let (_top, repo) = repo_with_origin(false);
    let d = Daemon::start_in(&config(), Some(&repo));
    d.assign(1, &[], "No remote\n@say hi");
    // It did nothing: nothing to review, so it is not "completed".
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["end_cause"], "no_changes", "{row}");
    assert_eq!(row["branch"], "autodev/issue-1-no-remote");

    let (_top2, repo2) = repo_with_origin(true);
    git(&repo2, &["commit", "--quiet", "--allow-empty", "-m", "local only"]);
    git(&repo2, &["remote", "set-url", "origin", "/nonexistent/origin.git"]);
    let d2 = Daemon::start_in(&config(), Some(&repo2));
    d2.assign(2, &[], "Offline\n@say hi");
    let row = d2.wait_state("claude-1", "failed");
    let worktree = PathBuf::from(row["worktree"].as_str().unwrap());
    assert_eq!(git(&worktree, &["log", "-1", "--format=%s"]), "local only", "started from the local main");
    assert!(d2.daemon_log().contains("origin did not answer"), "{}", d2.daemon_log());
}

#[test]
fn a_branch_checked_out_elsewhere_is_continued_on_a_new_name() {
    let (top, repo) = repo_with_origin(true);
    // The branch exists and someone has it checked out in a worktree of their own.
    git(&repo, &["branch", "autodev/issue-5-by-hand"]);
    let theirs = top.path().join("theirs");
    git(&repo, &["worktree", "add", "--quiet", theirs.to_str().unwrap(), "autodev/issue-5-by-hand"]);
    std::fs::write(theirs.join("mine.txt"), "do not touch\n").unwrap();
    let d = Daemon::start_in(&config(), Some(&repo));
    d.assign(5, &[], "Clash\n@say hi");
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["branch"], "autodev/issue-5-by-hand-2", "{row}");
    assert_eq!(std::fs::read_to_string(theirs.join("mine.txt")).unwrap(), "do not touch\n");
    assert_eq!(git(&theirs, &["branch", "--show-current"]), "autodev/issue-5-by-hand");
}

#[test]
fn cleanup_on_complete_removes_only_what_is_safe() {
    let (top, repo) = repo_with_origin(true);
    let mut config = config();
    config["worktree"] = json!({ "cleanup": { "onComplete": true, "onError": "keep" } });
    let d = Daemon::start_in(&config, Some(&repo));
    let base = top.path().join("repo.autodev");
    d.assign(1, &["--slot", "claude-1"], "Nothing to keep\n@write a.txt x\n@commit a\n@push");
    d.wait_state("claude-1", "completed");
    common::wait_until("the clean worktree to be removed", || (!base.join("claude-1").exists()).then_some(()));
    d.assign(2, &["--slot", "claude-2"], "Keep me\n@write w.txt wip");
    d.wait_state("claude-2", "completed");
    // The clean-up decision follows the end of the run; wait for it to be made, then check what it did.
    common::wait_until("the clean-up decision", || {
        d.daemon_log().contains("kept the worktree: it holds unsaved work").then_some(())
    });
    assert!(base.join("claude-2/w.txt").exists(), "a worktree with unsaved work was removed");
}

#[test]
fn a_directory_that_is_not_a_git_repository_runs_without_worktrees() {
    let d = Daemon::start(&config());
    d.assign(1, &[], "@say plain");
    let row = d.wait_state("claude-1", "completed");
    assert_eq!((row["worktree"].clone(), row["branch"].clone()), (Value::Null, Value::Null));
    assert_eq!(run_record(&d, &row)["cwd"], json!(d.workspace.display().to_string()));
    assert!(d.ctl(&["workspaces"]).contains("not a git repository"));
}

#[test]
fn what_a_completed_run_left_uncommitted_is_committed_on_its_branch_except_big_files_and_secrets() {
    let (_top, repo) = repo_with_origin(true);
    let mut c = config();
    c["llms"]["claude"]["apiKey"] = json!("sk-ant-test-key-0123456789");
    let d = Daemon::start_in(&c, Some(&repo));
    // The agent edits and adds files but cannot commit (as claude under acceptEdits): autodev commits them.
    d.assign(
        1,
        &["--slot", "claude-1"],
        "Fix the parser\n@write fix.txt fixed\n@write README.md changed\n@sparse big.bin 60000000",
    );
    let row = d.wait_state("claude-1", "completed");
    let reason = row["reason"].as_str().unwrap();
    assert!(reason.contains("autodev committed what the agent left uncommitted"), "{reason}");
    assert!(reason.contains("not committed: big.bin (57 MB, over 50 MB)"), "{reason}");
    let branch = row["branch"].as_str().unwrap();
    let subject = git(&repo, &["log", "-1", "--format=%s", branch]);
    let run_id = row["run_id"].as_str().unwrap();
    assert_eq!(subject, format!("autodev: #1 Fix the parser (claude-1, run {run_id})"));
    assert_eq!(git(&repo, &["show", "--name-only", "--format=", branch]), "README.md\nfix.txt");
    assert_eq!(git(&repo, &["log", "-1", "--format=%an", branch]), "Dev", "the user's own git identity");

    // A file that holds a known secret: nothing is committed, and the file is named.
    d.assign(2, &["--slot", "claude-2"], "Leak\n@write leak.txt key=sk-ant-test-key-0123456789\n@write ok.txt fine");
    let row = d.wait_state("claude-2", "failed");
    assert_eq!(row["end_cause"], "commit_failed", "{row}");
    let reason = row["reason"].as_str().unwrap();
    assert!(reason.contains("not committed: leak.txt holds a secret value"), "{reason}");
    let branch = row["branch"].as_str().unwrap();
    assert_eq!(git(&repo, &["log", "-1", "--format=%s", branch]), "first", "nothing was committed");
    assert!(Path::new(row["worktree"].as_str().unwrap()).join("ok.txt").exists(), "the work stays in the worktree");
}

#[test]
fn a_failing_commit_hook_is_the_reason_shown_and_the_work_stays() {
    let (_top, repo) = repo_with_origin(true);
    let hook = repo.join(".git/hooks/pre-commit");
    std::fs::write(&hook, "#!/bin/sh\necho 'lint: trailing whitespace in fix.txt' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let d = Daemon::start_in(&config(), Some(&repo));
    d.assign(1, &[], "Hooked\n@write fix.txt fixed ");
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["end_cause"], "commit_failed", "{row}");
    let reason = row["reason"].as_str().unwrap();
    assert!(
        reason.contains("git commit failed") && reason.contains("lint: trailing whitespace in fix.txt"),
        "{reason}"
    );
    assert!(Path::new(row["worktree"].as_str().unwrap()).join("fix.txt").exists());
}

#[test]
fn a_run_that_changes_nothing_ends_no_changes_and_one_that_commits_counts_its_commits() {
    let (_top, repo) = repo_with_origin(true);
    let d = Daemon::start_in(&config(), Some(&repo));
    d.assign(1, &["--slot", "claude-1"], "Look around\n@say I read the code and found nothing to change");
    let row = d.wait_state("claude-1", "failed");
    assert_eq!(row["end_cause"], "no_changes", "{row}");
    assert_eq!((row["commits"].clone(), row["changes"].clone()), (json!(0), json!(false)), "{row}");
    let reason = row["reason"].as_str().unwrap();
    assert!(
        reason.contains("no changes were produced")
            && reason.contains("the agent said: \"I read the code and found nothing to change\""),
        "{reason}"
    );

    d.assign(2, &["--slot", "claude-2"], "Two commits\n@write a.txt 1\n@commit one\n@write b.txt 2\n@commit two");
    let row = d.wait_state("claude-2", "completed");
    assert_eq!((row["commits"].clone(), row["changes"].clone()), (json!(2), json!(true)), "{row}");
}

#[test]
fn agents_get_the_users_git_identity_even_where_their_shell_hides_git_config() {
    let (_top, repo) = repo_with_origin(true);
    let d = Daemon::start_in(&config(), Some(&repo));
    d.assign(1, &[], "Who am I\n@write a.txt 1\n@commit mine");
    let row = d.wait_state("claude-1", "completed");
    let env = &run_record(&d, &row)["env"];
    assert_eq!(
        (env["GIT_AUTHOR_NAME"].clone(), env["GIT_COMMITTER_EMAIL"].clone()),
        (json!("Dev"), json!("dev@example.invalid"))
    );
}

#[test]
fn a_repository_without_a_default_branch_name_still_counts_the_work() {
    // On `develop`, no origin, no main or master: the base is the commit the task started from.
    let top = tempfile::tempdir().unwrap();
    let repo = init_repo(top.path(), "develop");
    let d = Daemon::start_in(&config(), Some(&repo));
    d.assign(1, &[], "Work\n@write a.txt done");
    let row = d.wait_state("claude-1", "completed");
    assert_eq!((row["commits"].clone(), row["changes"].clone()), (json!(1), json!(true)), "{row}");
}

#[test]
fn the_leftover_commit_runs_hooks_without_the_daemons_secrets() {
    let (top, repo) = repo_with_origin(true);
    let seen = top.path().join("hook-env.txt");
    let hook = repo.join(".git/hooks/pre-commit");
    std::fs::write(&hook, format!("#!/bin/sh\nenv > {}\n", seen.display())).unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let d = Daemon::start_in(&config(), Some(&repo));
    d.assign(1, &[], "Hooked\n@write a.txt 1");
    d.wait_state("claude-1", "completed");
    let env = std::fs::read_to_string(&seen).expect("the hook ran");
    assert!(!env.contains("ghp_daemon_secret"), "the daemon's GitHub token reached a hook: {env}");
    assert!(env.contains("GIT_AUTHOR_NAME=Dev"), "{env}");
}

#[test]
fn without_worktrees_nothing_in_the_shared_workspace_is_committed_for_the_agent() {
    let (_top, repo) = repo_with_origin(true);
    // A person's work in progress beside the agent's.
    std::fs::write(repo.join("draft.txt"), "mine").unwrap();
    let mut c = config();
    c["worktree"] = json!({ "enabled": false });
    let d = Daemon::start_in(&c, Some(&repo));
    d.assign(3, &[], "Note it\n@write notes.txt noted");
    let row = d.wait_state("claude-1", "completed");
    assert_eq!(row["worktree"], Value::Null, "{row}");
    assert_eq!(git(&repo, &["log", "-1", "--format=%s", "main"]), "first", "the person's branch is left as it was");
    assert_eq!(git(&repo, &["status", "--porcelain"]), "?? draft.txt\n?? notes.txt");
}
