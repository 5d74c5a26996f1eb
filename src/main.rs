use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    flotilla::without_huge_pages();
    flotilla::cli::execute(flotilla::cli::Cli::parse())
}
