//! `memplan replay`: reads a recorded allocation trace (a run's `train --trace FILE.json`, or
//! the estimator's `timeline --format json`) for [`crate::estimate::simulate::replay`].

use std::path::Path;

use crate::error::{Error, Result};
use crate::trace::Trace;

/// Largest trace file read: a recorded step of a large model is tens of MB of JSON.
const MAX_TRACE_BYTES: u64 = 1 << 30;

/// Reads a memplan.trace/1 document.
pub fn read(path: &Path) -> Result<Trace> {
    let text = crate::input::read_text_up_to(path, "trace", MAX_TRACE_BYTES)?;
    serde_json::from_str(&text).map_err(|e| {
        Error::input(format!(
            "trace {}: not a memplan.trace/1 document ({e}); write one with \
             `memplan train --trace FILE.json` or `memplan timeline --format json`",
            path.display()
        ))
    })
}
