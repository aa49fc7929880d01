//! `history`: finished runs, read from history.jsonl.

use crate::daemon::Shared;
use crate::ledger;
use crate::protocol::refuse;
use crate::protocol::{ErrorKind, ErrorReply, HistoryRun, Reply, SumBy, SumRow};
use crate::timefmt::{local_day, parse_rfc3339};

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

/// Handles `history --sum`: the runs of the history's last 8 MiB, added up (by issue, LLM or local day).
pub(in crate::daemon) async fn history_sum(
    shared: &Shared,
    issue: Option<u64>,
    by: Option<SumBy>,
) -> Result<Reply, ErrorReply> {
    let path = shared.paths.history_file();
    let read = tokio::task::spawn_blocking(move || ledger::read_history_tail(&path, 8 << 20)).await;
    let runs = match read {
        Ok(Ok(runs)) => runs,
        Ok(Err(e)) => return Err(refuse(ErrorKind::Failed, format!("cannot read the history: {e}"), None)),
        Err(e) => return Err(refuse(ErrorKind::Failed, format!("internal error: {e}"), None)),
    };
    let runs = crate::daemon::budget::last_record_per_run(runs);
    Ok(Reply::HistorySum { rows: sum_runs(runs.iter().filter(|r| issue.is_none_or(|i| r.issue == i)), by) })
}

/// Adds runs up, in the order their keys first appear (days and issues come oldest first).
pub fn sum_runs<'a>(runs: impl Iterator<Item = &'a ledger::ExitRecord>, by: Option<SumBy>) -> Vec<SumRow> {
    let mut rows: Vec<SumRow> = Vec::new();
    for r in runs {
        let key = match by {
            None => "all".to_string(),
            Some(SumBy::Issue) => format!("#{}", r.issue),
            Some(SumBy::Llm) => r.provider.clone(),
            Some(SumBy::Day) => parse_rfc3339(&r.ended_at).map_or_else(|| "?".into(), local_day),
        };
        let row = match rows.iter().position(|row| row.key == key) {
            Some(i) => &mut rows[i],
            None => {
                rows.push(SumRow { key, ..SumRow::default() });
                rows.last_mut().expect("just pushed")
            }
        };
        row.runs += 1;
        match r.cost_usd {
            Some(cost) => row.cost_usd += cost,
            None => row.runs_without_cost += 1,
        }
        row.cost_estimated |= r.cost_estimated;
        if let Some(tokens) = r.tokens {
            row.tokens.add(tokens);
        }
        row.duration_secs += r.duration_secs;
    }
    rows
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
        cost_estimated: r.cost_estimated,
        tokens: r.tokens,
        turns: r.turns,
        runs: r.runs,
        branch: r.branch,
    }
}
