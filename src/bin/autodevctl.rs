//! autodevctl: parse the command line, run it against autodevd, map the result to an exit code.

use std::process::ExitCode;

use autodev::ctl::{self, Cli};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match ctl::run(cli) {
        Ok(()) => ExitCode::from(ctl::exit::OK),
        Err(e) => {
            let message = e.render();
            if !message.is_empty() {
                eprintln!("{message}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
