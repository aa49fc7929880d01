//! The next run of a task whose wait is over (a retry's backoff, a usage limit, a stale run stopped to run again):
//! in its own slot and conversation, or, when the trouble came from the LLM's service and `retry.fallback` names
//! another LLM, in a free slot of that LLM (a new conversation there, from the original prompt).

use std::sync::Arc;
use std::time::SystemTime;

use super::Shared;
use super::handle::{ResumeBy, resume};
use super::life::drive;
use super::runs::{RunKind, start_run};
use super::slots::Task;
use crate::ledger::{RunFiles, read_prompt};
use crate::task::{EndCause, Event, Phase, Verdict, WaitFor};

/// Starts the next run of the waiting task of `slot`. Whatever stops it from starting ends the task with the
/// reason, never leaves it waiting for nothing.
pub(super) async fn start_next(shared: &Arc<Shared>, slot: &str, fallback: bool) {
    let (own_enabled, counted) = {
        let table = shared.lock_table();
        let Some(s) = table.get(slot) else { return };
        let counted = !matches!(
            s.task.as_ref().map(|t| &t.record.phase),
            Some(Phase::Waiting { waiting_for: WaitFor::UsageLimit, .. })
        );
        (table.providers[s.provider].enabled && !s.extra, counted)
    };
    let outcome = if fallback || !own_enabled {
        match move_to_fallback(shared, slot).await {
            Err(why) if own_enabled => {
                tracing::info!(slot, "{why}; retrying in its own slot");
                resume(shared, slot, ResumeBy::Policy { counted }).await.map(drop).map_err(|e| e.message)
            }
            other => other,
        }
    } else {
        resume(shared, slot, ResumeBy::Policy { counted }).await.map(drop).map_err(|e| e.message)
    };
    if let Err(why) = outcome {
        tracing::warn!(slot, "the next run could not start: {why}");
        // Still waiting (nothing started): give it up with the reason rather than wait for nothing.
        let waiting = shared.lock_table().get(slot).is_some_and(|s| s.state() == crate::protocol::SlotState::Waiting);
        if waiting {
            let _ = drive(shared, slot, Event::GiveUp { reason: format!("the next run could not start: {why}") });
        }
    }
}

/// Moves the task to a free slot of the first `retry.fallback` LLM that has one and starts it there.
async fn move_to_fallback(shared: &Arc<Shared>, slot: &str) -> Result<(), String> {
    // The prompt is read first: nothing is reserved for a task that cannot start.
    let prompt_file = shared.lock_table().get(slot).and_then(|s| s.task.as_ref()).map(|t| t.record.prompt_file.clone());
    let prompt = read_prompt(&prompt_file.ok_or_else(|| format!("slot {slot} has no task"))?)?;
    let target = {
        let mut table = shared.lock_table();
        let free = shared.config.raw.retry.fallback.iter().find_map(|name| {
            let p = table.providers.iter().position(|p| &p.name == name && p.enabled)?;
            table.slots.iter().position(|s| s.provider == p && !s.extra && !s.is_held())
        });
        let Some(target) = free else {
            return Err(format!("no free slot for the task of {slot} on any fallback LLM"));
        };
        let Some(old) = table.get(slot).and_then(|s| s.task.as_ref()).map(|t| t.record.clone()) else {
            return Err(format!("slot {slot} has no task"));
        };
        let run_id = ulid::Ulid::new().to_string();
        let files = RunFiles::at(shared.paths.run_dir(&run_id));
        let name = table.slots[target].name.clone();
        let mut record = old;
        record.slot = name.clone();
        record.next_run(run_id, &files.dir, &shared.boot_id, shared.daemon_pid);
        // Another LLM: a new conversation there.
        record.session_id = None;
        record.provider = table.providers[table.slots[target].provider].name.clone();
        record.on(Event::Continue { counted: true }, &shared.policy, SystemTime::now()).map_err(|e| e.to_string())?;
        table.slots[target].task = Some(Task::starting(record));
        name
    };
    let issue = shared.lock_table().get(&target).and_then(|s| s.task.as_ref()).map(|t| t.issue()).unwrap_or(0);
    tracing::info!(from = slot, to = %target, issue, "task moved to a fallback LLM");
    // The old slot lets go of the task (its run's end is in the history already); the new one holds it.
    let _ = drive(shared, slot, Event::GiveUp { reason: format!("moved to {target} (retry on a fallback LLM)") });
    let how = super::fleet::Claiming::Continue { version: super::fleet::recorded(shared, &target) };
    let claimed = super::fleet::claim(shared, issue, &target, &how).await;
    let started = match claimed {
        Ok(()) => start_run(shared, &target, RunKind::Restart, &prompt).await,
        Err(e) => Err(super::runs::Refused::NotStarted(e)),
    };
    match started {
        Ok(started) => {
            // The board named the old slot, which was ours: take it over.
            super::issue_sync::board_wants(
                shared,
                started.issue,
                &target,
                crate::github::sync::Target::InProgress,
                true,
            );
            Ok(())
        }
        Err(e) => {
            let e = crate::protocol::ErrorReply::from(e);
            // The task must not vanish between slots: if the run never started, it ends where it is, recorded.
            let starting =
                shared.lock_table().get(&target).is_some_and(|s| s.state() == crate::protocol::SlotState::Starting);
            if starting {
                // Another machine holds the issue: ended as a lost claim (nothing written for it), not a failure.
                let event = if e.kind == crate::protocol::ErrorKind::Conflict && shared.fleet.is_some() {
                    Event::ClaimLost { why: e.message.clone() }
                } else {
                    Event::SpawnFailed(Verdict::new(EndCause::SpawnFailed, e.message.clone()))
                };
                let _ = drive(shared, &target, event);
            }
            tracing::warn!(slot = %target, "{}", e.message);
            Ok(())
        }
    }
}
