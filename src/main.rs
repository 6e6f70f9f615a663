//! The `diffuse` command-line tool: parses flags, calls the library, reports.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
