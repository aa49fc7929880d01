//! autodevd: parse flags, load the config, run the daemon in the foreground (systemd's way).

use std::path::PathBuf;
use std::process::ExitCode;

use autodev::config::{self, Config};
use autodev::daemon::{self, DaemonOptions};
use autodev::paths::Paths;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "autodevd", version, about = "Supervise AI coding agents in named slots (runs in the foreground)")]
struct Args {
    /// Config file [env: AUTODEV_CONFIG]; default: .autonomous/.autonomous-config.json or .autonomous-config.json
    /// here or in the git root, then ~/.config/autodev/autonomous-config.json
    #[arg(long, env = "AUTODEV_CONFIG")]
    config: Option<PathBuf>,
    /// Lockfiles, run logs and history [env: AUTODEV_STATE_DIR, then STATE_DIRECTORY]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where the control socket lives [env: AUTODEV_RUNTIME_DIR, then RUNTIME_DIRECTORY]
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    // The fleet's lease keeper: the same binary, started by the daemon (see autodev::fleet::keeper).
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some("--lease-keeper") {
        return match autodev::fleet::keeper::main_from_args(&raw[1..]) {
            Some(()) => ExitCode::SUCCESS,
            None => ExitCode::from(2),
        };
    }
    let args = Args::parse();
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let user_config = directories::ProjectDirs::from("", "", "autodev").map(|d| d.config_dir().to_path_buf());
    let config = match config::discover(args.config.as_deref(), &cwd, user_config.as_deref()) {
        Some(path) => Config::load(&path),
        None => Ok(Config::builtin()),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("autodevd: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    let paths = match Paths::resolve(args.state_dir.as_deref(), args.runtime_dir.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("autodevd: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("autodevd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(DaemonOptions { config, paths })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("autodevd: {}", autodev::redact::clean(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// Logs through tracing, every line redacted (`autodev::redact`): plain lines on stderr; when systemd gave us the
/// journal as stderr (`JOURNAL_STREAM`), each line starts with its syslog priority (`<3>` for errors), which journald
/// reads as the level, and without a timestamp (the journal has its own). The level comes from RUST_LOG, else
/// `logging.level`, else info.
fn init_logging(config: &Config) {
    let filter =
        std::env::var("RUST_LOG").ok().or_else(|| config.raw.logging.level.clone()).unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("autodevd: log filter {filter:?} is invalid ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal: a log file or a pipe gets plain text.
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(log_line::Redacting);
    if journal {
        builder.event_format(log_line::Journal).init();
    } else {
        builder.init();
    }
}

/// Log lines on their way out.
mod log_line {
    use std::io::Write;

    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
    use tracing_subscriber::registry::LookupSpan;

    /// Hands out a [`Line`] per event.
    pub struct Redacting;

    impl<'a> MakeWriter<'a> for Redacting {
        type Writer = Line;
        fn make_writer(&'a self) -> Line {
            Line(Vec::with_capacity(256))
        }
    }

    /// One event's text, redacted and written to stderr in one write when the formatter is done with it.
    pub struct Line(Vec<u8>);

    impl Write for Line {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Drop for Line {
        fn drop(&mut self) {
            let text = String::from_utf8_lossy(&self.0);
            let clean = autodev::redact::current().clean(&text).into_owned();
            let _ = std::io::stderr().lock().write_all(clean.as_bytes());
        }
    }

    /// `<priority>target: message fields`, for journald.
    pub struct Journal;

    impl<S, N> FormatEvent<S, N> for Journal
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &Event<'_>,
        ) -> std::fmt::Result {
            let priority = match *event.metadata().level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                Level::DEBUG | Level::TRACE => 7,
            };
            write!(writer, "<{priority}>{}: ", event.metadata().target())?;
            ctx.format_fields(writer.by_ref(), event)?;
            writeln!(writer)
        }
    }
}
