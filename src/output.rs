//! Reading what children print: line assembly with a length cap, clean-up for display (ANSI, carriage returns,
//! invalid UTF-8, control bytes), the bounded console preview, and the per-file follower.
//!
//! The follower reads only what the preview and the event parser need. Under a flood it skips ahead to the tail of
//! the file, so its cost per wake-up is bounded whatever the child prints; the raw bytes stay on disk for `logs`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::provider::{EventFormat, Outcome, Usage, parse_line};

/// Longest line kept whole for the event parser; longer lines are cut (structured events that large are tool
/// results, whose content the preview does not show anyway).
pub const LINE_CAP: usize = 256 << 10;
/// More unread bytes than this at a wake-up means a flood: skip to the tail.
pub const SKIP_THRESHOLD: u64 = 1 << 20;
/// How much of the tail is read after a skip.
pub const TAIL_WINDOW: u64 = 64 << 10;
/// How much of the head is read first, so the init event (session id) is seen even if a flood follows at once.
pub const HEAD_WINDOW: u64 = 64 << 10;
/// How far back from the end the final result event is looked for when a run ends.
pub const RESULT_SCAN_WINDOW: u64 = 4 << 20;
const READ_CHUNK: usize = 64 << 10;
/// How far back `logs -n` and the end-of-run stderr summary read at most.
const RENDER_TAIL_MAX: u64 = 64 << 20;
/// [`render_tail`] holds what it reads: it reads at most this much.
const RENDER_TAIL_WINDOW_MAX: u64 = 1 << 20;

/// One complete line, cut to [`LINE_CAP`] bytes; `dropped` counts the bytes cut off.
pub struct Line<'a> {
    pub bytes: &'a [u8],
    pub dropped: usize,
}

/// Cuts a byte stream into lines, holding at most [`LINE_CAP`] bytes of an unfinished line.
#[derive(Default)]
pub struct LineAssembler {
    partial: Vec<u8>,
    dropped: usize,
    /// After a seek into the middle of a file the first line is a fragment: drop it.
    discard_until_newline: bool,
}

impl LineAssembler {
    /// Forgets the unfinished line and ignores bytes up to the next newline (used after skipping ahead).
    pub fn resync(&mut self) {
        self.partial.clear();
        self.dropped = 0;
        self.discard_until_newline = true;
    }

    /// Feeds `data`; calls `emit` for the first `keep_head` and the last `keep_tail` complete lines in it and
    /// passes over the lines in between (a preview only ever shows the last few).
    pub fn push(&mut self, mut data: &[u8], keep_head: usize, keep_tail: usize, emit: &mut dyn FnMut(Line<'_>)) {
        let mut emitted_head = 0;
        if self.discard_until_newline {
            match memchr::memchr(b'\n', data) {
                Some(i) => {
                    data = &data[i + 1..];
                    self.discard_until_newline = false;
                }
                None => return,
            }
        }
        if !self.partial.is_empty() || self.dropped > 0 {
            match memchr::memchr(b'\n', data) {
                Some(i) => {
                    self.append_capped(&data[..i]);
                    emit(Line { bytes: &self.partial, dropped: self.dropped });
                    emitted_head += 1;
                    self.partial.clear();
                    self.dropped = 0;
                    data = &data[i + 1..];
                }
                None => {
                    self.append_capped(data);
                    return;
                }
            }
        }
        let Some(last_nl) = memchr::memrchr(b'\n', data) else {
            self.append_capped(data);
            return;
        };
        let (body, rest) = (&data[..last_nl], &data[last_nl + 1..]);
        // Where the last `keep_tail` lines of `body` start.
        let tail_start = if keep_tail == 0 {
            body.len() + 1
        } else {
            memchr::memrchr_iter(b'\n', body).nth(keep_tail - 1).map_or(0, |i| i + 1)
        };
        let mut pos = 0;
        while emitted_head < keep_head && pos < tail_start && pos <= body.len() {
            let end = memchr::memchr(b'\n', &body[pos..]).map_or(body.len(), |i| pos + i);
            emit_capped(&body[pos..end], emit);
            emitted_head += 1;
            pos = end + 1;
        }
        let mut pos = pos.max(tail_start);
        while pos <= body.len() {
            let end = memchr::memchr(b'\n', &body[pos..]).map_or(body.len(), |i| pos + i);
            emit_capped(&body[pos..end], emit);
            pos = end + 1;
        }
        self.append_capped(rest);
    }

    /// Emits the unfinished last line, for a stream that ended without a newline.
    pub fn finish(&mut self, emit: &mut dyn FnMut(Line<'_>)) {
        if !self.partial.is_empty() && !self.discard_until_newline {
            emit(Line { bytes: &self.partial, dropped: self.dropped });
        }
        self.partial.clear();
        self.dropped = 0;
    }

    fn append_capped(&mut self, bytes: &[u8]) {
        let room = LINE_CAP.saturating_sub(self.partial.len());
        let take = room.min(bytes.len());
        self.partial.extend_from_slice(&bytes[..take]);
        self.dropped += bytes.len() - take;
    }
}

fn emit_capped(line: &[u8], emit: &mut dyn FnMut(Line<'_>)) {
    let keep = line.len().min(LINE_CAP);
    emit(Line { bytes: &line[..keep], dropped: line.len() - keep });
}

/// Makes one line fit for a terminal: the last carriage-return rewrite wins, ANSI escapes and control bytes go,
/// invalid UTF-8 is replaced, and the result is cut to `max_chars`.
pub fn clean_line(raw: &[u8], max_chars: usize) -> String {
    let mut chosen = String::new();
    for segment in raw.rsplit(|b| *b == b'\r') {
        chosen = strip_controls(&String::from_utf8_lossy(&strip_ansi_escapes::strip(segment)));
        if !chosen.trim().is_empty() {
            break;
        }
    }
    truncate_chars(chosen.trim_end(), max_chars)
}

fn strip_controls(s: &str) -> String {
    s.chars()
        .filter_map(|c| {
            if c == '\t' {
                Some(' ')
            } else if c.is_control() {
                None
            } else {
                Some(c)
            }
        })
        .collect()
}

fn truncate_chars(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((cut, _)) => {
            let mut out = s[..cut].to_string();
            out.pop();
            out.push('…');
            out
        }
        None => s.to_string(),
    }
}

/// The last lines of a run, as people should see them. Memory is bounded by lines × characters.
#[derive(Debug, Clone)]
pub struct Preview {
    lines: VecDeque<String>,
    max_lines: usize,
    max_chars: usize,
    /// The last line may be continued by the next streamed chunk.
    open_line: bool,
}

impl Preview {
    pub fn new(max_lines: usize, max_chars: usize) -> Preview {
        Preview { lines: VecDeque::with_capacity(max_lines.min(64)), max_lines, max_chars, open_line: false }
    }

    /// Adds a rendered line. `continues` joins it to the previous streamed line.
    pub fn push(&mut self, text: &str, continues: bool) {
        if continues
            && self.open_line
            && let Some(last) = self.lines.back_mut()
        {
            let joined = format!("{last}{text}");
            *last = clean_line(joined.as_bytes(), self.max_chars);
            return;
        }
        self.open_line = continues;
        let line = clean_line(text.as_bytes(), self.max_chars);
        if line.is_empty() && !continues {
            return;
        }
        if self.lines.len() == self.max_lines {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// Ends a streamed line, so the next chunk starts a new one.
    pub fn close_line(&mut self) {
        self.open_line = false;
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.iter().cloned().collect()
    }
}

/// What the follower learned from a batch of output.
#[derive(Debug, Default)]
pub struct Findings {
    pub session_id: Option<String>,
    pub outcome: Option<Outcome>,
    /// Bytes that arrived in the files since the last read.
    pub new_bytes: u64,
    /// Progress the CLI reported itself (codex's plan), in percent, with what it is doing.
    pub progress: Option<(u8, String)>,
    /// The CLI said it hit a usage or rate limit: until when, if it said.
    pub rate_limit: Option<Option<std::time::SystemTime>>,
    /// The agent's last message so far (bounded), and whether it changed since it was last taken.
    pub said: String,
    pub said_changed: bool,
    /// Signals the agent gave in marker lines of its own messages, not yet taken.
    pub signals: Vec<crate::task::AgentSignal>,
    /// Marker lines already turned into signals: a message read again (or streamed on) never repeats one.
    seen_markers: std::collections::HashSet<String>,
    /// The last event was a piece of the message in `said`: a streamed piece after it continues that message.
    said_open: bool,
    /// The message's current line, not yet ended (bounded): markers are read from whole lines as they arrive,
    /// whatever the length of the message.
    said_line: String,
    /// Tokens reported so far while the run goes on, and whether that changed since it was last taken.
    pub usage: Usage,
    pub usage_changed: bool,
    /// Each message's last report (a message may be reported in several events), up to [`USAGE_MESSAGES`]; beyond
    /// that, reports are added up as they come.
    usage_by_message: std::collections::HashMap<String, Usage>,
}

/// Messages whose usage is kept apart; beyond it, reports are added up as they come.
const USAGE_MESSAGES: usize = 10_000;

/// The longest last message kept for the pull request and the issue.
const SAID_MAX: usize = 16 * 1024;
/// The longest line read for a signal marker (a marker with its question fits many times over).
const SIGNAL_LINE_MAX: usize = 8 * 1024;

impl Findings {
    /// Takes in an assistant message (or a streamed piece of one) and the signals in its complete lines.
    fn note_said(&mut self, text: &str, continues: bool) {
        if !continues || !self.said_open {
            self.scan_markers(true);
            self.said.clear();
        }
        self.said_open = true;
        let room = SAID_MAX.saturating_sub(self.said.len());
        let mut cut = text.len().min(room);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.said.push_str(&text[..cut]);
        self.said_changed = true;
        let mut pieces = text.split('\n').peekable();
        while let Some(piece) = pieces.next() {
            if self.said_line.len() < SIGNAL_LINE_MAX {
                let room = SIGNAL_LINE_MAX - self.said_line.len();
                let mut cut = piece.len().min(room);
                while !piece.is_char_boundary(cut) {
                    cut -= 1;
                }
                self.said_line.push_str(&piece[..cut]);
            }
            if pieces.peek().is_some() {
                // The line ended.
                self.scan_markers(true);
            }
        }
    }

    /// Takes in a message's token report: the newest report of a message replaces its earlier ones.
    fn note_usage(&mut self, message: &str, usage: Usage) {
        // The running total: this message's new report in, its earlier one (if any) out.
        let earlier = if self.usage_by_message.len() < USAGE_MESSAGES || self.usage_by_message.contains_key(message) {
            self.usage_by_message.insert(message.to_string(), usage)
        } else {
            None
        };
        self.usage.add(usage);
        if let Some(earlier) = earlier {
            self.usage.input -= earlier.input;
            self.usage.cached_input -= earlier.cached_input;
            self.usage.output -= earlier.output;
        }
        self.usage_changed = true;
    }

    /// Takes the current line as ended (`whole`: the message or the line ended) and reads a signal from it.
    fn scan_markers(&mut self, whole: bool) {
        if !whole {
            return;
        }
        let line = std::mem::take(&mut self.said_line);
        if let Some(signal) = crate::task::AgentSignal::from_marker_line(&line)
            && self.seen_markers.insert(line.trim().to_string())
        {
            self.signals.push(signal);
        }
    }
}

/// Turns one output line into preview lines and findings.
/// [`digest_line`], or for a marked file (stderr) its plain lines with the mark before them and no findings.
fn digest_marked(format: EventFormat, mark: &str, line: Line<'_>, preview: &mut Preview, findings: &mut Findings) {
    if mark.is_empty() {
        return digest_line(format, line, preview, findings);
    }
    for rendered in parse_line(EventFormat::Text, &String::from_utf8_lossy(line.bytes)).lines {
        preview.push(&format!("{mark}{rendered}"), false);
    }
}

pub fn digest_line(format: EventFormat, line: Line<'_>, preview: &mut Preview, findings: &mut Findings) {
    let text = String::from_utf8_lossy(line.bytes);
    if line.dropped > 0 && format != EventFormat::Text && text.starts_with('{') {
        let size = line.bytes.len() + line.dropped;
        preview.push(&format!("(event of {} KiB, too long to show)", size >> 10), false);
        return;
    }
    let parsed = parse_line(format, &text);
    // A usage limit is a typed fact the CLI reports (never words: an agent working on rate limiting writes those
    // all day): a rate-limited retry while it runs, or a final event that failed on the account's limit.
    if let Some(limit) = parsed.rate_limited {
        findings.rate_limit = Some(limit);
    }
    if let Some(crate::provider::Failure::UsageLimit { resets_at }) = parsed.outcome.as_ref().and_then(|o| o.failure) {
        findings.rate_limit = Some(resets_at);
    }
    if !parsed.continues {
        preview.close_line();
    }
    for (i, rendered) in parsed.lines.iter().enumerate() {
        // Only the first piece of a streamed chunk joins the previous line; later pieces follow a newline.
        preview.push(rendered, parsed.continues && i == 0);
    }
    if parsed.session_id.is_some() && findings.session_id.is_none() {
        findings.session_id = parsed.session_id;
    }
    if parsed.outcome.is_some() {
        findings.outcome = parsed.outcome;
    }
    if parsed.progress.is_some() {
        findings.progress = parsed.progress;
    }
    if let Some((message, usage)) = &parsed.usage {
        findings.note_usage(message, *usage);
    }
    match &parsed.said {
        Some(text) => findings.note_said(text, parsed.continues),
        // Another event (a tool call, the result) ends the message being streamed.
        None if findings.said_open => {
            findings.said_open = false;
            findings.scan_markers(true);
        }
        None => {}
    }
}

/// Follows one output file of a run from where it last stopped.
pub struct FileFollower {
    file: File,
    offset: u64,
    assembler: LineAssembler,
    format: EventFormat,
    /// Lines of each batch that are digested; the rest of a large batch is passed over.
    keep_lines: usize,
    /// Put before each preview line of this file (`stderr: `): what a CLI prints beside its events is shown as
    /// such, never taken for the agent's activity.
    mark: &'static str,
}

impl FileFollower {
    pub fn open(path: &Path, format: EventFormat, keep_lines: usize) -> io::Result<FileFollower> {
        Ok(FileFollower {
            file: File::open(path)?,
            offset: 0,
            assembler: LineAssembler::default(),
            format,
            keep_lines,
            mark: "",
        })
    }

    /// Follows a file of plain lines (stderr) whose preview lines start with `mark`.
    pub fn open_marked(path: &Path, keep_lines: usize, mark: &'static str) -> io::Result<FileFollower> {
        Ok(FileFollower { mark, ..FileFollower::open(path, EventFormat::Text, keep_lines)? })
    }

    /// Reads what was added since the last call. Cost is bounded by the windows above, not by the bytes added.
    pub fn read_new(&mut self, preview: &mut Preview, findings: &mut Findings) -> io::Result<()> {
        let size = self.file.metadata()?.len();
        if size < self.offset {
            // Truncated underneath us (someone emptied the log): start over.
            self.offset = 0;
            self.assembler = LineAssembler::default();
        }
        findings.new_bytes += size - self.offset;
        let (format, keep, mark) = (self.format, self.keep_lines, self.mark);
        let mut digest = |line: Line<'_>| digest_marked(format, mark, line, preview, findings);
        if self.offset == 0 && size > 0 {
            // The head of the file holds the init event; read its first lines even if a flood follows.
            let head = read_at(&self.file, 0, size.min(HEAD_WINDOW))?;
            self.assembler.push(&head, 8, keep, &mut digest);
            self.offset = head.len() as u64;
        }
        if size - self.offset > SKIP_THRESHOLD {
            self.offset = size - TAIL_WINDOW;
            self.assembler.resync();
        }
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = vec![0u8; READ_CHUNK];
        while self.offset < size {
            let want = ((size - self.offset) as usize).min(READ_CHUNK);
            let n = self.file.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            self.assembler.push(&buf[..n], 0, keep, &mut digest);
            self.offset += n as u64;
        }
        Ok(())
    }

    /// Flushes a last line that had no newline; called once the run has ended and everything is read.
    pub fn finish(&mut self, preview: &mut Preview, findings: &mut Findings) {
        let (format, mark) = (self.format, self.mark);
        self.assembler.finish(&mut |line| digest_marked(format, mark, line, preview, findings));
        findings.scan_markers(true);
    }
}

fn read_at(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64)? {
            0 => break,
            n => filled += n,
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Looks for the final result event near the end of a log, for when the follower skipped past it or the line was
/// longer than [`LINE_CAP`].
pub fn scan_outcome(path: &Path, format: EventFormat) -> io::Result<Option<Outcome>> {
    if format == EventFormat::Text {
        return Ok(None);
    }
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let start = size.saturating_sub(RESULT_SCAN_WINDOW);
    let tail = read_at(&file, start, size - start)?;
    let mut lines = tail.split(|b| *b == b'\n').rev().filter(|l| !l.is_empty());
    // Only the last few events can be the final one; stop early on a log that ends in noise.
    Ok(lines.by_ref().take(64).find_map(|line| parse_line(format, &String::from_utf8_lossy(line)).outcome))
}

/// The last `n` rendered lines of a log (what `logs -n` shows), reading backwards only as far as needed, and the
/// offset just past the last complete line (where `logs -f` goes on).
pub fn render_tail(path: &Path, format: EventFormat, n: usize, max_chars: usize) -> io::Result<(Vec<String>, u64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut window = TAIL_WINDOW;
    loop {
        let start = size.saturating_sub(window);
        let data = read_at(&file, start, size - start)?;
        let complete = memchr::memrchr(b'\n', &data).map_or(0, |i| i + 1);
        let mut assembler = LineAssembler::default();
        if start > 0 {
            assembler.resync();
        }
        let mut rendered = render_lines(&mut assembler, &data[..complete], format, max_chars, false);
        // A log whose tail renders to few lines (progress bars, tool results) is not read whole: past the cap,
        // what was found is what is shown.
        if rendered.len() >= n || start == 0 || window >= RENDER_TAIL_WINDOW_MAX {
            let skip = rendered.len().saturating_sub(n);
            return Ok((rendered.split_off(skip), start + complete as u64));
        }
        window = window.saturating_mul(4);
    }
}

/// The offset where the last `n` lines of a file start (what `logs --raw -n` shows). Reads backwards in chunks of
/// [`TAIL_WINDOW`]: memory does not grow with `n` or with the file.
pub fn tail_offset(path: &Path, n: usize) -> io::Result<u64> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    line_start_from_end(&file, size, n)
}

fn line_start_from_end(file: &File, size: u64, n: usize) -> io::Result<u64> {
    if n == 0 {
        return Ok(size);
    }
    let mut end = size;
    let mut seen = 0;
    let mut last_byte = true;
    while end > 0 {
        let start = end.saturating_sub(TAIL_WINDOW);
        let data = read_at(file, start, end - start)?;
        for i in memchr::memrchr_iter(b'\n', &data) {
            // A final newline ends the last line; it does not start another.
            if last_byte && start + i as u64 + 1 == size {
                continue;
            }
            seen += 1;
            if seen == n {
                return Ok(start + i as u64 + 1);
            }
        }
        last_byte = false;
        end = start;
    }
    Ok(0)
}

/// Where `logs -n` starts rendering, and how many rendered lines to skip there, for the last `n` rendered lines:
/// found by counting, in chunks, never by holding the lines, so memory does not grow with `n` or with the log.
/// One raw line may render to several lines or to none; past [`RENDER_TAIL_MAX`] of log searched, what was found
/// is what is shown.
pub fn plan_tail(path: &Path, format: EventFormat, n: usize, max_chars: usize) -> io::Result<(u64, usize)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut raw_lines = n.max(1);
    loop {
        let offset = line_start_from_end(&file, size, raw_lines)?;
        let rendered = count_rendered(&file, offset, size, format, max_chars)?;
        if rendered >= n || offset == 0 || size - offset >= RENDER_TAIL_MAX {
            return Ok((offset, rendered.saturating_sub(n)));
        }
        raw_lines = raw_lines.saturating_mul(4);
    }
}

/// How many lines the complete lines between `from` and `to` render to.
fn count_rendered(file: &File, from: u64, to: u64, format: EventFormat, max_chars: usize) -> io::Result<usize> {
    let mut assembler = LineAssembler::default();
    let mut count = 0;
    let mut at = from;
    while at < to {
        let data = read_at(file, at, TAIL_WINDOW.min(to - at))?;
        if data.is_empty() {
            break;
        }
        at += data.len() as u64;
        count += render_lines(&mut assembler, &data, format, max_chars, false).len();
    }
    Ok(count)
}

/// Renders every line of `data` (what `logs` shows). With `finish`, a last line without newline counts too.
pub fn render_lines(
    assembler: &mut LineAssembler,
    data: &[u8],
    format: EventFormat,
    max_chars: usize,
    finish: bool,
) -> Vec<String> {
    // One unbounded preview gives `logs` the same clean-up and streamed-chunk joining as the live preview.
    let mut rendered = Preview::new(usize::MAX, max_chars);
    let mut findings = Findings::default();
    let mut emit = |line: Line<'_>| digest_line(format, line, &mut rendered, &mut findings);
    assembler.push(data, usize::MAX, usize::MAX, &mut emit);
    if finish {
        assembler.finish(&mut emit);
    }
    rendered.lines()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(data: &[&[u8]], head: usize, tail: usize) -> Vec<String> {
        let mut a = LineAssembler::default();
        let mut out = Vec::new();
        for chunk in data {
            a.push(chunk, head, tail, &mut |l| out.push(String::from_utf8_lossy(l.bytes).into_owned()));
        }
        a.finish(&mut |l| out.push(String::from_utf8_lossy(l.bytes).into_owned()));
        out
    }

    #[test]
    fn assembles_lines_across_chunks() {
        assert_eq!(lines_of(&[b"ab", b"c\nde", b"f\n", b"g"], usize::MAX, usize::MAX), ["abc", "def", "g"]);
    }

    /// Rendering from the planned offset, skipping as planned, gives the last `n` lines of rendering everything.
    #[test]
    fn the_tail_plan_matches_rendering_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let mut log = String::new();
        for i in 0..5000 {
            // Some events render to two lines, some to none, some lines are plain text.
            match i % 4 {
                0 => log.push_str(&format!("{{\"type\":\"assistant\",\"message\":{{\"content\":[{{\"type\":\"text\",\"text\":\"a{i}\\nb{i}\"}}]}}}}\n")),
                1 => log.push_str("{\"type\":\"system\",\"subtype\":\"hook\"}\n"),
                _ => log.push_str(&format!("plain {i}\n")),
            }
        }
        std::fs::write(&path, &log).unwrap();
        let everything = render_lines(&mut LineAssembler::default(), log.as_bytes(), EventFormat::Claude, 4000, false);
        for n in [0, 1, 7, 100, 4999, 100_000_000] {
            let (offset, skip) = plan_tail(&path, EventFormat::Claude, n, 4000).unwrap();
            let mut shown = render_lines(
                &mut LineAssembler::default(),
                &log.as_bytes()[offset as usize..],
                EventFormat::Claude,
                4000,
                false,
            );
            shown.drain(..skip);
            let expected = &everything[everything.len().saturating_sub(n)..];
            assert_eq!(shown, expected, "n = {n}");
        }
        assert_eq!(tail_offset(&path, 2).unwrap(), log.len() as u64 - "plain 4998\nplain 4999\n".len() as u64);
        assert_eq!(tail_offset(&path, 100_000_000).unwrap(), 0);
    }

    #[test]
    fn keeps_head_and_tail_of_a_large_batch() {
        let data: Vec<u8> = (0..100).flat_map(|i| format!("{i}\n").into_bytes()).collect();
        assert_eq!(lines_of(&[&data], 2, 3), ["0", "1", "97", "98", "99"]);
        assert_eq!(lines_of(&[&data], 0, 2), ["98", "99"]);
    }

    #[test]
    fn huge_line_is_capped_not_buffered() {
        let mut a = LineAssembler::default();
        let chunk = vec![b'x'; 1 << 20];
        let mut seen = Vec::new();
        for _ in 0..8 {
            a.push(&chunk, usize::MAX, usize::MAX, &mut |l| seen.push((l.bytes.len(), l.dropped)));
            assert!(a.partial.capacity() <= 2 * LINE_CAP);
        }
        a.push(b"\nnext\n", usize::MAX, usize::MAX, &mut |l| seen.push((l.bytes.len(), l.dropped)));
        assert_eq!(seen, [(LINE_CAP, (8 << 20) - LINE_CAP), (4, 0)]);
    }

    #[test]
    fn resync_drops_the_fragment() {
        let mut a = LineAssembler::default();
        a.resync();
        let mut out = Vec::new();
        a.push(b"agment\nwhole\n", 9, 9, &mut |l| out.push(l.bytes.to_vec()));
        assert_eq!(out, [b"whole".to_vec()]);
    }

    #[test]
    fn cleans_for_display() {
        assert_eq!(clean_line(b"\x1b[31mred\x1b[0m text", 80), "red text");
        assert_eq!(clean_line(b"10%\r50%\r100%", 80), "100%");
        assert_eq!(clean_line(b"done\r\n", 80), "done");
        assert_eq!(clean_line(b"bin\x00\x07ary\xff", 80), "binary\u{fffd}");
        assert_eq!(clean_line("ééééé".as_bytes(), 3), "éé…");
    }

    #[test]
    fn preview_is_bounded_and_joins_streamed_chunks() {
        let mut p = Preview::new(2, 80);
        p.push("a", false);
        p.push("Hel", true);
        p.push("lo", true);
        assert_eq!(p.lines(), ["a", "Hello"]);
        p.close_line();
        p.push("b", false);
        p.push("c", false);
        assert_eq!(p.lines(), ["b", "c"]);
    }
}
