//! The library's one error type.
//!
//! Every error carries a [`Kind`] so the binary can map it to an exit code (bad input is 2),
//! and a one-line message that quotes the offending input and says what would be accepted.

use std::fmt;

/// What went wrong, coarsely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The user's input (flags, plan file, profile) is invalid. Exit code 2.
    Input,
    /// A size overflowed 64 bits: the plan is out of any representable range. Exit code 2.
    Overflow,
    /// Reading a file failed.
    Io,
    /// The trainer failed for a reason other than bad input.
    Runtime,
}

#[derive(Debug)]
pub struct Error {
    kind: Kind,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// A bad value for `field`: `got` is quoted, `accepted` says what would do.
    pub fn invalid(field: &str, got: impl fmt::Display, accepted: impl fmt::Display) -> Error {
        Error {
            kind: Kind::Input,
            message: format!("invalid {field}: got {got}, expected {accepted}"),
        }
    }
    /// A free-form input error.
    pub fn input(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Input,
            message: message.into(),
        }
    }
    pub fn overflow(what: &str) -> Error {
        Error {
            kind: Kind::Overflow,
            message: format!(
                "{what} overflows 64-bit bytes: the plan is far outside any real size"
            ),
        }
    }
    pub fn io(path: &std::path::Path, err: std::io::Error) -> Error {
        Error {
            kind: Kind::Io,
            message: format!("cannot read {}: {err}", path.display()),
        }
    }
    pub fn runtime(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Runtime,
            message: message.into(),
        }
    }
    /// Exit code for this error: 2 for bad input, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self.kind {
            Kind::Input | Kind::Overflow | Kind::Io => 2,
            Kind::Runtime => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
