//! Runs that go on after a failure: retries (own slot first, a fallback LLM on service trouble) with growing
//! backoff, and the resume of a task that waited out a usage limit.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Shared;
use super::issue_sync::board_wants;
use super::runs::{RunKind, refuse, resume, start_run};
use super::slots::Task;
use crate::github::sync::Target;
use crate::ledger::{ExitRecord, RunFiles};
use crate::protocol::{ErrorKind, ErrorReply, SlotState};
use crate::timefmt::rfc3339;

/// With a policy that resumes (`onAbandoned: resume`, or `retry.maxAttempts` > 1), resumes a rate-limited task
/// once its limit has reset.
pub(super) fn resume_after_limit(shared: &Arc<Shared>, slot: &str, run_id: &str, until: SystemTime) {
    let config = &shared.config.raw;
    if config.supervisor.on_abandoned != crate::config::OnAbandoned::Resume && config.retry.max_attempts <= 1 {
        return;
    }
    let wait = until.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(1);
    later(shared, slot, run_id, SlotState::Abandoned, wait, |shared, slot| async move {
        resume(&shared, &slot, true).await.map(drop)
    });
}

/// After `wait`, runs `then` on the slot's task, but only if it is still run `run_id` in `state`: a resume, a
/// release or a new assignment meanwhile wins.
pub(super) fn later<F, Fut>(shared: &Arc<Shared>, slot: &str, run_id: &str, state: SlotState, wait: Duration, then: F)
where
    F: FnOnce(Arc<Shared>, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), ErrorReply>> + Send,
{
    let (shared, slot, run_id) = (shared.clone(), slot.to_string(), run_id.to_string());
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        let unchanged = shared
            .lock_table()
            .get(&slot)
            .and_then(|s| s.task.as_ref())
            .is_some_and(|t| t.record.run_id == run_id && t.state == state);
        if unchanged && let Err(e) = then(shared.clone(), slot.clone()).await {
            tracing::warn!(slot, "{}", e.message);
        }
    });
}

/// Whether a failure came from the LLM's service rather than the task.
pub(super) fn provider_trouble(reason: &str) -> bool {
    let r = reason.to_lowercase();
    ["api error", "overloaded", "quota", "rate limit", "usage limit", "529", "503", "502"].iter().any(|n| r.contains(n))
}

/// Errors a retry cannot fix: the same run would fail the same way.
pub(super) fn retryable(reason: &str) -> bool {
    let r = reason.to_lowercase();
    ![
        "command not found",
        "cannot be run",
        "401",
        "unauthorized",
        "authentication",
        "api key",
        "not logged in",
        "invalid config",
        "working directory",
    ]
    .iter()
    .any(|needle| r.contains(needle))
}

/// After a run failed by itself: if `retry.maxAttempts` allows another run and the error is one a retry can fix,
/// retries the task after a growing backoff. Returns whether a retry is coming.
pub(super) fn schedule_retry(shared: &Arc<Shared>, exit: &ExitRecord) -> bool {
    let policy = &shared.config.raw.retry;
    let attempts = exit.runs.len() as u32;
    if attempts >= policy.max_attempts || !retryable(exit.reason.as_deref().unwrap_or_default()) {
        return false;
    }
    let wait = Duration::from_secs_f64(policy.backoff_secs * f64::from(1u32 << (attempts - 1).min(10)));
    tracing::info!(slot = %exit.slot, "retrying the task in {wait:?} (attempt {} of {})", attempts + 1, policy.max_attempts);
    later(shared, &exit.slot, &exit.run_id, SlotState::Failed, wait, |shared, slot| async move {
        retry(&shared, &slot).await
    });
    true
}

/// Retries the failed task of `slot`: in its own slot (same conversation) if its LLM is enabled, else in a free
/// slot of the first `retry.fallback` LLM that has one (a new conversation there, from the original prompt).
pub(super) async fn retry(shared: &Arc<Shared>, slot: &str) -> Result<(), ErrorReply> {
    let recent_restarts = {
        let table = shared.lock_table();
        let Some(task) = table.get(slot).and_then(|s| s.task.as_ref()) else {
            return Err(refuse(ErrorKind::NotFound, format!("slot {slot} has no task"), None));
        };
        let since = SystemTime::now() - Duration::from_secs(300);
        task.record.auto_resumes.iter().filter_map(|t| crate::timefmt::parse_rfc3339(t)).filter(|t| *t > since).count()
    };
    if recent_restarts >= 3 {
        return Err(refuse(
            ErrorKind::Conflict,
            format!("{slot}: 3 automatic restarts in 5 minutes already; left failed"),
            None,
        ));
    }
    let (own_enabled, provider_trouble) = {
        let table = shared.lock_table();
        let own = table.get(slot).is_some_and(|s| table.providers[s.provider].enabled && !s.extra);
        let reason = table.get(slot).and_then(|s| s.task.as_ref()).and_then(|t| t.reason.clone()).unwrap_or_default();
        (own, provider_trouble(&reason))
    };
    // Trouble with the LLM's service itself (API errors, overload, quota) goes to a fallback LLM first.
    let fallback_first = provider_trouble && !shared.config.raw.retry.fallback.is_empty();
    if own_enabled && !fallback_first {
        return resume(shared, slot, true).await.map(drop);
    }
    // Move the task to a fallback LLM's free slot. The prompt is read first: nothing is reserved for a task
    // that cannot start.
    let prompt_file = shared.lock_table().get(slot).and_then(|s| s.task.as_ref()).map(|t| t.record.prompt_file.clone());
    let Some(prompt_file) = prompt_file else {
        return Err(refuse(ErrorKind::NotFound, format!("slot {slot} has no task"), None));
    };
    let prompt = std::fs::read_to_string(&prompt_file).map_err(|e| {
        refuse(
            ErrorKind::Failed,
            format!("cannot read the task's original prompt {}: {e}", prompt_file.display()),
            None,
        )
    })?;
    let moved = {
        let mut table = shared.lock_table();
        let fallback = shared.config.raw.retry.fallback.iter().find_map(|name| {
            let p = table.providers.iter().position(|p| &p.name == name && p.enabled)?;
            table.slots.iter().position(|s| s.provider == p && !s.extra && !s.is_held())
        });
        let Some(target) = fallback else {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("no free slot for the task of {slot} on any fallback LLM"),
                None,
            ));
        };
        let Some(old) = table.get(slot).and_then(|s| s.task.as_ref()).map(|t| t.record.clone()) else {
            return Err(refuse(ErrorKind::NotFound, format!("slot {slot} has no task"), None));
        };
        let run_id = ulid::Ulid::new().to_string();
        let files = RunFiles::at(shared.paths.run_dir(&run_id));
        let name = table.slots[target].name.clone();
        let mut record = old;
        record.slot = name.clone();
        record.next_run(run_id, &files, &shared.boot_id, shared.daemon_pid);
        // Another LLM: a new conversation there.
        record.session_id = None;
        record.auto_resumes.push(rfc3339(SystemTime::now()));
        let issue = record.issue;
        record.provider = table.providers[table.slots[target].provider].name.clone();
        table.slots[target].task = Some(Task::starting(record));
        (name, issue)
    };
    let (target, issue) = moved;
    tracing::info!(from = slot, to = %target, issue, "task moved to a fallback LLM");
    let started = start_run(shared, &target, RunKind::Restart, &prompt).await?;
    // The board still names the old slot, which was ours: take it over.
    board_wants(shared, started.issue, &target, Target::InProgress, true);
    Ok(())
}
