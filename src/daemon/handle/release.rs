//! `release`: gives up an abandoned or waiting task (failed, or completed with `done`) and frees its slot.

use std::sync::Arc;

use super::internal;
use crate::daemon::Shared;
use crate::daemon::life::drive;
use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply, Reply, SlotState};
use crate::task::Event;

/// Handles `release`: ends an abandoned or waiting task (failed, or completed with `done`) and frees its slot.
pub(in crate::daemon) fn release(shared: &Arc<Shared>, slot: &str, done: bool) -> Result<Reply, ErrorReply> {
    let issue = {
        let table = shared.lock_table();
        let Some(s) = table.get(slot) else {
            return Err(refuse(ErrorKind::NotFound, format!("unknown slot {slot:?}"), None));
        };
        match &s.task {
            Some(t) if t.unrecorded.is_some() => {
                return Err(refuse(
                    ErrorKind::Conflict,
                    format!("slot {slot}: the end of its last run is not recorded yet (the state dir's disk is full)"),
                    Some("free some space; the slot is freed once the record is written".into()),
                ));
            }
            Some(t) if matches!(t.state(), SlotState::Abandoned | SlotState::Waiting) => t.issue(),
            Some(t) if t.is_running() => {
                return Err(refuse(
                    ErrorKind::Conflict,
                    format!("slot {slot} is running issue #{}", t.issue()),
                    Some(format!("stop it first: `autodevctl stop {slot}`")),
                ));
            }
            _ => return Err(refuse(ErrorKind::Conflict, format!("slot {slot} holds no task; it is free"), None)),
        }
    };
    drive(shared, slot, Event::Release { done }).map_err(internal)?;
    let state = shared.lock_table().get(slot).map_or(SlotState::Ready, |s| s.state());
    tracing::info!(slot, issue, state = state.as_str(), "task released");
    Ok(Reply::Released { slot: slot.to_string(), issue, state })
}
