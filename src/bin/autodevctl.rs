//! autodevctl: parse the command line, run it against autodevd, map the result to an exit code.

use std::process::ExitCode;

use autodev::ctl::{self, Cli};
use clap::Parser;

fn main() -> ExitCode {
    if let Some(answer) = ctl::askpass_answer() {
        println!("{answer}");
        return ExitCode::SUCCESS;
    }
    ctl::finish(ctl::run(Cli::parse()))
}
