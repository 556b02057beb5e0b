//! The estimator's training step as ordered allocation events ([`crate::trace::Trace`]).
//!
//! [`super::estimate`] evaluates a few moments of the step in closed form. This module walks
//! the whole step of one pipeline stage's rank, tensor by tensor, in the order FSDP2 and
//! autograd allocate and free them, from the estimator's own quantities: setup (master
//! shards, inputs, workspace), then for the first and a steady step every micro-batch's
//! forward (root and block all-gathers with their cast inputs and retained outputs, each
//! block's saved activations, the head, the logits and the loss), its backward (the loss
//! backward, per block from the last: the prefetch, the recompute and gradient working set,
//! the block's activations freed, its reduce-scatter input and sharded gradient; the root's
//! post-backward) and the optimizer step (states created in the first step, temporaries).
//!
//! The walk puts a [`MarkKind::Point`] where each of the estimator's phases is evaluated (at
//! the largest of the candidate moments the estimator compares: the forward's three, every
//! block position of the backward), and the running sum there equals the estimator's
//! figure, category by category (the unit tests and `tests/properties.rs` check it over many
//! plans). Between those moments, frees are placed before allocations, so the trace never
//! rises above what the estimator evaluates: it is the estimator's story of the step, not a
//! new model. The measured trace of the trainer shows the real order of every tensor.
//!
//! Simplifications shared with the estimator: every block is the stage's larger kind
//! (dense or MoE); a pipeline stage is walked for one micro-batch, the one at its peak, with
//! the activations of the other micro-batches in flight and the gradients of earlier ones
//! as single allocations (the schedule's order of forwards and backwards is not walked);
//! the backward's gradient temporaries are one tensor. At [`Detail::Tensors`], torchtitan's
//! Llama block allocates one tensor per parameter, per saved activation (the terms of
//! [`super::activations::block_activations`]) and per recomputed activation; other blocks,
//! and [`Detail::Groups`], keep one tensor per group (a block's gathered parameters, its
//! saved activations per half, its working set). More than [`MAX_WALKED_MICRO_BATCHES`]
//! micro-batches are walked as the first and the last, whose memory every middle one
//! repeats.

use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::trace::{
    Category, Event, Mark, MarkKind, Module, Op, Owner, Part, Section, Source, Trace,
};

use super::logits::{self, Moment, Slot, Step};
use super::{div, quantities, stage, PHASES};

/// Blocks a traced stage may have: far beyond any published model (Llama 3.1 405B has 126),
/// and a bound on the trace's length for any plan that validates.
pub const MAX_TRACED_LAYERS: u64 = 1024;

/// Micro-batches walked one by one; beyond, the first and the last.
pub const MAX_WALKED_MICRO_BATCHES: u64 = 32;

/// FSDP2's streams (torch 2.11 `_fsdp_collectives.py`): `foreach_all_gather` allocates the
/// cast all-gather input and the all-gather output on the all-gather copy-in stream; the
/// copy-out into the unsharded parameters runs on the default stream. `foreach_reduce`
/// allocates the reduce-scatter input on the default stream and the reduce-scatter output
/// (the new sharded gradient) on the reduce-scatter stream.
const ALL_GATHER_STREAM: u32 = 1;
const REDUCE_SCATTER_STREAM: u32 = 2;

/// A live tensor of the walk.
#[derive(Clone, Copy)]
struct T {
    id: u64,
    bytes: u64,
    category: Category,
    owner: Owner,
    stream: u32,
}

struct Walk {
    events: Vec<Event>,
    marks: Vec<Mark>,
    next_id: u64,
    total: u128,
    first: bool,
}

impl Walk {
    #[inline]
    fn alloc(
        &mut self,
        bytes: u128,
        category: Category,
        owner: Owner,
        stream: u32,
    ) -> Result<Option<T>> {
        if bytes == 0 {
            return Ok(None);
        }
        let bytes = u64::try_from(bytes).map_err(|_| Error::overflow("trace tensor bytes"))?;
        self.next_id += 1;
        let t = T {
            id: self.next_id,
            bytes,
            category,
            owner,
            stream,
        };
        self.events.push(Event {
            op: Op::Alloc,
            id: t.id,
            bytes,
            category,
            owner,
            stream,
        });
        self.total += bytes as u128;
        Ok(Some(t))
    }

    #[inline]
    fn free(&mut self, t: Option<T>) {
        if let Some(t) = t {
            self.events.push(Event {
                op: Op::Free,
                id: t.id,
                bytes: t.bytes,
                category: t.category,
                owner: t.owner,
                stream: t.stream,
            });
            self.total -= t.bytes as u128;
        }
    }

    /// Allocates `total` bytes as the tensors `sizes` (bytes each), when they add up to it,
    /// else as one tensor.
    fn alloc_split(
        &mut self,
        total: u128,
        sizes: Option<&[u128]>,
        category: Category,
        owner: Owner,
        stream: u32,
    ) -> Result<Vec<Option<T>>> {
        match sizes {
            Some(sizes) if sizes.iter().sum::<u128>() == total => sizes
                .iter()
                .map(|&b| self.alloc(b, category, owner, stream))
                .collect(),
            _ => Ok(vec![self.alloc(total, category, owner, stream)?]),
        }
    }

    /// [`Walk::alloc_split`] into `into`, whose previous tensors are dropped without events (as
    /// an assignment drops them) and whose buffer is reused: a block's gathered parameters are
    /// re-allocated every phase, and a new vector each time was most of the walk's heap traffic.
    fn alloc_split_into(
        &mut self,
        into: &mut Vec<Option<T>>,
        total: u128,
        sizes: Option<&[u128]>,
        category: Category,
        owner: Owner,
        stream: u32,
    ) -> Result<()> {
        into.clear();
        match sizes {
            Some(sizes) if sizes.iter().sum::<u128>() == total => {
                for &b in sizes {
                    into.push(self.alloc(b, category, owner, stream)?);
                }
            }
            _ => into.push(self.alloc(total, category, owner, stream)?),
        }
        Ok(())
    }

    #[inline]
    fn free_all(&mut self, ts: &mut Vec<Option<T>>) {
        for t in ts.drain(..) {
            self.free(t);
        }
    }

    fn begin(&mut self, section: Section, micro: u64) {
        self.marks.push(Mark {
            at: self.events.len(),
            first_step: self.first,
            kind: MarkKind::Begin { section, micro },
        });
    }

    fn point(&mut self, phase: &str, at: usize) {
        self.marks.push(Mark {
            at,
            first_step: self.first,
            kind: MarkKind::Point {
                phase: phase.to_string(),
            },
        });
    }

    /// The current moment: (events so far, allocated bytes).
    fn now(&self) -> (usize, u128) {
        (self.events.len(), self.total)
    }
}

/// `total` split into `n` parts whose prefix sums are `div(total * k, n)`, as the estimator
/// counts the first k blocks' share.
fn share(total: u128, n: u128, k: u128) -> u128 {
    div(total * (k + 1), n) - div(total * k, n)
}

/// Allocates `total` bytes as one tensor for the root and a share per block, the root's
/// being `root` bytes.
fn per_module(
    w: &mut Walk,
    (total, root): (u128, u128),
    (layers, first_layer): (u128, u32),
    category: Category,
    part: Part,
    block_tensors: Option<&[u128]>,
) -> Result<Vec<Option<T>>> {
    let mut out = vec![w.alloc(root, category, Owner::new(Module::Root, part), 0)?];
    let blocks = total - root;
    for i in 0..layers {
        let owner = Owner::new(Module::Layer(first_layer + i as u32), part);
        let b = share(blocks, layers, i);
        out.extend(w.alloc_split(b, block_tensors, category, owner, 0)?);
    }
    Ok(out)
}

/// Saved tensors of one block per token, in the order its forward allocates them, for the
/// plan's checkpointing, and how many of them belong to attention (the rest to the
/// feed-forward half): the terms of [`super::activations::block_activations`] for
/// torchtitan's Llama block (two RMSNorms, separate q/k/v and w1/w3, SwiGLU). None for other
/// block layouts, float8, compile and selective-layer checkpointing, whose blocks the trace
/// keeps as one tensor per half.
fn saved_tensors(plan: &Plan, ac: crate::plan::Checkpointing) -> Option<(Vec<u128>, usize)> {
    use crate::plan::{Attention, Checkpointing};
    use crate::profiles::{MlpKind, NormKind};
    let m = &plan.model;
    if m.moe.is_some()
        || plan.lora.is_some()
        || m.norms_per_block != 2
        || m.fused_qkv
        || m.fused_gate_up
        || m.qk_norm
        || m.parallel_residual
        || m.attn_softcap
        || m.mlp != MlpKind::Gated
        || plan.float8
        || plan.compile
    {
        return None;
    }
    let e = plan.precision.param.bytes() as u128;
    let (h, q, kv, f) = super::activations::block_dims(m);
    let (heads, tp) = (m.heads as u128, plan.parallel.tp as u128);
    let sp = if plan.parallel.sp { tp } else { 1 };
    let norm: Vec<u128> = match super::activations::norm_style(plan) {
        (NormKind::LayerNorm, _) => vec![e * h, 8],
        (_, true) => vec![e * h, 4],
        (NormKind::Rms, false) => vec![4 * h, 4, e * h],
        (NormKind::RmsOnePlus, false) => vec![4 * h, 4, 4 * h],
    };
    let norm: Vec<u128> = norm.into_iter().map(|b| div(b, sp)).collect();
    let kv_seen = super::activations::kv_seen(plan);
    let math = plan.implementation.attention == Attention::Math;
    let mut v = Vec::with_capacity(24);
    match ac {
        Checkpointing::Full => return Some((vec![div(e * h, sp)], 1)),
        Checkpointing::SelectiveOp => {
            // Block input, wq and wv outputs (torchtitan 0.3: the fused wqkv's), attention
            // output and log-sum-exp, w1 and w2 outputs.
            v.push(div(e * h, sp));
            if plan.implementation.qkv == crate::plan::Qkv::FusedCopies {
                v.push(div(e * (q + 2 * kv), tp));
            } else {
                v.extend([div(e * q, tp), div(e * kv, tp)]);
            }
            v.extend([div(e * q, tp), div(4 * heads, tp)]);
            let attn = v.len();
            v.extend([div(e * f, tp), e * h]);
            return Some((v, attn));
        }
        Checkpointing::None => {}
        Checkpointing::SelectiveLayer(_) => return None,
    }
    v.extend(norm.iter().copied());
    v.push(e * h);
    v.extend([
        div(e * q, tp),
        div(e * kv_seen, tp),
        div(e * kv_seen, tp),
        div(e * q, tp),
        div(4 * heads, tp),
    ]);
    // torchtitan 0.3: the RoPE cache rows the block gathers.
    let rope = super::activations::rope_rows(plan);
    if rope > 0 {
        v.push(rope);
    }
    if math {
        v.push(div(e * heads * plan.batch.seq_len as u128, tp));
    }
    // wo's saved copy of the attention output is freed by wo's backward, before attention's:
    // it goes with the feed-forward half.
    let attn = v.len();
    if super::activations::attention_output_copied(plan) {
        v.push(div(e * q, tp));
    }
    v.extend(norm.iter().copied());
    v.push(e * h);
    v.extend([div(e * f, tp); 4]);
    Some((v, attn))
}

/// The step of pipeline stage `stage`'s most loaded rank as a predicted [`Trace`].
pub fn trace(plan: &Plan, stage_index: u64) -> Result<Trace> {
    trace_with(plan, stage_index, Detail::Tensors)
}

/// How finely a trace splits what a block allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// One tensor per parameter, per saved activation and per recomputed activation, where
    /// the block is torchtitan's Llama block (else as [`Detail::Groups`]): for pictures and
    /// memory_viz snapshots.
    Tensors,
    /// One tensor per group: a block's gathered parameters, its saved activations (per
    /// half without checkpointing), its backward working set, its optimizer states. A fifth
    /// of the events, for the allocator simulation of every estimate.
    Groups,
}

/// [`trace`] at a chosen [`Detail`].
pub fn trace_with(plan: &Plan, stage_index: u64, detail: Detail) -> Result<Trace> {
    let fine = detail == Detail::Tensors;
    if stage_index >= plan.parallel.pp {
        return Err(Error::invalid(
            "stage",
            stage_index,
            format!("a pipeline stage from 0 to {}", plan.parallel.pp - 1),
        ));
    }
    if plan.parallel.zero.is_some() {
        return Err(Error::invalid(
            "parallel.zero",
            "a ZeRO plan",
            "no parallel.zero for an event trace (DeepSpeed ZeRO's phases are estimated, \
             not traced event by event)",
        ));
    }
    let st = stage(plan, stage_index);
    // Of one block's backward working set, the recomputed activations (checkpointing); of
    // its saved activations without checkpointing, the feed-forward half's.
    let big_acts = if st.p.moe_layers > 0 {
        &st.moe
    } else {
        &st.dense
    };
    let recompute = st.tokens * super::recompute_per_token(plan.activation_checkpointing, big_acts);
    let ffn_share = match plan.activation_checkpointing {
        crate::plan::Checkpointing::None if st.p.moe_layers == 0 => st.tokens * st.dense.ffn_saved,
        _ => 0,
    };
    if st.p.layers() > MAX_TRACED_LAYERS {
        return Err(Error::invalid(
            "model layers",
            st.p.layers(),
            format!("at most {MAX_TRACED_LAYERS} blocks per pipeline stage for a trace"),
        ));
    }
    // The first step's quantities and a steady step's (they differ when gradients are kept
    // between steps).
    let qs = [quantities(plan, &st, false), quantities(plan, &st, true)];
    let q = qs[0];
    let p = &st.p;
    let first_layer = (0..stage_index)
        .map(|s| super::params::stage_layers(plan.model.layers, plan.parallel.pp, s))
        .sum::<u64>() as u32;
    let l = q.layers.max(1);
    // The blocks whose activations one micro-batch's backward walks: the last `lw` of the
    // stage (all of them but on an interleaved rank, where they stand for one chunk's).
    let lw = q.walk.max(1).min(l);
    let mut w = Walk {
        // About 42 events a block at the group level (3,328 for llama3-70b's 80 blocks) and
        // 186 per tensor: reserved at once, so the walk never copies what it has written.
        events: Vec::with_capacity(
            128 + l as usize
                * match detail {
                    Detail::Groups => 48,
                    Detail::Tensors => 200,
                },
        ),
        marks: Vec::new(),
        next_id: 0,
        total: 0,
        first: true,
    };
    let layer = |i: u128, part: Part| Owner::new(Module::Layer(first_layer + i as u32), part);

    // Setup: the main thread's cuBLAS workspace (the other comes with the first backward),
    // inputs, master shards.
    w.begin(Section::Setup, 0);
    w.alloc(
        q.workspace_forward,
        Category::Workspace,
        Owner::new(Module::Workspace, Part::Whole),
        0,
    )?;
    w.alloc(
        q.rotary,
        Category::Inputs,
        Owner::new(Module::Inputs, Part::Rotary),
        0,
    )?;
    w.alloc(
        q.p2p,
        Category::Inputs,
        Owner::new(Module::Pipeline, Part::Whole),
        0,
    )?;
    w.alloc(
        q.inputs - q.rotary - q.p2p - q.mask,
        Category::Inputs,
        Owner::new(Module::Inputs, Part::Ids),
        0,
    )?;
    let root_master = q.root_master;
    // Per-parameter tensors of a dense block: the unsharded parameters after the copy-out
    // and the optimizer's states (the master shards of FSDP2 are per parameter too).
    let dense_tensors = if fine && p.moe_layers == 0 && !plan.float8 && plan.lora.is_none() {
        super::params::dense_block_tensors(plan)
    } else {
        Vec::new()
    };
    let e = plan.precision.param.bytes() as u128;
    let unsharded_sizes: Vec<u128> = dense_tensors.iter().map(|(_, u)| u * e).collect();
    let unsharded_sizes = (!unsharded_sizes.is_empty()).then_some(&unsharded_sizes[..]);
    let shard_sizes: Vec<u128> = dense_tensors.iter().map(|(s, _)| s * q.m).collect();
    let shard_sizes = (!shard_sizes.is_empty()).then_some(&shard_sizes[..]);
    let states_per_param = plan.optimizer.states_per_param() as usize;
    let state_sizes: Vec<u128> = shard_sizes
        .unwrap_or(&[])
        .iter()
        .flat_map(|&b| std::iter::repeat_n(b, states_per_param))
        .collect();
    let state_sizes = (!state_sizes.is_empty()).then_some(&state_sizes[..]);
    let saved = saved_tensors(plan, plan.activation_checkpointing).filter(|_| fine);
    // What a checkpointed block's backward recomputes, tensor by tensor: its forward's
    // tensors, up to the recomputed bytes.
    let recompute_sizes: Vec<u128> =
        match saved_tensors(plan, crate::plan::Checkpointing::None).filter(|_| fine) {
            Some((list, _)) if recompute > 0 => {
                let mut left = recompute;
                let mut out = Vec::new();
                for b in list.iter().map(|b| b * st.tokens) {
                    let take = b.min(left);
                    if take > 0 {
                        out.push(take);
                    }
                    left -= take;
                }
                if left > 0 {
                    out.push(left);
                }
                out
            }
            _ => vec![recompute],
        };
    per_module(
        &mut w,
        (q.master, root_master),
        (q.layers, first_layer),
        Category::MasterParams,
        Part::Shard,
        shard_sizes,
    )?;

    let pipelined = plan.parallel.pp > 1;
    let m = if pipelined {
        1
    } else {
        plan.batch.grad_accum_steps
    };
    let walked: Vec<u64> = if m <= MAX_WALKED_MICRO_BATCHES {
        (0..m).collect()
    } else {
        vec![0, m - 1]
    };
    let blocks_mb = q.per_mb - q.head;
    let (script, script_len) = if p.last {
        logits::script(plan)
    } else {
        let mut none = [Step::At(Moment::Projection); 12];
        (none[1], none[2]) = (Step::At(Moment::Loss), Step::At(Moment::LossBackward));
        (none, 3)
    };
    let (tokens, vocab) = (st.tokens, logits::vocab(plan));
    let root_grad_shard = q.grads_all.saturating_sub(q.blocks_grads);
    // FSDP2 under pipelining keeps every block and the root unsharded until the schedule's end.
    let keep_unsharded = q.fsdp_pp && !plan.reshard_after_forward;
    let grad_stream = if q.fsdp_pp { 0 } else { REDUCE_SCATTER_STREAM };
    let mut grads: Vec<Option<T>> = Vec::new();
    // float-in-loss-kept: the logits the loop's name holds (`LogitsBytes::kept_in_step`).
    let mut kept_logits: Option<T> = None;
    let mut backward_workspace = false;
    for first in [true, false] {
        w.first = first;
        let q = qs[usize::from(!first)];
        // torchtitan's `zero_grad()`: the gradients are set to None (kept, zeroed, under
        // [`crate::plan::ZeroGrad::Zeros`]).
        if plan.implementation.zero_grad == crate::plan::ZeroGrad::SetToNone || pipelined {
            w.free_all(&mut grads);
        }
        w.begin(Section::Forward, walked[0]);
        // FlexAttention's block mask, made before the forward, gone by the optimizer step.
        let mask = w.alloc(
            q.mask,
            Category::Inputs,
            Owner::new(Module::Inputs, Part::Ids),
            0,
        )?;
        // A pipeline stage: the other micro-batches in flight, and the gradients of earlier
        // micro-batches, as the estimator counts them.
        let mut others = w.alloc(
            q.others - q.sent,
            Category::Activations,
            Owner::new(Module::Pipeline, Part::Whole),
            0,
        )?;
        // When every forward comes first, what of them has gone by the representative
        // backward (one micro-batch, when that backward is the second, whose gradients
        // outweigh it).
        let mut dropped = w.alloc(
            (q.others_forward - q.sent_forward) - (q.others - q.sent),
            Category::Activations,
            Owner::new(Module::Pipeline, Part::Whole),
            0,
        )?;
        // The input gradient held for its send to the previous stage.
        let mut sent = w.alloc(
            q.sent_forward,
            Category::Activations,
            Owner::new(Module::Pipeline, Part::Grad),
            0,
        )?;
        if pipelined && q.grads_forward > 0 {
            grads = per_module(
                &mut w,
                (
                    q.grads_forward,
                    q.grads_forward.saturating_sub(q.blocks_grads),
                ),
                (q.layers, first_layer),
                Category::Gradients,
                Part::Grad,
                None,
            )?;
        }
        for (k, &micro) in walked.iter().enumerate() {
            let marked = k + 1 == walked.len();
            if k > 0 {
                w.begin(Section::Forward, micro);
            }
            // Forward, the previous logits still bound (the first step's counted alike).
            let mut old_logits = match kept_logits.take() {
                Some(t) => Some(t),
                None => w.alloc(
                    q.logits.kept_in_step,
                    Category::Logits,
                    Owner::new(Module::Output, Part::Logits),
                    0,
                )?,
            };
            let mut root = w.alloc(
                q.root_u_blocks,
                Category::UnshardedParams,
                Owner::new(Module::Root, Part::AllGather),
                0,
            )?;
            let mut params: Vec<Vec<Option<T>>> = vec![Vec::new(); l as usize];
            let mut acts: Vec<Vec<Option<T>>> = Vec::with_capacity(l as usize);
            let mut retained: Option<T> = None;
            let (mut last_gather, mut block_end) = ((0, 0), (0, 0));
            let (mut rope, mut add) = ((0, 0), (0, 0));
            for i in 0..l {
                if q.gathers {
                    let cast = w.alloc(
                        q.cast_in,
                        Category::UnshardedParams,
                        layer(i, Part::Shard),
                        ALL_GATHER_STREAM,
                    )?;
                    let out = w.alloc(
                        q.block_u,
                        Category::UnshardedParams,
                        layer(i, Part::AllGather),
                        ALL_GATHER_STREAM,
                    )?;
                    if i == l - 1 {
                        last_gather = w.now();
                    }
                    w.free(cast);
                    w.free(retained.take());
                    retained = out;
                    w.alloc_split_into(
                        &mut params[i as usize],
                        q.block_u,
                        unsharded_sizes,
                        Category::UnshardedParams,
                        layer(i, Part::Whole),
                        0,
                    )?;
                } else {
                    if q.held <= 1 && i > 0 {
                        w.free_all(&mut params[i as usize - 1]);
                    }
                    w.alloc_split_into(
                        &mut params[i as usize],
                        q.block_u,
                        unsharded_sizes,
                        Category::UnshardedParams,
                        layer(i, Part::Whole),
                        0,
                    )?;
                    if i == l - 1 {
                        last_gather = w.now();
                    }
                }
                let a = if i >= l - lw {
                    share(blocks_mb, lw, i - (l - lw))
                } else {
                    0
                };
                // torchtitan 0.3's block: the last block at its rotation, before it keeps
                // anything (`Quantities::rope_moment`).
                if i == l - 1 && q.rope_moment > 0 {
                    let t = w.alloc(
                        q.rope_moment,
                        Category::Activations,
                        layer(i, Part::Attention),
                        0,
                    )?;
                    rope = w.now();
                    w.free(t);
                }
                let mut mine = Vec::new();
                match &saved {
                    Some((list, attn)) if list.iter().sum::<u128>() * st.tokens == a => {
                        for (k, b) in list.iter().enumerate() {
                            let part = if k < *attn {
                                Part::Attention
                            } else {
                                Part::FeedForward
                            };
                            mine.push(w.alloc(
                                b * st.tokens,
                                Category::Activations,
                                layer(i, part),
                                0,
                            )?);
                        }
                    }
                    _ => {
                        let ffn = ffn_share.min(a);
                        let part = if ffn > 0 {
                            Part::Attention
                        } else {
                            Part::Whole
                        };
                        mine.push(w.alloc(a - ffn, Category::Activations, layer(i, part), 0)?);
                        mine.push(w.alloc(
                            ffn,
                            Category::Activations,
                            layer(i, Part::FeedForward),
                            0,
                        )?);
                    }
                }
                acts.push(mine);
                if i == l - 1 {
                    block_end = w.now();
                    // And at its last residual add: w2's output and the block's beside its
                    // saved tensors.
                    if q.add_moment > 0 {
                        let t = w.alloc(
                            q.add_moment.saturating_sub(a),
                            Category::Activations,
                            layer(i, Part::FeedForward),
                            0,
                        )?;
                        add = w.now();
                        w.free(t);
                    }
                }
                // Post-forward: reshard, but for the last block (torchtitan of 2024), or every
                // block ([`crate::plan::FsdpUnits`]).
                if q.gathers && (q.held == 0 || (q.held == 1 && i + 1 < l)) {
                    w.free_all(&mut params[i as usize]);
                }
            }
            if !q.gathers && q.held == 0 {
                w.free_all(&mut params[l as usize - 1]);
            }
            // The chunked loss: [norm, output]'s all-gather before the norm, beside the last
            // block's output and retained all-gather output (`Quantities::tail_gather`).
            let mut tail_gather = (0, 0);
            if q.tail_gather > 0 {
                let out = w.alloc(
                    st.tokens * plan.model.hidden as u128 * e
                        / if plan.parallel.sp {
                            plan.parallel.tp as u128
                        } else {
                            1
                        },
                    Category::Activations,
                    layer(l - 1, Part::FeedForward),
                    0,
                )?;
                let gather = w.alloc(
                    q.tail_gather,
                    Category::UnshardedParams,
                    Owner::new(Module::Output, Part::AllGather),
                    ALL_GATHER_STREAM,
                )?;
                tail_gather = w.now();
                w.free(gather);
                w.free(out);
            }
            // The split units' [norm, output] all-gather: its output is the one retained.
            let mut tail = w.alloc(
                q.head_u - q.root_u_blocks,
                Category::UnshardedParams,
                Owner::new(Module::Output, Part::Whole),
                0,
            )?;
            // (One rank gathers nothing: no all-gather output to retain.)
            if q.gathers && q.retained_u != q.block_u {
                w.free(retained.take());
                retained = w.alloc(
                    q.retained_u,
                    Category::UnshardedParams,
                    Owner::new(Module::Output, Part::AllGather),
                    ALL_GATHER_STREAM,
                )?;
            }
            // The chunked loss: the norm's output (the model's, `pred`) is freed by `del pred`
            // after the loss, the norm's own saved tensors by its backward.
            let chunk = q.chunked;
            let head = w.alloc(
                q.head - chunk.incoming,
                Category::Activations,
                Owner::new(Module::Norm, Part::Whole),
                0,
            )?;
            let mut pred = w.alloc(
                chunk.incoming,
                Category::Activations,
                Owner::new(Module::Norm, Part::Whole),
                0,
            )?;
            // Under SP the norm's sequence shard, bound until the model returns.
            let mut norm_shard = w.alloc(
                q.sp_norm_shard,
                Category::Activations,
                Owner::new(Module::Norm, Part::Whole),
                0,
            )?;
            // The logits and the loss, tensor by tensor ([`logits::script`]); the root's
            // post-forward frees the last block's retained all-gather output as the model
            // returns.
            let tv = tokens * vocab;
            let mut slots: [Option<T>; 7] = [None; 7];
            let (mut rs_kept, mut incoming) = (None, None);
            let (mut projection, mut loss, mut loss_backward) = ((0, 0), (0, 0), (0, 0));
            for step in &script[..script_len] {
                match *step {
                    Step::Alloc(slot, b) => {
                        let owner = match slot {
                            Slot::Pred | Slot::Tanh => Owner::new(Module::Output, Part::Logits),
                            Slot::Upcast | Slot::LogSoftmax => {
                                Owner::new(Module::Loss, Part::Logits)
                            }
                            Slot::NllGrad | Slot::Result | Slot::ParallelLoss => {
                                Owner::new(Module::Loss, Part::Grad)
                            }
                        };
                        // (Loss parallelism's buffer also holds its per-token tensors.)
                        let bytes = match slot {
                            Slot::ParallelLoss => q.logits.parallel_loss,
                            _ => b * tv,
                        };
                        slots[slot as usize] = w.alloc(bytes, Category::Logits, owner, 0)?;
                    }
                    Step::Free(slot, _) => {
                        let t = slots[slot as usize].take();
                        w.free(t);
                    }
                    Step::At(Moment::Projection) => {
                        projection = w.now();
                        w.free(norm_shard.take());
                        w.free(retained.take());
                        w.free(old_logits.take());
                        // "always": [norm, output] reshards after forward; so does a root
                        // resharded explicitly.
                        if q.root_u < q.head_u {
                            w.free(tail.take());
                        }
                        if q.root_regather > 0 {
                            w.free(root.take());
                        }
                    }
                    Step::At(Moment::Loss) => {
                        loss = w.now();
                        if marked {
                            // The estimator's choice among equal candidates: the last of
                            // (loss, projection, last gather, last block's end).
                            let best = [
                                loss,
                                projection,
                                last_gather,
                                block_end,
                                rope,
                                add,
                                tail_gather,
                            ]
                            .into_iter()
                            .max_by_key(|c| c.1)
                            .unwrap_or(loss);
                            w.point(PHASES[0].name(), best.0);
                        }
                        w.begin(Section::Backward, micro);
                        w.free(dropped.take());
                        if sent.is_none() {
                            sent = w.alloc(
                                q.sent,
                                Category::Activations,
                                Owner::new(Module::Pipeline, Part::Grad),
                                0,
                            )?;
                        }
                        if pipelined && q.grads_prior > q.grads_forward {
                            grads = per_module(
                                &mut w,
                                (q.grads_prior, q.grads_prior.saturating_sub(q.blocks_grads)),
                                (q.layers, first_layer),
                                Category::Gradients,
                                Part::Grad,
                                None,
                            )?;
                        }
                        if !backward_workspace && q.workspace > q.workspace_forward {
                            // The autograd engine's thread makes its own cuBLAS workspace.
                            backward_workspace = true;
                            w.alloc(
                                q.workspace - q.workspace_forward,
                                Category::Workspace,
                                Owner::new(Module::Workspace, Part::Whole),
                                0,
                            )?;
                        }
                    }
                    Step::At(Moment::LossBackward) if chunk.buffers > 0 => {
                        // The chunk loop at its highest moment ([`logits::chunked`]), with
                        // [norm, output] gathered again when forward resharded it.
                        if tail.is_none() {
                            tail = w.alloc(
                                q.loop_u,
                                Category::UnshardedParams,
                                Owner::new(Module::Output, Part::Whole),
                                0,
                            )?;
                        }
                        let buffers = w.alloc(
                            chunk.buffers,
                            Category::Logits,
                            Owner::new(Module::Loss, Part::Whole),
                            0,
                        )?;
                        let logits = w.alloc(
                            chunk.peak_logits,
                            Category::Logits,
                            Owner::new(Module::Output, Part::Logits),
                            0,
                        )?;
                        let grad = w.alloc(
                            chunk.peak_grads,
                            Category::GradientBuffers,
                            Owner::new(Module::Output, Part::Grad),
                            0,
                        )?;
                        loss_backward = w.now();
                        w.free(grad);
                        w.free(logits);
                        // The last chunk's reduce-scatter input stays; the loop reshards
                        // [norm, output] (the norm's output and the accumulated gradient, in
                        // the compute dtype, outlive it).
                        rs_kept = w.alloc(
                            chunk.rs_kept,
                            Category::GradientBuffers,
                            Owner::new(Module::Output, Part::ReduceScatter),
                            0,
                        )?;
                        if q.loop_u > 0 {
                            w.free(tail.take());
                        }
                        incoming = w.alloc(
                            chunk.incoming,
                            Category::BackwardWorkingSet,
                            Owner::new(Module::Loss, Part::Grad),
                            0,
                        )?;
                        w.free(buffers);
                    }
                    Step::At(Moment::LossBackward) => loss_backward = w.now(),
                }
            }
            // A pipeline's last stage accumulating into existing gradients: the output
            // projection's backward, its new weight gradient a temporary.
            // Just after the loss's backward (log-softmax's gradient and saved output freed):
            // a pipeline's last stage accumulating into existing gradients runs the output
            // projection's backward, its new weight gradient a temporary; a root resharded
            // after forward is gathered again by the output's pre-backward hook.
            if q.projection_backward > 0 || q.root_regather > 0 {
                w.free(slots[Slot::NllGrad as usize].take());
                w.free(slots[Slot::LogSoftmax as usize].take());
                w.free(slots[Slot::ParallelLoss as usize].take());
                let temp = w.alloc(
                    q.projection_backward,
                    Category::BackwardWorkingSet,
                    Owner::new(Module::Output, Part::Grad),
                    0,
                )?;
                if q.root_regather > 0 {
                    root = w.alloc(
                        q.root_regather,
                        Category::UnshardedParams,
                        Owner::new(Module::Root, Part::AllGather),
                        0,
                    )?;
                }
                let after = w.now();
                if after.1 > loss_backward.1 {
                    loss_backward = after;
                }
                w.free(temp);
            }
            if marked {
                w.point(PHASES[1].name(), loss_backward.0);
            }
            // A pipeline schedule caches the last stage's output (the loss input) until the
            // micro-batch's backward is done.
            let held_output = if pipelined && p.last && q.walk_on_last {
                slots[logits::loss_input_slot(plan) as usize].take()
            } else {
                None
            };
            for t in slots {
                w.free(t);
            }
            kept_logits = w.alloc(
                q.logits.kept_in_step,
                Category::Logits,
                Owner::new(Module::Output, Part::Logits),
                0,
            )?;
            let _ = loss;
            let out_grad = w.alloc(
                q.out_grad,
                Category::GradientBuffers,
                Owner::new(Module::Output, Part::Grad),
                0,
            )?;
            // `del pred` (the chunked loss's model output).
            w.free(pred.take());
            let mut head = head;
            if chunk.buffers == 0 {
                w.free(head.take());
            }
            // The split units' [norm, output] post-backward: resharded, its gradients reduced
            // into their shards, its reduce-scatter input kept until the next unit's.
            w.free(tail.take());
            let grads_exist = !grads.is_empty();
            let mut block_grads: Vec<Option<T>> = Vec::new();
            let tail_grads = w.alloc(
                q.tail_grads,
                Category::Gradients,
                Owner::new(Module::Output, Part::Grad),
                REDUCE_SCATTER_STREAM,
            )?;
            let mut best = (0usize, 0u128, false);
            if q.loop_u > 0 {
                // The chunked loss: the final norm's backward, [norm, output] gathered again
                // and the last block prefetched, beside the loss's accumulated gradient and
                // the kept reduce-scatter input.
                let transient = w.alloc(
                    q.tail_unshard,
                    Category::UnshardedParams,
                    Owner::new(Module::Output, Part::AllGather),
                    ALL_GATHER_STREAM,
                )?;
                tail = w.alloc(
                    q.loop_u,
                    Category::UnshardedParams,
                    Owner::new(Module::Output, Part::Whole),
                    0,
                )?;
                let at = w.now();
                best = (at.0, at.1, true);
                w.free(transient);
                let mut cast = None;
                if q.prefetches && params[l as usize - 1].is_empty() {
                    if q.gathers {
                        cast = w.alloc(
                            q.cast_in,
                            Category::UnshardedParams,
                            layer(l - 1, Part::Shard),
                            ALL_GATHER_STREAM,
                        )?;
                    }
                    w.alloc_split_into(
                        &mut params[l as usize - 1],
                        q.block_u,
                        unsharded_sizes,
                        Category::UnshardedParams,
                        layer(l - 1, Part::Whole),
                        0,
                    )?;
                }
                let at = w.now();
                if at.1 > best.1 {
                    best = (at.0, at.1, true);
                }
                w.free(cast);
                let grad_in = w.alloc(
                    chunk.incoming,
                    Category::BackwardWorkingSet,
                    Owner::new(Module::Norm, Part::Grad),
                    0,
                )?;
                let grad_w = w.alloc(
                    plan.model.hidden as u128 * e,
                    Category::BackwardWorkingSet,
                    Owner::new(Module::Norm, Part::Grad),
                    0,
                )?;
                let at = w.now();
                if at.1 > best.1 {
                    best = (at.0, at.1, true);
                }
                // The norm's post-backward: its gradient reduced (the reduce-scatter input
                // below), the unit resharded; its input gradient is the last block's incoming
                // one, which the block's working set counts.
                w.free(grad_w);
                w.free(grad_in);
                w.free(tail.take());
            }
            w.free(head.take());
            w.free(incoming.take());
            w.free(rs_kept.take());
            let mut rs_prev = w.alloc(
                q.tail_rs,
                Category::GradientBuffers,
                Owner::new(Module::Output, Part::ReduceScatter),
                0,
            )?;
            let mut prefetched = None;
            let mut partial = vec![false; l as usize];
            // The blocks, from the last.
            for j in 0..lw {
                let i = l - 1 - j;
                // Prefetch the next block to run (the one before); experts on a one-rank mesh
                // are copied only when their block runs (`Quantities::prefetch_less`).
                if q.prefetches && i > 0 && params[i as usize - 1].is_empty() {
                    w.alloc_split_into(
                        &mut params[i as usize - 1],
                        q.block_u - q.prefetch_less,
                        unsharded_sizes.filter(|_| q.prefetch_less == 0),
                        Category::UnshardedParams,
                        layer(i - 1, Part::Whole),
                        0,
                    )?;
                    partial[i as usize - 1] = q.prefetch_less > 0;
                }
                if std::mem::take(&mut partial[i as usize]) {
                    params[i as usize].push(w.alloc(
                        q.prefetch_less,
                        Category::UnshardedParams,
                        layer(i, Part::Whole),
                        0,
                    )?);
                }
                if params[i as usize].is_empty() {
                    w.alloc_split_into(
                        &mut params[i as usize],
                        q.block_u,
                        unsharded_sizes,
                        Category::UnshardedParams,
                        layer(i, Part::Whole),
                        0,
                    )?;
                }
                // The split units gather the embedding ahead of the first block's backward.
                if j + 1 == lw {
                    prefetched = w.alloc(
                        q.prefetch_first,
                        Category::UnshardedParams,
                        Owner::new(Module::TokEmbeddings, Part::Whole),
                        0,
                    )?;
                }
                // The recomputed forward, then the gradient temporaries and weight gradients.
                let mut working = w.alloc_split(
                    recompute,
                    Some(&recompute_sizes),
                    Category::BackwardWorkingSet,
                    layer(i, Part::Recompute),
                    0,
                )?;
                // The first block's incoming gradient is the receive buffer on a pipeline
                // stage (`Quantities::recv_incoming`).
                let first = if j == 0 { q.recv_incoming } else { 0 };
                working.push(w.alloc(
                    (q.working - recompute).saturating_sub(first),
                    Category::BackwardWorkingSet,
                    layer(i, Part::Grad),
                    0,
                )?);
                let during = w.now();
                if !best.2 || during.1 > best.1 {
                    best = (during.0, during.1, true);
                }
                let mut mine = acts.pop().unwrap_or_default();
                mine.reverse();
                w.free_all(&mut mine);
                working.reverse();
                w.free_all(&mut working);
                let end = w.alloc(
                    q.at_end.saturating_sub(first),
                    Category::BackwardWorkingSet,
                    layer(i, Part::Grad),
                    0,
                )?;
                let at_end = w.now();
                if at_end.1 > best.1 {
                    best = (at_end.0, at_end.1, true);
                }
                // Post-backward (FSDP2 `post_backward`): reshard, then the reduce-scatter.
                w.free(end);
                if !keep_unsharded {
                    w.free_all(&mut params[i as usize]);
                }
                w.free(rs_prev.take());
                rs_prev = w.alloc(
                    q.rs,
                    Category::GradientBuffers,
                    layer(i, Part::ReduceScatter),
                    0,
                )?;
                // FSDP everywhere (torchtitan 0.3): the reduce-scatter output beside its
                // input and the input gradient passed on (`Quantities::post_reduce`).
                if q.post_reduce > 0 {
                    let grad = w.alloc(
                        q.block_grad_out,
                        Category::BackwardWorkingSet,
                        layer(i, Part::Grad),
                        0,
                    )?;
                    let out = w.alloc(
                        q.post_reduce,
                        Category::GradientBuffers,
                        layer(i, Part::ReduceScatter),
                        REDUCE_SCATTER_STREAM,
                    )?;
                    let now = w.now();
                    if now.1 > best.1 {
                        best = (now.0, now.1, true);
                    }
                    w.free(out);
                    w.free(grad);
                }
                if !grads_exist {
                    block_grads.push(w.alloc(
                        share(q.blocks_grads, l, j),
                        Category::Gradients,
                        layer(i, Part::Grad),
                        grad_stream,
                    )?);
                }
            }
            if marked {
                w.point(PHASES[2].name(), best.0);
            }
            // The blocks the walk did not reach (an interleaved rank's other chunks): their
            // gradients, at the step's backward end; or, when earlier backwards had made some
            // (an interleaved rank's chunks already through one), the rest.
            if !grads_exist {
                for j in lw..l {
                    block_grads.push(w.alloc(
                        share(q.blocks_grads, l, j),
                        Category::Gradients,
                        layer(l - 1 - j, Part::Grad),
                        grad_stream,
                    )?);
                }
            } else if q.blocks_grads > q.grads_prior {
                grads.push(w.alloc(
                    q.blocks_grads - q.grads_prior,
                    Category::Gradients,
                    Owner::new(Module::Pipeline, Part::Grad),
                    grad_stream,
                )?);
            }
            // The root's post-backward.
            w.free(rs_prev.take());
            w.free(prefetched);
            if !keep_unsharded {
                w.free(root.take());
            }
            let root_grads = w.alloc(
                q.root_grads - q.out_grad,
                Category::GradientBuffers,
                Owner::new(Module::Root, Part::Grad),
                0,
            )?;
            let root_rs = w.alloc(
                q.root_rs,
                Category::GradientBuffers,
                Owner::new(Module::Root, Part::ReduceScatter),
                0,
            )?;
            // Without FSDP: the embedding's backward, its whole gradient made last.
            let embedding_grad = w.alloc(
                q.embedding_grad,
                Category::GradientBuffers,
                Owner::new(Module::TokEmbeddings, Part::Grad),
                0,
            )?;
            if marked {
                let at = w.now().0;
                w.point(PHASES[3].name(), at);
            }
            w.free(embedding_grad);
            w.free(root_rs);
            w.free(root_grads);
            w.free(out_grad);
            w.free(held_output);
            if q.fsdp_pp {
                // The schedule's end (REDUCE_GRAD): each unit's unsharded gradients are
                // reduce-scattered into its shard and freed, and the units reshard.
                w.free(root.take());
                for unit in params.iter_mut() {
                    w.free_all(unit);
                }
                w.free_all(&mut block_grads);
                w.free_all(&mut grads);
                let root_shard = if q.on_gpu_params {
                    q.root_trainable * q.m
                } else {
                    0
                };
                if q.grads_all > 0 {
                    grads = per_module(
                        &mut w,
                        (q.grads_all, root_shard),
                        (q.layers, first_layer),
                        Category::Gradients,
                        Part::Grad,
                        None,
                    )?;
                }
            } else if !grads_exist {
                block_grads.push(tail_grads);
                block_grads.push(w.alloc(
                    root_grad_shard - q.tail_grads,
                    Category::Gradients,
                    Owner::new(Module::Root, Part::Grad),
                    REDUCE_SCATTER_STREAM,
                )?);
                grads = block_grads;
            }
        }
        // The optimizer step.
        w.begin(Section::Optimizer, 0);
        w.free(mask);
        w.free(others.take());
        w.free(sent.take());
        if first {
            // The root's share: its shards' states, when the states are on the device.
            per_module(
                &mut w,
                (q.states, q.root_states),
                (q.layers, first_layer),
                Category::OptimizerStates,
                Part::State,
                state_sizes,
            )?;
        }
        let temps = w.alloc(
            q.opt_temporaries,
            Category::OptimizerTemporaries,
            Owner::new(Module::Optimizer, Part::Whole),
            0,
        )?;
        let at = w.now().0;
        w.point(PHASES[4].name(), at);
        w.free(temps);
    }
    let at = w.events.len();
    w.marks.push(Mark {
        at,
        first_step: false,
        kind: MarkKind::End,
    });
    let runtime = super::overhead::runtime_overhead(plan)?;
    Ok(Trace {
        source: Source::Predicted,
        stage: stage_index,
        rank: 0,
        capacity_bytes: Some(plan.gpu.memory_bytes.get().saturating_sub(runtime.get())),
        events: w.events,
        marks: w.marks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::estimate;
    use crate::plan::test_plan as plan;

    /// Plans across what the estimator distinguishes: precision, FSDP degree, checkpointing,
    /// accumulation, pipeline schedules, offload, float8, MoE, reshard_after_forward.
    const PLANS: &[&str] = &[
        r#"{"model":"llama3-8b","gpu":"rtx-a6000-48g","num_gpus":2,"batch":{"micro_batch_size":1,"seq_len":8192},"activation_checkpointing":"full"}"#,
        r#"{"model":"llama3-8b","gpu":"h100-96g","num_gpus":8,"batch":{"micro_batch_size":2,"seq_len":8192},"activation_checkpointing":"selective-op"}"#,
        r#"{"model":"llama3-8b","gpu":"rtx-a6000-48g","num_gpus":2,"batch":{"micro_batch_size":4,"seq_len":2048},"activation_checkpointing":"full","offload":"full"}"#,
        r#"{"model":"llama3-70b","gpu":"h100-80g","num_gpus":64,"parallel":{"tp":8},"batch":{"micro_batch_size":1,"seq_len":8192},"activation_checkpointing":"full"}"#,
        r#"{"model":"tiny","num_gpus":1,"precision":{"param":"fp32","reduce":"fp32","master":"fp32"},"batch":{"micro_batch_size":2,"seq_len":64}}"#,
        r#"{"model":"tiny","num_gpus":2,"batch":{"micro_batch_size":1,"seq_len":64,"grad_accum_steps":3}}"#,
        r#"{"model":"small","num_gpus":4,"batch":{"micro_batch_size":2,"seq_len":128},"activation_checkpointing":"selective-layer:2"}"#,
        r#"{"model":"small","num_gpus":1,"batch":{"micro_batch_size":2,"seq_len":128}}"#,
        r#"{"model":"llama2-7b","gpu":"h100-80g","num_gpus":4,"parallel":{"pp":4},"batch":{"micro_batch_size":2,"seq_len":4096,"grad_accum_steps":8}}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"parallel":{"pp":4,"pp_schedule":"interleaved-1f1b","pp_virtual_stages":2},"batch":{"micro_batch_size":1,"seq_len":8192,"grad_accum_steps":8},"activation_checkpointing":"full"}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"parallel":{"pp":2,"pp_schedule":"gpipe"},"batch":{"micro_batch_size":1,"seq_len":4096,"grad_accum_steps":4}}"#,
        r#"{"model":"llama3-8b","gpu":"h100-96g","num_gpus":8,"batch":{"micro_batch_size":1,"seq_len":32768,"ignore_max_position":true},"activation_checkpointing":"full","compile":true,"float8":true}"#,
        r#"{"model":"llama3-8b","gpu":"h100-96g","num_gpus":8,"parallel":{"dp_shard":4,"cp":2},"batch":{"micro_batch_size":1,"seq_len":65536,"ignore_max_position":true},"activation_checkpointing":"full"}"#,
        r#"{"model":"mixtral-8x7b","gpu":"h100-80g","num_gpus":16,"parallel":{"ep":8},"batch":{"micro_batch_size":1,"seq_len":4096},"activation_checkpointing":"full"}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"reshard_after_forward":false,"batch":{"micro_batch_size":1,"seq_len":4096},"activation_checkpointing":"selective-op"}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"offload":"optimizer","batch":{"micro_batch_size":1,"seq_len":4096},"implementation":{"optimizer":"per-param","logits":"compute-dtype"}}"#,
        r#"{"model":"llama3-8b","gpu":"rtx4090-24g","num_gpus":1,"preset":"hf-transformers","precision":{"param":"bf16","master":"fp32","reduce":"bf16"},"batch":{"micro_batch_size":2,"seq_len":2048},"lora":{"rank":16,"targets":"all-linear","dropout":0.05}}"#,
        r#"{"model":"tiny","gpu":"cpu","num_gpus":1,"preset":"hf-transformers","precision":{"param":"fp32","master":"fp32","reduce":"fp32"},"batch":{"micro_batch_size":2,"seq_len":128},"activation_checkpointing":"full","lora":{"rank":8,"targets":"q,v","dropout":0.0}}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":1,"preset":"hf-transformers","precision":{"param":"bf16","master":"fp32","reduce":"fp32","autocast":true},"batch":{"micro_batch_size":1,"seq_len":2048}}"#,
        r#"{"model":"tiny","gpu":"cpu","num_gpus":1,"precision":{"param":"bf16","master":"fp32","reduce":"fp32","autocast":true},"batch":{"micro_batch_size":2,"seq_len":128,"grad_accum_steps":2},"activation_checkpointing":"full"}"#,
        r#"{"model":"tiny","gpu":"cpu","num_gpus":2,"preset":"torchtitan-0.2","batch":{"micro_batch_size":2,"seq_len":64}}"#,
        r#"{"model":"small","gpu":"cpu","num_gpus":4,"preset":"torchtitan-0.2","implementation":{"fsdp_units":"split-always"},"batch":{"micro_batch_size":2,"seq_len":128},"activation_checkpointing":"selective-op"}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"preset":"torchtitan-0.2","batch":{"micro_batch_size":2,"seq_len":8192,"grad_accum_steps":2},"activation_checkpointing":"full"}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"implementation":{"fsdp_units":"root"},"batch":{"micro_batch_size":1,"seq_len":4096}}"#,
        r#"{"model":"tiny","gpu":"cpu","num_gpus":1,"implementation":{"fsdp_units":"root"},"batch":{"micro_batch_size":1,"seq_len":64}}"#,
        r#"{"model":"small","gpu":"cpu","num_gpus":2,"preset":"hf-transformers","reshard_after_forward":false,"precision":{"param":"bf16","master":"fp32","reduce":"bf16"},"batch":{"micro_batch_size":2,"seq_len":64},"activation_checkpointing":"full"}"#,
        r#"{"model":"tiny","gpu":"cpu","num_gpus":1,"preset":"plain-pytorch","precision":{"param":"fp32","master":"fp32","reduce":"fp32"},"batch":{"micro_batch_size":2,"seq_len":64,"grad_accum_steps":2},"activation_checkpointing":"full"}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"preset":"plain-pytorch","batch":{"micro_batch_size":1,"seq_len":4096}}"#,
        r#"{"model":"tiny-moe","gpu":"cpu","num_gpus":2,"parallel":{"dp_shard":2,"ep":2},"implementation":{"fsdp_units":"split"},"precision":{"param":"fp32","master":"fp32","reduce":"fp32"},"batch":{"micro_batch_size":2,"seq_len":64}}"#,
        r#"{"model":"tiny-moe","gpu":"cpu","num_gpus":2,"parallel":{"dp_shard":2,"ep":2},"precision":{"param":"fp32","master":"fp32","reduce":"fp32"},"batch":{"micro_batch_size":2,"seq_len":64},"activation_checkpointing":"full"}"#,
        r#"{"model":"tiny","gpu":"cpu","num_gpus":4,"parallel":{"tp":2,"sp":true,"dp_shard":2},"implementation":{"fsdp_units":"root-resharded-keep-last"},"precision":{"param":"fp32","master":"fp32","reduce":"fp32"},"batch":{"micro_batch_size":2,"seq_len":64}}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":16,"parallel":{"tp":2,"sp":true},"implementation":{"fsdp_units":"root-resharded-keep-last"},"batch":{"micro_batch_size":1,"seq_len":512}}"#,
        r#"{"model":"tiny","gpu":"cpu","num_gpus":2,"preset":"hf-transformers","precision":{"param":"fp32","master":"fp32","reduce":"fp32"},"batch":{"micro_batch_size":2,"seq_len":64},"lora":{"rank":16,"targets":"all-linear","dropout":0.05}}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"preset":"hf-transformers","precision":{"param":"bf16","master":"fp32","reduce":"bf16"},"batch":{"micro_batch_size":2,"seq_len":4096},"activation_checkpointing":"full","lora":{"rank":16,"targets":"attention","dropout":0.05}}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"batch":{"micro_batch_size":1,"seq_len":2048},"lora":{"rank":64,"targets":"all-linear"}}"#,
        r#"{"model":"tiny","gpu":"cpu","num_gpus":2,"preset":"torchtitan-0.3","batch":{"micro_batch_size":2,"seq_len":64}}"#,
        r#"{"model":"tiny","gpu":"cpu","num_gpus":1,"preset":"torchtitan-0.3","precision":{"param":"fp32","master":"fp32","reduce":"fp32"},"batch":{"micro_batch_size":1,"seq_len":64},"activation_checkpointing":"full"}"#,
        r#"{"model":"small","gpu":"cpu","num_gpus":4,"preset":"torchtitan-0.3","implementation":{"fsdp_units":"split-always"},"batch":{"micro_batch_size":2,"seq_len":128},"activation_checkpointing":"selective-op"}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"preset":"torchtitan-0.3","batch":{"micro_batch_size":1,"seq_len":8192},"activation_checkpointing":"full"}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"preset":"torchtitan-0.3","reshard_after_forward":false,"batch":{"micro_batch_size":2,"seq_len":4096},"activation_checkpointing":"selective-op","implementation":{"zero_grad":"set-to-none","loss_chunks":4}}"#,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":1,"preset":"torchtitan-0.3","batch":{"micro_batch_size":1,"seq_len":2048},"activation_checkpointing":"full"}"#,
    ];

    #[test]
    fn the_running_sum_reproduces_every_phase_figure() {
        for (k, text) in PLANS.iter().enumerate() {
            let plan = plan(text);
            let est = estimate(&plan).unwrap();
            let t = trace(&plan, est.per_gpu.stage).unwrap();
            let points = t.points().unwrap();
            assert_eq!(points.len(), 10, "plan {k}: ten phase points");
            for ((mark, sum), want) in points.iter().zip(est.per_gpu.timeline.iter()) {
                let MarkKind::Point { phase } = &mark.kind else {
                    unreachable!()
                };
                assert_eq!(phase, want.phase.name(), "plan {k}");
                assert_eq!(mark.first_step, want.first_step, "plan {k}");
                assert_eq!(
                    *sum,
                    want.allocated_bytes.get(),
                    "plan {k}: {phase} (first step {})",
                    mark.first_step
                );
            }
            // The peak of the whole trace is the estimator's, and so is its breakdown.
            let (peak, _) = t.peak().unwrap();
            assert_eq!(
                peak,
                est.per_gpu.peak_allocated_bytes.get(),
                "plan {k}: peak"
            );
            let (mark, _) = points.iter().find(|(_, s)| *s == peak).unwrap();
            let cats = t.categories_at(mark.at);
            for (c, (name, bytes)) in Category::ALL.iter().zip(est.per_gpu.breakdown.items()) {
                assert_eq!(c.name(), name);
                assert_eq!(cats[c.index()], bytes.get(), "plan {k}: {name} at the peak");
            }
        }
    }
}
