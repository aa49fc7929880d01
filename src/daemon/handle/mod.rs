//! The control socket's requests, one file per request (pueue's shape). A handler checks the request's own rules
//! and says what is wrong to the client; it changes a task only by sending events (`life::drive`) and starting
//! runs (`runs`), never by setting a state.

mod assign;
mod history;
mod progress;
mod release;
mod resume;
mod signal;
mod stop;
mod workspaces;

pub(super) use assign::{How, assign};
pub(super) use history::{history, history_sum};
pub(super) use progress::progress;
pub(super) use release::release;
pub(super) use resume::{ResumeBy, resume};
pub(super) use signal::signal;
pub(super) use stop::{stop, stop_all};
pub(super) use workspaces::workspaces;

use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply};

/// An event the task's phase refused although the handler's checks allowed it: a bug, said as one.
fn internal(e: crate::task::Illegal) -> ErrorReply {
    refuse(ErrorKind::Failed, format!("internal error: {e}"), None)
}
