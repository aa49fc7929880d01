//! autodev-doctor: `autodevctl doctor` (which runs this binary). Apart from autodevctl because it talks to GitHub:
//! the HTTP and TLS stack it links would slow every other command's start.

use std::process::ExitCode;

use autodev::ctl::{self, Cli};
use clap::Parser;

fn main() -> ExitCode {
    ctl::finish(ctl::run_doctor(Cli::parse()))
}
