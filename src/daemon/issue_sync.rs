//! What the daemon reads from and tells GitHub around a run: issue intake before a slot is taken, the board's
//! wishes (for the reconciler), and the status comment (for the comment worker).

use std::time::Duration;

use super::Shared;
use crate::github::sync::Target;
use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply};

/// Reads the issue from GitHub when the task comes from it, or when the board must be checked: a closed issue, a
/// label rule, or an Assigned Instance someone else set refuses the assignment (`force` overrides the last two).
/// With a prompt given, GitHub being unreachable does not stop the assignment (the reconciler checks again before
/// it writes anything).
pub(super) async fn intake(
    shared: &Shared,
    issue: u64,
    need_text: bool,
    force: bool,
) -> Result<Option<crate::github::board::IssueView>, ErrorReply> {
    let gh = match &shared.github {
        Ok(gh) => gh,
        Err(why) if need_text => {
            return Err(refuse(
                ErrorKind::Failed,
                format!("cannot take issue #{issue} from GitHub: {why}"),
                Some("or give the task with --prompt / --prompt-file".into()),
            ));
        }
        Err(_) => return Ok(None),
    };
    if !need_text && !gh.sync_enabled {
        return Ok(None);
    }
    let mut wait = Duration::from_secs_f64(shared.config.raw.github.timeout_secs);
    if !need_text {
        // Only a check with a prompt in hand: a slow GitHub must not hold the assignment up (the reconciler checks
        // again before it writes).
        wait = wait.min(Duration::from_secs(3));
    }
    let view = match tokio::time::timeout(wait, gh.reconciler.read_issue(issue)).await {
        Ok(Ok(view)) => view,
        failure if need_text => {
            let why = match failure {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {wait:?}"),
            };
            return Err(refuse(
                ErrorKind::Failed,
                format!("cannot fetch issue #{issue} of {}/{}: {why}", gh.owner, gh.repo),
                Some("check `autodevctl project status`, or give the task with --prompt".into()),
            ));
        }
        failure => {
            tracing::warn!(issue, "could not check the board before assigning ({failure:?}); the reconciler will");
            return Ok(None);
        }
    };
    if need_text && !view.open {
        return Err(refuse(ErrorKind::Conflict, format!("issue #{issue} is closed"), None));
    }
    let rules = &shared.config.raw.github;
    if need_text && !force {
        if let Some(label) = view.labels.iter().find(|l| rules.exclude_labels.contains(l)) {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("issue #{issue} has the label {label:?}, which github.excludeLabels excludes"),
                Some("--force to assign it anyway".into()),
            ));
        }
        if !rules.labels.is_empty() && !view.labels.iter().any(|l| rules.labels.contains(l)) {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("issue #{issue} has none of the labels github.labels asks for ({})", rules.labels.join(", ")),
                Some("--force to assign it anyway".into()),
            ));
        }
    }
    if gh.sync_enabled
        && !force
        && let Some(other) = view.item.as_ref().and_then(|i| i.assigned.clone())
    {
        return Err(refuse(
            ErrorKind::Conflict,
            format!("issue #{issue} is assigned to {other:?} on the project board (Assigned Instance)"),
            Some("--force to take it over".into()),
        ));
    }
    gh.reconciler.hint(view.clone());
    Ok(Some(view))
}

/// Asks for the task's status comment to show the slot as it is now (when status comments are on). `urgent`: a
/// state change, written at once; otherwise within `statusComments.intervalSecs`.
pub(super) fn comment(shared: &Shared, slot: &str, urgent: bool) {
    let Ok(gh) = &shared.github else { return };
    let Some(comments) = &gh.comments else { return };
    let snapshot = {
        let table = shared.lock_table();
        let Some(s) = table.get(slot) else { return };
        let Some(t) = s.task.as_ref() else { return };
        let snapshot = crate::github::comments::Snapshot {
            task_id: t.record.task_id.clone(),
            issue: t.issue(),
            title: t.record.title.clone().unwrap_or_default(),
            row: table.status_row(s, &shared.policy.allowance),
            urgent,
        };
        (snapshot, t.record.comment_id)
    };
    comments.update(snapshot.0, snapshot.1);
}

/// Keeps the comment ids the comment worker found or made with their tasks (in the lockfile too), so a restart
/// edits the same comment.
pub(super) fn remember_comments(shared: &Shared) {
    let Ok(gh) = &shared.github else { return };
    let Some(comments) = &gh.comments else { return };
    for (task_id, id) in comments.take_learned() {
        let lock = {
            let mut table = shared.lock_table();
            let task = table.slots.iter_mut().filter_map(|s| s.task.as_mut()).find(|t| t.record.task_id == task_id);
            match task {
                Some(t) if t.record.comment_id != Some(id) => {
                    t.record.comment_id = Some(id);
                    t.holds_slot().then(|| t.record.clone())
                }
                _ => None,
            }
        };
        if let Some(lock) = lock
            && let Err(e) = shared.write_lock(&lock)
        {
            tracing::warn!(slot = %lock.slot, "cannot record the status comment id: {e}");
        }
    }
}

/// Tells the board reconciler what the board should say (when project sync is on).
pub(super) fn board_wants(shared: &Shared, issue: u64, slot: &str, target: Target, takeover: bool) {
    if let Ok(gh) = &shared.github
        && gh.sync_enabled
    {
        // With the fleet on, Assigned Instance says which machine too: `claude-1@build-2`.
        gh.reconciler.want(issue, &shared.instance(slot), target, takeover);
    }
}
