//! Reserved memory from the caching-allocator simulation: the estimator's event trace
//! ([`super::trace`]) replayed through [`crate::allocator::Simulator`], PyTorch 2.11's
//! `DeviceCachingAllocator` rules, with the device capacity the allocator may reserve (the
//! GPU's memory less what lives outside the allocator).
//!
//! What it adds to the closed-form estimate: the reserved peak over the first and a steady
//! step (segments are never returned, so the first step's optimizer states, created inside
//! segments the logits left cached, can push the steady step into new segments), the bytes
//! reserved and the largest free block at the allocated peak, and the first allocation the
//! allocator could not serve even after releasing its cache (the moment PyTorch raises
//! `OutOfMemoryError`). The fitted fragmentation of [`super::overhead`] remains the
//! estimate's `peak_reserved` figure; see the README's accuracy table for both against
//! published measurements.

use serde::Serialize;

use crate::allocator::{AllocConf, SimError, Simulator};
use crate::error::{Error, Result};
use crate::trace::{Op, Trace};
use crate::units::Bytes;

/// What the simulated allocator reports for one rank's step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Simulated {
    /// `PYTORCH_CUDA_ALLOC_CONF` simulated ("" for the defaults).
    pub alloc_conf: String,
    /// Highest reserved bytes over the trace (`torch.cuda.max_memory_reserved()`).
    pub peak_reserved_bytes: Bytes,
    /// At the allocated peak (None when the allocator ran out of memory before it): reserved
    /// bytes, reserved less allocated (fragmentation and cached free blocks), and the
    /// largest cached free block.
    pub reserved_at_peak_bytes: Option<Bytes>,
    pub fragmentation_at_peak_bytes: Option<Bytes>,
    pub largest_free_block_at_peak_bytes: Option<Bytes>,
    /// Segments held at the end, and `cudaMalloc` calls.
    pub segments: usize,
    pub device_allocs: u64,
    /// The first event the allocator could not serve, if any: its index in the trace.
    pub oom_event: Option<usize>,
    /// That event described: the step and section, the tensor's owner and bytes
    /// ("step 1 optimizer: layers.0.state, 224.00 MiB").
    pub oom_at: Option<String>,
    /// Reserved bytes after each event, up to the out-of-memory event.
    #[serde(skip)]
    pub reserved_after: Vec<u64>,
}

/// Replays `trace` with `conf` under the trace's capacity.
pub fn simulate(trace: &Trace, conf: &AllocConf, conf_text: &str) -> Result<Simulated> {
    // The allocated peak of the requested bytes (the events repeat their bytes on free; the
    // simulator refuses a trace whose frees do not match an allocation).
    let (mut live, mut peak, mut peak_at) = (0u64, 0u64, 0usize);
    for (k, e) in trace.events.iter().enumerate() {
        match e.op {
            Op::Alloc => live = live.saturating_add(e.bytes),
            Op::Free => live = live.saturating_sub(e.bytes),
        }
        if live > peak {
            (peak, peak_at) = (live, k + 1);
        }
    }
    let mut sim = Simulator::new(conf.clone(), trace.capacity_bytes);
    sim.reserve(trace.events.len() / 2 + 1);
    let mut reserved_after = Vec::with_capacity(trace.events.len());
    let mut at_peak = None;
    let mut oom_event = None;
    for (k, e) in trace.events.iter().enumerate() {
        let r = match e.op {
            Op::Alloc => sim.alloc(e.id, e.bytes, e.stream),
            Op::Free => sim.free(e.id),
        };
        match r {
            Ok(()) => {}
            Err(SimError::Oom(_)) => {
                oom_event = Some(k);
                break;
            }
            Err(other) => {
                return Err(Error::input(format!("allocator trace event {k}: {other}")));
            }
        }
        reserved_after.push(sim.reserved().get());
        if k + 1 == peak_at {
            at_peak = Some((
                sim.reserved().get(),
                sim.allocated().get(),
                sim.largest_free_block().get(),
            ));
        }
    }
    Ok(Simulated {
        alloc_conf: conf_text.to_string(),
        peak_reserved_bytes: sim.peak_reserved(),
        reserved_at_peak_bytes: at_peak.map(|p| Bytes(p.0)),
        fragmentation_at_peak_bytes: at_peak.map(|p| Bytes(p.0.saturating_sub(p.1))),
        largest_free_block_at_peak_bytes: at_peak.map(|p| Bytes(p.2)),
        segments: sim.segments(),
        device_allocs: sim.counters().device_allocs,
        oom_event,
        oom_at: oom_event.map(|k| describe(trace, k)),
        reserved_after,
    })
}

/// "step 1 optimizer: layers.0.state, 224.00 MiB": where event `k` of `trace` happens.
pub fn describe(trace: &Trace, k: usize) -> String {
    use crate::trace::MarkKind;
    let mut section = String::from("setup");
    for m in trace.marks.iter().take_while(|m| m.at <= k) {
        if let MarkKind::Begin { section: s, micro } = &m.kind {
            let step = if m.first_step {
                "step 1"
            } else {
                "steady step"
            };
            section = match s {
                crate::trace::Section::Setup => "setup".into(),
                crate::trace::Section::Optimizer => format!("{step} {}", s.name()),
                _ => format!("{step} {} (micro-batch {})", s.name(), micro + 1),
            };
        }
    }
    let e = &trace.events[k];
    format!("{section}: {}, {}", e.owner, Bytes(e.bytes))
}

/// A recorded trace replayed under one or more allocator settings (`memplan replay`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Replay {
    pub schema: &'static str,
    /// Whether the trace was measured (a run's `train --trace`) or predicted.
    pub source: crate::trace::Source,
    pub events: usize,
    /// Peak of the live requested bytes (`max_memory_allocated`).
    pub peak_allocated_bytes: Bytes,
    /// The capacity the allocator may reserve, where the trace names one.
    pub capacity_bytes: Option<u64>,
    /// One simulation per setting, in the order given.
    pub runs: Vec<Simulated>,
}

/// Replays `trace` once per `PYTORCH_CUDA_ALLOC_CONF` text in `confs` (the defaults when it
/// is empty).
///
/// Checked on a GPU: the caching allocator's own history of a CUDA run of llama3.2-1b on an
/// H200 (torch 2.11.0+cu130, 2026-11-29), replayed with the defaults, reserves 31,186 MiB at
/// its peak: what the allocator's peak reserved counter read on that device, to the byte
/// (`tests/replay.rs`).
pub fn replay(trace: &Trace, confs: &[String]) -> Result<Replay> {
    let defaults = [String::new()];
    let confs = if confs.is_empty() {
        &defaults[..]
    } else {
        confs
    };
    let runs = confs
        .iter()
        .map(|text| simulate(trace, &AllocConf::parse(text)?, text))
        .collect::<Result<Vec<_>>>()?;
    Ok(Replay {
        schema: "memplan.replay/1",
        source: trace.source,
        events: trace.events.len(),
        peak_allocated_bytes: Bytes(trace.peak()?.0),
        capacity_bytes: trace.capacity_bytes,
        runs,
    })
}

/// Peak reserved bytes of `plan`'s pipeline stage `stage` (the estimate's most loaded one,
/// `per_gpu.stage`) run on one CUDA stream, as memplan's trainer runs it: the estimator's step
/// (the stage's trace at [`Detail::Groups`]) replayed with every event on the default stream,
/// where FSDP2 puts its all-gather copies and reduce-scatter outputs on streams of their own.
/// None for a device without a caching allocator (the CPU).
///
/// [`Detail::Groups`]: super::trace::Detail::Groups
pub fn reserved_on_one_stream(plan: &crate::plan::Plan, stage: u64) -> Result<Option<u64>> {
    use super::trace::{trace_with, Detail};
    if !plan.gpu.caching_allocator {
        return Ok(None);
    }
    let mut trace = trace_with(plan, stage, Detail::Groups)?;
    for e in &mut trace.events {
        e.stream = 0;
    }
    Ok(Some(
        simulate(&trace, &AllocConf::default(), "")?
            .peak_reserved_bytes
            .get(),
    ))
}
