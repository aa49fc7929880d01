//! `progress` from inside a run: the agent's own report of how far it is, taken only from a process of that run.

use std::sync::Arc;
use std::time::SystemTime;

use crate::daemon::Shared;
use crate::daemon::life::drive;
use crate::daemon::slots::Task;
use crate::ledger::RUN_LOCK;
use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply, Reply, SlotState};
use crate::supervisor;
use crate::task::Event;

/// Whether `peer` is a process of the task's current run `run_id`, which is running: it holds the run lock, or
/// is in the run's process group. What an agent says of its own run is taken only from there.
pub(super) fn from_inside(shared: &Shared, task: &Task, run_id: &str, peer: Option<i32>) -> bool {
    if task.record.run_id != run_id || !task.is_running() {
        return false;
    }
    let lock = shared.paths.run_dir(run_id).join(RUN_LOCK);
    peer.is_some_and(|pid| {
        supervisor::holds_run_lock(pid, &lock)
            || supervisor::proc_stat(pid).is_some_and(|s| Some(s.pgrp as u32) == task.record.pgid)
    })
}

/// Handles `progress` from inside a run: only a process of that run (holding its run lock, or in its process
/// group) may report for it.
pub(in crate::daemon) fn progress(
    shared: &Arc<Shared>,
    slot: &str,
    run_id: &str,
    percent: u8,
    message: &str,
    peer: Option<i32>,
) -> Result<Reply, ErrorReply> {
    let mut table = shared.lock_table();
    let refused = || {
        refuse(
            ErrorKind::Conflict,
            format!("progress for {slot} is only taken from inside its run (autodevctl progress, run by the agent)"),
            None,
        )
    };
    let Some(task) = table.get_mut(slot).and_then(|s| s.task.as_mut()) else { return Err(refused()) };
    if !from_inside(shared, task, run_id, peer) {
        return Err(refused());
    }
    task.health.progress = Some(percent.min(100));
    task.health.progress_message = Some(crate::output::clean_line(message.as_bytes(), 200));
    task.health.last_progress_at = Some(SystemTime::now());
    let revived = task.state() == SlotState::Stale;
    task.signal.send_modify(|s| s.batches += 1);
    drop(table);
    shared.changed();
    if revived {
        let _ = drive(shared, slot, Event::Alive);
    }
    Ok(Reply::ProgressNoted { slot: slot.to_string(), percent: percent.min(100) })
}
