//! A relative step-time model, for ranking plans by speed, not for predicting seconds.
//!
//! One optimizer step of the most loaded rank costs, in seconds on the GPU profile's peak
//! figures:
//!
//! - compute: 6 FLOPs per parameter per token for forward and backward of the matmuls
//!   (Kaplan et al. 2020, section 2.1), plus causal attention's 6 x seq x q_dim per token per
//!   layer (QK^T and AV, halved for causality, times three for forward and backward), at a
//!   fixed 50% of the dense bf16 peak (float8 matmuls at 1.6x, torchtitan's measured gain on
//!   H100); recomputation adds the recomputed forward: a whole block under full AC (+1/3 of
//!   the block's compute), 1/K of them under selective-layer:K, and the recomputed matmuls
//!   (wk, wo, w3) under selective-op;
//! - the pipeline bubble of 1F1B, (pp - 1) / (m + pp - 1) of the step idle (Narayanan et al.
//!   2021, section 2.2), divided by the virtual stages when interleaved, zero for ZB-H1;
//! - communication that compute does not hide: tensor-parallel all-reduces (or all-gather +
//!   reduce-scatter with SP) of the activations, 4 per block per micro-batch forward and
//!   backward; FSDP all-gathers (forward and backward) and reduce-scatters overlap compute
//!   (FSDP2 prefetches), so only their excess over compute counts; ring-attention K/V
//!   exchange overlaps attention likewise;
//! - offload: parameters in and gradients out over the host link every micro-batch (full),
//!   or once per step (optimizer), plus the CPU optimizer step at 16 bytes read and written
//!   per parameter at 50 GB/s of host memory bandwidth.
//!
//! Intra-node traffic uses the profile's interconnect; groups wider than a node use
//! 50 GB/s per GPU (400 Gb/s InfiniBand).

use crate::plan::{Checkpointing, Offload, Plan, PpSchedule};

/// Achieved fraction of peak matmul throughput assumed for every plan.
const MFU: f64 = 0.5;
/// Host memory bandwidth for the CPU optimizer step, GB/s.
const HOST_MEMORY_GBPS: f64 = 50.0;
/// Per-GPU bandwidth across nodes, GB/s.
const INTER_NODE_GBPS: f64 = 50.0;

/// Relative time of one optimizer step, and what it is made of.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct StepCost {
    pub compute_s: f64,
    pub recompute_s: f64,
    pub bubble_s: f64,
    pub exposed_comm_s: f64,
    pub offload_s: f64,
    pub step_s: f64,
    /// Tokens of the whole step (every data-parallel rank, every micro-batch).
    pub tokens_per_step: u128,
    /// tokens_per_step / step_s.
    pub tokens_per_s: f64,
}

fn bw(plan: &Plan, group: u64) -> f64 {
    let gbps = if group <= plan.gpus_per_node {
        plan.gpu.intra_node_gbps
    } else {
        INTER_NODE_GBPS
    };
    gbps * 1e9
}

/// The relative step time of `plan`.
///
/// ```
/// use memplan::plan::PlanFile;
/// use memplan::estimate::cost::step_cost;
/// let p = |ac: &str| {
///     let f: PlanFile = serde_json::from_str(&format!(
///         r#"{{"model":"llama3-8b","num_gpus":8,"activation_checkpointing":"{ac}"}}"#
///     )).unwrap();
///     step_cost(&f.resolve().unwrap())
/// };
/// // Full recomputation costs about a third more compute than none.
/// let (none, full) = (p("none"), p("full"));
/// assert!(full.step_s > none.step_s);
/// assert!((full.recompute_s / none.compute_s - 1.0 / 3.0).abs() < 0.05);
/// ```
pub fn step_cost(plan: &Plan) -> StepCost {
    let m = &plan.model;
    let par = &plan.parallel;
    let b = &plan.batch;
    let micro = b.grad_accum_steps as f64;
    // Products are taken in f64: the inputs are bounded, their products need not fit u64.
    let tokens_rank = b.micro_batch_size as f64 * b.seq_len as f64 / par.cp as f64;
    let layers_rank = (m.layers as f64 / par.pp as f64).ceil();
    // Active parameters per token: routed experts count top_k of them.
    let (block_active, attn_part) = {
        let dense = m.block_param_count() as f64;
        let attn = 2.0 * m.hidden as f64 * (m.q_dim() as f64 + m.kv_dim() as f64);
        match m.moe {
            Some(moe) if m.moe_layers() > 0 => {
                let per_expert = 3.0 * m.hidden as f64 * moe.expert_intermediate as f64;
                let shared = 3.0 * m.hidden as f64 * moe.shared_intermediate as f64;
                let moe_active = attn + moe.top_k as f64 * per_expert + shared;
                let frac = m.moe_layers() as f64 / m.layers as f64;
                (dense * (1.0 - frac) + moe_active * frac, attn)
            }
            _ => (dense, attn),
        }
    };
    let attn_flops = 6.0 * b.seq_len as f64 * m.q_dim() as f64 / 2.0;
    let per_token_block = 6.0 * block_active + attn_flops;
    let head = 6.0 * m.vocab as f64 * m.hidden as f64 / par.pp as f64;
    let flops_rank = tokens_rank * (layers_rank * per_token_block + head) / par.tp as f64;
    let speed = plan.gpu.bf16_tflops * 1e12 * MFU * if plan.float8 { 1.6 } else { 1.0 };
    let compute = micro * flops_rank / speed;
    // Recomputed forward share of a block (forward is a third of forward + backward).
    let mlp_mm = block_active - attn_part;
    let recompute_frac = match plan.activation_checkpointing {
        Checkpointing::None => 0.0,
        Checkpointing::Full => 1.0 / 3.0,
        Checkpointing::SelectiveLayer(k) => 1.0 / 3.0 / k as f64,
        Checkpointing::SelectiveOp => {
            // wk, wo and w3 (one third of the MLP) out of all the block's matmuls.
            let recomputed =
                m.hidden as f64 * (m.kv_dim() as f64 + m.q_dim() as f64) + mlp_mm / 3.0;
            recomputed / block_active / 3.0
        }
    };
    let block_share = layers_rank * per_token_block / (layers_rank * per_token_block + head);
    let recompute = compute * block_share * recompute_frac;
    let bubble = if par.pp > 1 {
        let pp = par.pp as f64;
        let idle = (pp - 1.0) / (micro + pp - 1.0);
        let idle = match par.pp_schedule {
            PpSchedule::Interleaved1F1B => idle / par.pp_virtual_stages as f64,
            PpSchedule::ZbH1 => 0.0,
            PpSchedule::GPipe | PpSchedule::OneFOneB => idle,
        };
        (compute + recompute) * idle / (1.0 - idle)
    } else {
        0.0
    };

    let e = plan.precision.param.bytes() as f64;
    let r = plan.precision.reduce.bytes() as f64;
    let mb = plan.precision.master.bytes() as f64;
    // Tensor parallel: 4 collectives of the activations per block, forward and backward.
    let tp_comm = if par.tp > 1 {
        let t = par.tp as f64;
        let vol = 2.0 * (t - 1.0) / t * tokens_rank * m.hidden as f64 * e;
        micro * layers_rank * 4.0 * 2.0 * vol / bw(plan, par.tp)
    } else {
        0.0
    };
    // FSDP: all-gather in forward and backward, reduce-scatter in backward, per micro-batch.
    let n = par.fsdp_degree();
    let stage_params = m.param_count() as f64 / (par.pp as f64 * par.tp as f64);
    let fsdp_comm = if n > 1 {
        let f = (n as f64 - 1.0) / n as f64;
        micro * stage_params * f * (2.0 * e + r) / bw(plan, n * par.tp)
    } else {
        0.0
    };
    let dp_comm = if par.dp_replicate > 1 {
        let f = (par.dp_replicate as f64 - 1.0) / par.dp_replicate as f64;
        2.0 * f * stage_params / n as f64 * r / INTER_NODE_GBPS / 1e9
    } else {
        0.0
    };
    let cp_comm = if par.cp > 1 {
        micro
            * layers_rank
            * 3.0
            * (par.cp as f64 - 1.0)
            * tokens_rank
            * 2.0
            * m.kv_dim() as f64
            * e
            / bw(plan, par.cp * par.tp)
    } else {
        0.0
    };
    let busy = compute + recompute;
    let exposed = tp_comm + (fsdp_comm + cp_comm - busy).max(0.0) + dp_comm;

    let shard_params = stage_params / n as f64;
    let host = plan.gpu.host_link_gbps * 1e9;
    let cpu_step = shard_params * 16.0 * 2.0 / (HOST_MEMORY_GBPS * 1e9);
    let offload = match plan.offload {
        Offload::None => 0.0,
        Offload::Optimizer => 2.0 * shard_params * mb / host + cpu_step,
        Offload::Full => micro * 3.0 * shard_params * mb / host + cpu_step,
    };
    let step = busy + bubble + exposed + offload;
    // Five factors of up to 2^24 each: 128 bits hold the product.
    let tokens = [par.dp_replicate, par.dp_shard, b.grad_accum_steps]
        .iter()
        .fold(b.micro_batch_size as u128 * b.seq_len as u128, |a, &x| {
            a * x as u128
        });
    StepCost {
        compute_s: compute,
        recompute_s: recompute,
        bubble_s: bubble,
        exposed_comm_s: exposed,
        offload_s: offload,
        step_s: step,
        tokens_per_step: tokens,
        tokens_per_s: tokens as f64 / step,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlanFile;

    fn cost(extra: &str) -> StepCost {
        let f: PlanFile = serde_json::from_str(&format!(
            r#"{{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"batch":{{"seq_len":4096}}{extra}}}"#
        ))
        .unwrap();
        step_cost(&f.resolve().unwrap())
    }

    #[test]
    fn recomputation_orders_the_checkpointing_modes() {
        let none = cost(r#","activation_checkpointing":"none""#).step_s;
        let op = cost(r#","activation_checkpointing":"selective-op""#).step_s;
        let layer = cost(r#","activation_checkpointing":"selective-layer:2""#).step_s;
        let full = cost(r#","activation_checkpointing":"full""#).step_s;
        assert!(
            none < op && op < layer && layer < full,
            "{none} {op} {layer} {full}"
        );
    }

    #[test]
    fn offload_costs_host_link_time() {
        let none = cost("");
        let opt = cost(r#","offload":"optimizer""#);
        let full = cost(r#","offload":"full""#);
        assert_eq!(none.offload_s, 0.0);
        assert!(opt.offload_s > 0.0 && full.offload_s > opt.offload_s);
    }

    #[test]
    fn the_pipeline_bubble_shrinks_with_more_micro_batches() {
        let pp = |m: u64| {
            let f: PlanFile = serde_json::from_str(&format!(
                r#"{{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"parallel":{{"pp":4}},
                    "batch":{{"seq_len":4096,"grad_accum_steps":{m}}}}}"#
            ))
            .unwrap();
            step_cost(&f.resolve().unwrap())
        };
        let (few, many) = (pp(4), pp(32));
        // (pp - 1) / m of the busy time: 3/4 with 4 micro-batches, 3/32 with 32.
        assert!((few.bubble_s / (few.compute_s + few.recompute_s) - 0.75).abs() < 1e-9);
        assert!((many.bubble_s / (many.compute_s + many.recompute_s) - 3.0 / 32.0).abs() < 1e-9);
    }
}
