//! The `memplan` binary: parse, run, print errors on one line, map them to exit codes (0 fits,
//! 1 does not fit, 2 bad input, 3 output or internal failure).

use std::process::ExitCode;

fn main() -> ExitCode {
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    ExitCode::from(memplan::cli::main_guarded(
        std::env::args_os(),
        &mut out,
        &mut err,
    ))
}
