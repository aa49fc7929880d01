//! `workspaces`: the worktrees autodev made, and with `prune` the removal of those that are safe to remove.

use std::path::Path;

use crate::daemon::Shared;
use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply, Reply, WorkspacesReport, WorktreeStatus};
use crate::workspace;

/// Handles `workspaces`: every worktree autodev made, and with `prune` removes those that are safe to remove
/// (no task holds them, nothing in them exists nowhere else).
pub(in crate::daemon) async fn workspaces(shared: &Shared, prune: bool) -> Result<Reply, ErrorReply> {
    let in_use: Vec<(std::path::PathBuf, String)> = shared
        .lock_table()
        .slots
        .iter()
        .filter(|s| s.is_held())
        .filter_map(|s| Some((s.task.as_ref()?.record.worktree.clone()?, s.name.clone())))
        .collect();
    let workspace = shared.workspace.clone();
    let config = shared.config.raw.worktree.clone();
    let report = tokio::task::spawn_blocking(move || -> Result<WorkspacesReport, String> {
        let Some(root) = workspace::repo_root(&workspace) else {
            return Ok(WorkspacesReport {
                repository: None,
                worktrees: Vec::new(),
                removed: Vec::new(),
                kept: Vec::new(),
            });
        };
        let user = |path: &str| {
            let canonical = std::fs::canonicalize(path).ok();
            in_use.iter().find(|(p, _)| std::fs::canonicalize(p).ok() == canonical).map(|(_, s)| s.clone())
        };
        let (mut removed, mut kept) = (Vec::new(), Vec::new());
        let mut worktrees = Vec::new();
        for info in workspace::list(&root, &config)? {
            let in_use_by = user(&info.path);
            if prune {
                match (&in_use_by, info.state.as_str()) {
                    (Some(slot), _) => kept.push(format!("{}: in use by {slot}", info.path)),
                    (None, "clean") => match workspace::remove_if_safe(&root, Path::new(&info.path)) {
                        Ok(true) => {
                            removed.push(info.path.clone());
                            continue;
                        }
                        Ok(false) => kept.push(format!("{}: holds unsaved work", info.path)),
                        Err(e) => kept.push(format!("{}: {e}", info.path)),
                    },
                    (None, state) => kept.push(format!("{}: {state}", info.path)),
                }
            }
            worktrees.push(WorktreeStatus {
                path: info.path,
                slot: info.slot,
                issue: info.issue,
                branch: info.branch,
                state: info.state,
                size_bytes: info.size_bytes,
                in_use_by,
            });
        }
        Ok(WorkspacesReport { repository: Some(root.display().to_string()), worktrees, removed, kept })
    })
    .await
    .map_err(|e| refuse(ErrorKind::Failed, format!("internal error: {e}"), None))?
    .map_err(|e| refuse(ErrorKind::Failed, e, None))?;
    Ok(Reply::Workspaces(report))
}
