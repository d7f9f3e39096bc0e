//! `meshgate`: the gateway daemon (`meshgate run`) and the operators' CLI, in one binary.
//!
//! main stays thin: parse the command line, run the command, turn its outcome into an exit code
//! (documented in docs/operations.md and `meshgate --help`).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
