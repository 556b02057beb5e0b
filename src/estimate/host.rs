//! Host memory per node: the offloaded state of every rank on the node, pinned-allocator
//! rounding, the host-side optimizer temporaries, and each training process's own footprint.
//!
//! FSDP2 `CPUOffloadPolicy(pin_memory=True)` moves each parameter's padded shard to the CPU
//! and pins it (`_fsdp_param.py`); gradients come back with `.to("cpu", non_blocking=True)`,
//! which also lands in pinned memory; optimizer states are created by the optimizer with
//! `zeros_like` (pageable). The pinned caching host allocator rounds every block up to a
//! power of two and keeps freed blocks cached, so the rounded sizes stay resident.
//! torchtitan passes `foreach=True` to AdamW, so the CPU step allocates one `sqrt` temporary
//! as large as the rank's shards.
//!
//! Worked number, the seed case (llama3-8b, 2 ranks on a node, full offload): 2 x 16 B x
//! 4.015 G parameters = 128.5 GB of params, grads and states, plus 32.1 GB of foreach
//! temporaries, plus pinned rounding and two processes' runtime.

use serde::Serialize;

use crate::error::Result;
use crate::plan::{Offload, Plan};
use crate::units::Bytes;

use super::params::StageParams;
use super::{optimizer_temporaries, to_bytes};

/// Resident host memory of one training process besides tensors: libtorch, CUDA and NCCL
/// libraries and their host-side state, the Python interpreter and the data loader.
/// Approximate: a torch 2.x CUDA process with NCCL initialised holds 2-4 GiB of RSS.
pub const RUNTIME_PER_RANK: Bytes = Bytes::gib(3);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostBreakdown {
    pub offloaded_params_bytes: Bytes,
    pub offloaded_gradients_bytes: Bytes,
    pub optimizer_states_bytes: Bytes,
    pub optimizer_temporaries_bytes: Bytes,
    pub pinned_rounding_bytes: Bytes,
    pub runtime_bytes: Bytes,
}

impl HostBreakdown {
    pub fn items(&self) -> [(&'static str, Bytes); 6] {
        [
            ("offloaded params", self.offloaded_params_bytes),
            ("offloaded gradients", self.offloaded_gradients_bytes),
            ("optimizer states", self.optimizer_states_bytes),
            ("optimizer temporaries", self.optimizer_temporaries_bytes),
            ("pinned rounding", self.pinned_rounding_bytes),
            ("process runtime", self.runtime_bytes),
        ]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HostEstimate {
    /// Host bytes on the busiest node.
    pub per_node_bytes: Bytes,
    pub capacity_bytes: Bytes,
    /// Training processes on that node.
    pub ranks_per_node: u64,
    /// Summed over the node's ranks.
    pub breakdown: HostBreakdown,
}

/// Host memory of the busiest node, taking every rank on it as loaded as `p`.
pub fn host_estimate(plan: &Plan, p: &StageParams) -> Result<HostEstimate> {
    let ranks = plan.gpus_on_busiest_node() as u128;
    let m = plan.precision.master.bytes() as u128;
    let shard = p.shard_total() * m;
    let states = plan.optimizer.states_per_param() as u128 * shard;
    let pinned = p.pinned_extra();
    // (params, grads, states, temporaries, pinned rounding) per rank
    let per_rank = match plan.offload {
        Offload::None => (0, 0, 0, 0, 0),
        // The step runs on the host: the master params and their grads are copied there
        // (pinned) beside the states.
        Offload::Optimizer | Offload::Full => (
            shard,
            shard,
            states,
            optimizer_temporaries(plan, p),
            2 * pinned,
        ),
    };
    let b = HostBreakdown {
        offloaded_params_bytes: to_bytes(ranks * per_rank.0, "host params")?,
        offloaded_gradients_bytes: to_bytes(ranks * per_rank.1, "host gradients")?,
        optimizer_states_bytes: to_bytes(ranks * per_rank.2, "host optimizer states")?,
        optimizer_temporaries_bytes: to_bytes(ranks * per_rank.3, "host temporaries")?,
        pinned_rounding_bytes: to_bytes(ranks * per_rank.4, "host pinned rounding")?,
        runtime_bytes: to_bytes(ranks * RUNTIME_PER_RANK.get() as u128, "host runtime")?,
    };
    let total: u128 = b.items().iter().map(|(_, v)| v.get() as u128).sum();
    Ok(HostEstimate {
        per_node_bytes: to_bytes(total, "host bytes per node")?,
        capacity_bytes: plan.host_ram,
        ranks_per_node: ranks as u64,
        breakdown: b,
    })
}
