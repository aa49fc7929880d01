//! `resume` (and automatic restarts): the next run of a held task, in the same conversation when one was captured.

use std::sync::Arc;
use std::time::SystemTime;

use super::internal;
use crate::daemon::Shared;
use crate::daemon::fleet::Claiming;
use crate::daemon::issue_sync::board_wants;
use crate::daemon::life::drive;
use crate::daemon::runs::{Refused, RunKind, start_run};
use crate::daemon::slots::Task;
use crate::github::sync::Target;
use crate::ledger::{RUN_LOCK, RunFiles, read_prompt};
use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply, Reply, SlotState};
use crate::supervisor;
use crate::task::{EndCause, Event, Verdict};

/// The longest answer a resume takes (what `assign` takes as a prompt).
const MAX_ANSWER: usize = 1 << 20;

/// Who resumes a task, which decides what the next run continues with and which rules apply.
#[derive(Debug, Clone, Copy)]
pub(in crate::daemon) enum ResumeBy<'a> {
    /// `autodevctl resume`: with an answer to the agent's question, and leave to go over the task's budget.
    Person { answer: Option<&'a str>, over_budget: bool },
    /// A reply comment on the task's issue.
    Reply(&'a str),
    /// A policy (a retry, the end of a wait, `onAbandoned: resume`); `counted` uses the restart allowance.
    Policy { counted: bool },
}

/// Handles `resume`: a new run of the slot's abandoned, waiting, failed or stopped task, in the same conversation.
pub(in crate::daemon) async fn resume(shared: &Arc<Shared>, slot: &str, by: ResumeBy<'_>) -> Result<Reply, ErrorReply> {
    let (counted, answer, over_budget) = match by {
        ResumeBy::Person { answer, over_budget } => (false, answer, over_budget),
        ResumeBy::Reply(text) => (false, Some(text), false),
        ResumeBy::Policy { counted } => (counted, None, false),
    };
    if answer.is_some_and(|a| a.trim().is_empty()) {
        return Err(refuse(ErrorKind::BadRequest, "the prompt is empty".into(), None));
    }
    if answer.is_some_and(|a| a.len() > MAX_ANSWER) {
        return Err(refuse(ErrorKind::BadRequest, format!("the prompt is over {} KiB", MAX_ANSWER >> 10), None));
    }
    let (kind, issue, previous_reason, prompt_file, branch, previous) = {
        let mut table = shared.lock_table();
        let Some(index) = table.slots.iter().position(|s| s.name == slot) else {
            return Err(refuse(ErrorKind::NotFound, format!("unknown slot {slot:?}"), None));
        };
        let Some((issue, state)) = table.slots[index].task.as_ref().map(|t| (t.issue(), t.state())) else {
            return Err(refuse(ErrorKind::Conflict, format!("slot {slot} has no task to resume (it is ready)"), None));
        };
        if table.slots[index].task.as_ref().is_some_and(|t| t.unrecorded.is_some()) {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("slot {slot}: the end of its last run is not recorded yet (the state dir's disk is full)"),
                Some("free some space; the record is written within seconds, then resume".into()),
            ));
        }
        if !matches!(state, SlotState::Abandoned | SlotState::Failed | SlotState::Waiting) {
            let hint = match state {
                SlotState::Completed => "the task completed; assign the issue again for new work",
                _ => "it is running; see `autodevctl logs` or stop it first",
            };
            return Err(refuse(
                ErrorKind::Conflict,
                format!("slot {slot} cannot be resumed: its task is {}", state.as_str()),
                Some(hint.into()),
            ));
        }
        if let Some(other) = table.holder_of(issue).filter(|s| s.name != slot) {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("issue #{issue} is now held by {}; resuming here would run two agents on it", other.name),
                None,
            ));
        }
        let provider = &table.providers[table.slots[index].provider];
        if !provider.enabled {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("LLM {:?} is disabled", provider.name),
                Some(format!("set llms.{}.enabled to true, then resume", provider.name)),
            ));
        }
        if !over_budget
            && let Some(why) =
                table.slots[index].task.as_ref().and_then(|t| crate::daemon::budget::task_over(shared, t))
        {
            return Err(refuse(
                ErrorKind::Conflict,
                why,
                Some(format!("`autodevctl resume {slot} --over-budget` to go on anyway")),
            ));
        }
        let task = table.slots[index].task.as_mut().expect("checked above");
        if let Some(pid) = task.record.pid.filter(|_| task.record.boot_id == shared.boot_id)
            && supervisor::proc_stat(pid as i32)
                .is_some_and(|s| s.state != 'Z' && Some(s.start_time) == task.record.start_time)
        {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("process {pid} of the previous run in {slot} is still alive; resuming would run it twice"),
                Some(format!("end it first (kill {pid}), then resume")),
            ));
        }
        if supervisor::run_lock_held(&task.run_dir().join(RUN_LOCK)) {
            return Err(refuse(
                ErrorKind::Conflict,
                format!("processes of the previous run in {slot} are still alive (being stopped)"),
                Some("try again in a few seconds".into()),
            ));
        }
        let run_id = ulid::Ulid::new().to_string();
        let files = RunFiles::at(shared.paths.run_dir(&run_id));
        let previous_reason = task.record.phase.reason().map(str::to_string);
        let mut record = task.record.clone();
        let previous = record.clone();
        record.over_budget |= over_budget;
        record.next_run(run_id, &files.dir, &shared.boot_id, shared.daemon_pid);
        record.on(Event::Continue { counted }, &shared.policy, SystemTime::now()).map_err(internal)?;
        let kind = match &record.session_id {
            Some(session) => RunKind::Resume(session.clone()),
            None => RunKind::Restart,
        };
        let prompt_file = record.prompt_file.clone();
        let branch = record.branch.clone();
        let comment_id = record.comment_id;
        *task = Task::starting(record);
        task.record.comment_id = comment_id;
        (kind, issue, previous_reason, prompt_file, branch, previous)
    };
    let prompt = match (&kind, answer) {
        (RunKind::Resume(_), Some(answer)) => answer_prompt(issue, answer, branch.as_deref()),
        (RunKind::Resume(_), None) => continuation_prompt(issue, previous_reason.as_deref(), branch.as_deref()),
        _ => match read_prompt(&prompt_file) {
            // No conversation to continue: the task starts over, with the answer after it.
            Ok(original) => match answer {
                Some(answer) => format!("{original}\n\n---\nYou asked a question earlier; the answer:\n\n{answer}\n"),
                None => original,
            },
            Err(reason) => {
                let _ = drive(shared, slot, Event::SpawnFailed(Verdict::new(EndCause::SpawnFailed, reason.clone())));
                return Err(refuse(ErrorKind::Failed, reason, None));
            }
        },
    };
    // The claim is taken (or found still ours) before any run starts. A person may take up a task whose claim was
    // lost once nobody holds the issue; a policy only goes on with the very claim the task recorded.
    let how = match by {
        ResumeBy::Person { .. } => Claiming::New { force: false, from_board: false },
        _ => Claiming::Continue { version: previous.claim.clone() },
    };
    if let Err(e) = crate::daemon::fleet::claim(shared, issue, slot, &how).await {
        let policy = !matches!(by, ResumeBy::Person { .. });
        if let Some(task) = shared.lock_table().get_mut(slot).and_then(|s| s.task.as_mut()) {
            *task = Task::idle(previous);
        }
        if policy && e.kind == ErrorKind::Conflict {
            // Another machine has the issue: this task ends here, writing nothing more for it.
            let _ = drive(shared, slot, Event::ClaimLost { why: e.message.clone() });
        }
        return Err(e);
    }
    match start_run(shared, slot, kind, &prompt).await {
        Ok(resumed) => {
            board_wants(shared, resumed.issue, slot, Target::InProgress, false);
            Ok(Reply::Resumed(resumed))
        }
        Err(Refused::NotStarted(e)) => {
            // Nothing ran: the task stays as it was (abandoned, waiting, failed), its lockfile untouched.
            if let Some(task) = shared.lock_table().get_mut(slot).and_then(|s| s.task.as_mut()) {
                *task = Task::idle(previous);
            }
            Err(e)
        }
        Err(Refused::Ended(e)) => Err(e),
    }
}

/// The message a conversation continues with after a person answered the agent's question.
fn answer_prompt(issue: u64, answer: &str, branch: Option<&str>) -> String {
    let on = branch.map(|b| format!(" You are still on branch {b}.")).unwrap_or_default();
    format!("A person answered your question on issue #{issue}:\n\n{answer}\n\nContinue the task with this answer.{on}")
}

/// The message a resumed conversation continues with.
fn continuation_prompt(issue: u64, reason: Option<&str>, branch: Option<&str>) -> String {
    let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
    let on = branch.map(|b| format!(" You are still on branch {b}; keep committing there.")).unwrap_or_default();
    format!(
        "Your previous run on issue #{issue} was interrupted{why}. Continue the task from where you stopped: first \
         check the state of the working directory (files you changed, commands that may not have finished), then \
         carry on until the task is done.{on}"
    )
}
