//! Human-readable tables for `status` and `instances`.

use std::fmt::Write;

use crate::protocol::{ProjectReport, ProviderUsage, SlotState, SlotStatus, StatusReport, WorkspacesReport};
use crate::timefmt::{age, parse_rfc3339, short_duration};

/// Width of the ACTIVITY column's text.
const ACTIVITY_CHARS: usize = 72;

fn ago(stamp: Option<&str>) -> String {
    stamp.and_then(parse_rfc3339).map_or_else(|| "-".into(), |t| format!("{} ago", short_duration(age(t))))
}

fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// What a row says the slot is doing: the failure or result for a finished task, else the last preview line.
fn activity(row: &SlotStatus) -> String {
    let text = match row.state {
        SlotState::Completed | SlotState::Failed | SlotState::Abandoned => {
            let cause = row.end_cause.as_deref().filter(|c| *c != "succeeded");
            let said = match (cause, &row.reason) {
                (Some(c), Some(r)) => Some(format!("{c}: {r}")),
                (Some(c), None) => Some(c.to_string()),
                (None, r) => r.clone(),
            };
            match row.pr.as_ref().and_then(|pr| pr.number) {
                Some(number) => Some(format!("PR #{number} · {}", said.unwrap_or_default())),
                None => said,
            }
        }
        SlotState::Waiting => {
            let what = row.waiting_for.as_deref().unwrap_or("?").replace('_', " ");
            let until = row.waiting_until.as_deref().map(|u| format!(" until {u}")).unwrap_or_default();
            Some(format!("waiting for {what}{until}: {}", row.reason.as_deref().unwrap_or("")))
        }
        _ => match &row.rate_limited_until {
            Some(until) => Some(format!("rate limited until {until}")),
            // The agent's last line, not what its CLI printed to stderr (gemini's warnings, stack traces).
            None => row.progress_message.clone().or_else(|| {
                let agent = row.console_preview.iter().rev().find(|l| !l.starts_with(crate::protocol::STDERR_MARK));
                agent.or(row.console_preview.last()).cloned()
            }),
        },
    };
    let text = match &row.held_elsewhere {
        Some(holder) => format!("held by {holder}: {}", text.unwrap_or_default()),
        None => text.unwrap_or_default(),
    };
    cut(&text, ACTIVITY_CHARS)
}

pub fn status(report: &StatusReport, with_preview: bool) -> String {
    let count = |state: SlotState| report.slots.iter().filter(|s| s.state == state).count();
    let mut parts = vec![format!("{} slots", report.slots.len())];
    for state in [
        SlotState::InProgress,
        SlotState::Stale,
        SlotState::Starting,
        SlotState::Waiting,
        SlotState::Abandoned,
        SlotState::Failed,
        SlotState::Completed,
        SlotState::Ready,
    ] {
        let n = count(state);
        if n > 0 {
            parts.push(format!("{n} {}", state.as_str().replace('_', " ")));
        }
    }
    if !report.queued.is_empty() {
        parts.push(format!("{} queued", report.queued.len()));
    }
    if report.autopilot {
        parts.push("autopilot on".into());
    }
    let mut out = String::new();
    let _ = writeln!(out, "{}   (autodevd pid {})", parts.join(" · "), report.daemon_pid);
    let _ = writeln!(out, "{}", overall(&report.summary));
    if let Some(fleet) = &report.fleet {
        let _ = writeln!(out, "{}", fleet_line(fleet));
    }
    for warning in &report.warnings {
        let _ = writeln!(out, "! {warning}");
    }
    let header =
        ["SLOT", "STATE", "ISSUE", "PID", "RUNNING", "HEARTBEAT", "CPU", "MEM", "PROGRESS", "BRANCH", "ACTIVITY"];
    let rows: Vec<[String; 11]> = report
        .slots
        .iter()
        .map(|r| {
            let running = match (&r.started_at, r.state.is_running()) {
                (Some(s), true) => parse_rfc3339(s).map_or("-".into(), |t| short_duration(age(t))),
                _ => "-".into(),
            };
            [
                r.slot.clone(),
                r.state.as_str().to_string(),
                r.issue.map_or("-".into(), |i| format!("#{i}")),
                r.pid.map_or("-".into(), |p| p.to_string()),
                running,
                if r.state.is_running() { ago(r.heartbeat_at.as_deref()) } else { "-".into() },
                r.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%")),
                r.memory_mb.map_or("-".into(), |m| format!("{m:.0}M")),
                r.progress.map_or("-".into(), |p| format!("{p}%")),
                r.branch.as_deref().map_or("-".into(), |b| cut(b, 32)),
                activity(r),
            ]
        })
        .collect();
    let widths = widths_of(&header, &rows);
    let line = |cells: &[String]| padded(cells, &widths);
    let _ = writeln!(out, "{}", line(&header.map(String::from)));
    for (row, slot) in rows.iter().zip(&report.slots) {
        let _ = writeln!(out, "{}", line(row));
        if with_preview && let Some(worktree) = &slot.worktree {
            let _ = writeln!(out, "    ⎇ {} in {worktree}", slot.branch.as_deref().unwrap_or("?"));
        }
        if with_preview && let Some(pr) = &slot.pr {
            let what = match (pr.number, &pr.url) {
                (Some(n), Some(url)) => format!("pull request #{n} {url}"),
                (Some(n), None) => format!("pull request #{n}"),
                _ => "pull request".to_string(),
            };
            let note = pr.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
            let _ = writeln!(out, "    ⇄ {what}{note}");
        }
        if with_preview && !slot.console_preview.is_empty() {
            for p in &slot.console_preview {
                let _ = writeln!(out, "    │ {p}");
            }
        }
    }
    out
}

pub fn instances(providers: &[ProviderUsage]) -> String {
    let mut out = String::new();
    for p in providers {
        if !p.enabled {
            let _ = writeln!(out, "{:<10} disabled", p.provider);
            continue;
        }
        let held: Vec<String> = p.slots.iter().filter_map(|s| s.issue.map(|i| format!("#{i} ({})", s.slot))).collect();
        let held = if held.is_empty() { "-".to_string() } else { held.join(", ") };
        let _ = writeln!(out, "{:<10} {}/{}   {held}", p.provider, p.used, p.max);
    }
    out
}

fn human_size(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
        _ => format!("{:.1} GiB", bytes as f64 / 1_073_741_824.0),
    }
}

pub fn workspaces(report: &WorkspacesReport) -> String {
    let mut out = String::new();
    let Some(repo) = &report.repository else {
        return "the workspace is not a git repository: runs work in it directly, without worktrees\n".into();
    };
    let _ = writeln!(out, "{} worktree(s) of {repo}", report.worktrees.len());
    for w in &report.worktrees {
        let issue = w.issue.map_or("-".into(), |i| format!("#{i}"));
        let used = w.in_use_by.as_deref().map_or(String::new(), |s| format!("  (in use by {s})"));
        let _ = writeln!(
            out,
            "{:<10} {:<6} {:<12} {:>10}  {}  {}{used}",
            w.slot.as_deref().unwrap_or("-"),
            issue,
            w.state,
            human_size(w.size_bytes),
            w.branch.as_deref().unwrap_or("(detached)"),
            w.path
        );
    }
    for r in &report.removed {
        let _ = writeln!(out, "removed {r}");
    }
    for k in &report.kept {
        let _ = writeln!(out, "kept    {k}");
    }
    out
}

pub fn project(report: &ProjectReport, verbose: bool) -> String {
    let mut out = String::new();
    if let Some(why) = &report.github_off {
        let _ = writeln!(out, "✗ GitHub is off: {why}");
        return out;
    }
    let _ = writeln!(out, "repository  {}", report.repository.as_deref().unwrap_or("?"));
    let _ = writeln!(out, "token       from {}", report.token_source.as_deref().unwrap_or("?"));
    let _ =
        writeln!(out, "scopes      {}", report.scopes.as_deref().unwrap_or("(not reported: a fine-grained token?)"));
    if !report.project_enabled {
        let _ = writeln!(out, "project     sync off (project.enabled is false)");
    } else {
        let number = report.project_number.map_or("?".into(), |n| format!("#{n}"));
        let _ = writeln!(
            out,
            "project     {number} {}",
            report.project_title.as_deref().map_or(String::new(), |t| format!("{t:?}"))
        );
        for f in &report.fields {
            let _ = write!(out, "  field     {:?} ({})", f.name, f.data_type);
            if verbose && !f.options.is_empty() {
                let _ = write!(out, ": {}", f.options.join(", "));
            }
            let _ = writeln!(out);
        }
        for m in &report.missing_fields {
            let _ = writeln!(out, "✗ missing   field {m:?}: create it on the board, or fix its name in the config");
        }
    }
    if let Some(e) = &report.project_error {
        let _ = writeln!(out, "✗ error     {e}");
    }
    if report.pending.is_empty() {
        let _ = writeln!(out, "pending     nothing: the board is up to date");
    }
    for p in &report.pending {
        let tries = if p.attempts > 0 { format!(", {} attempt(s)", p.attempts) } else { String::new() };
        let _ = writeln!(out, "pending     #{} → {} for {} (since {}{tries})", p.issue, p.target, p.slot, p.since);
    }
    if let Some(e) = &report.last_error {
        let _ = writeln!(out, "last error  {} ({})", e, report.last_error_at.as_deref().unwrap_or("?"));
    }
    let _ = writeln!(out, "requests    {} to GitHub since autodevd started", report.requests);
    out
}

pub fn history(runs: &[crate::protocol::HistoryRun]) -> String {
    let mut out = String::new();
    if runs.is_empty() {
        return "no finished runs yet\n".into();
    }
    let _ = writeln!(
        out,
        "{:<20}  {:<10} {:<6} {:<10} {:<14} {:>8} {:>7} {:>7}  REASON",
        "ENDED", "SLOT", "ISSUE", "STATE", "CAUSE", "TOOK", "COST", "ATTEMPT"
    );
    for r in runs {
        let mark = if r.cost_estimated { "~" } else { "" };
        let cost = r.cost_usd.map_or("-".into(), |c| format!("{mark}${c:.2}"));
        let _ = writeln!(
            out,
            "{:<20}  {:<10} {:<6} {:<10} {:<14} {:>8} {:>7} {:>7}  {}",
            r.ended_at,
            r.slot,
            format!("#{}", r.issue),
            r.state,
            r.end_cause.as_deref().unwrap_or("-"),
            short_duration(r.duration_secs),
            cost,
            r.runs.len().max(1),
            cut(r.reason.as_deref().unwrap_or(""), 60)
        );
    }
    out
}

/// The seed's overall view in one line (`status`, `top`).
pub(super) fn overall(s: &crate::protocol::Summary) -> String {
    let rate = s.success_rate.map_or("-".into(), |r| format!("{:.0}%", r * 100.0));
    let avg = s.average_duration_secs.map_or("-".into(), short_duration);
    format!(
        "instances {} total, {} healthy, {} stale · tasks {} total, {} completed, {} in progress · success {rate} · \
         average {avg}",
        s.instances_total,
        s.instances_healthy,
        s.instances_stale,
        s.tasks_total,
        s.tasks_completed,
        s.tasks_in_progress
    )
}

/// `autodevctl history --sum`.
pub fn history_sum(rows: &[crate::protocol::SumRow]) -> String {
    if rows.is_empty() {
        return "no finished runs yet\n".into();
    }
    let mut out = format!(
        "{:<14} {:>6} {:>11} {:>12} {:>12} {:>10} {:>9}\n",
        "", "RUNS", "COST", "INPUT", "CACHED", "OUTPUT", "TIME"
    );
    for r in rows {
        let mark = if r.cost_estimated { "~" } else { "" };
        let unknown = if r.runs_without_cost > 0 {
            format!("  ({} run(s) without a cost)", r.runs_without_cost)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:<14} {:>6} {:>11} {:>12} {:>12} {:>10} {:>9}{unknown}",
            cut(&r.key, 14),
            r.runs,
            format!("{mark}${:.2}", r.cost_usd),
            r.tokens.input,
            r.tokens.cached_input,
            r.tokens.output,
            short_duration(r.duration_secs)
        );
    }
    if rows.iter().any(|r| r.cost_estimated) {
        out.push_str("~ partly estimated: tokens × llms.<name>.pricing, where the CLI reports no cost\n");
    }
    out
}

/// `autodevctl queue`: what waits, in the order it will be taken.
pub fn queue(entries: &[crate::protocol::QueueEntry]) -> String {
    if entries.is_empty() {
        return "nothing waits: the local queue is empty and the board has no Ready item (or the autopilot is off)\n"
            .into();
    }
    let mut out =
        format!("{:<4} {:<7} {:<6} {:<9} {:<8} {}\n", "#", "ISSUE", "FROM", "PRIORITY", "LLM", "TITLE / WAITS FOR");
    for (i, e) in entries.iter().enumerate() {
        let title = cut(e.title.as_deref().unwrap_or(""), 50);
        let waits = e.reason.as_deref().map(|r| format!("  ⏸ {r}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<4} {:<7} {:<6} {:<9} {:<8} {title}{waits}",
            i + 1,
            format!("#{}", e.issue),
            e.source,
            e.priority.as_deref().unwrap_or("-"),
            e.llm.as_deref().unwrap_or("any"),
        );
    }
    out
}

/// The fleet at a glance: this machine, the others, the claims.
fn fleet_line(f: &crate::protocol::FleetSummary) -> String {
    let renewed = f.renewed_secs_ago.map_or("not renewed yet".to_string(), |s| format!("renewed {s}s ago"));
    let mut line = format!(
        "fleet {} ({}) · {} machines · claims {} here, {} elsewhere · heartbeat {renewed}",
        f.machine, f.backend, f.machines, f.claims_here, f.claims_elsewhere
    );
    if let Some(e) = &f.last_error {
        let _ = write!(line, " · ✗ {e}");
    }
    line
}

/// The width of each column: its widest cell, header included.
fn widths_of<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> [usize; N] {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    widths
}

/// One line of a table: each cell padded to its column's width, the last one left as it is.
fn padded(cells: &[String], widths: &[usize]) -> String {
    let mut l = String::new();
    for (i, cell) in cells.iter().enumerate() {
        if i + 1 == cells.len() {
            l.push_str(cell);
        } else {
            let _ = write!(l, "{cell:<w$}  ", w = widths[i]);
        }
    }
    l.trim_end().to_string()
}

/// A whole table: the header, then the rows.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let widths = widths_of(header, rows);
    let mut out = String::new();
    let _ = writeln!(out, "{}", padded(&header.map(String::from), &widths));
    for row in rows {
        let _ = writeln!(out, "{}", padded(row, &widths));
    }
    out
}

/// `autodevctl fleet`.
pub fn fleet(r: &crate::protocol::FleetReport) -> String {
    let mut out = fleet_line(&r.summary);
    let hours = (r.uptime_secs.max(1) as f64) / 3600.0;
    let _ = writeln!(
        out,
        "\n  heartbeat every {}s; a machine unchanged for {}s (+ one heartbeat) may be taken over; this machine sent \
         {} writes and {} reads ({:.0} writes/h)",
        r.heartbeat_secs,
        r.stale_after_secs,
        r.writes,
        r.reads,
        r.writes as f64 / hours
    );
    let header = ["MACHINE", "HEARTBEAT", "STATE", "BUSY SLOTS", "CLAIMS"];
    let rows: Vec<[String; 5]> = r
        .machines
        .iter()
        .map(|m| {
            let name = if m.this { format!("{} (this)", m.name) } else { m.name.clone() };
            let state = if m.stale { "stale: claims may be taken over" } else { "live" };
            let claims: Vec<String> = m.claims.iter().map(|c| format!("#{c}")).collect();
            [
                name,
                format!("{}s unchanged", m.heartbeat_unchanged_secs),
                state.to_string(),
                if m.busy_slots.is_empty() { "-".into() } else { m.busy_slots.join(" ") },
                if claims.is_empty() { "-".into() } else { claims.join(" ") },
            ]
        })
        .collect();
    out.push_str(&table(&header, &rows));
    out
}

/// `autodevctl autopilot status`.
pub fn autopilot(r: &crate::protocol::AutopilotReport) -> String {
    let said = if r.source == "override" { "set by `autodevctl autopilot`" } else { "autopilot.enabled in the config" };
    let mut out = format!("autopilot {} ({said})\n", if r.on { "on" } else { "off" });
    if let Some(why) = &r.blocked {
        let _ = writeln!(out, "  ✗ it takes nothing from the board: {why}");
    }
    let last = r.last_read_at.as_deref().map_or("never".to_string(), |t| t.to_string());
    let _ = writeln!(
        out,
        "  board read every {}s while a slot is free; last read {last}; {} requests",
        r.poll_secs, r.requests
    );
    if let Some(e) = &r.last_error {
        let _ = writeln!(out, "  last error: {e}");
    }
    out
}
