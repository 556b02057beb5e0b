//! DeepSpeed ZeRO-2 and ZeRO-3 under Transformers' Trainer / accelerate: the per-rank bytes
//! DeepSpeed owns at each phase, beside the model's own activations, logits and batch (the
//! hf-transformers model of [`super::quantities`], the same under both stages: measured
//! equal to within 5 B).
//!
//! Every formula was checked to the byte against deepspeed 0.19.8 (with transformers 5.24.0,
//! accelerate 1.15.0, torch 2.11) on CPU/Gloo, 34 plans, every rank
//! (docs/research/deepspeed-zero-measured.md, tests/data/deepspeed_zero_torch_2.11.jsonl);
//! file:line references are to deepspeed 0.19.8. Symbols: n ranks, e the model dtype's bytes
//! (DeepSpeed casts the parameters to bf16, engine.py:2080-2088; fp32 without mixed
//! precision), G = 2 optimizer groups (Trainer's decay and no-decay groups,
//! [`crate::zero::groups`]).
//!
//! Breakdown categories: master params = the fp32 master partition; unsharded params = the
//! model-dtype parameters ZeRO holds (ZeRO-2's flat buffers of the whole model; ZeRO-3's
//! partitions, persistent parameters and gathered ones); gradients = ZeRO-2's
//! `grads_in_partition` or ZeRO-3's gradient partitions; gradient buffers = the IPG buckets;
//! optimizer states; optimizer temporaries = the step's flat and fp32 gradients.

use super::{div, overhead, quantities, Phase, Stage, Wide, PHASES};
use crate::plan::{Checkpointing, Plan};
use crate::zero::{groups, z3_partition, z3_replay, Gather, Group, Zero, SUB_GROUP_SIZE};

/// Ranks up to which ZeRO-2's `grads_in_partition` is taken exactly, rank by rank; beyond,
/// its bound (the partition and the two parameters straddling its ends), so that an estimate
/// stays a fraction of a microsecond.
const EXACT_GIP_RANKS: u64 = 256;

/// DeepSpeed's bytes at each phase of a steady step, in [`PHASES`] order: (unsharded params,
/// master, gradients, gradient buffers, states, temporaries).
struct Owned {
    master: u128,
    /// Of `params`, what stays for the whole step (not allocator churn).
    static_params: u128,
    states: u128,
    params: [u128; 5],
    grads: [u128; 5],
    buffers: [u128; 5],
    temporaries: u128,
    /// ZeRO-2 at the output projection's gradient hook (the first): its buckets, and
    /// grads_in_partition when that gradient alone overflows them.
    at_head_hook: [u128; 2],
}

/// ZeRO-2 (`runtime/zero/stage_1_and_2.py`).
fn stage2(plan: &Plan, z: &Zero, gs: &[Group; 2], n: u128, e: u128) -> Owned {
    let mut lp = 0;
    let mut parts = 0;
    let mut step = 0u128;
    let mut norm = 0u128;
    let mut g_count = 0;
    let mut part = [0u128; 2];
    for (i, g) in gs.iter().enumerate() {
        let phi = g.numel();
        if phi == 0 {
            continue;
        }
        g_count += 1;
        // A_g = ceil(phi / 2n) 2n: alignment nccl_start_alignment_factor 2 x n (l.387,
        // l.436-446); part_g = A_g / n.
        let a = div(phi + 2 * n - 1, 2 * n) * 2 * n;
        part[i] = div(a, n);
        lp += e * a;
        parts += part[i];
        // The step, group by group: flatten(averaged_gradients) in e, then .to(fp32), the same
        // tensor for an fp32 model; the fp32 gradient lives through `_optimizer_step`
        // (l.3110-3131).
        let per = if e == 4 { 4 } else { e + 4 };
        step = step.max(per * part[i]);
        // Before it, the gradient norm copies one gradient at a time to fp64
        // (`get_grad_norm_direct` l.2683-2685).
        norm = norm.max(8 * (g.largest() as u128).min(part[i]));
    }
    // grads_in_partition: every parameter overlapping the rank's partition counted whole
    // (`copy_grads_in_partition` l.2184-2196, `get_partition_info` l.2579-2609), the most
    // loaded rank's.
    let gip = if n as u64 <= EXACT_GIP_RANKS {
        (0..n)
            .map(|r| {
                gs.iter()
                    .zip(part)
                    .map(|(g, p)| g.in_partition(r * p, (r + 1) * p))
                    .sum::<u128>()
            })
            .max()
            .unwrap_or(0)
    } else {
        gs.iter()
            .zip(part)
            .map(|(g, p)| g.numel().min(p + 2 * g.largest() as u128))
            .sum()
    };
    // IPG buckets, (1 + overlap_comm) x reduce_bucket_size in the model dtype, from the first
    // gradient hook to the end of backward (`setup_buckets` l.3256-3281, `_release_ipg_buffers`
    // l.924-932). The peak at the loss's backward comes before any hook.
    let buckets = (1 + u128::from(z.overlap_comm)) * z.reduce_bucket_size as u128 * e;
    // grads_in_partition is allocated at the first bucket flush: while the first block's
    // backward runs when the head's and that block's gradients overflow the bucket (taken at
    // the block's peak: an upper bound when the flush comes later in the block), else at
    // backward's end (measured: T-z2-bf16-ac holds it inside a block with h² buckets; the
    // DeepSpeed-default 5e8 bucket of a small model flushes only in the epilogue).
    let m = &plan.model;
    let head = if m.tied_embeddings {
        0
    } else {
        m.vocab * m.hidden
    } as u128
        + m.hidden as u128;
    let block = gs.iter().map(|g| g.per).sum::<u128>();
    let early = head + block > z.reduce_bucket_size as u128;
    Owned {
        master: 4 * parts,
        static_params: lp,
        // exp_avg and exp_avg_sq of the fp32 partition and a 4-byte step per group (torch
        // AdamW, created in the first step, l.2966-2988).
        states: 8 * parts + 4 * g_count,
        params: [lp; 5],
        grads: [0, 0, if early { e * gip } else { 0 }, e * gip, e * gip],
        buffers: [0, 0, buckets, buckets, 0],
        temporaries: step.max(norm),
        // The output projection's gradient is larger than a bucket: its hook flushes, and the
        // rank whose partition holds it allocates grads_in_partition then (measured: S-z2-fp32
        // rank 1 peaks there at 65,283,749 B, rank 0 later in backward at 58,089,125 B).
        at_head_hook: [
            buckets,
            if !m.tied_embeddings && (m.vocab * m.hidden) > z.reduce_bucket_size {
                e * gip
            } else {
                0
            },
        ],
    }
}

/// ZeRO-3 (`runtime/zero/stage3.py`, `partition_parameters.py`).
fn stage3(plan: &Plan, z: &Zero, gs: &[Group; 2], n: u64, e: u128) -> Owned {
    let t = z.param_persistence_threshold;
    let (mut c_all, mut persistent, mut whole, mut biggest) = (0u128, 0u128, 0u128, 0u128);
    let mut step = 0u128;
    let mut g_count = 0;
    for g in gs.iter() {
        if g.numel() == 0 {
            continue;
        }
        g_count += 1;
        let mut c_g = 0;
        let mut largest_c = 0;
        for (numel, k) in g.tensors() {
            let c = z3_partition(numel, n);
            c_g += c * k as u128;
            largest_c = largest_c.max(c);
            if numel <= t {
                persistent += c * n as u128 * k as u128;
            } else {
                whole += c * n as u128 * k as u128;
                biggest = biggest.max(c * n as u128);
            }
        }
        c_all += c_g;
        // The step per sub-group: e x C flat and 4 x C fp32 (`_prepare_fp32_grad_for_sub_group`
        // l.2683-2687); 4 x C for an fp32 model. A group is one sub-group up to sub_group_size
        // (1e9); a larger one is split as parameters reach it, so at most sub_group_size plus
        // one parameter's partition (an upper bound then).
        let sub = c_g.min(SUB_GROUP_SIZE as u128 + largest_c);
        let per = if e == 4 { 4 } else { e + 4 };
        step = step.max(per * sub);
        // Before it, the gradient norm's fp64 copy of one gradient partition (l.2457).
        step = step.max(8 * largest_c);
    }
    // One rank gathers nothing: param.data is the partition (NoGatherHandle, l.1559-1560).
    let (persistent, whole, biggest) = if n == 1 {
        (0, 0, 0)
    } else {
        (e * persistent, e * whole, e * biggest)
    };
    // Gathered parameters (see [`crate::zero::Gather`]). With the whole model gathered at the
    // boundary, backward releases the output projection (and the final norm when it is not
    // persistent) after their backward, before the first block's; the embedding is the last
    // used. Measured by replay to the byte (simulate_z3) in all 20 ZeRO-3 plans.
    let m = &plan.model;
    let gathered = |numel: u64| {
        if n == 1 || numel <= t {
            0
        } else {
            e * z3_partition(numel, n) * n as u128
        }
    };
    let head = if m.tied_embeddings {
        0
    } else {
        gathered(m.vocab * m.hidden)
    } + gathered(m.hidden);
    let embedding = gathered(m.vocab * m.hidden);
    let g = match z.gather {
        Gather::WholeModel => [whole, whole, whole - head, embedding, 0],
        // Only the module running: nothing at the loss, one linear inside a block.
        Gather::CurrentModule => [0, 0, biggest, embedding, 0],
        // A few microseconds, ZeRO-3 plans only (see [`crate::zero::z3_replay`]).
        Gather::Replay => {
            let ac = plan.activation_checkpointing == Checkpointing::Full;
            let [f, l, b, end] = z3_replay(m, z, n, e as u64, ac).unwrap_or_default();
            [f, l, b, end, 0]
        }
    };
    // Partitions of every parameter (one flat buffer, `defragment` zero/utils.py:215-243);
    // persistent parameters gathered whole (l.1376-1391), released at the optimizer step
    // (stage3.py:2878) and gathered again after it (l.2840-2841).
    let lp = e * c_all;
    let params = [0, 1, 2, 3, 4].map(|i| lp + g[i] + if i == 4 { 0 } else { persistent });
    // Gradient partitions (l.788-791) and one IPG bucket (l.780-783, no double buffer even
    // with overlap_comm), both from init.
    let grads = e * c_all;
    let bucket = z.reduce_bucket_size as u128 * e;
    Owned {
        // The fp32 master partitions: a copy also for an fp32 model (l.1162-1172).
        master: 4 * c_all,
        static_params: lp,
        states: 8 * c_all + 4 * g_count,
        params,
        grads: [grads; 5],
        buffers: [bucket; 5],
        temporaries: step,
        at_head_hook: [0, 0],
    }
}

/// Allocated bytes of every phase of a steady step under ZeRO, in [`PHASES`] order.
pub(super) fn phases(plan: &Plan, st: &Stage, z: &Zero) -> [Wide; 5] {
    let n = plan.num_gpus;
    let e = plan.precision.param.bytes() as u128;
    let gs = groups(&plan.model);
    let own = if z.stage == 2 {
        stage2(plan, z, &gs, n as u128, e)
    } else {
        stage3(plan, z, &gs, n, e)
    };
    // The model's own bytes: activations, logits and batch as the hf-transformers preset has
    // them. Each weight gradient is consumed by ZeRO's hook as autograd makes it, so a block's
    // backward holds none past its matmul: the accumulating working set of `block_backward`.
    let q = quantities(plan, st, true);
    let lg = q.logits;
    let (working, at_end) = (st.working[0][2], st.working[0][3]);
    let blocks_mb = q.per_mb - q.head;
    let l = q.walk.max(1);
    let mut out = [Wide::default(); 5];
    for (i, (w, &phase)) in out.iter_mut().zip(PHASES.iter()).enumerate() {
        w.0[0] = own.master;
        w.0[1] = own.params[i];
        w.0[2] = own.grads[i];
        w.0[3] = own.buffers[i];
        w.0[4] = own.states;
        w.0[9] = q.workspace;
        w.0[10] = q.inputs;
        match phase {
            Phase::Forward => {
                // At the loss, or at the last block's end when blocks outweigh the head.
                let loss = (q.acts_forward, lg.forward_peak);
                let block_end = (blocks_mb + q.others_forward, lg.kept_in_step);
                (w.0[6], w.0[8]) = if block_end.0 + block_end.1 > loss.0 + loss.1 {
                    block_end
                } else {
                    loss
                };
            }
            Phase::LossBackward => {
                w.0[6] = q.acts;
                w.0[8] = lg.backward_peak;
                // Or just after, at the output projection's backward: its weight gradient and
                // the hidden states' gradient beside the logits' gradient (log-softmax's
                // backward has freed nll_loss's gradient and its saved output), when its
                // gradient hook has set up ZeRO-2's buckets.
                let logits = lg.backward_peak - 2 * lg.loss_grad - lg.parallel_loss;
                let m = &plan.model;
                let grads = e * (m.vocab as u128 + st.tokens) * m.hidden as u128;
                let [buckets, gip] = own.at_head_hook;
                if logits + grads + buckets + gip > lg.backward_peak {
                    (w.0[7], w.0[8]) = (grads, logits);
                    w.0[3] += buckets;
                    w.0[2] += gip;
                }
            }
            Phase::Backward => {
                // The first block in backward: everything DeepSpeed holds there is at its
                // largest, and so are the activations.
                let during = q.others + blocks_mb + working;
                let end = q.others + div(blocks_mb * (l - 1), l) + at_end;
                (w.0[6], w.0[7]) = if during >= end {
                    (q.others + blocks_mb, working)
                } else {
                    (q.others + div(blocks_mb * (l - 1), l), at_end)
                };
                w.0[8] = lg.held_in_backward;
            }
            Phase::BackwardEnd => {
                w.0[6] = q.others;
                // The embedding's gradient, the last of backward, until its hook takes it.
                w.0[7] = e * (plan.model.vocab * plan.model.hidden) as u128;
                w.0[8] = lg.held_in_backward;
            }
            Phase::Optimizer => {
                w.0[5] = own.temporaries;
                w.0[8] = lg.kept_in_step;
            }
        }
        if plan.gpu.caching_allocator {
            let full_ac_inputs = match plan.activation_checkpointing {
                Checkpointing::Full => w.0[6],
                _ => 0,
            };
            // ZeRO's flat buffers and partitions are allocated once; its gathered parameters,
            // buckets and step temporaries come and go.
            let churn = (w.0[1] - own.static_params)
                + if z.stage == 2 { w.0[3] } else { 0 }
                + w.0[5]
                + (w.0[6] - full_ac_inputs)
                + w.0[7];
            w.1 = overhead::fragmentation(churn);
            if phase == Phase::LossBackward {
                w.1 += lg.freed_segment;
            }
        }
    }
    out
}
