//! A simulation of PyTorch's CUDA caching allocator, replaying one device's alloc/free events
//! and reporting the bytes it reserves over time.
//!
//! The estimator models reserved memory as allocated plus one fitted fragmentation constant
//! ([`crate::estimate::overhead`]); this module is the first step towards deriving it from
//! the allocator's own rules instead. It reimplements (it does not copy) the behaviour of
//! `DeviceCachingAllocator` in PyTorch 2.11's c10/cuda/CUDACachingAllocator.cpp (whose
//! generic core also appears as c10/core/CachingDeviceAllocator.h) and of the
//! `PYTORCH_CUDA_ALLOC_CONF` parser in c10/core/AllocatorConfig.cpp. Each rule's doc comment
//! names the source function it follows. Modelled:
//!
//! - request rounding ([`round_size`]: 512 B multiples, `roundup_power2_divisions`);
//! - small (<= 1 MiB, 2 MiB segments) and large pools, segment sizes
//!   ([`allocation_size`]: 20 MiB below 10 MiB, else 2 MiB multiples);
//! - best fit by `(stream, size, address)` (`get_free_block`), with the `max_split_size` and
//!   `max_non_split_rounding_size` rules for oversize blocks;
//! - splitting (`should_split`, `alloc_found_block`) and coalescing on free
//!   (`free_block`, `try_merge_blocks`);
//! - per-stream reuse: a free block serves only its own stream;
//! - the out-of-memory path under a capacity: `release_available_cached_blocks`, then
//!   `release_cached_blocks` (every unsplit cached segment), retry, else [`Oom`];
//! - `expandable_segments:True`: one growing segment per stream and pool, mapped in whole
//!   pages (2 MiB small pool, 20 MiB large pool, as `find_expandable_block` sizes them),
//!   best fit counting the unmapped tail, and unmapping of free pages on the OOM path.
//!
//! Left out, because a single-process training trace does not exercise it or cannot
//! express it: `recordStream` and the CUDA events that delay reuse of a block used on another
//! stream (a free here is complete at once); CUDA graph private pools and `MemPool`s;
//! `garbage_collection_threshold` (refused by the parser); `empty_cache` calls inside the
//! trace; free-memory callbacks; IPC; the `cudaMallocAsync` backend. Addresses are
//! simulated (segments laid out in allocation order), so ties between equal-size blocks
//! break by allocation order where the real allocator breaks them by the driver's
//! addresses. The simulated expandable segment's address space never runs out (PyTorch's is
//! 1 1/8 of device memory), and the capacity is applied both as the `set_fraction` check
//! before a new segment and as the physical limit on mapped pages.

mod conf;
mod sim;

pub use conf::{AllocConf, MIN_SPLIT_MB, ROUNDUP_INTERVALS};
pub use sim::{
    allocation_size, round_size, BlockInfo, Counters, Oom, SegmentEvent, SegmentInfo, SegmentOp,
    SimError, Simulator, LARGE_BUFFER, MAX_REQUEST, MIN_BLOCK_SIZE, MIN_LARGE_ALLOC, ROUND_LARGE,
    SMALL_BUFFER, SMALL_SIZE,
};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::units::Bytes;

/// One allocator call of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Event {
    /// `bytes` requested for allocation `id` on `stream`.
    Alloc { id: u64, bytes: u64, stream: u32 },
    /// Allocation `id` freed.
    Free { id: u64 },
}

/// Where an out-of-memory error stopped a replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OomAt {
    /// Index of the failing event.
    pub event: usize,
    pub id: u64,
    pub requested_bytes: u64,
    pub alloc_size_bytes: u64,
    pub allocated_bytes: u64,
    pub reserved_bytes: u64,
    pub capacity_bytes: u64,
}

/// What a replay produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    pub peak_allocated_bytes: Bytes,
    pub peak_reserved_bytes: Bytes,
    /// At the end of the replay (or at the OOM).
    pub allocated_bytes: Bytes,
    pub reserved_bytes: Bytes,
    /// Reserved bytes after each applied event, in order; shorter than the trace when an
    /// OOM stopped it.
    pub reserved_after: Vec<u64>,
    /// The first out-of-memory event; the replay stops there, as training would.
    pub oom: Option<OomAt>,
    pub segments: usize,
    pub device_allocs: u64,
    pub device_frees: u64,
    pub alloc_retries: u64,
}

/// Replays `events` on a fresh allocator with `conf` and an optional `capacity` (bytes the
/// allocator may reserve). A trace that frees an id that is not live, or allocates a live id
/// again, is an input error; running out of memory is a result ([`Report::oom`]).
///
/// ```
/// use memplan::allocator::{replay, AllocConf, Event};
/// let events = [
///     Event::Alloc { id: 1, bytes: 11 << 20, stream: 0 }, // 11 MiB -> 12 MiB segment
///     Event::Free { id: 1 },
/// ];
/// let r = replay(&events, &AllocConf::default(), None).unwrap();
/// assert_eq!(r.reserved_after, vec![12 << 20, 12 << 20]);
/// // The 1 MiB left over is not split off (a large block splits only when more than 1 MiB
/// // would remain), so the whole 12 MiB block counts as allocated.
/// assert_eq!(r.peak_allocated_bytes.get(), 12 << 20);
/// ```
pub fn replay(events: &[Event], conf: &AllocConf, capacity: Option<u64>) -> Result<Report> {
    let mut sim = Simulator::new(conf.clone(), capacity);
    sim.reserve(events.len() / 2);
    let mut reserved_after = Vec::with_capacity(events.len());
    let mut oom = None;
    for (k, ev) in events.iter().enumerate() {
        let r = match *ev {
            Event::Alloc { id, bytes, stream } => sim.alloc(id, bytes, stream),
            Event::Free { id } => sim.free(id),
        };
        match r {
            Ok(()) => reserved_after.push(sim.reserved().get()),
            Err(SimError::Oom(o)) => {
                oom = Some(OomAt {
                    event: k,
                    id: o.id,
                    requested_bytes: o.requested,
                    alloc_size_bytes: o.alloc_size,
                    allocated_bytes: o.allocated,
                    reserved_bytes: o.reserved,
                    capacity_bytes: o.capacity,
                });
                break;
            }
            Err(e) => return Err(Error::input(format!("allocator trace event {k}: {e}"))),
        }
    }
    let c = sim.counters();
    Ok(Report {
        peak_allocated_bytes: sim.peak_allocated(),
        peak_reserved_bytes: sim.peak_reserved(),
        allocated_bytes: sim.allocated(),
        reserved_bytes: sim.reserved(),
        reserved_after,
        oom,
        segments: sim.segments(),
        device_allocs: c.device_allocs,
        device_frees: c.device_frees,
        alloc_retries: c.alloc_retries,
    })
}
