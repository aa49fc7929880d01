//! The control socket: accepts connections from the same user, decodes framed requests, answers them. A bad frame
//! gets an error reply and never takes the daemon down.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::Shared;
use super::clients::Admitted;
use super::{handle, runs};
use crate::output::{LineAssembler, plan_tail, render_lines, tail_offset};
use crate::protocol::{
    self, ErrorKind, ErrorReply, Frame, MAX_REQUEST_FRAME, PROTOCOL_VERSION, Reply, Request, SlotState, StatusReport,
};
use crate::provider::EventFormat;

/// A request connection that sends nothing for this long is closed (it holds a task and a socket).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A reply frame must be taken by the client within this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A request must arrive whole within this long of its first byte.
const FRAME_DEADLINE: Duration = Duration::from_secs(10);
/// Requests are read in chunks of this size as the bytes arrive.
const READ_CHUNK: usize = 64 << 10;
/// Size of the chunks `logs` sends.
const LOG_CHUNK: usize = 64 << 10;
/// Characters per rendered line in `logs` (the preview keeps fewer).
const LOG_LINE_CHARS: usize = 4000;

/// Serves one client until it hangs up, goes idle, stalls mid-request, or is closed to make room.
pub async fn serve(shared: Arc<Shared>, mut stream: UnixStream) {
    let me = nix::unistd::getuid().as_raw();
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == me => {}
        Ok(cred) => {
            tracing::warn!(uid = cred.uid(), "refused a connection from another user");
            let reply = error(ErrorKind::BadRequest, format!("autodevd serves uid {me} only"));
            let _ = write_timed(&mut stream, &protocol::encode_json(&reply)).await;
            return;
        }
        Err(e) => {
            tracing::warn!("cannot read peer credentials: {e}");
            return;
        }
    }
    let Some(conn) = shared.clients.admit() else {
        let reply = error(ErrorKind::Failed, "autodevd is answering as many clients as it serves at once".into());
        let _ = write_timed(&mut stream, &protocol::encode_json(&reply)).await;
        return;
    };
    loop {
        conn.waiting();
        let frame = tokio::select! {
            why = conn.closed() => {
                let _ = send(&mut stream, &error(ErrorKind::Failed, why.to_string())).await;
                return;
            }
            read = read_request(&mut stream, &conn) => match read {
                Ok(frame) => frame,
                Err(ReadEnd::Closed) | Err(ReadEnd::Idle) => return,
                Err(ReadEnd::Refused(message)) => {
                    // After a bad or partial frame the stream cannot be resynchronised: answer, then hang up.
                    let _ = send(&mut stream, &error(ErrorKind::BadRequest, message)).await;
                    return;
                }
            },
        };
        conn.answering();
        let request = match frame {
            Frame::Json(payload) => protocol::decode_request(&payload),
            Frame::Bytes(_) => {
                Err(ErrorReply { kind: ErrorKind::BadRequest, message: "requests are JSON frames".into(), hint: None })
            }
        };
        let outcome = match request {
            Ok(request) => handle(&shared, request, &mut stream, &conn).await,
            Err(e) => send(&mut stream, &Reply::Error(e)).await,
        };
        if outcome.is_err() {
            return;
        }
    }
}

/// Why no request came.
enum ReadEnd {
    /// The client hung up between requests.
    Closed,
    /// Nothing came for [`IDLE_TIMEOUT`].
    Idle,
    /// What came is not a request we take; the message says why.
    Refused(String),
}

thread_local! {
    /// Where every connection's bytes land before they are kept (the runtime has one thread; no read awaits in
    /// between).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; READ_CHUNK]);
}

/// Reads one request frame: its first byte within [`IDLE_TIMEOUT`], all of it within [`FRAME_DEADLINE`] of that
/// byte. The payload is buffered as it arrives (never allocated from the length prefix) and counted against the
/// budget of all unfinished requests.
async fn read_request(stream: &mut UnixStream, conn: &Admitted) -> Result<Frame, ReadEnd> {
    let mut header = [0u8; 5];
    match tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut header[..1])).await {
        Err(_) => return Err(ReadEnd::Idle),
        Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadEnd::Closed),
        Ok(Ok(_)) => {}
    }
    let rest = async {
        stream.read_exact(&mut header[1..]).await.map_err(|_| ReadEnd::Closed)?;
        let (kind, len) = protocol::parse_header(header, MAX_REQUEST_FRAME)
            .map_err(|e| ReadEnd::Refused(format!("bad frame: {e}")))?;
        // In pieces of exactly what arrived, read through one scratch buffer: a stalled client holds only the bytes
        // it sent (which the budget counts), never a buffer of its own, and no buffer ever doubles. Joined once whole.
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let mut received = 0;
        while received < len {
            stream.readable().await.map_err(|_| ReadEnd::Closed)?;
            let want = READ_CHUNK.min(len - received);
            let read = SCRATCH.with_borrow_mut(|scratch| match stream.try_read(&mut scratch[..want]) {
                Ok(n) => Ok(Some(scratch[..n].to_vec())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                Err(_) => Err(ReadEnd::Closed),
            })?;
            let Some(piece) = read else { continue };
            if piece.is_empty() {
                return Err(ReadEnd::Closed);
            }
            conn.buffered(piece.len()).map_err(|why| ReadEnd::Refused(why.to_string()))?;
            received += piece.len();
            pieces.push(piece);
            // Take turns: a connection told to go frees its bytes only when it runs, and one that always has data
            // would otherwise read many pieces before anyone else runs.
            tokio::task::yield_now().await;
        }
        let payload = pieces.concat();
        Ok(protocol::frame_of(kind, payload))
    };
    tokio::time::timeout(FRAME_DEADLINE, rest).await.unwrap_or_else(|_| {
        Err(ReadEnd::Refused(format!("the request did not arrive whole within {FRAME_DEADLINE:?} of its first byte")))
    })
}

fn error(kind: ErrorKind, message: String) -> Reply {
    Reply::Error(ErrorReply { kind, message, hint: None })
}

/// Every reply leaves through here, redacted (`crate::redact`).
async fn send(stream: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let body = crate::redact::to_json_vec(reply).map_err(std::io::Error::other)?;
    write_timed(stream, &protocol::encode_json_body(&body)).await
}

/// Writes a frame, giving up after [`WRITE_TIMEOUT`]: a client that stops reading is hung up on rather than
/// holding its connection (and a place among `maxClients`) forever.
async fn write_timed(stream: &mut UnixStream, frame: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, protocol::write_frame(stream, frame))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")))
}

async fn handle(
    shared: &Arc<Shared>,
    request: Request,
    stream: &mut UnixStream,
    conn: &Admitted,
) -> std::io::Result<()> {
    let reply = match request {
        Request::Ping => Reply::Pong { version: PROTOCOL_VERSION, daemon_pid: shared.daemon_pid },
        Request::Status => Reply::Status(status_report(shared)),
        Request::DashboardUrl { rotate } => match &shared.dashboard {
            None => error(
                ErrorKind::Conflict,
                "the dashboard is off: set dashboard.listen (e.g. \"127.0.0.1:7777\") and restart autodevd".into(),
            ),
            Some(dashboard) => match dashboard.url(rotate) {
                Ok(url) => {
                    if rotate {
                        // Wakes the open streams, which end on finding their session revoked.
                        shared.changed();
                    }
                    Reply::DashboardUrl { url }
                }
                Err(e) => error(ErrorKind::Failed, format!("cannot write the new token: {e}")),
            },
        },
        Request::Subscribe => {
            if let Err(message) = conn.to_stream() {
                return send(stream, &error(ErrorKind::Failed, message)).await;
            }
            return feed(shared, stream).await;
        }
        Request::Instances => Reply::Instances { providers: shared.lock_table().usage() },
        Request::Assign { issue, llm, slot, prompt, force, queue } => {
            let how = handle::How { force, queue, claiming: None };
            handle::assign(shared, issue, llm.as_deref(), slot.as_deref(), prompt.as_deref(), how)
                .await
                .unwrap_or_else(Reply::Error)
        }
        Request::Queue => Reply::Queue { entries: super::autopilot::entries(shared).await },
        Request::Unqueue { issue } => {
            if shared.queue.remove(issue) {
                Reply::Unqueued { issue }
            } else {
                Reply::Error(crate::protocol::refuse(
                    crate::protocol::ErrorKind::NotFound,
                    format!("issue #{issue} is not in the local queue"),
                    Some("`autodevctl queue` lists it".into()),
                ))
            }
        }
        Request::Autopilot { set } => {
            let value = match set {
                None => Ok(()),
                Some(crate::protocol::AutopilotSet::On) => shared.queue.set_autopilot(Some(true)),
                Some(crate::protocol::AutopilotSet::Off) => shared.queue.set_autopilot(Some(false)),
                Some(crate::protocol::AutopilotSet::Reset) => shared.queue.set_autopilot(None),
            };
            match value {
                Ok(()) => Reply::Autopilot(super::autopilot::report(shared)),
                Err(e) => Reply::Error(crate::protocol::refuse(crate::protocol::ErrorKind::Failed, e, None)),
            }
        }
        Request::ProjectStatus => Reply::ProjectStatus(project_status(shared).await),
        Request::Fleet => match &shared.fleet {
            Some(fleet) => Reply::Fleet(fleet.report(shared)),
            None => Reply::Error(crate::protocol::refuse(
                crate::protocol::ErrorKind::Conflict,
                "the fleet is off on this machine".into(),
                Some("set fleet.enabled to true in the config (README: Several machines)".into()),
            )),
        },
        Request::Progress { slot, run_id, percent, message } => {
            let peer = stream.peer_cred().ok().and_then(|c| c.pid());
            handle::progress(shared, &slot, &run_id, percent, &message, peer).unwrap_or_else(Reply::Error)
        }
        Request::HistorySum { issue, by } => handle::history_sum(shared, issue, by).await.unwrap_or_else(Reply::Error),
        Request::History { issue, limit } => handle::history(shared, issue, limit).await.unwrap_or_else(Reply::Error),
        Request::Stop { slot } => {
            handle::stop(shared, &slot, crate::task::StopBy::User).await.unwrap_or_else(Reply::Error)
        }
        Request::Resume { slot, prompt, over_budget } => {
            let how = handle::ResumeBy::Person { answer: prompt.as_deref(), over_budget };
            handle::resume(shared, &slot, how).await.unwrap_or_else(Reply::Error)
        }
        Request::Signal { slot, run_id, signal } => {
            let peer = stream.peer_cred().ok().and_then(|c| c.pid());
            handle::signal(shared, &slot, &run_id, signal, peer).unwrap_or_else(Reply::Error)
        }
        Request::Release { slot, done } => handle::release(shared, &slot, done).unwrap_or_else(Reply::Error),
        Request::Workspaces { prune } => handle::workspaces(shared, prune).await.unwrap_or_else(Reply::Error),
        Request::Logs { slot, lines, follow, raw, stderr } => {
            if follow && let Err(message) = conn.to_stream() {
                return send(stream, &error(ErrorKind::Failed, message)).await;
            }
            return stream_logs(shared, stream, &slot, lines, follow, raw, stderr).await;
        }
    };
    send(stream, &reply).await
}

/// What `status` shows, now.
pub(super) fn status_report(shared: &Shared) -> StatusReport {
    // Its own statement: the table lock must be released before summary() takes it again.
    let mut slots = shared.lock_table().status_rows(&shared.policy.allowance);
    if let Some(fleet) = &shared.fleet {
        for row in &mut slots {
            row.held_elsewhere = row.issue.and_then(|issue| fleet.holder_elsewhere(issue));
        }
    }
    if let Ok(github) = &shared.github {
        for row in &mut slots {
            row.pr = row.task_id.as_deref().and_then(|id| github.posts.of_task(id)).map(Into::into);
        }
    }
    StatusReport {
        daemon_pid: shared.daemon_pid,
        state_dir: shared.paths.state_dir.display().to_string(),
        config_path: shared.config.path.as_ref().map(|p| p.display().to_string()),
        slots,
        warnings: shared.warnings(),
        summary: shared.summary(),
        containment: shared.containment().to_string(),
        containment_note: match &shared.cgroups {
            Ok(c) => format!("{} ({})", c.base.display(), c.how),
            Err(why) => why.clone(),
        },
        cgroup_controllers: shared.cgroups.as_ref().map(|c| c.controllers.clone()).unwrap_or_default(),
        queued: super::autopilot::local_entries(shared),
        autopilot: super::autopilot::in_force(shared).0,
        fleet: shared.fleet.as_ref().map(|f| f.summary()),
    }
}

/// The live feed: the whole status, then after each change (at most [`FEED_FRAMES_PER_SEC`] a second) the header
/// and the rows that changed. A subscriber that does not keep up is hung up on (`FEED_WRITE_TIMEOUT`): the daemon
/// never waits for one, and never holds more than one frame for it.
async fn feed(shared: &Arc<Shared>, stream: &mut UnixStream) -> std::io::Result<()> {
    let mut changes = shared.changes.subscribe();
    let mut last = status_report(shared);
    send_feed(stream, true, &last).await?;
    loop {
        // Coalesced: whatever changed during the pause goes in one frame.
        tokio::time::sleep(Duration::from_millis(1000 / FEED_FRAMES_PER_SEC)).await;
        if !next_change(&mut changes, stream).await {
            return Ok(());
        }
        let now = status_report(shared);
        // Slots came or went (a reload): the whole table, so no view keeps a row that is gone.
        let same_slots =
            now.slots.len() == last.slots.len() && now.slots.iter().zip(&last.slots).all(|(a, b)| a.slot == b.slot);
        let mut update = now.clone();
        if same_slots {
            update.slots.retain(|row| last.slots.iter().find(|r| r.slot == row.slot) != Some(row));
        }
        last = now;
        send_feed(stream, !same_slots, &update).await?;
    }
}

/// Most frames a subscriber gets per second.
const FEED_FRAMES_PER_SEC: u64 = 4;
/// A subscriber that takes longer than this to take one frame is dropped.
const FEED_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

async fn send_feed(stream: &mut UnixStream, full: bool, report: &StatusReport) -> std::io::Result<()> {
    let body =
        crate::redact::to_json_vec(&Reply::Feed { full, report: report.clone() }).map_err(std::io::Error::other)?;
    match tokio::time::timeout(FEED_WRITE_TIMEOUT, protocol::write_frame(stream, &protocol::encode_json_body(&body)))
        .await
    {
        Ok(result) => result,
        Err(_) => {
            tracing::info!("a live-feed subscriber stopped reading for {FEED_WRITE_TIMEOUT:?}: dropped");
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the subscriber stopped reading"))
        }
    }
}

/// Streams a slot's current (or last) run log: the tail or the whole file, then, with `follow`, what is added until
/// the run ends.
async fn stream_logs(
    shared: &Shared,
    stream: &mut UnixStream,
    slot: &str,
    lines: Option<usize>,
    follow: bool,
    raw: bool,
    stderr: bool,
) -> std::io::Result<()> {
    let found = {
        let table = shared.lock_table();
        match table.get(slot) {
            None => Err(format!("unknown slot {slot:?}")),
            Some(s) => match &s.task {
                None => Err(format!("slot {slot} has not run anything yet")),
                Some(t) => Ok((
                    runs::log_path(&t.run_dir(), stderr),
                    if stderr { EventFormat::Text } else { table.providers[s.provider].format },
                    t.record.run_id.clone(),
                    t.signal.subscribe(),
                )),
            },
        }
    };
    let (path, format, run_id, mut signal) = match found {
        Ok(found) => found,
        Err(message) => return send(stream, &error(ErrorKind::NotFound, message)).await,
    };
    let unreadable = |e: std::io::Error| error(ErrorKind::Failed, format!("cannot read {}: {e}", path.display()));
    // Where to start, and how many rendered lines to skip there: found in bounded chunks whatever `-n` says, and
    // off the runtime thread (a huge `-n` on a big log reads all of it).
    let planned = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || match (raw, lines) {
            (_, None) => Ok((0, 0)),
            (true, Some(n)) => tail_offset(&path, n).map(|o| (o, 0)),
            (false, Some(n)) => plan_tail(&path, format, n, LOG_LINE_CHARS),
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    };
    let (mut offset, mut skip) = match planned {
        Ok(plan) => plan,
        Err(e) => return send(stream, &unreadable(e)).await,
    };
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => return send(stream, &unreadable(e)).await,
    };
    let mut assembler = LineAssembler::default();
    let mut buf = vec![0u8; LOG_CHUNK];
    loop {
        // Seen before reading, so output written just before the end is still sent.
        let ended = signal.borrow_and_update().ended;
        file.seek(SeekFrom::Start(offset))?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            offset += n as u64;
            if raw {
                write_timed(stream, &protocol::encode_bytes(&buf[..n])).await?;
            } else {
                let mut lines = render_lines(&mut assembler, &buf[..n], format, LOG_LINE_CHARS, false);
                let skipped = skip.min(lines.len());
                lines.drain(..skipped);
                skip -= skipped;
                send_text(stream, &lines).await?;
            }
        }
        if !follow || ended || !next_change(&mut signal, stream).await {
            break;
        }
    }
    if !raw {
        send_text(stream, &render_lines(&mut assembler, &[], format, LOG_LINE_CHARS, true)).await?;
    }
    let state = shared.lock_table().get(slot).map_or(SlotState::Ready, |s| s.state());
    send(stream, &Reply::LogEnd { slot: slot.to_string(), run_id, state }).await
}

/// Waits for the next change on `changes` (the next batch of a run's output, a change of the status); false once
/// the sender is gone or the client hung up. A client sends nothing while it follows or subscribes: a hang-up is
/// seen at once, even while nothing changes.
async fn next_change<T>(changes: &mut watch::Receiver<T>, stream: &UnixStream) -> bool {
    loop {
        tokio::select! {
            changed = changes.changed() => return changed.is_ok(),
            ready = stream.readable() => {
                if ready.is_err() {
                    return false;
                }
                let mut probe = [0u8; 1];
                match stream.try_read(&mut probe) {
                    Ok(0) => return false,
                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return false,
                    // Whatever came is ignored.
                    _ => {}
                }
            }
        }
    }
}

async fn send_text(stream: &mut UnixStream, lines: &[String]) -> std::io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut text = crate::redact::current().clean(&lines.join("\n")).into_owned();
    text.push('\n');
    write_timed(stream, &protocol::encode_bytes(text.as_bytes())).await
}

/// `project status`: the project as GitHub has it now, and what the reconciler still owes.
async fn project_status(shared: &Shared) -> crate::protocol::ProjectReport {
    let project = &shared.config.raw.project;
    let mut report = crate::protocol::ProjectReport {
        github_off: None,
        repository: None,
        token_source: None,
        scopes: None,
        project_enabled: project.enabled,
        project_number: project.project_number,
        project_title: None,
        fields: Vec::new(),
        missing_fields: Vec::new(),
        project_error: None,
        pending: Vec::new(),
        last_error: None,
        last_error_at: None,
        requests: 0,
    };
    let gh = match &shared.github {
        Ok(gh) => gh,
        Err(why) => {
            report.github_off = Some(why.clone());
            return report;
        }
    };
    report.repository = Some(format!("{}/{}", gh.owner, gh.repo));
    report.token_source = Some(gh.token_source.to_string());
    if gh.gh.scopes.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
        // Any REST answer carries the token's scopes; reading the repository is the cheapest one that matters.
        if let Err(e) = gh.gh.rest_get(&format!("/repos/{}/{}", gh.owner, gh.repo)).await {
            report.project_error = Some(e.to_string());
        }
    }
    report.scopes = gh.gh.scopes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if project.enabled {
        match gh.reconciler.board().await {
            Ok(board) => {
                report.project_title = Some(board.title.clone());
                for name in [&project.fields.status.field_name, &project.fields.assigned_instance.field_name] {
                    if board.field(name).is_err() {
                        report.missing_fields.push(name.clone());
                    }
                }
                report.fields = board.fields.into_iter().map(Into::into).collect();
            }
            Err(e) => report.project_error = Some(e.to_string()),
        }
    }
    let sync = gh.reconciler.report();
    report.pending = sync.pending.into_iter().map(Into::into).collect();
    report.last_error = sync.last_error;
    report.last_error_at = sync.last_error_at;
    report.requests = sync.requests;
    report
}
