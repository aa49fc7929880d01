//! `autodevctl top`: the live terminal view. The daemon pushes the status (`Subscribe`), so nothing polls; this draws
//! it with ratatui: the `status` header, one row per slot, the selected slot's console, and keys to stop, resume and
//! assign. It runs as its own binary (`autodev-top`) so no other command pays for the terminal stack at start-up.

use std::io::IsTerminal;
use std::sync::mpsc;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Table, TableState};
use ratatui::{DefaultTerminal, Frame};

use super::{Client, CtlError};
use crate::paths::Paths;
use crate::protocol::{Reply, Request, SlotState, SlotStatus, StatusReport};
use crate::timefmt::{age, parse_rfc3339, short_duration};

/// What the keys are doing.
enum Mode {
    Browse,
    /// Asks before stopping this slot.
    ConfirmStop(String),
    /// Typing the issue number to assign.
    Assign(String),
    Help,
}

struct App {
    report: Option<StatusReport>,
    table: TableState,
    mode: Mode,
    /// The last thing a key did (or why it could not).
    message: String,
    lost: Option<String>,
}

/// Runs the view until `q`. Restores the terminal on exit and on panic (ratatui's init does both).
pub fn run(paths: &Paths) -> Result<(), CtlError> {
    if !std::io::stdout().is_terminal() {
        return Err(CtlError::Failed(
            "autodevctl top needs a terminal; in scripts use `autodevctl status` (or `status --json`)".into(),
        ));
    }
    let mut feed = Client::connect(paths)?;
    feed.send(Request::Subscribe)?;
    let (tx, frames) = mpsc::channel();
    std::thread::spawn(move || {
        loop {
            let frame = feed.next_frame().and_then(|f| match f {
                crate::protocol::Frame::Json(payload) => super::decode_reply(&payload),
                crate::protocol::Frame::Bytes(_) => Ok(Reply::Pong { version: 0, daemon_pid: 0 }),
            });
            let end = frame.is_err();
            if tx.send(frame).is_err() || end {
                return;
            }
        }
    });
    let mut terminal = ratatui::init();
    let result = run_app(&mut terminal, paths, &frames);
    ratatui::restore();
    result
}

fn run_app(
    terminal: &mut DefaultTerminal,
    paths: &Paths,
    frames: &mpsc::Receiver<Result<Reply, CtlError>>,
) -> Result<(), CtlError> {
    let mut app =
        App { report: None, table: TableState::default(), mode: Mode::Browse, message: String::new(), lost: None };
    app.table.select(Some(0));
    loop {
        while let Ok(frame) = frames.try_recv() {
            match frame {
                Ok(Reply::Feed { full, report }) => merge(&mut app, full, report),
                Ok(_) => {}
                Err(e) => app.lost = Some(e.to_string()),
            }
        }
        terminal.draw(|f| draw(f, &mut app)).map_err(|e| CtlError::Failed(format!("cannot draw: {e}")))?;
        if !event::poll(Duration::from_millis(100)).map_err(|e| CtlError::Failed(e.to_string()))? {
            continue;
        }
        let Event::Key(key) = event::read().map_err(|e| CtlError::Failed(e.to_string()))? else { continue };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        let selected = selected_slot(&app);
        match (&mut app.mode, key.code) {
            (Mode::Help, _) => app.mode = Mode::Browse,
            (Mode::ConfirmStop(slot), KeyCode::Char('y')) => {
                let slot = slot.clone();
                app.message = act(paths, Request::Stop { slot: slot.clone() }, &format!("stopping {slot}"));
                app.mode = Mode::Browse;
            }
            (Mode::ConfirmStop(_), _) => {
                app.message = "not stopped".into();
                app.mode = Mode::Browse;
            }
            (Mode::Assign(typed), KeyCode::Char(c)) if c.is_ascii_digit() && typed.len() < 12 => typed.push(c),
            (Mode::Assign(typed), KeyCode::Backspace) => {
                typed.pop();
            }
            (Mode::Assign(typed), KeyCode::Enter) => {
                let issue = typed.parse::<u64>().unwrap_or(0);
                let request =
                    Request::Assign { issue, llm: None, slot: None, prompt: None, force: false, queue: false };
                app.message = act(paths, request, &format!("assigning #{issue}"));
                app.mode = Mode::Browse;
            }
            (Mode::Assign(_), KeyCode::Esc) => app.mode = Mode::Browse,
            (Mode::Assign(_), _) => {}
            (Mode::Browse, KeyCode::Char('q') | KeyCode::Esc) => return Ok(()),
            (Mode::Browse, KeyCode::Char('?')) => app.mode = Mode::Help,
            (Mode::Browse, KeyCode::Down | KeyCode::Char('j')) => move_selection(&mut app, 1),
            (Mode::Browse, KeyCode::Up | KeyCode::Char('k')) => move_selection(&mut app, -1),
            (Mode::Browse, KeyCode::Char('s')) => {
                if let Some(slot) = selected {
                    app.mode = Mode::ConfirmStop(slot);
                }
            }
            (Mode::Browse, KeyCode::Char('r')) => {
                if let Some(slot) = selected {
                    let request = Request::Resume { slot: slot.clone(), prompt: None, over_budget: false };
                    app.message = act(paths, request, &format!("resuming {slot}"));
                }
            }
            (Mode::Browse, KeyCode::Char('a')) => app.mode = Mode::Assign(String::new()),
            (Mode::Browse, KeyCode::Enter) => {
                if let Some(slot) = selected {
                    follow_log(terminal, paths, &slot)?;
                }
            }
            _ => {}
        }
    }
}

/// Takes a frame in: a full status replaces what is shown; an update replaces the rows it carries.
fn merge(app: &mut App, full: bool, report: StatusReport) {
    match (&mut app.report, full) {
        (Some(shown), false) => {
            // An update carries the whole header and only the rows that changed: the header is taken whole.
            let mut report = report;
            let changed = std::mem::replace(&mut report.slots, std::mem::take(&mut shown.slots));
            for row in changed {
                match report.slots.iter_mut().find(|r| r.slot == row.slot) {
                    Some(old) => *old = row,
                    None => report.slots.push(row),
                }
            }
            *shown = report;
        }
        _ => app.report = Some(report),
    }
}

fn selected_slot(app: &App) -> Option<String> {
    let rows = &app.report.as_ref()?.slots;
    rows.get(app.table.selected()?).map(|r| r.slot.clone())
}

fn move_selection(app: &mut App, by: isize) {
    let count = app.report.as_ref().map_or(0, |r| r.slots.len());
    if count == 0 {
        return;
    }
    let now = app.table.selected().unwrap_or(0) as isize;
    app.table.select(Some((now + by).clamp(0, count as isize - 1) as usize));
}

/// Sends one request on its own connection; says how it went.
fn act(paths: &Paths, request: Request, doing: &str) -> String {
    let result = Client::connect(paths).and_then(|mut c| {
        c.set_timeout(Some(Duration::from_secs(120)));
        c.call(request)
    });
    match result {
        Ok(_) => format!("✓ {doing}"),
        Err(CtlError::Refused(e)) => format!("✗ {doing}: {}", e.message),
        Err(e) => format!("✗ {doing}: {e}"),
    }
}

/// Leaves the view for `autodevctl logs -f <slot>` (Ctrl-C ends the log and comes back), then comes back.
fn follow_log(terminal: &mut DefaultTerminal, paths: &Paths, slot: &str) -> Result<(), CtlError> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    ratatui::restore();
    let ctl = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("autodevctl")));
    let program = ctl.filter(|p| p.is_file()).unwrap_or_else(|| "autodevctl".into());
    let child = std::process::Command::new(program)
        .arg("--state-dir")
        .arg(&paths.state_dir)
        .arg("--runtime-dir")
        .arg(&paths.runtime_dir)
        .args(["logs", "-f", slot])
        .spawn();
    if let Ok(mut child) = child {
        // The child runs (it was spawned with the default disposition): Ctrl-C is for it, not for this view.
        // SAFETY: setting a disposition to SIG_IGN and back to SIG_DFL installs no handler code.
        unsafe {
            let _ = signal(Signal::SIGINT, SigHandler::SigIgn);
        }
        let _ = child.wait();
        // SAFETY: as above.
        unsafe {
            let _ = signal(Signal::SIGINT, SigHandler::SigDfl);
        }
    }
    *terminal = ratatui::init();
    terminal.clear().map_err(|e| CtlError::Failed(e.to_string()))
}

fn state_style(state: SlotState) -> Style {
    let color = match state {
        SlotState::InProgress | SlotState::Starting => Color::Green,
        SlotState::Stale | SlotState::Waiting => Color::Yellow,
        SlotState::Failed | SlotState::Abandoned => Color::Red,
        SlotState::Completed => Color::Cyan,
        SlotState::Ready | SlotState::Queued => Color::Gray,
    };
    Style::default().fg(color)
}

fn bar(percent: Option<u8>) -> String {
    match percent {
        Some(p) => {
            let filled = usize::from(p.min(100)) / 10;
            format!("{}{} {p:>3}%", "█".repeat(filled), "░".repeat(10 - filled))
        }
        None => "-".into(),
    }
}

fn heartbeat(row: &SlotStatus) -> String {
    row.heartbeat_at
        .as_deref()
        .and_then(parse_rfc3339)
        .map_or("-".into(), |t| format!("{} ago", short_duration(age(t))))
}

fn draw(f: &mut Frame, app: &mut App) {
    let [header, rows, console, footer] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(4),
        Constraint::Percentage(40),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let Some(report) = &app.report else {
        let text = app.lost.clone().unwrap_or_else(|| "waiting for autodevd…".into());
        f.render_widget(Paragraph::new(text), header);
        return;
    };
    let mut top = super::render::overall(&report.summary);
    if !report.queued.is_empty() {
        top.push_str(&format!(" · {} queued", report.queued.len()));
    }
    if report.autopilot {
        top.push_str(" · autopilot on");
    }
    let second = app.lost.as_ref().map_or_else(
        || report.warnings.first().cloned().unwrap_or_default(),
        |lost| format!("connection lost: {lost}"),
    );
    f.render_widget(
        Paragraph::new(vec![Line::from(top), Line::from(second).style(Style::default().fg(Color::Yellow))]),
        header,
    );

    let body: Vec<Row> = report
        .slots
        .iter()
        .map(|r| {
            let issue = r.issue.map_or("-".into(), |i| format!("#{i}"));
            let pr = r.pr.as_ref().and_then(|p| p.number).map_or("-".into(), |n| format!("#{n}"));
            Row::new(vec![
                Cell::from(r.slot.clone()),
                Cell::from(r.state.as_str().replace('_', " ")).style(state_style(r.state)),
                Cell::from(issue),
                Cell::from(bar(r.progress)),
                Cell::from(r.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%"))),
                Cell::from(r.memory_mb.map_or("-".into(), |m| format!("{m:.0}M"))),
                Cell::from(heartbeat(r)),
                Cell::from(pr),
                Cell::from({
                    let said = r.progress_message.clone().or_else(|| r.reason.clone()).unwrap_or_default();
                    match &r.held_elsewhere {
                        Some(holder) => format!("held by {holder}: {said}"),
                        None => said,
                    }
                }),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(10),
        Constraint::Length(11),
        Constraint::Length(6),
        Constraint::Length(15),
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(5),
        Constraint::Min(10),
    ];
    let table = Table::new(body, widths)
        .header(
            Row::new(["SLOT", "STATE", "ISSUE", "PROGRESS", "CPU", "MEM", "BEAT", "PR", "DOING"])
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .block(Block::default().borders(Borders::TOP));
    f.render_stateful_widget(table, rows, &mut app.table);

    let selected = app.table.selected().and_then(|i| report.slots.get(i));
    let (title, lines) = match selected {
        Some(r) => (
            format!(" {} · {} ", r.slot, r.branch.as_deref().unwrap_or("console")),
            r.console_preview.iter().map(|l| Line::from(l.clone())).collect::<Vec<_>>(),
        ),
        None => (" console ".into(), Vec::new()),
    };
    let skip = lines.len().saturating_sub(console.height.saturating_sub(2) as usize);
    f.render_widget(
        Paragraph::new(lines[skip..].to_vec()).block(Block::default().borders(Borders::ALL).title(title)),
        console,
    );

    let keys = match &app.mode {
        Mode::ConfirmStop(slot) => format!("Stop {slot}? y to stop, any other key to keep it"),
        Mode::Assign(typed) => format!("Assign issue #{typed}▏ (Enter to assign, Esc to cancel)"),
        _ if !app.message.is_empty() => app.message.clone(),
        _ => "↑/↓ select · Enter follow log · s stop · r resume · a assign · ? help · q quit".into(),
    };
    f.render_widget(Paragraph::new(Span::raw(keys)), footer);

    if let Mode::Help = app.mode {
        let area = f.area().inner(ratatui::layout::Margin { horizontal: 8, vertical: 4 });
        let help = [
            "↑/↓ or k/j   select a slot",
            "Enter        follow the slot's log (Ctrl-C comes back)",
            "s            stop the slot's run (asks first)",
            "r            resume the slot's task",
            "a            assign an issue to a free slot",
            "q or Esc     quit",
            "",
            "The view is pushed by autodevd as things change; nothing polls.",
        ];
        f.render_widget(Clear, area);
        f.render_widget(
            Paragraph::new(help.iter().map(|l| Line::from(*l)).collect::<Vec<_>>())
                .block(Block::default().borders(Borders::ALL).title(" keys ")),
            area,
        );
    }
}
