//! A PyTorch memory snapshot written from a list of allocator events, so that PyTorch's own
//! tools open a memplan timeline: `torch.cuda._memory_viz` (`trace_plot`, `segment_plot`,
//! `segsum`, `trace`, `memory`, `segments`) and the MemoryViz page at
//! <https://pytorch.org/memory_viz>.
//!
//! The bytes are a Python pickle of the dictionary `torch.cuda.memory._snapshot()` returns
//! (torch 2.11, `THCPModule_memorySnapshot` in `torch/csrc/cuda/Module.cpp`), the file
//! `torch.cuda.memory._dump_snapshot()` writes:
//! ```text
//! {
//!   "segments": [{ "device": 0, "address": int, "total_size": int,
//!                  "allocated_size": int, "active_size": int, "requested_size": int,
//!                  "stream": int, "segment_type": "large" | "small",
//!                  "segment_pool_id": (0, 0), "is_expandable": bool,
//!                  "frames": [frame], "category"?: str,
//!                  "blocks": [{ "address": int, "size": int, "requested_size": int,
//!                               "state": "active_allocated" | "active_pending_free"
//!                                        | "inactive",
//!                               "frames": [frame], "category"?: str }] }],
//!   "device_traces": [[{ "action": "alloc" | "free_requested" | "free_completed"
//!                                  | "segment_alloc" | "segment_free" | "segment_map"
//!                                  | "segment_unmap" | "oom" | "snapshot",
//!                        "addr": int (or "device_free": int for "oom"), "size": int,
//!                        "stream": int, "time_us": int, "compile_context": str,
//!                        "user_metadata": str, "frames": [frame], "category"?: str }]],
//!   "allocator_settings": { "PYTORCH_CUDA_ALLOC_CONF": "", "max_split_size": -1,
//!                           "garbage_collection_threshold": 0.0,
//!                           "expandable_segments": bool,
//!                           "pinned_num_register_threads": 1,
//!                           "release_lock_on_cudamalloc": False,
//!                           "pinned_use_cuda_host_register": False,
//!                           "roundup_power2_divisions": {} },
//!   "external_annotations": []
//! }
//! frame = { "filename": str, "line": int, "name": str }
//! ```
//! `segments` is the allocator's state after the last event: MemoryViz's "Allocator State
//! History" starts from it and undoes the trace backwards, so the two must agree, and
//! [`snapshot`] rejects events that would not (a block outside a live segment, a free of an
//! unknown block). Blocks tile their segment, gaps as `inactive` blocks, as
//! `_memory_viz.segsum` asserts. As in torch's snapshot, an expandable segment is listed
//! as one segment per contiguous mapped range (`segment_map` ranges that touch merge;
//! `segment_unmap` cuts them).
//!
//! [`from_trace`] makes the events of a [`Trace`] by replaying it through the
//! caching-allocator simulation ([`crate::allocator::Simulator`]), so that the snapshot
//! shows the simulated addresses, segments and cache reuse.
//!
//! Categories: torch's snapshot has none, but MemoryViz colours the "Active Memory Timeline"
//! by a trace entry's `category` key when there is one (`annotate_snapshot` in
//! `torch/utils/viz/MemoryViz.js`; torch's own `_profile_to_snapshot` writes it), and
//! `_memory_viz.py` reads keys by name and ignores the rest. So a non-empty
//! [`VizEvent::category`] goes into the `category` key and also before every frame's name
//! (`"activations: layers.3.attention"`), or, with no frames, as a frame of its own, so
//! that every viewer shows it. MemoryViz (at the time of writing) throws while loading when
//! categories are used but none is `"unknown"` (a typo, `snapshot.categores.push`), so a
//! final `snapshot` entry with category `"unknown"` is added in that case; no tool counts
//! a `snapshot` entry as memory.

use std::collections::BTreeMap;

use crate::allocator::{AllocConf, SegmentOp, SimError, Simulator};
use crate::error::{Error, Result};
use crate::trace::{MarkKind, Op, Section, Trace};

/// What the allocator did: the `action` of a torch trace entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// A block was handed out: `addr` is the block's, `size` the bytes requested (torch
    /// records `orig_size`, not the rounded block size; see [`VizEvent::block_size`]).
    Alloc,
    /// The block's tensor died; its memory waits for streams to finish.
    FreeRequested,
    /// The block's memory is free for reuse (after [`Action::FreeRequested`]).
    FreeCompleted,
    /// The allocator reserved a segment from CUDA (`cudaMalloc`).
    SegmentAlloc,
    /// The allocator returned a segment to CUDA (`cudaFree`); it must hold no live block.
    SegmentFree,
    /// Pages mapped into an expandable segment (`cuMemMap`, `expandable_segments:True`):
    /// reserved grows by `size` at `addr`.
    SegmentMap,
    /// Free pages of an expandable segment unmapped; the range must hold no live block.
    SegmentUnmap,
    /// An allocation of `size` bytes failed; `addr` is ignored.
    Oom,
    /// A marker, e.g. the end of a step; no memory changes.
    Snapshot,
}

impl Action {
    /// The name torch writes.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Alloc => "alloc",
            Action::FreeRequested => "free_requested",
            Action::FreeCompleted => "free_completed",
            Action::SegmentAlloc => "segment_alloc",
            Action::SegmentFree => "segment_free",
            Action::SegmentMap => "segment_map",
            Action::SegmentUnmap => "segment_unmap",
            Action::Oom => "oom",
            Action::Snapshot => "snapshot",
        }
    }
}

/// One stack frame, as torch records it (`filename:line:name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub filename: String,
    pub line: u32,
    pub name: String,
}

/// One allocator event of a timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VizEvent {
    pub action: Action,
    /// Device address of the block or segment.
    pub addr: u64,
    /// Bytes of the segment or mapped range; for the block actions, the bytes requested
    /// (as torch records them); for [`Action::Oom`], the bytes asked for.
    pub size: u64,
    /// For [`Action::Alloc`]: the allocator's block, when larger than `size` (rounding to
    /// 512 B, or a block that was not split). It goes into the snapshot's `segments`
    /// (`size` of the block, `requested_size` = `size`), as torch lists them. `None`: the
    /// block is `size` bytes.
    pub block_size: Option<u64>,
    /// CUDA stream number (0: the default stream).
    pub stream: u32,
    /// What the memory holds (`"activations"`, `"parameters"`); empty for none.
    pub category: String,
    /// Where it was allocated, innermost first as torch records it.
    pub frames: Vec<Frame>,
    /// When, in microseconds; MemoryViz shows it as Unix time (torch writes the wall clock).
    pub time_us: u64,
}

impl VizEvent {
    /// An event on stream 0 at time 0, with no category and no frames.
    pub fn new(action: Action, addr: u64, size: u64) -> VizEvent {
        VizEvent {
            action,
            addr,
            size,
            block_size: None,
            stream: 0,
            category: String::new(),
            frames: vec![],
            time_us: 0,
        }
    }
    /// The same event with a category.
    pub fn category(mut self, category: impl Into<String>) -> VizEvent {
        self.category = category.into();
        self
    }
    /// The same event with a block of `bytes` (see [`VizEvent::block_size`]).
    pub fn block_size(mut self, bytes: u64) -> VizEvent {
        self.block_size = Some(bytes);
        self
    }
    /// The same event on `stream`.
    pub fn stream(mut self, stream: u32) -> VizEvent {
        self.stream = stream;
        self
    }
    /// The same event at `time_us`.
    pub fn at(mut self, time_us: u64) -> VizEvent {
        self.time_us = time_us;
        self
    }
    /// The same event with one more (outer) frame.
    pub fn frame(mut self, filename: &str, line: u32, name: &str) -> VizEvent {
        self.frames.push(Frame {
            filename: filename.into(),
            line,
            name: name.into(),
        });
        self
    }
}

/// The high-water marks of a timeline, by replaying it as MemoryViz does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Most bytes allocated at once by the trace's sizes (`alloc` adds, `free_completed`
    /// subtracts): the top of MemoryViz's "Active Memory Timeline". With requested sizes,
    /// as torch and [`from_trace`] record them, that is `requested_bytes.all.peak`;
    /// `torch.cuda.max_memory_allocated()` counts whole blocks ([`VizEvent::block_size`])
    /// and can be higher.
    pub peak_allocated_bytes: u64,
    /// Most bytes in segments at once (`segment_alloc` and `segment_map` add,
    /// `segment_free` and `segment_unmap` subtract): `torch.cuda.max_memory_reserved()`.
    pub peak_reserved_bytes: u64,
    /// Bytes allocated after the last event, by the trace's sizes.
    pub end_allocated_bytes: u64,
    /// Bytes in segments after the last event.
    pub end_reserved_bytes: u64,
}

/// Replays `events` and returns their high-water marks, or the first event that is not
/// consistent with those before it.
pub fn summarize(events: &[VizEvent]) -> Result<Summary> {
    Ok(replay(events, None)?.summary)
}

/// The pickle bytes of a torch memory snapshot of `events` (see the module doc), ready to
/// save as `snapshot.pickle`. `device_capacity`, the GPU's bytes, gives the `device_free`
/// of `oom` entries (capacity less the bytes reserved then); without it they say 0.
///
/// Fails on the first event that does not follow from those before it: a block outside
/// any live segment or over another live block, overlapping segments, a free of a block
/// or segment that is not live, a segment freed while it holds live blocks, a zero size.
pub fn snapshot(events: &[VizEvent], device_capacity: Option<u64>) -> Result<Vec<u8>> {
    let state = replay(events, device_capacity)?;
    let mut trace: Vec<Value> = events
        .iter()
        .zip(&state.device_free)
        .map(|(e, free)| trace_entry(e, *free))
        .collect();
    let categories = events.iter().any(|e| !e.category.is_empty());
    if categories && !events.iter().any(|e| e.category == "unknown") {
        let last = events.last().map_or(0, |e| e.time_us);
        let marker = VizEvent::new(Action::Snapshot, 0, 0)
            .at(last)
            .category("unknown");
        trace.push(trace_entry(&marker, 0));
    }
    let segments = state
        .segments
        .iter()
        .map(|(addr, seg)| segment_value(*addr, seg, &state.blocks))
        .collect();
    let root = Value::Dict(vec![
        ("segments".into(), Value::List(segments)),
        (
            "device_traces".into(),
            Value::List(vec![Value::List(trace)]),
        ),
        (
            "allocator_settings".into(),
            allocator_settings(events.iter().any(|e| e.action == Action::SegmentMap)),
        ),
        ("external_annotations".into(), Value::List(vec![])),
    ]);
    Ok(pickle(&root))
}

/// The timeline of `trace` as PyTorch's caching allocator would record it: the trace is
/// replayed through [`Simulator`] (with `conf` and `capacity`, the bytes the allocator may
/// reserve), and every allocator call becomes the trace entries torch 2.11 writes for it,
/// with the simulated addresses. Entry by entry, following `DeviceCachingAllocator` in
/// c10/cuda/CUDACachingAllocator.cpp:
///
/// - `segment_alloc` (`alloc_block`): the new segment's address and whole size, and
///   `segment_free` (`release_block`, when the out-of-memory path returns cached
///   segments) likewise; under `expandable_segments:True`, `segment_map` (`map_block`)
///   and `segment_unmap` (`unmap_block`) with the range of whole pages mapped or
///   unmapped. Each comes before the `alloc` that caused it, in the allocator's order.
/// - `alloc` (`alloc_found_block`): the block's address and `orig_size`, the bytes
///   requested, not the rounded block (`record_trace(TraceEntry::ALLOC, block->ptr,
///   orig_size, ...)`); the block's size goes into [`VizEvent::block_size`], which the
///   snapshot's `segments` list as torch does (`size` and `requested_size`).
/// - `free_requested` (`free`) then `free_completed` (`free_block`), both with
///   `block->requested_size`; the simulation has no cross-stream uses, so a free
///   completes at once.
/// - `oom` (`malloc`, when even the retry after releasing the cache fails): `size` is
///   `params.size()`, the rounded request; [`snapshot`] fills `device_free` from its
///   capacity. The timeline stops there, as training would.
/// - Zero-byte allocations get no entries (`allocate` hands out a null pointer without
///   calling `malloc`).
///
/// Every block entry carries the trace event's [`crate::trace::Category::name`] as
/// `category` and one frame `{filename: "memplan", line: 0, name: owner}` naming the
/// module and part (`layers.3.attention`); segment entries carry the frame of the
/// allocation that caused them and no category. `time_us` is the index of the trace
/// event, `stream` the trace's stream number (0 the default stream). Each
/// [`crate::trace::Mark`] becomes a `snapshot` entry before the events it precedes, with
/// its name as the frame (MemoryViz lists it among the events; no tool counts it as
/// memory).
///
/// Errors on a trace that is not consistent ([`Trace::running`]).
///
/// ```
/// use memplan::allocator::AllocConf;
/// use memplan::output::memory_viz::{from_trace, summarize, Action};
/// use memplan::trace::{Category, Event, Module, Op, Owner, Part, Source, Trace};
/// let owner = Owner::new(Module::Layer(0), Part::Attention);
/// let category = Category::Activations;
/// let ev = |op, id, bytes| Event { op, id, bytes, category, owner, stream: 0 };
/// let trace = Trace {
///     source: Source::Predicted,
///     stage: 0,
///     rank: 0,
///     capacity_bytes: None,
///     events: vec![ev(Op::Alloc, 1, 1000), ev(Op::Free, 1, 1000)],
///     marks: vec![],
/// };
/// let events = from_trace(&trace, &AllocConf::default(), None).unwrap();
/// let actions: Vec<_> = events.iter().map(|e| e.action).collect();
/// use Action::*;
/// assert_eq!(actions, [SegmentAlloc, Alloc, FreeRequested, FreeCompleted]);
/// assert_eq!(events[0].size, 2 << 20); // a 2 MiB small-pool segment
/// assert_eq!((events[1].size, events[1].block_size), (1000, Some(1024)));
/// assert_eq!(events[1].frames[0].name, "layers.0.attention");
/// assert_eq!(summarize(&events).unwrap().peak_reserved_bytes, 2 << 20);
/// ```
pub fn from_trace(trace: &Trace, conf: &AllocConf, capacity: Option<u64>) -> Result<Vec<VizEvent>> {
    trace.running()?;
    let mut sim = Simulator::new(conf.clone(), capacity);
    sim.reserve(trace.events.len() / 2);
    sim.log_segments(true);
    let mut out = Vec::with_capacity(trace.events.len() * 2 + trace.marks.len());
    let mut sorted: Vec<_> = trace.marks.iter().collect();
    sorted.sort_by_key(|m| m.at); // stable: marks at one moment keep their order
    let mut marks = sorted.into_iter().peekable();
    for (k, e) in trace.events.iter().enumerate() {
        while let Some(m) = marks.next_if(|m| m.at <= k) {
            out.push(mark_event(&m.kind, m.first_step, k as u64));
        }
        let time = k as u64;
        let owner = e.owner.to_string();
        let at = |action, addr, size| {
            VizEvent::new(action, addr, size)
                .stream(e.stream)
                .at(time)
                .frame("memplan", 0, &owner)
        };
        let block = match e.op {
            Op::Alloc => None,
            Op::Free => sim.block_of(e.id),
        };
        let result = match e.op {
            Op::Alloc => sim.alloc(e.id, e.bytes, e.stream),
            Op::Free => sim.free(e.id),
        };
        for s in sim.drain_segment_events() {
            let action = match s.op {
                SegmentOp::Alloc => Action::SegmentAlloc,
                SegmentOp::Free => Action::SegmentFree,
                SegmentOp::Map => Action::SegmentMap,
                SegmentOp::Unmap => Action::SegmentUnmap,
            };
            out.push(at(action, s.addr, s.size).stream(s.stream));
        }
        let category = e.category.name();
        match result {
            Ok(()) => match (e.op, block) {
                (Op::Alloc, _) => {
                    if let Some((addr, size)) = sim.block_of(e.id) {
                        out.push(
                            at(Action::Alloc, addr, e.bytes)
                                .block_size(size)
                                .category(category),
                        );
                    }
                }
                (Op::Free, Some((addr, _))) => {
                    out.push(at(Action::FreeRequested, addr, e.bytes).category(category));
                    out.push(at(Action::FreeCompleted, addr, e.bytes).category(category));
                }
                (Op::Free, None) => {} // a zero-byte allocation
            },
            Err(SimError::Oom(o)) => {
                out.push(at(Action::Oom, 0, o.rounded).category(category));
                return Ok(out);
            }
            Err(err) => {
                return Err(Error::input(format!("trace event {k}: {err}")));
            }
        }
    }
    let end = trace.events.len() as u64;
    for m in marks {
        out.push(mark_event(&m.kind, m.first_step, end));
    }
    Ok(out)
}

/// A `snapshot` entry naming a trace mark: "step 1: forward begins (micro-batch 0)".
fn mark_event(kind: &MarkKind, first_step: bool, time_us: u64) -> VizEvent {
    let step = if first_step { "step 1" } else { "steady step" };
    let what = match kind {
        MarkKind::Begin { section, micro } => match section {
            Section::Forward | Section::Backward => {
                format!("{} begins (micro-batch {micro})", section.name())
            }
            _ => format!("{} begins", section.name()),
        },
        MarkKind::Point { phase } => format!("phase point {phase}"),
        MarkKind::End => "end".to_string(),
    };
    VizEvent::new(Action::Snapshot, 0, 0).at(time_us).frame(
        "memplan",
        0,
        &format!("{step}: {what}"),
    )
}

// ---------------------------------------------------------------------------------------
// Replay: the allocator state after each event.

#[derive(Clone, Copy)]
struct Segment<'a> {
    size: u64,
    /// The event that created it (the first mapped range, for an expandable segment).
    event: &'a VizEvent,
    /// Built by `segment_map` (an expandable segment's mapped range).
    expandable: bool,
    /// Of the small pool: a segment, or every mapped page, of at most 2 MiB.
    small: bool,
}

struct Block<'a> {
    /// Bytes the block spans in its segment.
    size: u64,
    /// Bytes requested (the event's `size`).
    requested: u64,
    /// `free_requested` seen, `free_completed` not yet.
    pending_free: bool,
    event: &'a VizEvent,
}

struct State<'a> {
    segments: BTreeMap<u64, Segment<'a>>,
    blocks: BTreeMap<u64, Block<'a>>,
    summary: Summary,
    /// Per event: the `device_free` of an `oom` entry.
    device_free: Vec<u64>,
}

fn replay(events: &[VizEvent], capacity: Option<u64>) -> Result<State<'_>> {
    let mut s = State {
        segments: BTreeMap::new(),
        blocks: BTreeMap::new(),
        summary: Summary::default(),
        device_free: Vec::with_capacity(events.len()),
    };
    let (mut allocated, mut reserved) = (0u64, 0u64);
    for (i, e) in events.iter().enumerate() {
        let bad = |why: &str| {
            Error::input(format!(
                "memory timeline event {i} ({} of {} bytes at {:#x}): {why}",
                e.action.as_str(),
                e.size,
                e.addr
            ))
        };
        let end = e
            .addr
            .checked_add(e.size)
            .ok_or_else(|| bad("address + size overflows 64 bits"))?;
        let needs_size = matches!(
            e.action,
            Action::Alloc | Action::SegmentAlloc | Action::SegmentMap | Action::SegmentUnmap
        );
        if needs_size && e.size == 0 {
            return Err(bad("size is 0; expected at least 1 byte"));
        }
        let mut device_free = 0;
        match e.action {
            Action::SegmentAlloc | Action::SegmentMap => {
                let before = s.segments.range(..end).next_back();
                if before.is_some_and(|(a, seg)| a + seg.size > e.addr) {
                    return Err(bad("overlaps a live segment"));
                }
                let seg = Segment {
                    size: e.size,
                    event: e,
                    expandable: e.action == Action::SegmentMap,
                    small: e.size <= SMALL_SEGMENT_BYTES,
                };
                s.segments.insert(e.addr, seg);
                if seg.expandable {
                    merge_mapped(&mut s.segments, e.addr);
                }
                reserved = reserved
                    .checked_add(e.size)
                    .ok_or_else(|| bad("reserved bytes overflow 64 bits"))?;
            }
            Action::SegmentUnmap => {
                let (&start, &seg) = s
                    .segments
                    .range(..=e.addr)
                    .next_back()
                    .filter(|(a, seg)| seg.expandable && end <= *a + seg.size)
                    .ok_or_else(|| bad("not inside one mapped range of an expandable segment"))?;
                if s.blocks
                    .range(..end)
                    .next_back()
                    .is_some_and(|(a, b)| a + b.size > e.addr)
                {
                    return Err(bad("the range still holds live blocks"));
                }
                let seg_end = start + seg.size;
                s.segments.remove(&start);
                if e.addr > start {
                    let size = e.addr - start;
                    s.segments.insert(start, Segment { size, ..seg });
                }
                if end < seg_end {
                    let size = seg_end - end;
                    s.segments.insert(end, Segment { size, ..seg });
                }
                reserved -= e.size;
            }
            Action::SegmentFree => {
                match s.segments.get(&e.addr) {
                    Some(seg) if seg.expandable => {
                        return Err(bad("a mapped range; expected segment_unmap"))
                    }
                    Some(seg) if seg.size == e.size => {}
                    Some(seg) => {
                        return Err(bad(&format!(
                            "the segment there has {} bytes; expected the same size",
                            seg.size
                        )))
                    }
                    None => return Err(bad("no live segment starts there")),
                }
                if s.blocks.range(e.addr..end).next().is_some() {
                    return Err(bad("the segment still holds live blocks"));
                }
                s.segments.remove(&e.addr);
                reserved -= e.size;
            }
            Action::Alloc => {
                let extent = match e.block_size {
                    Some(b) if b < e.size => {
                        return Err(bad(&format!(
                            "block of {b} bytes; expected at least the {} requested",
                            e.size
                        )))
                    }
                    Some(b) => b,
                    None => e.size,
                };
                let end = e
                    .addr
                    .checked_add(extent)
                    .ok_or_else(|| bad("address + block size overflows 64 bits"))?;
                let seg = s.segments.range(..=e.addr).next_back();
                if seg.is_none_or(|(a, seg)| end > a + seg.size) {
                    return Err(bad(
                        "not inside one live segment; expected a segment_alloc first",
                    ));
                }
                let before = s.blocks.range(..end).next_back();
                if before.is_some_and(|(a, b)| a + b.size > e.addr) {
                    return Err(bad("overlaps a live block"));
                }
                s.blocks.insert(
                    e.addr,
                    Block {
                        size: extent,
                        requested: e.size,
                        pending_free: false,
                        event: e,
                    },
                );
                allocated += e.size;
            }
            Action::FreeRequested => match s.blocks.get_mut(&e.addr) {
                Some(b) if !b.pending_free => b.pending_free = true,
                Some(_) => return Err(bad("free already requested")),
                None => return Err(bad("no live block starts there")),
            },
            Action::FreeCompleted => match s.blocks.get(&e.addr) {
                Some(b) if b.pending_free => {
                    allocated -= b.requested;
                    s.blocks.remove(&e.addr);
                }
                Some(_) => return Err(bad("expected a free_requested first")),
                None => return Err(bad("no live block starts there")),
            },
            Action::Oom => device_free = capacity.map_or(0, |c| c.saturating_sub(reserved)),
            Action::Snapshot => {}
        }
        s.device_free.push(device_free);
        s.summary.peak_allocated_bytes = s.summary.peak_allocated_bytes.max(allocated);
        s.summary.peak_reserved_bytes = s.summary.peak_reserved_bytes.max(reserved);
    }
    s.summary.end_allocated_bytes = allocated;
    s.summary.end_reserved_bytes = reserved;
    Ok(s)
}

/// Merges the mapped range at `addr` with mapped ranges of the same stream that touch it,
/// as torch lists one segment per contiguous mapped range (and MemoryViz's
/// `map_segment` merges them).
fn merge_mapped(segments: &mut BTreeMap<u64, Segment>, addr: u64) {
    let mergeable =
        |a: &Segment, b: &Segment| a.expandable && b.expandable && a.event.stream == b.event.stream;
    let mut start = addr;
    let seg = segments[&addr];
    if let Some((&p, prev)) = segments.range(..addr).next_back() {
        if p + prev.size == addr && mergeable(prev, &seg) {
            let merged = Segment {
                size: prev.size + seg.size,
                small: prev.small && seg.small,
                ..*prev
            };
            segments.remove(&addr);
            segments.insert(p, merged);
            start = p;
        }
    }
    let cur = segments[&start];
    let end = start + cur.size;
    if let Some(next) = segments.get(&end).copied() {
        if mergeable(&cur, &next) {
            segments.remove(&end);
            segments.insert(
                start,
                Segment {
                    size: cur.size + next.size,
                    small: cur.small && next.small,
                    ..cur
                },
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The snapshot as Python values.

fn int(n: u64) -> Value {
    Value::Int(n.into())
}

fn string(s: &str) -> Value {
    Value::Str(s.into())
}

/// The frames with the category in front of each name, or the category as the one frame.
fn frames_value(e: &VizEvent) -> Value {
    let frame = |filename: &str, line: u32, name: String| {
        Value::Dict(vec![
            ("filename".into(), string(filename)),
            ("line".into(), int(line.into())),
            ("name".into(), Value::Str(name)),
        ])
    };
    if e.category.is_empty() {
        return Value::List(
            e.frames
                .iter()
                .map(|f| frame(&f.filename, f.line, f.name.clone()))
                .collect(),
        );
    }
    if e.frames.is_empty() {
        return Value::List(vec![frame("memplan", 0, e.category.clone())]);
    }
    Value::List(
        e.frames
            .iter()
            .map(|f| frame(&f.filename, f.line, format!("{}: {}", e.category, f.name)))
            .collect(),
    )
}

fn with_category(mut items: Vec<(String, Value)>, e: &VizEvent) -> Value {
    if !e.category.is_empty() {
        items.push(("category".into(), string(&e.category)));
    }
    Value::Dict(items)
}

fn trace_entry(e: &VizEvent, device_free: u64) -> Value {
    let (addr_key, addr) = match e.action {
        Action::Oom => ("device_free", device_free),
        _ => ("addr", e.addr),
    };
    with_category(
        vec![
            ("action".into(), string(e.action.as_str())),
            (addr_key.into(), int(addr)),
            ("size".into(), int(e.size)),
            ("stream".into(), int(e.stream.into())),
            ("time_us".into(), int(e.time_us)),
            ("compile_context".into(), string("")),
            ("user_metadata".into(), string("")),
            ("frames".into(), frames_value(e)),
        ],
        e,
    )
}

/// A segment of 2 MiB or less is from torch's small pool (`kSmallBuffer`).
const SMALL_SEGMENT_BYTES: u64 = 2 << 20;

fn segment_value(addr: u64, seg: &Segment, blocks: &BTreeMap<u64, Block>) -> Value {
    let end = addr + seg.size;
    let mut values = vec![];
    let (mut allocated, mut active, mut requested) = (0, 0, 0);
    let mut at = addr;
    let inactive = |address: u64, size: u64| {
        Value::Dict(vec![
            ("address".into(), int(address)),
            ("size".into(), int(size)),
            ("requested_size".into(), int(0)),
            ("state".into(), string("inactive")),
            ("frames".into(), Value::List(vec![])),
        ])
    };
    for (&b_addr, b) in blocks.range(addr..end) {
        if b_addr > at {
            values.push(inactive(at, b_addr - at));
        }
        let state = if b.pending_free {
            "active_pending_free"
        } else {
            allocated += b.size;
            requested += b.requested;
            "active_allocated"
        };
        active += b.size;
        values.push(with_category(
            vec![
                ("address".into(), int(b_addr)),
                ("size".into(), int(b.size)),
                ("requested_size".into(), int(b.requested)),
                ("state".into(), string(state)),
                ("frames".into(), frames_value(b.event)),
            ],
            b.event,
        ));
        at = b_addr + b.size;
    }
    if at < end {
        values.push(inactive(at, end - at));
    }
    let e = seg.event;
    with_category(
        vec![
            ("device".into(), int(0)),
            ("address".into(), int(addr)),
            ("total_size".into(), int(seg.size)),
            ("allocated_size".into(), int(allocated)),
            ("active_size".into(), int(active)),
            ("requested_size".into(), int(requested)),
            ("stream".into(), int(e.stream.into())),
            (
                "segment_type".into(),
                string(if seg.small { "small" } else { "large" }),
            ),
            ("segment_pool_id".into(), Value::Tuple(vec![int(0), int(0)])),
            ("is_expandable".into(), Value::Bool(seg.expandable)),
            ("frames".into(), frames_value(e)),
            ("blocks".into(), Value::List(values)),
        ],
        e,
    )
}

/// torch's defaults, as `_snapshot()` reports them with no `PYTORCH_CUDA_ALLOC_CONF`
/// (`max_split_size` is `SIZE_MAX` cast to `int64_t`), but for `expandable_segments`, on
/// when the trace maps pages. No tool reads them.
fn allocator_settings(expandable: bool) -> Value {
    Value::Dict(vec![
        ("PYTORCH_CUDA_ALLOC_CONF".into(), string("")),
        ("max_split_size".into(), Value::Int(-1)),
        ("garbage_collection_threshold".into(), Value::Float(0.0)),
        ("expandable_segments".into(), Value::Bool(expandable)),
        ("pinned_num_register_threads".into(), int(1)),
        ("release_lock_on_cudamalloc".into(), Value::Bool(false)),
        ("pinned_use_cuda_host_register".into(), Value::Bool(false)),
        ("roundup_power2_divisions".into(), Value::Dict(vec![])),
    ])
}

// ---------------------------------------------------------------------------------------
// A minimal pickle encoder.

/// A Python value, as much of one as a snapshot needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Keys in insertion order, as Python keeps them.
    Dict(Vec<(String, Value)>),
}

/// The pickle opcodes [`pickle`] emits: each one that MemoryViz's own unpickler
/// (`unpickle` in `torch/utils/viz/MemoryViz.js`, pytorch/pytorch) handles and that a
/// snapshot needs. Python's `pickle` reads all of them (protocols 2 and 4; no `FRAME`,
/// which protocol 4 makes optional). Not emitted although MemoryViz reads them: `FRAME`,
/// memo opcodes (`MEMOIZE`, `BINPUT`, `BINGET`, ...), `APPEND`, `SETITEM`, `LIST`, `DICT`.
pub mod op {
    /// `PROTO n`: protocol version; MemoryViz accepts 2 to 4.
    pub const PROTO: u8 = 0x80;
    pub const STOP: u8 = b'.';
    pub const MARK: u8 = b'(';
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_LIST: u8 = b']';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const APPENDS: u8 = b'e';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    /// 1-byte unsigned int.
    pub const BININT1: u8 = b'K';
    /// 2-byte unsigned int, little-endian.
    pub const BININT2: u8 = b'M';
    /// 4-byte signed int, little-endian.
    pub const BININT: u8 = b'J';
    /// `LONG1 n bytes`: little-endian two's complement. MemoryViz reads up to 8 bytes as a
    /// Number (exact below 2^53, which device addresses and sizes are), longer as a BigInt.
    pub const LONG1: u8 = 0x8a;
    /// 8-byte IEEE double, big-endian.
    pub const BINFLOAT: u8 = b'G';
    /// UTF-8 string of under 256 bytes.
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    /// UTF-8 string, 4-byte little-endian length.
    pub const BINUNICODE: u8 = b'X';

    /// Every opcode above.
    pub const ALL: &[u8] = &[
        PROTO,
        STOP,
        MARK,
        EMPTY_DICT,
        EMPTY_LIST,
        EMPTY_TUPLE,
        SETITEMS,
        APPENDS,
        TUPLE,
        TUPLE1,
        TUPLE2,
        TUPLE3,
        NONE,
        NEWTRUE,
        NEWFALSE,
        BININT1,
        BININT2,
        BININT,
        LONG1,
        BINFLOAT,
        SHORT_BINUNICODE,
        BINUNICODE,
    ];
}

/// Items per `APPENDS`/`SETITEMS` batch, as Python's pickler does; it also keeps
/// MemoryViz's `arr.push(...items)` under JavaScript's argument-count limit.
const BATCH: usize = 1000;

/// `value` as pickle bytes (protocol 4, opcodes in [`op`] only).
pub fn pickle(value: &Value) -> Vec<u8> {
    let mut out = vec![op::PROTO, 4];
    encode(value, &mut out);
    out.push(op::STOP);
    out
}

fn encode(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::None => out.push(op::NONE),
        Value::Bool(b) => out.push(if *b { op::NEWTRUE } else { op::NEWFALSE }),
        Value::Int(n) => encode_int(*n, out),
        Value::Float(x) => {
            out.push(op::BINFLOAT);
            out.extend_from_slice(&x.to_be_bytes());
        }
        Value::Str(s) => encode_str(s, out),
        Value::List(items) => {
            out.push(op::EMPTY_LIST);
            for chunk in items.chunks(BATCH) {
                out.push(op::MARK);
                chunk.iter().for_each(|v| encode(v, out));
                out.push(op::APPENDS);
            }
        }
        Value::Tuple(items) => {
            if items.len() > 3 {
                out.push(op::MARK);
            }
            items.iter().for_each(|v| encode(v, out));
            out.push(match items.len() {
                0 => op::EMPTY_TUPLE,
                1 => op::TUPLE1,
                2 => op::TUPLE2,
                3 => op::TUPLE3,
                _ => op::TUPLE,
            });
        }
        Value::Dict(items) => {
            out.push(op::EMPTY_DICT);
            for chunk in items.chunks(BATCH) {
                out.push(op::MARK);
                for (k, v) in chunk {
                    encode_str(k, out);
                    encode(v, out);
                }
                out.push(op::SETITEMS);
            }
        }
    }
}

/// Python's choice (`save_long`): the shortest of BININT1, BININT2, BININT, else LONG1
/// with `bit_length / 8 + 1` bytes of two's complement, trimmed like `encode_long`.
fn encode_int(n: i128, out: &mut Vec<u8>) {
    if (0..=0xff).contains(&n) {
        out.extend_from_slice(&[op::BININT1, n as u8]);
    } else if (0..=0xffff).contains(&n) {
        out.push(op::BININT2);
        out.extend_from_slice(&(n as u16).to_le_bytes());
    } else if i32::try_from(n).is_ok() {
        out.push(op::BININT);
        out.extend_from_slice(&(n as i32).to_le_bytes());
    } else {
        let bit_length = 128 - n.unsigned_abs().leading_zeros() as usize;
        let mut bytes = n.to_le_bytes()[..bit_length / 8 + 1].to_vec();
        // Python drops a redundant 0xff sign byte of a negative number.
        let len = bytes.len();
        if n < 0 && len > 1 && bytes[len - 1] == 0xff && bytes[len - 2] & 0x80 != 0 {
            bytes.pop();
        }
        out.extend_from_slice(&[op::LONG1, bytes.len() as u8]);
        out.extend_from_slice(&bytes);
    }
}

fn encode_str(s: &str, out: &mut Vec<u8>) {
    match u8::try_from(s.len()) {
        Ok(n) => out.extend_from_slice(&[op::SHORT_BINUNICODE, n]),
        Err(_) => {
            let n = u32::try_from(s.len()).expect("a pickled string of 4 GiB or more");
            out.push(op::BINUNICODE);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The opcodes of `bytes`, walked by their argument lengths; panics on any opcode
    /// outside [`op::ALL`].
    fn opcodes(bytes: &[u8]) -> Vec<u8> {
        let mut seen = vec![];
        let mut i = 0;
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
        while i < bytes.len() {
            let code = bytes[i];
            assert!(
                op::ALL.contains(&code),
                "opcode {code:#04x} at byte {i} is not one MemoryViz reads"
            );
            seen.push(code);
            i += 1 + match code {
                op::PROTO | op::BININT1 => 1,
                op::BININT2 => 2,
                op::BININT => 4,
                op::BINFLOAT => 8,
                op::LONG1 | op::SHORT_BINUNICODE => 1 + bytes[i + 1] as usize,
                op::BINUNICODE => 4 + u32_at(i + 1),
                _ => 0,
            };
            if code == op::STOP {
                assert_eq!(i, bytes.len(), "bytes after STOP");
            }
        }
        seen
    }

    fn timeline() -> Vec<VizEvent> {
        let base = 0x7f00_0000_0000;
        vec![
            VizEvent::new(Action::SegmentAlloc, base, 20 << 20).category("activations"),
            VizEvent::new(Action::Alloc, base, 4 << 20)
                .category("activations")
                .frame("model.py", 10, "layers.0"),
            VizEvent::new(Action::Alloc, base + (4 << 20), 300).at(5),
            VizEvent::new(Action::FreeRequested, base, 4 << 20).at(6),
            VizEvent::new(Action::FreeCompleted, base, 4 << 20).at(7),
            VizEvent::new(Action::Oom, 0, 1 << 40).at(8),
        ]
    }

    #[test]
    fn the_encoder_emits_only_opcodes_memory_viz_reads() {
        let bytes = snapshot(&timeline(), Some(80 << 30)).unwrap();
        let seen = opcodes(&bytes);
        assert_eq!(&seen[..1], &[op::PROTO]);
        assert_eq!(seen.last(), Some(&op::STOP));
        // Large addresses take LONG1, long strings BINUNICODE, settings a BINFLOAT.
        let long = Value::Str("x".repeat(300));
        let all = Value::List(vec![
            Value::None,
            Value::Int(-1),
            Value::Int(1 << 40),
            Value::Int(u64::MAX.into()),
            Value::Int(i64::MIN.into()),
            Value::Tuple(vec![Value::Int(1); 5]),
            Value::Tuple(vec![]),
            long,
        ]);
        let seen = opcodes(&pickle(&all));
        for code in [
            op::LONG1,
            op::BINUNICODE,
            op::TUPLE,
            op::EMPTY_TUPLE,
            op::BININT,
        ] {
            assert!(seen.contains(&code), "{code:#04x} not exercised");
        }
    }

    #[test]
    fn ints_are_encoded_as_python_encodes_them() {
        let enc = |n: i128| {
            let mut out = vec![];
            encode_int(n, &mut out);
            out
        };
        // Bytes from Python 3.11: pickle.dumps(n, 4) less PROTO, FRAME and STOP.
        assert_eq!(enc(0), b"K\x00");
        assert_eq!(enc(255), b"K\xff");
        assert_eq!(enc(256), b"M\x00\x01");
        assert_eq!(enc(65536), b"J\x00\x00\x01\x00");
        assert_eq!(enc(-1), b"J\xff\xff\xff\xff");
        assert_eq!(enc(1 << 31), b"\x8a\x05\x00\x00\x00\x80\x00");
        assert_eq!(enc(0x7f00_0000_0000), b"\x8a\x06\x00\x00\x00\x00\x00\x7f");
        assert_eq!(
            enc(u64::MAX.into()),
            b"\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\x00"
        );
        assert_eq!(enc(-(1 << 31) - 1), b"\x8a\x05\xff\xff\xff\x7f\xff");
        assert_eq!(
            enc(i64::MIN.into()),
            b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80"
        );
    }

    #[test]
    fn summary_counts_a_block_until_its_free_completes() {
        let s = summarize(&timeline()).unwrap();
        assert_eq!(s.peak_allocated_bytes, (4 << 20) + 300);
        assert_eq!(s.end_allocated_bytes, 300);
        assert_eq!(s.peak_reserved_bytes, 20 << 20);
    }

    #[test]
    fn touching_maps_merge_and_unmaps_cut_them() {
        let base = 0x7f00_0000_0000;
        let mib = 1 << 20;
        let events = [
            VizEvent::new(Action::SegmentMap, base, 20 * mib),
            VizEvent::new(Action::SegmentMap, base + 20 * mib, 20 * mib),
            // A block across the two maps: inside one merged range.
            VizEvent::new(Action::Alloc, base + 10 * mib, 15 * mib).block_size(16 * mib),
            VizEvent::new(Action::SegmentMap, base + 40 * mib, 20 * mib),
            VizEvent::new(Action::SegmentUnmap, base + 40 * mib, 20 * mib),
        ];
        let state = replay(&events, None).unwrap();
        let segs: Vec<(u64, u64, bool)> = state
            .segments
            .iter()
            .map(|(&a, s)| (a - base, s.size, s.expandable))
            .collect();
        assert_eq!(segs, [(0, 40 * mib, true)]);
        assert_eq!(state.summary.peak_reserved_bytes, 60 * mib);
        assert_eq!(state.summary.end_reserved_bytes, 40 * mib);
        assert_eq!(state.summary.end_allocated_bytes, 15 * mib);
        let bytes = snapshot(&events, None).unwrap();
        opcodes(&bytes);

        // Unmapping under the live block, or freeing a mapped range whole, is refused.
        let mut bad = events[..3].to_vec();
        bad.push(VizEvent::new(
            Action::SegmentUnmap,
            base + 20 * mib,
            20 * mib,
        ));
        let err = snapshot(&bad, None).unwrap_err().to_string();
        assert!(err.contains("still holds live blocks"), "{err}");
        let mut bad = events[..2].to_vec();
        bad.push(VizEvent::new(Action::SegmentFree, base, 40 * mib));
        let err = snapshot(&bad, None).unwrap_err().to_string();
        assert!(err.contains("expected segment_unmap"), "{err}");
        // A block smaller than its request is refused.
        let mut bad = events[..1].to_vec();
        bad.push(VizEvent::new(Action::Alloc, base, 1024).block_size(512));
        assert!(snapshot(&bad, None).is_err());
    }

    #[test]
    fn rejects_an_alloc_outside_any_segment() {
        let events = [VizEvent::new(Action::Alloc, 4096, 512)];
        let err = snapshot(&events, None).unwrap_err().to_string();
        assert!(
            err.contains("event 0 (alloc of 512 bytes at 0x1000)"),
            "{err}"
        );
        assert!(err.contains("segment_alloc first"), "{err}");
    }

    #[test]
    fn rejects_freeing_a_segment_that_holds_a_live_block() {
        let mut events = timeline();
        events.push(VizEvent::new(Action::SegmentFree, events[0].addr, 20 << 20));
        let err = snapshot(&events, None).unwrap_err().to_string();
        assert!(err.contains("still holds live blocks"), "{err}");
    }

    #[test]
    fn rejects_overlapping_blocks_and_a_completion_without_a_request() {
        let mut events = timeline();
        events.push(VizEvent::new(
            Action::Alloc,
            events[0].addr + (4 << 20) + 100,
            8,
        ));
        assert!(snapshot(&events, None).is_err());
        let mut events = timeline();
        events.push(VizEvent::new(Action::FreeCompleted, events[2].addr, 300));
        let err = snapshot(&events, None).unwrap_err().to_string();
        assert!(err.contains("free_requested first"), "{err}");
    }
}
