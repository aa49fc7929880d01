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
            eprintln!("autodevd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs through tracing: to journald when systemd started us with our output on the journal (levels and fields
/// kept), else readable lines on stderr. The level comes from RUST_LOG, else `logging.level`, else info.
fn init_logging(config: &Config) {
    use tracing_subscriber::prelude::*;
    let filter =
        std::env::var("RUST_LOG").ok().or_else(|| config.raw.logging.level.clone()).unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("autodevd: log filter {filter:?} is invalid ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let journal = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(|| tracing_journald::layer().ok().map(|l| l.with_syslog_identifier("autodevd".into())))
        .flatten();
    match journal {
        Some(layer) => tracing_subscriber::registry().with(filter).with(layer).init(),
        // Colours only for a person at a terminal: a log file or a pipe gets plain text.
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
}
