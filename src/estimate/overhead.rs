//! What the device holds beyond allocated tensors: allocator fragmentation (reserved minus
//! allocated) and memory outside the allocator (CUDA context, NCCL).
//!
//! PyTorch's caching allocator (c10/cuda/CUDACachingAllocator.cpp) rounds requests to 512 B,
//! serves requests above 1 MiB from a large pool of segments rounded to 2 MiB, and never
//! returns a segment during training, so `max_memory_reserved` exceeds
//! `max_memory_allocated` by blocks that were split and cannot be merged again. That excess
//! comes from the tensors whose sizes churn during the step (activations, logits, gradient
//! buffers, temporaries), not from the parameters and states allocated once at start.
//! [`FRAGMENTATION`] is the fraction of that churning part held as unusable cache; it is the
//! one fitted constant of the estimator (see the README's accuracy table for the fit).

use crate::error::Result;
use crate::plan::Plan;
use crate::units::Bytes;

use super::Breakdown;

/// Fraction of the transient (per-step) bytes the caching allocator keeps reserved beyond
/// allocated at the peak, in parts per thousand.
pub const FRAGMENTATION: u64 = 350;

/// NCCL's device buffers outside the caching allocator when any process group has more than
/// one rank: approximately what NCCL 2.2x allocates per process for its communicators with
/// default buffer sizes (4 MiB per channel and peer, tens of channels on NVLink systems).
pub const NCCL_BYTES: Bytes = Bytes::mib(512);

/// Predicted peak reserved bytes for a breakdown of allocated bytes.
///
/// ```
/// use memplan::estimate::{overhead::reserved, Breakdown};
/// use memplan::plan::PlanFile;
/// use memplan::units::Bytes;
/// let plan: PlanFile = serde_json::from_str(r#"{"model":"tiny"}"#).unwrap();
/// let b = Breakdown {
///     activations_bytes: Bytes(1000),
///     logits_bytes: Bytes(3000),
///     master_params_bytes: Bytes(5000),
///     ..Default::default()
/// };
/// // 35% of the 1000 activation bytes; parameters and logits add no fragmentation.
/// assert_eq!(reserved(&plan.resolve().unwrap(), &b).unwrap(), Bytes(9350));
/// ```
pub fn reserved(plan: &Plan, b: &Breakdown) -> Result<Bytes> {
    let allocated = b.total();
    if !plan.gpu.caching_allocator {
        return Ok(allocated);
    }
    let churn = [
        b.unsharded_params_bytes,
        b.gradient_buffers_bytes,
        b.optimizer_temporaries_bytes,
        b.activations_bytes,
        b.backward_working_set_bytes,
    ]
    .into_iter()
    .sum::<Bytes>();
    let c = churn.get();
    let frag = c / 1000 * FRAGMENTATION + c % 1000 * FRAGMENTATION / 1000;
    allocated.add(Bytes(frag), "peak reserved")
}

/// Device memory outside the caching allocator.
pub fn runtime_overhead(plan: &Plan) -> Bytes {
    let nccl = if plan.num_gpus > 1 && plan.gpu.caching_allocator {
        NCCL_BYTES
    } else {
        Bytes::ZERO
    };
    Bytes(plan.gpu.runtime_overhead_bytes.get() + nccl.get())
}
