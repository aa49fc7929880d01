//! `stop`, and the stop of every run at shutdown: asks the running task to stop and answers once its run is over.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::internal;
use crate::daemon::Shared;
use crate::daemon::life::drive;
use crate::daemon::slots::RunSignal;
use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply, Reply, SlotState};
use crate::task::{Event, Phase, StopBy};

/// How long `stop` waits for a run to finish after SIGKILL before it answers that something is stuck.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Handles `stop` (and a shutdown's): asks the task to stop (SIGTERM, SIGKILL after the grace period) and answers
/// once the run is over.
pub(in crate::daemon) async fn stop(shared: &Arc<Shared>, slot: &str, why: StopBy) -> Result<Reply, ErrorReply> {
    let (run_id, issue, mut ended) = {
        let table = shared.lock_table();
        let Some(s) = table.get(slot) else {
            return Err(refuse(ErrorKind::NotFound, format!("unknown slot {slot:?}"), None));
        };
        let Some(task) = s.task.as_ref().filter(|t| matches!(t.record.phase, Phase::Running { .. })) else {
            let state = s.state();
            let hint = match state {
                SlotState::Abandoned => {
                    Some(format!("its run is gone already: `autodevctl resume {slot}` or `autodevctl release {slot}`"))
                }
                SlotState::Waiting => Some(format!("`autodevctl release {slot}` gives the waiting task up")),
                _ => None,
            };
            return Err(refuse(
                ErrorKind::Conflict,
                format!("slot {slot} is not running (it is {})", state.as_str()),
                hint,
            ));
        };
        if task.record.pgid.is_none() {
            return Err(refuse(ErrorKind::Failed, format!("slot {slot} has no process group on record"), None));
        }
        (task.record.run_id.clone(), task.issue(), task.signal.subscribe())
    };
    drive(shared, slot, Event::StopAsked(why)).map_err(internal)?;
    if tokio::time::timeout(shared.grace + KILL_WAIT, wait_ended(&mut ended)).await.is_err() {
        return Err(refuse(
            ErrorKind::Failed,
            format!("run {run_id} in {slot} survived SIGKILL for {KILL_WAIT:?} (stuck in the kernel?)"),
            None,
        ));
    }
    Ok(Reply::Stopped { slot: slot.to_string(), issue, run_id })
}

async fn wait_ended(rx: &mut watch::Receiver<RunSignal>) {
    // A dropped sender means the task record is gone, which only happens once the run is over.
    let _ = rx.wait_for(|s| s.ended).await;
}

/// Stops every running run (daemon shutdown); their tasks stay abandoned and resumable.
pub(in crate::daemon) async fn stop_all(shared: &Arc<Shared>, why: &str) {
    let busy: Vec<String> = shared
        .lock_table()
        .slots
        .iter()
        .filter(|s| s.task.as_ref().is_some_and(|t| matches!(t.record.phase, Phase::Running { .. })))
        .map(|s| s.name.clone())
        .collect();
    let mut stops = tokio::task::JoinSet::new();
    for slot in busy {
        let shared = shared.clone();
        let why = StopBy::Shutdown { why: format!("{why}; resume with `autodevctl resume {slot}`") };
        stops.spawn(async move {
            if let Err(e) = stop(&shared, &slot, why).await {
                tracing::warn!(slot, "stop at shutdown: {}", e.message);
            }
        });
    }
    while stops.join_next().await.is_some() {}
}
