//! autodev-doctor: `autodevctl doctor` (which runs this binary). Apart from autodevctl because it talks to GitHub:
//! the HTTP and TLS stack it links would slow every other command's start.

use std::process::ExitCode;

use autodev::ctl::{self, Cli};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match ctl::run_doctor(cli) {
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
