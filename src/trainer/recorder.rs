//! The measured allocation event trace of a run ([`crate::trace::Trace`], source
//! [`Source::Measured`]): every device allocation and free of the run's setup, its first step
//! and its last step, in order, with marks where each section begins.
//!
//! # Where the events come from
//! - CPU run: the counting allocator's device channel (csrc/shim.cpp, `mp_trace_*`), which
//!   numbers every allocation and, while recording, appends each allocation and free under the
//!   same lock that moves the counter. The running sum of the trace is therefore the device
//!   counter less what was live when the recording began (the [`super::memory::Meter`] base),
//!   to the byte, at every event.
//! - CUDA run: the caching allocator's own history (`torch.cuda.memory._record_memory_history`
//!   through libtorch_cuda), read back once at the end: "alloc" and "free_requested" entries,
//!   numbered by address. Sizes there are requested sizes, so the running sum is the
//!   allocator's `requested_bytes`, a little below the `allocated_bytes` the phases report
//!   (blocks are rounded to 512 bytes). Where a mark falls among the entries comes from the
//!   allocator's cumulative allocation and free counts at the mark. The history is a ring of
//!   [`CUDA_MAX_ENTRIES`] entries: a run that overflows it gets no trace, and a note.
//!
//! # Windows
//! Setup, step 1 and the last step are recorded; the steps between are not, but every
//! allocation keeps its number and attribution, so that at the last step's start the trace
//! gets, in order, the frees of recorded tensors that died in between and an allocation for
//! every tensor still live that was made in between. `Trace::running` stays valid and equal to
//! the counter at every event; only the steps between are compressed into that batch (which
//! sits at the end of step 1's optimizer section).
//!
//! # Attribution (approximate; the running sum is not)
//! The trainer sets an attribution context ([`scope`], [`set`], [`part`]) where it knows what
//! it is doing, and every allocation takes the context of its moment; a tensor whose role is
//! known only later (a parameter's unsharded gradient, made inside autograd; the loss scalar)
//! is re-attributed by its storage ([`retag`]). Approximate where one context covers several
//! kinds of tensor: the loss backward and the head's backward are all [`Category::Logits`]
//! (owner `loss`); a block's backward temporaries and recomputation are
//! [`Category::BackwardWorkingSet`] except its parameters' gradients; FSDP2's streams are the
//! ones FSDP2 would allocate on (all-gather 1, reduce-scatter 2), not streams the CPU has. On
//! CUDA there are no contexts: every event is [`Category::Other`], owner unknown, on the
//! stream the allocator saw (numbered in order of appearance, the default stream 0).

use std::collections::HashMap;
use std::ffi::{c_char, c_int};
use std::sync::Mutex;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::{Error, Result};
use crate::trace::{
    Category, Event, Mark, MarkKind, Module, Op, Owner, Part, Section, Source, Trace,
};

/// Ring size of the CUDA allocator history: entries beyond it overwrite the oldest.
pub const CUDA_MAX_ENTRIES: i64 = 1 << 23;

extern "C" {
    fn mp_trace_start();
    fn mp_trace_stop();
    fn mp_trace_pending() -> i64;
    fn mp_trace_take(out: *mut i64, cap: i64) -> i64;
    fn mp_trace_set_tag(tag: i64);
    fn mp_trace_get_tag() -> i64;
    fn mp_trace_storage_id(t: *mut C_tensor) -> i64;
    fn mp_free_buffer(p: *mut std::ffi::c_void);
    fn mp_cuda_trace_available() -> c_int;
    fn mp_cuda_trace_start(max_entries: i64, err: *mut *mut c_char) -> c_int;
    fn mp_cuda_trace_stop(err: *mut *mut c_char) -> c_int;
    fn mp_cuda_trace_take(
        device: i64,
        out: *mut *mut i64,
        n: *mut i64,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_accel_alloc_calls(device: i64, calls: *mut i64, err: *mut *mut c_char) -> c_int;
}

// ---------------------------------------------------------------------------------------------
// Attribution contexts.

/// What an allocation is for: its category, owner and the stream FSDP2 would allocate it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub category: Category,
    pub owner: Owner,
    pub stream: u32,
}

/// FSDP2's all-gather stream.
pub const ALL_GATHER_STREAM: u32 = 1;
/// FSDP2's reduce-scatter stream.
pub const REDUCE_SCATTER_STREAM: u32 = 2;

const MODULES: [Module; 10] = [
    Module::Unknown,
    Module::Root,
    Module::TokEmbeddings,
    Module::Norm,
    Module::Output,
    Module::Loss,
    Module::Optimizer,
    Module::Inputs,
    Module::Workspace,
    Module::Pipeline,
];
/// Code of [`Module::Layer`] (the others are their index in [`MODULES`]).
const LAYER: u64 = 15;

const PARTS: [Part; 12] = [
    Part::Whole,
    Part::Attention,
    Part::FeedForward,
    Part::AllGather,
    Part::ReduceScatter,
    Part::Shard,
    Part::Grad,
    Part::State,
    Part::Recompute,
    Part::Logits,
    Part::Ids,
    Part::Rotary,
];

impl Context {
    /// Not attributed: [`Category::Other`], owner unknown, stream 0 (tag 0).
    pub const UNKNOWN: Context = Context::new(Category::Other, Owner::UNKNOWN);

    pub const fn new(category: Category, owner: Owner) -> Context {
        Context {
            category,
            owner,
            stream: 0,
        }
    }

    pub const fn of(category: Category, module: Module, part: Part) -> Context {
        Context::new(category, Owner::new(module, part))
    }

    pub const fn on_stream(self, stream: u32) -> Context {
        Context { stream, ..self }
    }

    pub const fn with_part(self, part: Part) -> Context {
        Context {
            owner: Owner::new(self.owner.module, part),
            ..self
        }
    }

    /// The shim's int64 tag: bits 0-7 category + 1 (0: unknown), 8-15 module, 16-47 layer,
    /// 48-55 part, 56-59 stream.
    fn encode(self) -> i64 {
        if self == Context::UNKNOWN {
            return 0;
        }
        let cat = self.category.index() as u64 + 1;
        let (module, layer) = match self.owner.module {
            Module::Layer(i) => (LAYER, i as u64),
            m => (MODULES.iter().position(|&x| x == m).unwrap_or(0) as u64, 0),
        };
        let part = PARTS
            .iter()
            .position(|&x| x == self.owner.part)
            .unwrap_or(0) as u64;
        let stream = (self.stream as u64).min(15);
        (cat | module << 8 | layer << 16 | part << 48 | stream << 56) as i64
    }

    fn decode(tag: i64) -> Context {
        let t = tag as u64;
        let cat = (t & 0xff) as usize;
        if cat == 0 || cat > Category::ALL.len() {
            return Context::UNKNOWN;
        }
        let module = match (t >> 8) & 0xff {
            LAYER => Module::Layer(((t >> 16) & 0xffff_ffff) as u32),
            m => MODULES.get(m as usize).copied().unwrap_or(Module::Unknown),
        };
        let part = PARTS
            .get(((t >> 48) & 0xff) as usize)
            .copied()
            .unwrap_or(Part::Whole);
        Context {
            category: Category::ALL[cat - 1],
            owner: Owner::new(module, part),
            stream: ((t >> 56) & 0xf) as u32,
        }
    }
}

/// The context of allocations from now on, until the next [`set`] or [`scope`].
pub fn set(ctx: Context) {
    unsafe { mp_trace_set_tag(ctx.encode()) }
}

/// The context now.
pub fn current() -> Context {
    Context::decode(unsafe { mp_trace_get_tag() })
}

/// Restores the previous context when dropped.
#[must_use = "the context ends when the scope is dropped"]
pub struct Scope(i64);

impl Drop for Scope {
    fn drop(&mut self) {
        unsafe { mp_trace_set_tag(self.0) }
    }
}

/// `ctx` until the returned scope is dropped.
pub fn scope(ctx: Context) -> Scope {
    let prev = unsafe { mp_trace_get_tag() };
    set(ctx);
    Scope(prev)
}

/// The current context with its owner's part replaced (a block's attention, feed-forward),
/// until the returned scope is dropped.
pub fn part(p: Part) -> Scope {
    let prev = unsafe { mp_trace_get_tag() };
    set(Context::decode(prev).with_part(p));
    Scope(prev)
}

// ---------------------------------------------------------------------------------------------
// The recording.

/// A raw allocator event: a shim event, or a CUDA history entry numbered by address.
#[derive(Clone, Copy, Debug)]
struct Raw {
    op: Op,
    id: u64,
    bytes: u64,
    ctx: Context,
}

/// What happens at a moment of the run.
#[derive(Clone, Debug)]
enum Action {
    Mark(MarkKind, bool),
    Pause,
    Resume,
}

/// A tensor live now (allocated since the recording began).
#[derive(Clone, Copy, Debug)]
struct Live {
    bytes: u64,
    ctx: Context,
    /// Its allocation is in the trace (recorded, or synthesised at a resume).
    known: bool,
    /// Index of its allocation event in the trace.
    at: Option<usize>,
}

struct Recorder {
    /// CUDA device index of a CUDA run (None: the counting allocator).
    cuda: Option<i64>,
    /// CUDA: the allocator's allocation and free calls when the recording began.
    cuda_calls0: u64,
    /// CUDA: actions at positions among the allocator's calls, applied at the end.
    queued: Vec<(u64, Action)>,
    /// Whether events go into the trace now (false between step 1 and the last step).
    active: bool,
    events: Vec<Event>,
    marks: Vec<Mark>,
    live: HashMap<u64, Live>,
    /// Frees, while paused, of tensors whose allocation is in the trace.
    pending_frees: Vec<Event>,
    /// The End mark is placed: later events are not part of the trace.
    ended: bool,
    /// A CUDA mark could not be placed: the recording is dropped at the end.
    broken: bool,
}

static REC: Mutex<Option<Recorder>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut Recorder) -> T) -> Option<T> {
    let mut g = REC.lock().unwrap_or_else(|p| p.into_inner());
    g.as_mut().map(f)
}

fn shim_call(f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<()> {
    super::ffi::call(f).map_err(|e| Error::runtime(format!("allocation trace: {e}")))
}

fn cuda_calls(device: i64) -> Result<u64> {
    let mut n = 0i64;
    shim_call(|e| unsafe { mp_accel_alloc_calls(device, &mut n, e) })?;
    Ok(n.max(0) as u64)
}

/// Whether this build can record a CUDA run's allocations.
pub fn cuda_available() -> bool {
    unsafe { mp_cuda_trace_available() != 0 }
}

/// Starts recording the run's device allocations (`cuda`: the device of a CUDA run), with a
/// Begin Setup mark. Call it before the run's [`super::memory::Meter`] is made, so that both
/// start from the same live bytes.
pub fn start(cuda: Option<i64>) -> Result<()> {
    let mut rec = Recorder {
        cuda,
        cuda_calls0: 0,
        queued: Vec::new(),
        active: true,
        events: Vec::new(),
        marks: Vec::new(),
        live: HashMap::new(),
        pending_frees: Vec::new(),
        ended: false,
        broken: false,
    };
    match cuda {
        None => unsafe { mp_trace_start() },
        Some(d) => {
            if !cuda_available() {
                return Err(Error::runtime(
                    "allocation trace: this memplan was built without CUDA (against a CPU \
                     libtorch), so a CUDA run's allocations cannot be recorded",
                ));
            }
            shim_call(|e| unsafe { mp_cuda_trace_start(CUDA_MAX_ENTRIES, e) })?;
            rec.cuda_calls0 = cuda_calls(d)?;
        }
    }
    set(Context::UNKNOWN);
    *REC.lock().unwrap_or_else(|p| p.into_inner()) = Some(rec);
    mark(Section::Setup, 0, true);
    Ok(())
}

/// Whether a recording is under way (started, not yet ended).
pub fn recording() -> bool {
    with(|r| !r.ended && !r.broken).unwrap_or(false)
}

/// A section of the run begins here (ignored while paused or not recording).
pub fn mark(section: Section, micro: u64, first_step: bool) {
    act(Action::Mark(MarkKind::Begin { section, micro }, first_step));
}

/// The end of the recorded run (of step 1 when `first_step`): brings a paused recording up to
/// date, places the End mark and stops taking events.
pub fn end(first_step: bool) {
    act(Action::Resume);
    act(Action::Mark(MarkKind::End, first_step));
    with(|r| {
        if r.cuda.is_none() {
            unsafe { mp_trace_stop() };
        }
    });
}

/// Stops putting events into the trace (the steps between the first and the last).
pub fn pause() {
    act(Action::Pause);
}

/// Puts events into the trace again, first bringing it up to date (see the module doc).
pub fn resume() {
    act(Action::Resume);
}

/// Moves the shim's recorded events into the recording (CPU), bounding the shim's buffer.
pub fn drain() {
    with(|r| r.drain());
}

/// Attributes the allocation holding `t`'s storage to `ctx` (CPU runs; ignored elsewhere).
pub fn retag(t: &Tensor, ctx: Context) {
    with(|r| {
        if r.cuda.is_some() || r.ended {
            return;
        }
        r.drain();
        let id = unsafe { mp_trace_storage_id(t.as_ptr() as *mut C_tensor) };
        if id < 0 {
            return;
        }
        if let Some(l) = r.live.get_mut(&(id as u64)) {
            l.ctx = ctx;
            if let Some(at) = l.at {
                let e = &mut r.events[at];
                e.category = ctx.category;
                e.owner = ctx.owner;
                e.stream = ctx.stream;
            }
        }
    });
}

fn act(a: Action) {
    with(|r| {
        if r.ended || r.broken {
            return;
        }
        match r.cuda {
            None => {
                r.drain();
                r.apply(a);
            }
            Some(d) => match cuda_calls(d) {
                Ok(n) => r.queued.push((n.saturating_sub(r.cuda_calls0), a)),
                // Cannot place the action: the trace would be wrong; drop the recording.
                Err(_) => r.broken = true,
            },
        }
    });
}

/// Stops recording and hands back the trace of `rank` (None when none was recorded, with the
/// reason in `notes`). `capacity_bytes` is the device capacity for the trace's capacity line.
pub fn finish(rank: u64, capacity_bytes: Option<u64>, notes: &mut Vec<String>) -> Option<Trace> {
    let rec = REC.lock().unwrap_or_else(|p| p.into_inner()).take()?;
    set(Context::UNKNOWN);
    match rec.finish() {
        Ok((events, marks)) => Some(Trace {
            source: Source::Measured,
            stage: 0,
            rank,
            capacity_bytes,
            events,
            marks,
        }),
        Err(why) => {
            notes.push(format!("no allocation trace: {why}"));
            None
        }
    }
}

/// Drops a recording that will not be finished (a run that ended in an error), turning the
/// recorder off.
pub fn abandon() {
    let rec = REC.lock().unwrap_or_else(|p| p.into_inner()).take();
    set(Context::UNKNOWN);
    if let Some(r) = rec {
        match r.cuda {
            None => unsafe { mp_trace_stop() },
            Some(_) => {
                let _ = shim_call(|e| unsafe { mp_cuda_trace_stop(e) });
            }
        }
    }
}

impl Recorder {
    fn drain(&mut self) {
        if self.cuda.is_some() {
            return;
        }
        loop {
            let pending = unsafe { mp_trace_pending() };
            if pending <= 0 {
                return;
            }
            let mut buf = vec![0i64; 4 * pending as usize];
            let n = unsafe { mp_trace_take(buf.as_mut_ptr(), pending) };
            for q in buf[..4 * n.max(0) as usize].chunks_exact(4) {
                let raw = Raw {
                    op: if q[0] == 0 { Op::Alloc } else { Op::Free },
                    id: q[1] as u64,
                    bytes: q[2].max(0) as u64,
                    ctx: Context::decode(q[3]),
                };
                self.ingest(raw);
            }
            if n < pending {
                return;
            }
        }
    }

    fn event(op: Op, id: u64, bytes: u64, ctx: Context) -> Event {
        Event {
            op,
            id,
            bytes,
            category: ctx.category,
            owner: ctx.owner,
            stream: ctx.stream,
        }
    }

    fn ingest(&mut self, raw: Raw) {
        if self.ended {
            return;
        }
        match raw.op {
            Op::Alloc => {
                let at = self.active.then_some(self.events.len());
                if self.active {
                    self.events
                        .push(Self::event(Op::Alloc, raw.id, raw.bytes, raw.ctx));
                }
                self.live.insert(
                    raw.id,
                    Live {
                        bytes: raw.bytes,
                        ctx: raw.ctx,
                        known: self.active,
                        at,
                    },
                );
            }
            Op::Free => {
                // Not live: allocated before the recording began.
                let Some(l) = self.live.remove(&raw.id) else {
                    return;
                };
                let e = Self::event(Op::Free, raw.id, l.bytes, l.ctx);
                if self.active {
                    self.events.push(e);
                } else if l.known {
                    self.pending_frees.push(e);
                }
            }
        }
    }

    fn apply(&mut self, a: Action) {
        match a {
            Action::Mark(kind, first_step) => {
                if self.active && !self.ended {
                    self.ended = kind == MarkKind::End;
                    self.marks.push(Mark {
                        at: self.events.len(),
                        first_step,
                        kind,
                    });
                }
            }
            Action::Pause => self.active = false,
            Action::Resume => {
                if self.active {
                    return;
                }
                self.events.append(&mut self.pending_frees);
                let mut new: Vec<(u64, Live)> = self
                    .live
                    .iter()
                    .filter(|(_, l)| !l.known)
                    .map(|(&id, &l)| (id, l))
                    .collect();
                new.sort_by_key(|&(id, _)| id);
                for (id, l) in new {
                    let at = self.events.len();
                    self.events.push(Self::event(Op::Alloc, id, l.bytes, l.ctx));
                    if let Some(x) = self.live.get_mut(&id) {
                        x.known = true;
                        x.at = Some(at);
                    }
                }
                self.active = true;
            }
        }
    }

    fn finish(mut self) -> std::result::Result<(Vec<Event>, Vec<Mark>), String> {
        if self.broken {
            if self.cuda.is_some() {
                let _ = shim_call(|e| unsafe { mp_cuda_trace_stop(e) });
            }
            return Err("the CUDA allocator's call counts could not be read".into());
        }
        match self.cuda {
            None => {
                self.drain();
                unsafe { mp_trace_stop() };
                // Events the shim still holds are dropped by the next start.
            }
            Some(d) => {
                let raws = cuda_history(d);
                let calls = cuda_calls(d).map(|n| n.saturating_sub(self.cuda_calls0));
                let _ = shim_call(|e| unsafe { mp_cuda_trace_stop(e) });
                let raws = raws.map_err(|e| e.to_string())?;
                let calls = calls.map_err(|e| e.to_string())?;
                // The ring kept every entry only if it holds as many as the allocator made.
                if raws.len() as u64 != calls {
                    return Err(format!(
                        "the CUDA allocator history holds {} of the run's {calls} allocations and \
                         frees (its ring keeps {CUDA_MAX_ENTRIES}); run fewer steps",
                        raws.len()
                    ));
                }
                let queued = std::mem::take(&mut self.queued);
                let mut q = queued.into_iter().peekable();
                for (k, raw) in raws.into_iter().enumerate() {
                    while let Some((_, a)) = q.next_if(|(pos, _)| *pos <= k as u64) {
                        self.apply(a);
                    }
                    self.ingest(raw);
                }
                for (_, a) in q {
                    self.apply(a);
                }
            }
        }
        Ok((self.events, self.marks))
    }
}

/// The CUDA history of `device` as raw events: allocations numbered in order, frees by the
/// address's live allocation (a free of an address not allocated in the history gets a number
/// no allocation has, so that it is skipped), streams numbered by first appearance.
fn cuda_history(device: i64) -> Result<Vec<Raw>> {
    let mut ptr: *mut i64 = std::ptr::null_mut();
    let mut n = 0i64;
    shim_call(|e| unsafe { mp_cuda_trace_take(device, &mut ptr, &mut n, e) })?;
    let quads: Vec<i64> = if ptr.is_null() || n <= 0 {
        Vec::new()
    } else {
        // SAFETY: the shim hands back 4 x n int64 from malloc, freed here once.
        let v = unsafe { std::slice::from_raw_parts(ptr, 4 * n as usize) }.to_vec();
        v
    };
    if !ptr.is_null() {
        unsafe { mp_free_buffer(ptr.cast()) };
    }
    let mut by_addr: HashMap<i64, u64> = HashMap::new();
    let mut streams: HashMap<i64, u32> = HashMap::from([(0, 0)]);
    let mut next = 1u64;
    let mut out = Vec::with_capacity(quads.len() / 4);
    for q in quads.chunks_exact(4) {
        let (op, addr, bytes, stream) = (q[0], q[1], q[2].max(0) as u64, q[3]);
        let n_streams = streams.len() as u32;
        let stream = *streams.entry(stream).or_insert(n_streams);
        let ctx = Context::UNKNOWN.on_stream(stream);
        let id = if op == 0 {
            let id = next;
            next += 1;
            by_addr.insert(addr, id);
            id
        } else {
            by_addr.remove(&addr).unwrap_or(u64::MAX)
        };
        out.push(Raw {
            op: if op == 0 { Op::Alloc } else { Op::Free },
            id,
            bytes,
            ctx,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_survive_the_tag() {
        for ctx in [
            Context::UNKNOWN,
            Context::of(Category::Activations, Module::Layer(7), Part::Attention),
            Context::of(Category::UnshardedParams, Module::Output, Part::AllGather)
                .on_stream(ALL_GATHER_STREAM),
            Context::of(Category::Inputs, Module::Inputs, Part::Rotary),
            Context::of(Category::Other, Module::Root, Part::Whole),
        ] {
            assert_eq!(Context::decode(ctx.encode()), ctx);
        }
        assert_eq!(Context::decode(0), Context::UNKNOWN);
    }

    fn raw(op: Op, id: u64, bytes: u64) -> Raw {
        Raw {
            op,
            id,
            bytes,
            ctx: Context::of(Category::Activations, Module::Layer(0), Part::Whole),
        }
    }

    fn recorder() -> Recorder {
        Recorder {
            cuda: Some(0),
            cuda_calls0: 0,
            queued: vec![],
            active: true,
            events: vec![],
            marks: vec![],
            live: HashMap::new(),
            pending_frees: vec![],
            ended: false,
            broken: false,
        }
    }

    #[test]
    fn a_pause_keeps_the_running_sum() {
        let mut r = recorder();
        // Before the recording: tensor 1 (skipped when freed).
        r.ingest(raw(Op::Alloc, 2, 10));
        r.ingest(raw(Op::Alloc, 3, 5));
        r.apply(Action::Pause);
        r.ingest(raw(Op::Free, 1, 7));
        r.ingest(raw(Op::Free, 2, 10)); // known: kept for the resume
        r.ingest(raw(Op::Alloc, 4, 20)); // freed while paused: never seen
        r.ingest(raw(Op::Alloc, 5, 30)); // live at the resume: synthesised
        r.ingest(raw(Op::Free, 4, 20));
        r.apply(Action::Resume);
        r.ingest(raw(Op::Free, 5, 30));
        r.ingest(raw(Op::Free, 3, 5));
        let t = Trace {
            source: Source::Measured,
            stage: 0,
            rank: 0,
            capacity_bytes: None,
            events: r.events,
            marks: r.marks,
        };
        assert_eq!(t.running().unwrap(), vec![10, 15, 5, 35, 5, 0]);
    }
}
