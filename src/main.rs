//! The `memplan` binary: parse, run, print errors on one line, map them to exit codes (0 fits,
//! 1 does not fit, 2 bad input, 3 output or internal failure).

use std::process::ExitCode;

fn main() -> ExitCode {
    // A panic is a bug, never an answer: report it on one line as an internal failure (exit
    // 3) instead of the default backtrace and exit code 101.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal failure{at} (please report it): {info}");
    }));
    let code = std::panic::catch_unwind(|| {
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
        memplan::cli::main_with(std::env::args_os(), &mut out, &mut err)
    })
    .unwrap_or(memplan::error::EXIT_FAILURE);
    ExitCode::from(code)
}
