//! autodev-top: `autodevctl top` (which runs this binary). Apart from autodevctl because it links a terminal UI
//! stack that no other command needs at start-up.

use std::process::ExitCode;

use autodev::ctl::{self, Cli};
use clap::Parser;

fn main() -> ExitCode {
    ctl::finish(ctl::run_top(Cli::parse()))
}
