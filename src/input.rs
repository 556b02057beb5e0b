//! Reading user files and quoting user values: the guards every input path shares.
//!
//! Plan files, model configs, GPU profiles, torchtitan TOMLs and validation matrices are all
//! small: the largest real one (a torchtitan 405B config) is a few KiB. Files are capped at
//! [`MAX_INPUT_BYTES`] before they are read, so a mistaken path to a checkpoint or a data set
//! is refused at once instead of being read into memory; a UTF-8 byte-order mark, which
//! Windows editors write, is dropped; text that is not UTF-8 is refused with the file named.
//! Values quoted back in errors are cut to [`QUOTE_CHARS`] characters by [`quote`].

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Largest input file accepted: 1 MiB, hundreds of times what any plan or config needs.
pub const MAX_INPUT_BYTES: u64 = 1 << 20;

/// Longest echo of a user value in an error message, in characters.
pub const QUOTE_CHARS: usize = 60;

/// The text of a user file, at most [`MAX_INPUT_BYTES`], without a leading BOM. `what` names
/// the file's role in errors ("plan", "model config", "gpu profile", ...).
pub fn read_text(path: &Path, what: &str) -> Result<String> {
    read_text_up_to(path, what, MAX_INPUT_BYTES)
}

/// [`read_text`] with another size limit, for inputs that are large by nature (a recorded
/// allocation trace).
pub fn read_text_up_to(path: &Path, what: &str, max_bytes: u64) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(Error::input(format!(
            "{what} {}: is a directory, expected a file",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(Error::input(format!(
            "{what} {}: larger than {} KiB; no {what} is that large (is this the right file?)",
            path.display(),
            max_bytes >> 10
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::input(format!(
            "{what} {}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    Ok(strip_bom(&text).to_string())
}

/// `text` without a leading UTF-8 byte-order mark.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// A user value as quoted in an error: at most [`QUOTE_CHARS`] characters, on one line.
///
/// ```
/// use memplan::input::quote;
/// assert_eq!(quote("8"), "8");
/// assert_eq!(quote(&"x".repeat(1000)).chars().count(), 60);
/// assert_eq!(quote("a\nb"), "a\\nb");
/// ```
pub fn quote(value: &str) -> String {
    let one_line: String = value
        .chars()
        .flat_map(|c| match c {
            '\n' => vec!['\\', 'n'],
            '\r' => vec!['\\', 'r'],
            c if c.is_control() => vec!['?'],
            c => vec![c],
        })
        .take(QUOTE_CHARS + 1)
        .collect();
    if one_line.chars().count() > QUOTE_CHARS {
        let cut: String = one_line.chars().take(QUOTE_CHARS - 3).collect();
        format!("{cut}...")
    } else {
        one_line
    }
}

/// A longer message (a parser's, say) on one line and at most 300 characters.
pub fn quote_lines(text: &str) -> String {
    const MAX: usize = 300;
    let one: String = text
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if one.chars().count() > MAX {
        let cut: String = one.chars().take(MAX - 3).collect();
        format!("{cut}...")
    } else {
        one
    }
}
