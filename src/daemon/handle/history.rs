//! `history`: finished runs, read from history.jsonl.

use crate::daemon::Shared;
use crate::ledger;
use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply, HistoryRun, Reply};

/// Handles `history`: finished runs from history.jsonl (its last 8 MiB), newest last.
pub(in crate::daemon) async fn history(
    shared: &Shared,
    issue: Option<u64>,
    limit: Option<usize>,
) -> Result<Reply, ErrorReply> {
    let path = shared.paths.history_file();
    // Off the runtime thread: up to 8 MiB to read and parse must not hold up followers and status replies.
    let read = tokio::task::spawn_blocking(move || ledger::read_history_tail(&path, 8 << 20)).await;
    let mut runs = match read {
        Ok(Ok(runs)) => runs,
        Ok(Err(e)) => {
            let shown = shared.paths.history_file().display().to_string();
            return Err(refuse(ErrorKind::Failed, format!("cannot read {shown}: {e}"), None));
        }
        Err(e) => return Err(refuse(ErrorKind::Failed, format!("internal error: {e}"), None)),
    };
    if let Some(issue) = issue {
        runs.retain(|r| r.issue == issue);
    }
    let keep = limit.unwrap_or(50);
    let skip = runs.len().saturating_sub(keep);
    Ok(Reply::History { runs: runs.split_off(skip).into_iter().map(history_run).collect() })
}

/// A history line as the protocol shows it.
fn history_run(r: ledger::ExitRecord) -> HistoryRun {
    HistoryRun {
        run_id: r.run_id,
        task_id: r.task_id,
        slot: r.slot,
        provider: r.provider,
        issue: r.issue,
        state: r.state,
        end_cause: r.end_cause.map(|c| c.as_str().to_string()),
        reason: r.reason,
        exit_code: r.exit_code,
        signal: r.signal,
        started_at: r.started_at,
        ended_at: r.ended_at,
        duration_secs: r.duration_secs,
        session_id: r.session_id,
        cost_usd: r.cost_usd,
        turns: r.turns,
        runs: r.runs,
        branch: r.branch,
    }
}
