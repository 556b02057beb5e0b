//! Memory counters per phase: exact allocated bytes from the counting CPU allocator on a CPU
//! run, the caching allocator's allocated and reserved bytes on a CUDA run, and host bytes
//! (offloaded state) from the counting allocator on both.

use serde::Serialize;

use super::ffi::{self, Channel};
use crate::error::{Error, Result};

/// Peaks of one phase of one step.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PhaseMemory {
    /// Device bytes allocated when the phase began.
    pub start_allocated_bytes: u64,
    /// Highest device bytes allocated during the phase.
    pub peak_allocated_bytes: u64,
    /// Device bytes allocated when the phase ended.
    pub end_allocated_bytes: u64,
    /// CUDA only: highest bytes the caching allocator reserved during the phase.
    pub peak_reserved_bytes: Option<u64>,
    /// CUDA only: device bytes in use by the whole process at the end of the phase (driver's
    /// total minus free: reserved plus CUDA context, kernels, library workspaces).
    pub device_used_bytes: Option<u64>,
    /// Highest host bytes allocated during the phase by counted host tensors (offloaded state;
    /// on a CUDA run every CPU tensor the trainer makes).
    pub peak_host_bytes: u64,
}

/// Reads and resets the counters of one device. Every figure is relative to what was
/// allocated when the meter was made (the run's start), so earlier tensors do not count.
#[derive(Clone, Copy, Debug)]
pub struct Meter {
    /// CUDA device index, or None for a CPU run.
    pub cuda: Option<i64>,
    base: u64,
    host_base: u64,
}

fn rt(e: ffi::ShimError) -> Error {
    Error::runtime(format!("reading allocator counters: {e}"))
}

impl Meter {
    pub fn new(cuda: Option<i64>) -> Result<Meter> {
        let mut m = Meter {
            cuda,
            base: 0,
            host_base: 0,
        };
        m.base = m.allocated()?;
        m.host_base = ffi::counter(Channel::Host).0;
        Ok(m)
    }

    /// Device bytes allocated now.
    pub fn allocated(&self) -> Result<u64> {
        let raw = match self.cuda {
            None => ffi::counter(Channel::Device).0,
            Some(d) => ffi::accelerator_stats(d).map_err(rt)?.allocated,
        };
        Ok(raw.saturating_sub(self.base))
    }

    /// Host bytes allocated now by counted host tensors.
    pub fn host(&self) -> u64 {
        ffi::counter(Channel::Host).0.saturating_sub(self.host_base)
    }

    /// Starts a phase: peaks are reset to the current bytes.
    pub fn start(&self) -> Result<u64> {
        if let Some(d) = self.cuda {
            ffi::accelerator_synchronize(d).map_err(rt)?;
            ffi::accelerator_reset_peak(d).map_err(rt)?;
        } else {
            ffi::reset_peak(Channel::Device);
        }
        ffi::reset_peak(Channel::Host);
        self.allocated()
    }

    /// Ends a phase begun with [`Meter::start`].
    pub fn finish(&self, start: u64) -> Result<PhaseMemory> {
        let host = ffi::counter(Channel::Host).1.saturating_sub(self.host_base);
        let b = |v: u64| v.saturating_sub(self.base);
        match self.cuda {
            None => {
                let (cur, peak) = ffi::counter(Channel::Device);
                Ok(PhaseMemory {
                    start_allocated_bytes: start,
                    peak_allocated_bytes: b(peak),
                    end_allocated_bytes: b(cur),
                    peak_reserved_bytes: None,
                    device_used_bytes: None,
                    peak_host_bytes: host,
                })
            }
            Some(d) => {
                ffi::accelerator_synchronize(d).map_err(rt)?;
                let s = ffi::accelerator_stats(d).map_err(rt)?;
                let used = ffi::accelerator_mem_info(d)
                    .ok()
                    .map(|(free, total)| total.saturating_sub(free));
                Ok(PhaseMemory {
                    start_allocated_bytes: start,
                    peak_allocated_bytes: b(s.allocated_peak),
                    end_allocated_bytes: b(s.allocated),
                    peak_reserved_bytes: Some(s.reserved_peak),
                    device_used_bytes: used,
                    peak_host_bytes: host,
                })
            }
        }
    }

    /// Folds a later measurement of the same phase (another micro-batch) into `acc`.
    pub fn merge(acc: &mut Option<PhaseMemory>, m: PhaseMemory) {
        match acc {
            None => *acc = Some(m),
            Some(a) => {
                a.peak_allocated_bytes = a.peak_allocated_bytes.max(m.peak_allocated_bytes);
                a.end_allocated_bytes = m.end_allocated_bytes;
                a.peak_reserved_bytes = match (a.peak_reserved_bytes, m.peak_reserved_bytes) {
                    (Some(x), Some(y)) => Some(x.max(y)),
                    (x, y) => x.or(y),
                };
                a.device_used_bytes = m.device_used_bytes.or(a.device_used_bytes);
                a.peak_host_bytes = a.peak_host_bytes.max(m.peak_host_bytes);
            }
        }
    }
}
