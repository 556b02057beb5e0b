//! The analytic estimator: per-GPU and per-host memory of a [`Plan`], phase by phase.
//!
//! [`estimate`] walks one training step of the most loaded rank through its memory events,
//! in the order they happen, and sums the live tensors at each:
//!
//! 1. `forward`: end of forward, at the cross-entropy, where every block's saved activations
//!    and the logits buffers are alive;
//! 2. `loss-backward`: the log-softmax backward ([`logits`]);
//! 3. `backward`: inside a block's backward, at the worst block position (the last block,
//!    the second, the second-to-first or the first, see [`Phase::Backward`]'s arm of
//!    `steady_phases`): saved activations of the blocks not yet done, the block recomputed
//!    under checkpointing, gradient temporaries, weight gradients, gathered and prefetched
//!    parameters, the previous block's reduce-scatter input and the sharded gradients so far;
//! 4. `backward-end`: the root's post-backward, after every block (its unsharded gradients and
//!    their reduce-scatter input);
//! 5. `optimizer`: parameters, gradients, states and the optimizer's temporaries.
//!
//! It does so for the first step (no optimizer states until the step creates them: this is
//! where the seed case runs out of memory) and a steady step, and reports the peak, where it
//! happens, and the first event that would not fit. Every input is bounded by the plan's
//! validation and every product is taken in 128 bits, then checked into 64-bit [`Bytes`].
//!
//! Memory kinds follow the PyTorch caching allocator's counters: `peak_allocated` is what
//! `torch.cuda.max_memory_allocated()` reports, `peak_reserved` adds the allocator's
//! fragmentation ([`overhead`]), and `device_total` adds what lives outside the allocator
//! (CUDA context, NCCL), comparable with nvidia-smi.

pub mod activations;
pub mod cost;
pub mod host;
pub mod logits;
pub mod optimizer;
pub mod overhead;
pub mod params;
pub mod simulate;
pub mod trace;
pub mod zero;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::plan::{Checkpointing, FsdpUnits, Offload, OptimizerImpl, Plan, PpSchedule};
use crate::units::Bytes;

use activations::{block_activations, BlockActivations};
use params::{stage_params, StageParams};

/// Where the per-GPU bytes go at one moment. Fields are in allocator-counted bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Breakdown {
    /// Sharded master parameters (FSDP shard, master dtype).
    pub master_params_bytes: Bytes,
    /// Unsharded compute-dtype parameters held (root, block in use, prefetched block) and,
    /// under CPU offload, the shards copied in for the all-gather.
    pub unsharded_params_bytes: Bytes,
    /// Sharded gradients (master dtype).
    pub gradients_bytes: Bytes,
    /// Unsharded compute-dtype gradients and reduce-scatter buffers in flight.
    pub gradient_buffers_bytes: Bytes,
    /// Optimizer states.
    pub optimizer_states_bytes: Bytes,
    /// Optimizer step temporaries.
    pub optimizer_temporaries_bytes: Bytes,
    /// Activations saved for backward, every block of every in-flight micro-batch.
    pub activations_bytes: Bytes,
    /// Recomputed activations of the block in backward (checkpointing) and the gradient
    /// temporaries of its backward.
    pub backward_working_set_bytes: Bytes,
    /// Logits and cross-entropy buffers.
    pub logits_bytes: Bytes,
    /// Library workspaces taken from the allocator (cuBLAS).
    pub workspace_bytes: Bytes,
    /// The step's inputs and constant buffers: token ids and labels (int64), the loss, and
    /// the rotary table (complex64, torchtitan precomputes it for twice the sequence).
    pub inputs_bytes: Bytes,
}

impl Breakdown {
    /// Component names and bytes, in display order.
    pub fn items(&self) -> [(&'static str, Bytes); 11] {
        [
            ("master params", self.master_params_bytes),
            ("unsharded params", self.unsharded_params_bytes),
            ("gradients", self.gradients_bytes),
            ("gradient buffers", self.gradient_buffers_bytes),
            ("optimizer states", self.optimizer_states_bytes),
            ("optimizer temporaries", self.optimizer_temporaries_bytes),
            ("activations", self.activations_bytes),
            ("backward working set", self.backward_working_set_bytes),
            ("logits", self.logits_bytes),
            ("workspace", self.workspace_bytes),
            ("inputs and rotary table", self.inputs_bytes),
        ]
    }
    pub fn total(&self) -> Bytes {
        self.items().iter().map(|(_, b)| *b).sum()
    }
}

/// A moment of the training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Forward,
    LossBackward,
    Backward,
    BackwardEnd,
    Optimizer,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::LossBackward => "loss-backward",
            Phase::Backward => "backward",
            Phase::BackwardEnd => "backward-end",
            Phase::Optimizer => "optimizer",
        }
    }
}

/// Allocated bytes at one moment of the first or a steady step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PhasePoint {
    pub first_step: bool,
    pub phase: Phase,
    pub allocated_bytes: Bytes,
}

/// The per-GPU answer for the most loaded rank.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuEstimate {
    /// Pipeline stage of the most loaded rank (0 without PP).
    pub stage: u64,
    pub peak_allocated_bytes: Bytes,
    pub peak_reserved_bytes: Bytes,
    /// Outside the caching allocator: CUDA context, kernels, NCCL.
    pub runtime_overhead_bytes: Bytes,
    /// peak_reserved + runtime_overhead: comparable with nvidia-smi.
    pub device_total_bytes: Bytes,
    pub capacity_bytes: Bytes,
    /// capacity - device_total; negative when it does not fit.
    pub headroom_bytes: i128,
    /// Phase of the peak, e.g. "optimizer (steady step)".
    pub peak_phase: &'static str,
    pub breakdown: Breakdown,
    /// The first event, in time order, whose device total would exceed the capacity.
    pub first_oom: Option<PhasePoint>,
    /// Allocated bytes at every phase of the first and a steady step, in time order.
    pub timeline: [PhasePoint; 10],
    /// The caching-allocator simulation of the step ([`estimate_simulated`]); None from the
    /// closed form alone ([`estimate`], what search uses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulation: Option<Box<simulate::Simulated>>,
}

/// The answer for the whole plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub per_gpu: GpuEstimate,
    pub host: host::HostEstimate,
    pub fits_gpu: bool,
    pub fits_host: bool,
    pub fits: bool,
}

/// Everything about one stage that does not depend on the phase.
#[derive(Clone, Copy)]
pub(crate) struct Stage {
    p: StageParams,
    dense: BlockActivations,
    moe: BlockActivations,
    /// Tokens per micro-batch on this rank.
    tokens: u128,
    /// Micro-batches whose activations are alive at once, in thousandths (interleaved
    /// schedules hold fractions of a stage's layers per micro-batch).
    in_flight_milli: u128,
    /// The pipeline rank (stage index without virtual stages).
    rank: u64,
    /// Logits buffers of one micro-batch (zero off the last stage).
    logits: logits::LogitsBytes,
    /// Token ids, labels, loss and rotary table.
    inputs: u128,
    /// Of the inputs, the rotary table and the pipeline's receive buffers, and FlexAttention's
    /// block mask (alive from the mask's making to the end of the backward).
    rotary: u128,
    p2p: u128,
    mask: u128,
    /// [`block_backward`] of the stage's larger block, for unsharded compute-dtype weight
    /// gradients and for master-dtype ones (FSDP off and no cast).
    working: [[u128; 4]; 2],
}

/// `a / b` on 128 bits, through 64-bit division when both fit (128-bit division is a library
/// call, and the estimator divides on every estimate) and not at all when `b` is 1.
pub(crate) fn div(a: u128, b: u128) -> u128 {
    if b.is_power_of_two() {
        a >> b.trailing_zeros()
    } else if let (Ok(a), Ok(b)) = (u64::try_from(a), u64::try_from(b)) {
        (a / b) as u128
    } else {
        a / b
    }
}

fn to_bytes(v: u128, what: &str) -> Result<Bytes> {
    u64::try_from(v)
        .map(Bytes)
        .map_err(|_| Error::overflow(what))
}

/// Allocated bytes per breakdown component, and the bytes the caching allocator holds beyond
/// them at that moment (`cached`: fragmentation and unreusable freed segments).
#[derive(Default, Clone, Copy)]
struct Wide([u128; 11], u128);

impl Wide {
    fn into_breakdown(self) -> Result<Breakdown> {
        let b = |i: usize, w: &str| to_bytes(self.0[i], w);
        let out = Breakdown {
            master_params_bytes: b(0, "master params")?,
            unsharded_params_bytes: b(1, "unsharded params")?,
            gradients_bytes: b(2, "gradients")?,
            gradient_buffers_bytes: b(3, "gradient buffers")?,
            optimizer_states_bytes: b(4, "optimizer states")?,
            optimizer_temporaries_bytes: b(5, "optimizer temporaries")?,
            activations_bytes: b(6, "activations")?,
            backward_working_set_bytes: b(7, "backward working set")?,
            logits_bytes: b(8, "logits")?,
            workspace_bytes: b(9, "workspace")?,
            inputs_bytes: b(10, "inputs")?,
        };
        to_bytes(self.total(), "peak allocated")?;
        Ok(out)
    }
    fn total(&self) -> u128 {
        self.0.iter().sum()
    }
}

/// Number of checkpointed blocks among `layers` under torchtitan's selective-layer rule
/// (a block is wrapped when a running count of blocks reaches a multiple of K).
fn checkpointed_layers(ac: Checkpointing, layers: u64) -> (u64, u64, u64) {
    // (plain, fully checkpointed, selective-op)
    match ac {
        Checkpointing::None => (layers, 0, 0),
        Checkpointing::Full => (0, layers, 0),
        Checkpointing::SelectiveLayer(k) => (layers - layers / k, layers / k, 0),
        Checkpointing::SelectiveOp => (0, 0, layers),
    }
}

/// Micro-batches of activations pipeline stage `s` holds at its peak, in thousandths.
///
/// GPipe runs every forward before any backward: all `m` micro-batches. 1F1B (Narayanan et
/// al. 2021, section 2.2; PipeDream-Flush) and ZB-H1 (Qi et al. 2023, "same peak memory as
/// 1F1B") hold `min(pp - s, m)`. Interleaved 1F1B with `v` chunks per rank holds its warm-up
/// forwards and one more ([`interleaved_warmup`]), each chunk 1/v of the rank's layers.
pub fn in_flight_milli(plan: &Plan, s: u64) -> u128 {
    let par = &plan.parallel;
    let m = plan.batch.grad_accum_steps as u128;
    if par.pp == 1 {
        return 1000;
    }
    let (pp, s_) = (par.pp as u128, s as u128);
    match par.pp_schedule {
        PpSchedule::GPipe => 1000 * m,
        PpSchedule::OneFOneB | PpSchedule::ZbH1 => 1000 * (pp - s_).min(m),
        PpSchedule::Interleaved1F1B => {
            let v = par.pp_virtual_stages as u128;
            let (warmup, _) = interleaved_warmup(plan, s);
            (1000 * (warmup as u128 + 1) / v).min(1000 * m)
        }
    }
}

/// torch 2.11 `ScheduleInterleaved1F1B` on pipeline rank `rank`: (warm-up forwards,
/// micro-batches per round). Rounds are `max(1, m / pp)`; the last rank warms up with
/// `(v - 1)` rounds of forwards and each rank before it with 2 more
/// (`schedules.py`, `_get_warmup_ops`), at most all `m v` forwards.
fn interleaved_warmup(plan: &Plan, rank: u64) -> (u64, u64) {
    let par = &plan.parallel;
    let (pp, v, m) = (par.pp, par.pp_virtual_stages, plan.batch.grad_accum_steps);
    let per_round = m / (m / pp).max(1);
    let warmup = (v - 1) * per_round + 2 * (pp - 1 - rank);
    (warmup.min(m * v), per_round)
}

/// What one chunk (virtual stage) of an interleaved rank holds per micro-batch in flight.
struct Chunks {
    /// A chunk's blocks' saved activations.
    blocks: u128,
    /// The last global stage's head (final norm) and, for micro-batches other than the one
    /// in its backward, the logits and loss graph it keeps.
    head: u128,
    kept: u128,
    /// The first block's saved input when it is the receive buffer (not global stage 0).
    alias: u128,
    /// One stage output or input gradient (b x s x h).
    act: u128,
    /// A chunk's blocks' gradients once its first backward has run, and the root's (the
    /// embedding's on global stage 0, the final norm's and output's on the last), which
    /// belong to the chunk that holds it.
    grads: u128,
    root_grads: u128,
}

/// The heaviest backward of an interleaved 1F1B rank, walked op by op as torch 2.11 orders
/// them (`_get_1f1b_rank_ops`: the warm-up forwards, then a forward and a backward per step,
/// then the remaining backwards; forwards go through the rank's chunks a round at a time,
/// backwards through them in reverse). `_PipelineScheduleRuntime` waits on its sends only at
/// the step's end, and a Gloo or NCCL send keeps its tensor: every stage output sent and
/// every input gradient sent stays until then (measured with torch's own pipelining on CPU,
/// `src/trainer/pipelining_reference.py`). Returns (the backward chunk's own activations,
/// everything else in flight with the outputs and gradients held for sends, of which the
/// sent gradients, the gradients of chunks already through a backward, whether the chunk in
/// backward is the last global stage).
fn interleaved_peak(plan: &Plan, rank: u64, c: &Chunks) -> (u128, u128, u128, u128, bool) {
    let par = &plan.parallel;
    let (pp, v, m) = (par.pp, par.pp_virtual_stages, plan.batch.grad_accum_steps);
    let (warmup, per_round) = interleaved_warmup(plan, rank);
    let total = m * v;
    let global = |i: u64| i * pp + rank;
    let last = pp * v - 1;
    let grads_of = |i: u64| {
        c.grads
            + if global(i) == 0 || global(i) == last {
                c.root_grads
            } else {
                0
            }
    };
    let act = |i: u64| {
        c.blocks + if global(i) == last { c.head } else { 0 }
            - if global(i) == 0 {
                0
            } else {
                c.alias.min(c.blocks)
            }
    };
    let mut in_flight = vec![0u64; v as usize];
    let mut backwarded = vec![false; v as usize];
    let (mut fwd, mut outputs, mut sent) = (0u64, 0u128, 0u128);
    let mut best = (0u128, (0u128, 0u128, 0u128, 0u128, false));
    for k in 0..total {
        // Forwards up to and including this step's.
        while fwd < (warmup + k + 1).min(total) {
            let i = (fwd / per_round) % v;
            in_flight[i as usize] += 1;
            if global(i) != last {
                outputs += c.act;
            }
            fwd += 1;
        }
        let i = v - 1 - (k / per_round) % v;
        let held: u128 = (0..v)
            .map(|j| {
                let n = in_flight[j as usize] as u128;
                n * act(j)
                    + if global(j) == last {
                        n.saturating_sub(u128::from(j == i)) * c.kept
                    } else {
                        0
                    }
            })
            .sum();
        let grads: u128 = (0..v)
            .filter(|&j| backwarded[j as usize])
            .map(grads_of)
            .sum();
        let own = act(i);
        let total_now = held + outputs + sent + grads;
        if total_now > best.0 {
            best = (
                total_now,
                (
                    own,
                    held - own + outputs + sent,
                    sent,
                    grads,
                    global(i) == last,
                ),
            );
        }
        in_flight[i as usize] -= 1;
        backwarded[i as usize] = true;
        if global(i) != 0 {
            sent += c.act;
        }
    }
    best.1
}

/// The FlexAttention `BlockMask` torchtitan 0.3 builds each step from `positions`
/// (`models/common/decoder.py`, `_create_flex_attention_mask_for_document`, block size 128,
/// torch `nn/attention/flex_attention.py`, `create_block_mask`), alive from before the
/// forward to the end of the backward: per batch row, int32 block counts (`kv_num_blocks`,
/// `full_kv_num_blocks`, `q_num_blocks`, `full_q_num_blocks`: 4 x nq each) and block indices
/// (four of 4 x nq x nk), and the packed-document mask function's captured table
/// (`models/common/attention.py`, `get_efficient_causal_mask_mod_for_packed_document`:
/// int32 `doc_end_by_token` [B, S]; with one row, `document_id` [S] and `offsets` of S + 1
/// rounded up to 128). Measured: 576 B at B 2, S 64.
fn block_mask_bytes(plan: &Plan) -> u128 {
    if plan.implementation.attention != crate::plan::Attention::Flex {
        return 0;
    }
    let (b, s) = (
        plan.batch.micro_batch_size as u128,
        plan.batch.seq_len as u128,
    );
    let blocks = s.div_ceil(128);
    let table = if b == 1 {
        4 * s + 4 * (s + 1).div_ceil(128) * 128
    } else {
        4 * b * s
    };
    16 * b * blocks * (1 + blocks) + table
}

#[inline]
fn stage(plan: &Plan, index: u64) -> Stage {
    let b = &plan.batch;
    let par = &plan.parallel;
    let tokens = b.micro_batch_size as u128 * (b.seq_len / par.cp) as u128;
    let p = stage_params(plan, index);
    let m = &plan.model;
    let dense = block_activations(plan, false);
    let moe = if p.moe_layers > 0 {
        block_activations(plan, true)
    } else {
        BlockActivations::default()
    };
    // int64 ids on the first stage, int64 labels and the fp32 loss on the last; the rotary
    // table of 2 x seq positions x head_dim/2 complex64 on every stage. A pipeline schedule
    // splits the step's batch into micro-batches as views: ids and labels of every
    // micro-batch stay (measured with torch's own pipelining on CPU).
    let whole_step = if par.pp > 1 {
        b.grad_accum_steps as u128
    } else {
        1
    };
    // Context parallelism: `context_parallel` shards its buffers with `resize_` to the
    // shard's shape, which keeps each storage whole (ids and labels stay b x seq), and until
    // the context exits its frame holds the rotary table's clone kept for restoring it, the
    // table shard's copy and the input and label shards (torch 2.11
    // `_context_parallel/_attention.py`, `context_parallel`; measured on CPU).
    let (ids_tokens, cp_frame) = if par.cp > 1 {
        let table = 8 * b.seq_len as u128 * m.head_dim as u128;
        let cp = par.cp as u128;
        let shards = div(8 * b.micro_batch_size as u128 * b.seq_len as u128, cp);
        (
            b.micro_batch_size as u128 * b.seq_len as u128,
            table + div(table, cp) + shards * (p.first as u128 + p.last as u128),
        )
    } else {
        (tokens, 0)
    };
    // torchtitan 0.3: the step's int64 `positions` (every stage: its RoPE and masks read
    // them) and, with FlexAttention, the `BlockMask` built from them.
    let positions = match plan.implementation.rotary {
        crate::plan::Rotary::PerLayer => 8 * ids_tokens * whole_step,
        _ => 0,
    };
    let ids = 8 * ids_tokens * whole_step * (p.first as u128 + p.last as u128)
        + 4 * p.last as u128
        + cp_frame
        + positions;
    let mask = block_mask_bytes(plan);
    // Every model part of a pipeline rank carries its own rotary table (torchtitan splits the
    // model by copying it whole and deleting what a stage lacks; measured: one 8 x seq x
    // head_dim table per virtual stage).
    let parts = if par.pp_schedule == PpSchedule::Interleaved1F1B {
        par.pp_virtual_stages as u128
    } else {
        1
    };
    let rotary = match plan.implementation.rotary {
        crate::plan::Rotary::Complex => parts * 8 * b.seq_len as u128 * m.head_dim as u128,
        crate::plan::Rotary::ComplexSeq => parts * 4 * b.seq_len as u128 * m.head_dim as u128,
        // One cache per attention layer of the stage (torchtitan 0.3 builds a RoPE module,
        // with its buffer, in every attention; `update_from_config` sizes each to seq_len).
        crate::plan::Rotary::PerLayer => {
            p.layers() as u128 * 4 * b.seq_len as u128 * m.head_dim as u128
        }
        // Hugging Face's cos and sin take the hidden states' dtype: the compute dtype, or
        // under autocast the fp32 of the residual stream.
        crate::plan::Rotary::CosSin => {
            let e = if plan.precision.autocast {
                4
            } else {
                plan.precision.param.bytes() as u128
            };
            parts * 2 * b.seq_len as u128 * m.head_dim as u128 * e
        }
    };
    // Pipeline receive buffers (torch 2.11 `PipelineStage`): every local stage keeps one
    // activation buffer per micro-batch to receive its input (not global stage 0) and one to
    // receive its output's gradient (not the last), allocated in the first step and kept.
    // Measured with torch's own pipelining on CPU (src/trainer/pipelining_reference.py,
    // docs/research/parallelism-torch-2.11.md): 4 x (2 x 32 x 64) fp32 = 65,536 B on both
    // stages of a pp=2 tiny plan.
    let p2p = if par.pp > 1 {
        let v = if par.pp_schedule == PpSchedule::Interleaved1F1B {
            par.pp_virtual_stages as u128
        } else {
            1
        };
        let directions = 2 * v - u128::from(index == 0) - u128::from(index + 1 == par.pp);
        let sp = if par.sp { par.tp as u128 } else { 1 };
        let act = div(
            tokens * m.hidden as u128 * plan.precision.param.bytes() as u128,
            sp,
        );
        directions * b.grad_accum_steps as u128 * act
    } else {
        0
    };
    Stage {
        inputs: ids + rotary + p2p + mask,
        rotary,
        p2p,
        mask,
        logits: if p.last {
            logits::logits_bytes(plan, tokens)
        } else {
            logits::LogitsBytes::default()
        },
        dense,
        moe,
        working: [plan.precision.param, plan.precision.master]
            .map(|d| block_backward(plan, &p, &dense, &moe, tokens, d.bytes() as u128)),
        p,
        tokens,
        in_flight_milli: in_flight_milli(plan, index),
        rank: index,
    }
}

/// Saved bytes per token of `layers` blocks of one kind under the plan's checkpointing.
fn saved_per_token(ac: Checkpointing, layers: u64, a: &BlockActivations) -> u128 {
    let (plain, full, sac) = checkpointed_layers(ac, layers);
    plain as u128 * a.no_ac + full as u128 * a.full_ac + sac as u128 * a.selective_op
}

/// Recomputed activations of one block's backward, per token, net of what the recompute
/// frees.
///
/// Selective-op checkpointing hands each kept op output back to the recompute by popping it
/// from its cache (torch 2.11 `torch/utils/checkpoint.py`, `_CachedTorchDispatchMode`:
/// `storage[func].pop(0)`), so a kept output that backward does not save (the wq and w2
/// outputs of a Llama block: rotary saves only `freqs_cis`, the residual add nothing) is freed
/// as the recompute passes it. Measured with torchtitan 0.2.2's op SAC on CPU:
/// -(e q + e h) per token against counting them through the block's backward
/// (docs/research/torchtitan-0.2.2-measured.md, finding 7).
pub(crate) fn recompute_per_token(ac: Checkpointing, a: &BlockActivations) -> u128 {
    match ac {
        Checkpointing::None => 0,
        Checkpointing::Full | Checkpointing::SelectiveLayer(_) => a.no_ac - a.input_alias,
        Checkpointing::SelectiveOp => {
            let popped = (a.selective_op - a.full_ac).saturating_sub(a.selective_op_overlap);
            (a.no_ac - a.selective_op_overlap - a.input_alias).saturating_sub(popped)
        }
    }
}

/// Bytes of one block's backward beyond what was alive before it: the recomputed
/// activations, gradient temporaries and the block's unsharded weight gradients, at the
/// larger of its two peaks. Autograd walks the block backwards: at the MLP's peak (the
/// `silu * w3` product's backward) every recomputed tensor is still alive and only w2's
/// weight gradient exists; by attention's backward the feed-forward half's saved tensors are
/// freed and the three MLP weight gradients and wo's exist. (An MoE block is taken at its
/// MLP peak with every weight gradient, an upper bound.)
fn block_backward(
    plan: &Plan,
    p: &StageParams,
    dense: &BlockActivations,
    moe_act: &BlockActivations,
    t: u128,
    grads_elem_bytes: u128,
) -> [u128; 4] {
    let ac = plan.activation_checkpointing;
    let moe = p.moe_layers > 0;
    let a = if moe { moe_act } else { dense };
    let re = t * recompute_per_token(ac, a);
    let re = if re > 0 { re + a.per_block } else { 0 };
    let m = &plan.model;
    let tp = plan.parallel.tp as u128;
    let (h, f, q) = (m.hidden as u128, m.intermediate as u128, m.q_dim() as u128);
    if moe {
        // torchtitan 0.2.2's MoE (measured with its own code on CPU; activations::moe_ffn):
        // its backward at the experts' w2 holds dY and dH in bf16 (the transient), w2's
        // gradient in bf16 and its master-dtype copy (ToCopyBackward; the weight gradients
        // come one matrix at a time). Recomputed under checkpointing, the block's forward
        // peaks at the combine, before any of its backward: the routed copies, the permuted
        // input, the experts' output and `_unpermute`'s buffer (and under EP the combine's
        // all-to-all output) beside what is recomputed so far and the incoming gradient.
        let spec = m.moe.expect("an MoE stage has an MoE layout");
        let ep = plan.parallel.ep as u128;
        let local = div(spec.experts as u128, ep);
        let f_e = div(spec.expert_intermediate as u128, plan.parallel.etp as u128);
        let k = spec.top_k as u128;
        let rows = div(t * k * plan.moe_capacity_milli as u128, 1000) + 8 * local;
        let e_act = plan.precision.param.bytes() as u128;
        let w2 = local * f_e * h;
        let at_w2 = re + t * a.mlp_transient + w2 * (2 + grads_elem_bytes);
        let at_combine = if re > 0 {
            let combine_out = if ep > 1 { t * k } else { 0 };
            // (The combining bmm's fp32 copy of the routed output, part of the recomputed
            // set, comes after the combine.)
            re - t * 4 * h * k + e_act * h * (t * k + 3 * rows + combine_out) + t * e_act * h
        } else {
            0
        };
        let during = at_w2.max(at_combine);
        // At the block's end every weight gradient exists, as for a dense block.
        let end_point = grads_elem_bytes * p.moe.unsharded + 2 * t * a.full_ac;
        return [during, end_point, during, 2 * t * a.full_ac];
    }
    if let Some(l) = plan.lora {
        // A frozen base has no weight gradients: the adapters' are the only new ones, beside
        // the input gradients' transients. Backward meets the linears in reverse: under FSDP,
        // at the `silu * up` product's backward only down's adapters have their (unsharded)
        // gradients: counting every adapter's there put q/k/v/o plans +0.7% high (measured
        // with peft under accelerate's FSDP2, docs/research/lora-fsdp2-measured.md). On one
        // GPU, where the gradients are the adapters' own `.grad`, the checkpointed plans
        // peak 0.2% to 0.4% below the point with every adapter's and 0.5% to 0.7% above the
        // point with down's alone (docs/research/hf-lora-measured.md); which adapter
        // gradients are alive there is not itemised, so one GPU keeps the upper bound.
        let g = grads_elem_bytes * params::lora_block_params(plan).0;
        let g_mlp = if plan.parallel.fsdp_degree() > 1 {
            let (fan_in, fan_out) = params::lora_module_dims(plan)[params::LORA_DOWN];
            let down = u128::from(l.wraps(params::LORA_DOWN)) * l.rank as u128 * (fan_in + fan_out);
            grads_elem_bytes * down
        } else {
            g
        };
        // (QLoRA: each quantised linear dequantises its weight in forward and again in
        // backward and frees it inside the op, before the `silu * up` product's backward
        // where this point is; measured on CPU, it is the step's peak only for layers far wider
        // than their tokens. Not modelled.)
        let during = (re + t * a.mlp_transient + g_mlp)
            .max((re + t * a.attn_transient + g).saturating_sub(t * a.ffn_saved));
        return [during, g + 2 * t * a.full_ac, during, 2 * t * a.full_ac];
    }
    let w2 = div(grads_elem_bytes * h * f, tp);
    let mlp_point = re + t * a.mlp_transient + w2;
    // The feed-forward half's saved tensors are freed by then, whether they were recomputed
    // (part of `re`) or kept from forward (part of the stage's activations).
    let mlp_grads = m.mlp_matrices() as u128 * w2;
    let attn_point = (re + t * a.attn_transient + mlp_grads + div(grads_elem_bytes * h * q, tp))
        .saturating_sub(t * a.ffn_saved);
    // At the block's end every weight gradient exists and the activations are gone but for
    // the gradient flowing in and the one flowing out (what small batches peak at).
    let end_point = grads_elem_bytes * p.dense.unsharded + 2 * t * a.full_ac;
    // Accumulating into gradients that exist (a pipeline's later micro-batches): autograd
    // adds each new weight gradient into `.grad` and frees it at once, so none is alive past
    // its own matmul, and w2's saved input is freed with its backward. Measured with torch's
    // own pipelining (docs/research/parallelism-torch-2.11.md; 1F1B, the second backward):
    // the peak is w2's matmul backward, its two outputs (the input's gradient and the new
    // weight gradient) the only temporaries,
    // Then the `silu * w3` product's backward, with its two gradients. The gradient flowing
    // into the stage's last block is the pipeline's receive buffer (counted with the
    // inputs) except on the last stage, where the final norm's backward allocates it.
    let e_act = plan.precision.param.bytes() as u128;
    let act_f = div(t * f * e_act, tp);
    let incoming = if p.last { t * h * e_act } else { 0 };
    let w2_matmul = act_f + w2;
    let wq = div(grads_elem_bytes * h * q, tp);
    let attn_acc = (re + t * a.attn_transient + wq).saturating_sub(t * a.ffn_saved);
    [
        mlp_point.max(attn_point),
        end_point,
        (re + incoming + w2_matmul.max(2 * act_f)).max(attn_acc),
        2 * t * a.full_ac,
    ]
}

/// The quantities of one stage's step that the phases are made of, in bytes: computed once
/// and shared by the phase figures ([`steady_phases`]) and the event trace ([`trace`]), so
/// that the two tell one story.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quantities {
    /// Bytes per element of the master dtype.
    pub m: u128,
    /// Of `master`, the root's (embedding, final norm, output) bytes; and the root's
    /// elements that train (none under LoRA), for its gradients and optimizer states.
    pub root_master: u128,
    pub root_trainable: u128,
    /// What the first walked block's backward does not allocate for its incoming gradient
    /// (a pipeline stage's receive buffer holds it).
    pub recv_incoming: u128,
    /// Whether the backward walked is the last stage's (on an interleaved rank, whether its
    /// chunk is the last global stage): only then is that micro-batch's loss input still held.
    pub walk_on_last: bool,
    /// Blocks on the stage.
    pub layers: u128,
    /// Blocks whose activations `per_mb` holds and one backward walks: the stage's, or on an
    /// interleaved rank one chunk's (layers / v).
    pub walk: u128,
    /// All-gathers go through a flat buffer (FSDP over more than one rank, with copies).
    pub gathers: bool,
    pub on_gpu_params: bool,
    /// cuBLAS workspaces: PyTorch keeps one per (cuBLAS handle, stream), and handles are
    /// per thread, so a step has two: the first forward matmul makes the main thread's, the
    /// first backward matmul the autograd engine's device thread's (torch 2.11
    /// `CublasHandlePool.cpp`; measured on an H200: two 32 MiB blocks, held for the run,
    /// made at the first forward and the first backward matmul). `workspace` is both;
    /// `workspace_forward` what the first step's forward phase holds: the first only, unless
    /// an earlier micro-batch's backward ran before the forward's peak (accumulation or
    /// pipelining: counted as both; GPipe runs every forward first, 1 handle too high there).
    pub workspace: u128,
    pub workspace_forward: u128,
    pub inputs: u128,
    /// Of the inputs, the rotary table and the pipeline's receive buffers, and the block mask
    /// (made each step before the forward; `forward_backward_step`'s local, gone by the
    /// optimizer step: measured 576 B less there on tiny).
    pub rotary: u128,
    pub p2p: u128,
    pub mask: u128,
    /// Sharded master parameters, optimizer states, every sharded gradient, on the device.
    pub master: u128,
    pub states: u128,
    /// Of the states, the root parameters' (embedding, final norm, output).
    pub root_states: u128,
    pub grads_all: u128,
    /// Gradients alive when the representative micro-batch's backward begins (sharded ones
    /// from earlier micro-batches; under FSDP with pipelining, every unsharded one), and
    /// during its forward.
    pub grads_prior: u128,
    pub grads_forward: u128,
    /// FSDP2 under pipelining: nothing is resharded or reduce-scattered until the schedule's
    /// end (REDUCE_GRAD), so gradients are unsharded in the compute dtype.
    pub fsdp_pp: bool,
    /// Of the gradients, the blocks' (the root's are the rest).
    pub blocks_grads: u128,
    /// One block's sharded gradient (the larger kind of block).
    pub block_grad: u128,
    /// Saved activations of one micro-batch: every block's, and the head's (final norm and
    /// output input; last stage only).
    pub per_mb: u128,
    pub head: u128,
    /// Saved activations at the peak, every micro-batch in flight, and of the other
    /// micro-batches alone (with, on a pipeline's last stage, their kept logits, and on the
    /// other stages the stage outputs the schedule holds), in the representative
    /// micro-batch's backward and, `_forward`, in its forward (GPipe's backward can find one
    /// micro-batch fewer than its forward).
    pub acts: u128,
    pub others: u128,
    pub acts_forward: u128,
    pub others_forward: u128,
    /// Of `others` and `others_forward`: the input gradient held for its send.
    pub sent: u128,
    pub sent_forward: u128,
    /// A pipeline's last stage accumulating into existing gradients: the output projection's
    /// backward, after the loss's, with its new weight gradient and input gradient as
    /// temporaries beside the logits' gradient (bytes beyond the loss-backward moment's
    /// buffers less nll_loss's gradient).
    pub projection_backward: u128,
    /// One block's backward beyond what was alive before it: during (MLP or attention) and
    /// at its end.
    pub working: u128,
    pub at_end: u128,
    /// Gathered (compute-dtype) parameters of one block, and of the root kept from forward
    /// through the loss's backward and, `_blocks`, while the blocks compute (none under the
    /// split units, whose embedding and [norm, output] are gathered only for their own work).
    pub block_u: u128,
    pub root_u: u128,
    pub root_u_blocks: u128,
    /// The root's gathered parameters while the final norm and output projection compute.
    pub head_u: u128,
    /// The root resharded after forward (`root-resharded-keep-last`): its parameters, gathered
    /// again by the output's pre-backward hook once the loss's backward is done.
    pub root_regather: u128,
    /// Under sequence parallelism, on the last stage: the final norm's sequence shard, which the
    /// model's `h = self.norm(h)` keeps bound while the output projection gathers its input
    /// and computes (freed as the model returns; measured with torch's DTensor SP on CPU).
    pub sp_norm_shard: u128,
    /// Blocks whose gathered parameters are kept from forward to backward.
    pub held: u128,
    /// The last all-gather output of forward, kept until the root's post-forward: a block's,
    /// or under the split units [norm, output]'s.
    pub retained_u: u128,
    /// Split units: the embedding, gathered in advance during the first block's backward; the
    /// [norm, output] unit's sharded gradients through the blocks' backward, and its
    /// reduce-scatter input through the last block's.
    pub prefetch_first: u128,
    /// Whether backward's prefetch of the next unit allocates anything before that unit runs:
    /// not under FSDP on one GPU, where torch 2.15's `FSDPParamGroup.unshard` returns at
    /// once and `wait_for_unshard` makes the unsharded copies when the unit runs
    /// (`_fsdp_param_group.py`, "world_size == 1").
    pub prefetches: bool,
    /// Under expert parallelism with an expert-FSDP mesh of one rank: the routed experts of a
    /// prefetched block, which are not gathered in advance (FSDP2's world-size-1 unshard
    /// makes their copy only when the block runs).
    pub prefetch_less: u128,
    pub tail_grads: u128,
    pub tail_rs: u128,
    /// Without FSDP, on the first stage: the embedding's gradient and the gradient flowing into
    /// it, at the embedding's backward (the backward's end).
    pub embedding_grad: u128,
    pub logits: logits::LogitsBytes,
    /// The output weight's unsharded gradient, kept until the root's post-backward.
    pub out_grad: u128,
    /// One block's reduce-scatter input (reduce dtype).
    pub rs: u128,
    /// One block's shard cast to the compute dtype for its all-gather.
    pub cast_in: u128,
    /// The root's unsharded gradients (compute dtype) and their reduce-scatter input.
    pub root_grads: u128,
    pub root_rs: u128,
    pub opt_temporaries: u128,
    /// torchtitan 0.3's chunked loss on this stage (zero without it), and [norm, output]'s
    /// parameters its loop gathers (under the split units).
    pub chunked: logits::ChunkedLoss,
    pub loop_u: u128,
    /// The chunked loss: what [norm, output]'s unshard for the final norm's backward holds
    /// beside the copied-out parameters for a moment (the all-gather output; on one GPU the
    /// output weight's cast to the compute dtype, torch 2.15 `_fsdp_param_group.py`,
    /// `wait_for_unshard`, world size 1).
    pub tail_unshard: u128,
    /// The chunked loss: the bytes [norm, output]'s all-gather in forward holds beside the last
    /// block's retained all-gather output (its cast input and output; on one GPU its copies and
    /// the output weight's cast), when the norm runs.
    pub tail_gather: u128,
    /// torchtitan 0.3 (FSDP everywhere): a block's reduce-scatter output (its shard of the
    /// reduce-dtype gradients) and the input gradient it passes on, at its post-backward.
    pub post_reduce: u128,
    pub block_grad_out: u128,
    /// torchtitan 0.3's block: the stage's last block's bytes at its rotation and at its last
    /// residual add ([`activations::BlockActivations::rope_peak`]), for one micro-batch.
    pub rope_moment: u128,
    pub add_moment: u128,
}

/// The cuBLAS workspace the first step's forward does not hold yet: the autograd thread's,
/// unless an earlier micro-batch's backward ran before the forward's peak (accumulation or
/// pipelining). See [`Quantities::workspace`].
#[inline]
fn first_forward_lacks_workspace(plan: &Plan) -> u128 {
    if plan.batch.grad_accum_steps > 1 || plan.parallel.pp > 1 {
        0
    } else {
        plan.gpu.workspace_bytes.get() as u128
    }
}

#[inline]
/// `steady`: a steady step's quantities (else the first step's: they differ when gradients are
/// zeroed, not freed, between steps, [`crate::plan::ZeroGrad::Zeros`]).
pub(crate) fn quantities(plan: &Plan, st: &Stage, steady: bool) -> Quantities {
    let p = &st.p;
    let pr = &plan.precision;
    let (e, m, r) = (
        pr.param.bytes() as u128,
        pr.master.bytes() as u128,
        pr.reduce.bytes() as u128,
    );
    let n = plan.parallel.fsdp_degree();
    let layers = p.layers() as u128;
    let ac = plan.activation_checkpointing;
    // A separate compute-dtype copy exists when FSDP gathers or when it casts.
    // LoRA on one GPU: the base is frozen in the compute dtype, never gathered or cast; only
    // the adapters (master dtype) have gradients and optimizer states.
    // LoRA under FSDP (peft under accelerate's FSDP2, measured on CPU/Gloo with torch 2.11:
    // docs/research/lora-fsdp2-measured.md): the base is loaded and sharded in the master
    // dtype and gathered in the compute dtype like any parameter (`FSDPParam` casts frozen
    // weights and adapters alike), each block's adapters in the block's unit; only adapters
    // have gradients, so only they are reduce-scattered, and the embedding and output units
    // reduce nothing.
    let lora = plan.lora.is_some();
    let lora_fsdp = lora && n > 1;
    let (lora_block, _) = params::lora_block_params(plan);
    // Under autocast the weights stay in the master dtype and are cast op by op (the casts
    // are `block_u` below), so there are no FSDP-style compute copies or their buffers.
    // HSDP at one shard rank (dp_replicate > 1, dp_shard 1) is still `fully_shard`, on the
    // (dp_replicate, 1) mesh: torch 2.11's world-size-1 unshard copies every parameter of a unit
    // into an unsharded buffer of its own (`_fsdp_param_group.py` l.368-392) even at fp32, so
    // it has copies where one device does not (docs/research/hsdp-torch-2.11-measured.md).
    let hsdp_solo = plan.parallel.dp_replicate > 1 && n == 1;
    // torchtitan 0.3 wraps the model in FSDP on one GPU too ([`Implementation::fsdp_one_gpu`]):
    // copies in fp32 as well (measured on CPU: fp32 copies of each block while it computes).
    let copies = (!lora || lora_fsdp)
        && !pr.autocast
        && (n > 1 || pr.param != pr.master || hsdp_solo || plan.implementation.fsdp_one_gpu);
    let on_gpu_params = plan.offload != Offload::Full;
    let states_on_gpu = plan.offload == Offload::None;
    let shard = p.shard_total();
    // Gradients zeroed, not freed (torchtitan 0.3): a steady step finds every sharded
    // gradient alive from its start, as accumulation's later micro-batches do.
    let zeroed = steady
        && plan.implementation.zero_grad == crate::plan::ZeroGrad::Zeros
        && plan.parallel.pp == 1;
    let accum = plan.batch.grad_accum_steps > 1 || plan.parallel.pp > 1 || zeroed;
    let par = &plan.parallel;
    let pipelined = par.pp > 1;
    let micro = plan.batch.grad_accum_steps as u128;
    // Every forward before the first backward: GPipe, or 1F1B with no more micro-batches
    // than the stage's warm-up holds (stage s of 1F1B runs pp - s forwards first).
    let all_first =
        pipelined && (par.pp_schedule == PpSchedule::GPipe || st.in_flight_milli >= 1000 * micro);
    let fsdp_pp = pipelined && copies;
    // Under TP the embedding's gradient comes out of `embedding_dense_backward` whole, a
    // replicated (V, h) tensor beside its row-sharded weight, and without FSDP to slice it
    // it stays so through the optimizer step (measured with torch's DTensor TP on CPU).
    let full_embedding_grad = if par.tp > 1 && p.first && n == 1 && on_gpu_params {
        let m_ = &plan.model;
        (m_.vocab - m_.vocab.div_ceil(par.tp)) as u128 * m_.hidden as u128 * m
    } else {
        0
    };
    let lora_shard = params::lora_shard(plan, lora_block);
    let trainable = if lora {
        p.layers() as u128 * lora_shard
    } else {
        shard
    };
    let grads_all = if on_gpu_params { trainable * m } else { 0 } + full_embedding_grad;
    // Under FSDP with pipelining every micro-batch's backward accumulates into full-size
    // unsharded gradients, reduce-scattered only at the schedule's end (torch 2.11
    // `PipelineStage` turns FSDP's reshard-after-backward and gradient sync off for every
    // micro-batch; `perform_reduce_grad` at the end). Measured with torch's own pipelining on
    // CPU (docs/research/parallelism-torch-2.11.md).
    // When the reduce dtype differs from the compute dtype, FSDP2 moves each unit's gradient
    // into an `unsharded_accumulated_grad` of the reduce dtype at its post-backward and adds
    // later micro-batches' compute-dtype gradients into it there (torch 2.11
    // `_fsdp_param.py`, `to_accumulated_grad_if_needed`): the accumulation is in the reduce
    // dtype, and a unit's new gradients live until its post-backward.
    let upcast_accumulation = fsdp_pp && r != e;
    let unsharded_grads = if fsdp_pp {
        (p.dense_layers as u128 * p.dense.unsharded
            + p.moe_layers as u128 * p.moe.unsharded
            + p.root_unsharded)
            * if upcast_accumulation { r } else { e }
    } else {
        0
    };
    let grads_whole = if fsdp_pp { unsharded_grads } else { grads_all };

    let head = if p.last { st.dense.head } else { 0 };
    let first_block_less = if p.first && p.dense_layers > 0 {
        st.dense.first_block_less
    } else {
        0
    };
    let per_mb_saved = st.tokens
        * (saved_per_token(ac, p.dense_layers, &st.dense)
            + saved_per_token(ac, p.moe_layers, &st.moe)
            + head
            - first_block_less)
        + checkpointed_layers(ac, p.moe_layers).0 as u128 * st.moe.per_block;
    // A stage's input arrives in its receive buffer (counted with the inputs), which its
    // first block saves for backward as its own input: not a second copy (all but global
    // stage 0; interleaved ranks are left as they were).
    let stage_act = div(
        st.tokens * plan.model.hidden as u128 * e,
        if par.sp { par.tp as u128 } else { 1 },
    );
    let alias = if pipelined && !p.first && par.pp_virtual_stages == 1 {
        stage_act.min(per_mb_saved)
    } else {
        0
    };
    let per_mb = per_mb_saved - alias;
    // Each other micro-batch in flight on the last stage keeps its logits and loss graph
    // until its backward; on the other stages the schedule holds stage outputs: every
    // micro-batch's under GPipe (its sends are waited at the step's end), and under 1F1B the
    // micro-batches in flight and the last warm-up send's.
    let kept = if p.last {
        st.logits.kept_per_micro_batch
    } else {
        0
    };
    let outputs = if pipelined && !p.last {
        let milli = if all_first {
            1000 * micro
        } else {
            (st.in_flight_milli + 1000).min(1000 * micro)
        };
        div(stage_act * milli, 1000)
    } else {
        0
    };
    let others_forward = div(
        (per_mb + kept) * st.in_flight_milli.saturating_sub(1000),
        1000,
    ) + outputs;
    // Gradients from earlier micro-batches: with accumulation; under 1F1B-like schedules
    // from the second micro-batch on (its forward and backward come after the first
    // backward); when every forward comes first, none before the first backward, whose
    // micro-batch has every other in flight, or, when the gradients outweigh a
    // micro-batch's activations, at the second backward, with one micro-batch fewer.
    let earlier = if pipelined { micro >= 2 } else { accum };
    let second = all_first && micro >= 2 && grads_whole > per_mb + kept;
    let (grads_forward, grads_prior, dropped) = if all_first {
        (
            0,
            if second { grads_whole } else { 0 },
            if second { per_mb + kept } else { 0 },
        )
    } else if earlier {
        (grads_whole, grads_whole, 0)
    } else {
        (0, 0, 0)
    };
    // A stage's input gradient, sent back to the previous stage, is held until the next
    // backward's send (1F1B; GPipe holds them all to the step's end, none yet at its first
    // backward). Measured: one b x s x h buffer on the last stage at its peak.
    let sent_forward = if pipelined && !p.first && !all_first {
        stage_act
    } else {
        0
    };
    let sent = if pipelined && !p.first && (!all_first || second) {
        stage_act
    } else {
        0
    };
    // Interleaved 1F1B: the rank's heaviest backward, walked op by op.
    let head_bytes = st.tokens * head;
    let interleaved =
        (pipelined && par.pp_schedule == PpSchedule::Interleaved1F1B && par.pp_virtual_stages > 1)
            .then(|| {
                let v = par.pp_virtual_stages as u128;
                let blocks_grads = if fsdp_pp {
                    unsharded_grads - p.root_unsharded * if upcast_accumulation { r } else { e }
                } else if on_gpu_params {
                    p.blocks_shard() * m
                } else {
                    0
                };
                let chunks = Chunks {
                    blocks: div(per_mb_saved - head_bytes, v),
                    head: head_bytes,
                    kept,
                    alias: stage_act,
                    act: stage_act,
                    grads: div(blocks_grads, v),
                    root_grads: grads_whole - blocks_grads,
                };
                interleaved_peak(plan, st.rank, &chunks)
            });
    let walk_on_last = match interleaved {
        Some((.., on_last)) => on_last,
        None => p.last,
    };
    let (
        per_mb,
        others_forward,
        sent_forward,
        sent,
        grads_prior,
        grads_forward,
        dropped,
        head_bytes,
    ) = match interleaved {
        Some((own, rest, sent_b, grads, on_last)) => (
            own,
            rest - sent_b,
            sent_b,
            sent_b,
            grads,
            grads,
            0,
            if on_last { head_bytes } else { 0 },
        ),
        None => (
            per_mb,
            others_forward,
            sent_forward,
            sent,
            grads_prior,
            grads_forward,
            dropped,
            head_bytes,
        ),
    };
    // Without FSDP the output projection's and final norm's gradients are made before any
    // block's backward and stay (measured with torch's DTensor TP, full AC: 33,024 B on tiny);
    // FSDP holds the output's unsharded gradient as `out_grad` below.
    let plain_root_grads = if !copies && !lora && on_gpu_params && p.last && grads_prior == 0 {
        (p.output_unsharded + plan.model.hidden as u128) * m
    } else {
        0
    };
    // And, last in backward, the embedding's: `embedding_dense_backward` makes its whole
    // gradient beside every other one and the gradient flowing into it (the first block's
    // input gradient, fp32 under autocast). Measured with Transformers' full fine-tune of
    // small on CPU: the backward's peak, 2,228,224 B above the blocks' gradients.
    // (An interleaved rank's walked backward is one chunk's, not necessarily the first.)
    let embedding_grad = if !copies
        && !lora
        && on_gpu_params
        && p.first
        && grads_prior == 0
        && interleaved.is_none()
    {
        let act_e = if pr.autocast { 4 } else { e };
        p.embedding_unsharded * m + st.tokens * plan.model.hidden as u128 * act_e
    } else {
        0
    };
    let others = others_forward - dropped + sent;
    let others_forward = others_forward + sent_forward;
    let acts = per_mb + others;
    // The block in backward: the larger kind present. Its weight gradients are unsharded
    // in the compute dtype when FSDP gathers or casts, else plain master-dtype gradients.
    // During the block's backward (its MLP or attention), and at its end, when its weight
    // gradients all exist and its saved activations are freed.
    let [working, at_end, working_acc, at_end_acc] = st.working[usize::from(!copies)];
    let big = p.biggest_block();
    // Gathered parameters of a block: float8 all-gathers the linear weights in one byte.
    // Under autocast the weight casts it caches and backward keeps: the linears' weights in
    // the 16-bit dtype, held as FSDP's gathered copies would be.
    let autocast = pr.autocast;
    let block_u = if autocast {
        big.unsharded_linear * e
    } else if !copies {
        0
    } else if plan.float8 {
        big.unsharded_linear + (big.unsharded - big.unsharded_linear) * e
    } else {
        (big.unsharded + u128::from(lora) * lora_block) * e
    };
    // Whether all-gathers go through a flat buffer (FSDP over more than one rank), and the
    // block's cast all-gather input (its shard in the compute dtype, when that differs).
    // Under pipelining FSDP2 gathers each block once and keeps it unsharded (nothing is
    // resharded until the step's end), so a steady step has no all-gather buffers.
    let gathers = copies && n > 1 && (!pipelined || plan.reshard_after_forward);
    // FSDP's units ([`crate::plan::FsdpUnits`]). torchtitan of December 2024 keeps the root
    // (embedding, final norm, output) and the last block gathered after forward; plain
    // `fully_shard` reshards every block; torchtitan of 2025 on makes the embedding and
    // [norm, output] units of their own (models/llama3/infra/parallelize.py `apply_fsdp` in
    // 0.2.2): the embedding and every block are resharded after forward, [norm, output] only
    // under "always", and the root holds no parameter. Measured with torchtitan 0.2.2's own
    // step on CPU/Gloo (docs/research/torchtitan-0.2.2-measured.md, finding 2): at the last
    // block's backward [norm, output] is resharded with its gradients reduced, its
    // reduce-scatter input held until the block's; the first block's backward gathers the
    // embedding in advance; the embedding's post-backward copies only its own gradient.
    // Without resharding (`reshard_after_forward: false`) every unit stays gathered from
    // forward to its backward, and under the split units [norm, output] is still resharded
    // by its post-backward before the blocks' (measured with accelerate's FSDP2, whose units
    // are these). Under pipelining every unit stays gathered (see `fsdp_pp`).
    let k = plan.optimizer.states_per_param() as u128;
    let root_trainable = if lora { 0 } else { p.root_shard };
    // torchtitan 0.3's `fused_opt_states_bf16` keeps Adam's two states in bf16.
    let state_bytes = match plan.implementation.optimizer {
        OptimizerImpl::FusedBf16States => 2,
        _ => m,
    };
    let states = optimizer::states(
        plan,
        p,
        (
            k * trainable * state_bytes,
            k * root_trainable * state_bytes,
        ),
    );
    // torchtitan 0.2.2 (`models/llama4/infra/parallelize.py`, `apply_fsdp`) makes each block's
    // experts a unit of their own on the expert-FSDP mesh; with one rank there (EP taking every
    // data-parallel rank) FSDP2 neither all-gathers nor reduce-scatters them, and prefetching
    // them allocates nothing (measured with its EP on CPU: docs/research/ep2-itemised.md).
    let experts_solo = if copies && par.ep > 1 && big.experts_world == 1 {
        big.experts_unsharded
    } else {
        0
    };
    let units = plan.implementation.fsdp_units;
    let reshard = plan.reshard_after_forward;
    let own_units = copies && !pipelined && reshard;
    let split = copies && !pipelined && matches!(units, FsdpUnits::Split | FsdpUnits::SplitAlways);
    // torch 2.11 honours an explicit reshard of the root ([`FsdpUnits::RootReshardedKeepLast`]).
    let root_resharded = own_units && units == FsdpUnits::RootReshardedKeepLast;
    let (emb_shard, emb_u) = (p.embedding_shard, p.embedding_unsharded);
    let tail_u = (p.root_unsharded - emb_u) * e;
    // peft hides the final norm from accelerate's tail unit (`_find_final_norm` looks through
    // the PeftModel's `model` attribute at the LoRA model, whose children hold no norm), so it
    // stays in the root, gathered from the first forward to the end of backward.
    let peft_norm = if lora_fsdp && split {
        plan.model.hidden as u128 * e
    } else {
        0
    };
    let root_u = if copies {
        p.root_unsharded * e
    } else if autocast {
        p.output_unsharded * e
    } else {
        0
    };
    // torchtitan 0.3's chunked loss ([`logits::chunked`]). Under the split units its loop
    // gathers [norm, output] (`lm_head.unshard()`) and reshards it after the last chunk
    // (`lm_head.reshard()`; and it leaves the unit's reshard-after-forward on, so from the
    // second step the unit is resharded as the model returns whatever the policy); the output
    // weight's gradient is reduce-scattered in the loop, so the unit's post-backward after the
    // final norm's backward reduces the norm's alone.
    let chunked = plan.implementation.logits == crate::plan::Logits::Chunked && p.last;
    // FSDP on one GPU ([`crate::plan::Implementation::fsdp_one_gpu`]): no prefetch is
    // materialised ([`Quantities::prefetches`]).
    let solo_fsdp = copies && n == 1 && plan.implementation.fsdp_one_gpu;
    let ch = if chunked {
        logits::chunked(plan, st.tokens, p.output_unsharded, copies && split)
    } else {
        logits::ChunkedLoss::default()
    };
    let tail_norm = div(tail_u, e).saturating_sub(p.output_unsharded);
    Quantities {
        m,
        chunked: ch,
        loop_u: if chunked && split { tail_u } else { 0 },
        post_reduce: if copies && plan.implementation.fsdp_one_gpu && !fsdp_pp {
            div((big.unsharded - experts_solo) * r, n as u128)
        } else {
            0
        },
        block_grad_out: div(
            st.tokens * plan.model.hidden as u128 * e,
            if par.sp { par.tp as u128 } else { 1 },
        ),
        tail_gather: match (chunked && split, gathers) {
            (false, _) => 0,
            (true, true) if pr.param != pr.master => div(tail_u, n as u128) + tail_u,
            (true, true) => tail_u,
            (true, false) if pr.param != pr.master => tail_u + p.output_unsharded * e,
            (true, false) => tail_u,
        },
        tail_unshard: match (chunked && split, gathers) {
            (false, _) => 0,
            (true, true) => tail_u,
            (true, false) if pr.param != pr.master => p.output_unsharded * e,
            (true, false) => 0,
        },
        rope_moment: if p.dense_layers > 0 && p.moe_layers == 0 {
            st.tokens * st.dense.rope_peak
        } else {
            0
        },
        add_moment: if p.dense_layers > 0 && p.moe_layers == 0 {
            st.tokens * st.dense.add_peak
        } else {
            0
        },
        layers,
        walk: if interleaved.is_some() {
            div(layers, par.pp_virtual_stages as u128).max(1)
        } else {
            layers
        },
        gathers,
        on_gpu_params,
        workspace: 2 * plan.gpu.workspace_bytes.get() as u128,
        workspace_forward: 2 * plan.gpu.workspace_bytes.get() as u128
            - first_forward_lacks_workspace(plan),
        inputs: st.inputs,
        rotary: st.rotary,
        p2p: st.p2p,
        mask: st.mask,
        master: match (on_gpu_params, lora) {
            (false, _) => 0,
            (true, false) => shard * m,
            (true, true) => {
                // QLoRA: the block linears in bitsandbytes' 4-bit layout, the rest (embedding,
                // norms, output, biases) in the compute dtype.
                let base = match params::quantised_block(plan) {
                    Some((elems, bytes, _)) => {
                        let l = p.layers() as u128;
                        (shard - l * elems) * e + l * bytes
                    }
                    None if lora_fsdp => shard * m,
                    None => shard * e,
                };
                base + trainable * m
            }
        },
        root_master: match (on_gpu_params, lora) {
            (false, _) => 0,
            (true, false) => p.root_shard * m,
            (true, true) if lora_fsdp => p.root_shard * m,
            (true, true) => p.root_shard * e,
        },
        root_trainable,
        states: if states_on_gpu { states.0 } else { 0 },
        root_states: if states_on_gpu { states.1 } else { 0 },
        grads_all,
        grads_prior,
        grads_forward,
        fsdp_pp,
        blocks_grads: if fsdp_pp {
            unsharded_grads - p.root_unsharded * if upcast_accumulation { r } else { e }
        } else if !on_gpu_params {
            0
        } else if lora {
            trainable * m
        } else {
            p.blocks_shard() * m
        },
        block_grad: if fsdp_pp {
            big.unsharded * if upcast_accumulation { r } else { e }
        } else if !on_gpu_params {
            0
        } else if lora {
            lora_shard * m
        } else {
            big.shard * m
        },
        per_mb,
        head: head_bytes,
        acts,
        others,
        acts_forward: per_mb + others_forward,
        others_forward,
        sent,
        sent_forward,
        projection_backward: if pipelined && p.last && grads_prior > 0 {
            let grad_elem = if copies { e } else { m };
            p.output_unsharded * grad_elem + st.tokens * plan.model.hidden as u128 * e
        } else {
            0
        },
        // The first block a stage walks in backward gets its output's gradient in the
        // pipeline's receive buffer (counted with the inputs), not in a tensor of its own,
        // unless its stage (chunk) is the last, where the final norm's backward makes it. The
        // accumulating working set already leaves it out.
        walk_on_last,
        recv_incoming: if pipelined && !walk_on_last && (grads_prior == 0 || upcast_accumulation) {
            stage_act
        } else {
            0
        },
        // A pipeline's representative backward accumulates into existing gradients.
        working: if pipelined && grads_prior > 0 && !upcast_accumulation {
            working_acc
        } else {
            working
        },
        at_end: if pipelined && grads_prior > 0 && !upcast_accumulation {
            at_end_acc
        } else {
            at_end
        },
        block_u,
        root_u: match (split && reshard, units) {
            (true, FsdpUnits::SplitAlways) => 0,
            (true, _) => tail_u,
            (false, _) if root_resharded => 0,
            (false, _) => root_u,
        },
        root_u_blocks: match (split, reshard) {
            (true, true) => peft_norm,
            (true, false) => emb_u * e + peft_norm,
            (false, _) => root_u,
        },
        head_u: if split && reshard { tail_u } else { root_u },
        root_regather: if root_resharded { root_u } else { 0 },
        sp_norm_shard: if par.sp && par.tp > 1 && p.last {
            stage_act
        } else {
            0
        },
        // Blocks whose gathered parameters are alive between forward and backward:
        // torchtitan of 2024 does not reshard the last block after forward; with
        // reshard_after_forward off, none is resharded.
        held: if !plan.reshard_after_forward {
            layers
        } else if own_units
            && !matches!(
                units,
                FsdpUnits::RootKeepLast | FsdpUnits::RootReshardedKeepLast
            )
        {
            0
        } else {
            1
        },
        retained_u: if split { tail_u - peft_norm } else { block_u },
        prefetch_first: if split && reshard && !solo_fsdp {
            emb_u * e
        } else {
            0
        },
        prefetches: !solo_fsdp,
        // At one shard rank FSDP2's prefetch (`unshard`, l.324-335) allocates nothing: a
        // prefetched block's copy is made only when it runs.
        // (The whole block covers its experts: the larger of the two, not their sum.)
        prefetch_less: (experts_solo * e).max(if hsdp_solo && !pipelined { block_u } else { 0 }),
        // (Accumulating into earlier micro-batches' shards, they exist already: `grads_prior`.)
        tail_grads: if split && !lora && on_gpu_params && grads_prior == 0 {
            (p.root_shard - emb_shard) * m
        } else {
            0
        },
        tail_rs: match (split && !lora, chunked) {
            (true, false) => div(tail_u, e) * r,
            (true, true) => tail_norm * r,
            (false, _) => 0,
        },
        embedding_grad,
        // Under CPU offload each block's fp32 shard is copied to the device for its
        // all-gather and freed at the copy-in, before the block computes: never alive at
        // these peaks.
        // The loss input a pipeline caches is held only while its micro-batch's backward on
        // the last stage (chunk) is the one walked.
        logits: logits::LogitsBytes {
            held_in_backward: if walk_on_last {
                st.logits.held_in_backward
            } else {
                0
            },
            ..st.logits
        },
        // The output weight's unsharded gradient is produced first in backward and, on the
        // root FSDP unit, reduce-scattered only at the root's post-backward after every
        // block.
        out_grad: if split || lora {
            0
        } else if copies && !(fsdp_pp && grads_prior > 0) {
            p.output_unsharded * e
        } else {
            plain_root_grads
        },
        // FSDP2 copies a unit's unsharded gradients into a reduce-dtype reduce-scatter input
        // and keeps it until the next unit's reduce-scatter: one unit's worth beyond the
        // block's own.
        // Experts on a one-rank mesh reduce nothing: their gradient is kept as it is
        // (torch 2.11 `foreach_reduce`, world size 1), with no reduce-scatter input beside it.
        rs: if lora_fsdp {
            lora_block * r
        } else if copies && !fsdp_pp {
            (big.unsharded - experts_solo) * r
        } else {
            0
        },
        cast_in: if gathers && pr.param != pr.master {
            (big.shard + u128::from(lora) * lora_shard) * e
        } else {
            0
        },
        root_grads: if lora_fsdp {
            0
        } else if split {
            emb_u * e
        } else if copies && !(fsdp_pp && grads_prior > 0) {
            p.root_unsharded * e
        } else {
            plain_root_grads
        },
        root_rs: if lora_fsdp {
            0
        } else if split {
            emb_u * r
        } else if copies && !fsdp_pp {
            p.root_unsharded * r
        } else {
            0
        },
        opt_temporaries: if states_on_gpu {
            optimizer_temporaries(plan, p)
        } else {
            0
        },
    }
}

/// Allocated bytes of every phase of a steady step for a stage, in [`PHASES`] order (the
/// first step's are the same less the optimizer states, outside its optimizer phase), or with
/// `steady` false the first step's quantities (they differ when gradients are kept between
/// steps).
#[inline]
fn steady_phases(plan: &Plan, st: &Stage, steady: bool) -> [Wide; 5] {
    if let Some(z) = &plan.parallel.zero {
        return zero::phases(plan, st, z);
    }
    let q = quantities(plan, st, steady);
    let ac = plan.activation_checkpointing;
    let mut base = Wide::default();
    base.0[9] = q.workspace;
    base.0[10] = q.inputs;
    base.0[0] = q.master;
    base.0[4] = q.states;
    let (grads_all, grads_prior, acts, others) = (q.grads_all, q.grads_prior, q.acts, q.others);
    let (working, at_end, block_u, root_u, held) =
        (q.working, q.at_end, q.block_u, q.root_u, q.held);
    let layers = q.layers;
    let lg = q.logits;
    let (out_grad, rs, cast_in, gathers) = (q.out_grad, q.rs, q.cast_in, q.gathers);
    let blocks_mb = q.per_mb - q.head;
    let mut out = [base; 5];
    for (w, &phase) in out.iter_mut().zip(PHASES.iter()) {
        match phase {
            Phase::Forward => {
                let acts = q.acts_forward;
                w.0[2] = q.grads_forward;
                // At the loss: the logits buffers at their forward peak.
                let loss = (root_u + held * block_u, acts, lg.forward_peak);
                // At the output projection: FSDP2 keeps the last block's all-gather output
                // until the root's post-forward, after the model returns its logits.
                let projection = (
                    q.head_u + held * block_u + u128::from(gathers) * q.retained_u,
                    acts + q.sp_norm_shard,
                    lg.at_projection + lg.kept_in_step,
                );
                // At the last block's all-gather: the previous block's output retained (when
                // there is a previous block: the event trace found this moment one block too
                // high on single-block pipeline stages), the cast input and the new output,
                // the earlier blocks' activations.
                let outputs = 1 + u128::from(layers >= 2);
                // Blocks gathered before the last and not resharded (reshard_after_forward
                // off) are still unsharded then: found by the CLI fuzz target on an MoE plan.
                let before = if held > 1 {
                    layers.saturating_sub(1)
                } else {
                    0
                };
                let unsharded = if gathers {
                    (outputs + before) * block_u + cast_in
                } else {
                    (before + 1) * block_u
                };
                let last_gather = (
                    q.root_u_blocks + unsharded,
                    div(blocks_mb * q.walk.saturating_sub(1), q.walk.max(1)) + q.others_forward,
                    lg.kept_in_step,
                );
                // At the last block's end, before its post-forward: its gathered parameters
                // and, under FSDP, its all-gather output (retained until the next unit's
                // all-gather), beside every block's saved activations. The forward's peak
                // where blocks outweigh the head: measured with peft LoRA on all linears
                // under accelerate's FSDP2 (docs/research/lora-fsdp2-measured.md, L3: the
                // estimate was -13% on the forward).
                let block_end = (
                    q.root_u_blocks + (u128::from(gathers) + before + 1) * block_u,
                    blocks_mb + q.others_forward,
                    lg.kept_in_step,
                );
                // torchtitan 0.3's block: inside the last block's forward, at its rotation
                // (the earlier blocks' saved tensors beside it), and at its last residual add
                // (measured on CPU; a checkpointed block's forward peaks at the first).
                let (rope, add) = if q.rope_moment > 0 {
                    let earlier = div(blocks_mb * q.walk.saturating_sub(1), q.walk.max(1));
                    (
                        (
                            block_end.0,
                            earlier + q.others_forward + q.rope_moment,
                            block_end.2,
                        ),
                        if q.add_moment > 0 {
                            (
                                block_end.0,
                                earlier + q.others_forward + q.add_moment,
                                block_end.2,
                            )
                        } else {
                            (0, 0, 0)
                        },
                    )
                } else {
                    ((0, 0, 0), (0, 0, 0))
                };
                // The chunked loss's [norm, output] all-gather, before the norm: every block's
                // saved tensors and the last block's output (the norm's input), the last
                // block's all-gather output still retained (resharded or, without resharding,
                // every block still gathered). Measured on CPU: the forward's peak where the
                // output weight outweighs a block.
                let tail_gather = if q.tail_gather > 0 {
                    let held_blocks = if plan.reshard_after_forward {
                        0
                    } else {
                        layers
                    };
                    let sp = if plan.parallel.sp {
                        plan.parallel.tp as u128
                    } else {
                        1
                    };
                    (
                        q.root_u_blocks
                            + (held_blocks + u128::from(gathers)) * block_u
                            + q.tail_gather,
                        blocks_mb
                            + q.others_forward
                            + div(
                                st.tokens
                                    * plan.model.hidden as u128
                                    * plan.precision.param.bytes() as u128,
                                sp,
                            ),
                        lg.kept_in_step,
                    )
                } else {
                    (0, 0, 0)
                };
                let (u, a_, l) = [
                    loss,
                    projection,
                    last_gather,
                    block_end,
                    rope,
                    add,
                    tail_gather,
                ]
                .into_iter()
                .max_by_key(|(u, a_, l)| u + a_ + l)
                .unwrap_or(loss);
                (w.0[1], w.0[6], w.0[8]) = (u, a_, l);
            }
            Phase::LossBackward if q.chunked.buffers > 0 => {
                // torchtitan 0.3's chunk loop at its highest moment ([`logits::chunked`]):
                // [norm, output] gathered for it (under the split units, beside what forward
                // left gathered), every activation and the head, the loop's buffers, the
                // chunk's logits and the output weight's unsharded gradients.
                let ch = q.chunked;
                w.0[1] = root_u.max(q.loop_u) + held * block_u;
                w.0[2] = grads_prior;
                w.0[3] = ch.peak_grads;
                w.0[6] = acts;
                w.0[8] = ch.buffers + ch.peak_logits;
            }
            Phase::LossBackward => {
                w.0[1] = root_u + held * block_u;
                w.0[2] = grads_prior;
                w.0[6] = acts;
                w.0[8] = lg.backward_peak;
                // Or the output projection's backward just after, when its new weight
                // gradient is a temporary (measured: the last stage's peak of a 4-stage
                // FSDP plan, 1F1B).
                // (log-softmax's backward has run: its incoming gradient and its saved output,
                // of the same size, are freed.)
                let logits = lg.backward_peak - 2 * lg.loss_grad - lg.parallel_loss;
                if q.projection_backward > 0 && logits + q.projection_backward > lg.backward_peak {
                    (w.0[7], w.0[8]) = (q.projection_backward, logits);
                }
                // Or, with the root resharded after forward, the output's pre-backward hook
                // gathering it again beside the logits' gradient.
                if q.root_regather > 0 && logits + q.root_regather > lg.backward_peak {
                    (w.0[1], w.0[8]) = (q.root_regather + held * block_u, logits);
                }
            }
            Phase::Backward => {
                // Blocks finish backward from the last to the first. With j blocks done: the
                // block in use is gathered and the next one prefetched (the first block has none
                // to prefetch; without resharding every block not yet done stays gathered); the
                // previous block's reduce-scatter input is held until this one's post-backward;
                // j blocks' sharded gradients exist; the blocks not yet done keep their saved
                // activations (the head's were freed by the output layer's backward). The sum is
                // linear in j between its ends, so the peak is at j = 0, 1, L - 2 or L - 1.
                // An interleaved rank's backward walks one chunk's blocks ([`Quantities::walk`]).
                let shard_bytes = q.block_grad;
                let (all, l) = (layers.max(1), q.walk.max(1));
                let mut best = (0u128, [0u128; 5]);
                if q.loop_u > 0 {
                    // torchtitan 0.3's chunked loss under the split units: the final norm's
                    // backward, before any block's. Its unit [norm, output] is gathered again,
                    // the last block prefetched (every block still gathered without
                    // resharding), the output weight's reduce-scatter input still kept from
                    // the loop; the norm's incoming gradient (the loss's accumulated one), its
                    // input gradient and weight gradient beside every activation and the
                    // norm's own saved tensors (its output was freed by `del pred`). Measured
                    // on CPU (docs/research/torchtitan-0.3.0-measured.md): as a GPU's fused
                    // norm allocates only its outputs, this moment outweighs the last block's
                    // backward when [norm, output] does (large vocabularies).
                    // Three moments, in order: [norm, output]'s own unshard (its all-gather
                    // output beside the copied-out parameters; on one GPU the output weight's
                    // cast beside its copy), the last block's prefetch (its cast all-gather
                    // input beside its output), and the norm's backward: the highest.
                    let ch = q.chunked;
                    let prefetch = plan.reshard_after_forward && q.prefetches;
                    let held_blocks = if !plan.reshard_after_forward { all } else { 0 };
                    let block = u128::from(prefetch) * block_u;
                    let cast = if prefetch && q.gathers { q.cast_in } else { 0 };
                    let norm = ch.incoming
                        + plan.model.hidden as u128 * plan.precision.param.bytes() as u128;
                    let moments = [(q.tail_unshard, 0), (block + cast, 0), (block, norm)];
                    let (u, w_) =
                        moments
                            .into_iter()
                            .fold((0, 0), |b, m| if m.0 + m.1 > b.0 + b.1 { m } else { b });
                    let c = [
                        q.root_u_blocks + q.loop_u + held_blocks * block_u + u,
                        grads_prior + q.tail_grads,
                        out_grad + ch.rs_kept,
                        others + blocks_mb + q.head.saturating_sub(ch.incoming),
                        ch.incoming + w_,
                    ];
                    best = (c.iter().sum(), c);
                }
                for j in [0, 1, l.saturating_sub(2), l - 1] {
                    if j >= l {
                        continue;
                    }
                    // Under pipelining nothing is resharded after backward either.
                    let gathered = if q.fsdp_pp && !plan.reshard_after_forward {
                        all
                    } else if plan.reshard_after_forward {
                        (1 + u128::from(q.prefetches)).min(l - j)
                    } else {
                        l - j
                    };
                    let prefetched = if plan.reshard_after_forward && gathered == 2 {
                        q.prefetch_less
                    } else {
                        0
                    };
                    let fixed = [
                        q.root_u_blocks + gathered * block_u - prefetched
                            + if j + 1 == l { q.prefetch_first } else { 0 },
                        grads_prior.max(j * shard_bytes) + q.tail_grads,
                        out_grad + if j >= 1 { rs } else { q.tail_rs },
                    ];
                    // Measured on the CPU (tiny and small at 64 tokens): at the block's end its
                    // own saved tensors are already freed; counting them there put the
                    // backward peak one block's activations too high (+3.7% on tiny).
                    let first = if j == 0 { q.recv_incoming } else { 0 };
                    for (acts_blocks, w_) in [
                        (l - j, working.saturating_sub(first)),
                        (l - j - 1, at_end.saturating_sub(first)),
                    ] {
                        let c = [
                            fixed[0],
                            fixed[1],
                            fixed[2],
                            others + div(blocks_mb * acts_blocks, l),
                            w_,
                        ];
                        let t = c.iter().sum();
                        if t > best.0 {
                            best = (t, c);
                        }
                    }
                    // torchtitan 0.3 (FSDP everywhere): the block's post-backward, its
                    // reduce-scatter output made beside the input (the previous block's input
                    // freed first, the block resharded, its unsharded gradients copied into the
                    // input and freed): torch 2.15 `_fsdp_collectives.py`, `foreach_reduce`.
                    // On one GPU the output is as large as the input (measured: the backward's
                    // peak at batch 1).
                    if q.post_reduce > 0 {
                        let next = if plan.reshard_after_forward && q.prefetches && j + 1 < l {
                            block_u
                        } else if !plan.reshard_after_forward {
                            (l - j - 1) * block_u
                        } else {
                            0
                        };
                        let c = [
                            q.root_u_blocks + next + if j + 1 == l { q.prefetch_first } else { 0 },
                            fixed[1],
                            out_grad + rs + q.post_reduce,
                            others + div(blocks_mb * (l - j - 1), l),
                            q.block_grad_out,
                        ];
                        let t = c.iter().sum();
                        if t > best.0 {
                            best = (t, c);
                        }
                    }
                }
                let c = best.1;
                (w.0[1], w.0[2], w.0[3], w.0[6], w.0[7]) = (c[0], c[1], c[2], c[3], c[4]);
                w.0[8] = lg.held_in_backward;
            }
            Phase::BackwardEnd => {
                // The root's post-backward, after every block: FSDP2 reshards the root's
                // parameters, then copies its unsharded gradients (output weight, embedding)
                // into the reduce-scatter input while they are still alive, beside every
                // block's sharded gradients; large for large vocabularies.
                w.0[2] = grads_prior.max(q.blocks_grads) + q.tail_grads;
                w.0[3] = q.root_grads + q.root_rs + q.embedding_grad;
                w.0[6] = others;
                w.0[8] = lg.held_in_backward;
                if q.fsdp_pp && !plan.reshard_after_forward {
                    // Still unsharded: under pipelining the root's post-backward neither
                    // reshards nor reduces. (The schedule's end, REDUCE_GRAD, reshards each
                    // unit before copying its gradients into the reduce-scatter input, and
                    // measured never above the backward.)
                    w.0[1] = root_u + layers * block_u;
                }
            }
            Phase::Optimizer => {
                w.0[10] -= q.mask;
                w.0[2] = grads_all;
                w.0[4] = q.states;
                w.0[5] = q.opt_temporaries;
                w.0[8] = lg.kept_in_step;
            }
        }
        if plan.gpu.caching_allocator {
            // Kept activations interleaved with freed temporaries of other sizes fragment the
            // cache; block inputs kept by full checkpointing are allocated between a block's
            // temporaries that are all freed, and do not.
            let full_ac_inputs = match ac {
                Checkpointing::Full => w.0[6],
                _ => 0,
            };
            let churn = w.0[1] + w.0[3] + w.0[5] + (w.0[6] - full_ac_inputs) + w.0[7];
            w.1 = overhead::fragmentation(churn);
            if phase == Phase::LossBackward {
                w.1 += lg.freed_segment;
            }
        }
    }
    out
}

/// Temporaries of one optimizer step over this rank's shards, in bytes.
///
/// torch.optim AdamW foreach (`_multi_tensor_adam`): weight decay, `lerp_` and `addcmul_` are
/// in place; `exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs)` is one temporary as large as all
/// the parameters of the group. Fused: none. Per-parameter (single-tensor path, libtorch C++
/// optimizers): `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)` holds two
/// tensors of the largest parameter for a moment. SGD momentum: in-place, none.
pub fn optimizer_temporaries(plan: &Plan, p: &StageParams) -> u128 {
    if let Some(t) = optimizer::temporaries(plan, p) {
        return t;
    }
    let m = plan.precision.master.bytes() as u128;
    if plan.optimizer.states_per_param() < 2 {
        return 0;
    }
    let (all, largest) = match params::lora_block_params(plan) {
        (0, _) => (p.shard_total(), p.largest_shard()),
        (block, big) => (
            p.layers() as u128 * params::lora_shard(plan, block),
            params::lora_shard(plan, big),
        ),
    };
    match plan.implementation.optimizer {
        OptimizerImpl::Foreach => all * m,
        OptimizerImpl::Fused | OptimizerImpl::FusedBf16States => 0,
        OptimizerImpl::PerParam => 2 * largest * m,
    }
}

const PHASES: [Phase; 5] = [
    Phase::Forward,
    Phase::LossBackward,
    Phase::Backward,
    Phase::BackwardEnd,
    Phase::Optimizer,
];

/// [`estimate`], with the step's event trace of the most loaded rank (at
/// [`trace::Detail::Groups`]) replayed through the caching-allocator simulation under `conf`
/// (`PYTORCH_CUDA_ALLOC_CONF`, spelled `conf_text`). No simulation for a GPU profile
/// without a caching allocator, or a stage of more than [`trace::MAX_TRACED_LAYERS`] blocks.
pub fn estimate_simulated(
    plan: &Plan,
    conf: &crate::allocator::AllocConf,
    conf_text: &str,
) -> Result<Estimate> {
    simulated(estimate(plan)?, plan, conf, conf_text)
}

/// `est` (of `plan`) with the allocator simulation of its stage's step.
fn simulated(
    mut est: Estimate,
    plan: &Plan,
    conf: &crate::allocator::AllocConf,
    conf_text: &str,
) -> Result<Estimate> {
    let layers = params::stage_layers(plan.model.layers, plan.parallel.pp, est.per_gpu.stage);
    // (ZeRO's phases are not mirrored in the event trace: no simulation.)
    if !plan.gpu.caching_allocator
        || layers > trace::MAX_TRACED_LAYERS
        || plan.parallel.zero.is_some()
    {
        return Ok(est);
    }
    let t = trace::trace_with(plan, est.per_gpu.stage, trace::Detail::Groups)?;
    est.per_gpu.simulation = Some(Box::new(simulate::simulate(&t, conf, conf_text)?));
    Ok(est)
}

/// Estimates the plan.
///
/// ```
/// use memplan::plan::PlanFile;
/// let plan: PlanFile = serde_json::from_str(
///     r#"{"model":"llama3-8b","gpu":"rtx-a6000-48g","num_gpus":2,
///         "batch":{"micro_batch_size":1,"seq_len":8192},"activation_checkpointing":"full"}"#,
/// ).unwrap();
/// let est = memplan::estimate::estimate(&plan.resolve().unwrap()).unwrap();
/// assert!(!est.fits); // 16 bytes per parameter over 2 GPUs is 64 GB before activations
/// ```
pub fn estimate(plan: &Plan) -> Result<Estimate> {
    estimate_for(plan, None)
}

/// The estimate for the ranks of pipeline stage `stage` (0 to pp - 1), rather than for the
/// most loaded rank that [`estimate`] picks (`memplan estimate --all-stages`).
pub fn estimate_stage(plan: &Plan, stage: u64) -> Result<Estimate> {
    if stage >= plan.parallel.pp {
        return Err(Error::invalid(
            "stage",
            stage,
            format!("a pipeline stage from 0 to {}", plan.parallel.pp - 1),
        ));
    }
    estimate_for(plan, Some(stage))
}

/// Every pipeline stage's estimate, in stage order, each simulated as [`estimate_simulated`]
/// does.
pub fn estimate_stages(
    plan: &Plan,
    conf: &crate::allocator::AllocConf,
    conf_text: &str,
) -> Result<Vec<Estimate>> {
    (0..plan.parallel.pp)
        .map(|s| simulated(estimate_stage(plan, s)?, plan, conf, conf_text))
        .collect()
}

fn estimate_for(plan: &Plan, only: Option<u64>) -> Result<Estimate> {
    let last = plan.parallel.pp - 1;
    let runtime = overhead::runtime_overhead(plan)?;
    let capacity = plan.gpu.memory_bytes;

    // Three pipeline stages bound every stage: the first keeps the most micro-batches in
    // flight and the embedding, the last computes the logits, and the second bounds the
    // middle ones (layers and micro-batches in flight never grow with the stage index, and
    // every middle stage keeps both receive buffers, which the first lacks one of: with
    // small activations and many micro-batches it is the highest; found by the property test
    // `the_most_loaded_stage_is_the_highest_of_every_stage`, which checks all stages).
    // A steady step's phases; the first step's are the same less the optimizer states,
    // which the first optimizer step creates.
    // Its forward may hold only the main thread's cuBLAS workspace (`Quantities::workspace`).
    let backward_workspace = first_forward_lacks_workspace(plan);
    let first_of = |w: &Wide, phase: Phase| {
        let mut f = *w;
        if phase != Phase::Optimizer {
            f.0[4] = 0;
        }
        if phase == Phase::Forward {
            f.0[9] -= backward_workspace;
        }
        f
    };
    // Gradients kept between steps: the first step's own phases (steady otherwise).
    let zeroed = plan.implementation.zero_grad == crate::plan::ZeroGrad::Zeros;
    // (The first step's walls only where they differ: copying them costs the fast path.)
    let build = |s: u64| {
        let st = stage(plan, s);
        let walls = steady_phases(plan, &st, true);
        let first = zeroed.then(|| steady_phases(plan, &st, false));
        let top = walls
            .iter()
            .chain(first.iter().flatten())
            .map(Wide::total)
            .max()
            .unwrap_or(0);
        (top, st, (walls, first))
    };
    let mut stage_index = only.unwrap_or(0);
    let (top, mut st, mut walls) = build(stage_index);
    if only.is_none() {
        let mut top = top;
        let others = match last {
            0 => &[][..],
            1 => &[1][..],
            _ => &[1, last][..],
        };
        for &other in others {
            let (t, s, w) = build(other);
            if t > top {
                (top, st, walls, stage_index) = (t, s, w, other);
            }
        }
    }
    let mut timeline = [PhasePoint {
        first_step: true,
        phase: Phase::Forward,
        allocated_bytes: Bytes::ZERO,
    }; 10];
    let mut first_oom = None;
    let mut peak = (0, 0usize);
    // The caching allocator never returns segments mid-run: reserved peaks at the largest
    // allocated-plus-cached moment, which need not be the allocated peak.
    let mut reserved_peak = 0u128;
    let (runtime_w, capacity_w) = (runtime.get() as u128, capacity.get() as u128);
    for i in 0..10 {
        let w = if i < 5 {
            first_of(&walls.1.as_ref().unwrap_or(&walls.0)[i], PHASES[i])
        } else {
            walls.0[i - 5]
        };
        let allocated = w.total();
        // Every component is at most the total, so a total that fits 64 bits is checked once.
        let point = PhasePoint {
            first_step: i < 5,
            phase: PHASES[i % 5],
            allocated_bytes: to_bytes(allocated, "peak allocated")?,
        };
        if first_oom.is_none() && allocated + w.1 + runtime_w > capacity_w {
            first_oom = Some(point);
        }
        if allocated > peak.0 {
            peak = (allocated, i);
        }
        reserved_peak = reserved_peak.max(allocated + w.1);
        timeline[i] = point;
    }
    let (phase, first) = (PHASES[peak.1 % 5], peak.1 < 5);
    let wide = if first {
        first_of(&walls.1.as_ref().unwrap_or(&walls.0)[peak.1], phase)
    } else {
        walls.0[peak.1 - 5]
    };
    let breakdown = wide.into_breakdown()?;
    let peak_allocated = breakdown.total();
    let peak_reserved = to_bytes(reserved_peak, "peak reserved")?;
    let device_total = peak_reserved.add(runtime, "device total")?;
    let host = host::host_estimate(plan, &st.p)?;
    let fits_gpu = device_total <= capacity;
    let fits_host = host.per_node_bytes <= plan.host_ram;
    let peak_phase = match (phase, first) {
        (Phase::Optimizer, true) => "optimizer (first step)",
        (Phase::Optimizer, false) => "optimizer (steady step)",
        (p, _) => p.name(),
    };
    Ok(Estimate {
        per_gpu: GpuEstimate {
            stage: stage_index,
            peak_allocated_bytes: peak_allocated,
            peak_reserved_bytes: peak_reserved,
            runtime_overhead_bytes: runtime,
            device_total_bytes: device_total,
            capacity_bytes: capacity,
            headroom_bytes: capacity.get() as i128 - device_total.get() as i128,
            peak_phase,
            breakdown,
            first_oom,
            timeline,
            simulation: None,
        },
        host,
        fits_gpu,
        fits_host,
        fits: fits_gpu && fits_host,
    })
}
