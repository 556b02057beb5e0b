//! `memplan replay`: reads a recorded allocation trace (a run's `train --trace FILE.json`, or
//! the estimator's `timeline --format json`) for [`crate::estimate::simulate::replay`].

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::trace::Trace;

/// Largest trace file read: a recorded step of a large model is tens of MB of JSON.
const MAX_TRACE_BYTES: u64 = 1 << 30;

/// Reads a memplan.trace/1 document.
pub fn read(path: &Path) -> Result<Trace> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::new();
    file.take(MAX_TRACE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > MAX_TRACE_BYTES {
        return Err(Error::input(format!(
            "trace {}: larger than {} MiB",
            path.display(),
            MAX_TRACE_BYTES >> 20
        )));
    }
    serde_json::from_str(crate::input::strip_bom(&text)).map_err(|e| {
        Error::input(format!(
            "trace {}: not a memplan.trace/1 document ({e}); write one with \
             `memplan train --trace FILE.json` or `memplan timeline --format json`",
            path.display()
        ))
    })
}
