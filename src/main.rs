use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    flotilla::cli::execute(flotilla::cli::Cli::parse())
}
