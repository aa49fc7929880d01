//! `signal` from inside a run: the agent says it needs a person's answer or is blocked (the seed's
//! AUTONOMOUS_SIGNAL markers say the same from its messages).

use std::sync::Arc;

use super::progress::from_inside;
use crate::daemon::Shared;
use crate::daemon::life::drive;
use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply, Reply};
use crate::task::{AgentSignal, Event};

/// Handles `signal`: taken only from a process of the slot's current run, as `progress` is.
pub(in crate::daemon) fn signal(
    shared: &Arc<Shared>,
    slot: &str,
    run_id: &str,
    signal: AgentSignal,
    peer: Option<i32>,
) -> Result<Reply, ErrorReply> {
    let inside = {
        let table = shared.lock_table();
        table.get(slot).and_then(|s| s.task.as_ref()).is_some_and(|t| from_inside(shared, t, run_id, peer))
    };
    if !inside {
        return Err(refuse(
            ErrorKind::Conflict,
            format!("a signal for {slot} is only taken from inside its run (autodevctl signal, run by the agent)"),
            None,
        ));
    }
    let signal = match signal {
        AgentSignal::NeedsInfo { question } if question.trim().is_empty() => {
            return Err(refuse(ErrorKind::BadRequest, "the question is empty".into(), None));
        }
        AgentSignal::Blocked { why } | AgentSignal::Failed { why } if why.trim().is_empty() => {
            return Err(refuse(ErrorKind::BadRequest, "say why (the reason is empty)".into(), None));
        }
        AgentSignal::NeedsInfo { question } => AgentSignal::NeedsInfo { question: bounded(&question) },
        AgentSignal::Blocked { why } => AgentSignal::Blocked { why: bounded(&why) },
        AgentSignal::Failed { why } => AgentSignal::Failed { why: bounded(&why) },
        other => other,
    };
    drive(shared, slot, Event::Signal(signal))
        .map_err(|e| refuse(ErrorKind::Conflict, format!("slot {slot}: {e}"), None))?;
    Ok(Reply::SignalNoted { slot: slot.to_string() })
}

/// A question or reason as it is kept: at most 2000 characters.
fn bounded(text: &str) -> String {
    text.trim().chars().take(2000).collect()
}
