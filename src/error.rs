//! The library's one error type.
//!
//! Every error carries a [`Kind`] so the binary can map it to an exit code (bad input is 2,
//! a failure to write output or an internal failure is 3), and a one-line message that names
//! the offending field, quotes the value (cut short by [`crate::input::quote`]) and says what
//! would be accepted.

use std::fmt;

/// What went wrong, coarsely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The user's input (flags, plan file, profile) is invalid. Exit code 2.
    Input,
    /// A size overflowed 64 bits: the plan is out of any representable range. Exit code 2.
    Overflow,
    /// Reading an input file failed (missing, unreadable). Exit code 2: the path is input.
    Io,
    /// Writing the output failed (a full disk, a closed file). Exit code 3.
    Output,
    /// The trainer or the program failed for a reason other than bad input. Exit code 3.
    Runtime,
}

#[derive(Debug)]
pub struct Error {
    kind: Kind,
    /// The plan field, flag or file key at fault, when one is.
    field: Option<String>,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exit code: the plan fits.
pub const EXIT_FITS: u8 = 0;
/// Exit code: the plan does not fit (GPU or host), or a trainer run ran out of memory.
pub const EXIT_DOES_NOT_FIT: u8 = 1;
/// Exit code: bad input (flags, plan, profile, config); nothing was estimated.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code: output could not be written, or an internal failure.
pub const EXIT_FAILURE: u8 = 3;

impl Error {
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// The field, flag or key the error is about, if any.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }
    /// A bad value for `field`: `got` is quoted (cut short), `accepted` says what would do.
    pub fn invalid(field: &str, got: impl fmt::Display, accepted: impl fmt::Display) -> Error {
        let got = crate::input::quote(&got.to_string());
        Error {
            kind: Kind::Input,
            field: Some(field.to_string()),
            message: format!("invalid {field}: got {got}, expected {accepted}"),
        }
    }
    /// A free-form input error.
    pub fn input(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Input,
            field: None,
            message: message.into(),
        }
    }
    pub fn overflow(what: &str) -> Error {
        Error {
            kind: Kind::Overflow,
            field: None,
            message: format!(
                "{what} overflows 64-bit bytes: the plan is far outside any real size"
            ),
        }
    }
    pub fn io(path: &std::path::Path, err: std::io::Error) -> Error {
        Error {
            kind: Kind::Io,
            field: None,
            message: format!(
                "cannot read {}: {err}",
                crate::input::quote(&path.display().to_string())
            ),
        }
    }
    /// Writing output failed.
    pub fn output(err: std::io::Error) -> Error {
        Error {
            kind: Kind::Output,
            field: None,
            message: format!("cannot write output: {err}"),
        }
    }
    pub fn runtime(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Runtime,
            field: None,
            message: message.into(),
        }
    }
    /// The same error, its message prefixed with `context` (e.g. the file it came from).
    pub fn context(self, context: impl fmt::Display) -> Error {
        Error {
            message: format!("{context}: {}", self.message),
            ..self
        }
    }
    /// The same error told in the user's own words: when it is about plan field `from`, the
    /// message names `to` (e.g. the torchtitan TOML key the value came from) instead.
    pub fn rename_field(self, from: &str, to: &str) -> Error {
        if self.field.as_deref() != Some(from) {
            return self;
        }
        let prefix = format!("invalid {from}:");
        let message = match self.message.strip_prefix(&prefix) {
            Some(rest) => format!("invalid {to} (plan field {from}):{rest}"),
            None => self.message,
        };
        Error {
            field: Some(to.to_string()),
            message,
            ..self
        }
    }
    /// Exit code for this error: [`EXIT_BAD_INPUT`] for bad input, [`EXIT_FAILURE`] otherwise.
    pub fn exit_code(&self) -> u8 {
        match self.kind {
            Kind::Input | Kind::Overflow | Kind::Io => EXIT_BAD_INPUT,
            Kind::Output | Kind::Runtime => EXIT_FAILURE,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_in_the_message() {
        let e = Error::invalid("host_ram", "9".repeat(50_000_000), "a size");
        assert!(e.to_string().len() < 200, "{}", e.to_string().len());
        assert_eq!(e.field(), Some("host_ram"));
    }

    #[test]
    fn renamed_errors_name_the_source_key() {
        let e = Error::invalid("batch.seq_len", 0, "an integer from 1 to 16777216")
            .rename_field("batch.seq_len", "training.seq_len");
        assert_eq!(
            e.to_string(),
            "invalid training.seq_len (plan field batch.seq_len): got 0, expected an integer from 1 to 16777216"
        );
        assert_eq!(e.field(), Some("training.seq_len"));
    }

    #[test]
    fn exit_codes_separate_input_from_failures() {
        assert_eq!(Error::input("x").exit_code(), 2);
        assert_eq!(Error::overflow("x").exit_code(), 2);
        assert_eq!(Error::runtime("x").exit_code(), 3);
        assert_eq!(
            Error::output(std::io::Error::other("disk full")).exit_code(),
            3
        );
    }
}
