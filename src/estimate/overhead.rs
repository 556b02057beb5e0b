//! What the device holds beyond allocated tensors: allocator fragmentation (reserved minus
//! allocated) and memory outside the allocator (CUDA context, NCCL).
//!
//! PyTorch's caching allocator (c10/cuda/CUDACachingAllocator.cpp) rounds requests to 512 B,
//! serves requests above 1 MiB from a large pool of segments rounded to 2 MiB, and never
//! returns a segment during training, so `max_memory_reserved` exceeds
//! `max_memory_allocated` by cached blocks that cannot serve the request at hand. Two sources
//! are modelled:
//!
//! - freed segments of the wrong size at the peak: the bf16 logits are freed before backward
//!   (`del pred`) and their segment is too small for the fp32 loss-backward buffers, so it
//!   stays cached beside them ([`super::logits::LogitsBytes::freed_segment`]; e.g. 3.9 GiB at
//!   llama3-8b, 16,384 tokens);
//! - fragmentation from kept tensors interleaved with freed temporaries of other sizes
//!   (saved activations without or with selective checkpointing, recompute and gradient
//!   temporaries, gathered parameters, gradient buffers). Full checkpointing's kept block
//!   inputs are allocated between whole blocks of freed temporaries and do not fragment;
//!   parameters and states are allocated once at start.
//!
//! [`FRAGMENTATION`] is the one fitted constant of the estimator: 0.21 balances the error
//! of torchtitan's two December 2024 llama3-8b FSDP rows (8 and 128 H100s, batch 2 x 8192,
//! selective-op AC: 82.4 and 67.0 GiB reserved; docs/performance.md), which differ only in
//! parameter sharding. The README's accuracy table gives the errors it leaves on every
//! published row.

use crate::error::Result;
use crate::plan::Plan;
use crate::units::Bytes;

/// Fraction of the fragmenting bytes (see the module doc) the caching allocator keeps
/// reserved beyond allocated, in parts per thousand.
pub const FRAGMENTATION: u64 = 210;

/// NCCL's device buffers outside the caching allocator when any process group has more than
/// one rank: approximately what NCCL 2.2x allocates per process for its communicators with
/// default buffer sizes (4 MiB per channel and peer, tens of channels on NVLink systems).
pub const NCCL_BYTES: Bytes = Bytes::mib(512);

/// Bytes the caching allocator holds as unusable cache for `churn` bytes of kept tensors
/// interleaved with freed temporaries.
///
/// ```
/// use memplan::estimate::overhead::fragmentation;
/// assert_eq!(fragmentation(1_000_000), 210_000);
/// ```
pub fn fragmentation(churn: u128) -> u128 {
    super::div(churn * FRAGMENTATION as u128, 1000)
}

/// Device memory outside the caching allocator (checked: a GPU profile's overhead is user
/// input).
pub fn runtime_overhead(plan: &Plan) -> Result<Bytes> {
    let nccl = if plan.num_gpus > 1 && plan.gpu.caching_allocator {
        NCCL_BYTES
    } else {
        Bytes::ZERO
    };
    plan.gpu.runtime_overhead_bytes.add(
        nccl,
        "runtime overhead (gpu profile runtime_overhead_bytes + NCCL)",
    )
}
