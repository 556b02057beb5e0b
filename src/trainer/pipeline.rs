//! Pipeline parallelism across processes: each rank runs one pipeline stage, as
//! `torch.distributed.pipelining` (torch 2.11) runs `PipelineStage` under `ScheduleGPipe` and
//! `Schedule1F1B`, or `pp_virtual_stages` stages under `ScheduleInterleaved1F1B` (rank r holds
//! stages r, r + pp, ...), without FSDP inside the stages (dp_shard 1: rank r is stage r) or
//! with FSDP2 over each stage's dp_shard ranks (a (pp, dp_shard) mesh, pp outermost).
//!
//! # What a stage holds
//! torchtitan's split (`pipelining_reference.py` next to this file): stage s takes the layers
//! `stage_layers` gives it (as even as possible, earlier stages taking the remainder), the
//! first stage the token embedding, the last the final norm and output projection; every stage
//! its own rotary table. Without FSDP (dp_shard 1) parameters are plain fp32 leaves (one copy,
//! no unsharded buffer; FSDP2 in a stage below), their gradients accumulate over the micro-batches in `.grad` as autograd's
//! AccumulateGrad does, and are divided by the number of micro-batches after the schedule
//! (`scale_grads=True`, torch's default, the reference's; in place). The optimizer then steps
//! them as torch.optim does.
//!
//! # FSDP2 inside a stage (dp_shard > 1)
//! As the reference and torchtitan apply it: `fully_shard` on every block, then on the stage
//! module (a group for the embedding, or the final norm and output, where the stage has them),
//! `reshard_after_forward=False`, over [`fsdp`](super::fsdp)'s emulation of FSDP2 with c10d
//! collectives over the stage's shard group. What pipelining adds (stage.py, schedules.py):
//! - Before every micro-batch's backward the stage sets `set_requires_gradient_sync(False)`,
//!   `set_reshard_after_backward(False)` and `set_is_last_backward(False)` (stage.py:656-659):
//!   so the groups, all-gathered at the step's first forward, stay unsharded through the whole
//!   schedule (no other all-gather until the next step), and each post-backward reduces
//!   nothing: the unsharded gradients accumulate on the parameters, or, with a reduce dtype
//!   other than the compute dtype, in `unsharded_accumulated_grad` (the first cast, later ones
//!   added: [`Fsdp::post_backward_no_sync`]).
//! - After the schedule, while the schedule's own variables still hold what they hold,
//!   `perform_reduce_grad` (stage.py:989, schedules.py:768 and :976) turns sync and reshard
//!   back on and runs every group's post-backward in `all_states` order (the stage module's
//!   group first, then the blocks): reshard, reduce-scatter into the sharded gradients; the
//!   final callback then frees the last reduce-scatter input, and `scale_grads` divides the
//!   sharded gradients by the number of micro-batches in place.
//! - FSDP2's `foreach_reduce` keeps the last-registered parameter's unsharded gradient (its
//!   loop variable) until it returns: `Group::held_in_reduce`, set here to torchtitan's last
//!   parameter (a block's ffn_norm, the stage module's output or embedding).
//!
//! Each data-parallel rank reads its own rows of every micro-batch (the single-process
//! trainer's micro-batch of dp x micro_batch_size rows), so that the job learns as the
//! FSDP-less pipeline over the whole micro-batches.
//!
//! # What the schedules keep (torch/distributed/pipelining/stage.py and schedules.py)
//! - A receive buffer per micro-batch, allocated at the first step and kept: the stage input
//!   (leaves that require grad) on every stage but the first, the output gradient on every
//!   stage but the last (`_prepare_forward_infra`, `_prepare_backward_infra`).
//! - `fwd_cache[mb] = (output, input)` from a micro-batch's forward to its backward; on the
//!   last stage each micro-batch's loss (`_internal_losses`) to the step's end, and its logits
//!   detached after its backward.
//! - The input gradient sent back is the receive buffer's `.grad`, taken (set to None) after
//!   the backward (`stage_backward`).
//! - What the schedule's own variables hold, mirrored name for name below: GPipe keeps every
//!   send's Work (and with it the tensor) to the step's end; 1F1B keeps the last fired
//!   warm-up send in `send_work` until the cool-down, and the pending `fwd_sends` /
//!   `bwd_sends` lists until they are rebound; `output` and `loss` until rebound or return.
//! - The whole step's token ids (first stage) and labels (last stage) are one tensor each, the
//!   micro-batches views of it, rebound at the next step (the new one is allocated first); the
//!   last stage's `losses` list lives until the next step rebinds it.
//!
//! Point-to-point is c10d's own isend / irecv on a Gloo group, batched and waited as torch's
//! `batch_isend_irecv` calls are; Gloo's send and receive allocate nothing.
//!
//! # Interleaved 1F1B (several stages per rank)
//! torch runs it through `_PipelineScheduleRuntime` (schedules.py:1855): every rank computes
//! every rank's compute-only order (`ScheduleInterleaved1F1B._calculate_single_rank_operations`)
//! and lowers it into a list of actions (UNSHARD / RESHARD for FSDP, REDUCE_GRAD after a
//! stage's last backward, and the SEND / RECV of every forward and backward whose neighbour
//! stage is on another rank); [`Layout`] computes the same lists (held action for action against
//! torch's own in `tests/data/pipelining_ir_torch_2.11.txt`) and [`run_actions`] runs this
//! rank's as `_perform_action` does. Each stage is a [`Stage`] of its own (its blocks, its
//! rotary table, its receive buffers and caches, its FSDP root), and one optimizer steps them
//! all. What differs from the one-stage schedules: every send's Work is kept until the step's
//! end (`send_ops`), so every stage output and sent input gradient stays that long; under
//! FSDP the all-gathers are issued by UNSHARD before the stage's first forward and each
//! output freed as its first compute action waits on it (outside FSDP's forward), and each
//! stage reduce-scatters at its own REDUCE_GRAD, the later stage's while the earlier stage
//! still holds its micro-batches' activations.
//!
//! # Known differences from torch, kept
//! - Gloo's reduce-scatter clones its input (and the counter sees 12 bytes more); NCCL and the
//!   trainer's collectives do not. The report notes the steady peak torch's CPU/Gloo run would
//!   reach with that clone ([`GlooAccounted`]); it exceeds the trainer's own only where the
//!   schedule's end is the stage's peak.
//! - torch.optim's `state["step"]` scalars (4 bytes per parameter tensor) are CPU tensors: the
//!   reference, on CPU, counts them as device bytes; this trainer counts them as host bytes,
//!   as on a GPU they are (`optim.rs`).
//! - Python objects that own no tensor bytes (P2POp lists, Work objects of receives into the
//!   persistent buffers) are not mirrored: they hold nothing the counter sees.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::ffi::{c_int, c_void};
use std::rc::Rc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use super::dist::{self, Mesh, ProcessGroup, Work};
use super::ffi::{self, Channel};
use super::fsdp::{shim, Collectives, Env, Fsdp, FsdpParam, Group, Place, Shard};
use super::memory::{Meter, PhaseMemory};
use super::model::{self, BlockWeights, Dims, Flavor, TResult};
use super::optim::{self, OptConfig};
use super::{
    checkpointed, default_lr, first_line, init_weights, is_oom, kind, steps_peak, synthetic_tokens,
    tokens_per_second, unsupported, OomReport, Phase, StepReport, TrainOptions, TrainReport,
};
use crate::error::{Error, Result};
use crate::plan::{Checkpointing, Logits, Offload, Plan, PpSchedule};
use crate::profiles::ModelSpec;
use crate::trace;

/// The layers of `layers` that stage `stage` of `stages` holds: torchtitan splits as evenly as
/// it can, earlier stages taking the remainder. Returns (first layer, count).
///
/// ```
/// use memplan::trainer::pipeline::stage_layers;
/// assert_eq!(stage_layers(2, 2, 1), (1, 1));
/// assert_eq!(stage_layers(5, 2, 0), (0, 3));
/// assert_eq!(stage_layers(5, 2, 1), (3, 2));
/// ```
pub fn stage_layers(layers: u64, stages: u64, stage: u64) -> (u64, u64) {
    let count = |s: u64| layers / stages + u64::from(s < layers % stages);
    ((0..stage).map(count).sum(), count(stage))
}

/// Refuses what the pipeline trainer does not run, with the reason (the caller has refused
/// what no trainer runs).
pub fn check(plan: &Plan) -> Result<()> {
    let p = &plan.parallel;
    if p.dp_replicate != 1 {
        return Err(unsupported(
            "parallel.dp_replicate",
            p.dp_replicate,
            "1 under pipelining: HSDP inside pipeline stages is not run yet",
        ));
    }
    if p.dp_shard > 1 && plan.reshard_after_forward {
        return Err(unsupported(
            "reshard_after_forward",
            "true",
            "false under pipelining with FSDP (torchtitan's default under PP: the stage stays \
             unsharded between micro-batches)",
        ));
    }
    if !matches!(
        p.pp_schedule,
        PpSchedule::GPipe | PpSchedule::OneFOneB | PpSchedule::Interleaved1F1B
    ) {
        return Err(unsupported(
            "parallel.pp_schedule",
            format!("\"{}\"", p.pp_schedule),
            "gpipe, 1f1b or interleaved-1f1b",
        ));
    }
    let v = p.pp_virtual_stages;
    if v != 1 && p.pp_schedule != PpSchedule::Interleaved1F1B {
        return Err(unsupported(
            "parallel.pp_virtual_stages",
            v,
            "1 (one stage per rank) unless pp_schedule is interleaved-1f1b",
        ));
    }
    if p.pp * v > plan.model.layers {
        return Err(unsupported(
            "parallel.pp",
            format!("{} x {v} virtual stages", p.pp),
            &format!("at most the model's {} layers in all", plan.model.layers),
        ));
    }
    let n = plan.batch.grad_accum_steps;
    if p.pp_schedule == PpSchedule::Interleaved1F1B && n % (n / p.pp).max(1) != 0 {
        return Err(unsupported(
            "batch.grad_accum_steps",
            n,
            &format!(
                "a multiple of max(1, grad_accum_steps / pp) = {} under interleaved-1f1b \
                 (torch's ScheduleInterleaved1F1B requires it)",
                (n / p.pp).max(1)
            ),
        ));
    }
    if p.pp_schedule == PpSchedule::Interleaved1F1B && p.dp_shard > 1 && v > 3 {
        return Err(unsupported(
            "parallel.pp_virtual_stages",
            v,
            "at most 3 under FSDP: torch's runtime keeps three stages unsharded and reshards \
             a fourth between its micro-batches, which is not run yet",
        ));
    }
    if p.pp_schedule == PpSchedule::OneFOneB && plan.batch.grad_accum_steps < p.pp {
        return Err(unsupported(
            "batch.grad_accum_steps",
            plan.batch.grad_accum_steps,
            &format!(
                "at least pp = {} micro-batches per step under 1f1b (torch's Schedule1F1B \
                 requires it)",
                p.pp
            ),
        ));
    }
    let m = &plan.model;
    if m.tied_embeddings {
        return Err(unsupported(
            "model",
            format!("{} (tied embeddings)", m.name),
            "untied embeddings under pipelining: the embedding and the output projection live \
             on different stages",
        ));
    }
    if !matches!(
        plan.activation_checkpointing,
        Checkpointing::None | Checkpointing::Full
    ) {
        return Err(unsupported(
            "activation_checkpointing",
            format!("\"{}\"", plan.activation_checkpointing),
            "none or full under pipelining",
        ));
    }
    if plan.offload != Offload::None {
        return Err(unsupported(
            "offload",
            format!("\"{}\"", plan.offload),
            "none under pipelining",
        ));
    }
    if matches!(
        plan.implementation.logits,
        Logits::FloatOutputKept | Logits::FloatInLossKept
    ) {
        return Err(unsupported(
            "implementation.logits",
            format!("\"{}\"", plan.implementation.logits),
            "a loop that does not keep its logits: a pipeline schedule keeps them itself",
        ));
    }
    let pr = &plan.precision;
    if p.dp_shard == 1 && pr.param != pr.master {
        return Err(unsupported(
            "precision",
            format!("param {} with master {}", pr.param, pr.master),
            "one dtype for parameters and master weights under pipelining without FSDP (the \
             stage is cast, as model.to(dtype))",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The stage's model: weights, forward and the checkpoint recompute.

/// Tag of a checkpointed block's recompute: micro-batch x TAG + local block.
const TAG: i64 = 1 << 32;
/// Tag of a block's FSDP post-backward: POST + local block.
const POST: i64 = 1 << 60;

/// The stage's parameters.
enum Params {
    /// Without FSDP: plain leaves, whole.
    Plain(Vec<Shard>),
    /// FSDP2 over the stage's data-parallel ranks (`fully_shard` per block, then on the stage
    /// module): a group per local block, then the root's (the embedding, or the final norm and
    /// the output projection) where the stage has parameters of its own.
    Fsdp(Fsdp),
}

impl Params {
    /// This rank's shards, in the order of the model's leaves.
    fn shards_mut(&mut self) -> Vec<&mut Shard> {
        match self {
            Params::Plain(v) => v.iter_mut().collect(),
            Params::Fsdp(f) => f
                .groups
                .iter_mut()
                .flat_map(|g| g.params.iter_mut().map(|p| &mut p.local))
                .collect(),
        }
    }
}

/// What the forward and the checkpoint hooks share.
struct StageModel {
    spec: ModelSpec,
    dims: Dims,
    flavor: Flavor,
    freqs: Tensor,
    /// The parameters as the model uses them (leaves that require grad), in the order of
    /// `shards`: the local blocks', then the embedding (first stage), then the final norm and
    /// the output projection (last stage).
    leaves: Vec<Tensor>,
    per_block: usize,
    blocks: usize,
    first: bool,
    last: bool,
    /// Inputs kept by checkpointed blocks, by tag.
    ckpt: HashMap<i64, Tensor>,
    params: Params,
    error: Option<tch::TchError>,
}

impl StageModel {
    fn block(&self, j: usize, x: &Tensor) -> TResult<Tensor> {
        let w = BlockWeights::from_list(
            &self.spec,
            &self.leaves[j * self.per_block..(j + 1) * self.per_block],
        );
        let f = self.freqs.f_narrow(0, 0, x.size()[1])?;
        model::block_forward(x, &w, &f, self.dims, self.flavor)
    }

    fn root(&self, k: usize) -> &Tensor {
        &self.leaves[self.blocks * self.per_block + k]
    }

    fn fsdp(&mut self) -> Option<&mut Fsdp> {
        match &mut self.params {
            Params::Fsdp(f) => Some(f),
            Params::Plain(_) => None,
        }
    }

    /// The root's FSDP group, where the stage has one (a middle stage's root module holds no
    /// parameter of its own: `fully_shard` makes no group for it).
    fn root_group(&self) -> Option<usize> {
        (self.first || self.last).then_some(self.blocks)
    }

    /// FSDP2's pre-forward of group `g`: the all-gather and copy-out the first time in a step;
    /// then nothing, as the group stays unsharded (reshard_after_forward=False under PP, as
    /// the reference and torchtitan pass it, and no reshard after backward until the last).
    fn pre_forward(&mut self, g: usize) -> TResult<()> {
        match self.fsdp() {
            Some(f) => f.wait_for_unshard(g, true),
            None => Ok(()),
        }
    }

    /// The backward hooks: a block's FSDP post-backward, or a checkpointed block's recompute.
    fn on_backward(&mut self, tag: i64, grad: Tensor) -> TResult<Option<Tensor>> {
        if tag >= POST {
            drop(grad);
            if let Some(f) = self.fsdp() {
                f.post_backward_no_sync((tag - POST) as usize)?;
            }
            return Ok(None);
        }
        self.recompute(tag, grad)
    }

    /// The checkpoint hook: recompute block `j` of micro-batch `mb` from its kept input and
    /// run its backward ([`super::recompute_block`]).
    fn recompute(&mut self, tag: i64, grad: Tensor) -> TResult<Option<Tensor>> {
        let x = self
            .ckpt
            .remove(&tag)
            .expect("checkpointed block kept its input");
        super::recompute_block(x, grad, |xd| self.block((tag % TAG) as usize, xd))
    }
}

struct Hooks(RefCell<StageModel>);

unsafe extern "C" fn hook(
    user: *mut c_void,
    tag: i64,
    grad_in: *mut C_tensor,
    grad_out: *mut *mut C_tensor,
) -> c_int {
    // SAFETY: `user` is the Hooks box that outlives every graph of the run (see `Stage`).
    let hooks = &*(user as *const Hooks);
    ffi::run_callback(
        grad_in,
        grad_out,
        "a pipeline stage's backward hook",
        |grad| {
            let mut st = hooks
                .0
                .try_borrow_mut()
                .map_err(|_| tch::TchError::Torch("stage state busy in a hook".into()))?;
            st.on_backward(tag, grad)
        },
        |err| {
            if let Ok(mut st) = hooks.0.try_borrow_mut() {
                st.error.get_or_insert(err);
            }
        },
    )
}

// ---------------------------------------------------------------------------------------------
// One stage of the pipeline, as torch's PipelineStage.

struct Stage<'a> {
    hooks: Box<Hooks>,
    pg: &'a ProcessGroup,
    /// The global stage index, and the pipeline's ranks (stage s lives on rank s mod pp).
    index: i64,
    pp: i64,
    n: usize,
    mbs: i64,
    ac: Checkpointing,
    /// Activation receive buffers (not on the first stage), one per micro-batch.
    act_bufs: Vec<Tensor>,
    /// Output-gradient receive buffers (not on the last stage), one per micro-batch.
    grad_bufs: Vec<Tensor>,
    /// `fwd_cache`: (output, input) from forward to backward.
    fwd_cache: Vec<Option<(Tensor, Tensor)>>,
    /// `bwd_cache`: the input gradient from a multi-stage schedule's backward to its SEND_B.
    bwd_cache: Vec<Option<Tensor>>,
    /// A multi-stage schedule's UNSHARD issued the all-gathers, not yet waited on
    /// (`_PipelineScheduleRuntime.unshard_ops`).
    unshard_pending: bool,
    /// `_internal_losses`.
    internal_losses: Vec<Tensor>,
    /// The step's token ids (first stage) and labels (last stage): `inp`, `labels`.
    tokens: Option<Tensor>,
    labels: Option<Tensor>,
    /// The caller's `losses` list, filled at the step's end (`_update_losses`).
    losses: Vec<Tensor>,
}

const ACT: i64 = 0;
const GRAD: i64 = 1;

/// The point-to-point tag of what stage `to` receives for micro-batch `mb` of `n` (its
/// activation or its output gradient). torch sends everything with tag 0 and relies on the
/// order of the ops on both sides; distinct tags match the same messages whatever the order.
fn p2p_tag(kind: i64, to: i64, mb: usize, n: usize) -> i64 {
    2 * (to * n as i64 + mb as i64) + kind
}

fn wait_all(works: &[Work]) -> TResult<()> {
    works.iter().try_for_each(Work::wait)
}

impl Stage<'_> {
    fn first(&self) -> bool {
        self.hooks.0.borrow().first
    }
    fn last(&self) -> bool {
        self.hooks.0.borrow().last
    }

    /// `_prepare_forward_infra`: the activation receive buffers, made at the first step
    /// (`torch.empty` with requires_grad).
    fn make_act_buffers(&mut self, kind: Kind, hidden: i64, seq: i64) -> TResult<()> {
        let shape = [self.mbs, seq, hidden];
        if !self.first() && self.act_bufs.is_empty() {
            for _ in 0..self.n {
                let t = Tensor::f_empty(shape, (kind, Device::Cpu))?.f_set_requires_grad(true)?;
                self.act_bufs.push(t);
            }
        }
        Ok(())
    }

    /// `_prepare_backward_infra`: the output-gradient receive buffers, made at the first step.
    fn make_grad_buffers(&mut self, kind: Kind, hidden: i64, seq: i64) -> TResult<()> {
        let shape = [self.mbs, seq, hidden];
        if !self.last() && self.grad_bufs.is_empty() {
            for _ in 0..self.n {
                self.grad_bufs
                    .push(Tensor::f_empty(shape, (kind, Device::Cpu))?);
            }
        }
        Ok(())
    }

    fn recv_fwd(&self, k: usize) -> TResult<Vec<Work>> {
        if self.first() {
            return Ok(Vec::new());
        }
        Ok(vec![self.pg.irecv(
            &self.act_bufs[k],
            (self.index - 1).rem_euclid(self.pp),
            p2p_tag(ACT, self.index, k, self.n),
        )?])
    }
    fn recv_bwd(&self, k: usize) -> TResult<Vec<Work>> {
        if self.last() {
            return Ok(Vec::new());
        }
        Ok(vec![self.pg.irecv(
            &self.grad_bufs[k],
            (self.index + 1) % self.pp,
            p2p_tag(GRAD, self.index, k, self.n),
        )?])
    }
    /// `get_fwd_send_ops`: the tensors a forward send holds (none on the last stage).
    fn fwd_sends(&self, output: &Tensor) -> Vec<Tensor> {
        if self.last() {
            Vec::new()
        } else {
            vec![output.shallow_clone()]
        }
    }
    /// `_batch_p2p` of sends to stage `to`: each Work holds its tensor until dropped.
    fn fire(&self, sends: &[Tensor], to: i64, tag: i64) -> TResult<Vec<Work>> {
        sends
            .iter()
            .map(|t| self.pg.isend(t, to.rem_euclid(self.pp), tag))
            .collect()
    }
    /// The forward send of micro-batch `k`'s output.
    fn fire_fwd(&self, sends: &[Tensor], k: usize) -> TResult<Vec<Work>> {
        let to = self.index + 1;
        self.fire(sends, to, p2p_tag(ACT, to, k, self.n))
    }
    /// The backward send of micro-batch `k`'s input gradient.
    fn fire_bwd(&self, sends: &[Tensor], k: usize) -> TResult<Vec<Work>> {
        let to = self.index - 1;
        self.fire(sends, to, p2p_tag(GRAD, to, k, self.n))
    }

    /// `forward_one_chunk`: the stage module's forward of micro-batch `k`, cached.
    fn forward(&mut self, k: usize) -> TResult<Tensor> {
        let input = if self.first() {
            self.tokens
                .as_ref()
                .expect("the first stage has its tokens")
                .f_narrow(0, k as i64 * self.mbs, self.mbs)?
        } else {
            self.act_bufs[k].shallow_clone()
        };
        let user = &*self.hooks as *const Hooks as *mut c_void;
        let st = &self.hooks.0;
        // The stage module's FSDP pre-forward (the root's group first).
        let root = st.borrow().root_group();
        if let Some(g) = root {
            st.borrow_mut().pre_forward(g)?;
        }
        let fsdp = st.borrow_mut().fsdp().is_some();
        // `h = self.tok_embeddings(tokens) if ... else tokens`
        let mut h = if st.borrow().first {
            model::embed_with(&input, st.borrow().root(0))?
        } else if let (true, Some(g)) = (fsdp, root) {
            // The root's post-backward hook on its input (the received activation, which
            // requires grad): it runs inside the backward, while autograd still holds what it
            // holds there (the loss's ones on the last stage).
            // SAFETY: as for the checkpoint link below.
            unsafe { ffi::boundary(&input, POST + g as i64, hook, user) }.map_err(shim)?
        } else {
            input.shallow_clone()
        };
        let blocks = st.borrow().blocks;
        for j in 0..blocks {
            if fsdp {
                // The block's FSDP pre-forward: unshard, then the post-backward hook on its
                // input (`_register_post_backward_hook`, RegisterPostBackwardFunction).
                st.borrow_mut().pre_forward(j)?;
                // SAFETY: as for the checkpoint link below.
                h = unsafe { ffi::boundary(&h, POST + j as i64, hook, user) }.map_err(shim)?;
            }
            // `h = layer(h, freqs)`: the previous h is freed unless autograd saved it.
            h = if checkpointed(self.ac, j as u64) {
                let y = tch::no_grad(|| st.borrow().block(j, &h))?;
                let tag = k as i64 * TAG + j as i64;
                // SAFETY: the Hooks box outlives the graph (it lives as long as the Stage,
                // whose graphs end with each micro-batch's backward).
                let y = unsafe { ffi::checkpoint_link(&h, &y, tag, hook, user) }.map_err(shim)?;
                st.borrow_mut().ckpt.insert(tag, h.shallow_clone());
                y
            } else {
                st.borrow().block(j, &h)?
            };
        }
        let output = if st.borrow().last {
            let s = st.borrow();
            let norm_at = usize::from(s.first);
            model::head_with(h, s.root(norm_at), s.root(norm_at + 1), s.flavor)?
        } else {
            h
        };
        // The root's post-forward frees the last all-gather output.
        if let Some(f) = st.borrow_mut().fsdp() {
            f.root_post_forward();
        }
        self.fwd_cache[k] = Some((output.shallow_clone(), input));
        Ok(output)
    }

    /// `_maybe_compute_loss`: on the last stage, the loss of micro-batch `k` right after its
    /// forward, kept in `_internal_losses`.
    fn compute_loss(&mut self, k: usize, output: &Tensor) -> TResult<()> {
        if !self.last() {
            return Ok(());
        }
        let labels = self
            .labels
            .as_ref()
            .expect("the last stage has its labels")
            .f_narrow(0, k as i64 * self.mbs, self.mbs)?;
        let flavor = self.hooks.0.borrow().flavor;
        let loss = model::loss(output, &labels, flavor)?;
        self.internal_losses.push(loss);
        Ok(())
    }

    /// `_maybe_get_loss`.
    fn loss_of(&self, k: usize) -> Option<Tensor> {
        self.internal_losses.get(k).map(Tensor::shallow_clone)
    }

    /// `backward_one_chunk`: the backward of micro-batch `k` from its loss (last stage) or from
    /// the received output gradient; returns the input gradient to send back (`bwd_cache`).
    fn backward(&mut self, k: usize, loss: Option<&Tensor>) -> TResult<Option<Tensor>> {
        let (mut output, input) = self.fwd_cache[k].take().expect("forward ran first");
        let r = if self.last() {
            ffi::backward(&[loss.expect("the last stage has a loss")], &[None])
        } else {
            ffi::backward(&[&output], &[Some(&self.grad_bufs[k])])
        };
        if let Err(e) = r {
            let hooked = self.hooks.0.borrow_mut().error.take();
            return Err(hooked.unwrap_or(tch::TchError::Torch(e.0)));
        }
        if self.first() {
            // The first stage's root post-backward: its input (token ids) needs no gradient,
            // so FSDP2's final callback runs it at the backward's end (later stages run it
            // from the hook on their input, last, as the blocks' without sync).
            let mut st = self.hooks.0.borrow_mut();
            if let Some(g) = st.root_group() {
                if let Some(f) = st.fsdp() {
                    f.post_backward_no_sync(g)?;
                }
            }
        }
        // `stage_backward`: the input's gradient is read and the buffer's `.grad` set to None.
        let grad = if self.first() {
            None
        } else {
            ffi::take_grad(&self.act_bufs[k]).map_err(shim)?
        };
        if self.last() && !self.first() {
            // `t.detach_()` of the stage output: its data stays while the schedule's `output`
            // holds it.
            let _ = output.f_detach_()?;
        }
        drop((output, input));
        Ok(grad)
    }

    /// `_update_losses`: the caller's list takes the step's losses.
    fn update_losses(&mut self) {
        if self.last() {
            self.losses = std::mem::take(&mut self.internal_losses);
        }
    }

    /// The stage's FSDP groups in `submod.modules()` order: the stage module's own group (where
    /// it has parameters) first, then the blocks'.
    fn groups_in_module_order(&self) -> Vec<usize> {
        let st = self.hooks.0.borrow();
        st.root_group().into_iter().chain(0..st.blocks).collect()
    }

    /// `UNSHARD` (schedules.py:2109): `unshard(async_op=True)` on every FSDP module of the
    /// stage, each issuing its group's all-gather; the outputs stay until the stage's next
    /// compute action waits on them. Nothing without FSDP.
    fn unshard_all(&mut self) -> TResult<()> {
        let order = self.groups_in_module_order();
        let mut st = self.hooks.0.borrow_mut();
        if let Some(f) = st.fsdp() {
            for g in order {
                f.unshard(g)?;
            }
            self.unshard_pending = true;
        }
        Ok(())
    }

    /// `_assert_unsharded` (schedules.py:2018): the pending unshards waited on in the order
    /// they were issued, outside FSDP's forward, so that each all-gather output is freed right
    /// after its copy-out (`wait_for_unshard`, fsdp/_fully_shard/_fsdp_param_group.py:348).
    fn assert_unsharded(&mut self) -> TResult<()> {
        if !std::mem::take(&mut self.unshard_pending) {
            return Ok(());
        }
        let order = self.groups_in_module_order();
        let mut st = self.hooks.0.borrow_mut();
        let f = st.fsdp().expect("an unshard was issued under FSDP");
        for g in order {
            f.wait_for_unshard(g, false)?;
        }
        Ok(())
    }

    /// `RESHARD` (schedules.py:2121): every group's unsharded parameters freed (none left after
    /// the stage's REDUCE_GRAD, which resharded them).
    fn reshard_all(&mut self) -> TResult<()> {
        let order = self.groups_in_module_order();
        let mut st = self.hooks.0.borrow_mut();
        if let Some(f) = st.fsdp() {
            for g in order {
                f.reshard(g)?;
            }
        }
        Ok(())
    }

    /// `perform_reduce_grad(n)` (stage.py:989), called by the schedule while its own
    /// variables still hold what they hold. Under FSDP every group's post-backward with sync
    /// and reshard on, in `all_states` order (the stage module's root first, then the blocks):
    /// the unsharded parameters freed, the gradients reduce-scattered into the sharded ones;
    /// then the final callback frees the last reduce-scatter input. Then `scale_grads`: every
    /// gradient divided by the number of micro-batches, in place.
    fn perform_reduce_grad(&mut self) -> TResult<()> {
        let n = self.n as f64;
        let mut st = self.hooks.0.borrow_mut();
        let root = st.root_group();
        let _ng = tch::no_grad_guard();
        match &mut st.params {
            Params::Plain(shards) => {
                for sh in shards.iter_mut() {
                    sh.grad = ffi::take_grad(&sh.view).map_err(shim)?;
                }
            }
            Params::Fsdp(f) => {
                let blocks = f.groups.len() - usize::from(root.is_some());
                for g in root.into_iter().chain(0..blocks) {
                    f.post_backward(g)?;
                }
                f.finish_backward();
            }
        }
        for sh in st.params.shards_mut() {
            if let Some(g) = &mut sh.grad {
                let _ = g.f_div_scalar_(n)?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// What torch's reference holds on Gloo besides.

/// What Gloo's reduce-scatter allocates besides the input and output, as the reference's
/// CPU/Gloo run counts it: `reduce_scatter_tensor_coalesced` (torch 2.11
/// ProcessGroupGloo.cpp, behind `_reduce_scatter_base`) all-reduces a `clone()` of the whole
/// input and copies this rank's chunk out; the counter also sees 12 bytes more during every
/// call (measured at each reduce-scatter of every stage, fp32 and bf16, whatever its size).
/// NCCL, on a GPU, allocates neither, and this trainer's Gloo collectives neither (`dist.rs`).
fn gloo_reduce_scatter_bytes(input: &Tensor) -> u64 {
    (input.numel() * input.kind().elt_size_in_bytes()) as u64 + 12
}

/// The stage's FSDP collectives (`dist::C10d`), which also keep the highest device bytes
/// torch's reference would reach inside a reduce-scatter on Gloo: the bytes live here when
/// it is issued plus [`gloo_reduce_scatter_bytes`]. A report figure, never an allocation.
struct GlooAccounted {
    inner: dist::C10d,
    /// The raw device counter at the meter's zero.
    base: u64,
    high: Rc<Cell<u64>>,
}

impl Collectives for GlooAccounted {
    fn world_size(&self) -> i64 {
        self.inner.world_size()
    }
    fn rank(&self) -> i64 {
        self.inner.rank()
    }
    fn all_gather(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        peer_input: &mut dyn FnMut(i64) -> TResult<Tensor>,
    ) -> TResult<()> {
        self.inner.all_gather(output, input, peer_input)
    }
    fn reduce_scatter(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        peer_output: &mut dyn FnMut(i64, Tensor) -> TResult<()>,
    ) -> TResult<()> {
        let now = ffi::counter(Channel::Device).0.saturating_sub(self.base);
        let gloo = now + gloo_reduce_scatter_bytes(input);
        self.high.set(self.high.get().max(gloo));
        self.inner.reduce_scatter(output, input, peer_output)
    }
}

// ---------------------------------------------------------------------------------------------
// The multi-stage schedules' action lists, as torch 2.11 lowers them.

/// One action of a multi-stage schedule's lowered list (torch 2.11
/// torch/distributed/pipelining/schedules.py `_Action`, `_ComputationType` at :45).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    /// `F`: the stage's forward of a micro-batch.
    Forward,
    /// `B`: its whole backward.
    Backward,
    SendF,
    SendB,
    RecvF,
    RecvB,
    /// FSDP's explicit all-gather of every group of the stage (`UNSHARD`).
    Unshard,
    Reshard,
    /// `perform_reduce_grad` after the stage's last backward.
    ReduceGrad,
}

/// A stage's action; `mb` is 0 for the three that have no micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Action {
    stage: usize,
    op: Op,
    mb: usize,
}

impl Action {
    fn new(stage: usize, op: Op, mb: usize) -> Action {
        Action { stage, op, mb }
    }
}

impl std::fmt::Display for Action {
    /// As torch's `_Action.__str__` prints it ("2F0", "0SEND_B3", "2REDUCE_GRAD").
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = match self.op {
            Op::Forward => "F",
            Op::Backward => "B",
            Op::SendF => "SEND_F",
            Op::SendB => "SEND_B",
            Op::RecvF => "RECV_F",
            Op::RecvB => "RECV_B",
            Op::Unshard => "UNSHARD",
            Op::Reshard => "RESHARD",
            Op::ReduceGrad => "REDUCE_GRAD",
        };
        write!(f, "{}{op}", self.stage)?;
        if matches!(self.op, Op::Unshard | Op::Reshard | Op::ReduceGrad) {
            Ok(())
        } else {
            write!(f, "{}", self.mb)
        }
    }
}

/// The shape of an interleaved schedule: `pp` ranks of `v` stages each (rank r holds stages
/// r, r + pp, ...: `generate_stage_to_rank_mapping(style="loop")`, pipelining/_utils.py:91,
/// which PipelineScheduleMulti sets on its stages, and torchtitan's "loop" assignment), `n`
/// micro-batches.
#[derive(Clone, Copy, Debug)]
struct Layout {
    pp: usize,
    v: usize,
    n: usize,
}

impl Layout {
    fn stages(&self) -> usize {
        self.pp * self.v
    }
    fn rank_of(&self, stage: usize) -> usize {
        stage % self.pp
    }
    /// `number_of_rounds = max(1, n // pp)` and `microbatches_per_round = n // rounds`
    /// (schedules.py:2549-2551); torch refuses an `n` that the rounds do not divide.
    fn rounds(&self) -> usize {
        (self.n / self.pp).max(1)
    }
    fn per_round(&self) -> usize {
        self.n / self.rounds()
    }

    /// `ScheduleInterleaved1F1B._calculate_single_rank_operations(rank)` (schedules.py:2568)
    /// without its idle slots: `_get_warmup_ops` (:2488) forwards, `min((v - 1) x per_round +
    /// 2 (pp - 1 - rank), n v)`, then a forward and a backward in turn, then the remaining
    /// backwards (`_get_1f1b_rank_ops`, :2351). Forward step k runs local stage
    /// `(k / per_round) mod v`; backward step k (counted from the warm-up's end) local stage
    /// `v - 1 - (k / per_round) mod v`; each stage takes its micro-batches in order.
    fn interleaved_1f1b(&self, rank: usize) -> Vec<Action> {
        let (pp, v, n, mpr) = (self.pp, self.v, self.n, self.per_round());
        let ops = n * v;
        let warmup = ((v - 1) * mpr + 2 * (pp - 1 - rank)).min(ops);
        let fwd_stage = |k: usize| ((k / mpr) % v) * pp + rank;
        let bwd_stage = |k: usize| (v - 1 - ((k - warmup) / mpr) % v) * pp + rank;
        let (mut fwd_mb, mut bwd_mb) = (vec![0; pp * v], vec![0; pp * v]);
        let next = |counts: &mut Vec<usize>, stage: usize| {
            counts[stage] += 1;
            counts[stage] - 1
        };
        let mut out = Vec::with_capacity(2 * ops);
        // warm-up forwards, then (ops - warmup) forward-backward pairs, then `warmup` backwards
        for k in 0..ops + warmup {
            if k < ops {
                let s = fwd_stage(k);
                out.push(Action::new(s, Op::Forward, next(&mut fwd_mb, s)));
            }
            if k >= warmup {
                let s = bwd_stage(k);
                out.push(Action::new(s, Op::Backward, next(&mut bwd_mb, s)));
            }
        }
        out
    }

    /// Every rank's list as `_PipelineScheduleRuntime._prepare_schedule_with_comms` lowers the
    /// compute-only lists (schedules.py:1917): `_add_unshard_reshard`, `_add_reduce_grad`, then
    /// `_add_send_recv` over all ranks together.
    fn lowered(&self, compute: impl Fn(usize) -> Vec<Action>) -> Vec<Vec<Action>> {
        let per_rank = (0..self.pp)
            .map(|r| self.add_reduce_grad(add_unshard_reshard(&compute(r))))
            .collect();
        self.add_send_recv(per_rank)
    }

    /// `_add_reduce_grad` (schedules.py:1051): a stage's REDUCE_GRAD right after its n-th
    /// backward.
    fn add_reduce_grad(&self, actions: Vec<Action>) -> Vec<Action> {
        let mut count = vec![0; self.stages()];
        let mut out = Vec::with_capacity(actions.len() + self.v);
        for a in actions {
            out.push(a);
            if a.op == Op::Backward {
                count[a.stage] += 1;
                if count[a.stage] == self.n {
                    out.push(Action::new(a.stage, Op::ReduceGrad, 0));
                }
            }
        }
        out
    }

    /// `_add_send_recv` (schedules.py:1205): the ranks' lists are walked together, one action
    /// of each rank per round in rank order; an action waits until what it consumes was
    /// received (a forward its RECV_F, a backward its RECV_B: `_ready_to_schedule`); a forward
    /// or backward whose neighbour stage lives on another rank is followed by its send, and
    /// the receiver's list gets the matching receive at that moment.
    fn add_send_recv(&self, mut lists: Vec<Vec<Action>>) -> Vec<Vec<Action>> {
        let last = self.stages() - 1;
        let comms = |a: &Action| -> Option<(Action, Action)> {
            match a.op {
                Op::Forward if a.stage != last => Some((
                    Action::new(a.stage, Op::SendF, a.mb),
                    Action::new(a.stage + 1, Op::RecvF, a.mb),
                )),
                Op::Backward if a.stage != 0 => Some((
                    Action::new(a.stage, Op::SendB, a.mb),
                    Action::new(a.stage - 1, Op::RecvB, a.mb),
                )),
                _ => None,
            }
            .filter(|(_, recv)| self.rank_of(recv.stage) != self.rank_of(a.stage))
        };
        let ready = |a: &Action, done: &HashSet<Action>| match a.op {
            Op::Forward if a.stage != 0 => {
                done.contains(&Action::new(a.stage, Op::RecvF, a.mb))
                    || done.contains(&Action::new(a.stage - 1, Op::Forward, a.mb))
            }
            Op::Backward if a.stage != last => {
                done.contains(&Action::new(a.stage, Op::RecvB, a.mb))
                    || done.contains(&Action::new(a.stage + 1, Op::Backward, a.mb))
            }
            _ => true,
        };
        let mut out: Vec<Vec<Action>> = vec![Vec::new(); self.pp];
        let mut done: Vec<HashSet<Action>> = vec![HashSet::new(); self.pp];
        for l in &mut lists {
            l.reverse();
        }
        while lists.iter().any(|l| !l.is_empty()) {
            let mut progress = false;
            for rank in 0..self.pp {
                let Some(&a) = lists[rank].last() else {
                    continue;
                };
                if !ready(&a, &done[rank]) {
                    continue;
                }
                out[rank].push(a);
                done[rank].insert(a);
                if let Some((send, recv)) = comms(&a) {
                    out[rank].push(send);
                    done[rank].insert(send);
                    let to = self.rank_of(recv.stage);
                    out[to].push(recv);
                    done[to].insert(recv);
                }
                lists[rank].pop();
                progress = true;
            }
            assert!(progress, "a malformed schedule: no rank can go on");
        }
        out
    }
}

/// `_add_unshard_reshard` (schedules.py:1084, `max_active_stages` 3): before each compute
/// action, the stages among the next three distinct ones still to compute that are not
/// unsharded get an UNSHARD, and unsharded stages not among them a RESHARD (in ascending
/// stage order, as CPython iterates a small set of small ints); the stages still unsharded
/// at the end are resharded.
fn add_unshard_reshard(compute: &[Action]) -> Vec<Action> {
    const MAX_ACTIVE: usize = 3;
    let mut active: std::collections::BTreeSet<usize> = Default::default();
    let mut out = Vec::with_capacity(compute.len() + 8);
    for (i, a) in compute.iter().enumerate() {
        let mut next: Vec<usize> = Vec::with_capacity(MAX_ACTIVE);
        for b in &compute[i..] {
            if !next.contains(&b.stage) {
                next.push(b.stage);
                if next.len() == MAX_ACTIVE {
                    break;
                }
            }
        }
        let evict: Vec<usize> = active
            .iter()
            .copied()
            .filter(|s| !next.contains(s))
            .collect();
        for s in evict {
            active.remove(&s);
            out.push(Action::new(s, Op::Reshard, 0));
        }
        for &s in &next {
            if active.insert(s) {
                out.push(Action::new(s, Op::Unshard, 0));
            }
        }
        out.push(*a);
    }
    out.extend(active.iter().map(|&s| Action::new(s, Op::Reshard, 0)));
    out
}

// ---------------------------------------------------------------------------------------------
// Measurement: the schedule's time cut into forward and backward windows.

/// Which phase the current window belongs to, and the merged peaks of each phase.
struct Windows<'m> {
    meter: &'m Meter,
    current: Phase,
    start: u64,
    forward: Option<PhaseMemory>,
    backward: Option<PhaseMemory>,
}

impl<'m> Windows<'m> {
    fn new(meter: &'m Meter) -> Result<Windows<'m>> {
        Ok(Windows {
            meter,
            current: Phase::Forward,
            start: meter.start()?,
            forward: None,
            backward: None,
        })
    }

    fn close(&mut self) -> Result<()> {
        let m = self.meter.finish(self.start)?;
        match self.current {
            Phase::Backward => Meter::merge(&mut self.backward, m),
            _ => Meter::merge(&mut self.forward, m),
        }
        Ok(())
    }

    /// Ends the current window and starts one of `phase`.
    fn enter(&mut self, phase: Phase) -> Result<()> {
        self.close()?;
        self.current = phase;
        self.start = self.meter.start()?;
        Ok(())
    }

    fn peaks(&self) -> [u64; 2] {
        [
            self.forward.map_or(0, |m| m.peak_allocated_bytes),
            self.backward.map_or(0, |m| m.peak_allocated_bytes),
        ]
    }
}

/// A schedule's failure: an allocation or collective error, or the measurement's own.
enum Fail {
    Torch(tch::TchError),
    Other(Error),
}

impl From<tch::TchError> for Fail {
    fn from(e: tch::TchError) -> Fail {
        Fail::Torch(e)
    }
}
impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Other(e)
    }
}

/// `ScheduleGPipe._step_microbatches`: every forward, then every backward; the sends are
/// waited and their Works dropped only when the step returns.
fn gpipe(st: &mut Stage, win: &mut Windows) -> std::result::Result<(), Fail> {
    let mut fwd_sends_to_wait: Vec<Work> = Vec::new();
    let mut output: Option<Tensor> = None;
    for i in 0..st.n {
        win.enter(Phase::Forward)?;
        wait_all(&st.recv_fwd(i)?)?;
        output = Some(st.forward(i)?);
        let out = output.as_ref().expect("just set");
        let sends = st.fwd_sends(out);
        fwd_sends_to_wait.extend(st.fire_fwd(&sends, i)?);
        drop(sends);
        st.compute_loss(i, out)?;
    }
    wait_all(&fwd_sends_to_wait)?;
    let mut bwd_sends_to_wait: Vec<Work> = Vec::new();
    let mut loss: Option<Tensor> = None;
    for i in 0..st.n {
        win.enter(Phase::Backward)?;
        wait_all(&st.recv_bwd(i)?)?;
        loss = st.loss_of(i);
        let grad = st.backward(i, loss.as_ref())?;
        if let Some(g) = grad {
            bwd_sends_to_wait.extend(st.fire_bwd(&[g], i)?);
        }
    }
    wait_all(&bwd_sends_to_wait)?;
    st.update_losses();
    st.perform_reduce_grad()?;
    drop((output, loss, fwd_sends_to_wait, bwd_sends_to_wait));
    Ok(())
}

/// `Schedule1F1B._step_microbatches`: `min(n, pp - stage)` warm-up forwards, then a backward
/// and a forward in turn, then the cool-down backwards; each variable of torch's loop is
/// mirrored by one here, so that the tensors they hold live as long.
fn one_f_one_b(st: &mut Stage, win: &mut Windows, pp: usize) -> std::result::Result<(), Fail> {
    let n = st.n;
    let warmup = n.min(pp - st.index as usize);
    let (mut f, mut b) = (0, 0);
    let mut send_work: Vec<Work> = Vec::new();
    let mut fwd_sends: Vec<Tensor> = Vec::new();
    let mut output: Option<Tensor> = None;
    for _ in 0..warmup {
        win.enter(Phase::Forward)?;
        wait_all(&st.recv_fwd(f)?)?;
        output = Some(st.forward(f)?);
        wait_all(&send_work)?;
        let out = output.as_ref().expect("just set");
        fwd_sends = st.fwd_sends(out);
        if f != warmup - 1 {
            // Safe to fire; the last warm-up send is fused with the first backward's receive.
            send_work = st.fire_fwd(&fwd_sends, f)?;
        }
        st.compute_loss(f, out)?;
        f += 1;
    }
    let mut bwd_sends: Vec<Tensor>;
    let mut loss: Option<Tensor>;
    loop {
        win.enter(Phase::Backward)?;
        let mut works = st.fire_fwd(&fwd_sends, f - 1)?;
        works.extend(st.recv_bwd(b)?);
        wait_all(&works)?;
        drop(works);
        loss = st.loss_of(b);
        let grad = st.backward(b, loss.as_ref())?;
        bwd_sends = grad.into_iter().collect();
        b += 1;
        if f == n {
            break;
        }
        win.enter(Phase::Forward)?;
        let mut works = st.fire_bwd(&bwd_sends, b - 1)?;
        works.extend(st.recv_fwd(f)?);
        wait_all(&works)?;
        drop(works);
        output = Some(st.forward(f)?);
        let out = output.as_ref().expect("just set");
        st.compute_loss(f, out)?;
        fwd_sends = st.fwd_sends(out);
        f += 1;
    }
    send_work = st.fire_bwd(&bwd_sends, b - 1)?;
    while b < n {
        win.enter(Phase::Backward)?;
        wait_all(&st.recv_bwd(b)?)?;
        loss = st.loss_of(b);
        let grad = st.backward(b, loss.as_ref())?;
        wait_all(&send_work)?;
        bwd_sends = grad.into_iter().collect();
        send_work = st.fire_bwd(&bwd_sends, b)?;
        b += 1;
    }
    wait_all(&send_work)?;
    st.update_losses();
    st.perform_reduce_grad()?;
    drop((output, loss, send_work, fwd_sends, bwd_sends));
    Ok(())
}

/// `_PipelineScheduleRuntime._step_microbatches` (schedules.py:2031) over this rank's lowered
/// list (`Layout::lowered`): each action as `_perform_action` runs it. Its local variables
/// (a forward's output, a backward's loss) end with the action; every send's Works go to
/// `send_ops`, which holds them (and their tensors: stage outputs, input gradients) until all
/// actions ran, then waits on them last first; receives are waited on by the forward or
/// backward that reads them. `chunks[k]` is global stage `rank + k x pp`.
fn run_actions(
    chunks: &mut [Stage],
    actions: &[Action],
    pp: usize,
    win: &mut Windows,
) -> std::result::Result<(), Fail> {
    let mut send_ops: Vec<Vec<Work>> = Vec::new();
    let mut fwd_recv_ops: HashMap<(usize, usize), Vec<Work>> = HashMap::new();
    let mut bwd_recv_ops: HashMap<(usize, usize), Vec<Work>> = HashMap::new();
    for a in actions {
        let st = &mut chunks[a.stage / pp];
        let key = (a.stage, a.mb);
        match a.op {
            Op::SendF => {
                // `get_fwd_send_ops`: the cached output.
                let (out, _) = st.fwd_cache[a.mb].as_ref().expect("forward ran first");
                let sends = st.fwd_sends(out);
                send_ops.push(st.fire_fwd(&sends, a.mb)?);
            }
            Op::SendB => {
                // `get_bwd_send_ops` pops the input gradient from `bwd_cache`.
                let grads: Vec<Tensor> = st.bwd_cache[a.mb].take().into_iter().collect();
                send_ops.push(st.fire_bwd(&grads, a.mb)?);
            }
            Op::RecvF => {
                fwd_recv_ops.insert(key, st.recv_fwd(a.mb)?);
            }
            Op::RecvB => {
                bwd_recv_ops.insert(key, st.recv_bwd(a.mb)?);
            }
            Op::Unshard => st.unshard_all()?,
            Op::Reshard => st.reshard_all()?,
            Op::Forward => {
                win.enter(Phase::Forward)?;
                st.assert_unsharded()?;
                if let Some(works) = fwd_recv_ops.remove(&key) {
                    wait_all(&works)?;
                }
                let output = st.forward(a.mb)?;
                st.compute_loss(a.mb, &output)?;
            }
            Op::Backward => {
                win.enter(Phase::Backward)?;
                st.assert_unsharded()?;
                if let Some(works) = bwd_recv_ops.remove(&key) {
                    wait_all(&works)?;
                }
                let loss = st.loss_of(a.mb);
                let grad = st.backward(a.mb, loss.as_ref())?;
                st.bwd_cache[a.mb] = grad;
            }
            Op::ReduceGrad => st.perform_reduce_grad()?,
        }
    }
    while let Some(works) = send_ops.pop() {
        wait_all(&works)?;
    }
    for st in chunks.iter_mut() {
        st.update_losses();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The run.

/// Runs this rank's pipeline stage of `plan` for `opts.steps` steps (see the module doc). The
/// report is this stage's memory; losses and gradient norms are the job's.
pub fn train_stage(
    plan: &Plan,
    opts: &TrainOptions,
    mesh: &std::rc::Rc<Mesh>,
) -> Result<TrainReport> {
    let rt = |e: tch::TchError| Error::runtime(format!("trainer: {e}"));
    if opts.device != super::TrainDevice::Cpu {
        return Err(Error::input(
            "--device cpu under pipelining: stages exchange activations over Gloo",
        ));
    }
    if opts.record_trace {
        return Err(Error::input(
            "--trace is not recorded under pipelining yet (the stage's peaks are reported)",
        ));
    }
    let pg = mesh.pp.as_ref().expect("a pipeline job has a pp group");
    let (stage, pp) = (mesh.stage(), mesh.pp_size());
    let m = &plan.model;
    let v = plan.parallel.pp_virtual_stages;
    let stages = pp * v;
    // This rank's stages: rank + k x pp (torchtitan's "loop" assignment), each split from the
    // model's layers as torchtitan splits them over all the stages.
    let stage_ids: Vec<u64> = (0..v).map(|k| stage + k * pp).collect();
    let (first, last) = (stage == 0, stage_ids.contains(&(stages - 1)));
    let dtype = kind(plan.precision.param);
    let dp_shard = plan.parallel.dp_shard as i64;
    let env = if dp_shard > 1 {
        // FSDP2's MixedPrecisionPolicy(param_dtype, reduce_dtype) over master shards.
        Env {
            device: Device::Cpu,
            compute: dtype,
            reduce: kind(plan.precision.reduce),
            master: kind(plan.precision.master),
            world: dp_shard,
            rank: mesh.shard.rank(),
            peers: false,
            offload: Offload::None,
        }
    } else {
        Env {
            device: Device::Cpu,
            compute: dtype,
            reduce: dtype,
            master: dtype,
            world: 1,
            rank: 0,
            peers: false,
            offload: Offload::None,
        }
    };
    // This rank's place among the data-parallel ranks: which rows of each micro-batch it reads.
    let (dp_rank, dp_world) = (mesh.dp_rank(), mesh.dp_world());
    let _default = ffi::channel(Channel::Device);
    let meter = Meter::new(None)?;
    let _limit = opts.device_limit.map(|limit| {
        let base = ffi::counter(Channel::Device).0;
        ffi::device_limit(Some(base.saturating_add(limit)))
    });
    tch::manual_seed(opts.seed as i64);

    // torchtitan's rotary table, one per stage module.
    let freqs = || model::rotary_table(plan, Device::Cpu);
    // Setup: the whole model's initial weights are drawn in the order the single-process
    // trainer draws them (every block, then the root), so that a stage starts from the same
    // weights; the stage keeps its own.
    let setup_start = meter.start()?;
    let base = ffi::counter(Channel::Device).0 - meter.allocated()?;
    let gloo_high = Rc::new(Cell::new(0u64));
    // One stage's parameters: FSDP2 groups over its blocks and its root, or plain leaves; and
    // its own rotary table (torchtitan's, one per stage module).
    #[allow(clippy::type_complexity)]
    let build_stage_params = |blocks: Vec<(u64, Vec<Tensor>)>,
                              root_kept: Vec<(trace::Module, Tensor)>|
     -> TResult<(Params, Vec<Tensor>, Tensor)> {
        if dp_shard > 1 {
            // `fully_shard` on every block, then on the stage module (its own parameters).
            let mut groups = Vec::new();
            for (i, full) in &blocks {
                let module = trace::Module::Layer(*i as u32);
                let params = full
                    .iter()
                    .map(|t| FsdpParam::new(t, &env, module))
                    .collect::<TResult<Vec<_>>>()?;
                let mut group = Group::new(params, false, module);
                // The block's last-registered parameter in torchtitan's TransformerBlock
                // (attention, feed_forward, attention_norm, ffn_norm): ffn_norm, after the
                // attention norm and the four projections (with their biases) here.
                let linear = |bias: bool| 1 + usize::from(bias);
                group.held_in_reduce = Some(1 + 3 * linear(m.qkv_bias) + linear(m.o_bias));
                groups.push(group);
            }
            if !root_kept.is_empty() {
                let params = root_kept
                    .iter()
                    .map(|(module, t)| FsdpParam::new(t, &env, *module))
                    .collect::<TResult<Vec<_>>>()?;
                let mut group = Group::new(params, false, trace::Module::Root);
                // The stage module registers tok_embeddings, then norm and output.
                group.held_in_reduce = Some(group.params.len() - 1);
                groups.push(group);
            }
            let leaves = groups.iter().flat_map(Group::leaves).collect();
            let comm = Box::new(GlooAccounted {
                inner: dist::C10d { mesh: mesh.clone() },
                base,
                high: gloo_high.clone(),
            });
            return Ok((Params::Fsdp(Fsdp::new(env, groups, comm)), leaves, freqs()?));
        }
        let kept: Vec<Tensor> = blocks
            .into_iter()
            .flat_map(|(_, w)| w)
            .chain(root_kept.into_iter().map(|(_, t)| t))
            .collect();
        let shards = kept
            .iter()
            .map(|t| {
                let p = Tensor::f_empty(t.size().as_slice(), (dtype, Device::Cpu))?;
                tch::no_grad(|| p.shallow_clone().f_copy_(t))?;
                let p = p.f_set_requires_grad(true)?;
                let rows = p.size()[0];
                Ok(Shard {
                    data: p.shallow_clone(),
                    view: p,
                    rows,
                    grad: None,
                    state: Vec::new(),
                    step: None,
                })
            })
            .collect::<TResult<Vec<_>>>()?;
        let leaves = shards.iter().map(|s| s.view.shallow_clone()).collect();
        Ok((Params::Plain(shards), leaves, freqs()?))
    };
    let holds = |g: u64, i: u64| {
        let (f, c) = stage_layers(m.layers, stages, g);
        (f..f + c).contains(&i)
    };
    let built = (|| -> TResult<Vec<(Params, Vec<Tensor>, Tensor)>> {
        let block: Vec<(u64, u64)> = m.block_params().iter().map(|p| (p.rows, p.cols)).collect();
        let block_norms: Vec<bool> = block.iter().map(|&(_, c)| c == 1).collect();
        // The rank's blocks (global index, weights), in layer order, then the root weights.
        let mut blocks: Vec<(u64, Vec<Tensor>)> = Vec::new();
        for i in 0..m.layers {
            let full = init_weights(&block, &block_norms)?;
            if stage_ids.iter().any(|&g| holds(g, i)) {
                blocks.push((i, full));
            }
        }
        let root: Vec<(u64, u64)> = m.root_params().iter().map(|p| (p.rows, p.cols)).collect();
        let root_norms: Vec<bool> = root.iter().map(|&(_, c)| c == 1).collect();
        // ModelSpec::root_params: tok_embeddings (stage 0's), the final norm and the output
        // projection (the last stage's).
        let mut root_full: Vec<Option<Tensor>> = init_weights(&root, &root_norms)?
            .into_iter()
            .map(Some)
            .collect();
        let modules = [
            trace::Module::TokEmbeddings,
            trace::Module::Norm,
            trace::Module::Output,
        ];
        let mut out = Vec::with_capacity(stage_ids.len());
        for &g in &stage_ids {
            let count = stage_layers(m.layers, stages, g).1 as usize;
            let blocks: Vec<(u64, Vec<Tensor>)> = blocks.drain(..count).collect();
            let root_kept: Vec<(trace::Module, Tensor)> = (0..3)
                .filter(|&k| if k == 0 { g == 0 } else { g + 1 == stages })
                .filter_map(|k| root_full[k].take().map(|t| (modules[k], t)))
                .collect();
            out.push(build_stage_params(blocks, root_kept)?);
        }
        Ok(out)
    })()
    .map_err(rt)?;
    let setup = meter.finish(setup_start)?;

    let n = plan.batch.grad_accum_steps as usize;
    let mut chunks: Vec<Stage> = built
        .into_iter()
        .zip(&stage_ids)
        .map(|((params, leaves, freqs), &g)| Stage {
            hooks: Box::new(Hooks(RefCell::new(StageModel {
                spec: m.clone(),
                dims: Dims::new(m),
                flavor: Flavor {
                    gqa: plan.implementation.gqa,
                    logits: plan.implementation.logits,
                },
                freqs,
                leaves,
                per_block: m.block_params().iter().count(),
                blocks: stage_layers(m.layers, stages, g).1 as usize,
                first: g == 0,
                last: g + 1 == stages,
                ckpt: HashMap::new(),
                params,
                error: None,
            }))),
            pg,
            index: g as i64,
            pp: pp as i64,
            n,
            mbs: plan.batch.micro_batch_size as i64,
            ac: plan.activation_checkpointing,
            act_bufs: Vec::new(),
            grad_bufs: Vec::new(),
            fwd_cache: (0..n).map(|_| None).collect(),
            bwd_cache: (0..n).map(|_| None).collect(),
            unshard_pending: false,
            internal_losses: Vec::new(),
            tokens: None,
            labels: None,
            losses: Vec::new(),
        })
        .collect();
    let last_chunk = chunks.len() - 1;
    // A multi-stage schedule's list of actions on this rank, as torch lowers it.
    let actions = (plan.parallel.pp_schedule == PpSchedule::Interleaved1F1B).then(|| {
        let layout = Layout {
            pp: pp as usize,
            v: v as usize,
            n,
        };
        layout
            .lowered(|r| layout.interleaved_1f1b(r))
            .swap_remove(stage as usize)
    });
    let cfg = OptConfig {
        kind: plan.optimizer,
        imp: plan.implementation.optimizer,
        lr: opts.lr.unwrap_or_else(|| default_lr(m.hidden)),
    };
    let (b, s) = (plan.batch.micro_batch_size, plan.batch.seq_len);

    let mut steps = Vec::new();
    let mut oom = None;
    let started = Instant::now();
    let mut tokens_done = 0u64;
    // The last step's highest bytes inside a reduce-scatter, with Gloo's own (GlooAccounted).
    let mut gloo_steady = 0u64;
    for step in 1..=opts.steps {
        if opts.abort_at_step == Some(step) {
            eprintln!("error: aborting at step {step} (fault injection)");
            std::process::abort();
        }
        // `opt.zero_grad()`: gradients set to None.
        for st in &chunks {
            st.hooks
                .0
                .borrow_mut()
                .params
                .shards_mut()
                .into_iter()
                .for_each(|sh| sh.grad = None);
        }
        pg.barrier().map_err(rt)?;
        gloo_high.set(0);
        let mut win = Windows::new(&meter)?;
        let r = (|| -> std::result::Result<(), Fail> {
            // The step's whole batch: micro-batch k is the single-process trainer's
            // micro-batch k of the step (same seed, same index), made uncounted, then one
            // counted copy of the inputs (first stage) or the labels (last stage).
            let toks = {
                let _off = ffi::channel(Channel::Off);
                let mut all = Vec::with_capacity(n * (b * (s + 1)) as usize);
                let row = (s + 1) as usize;
                let mine =
                    dp_rank as usize * b as usize * row..(dp_rank + 1) as usize * b as usize * row;
                for k in 0..n as u64 {
                    // This rank's rows of the global micro-batch of dp x b rows (as the
                    // single-process trainer's batch_on_device).
                    let global = synthetic_tokens(
                        opts.seed,
                        (step - 1) * n as u64 + k,
                        b * dp_world,
                        s,
                        m.vocab,
                    );
                    all.extend_from_slice(&global[mine.clone()]);
                }
                Tensor::from_slice(&all).f_view([(n as u64 * b) as i64, s as i64 + 1])?
            };
            if first {
                // `inp = toks[:, :-1].clone()`: the new tensor, then the old one freed.
                chunks[0].tokens =
                    Some(env.copy_to(&toks.f_narrow(1, 0, s as i64)?, Place::Device)?);
            }
            if last {
                chunks[last_chunk].labels =
                    Some(env.copy_to(&toks.f_narrow(1, 1, s as i64)?, Place::Device)?);
                // `losses = []`
                chunks[last_chunk].losses.clear();
            }
            drop(toks);
            // Every stage's forward infrastructure, then every stage's backward one.
            for st in chunks.iter_mut() {
                st.make_act_buffers(dtype, m.hidden as i64, s as i64)?;
            }
            for st in chunks.iter_mut() {
                st.make_grad_buffers(dtype, m.hidden as i64, s as i64)?;
            }
            match (plan.parallel.pp_schedule, &actions) {
                (PpSchedule::GPipe, _) => gpipe(&mut chunks[0], &mut win)?,
                (_, Some(actions)) => run_actions(&mut chunks, actions, pp as usize, &mut win)?,
                _ => one_f_one_b(&mut chunks[0], &mut win, pp as usize)?,
            }
            Ok(())
        })();
        win.close()?;
        let [fwd_peak, bwd_peak] = win.peaks();
        match r {
            Ok(()) => {}
            Err(Fail::Torch(e)) if is_oom(&e) => {
                oom = Some(OomReport {
                    step,
                    phase: win.current,
                    message: first_line(&e),
                    peak_allocated_bytes: [fwd_peak, bwd_peak, 0],
                });
                break;
            }
            Err(Fail::Torch(e)) => return Err(rt(e)),
            Err(Fail::Other(e)) => return Err(e),
        }

        // The job's gradient norm and loss (uncounted).
        let (norm, loss) = (|| -> TResult<(f64, f64)> {
            let _off = ffi::channel(Channel::Off);
            let mut sq = 0.0;
            let mut loss = 0.0;
            for st in &chunks {
                let mut model = st.hooks.0.borrow_mut();
                for g in model
                    .params
                    .shards_mut()
                    .into_iter()
                    .filter_map(|sh| sh.grad.as_ref())
                {
                    sq += g
                        .f_to_kind(Kind::Double)?
                        .f_square()?
                        .f_sum(Kind::Double)?
                        .f_double_value(&[])?;
                }
                for l in &st.losses {
                    loss += l.f_double_value(&[])? / n as f64;
                }
            }
            // Every rank holds its own shards; each data-parallel position's last stage the
            // loss of its rows.
            let t = Tensor::from_slice(&[sq, loss]);
            mesh.all_reduce_sum(&t)?;
            Ok((
                t.f_double_value(&[0])?.sqrt(),
                t.f_double_value(&[1])? / dp_world as f64,
            ))
        })()
        .map_err(rt)?;

        let warmup = (opts.steps / 10).max(1);
        let cfg = OptConfig {
            lr: cfg.lr * (step.min(warmup) as f64 / warmup as f64),
            ..cfg
        };
        let start = meter.start()?;
        // One optimizer over every stage of the rank, in stage order.
        let mut models: Vec<_> = chunks.iter().map(|st| st.hooks.0.borrow_mut()).collect();
        let mut all: Vec<&mut Shard> = models
            .iter_mut()
            .flat_map(|m| m.params.shards_mut())
            .collect();
        let r = optim::step(&cfg, &env, &mut all, false);
        drop(all);
        drop(models);
        let opt = meter.finish(start)?;
        match r {
            Ok(()) => {}
            Err(e) if is_oom(&e) => {
                oom = Some(OomReport {
                    step,
                    phase: Phase::Optimizer,
                    message: first_line(&e),
                    peak_allocated_bytes: [fwd_peak, bwd_peak, opt.peak_allocated_bytes],
                });
                break;
            }
            Err(e) => return Err(rt(e)),
        }
        let (forward, backward) = (
            win.forward.unwrap_or_default(),
            win.backward.unwrap_or_default(),
        );
        gloo_steady = gloo_high.get();
        steps.push(StepReport::of_phases(
            step, loss, norm, forward, backward, opt,
        ));
        tokens_done += n as u64 * b * s;
        if opts.progress_lines {
            eprintln!("memplan-progress {step} {} {loss}", opts.steps);
        }
    }
    drop(chunks);
    let elapsed = started.elapsed().as_secs_f64();
    let mut notes = vec![
        format!(
            "rank {} of a {}-process pipeline over c10d Gloo: {} of {stages}{}{}, {} schedule \
             over {n} micro-batches; {}",
            mesh.env.rank,
            mesh.env.world,
            stage_ids
                .iter()
                .map(|&g| {
                    let (f, c) = stage_layers(m.layers, stages, g);
                    format!("stage {g} (layers {f}..{})", f + c)
                })
                .collect::<Vec<_>>()
                .join(" and "),
            if first { ", the embedding" } else { "" },
            if last {
                ", the final norm and output"
            } else {
                ""
            },
            plan.parallel.pp_schedule,
            if dp_shard > 1 {
                format!(
                    "FSDP2 over the stage's {dp_shard} data-parallel ranks (shard rank {}), \
                     unsharded and unreduced until the schedule's end",
                    env.rank
                )
            } else {
                "no FSDP inside the stage".to_string()
            },
        ),
        "forward and backward: the schedule's time cut at each forward and backward action \
         (receives included); every figure is this stage's"
            .into(),
        "CPU run: exact live bytes of a counting allocator (requested sizes); torch.optim's \
         step scalars are counted as host bytes, as on a GPU"
            .into(),
    ];
    if let (true, Some(s)) = (dp_shard > 1, steps.last()) {
        notes.push(format!(
            "on Gloo, whose reduce-scatter clones its input, torch's steady step here would peak \
             at {} bytes (Gloo reduce-scatter peak)",
            s.peak_allocated_bytes.max(gloo_steady)
        ));
    }
    Ok(TrainReport {
        model: m.name.clone(),
        device: opts.device,
        dp_shard: plan.parallel.dp_shard,
        rank: mesh.env.rank,
        processes: mesh.env.world,
        pp_stage: Some(stage),
        steps_requested: opts.steps,
        steps_completed: steps.len() as u64,
        setup_allocated_bytes: setup.end_allocated_bytes,
        setup_host_bytes: meter.host(),
        first_step: steps.first().cloned(),
        steady_step: steps.last().cloned(),
        losses: steps.iter().map(|s| s.loss).collect(),
        peak_allocated_bytes: steps_peak(&steps, |p| p.peak_allocated_bytes),
        peak_reserved_bytes: None,
        peak_host_bytes: steps_peak(&steps, |p| p.peak_host_bytes),
        tokens_per_second: tokens_per_second(tokens_done, elapsed),
        oom,
        notes,
        steps,
        trace: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch 2.11's own lowered lists (`pipelining_reference.py --ir`), rank by rank.
    fn torch_lists(schedule: &str) -> Vec<(Layout, usize, String)> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/pipelining_ir_torch_2.11.txt"
        );
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let mut w = l.splitn(6, ' ');
                (w.next()? == schedule).then(|| {
                    let mut num = || w.next().unwrap().parse::<usize>().unwrap();
                    let (pp, v, n, rank) = (num(), num(), num(), num());
                    (Layout { pp, v, n }, rank, w.next().unwrap().to_string())
                })
            })
            .collect()
    }

    fn show(actions: &[Action]) -> String {
        actions
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn interleaved_1f1b_lists_are_torchs_action_for_action() {
        let cases = torch_lists("interleaved-1f1b");
        assert_eq!(cases.len(), 38);
        for (layout, rank, torch) in cases {
            let ours = layout.lowered(|r| layout.interleaved_1f1b(r));
            assert_eq!(show(&ours[rank]), torch, "{layout:?} rank {rank}");
        }
    }

    /// A tiny-deep plan of `pp` ranks x `dp` FSDP ranks, `v` stages per rank, `n` micro-batches.
    fn plan(schedule: &str, pp: u64, dp: u64, v: u64, n: u64) -> Plan {
        let json = format!(
            r#"{{"model":"tiny-deep","gpu":"cpu","num_gpus":{},
                "parallel":{{"pp":{pp},"dp_shard":{dp},"pp_schedule":"{schedule}",
                             "pp_virtual_stages":{v}}},
                "batch":{{"micro_batch_size":1,"seq_len":64,"grad_accum_steps":{n}}},
                "precision":{{"param":"fp32","master":"fp32","reduce":"fp32"}},
                "implementation":{{"logits":"float-output"}}}}"#,
            pp * dp
        );
        let f: crate::plan::PlanFile = serde_json::from_str(&json).unwrap();
        f.resolve().unwrap()
    }

    #[test]
    fn refuses_the_interleaved_plans_torch_or_this_trainer_does_not_run() {
        let il = "interleaved-1f1b";
        let refused = |p: Plan, field: &str| {
            let e = check(&p).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        };
        check(&plan(il, 2, 1, 4, 4)).unwrap();
        check(&plan(il, 4, 1, 2, 2)).unwrap();
        check(&plan(il, 2, 2, 3, 4)).unwrap();
        // Rounds of max(1, n / pp) micro-batches: 10 over 4 ranks is 2 rounds of 5; 9 over 2
        // ranks would be 4 rounds, which do not divide 9 (torch's ValueError).
        check(&plan(il, 4, 1, 2, 10)).unwrap();
        refused(plan(il, 2, 1, 2, 9), "batch.grad_accum_steps");
        // FSDP with a fourth stage on the rank: torch's runtime reshards it mid-schedule.
        refused(plan(il, 2, 2, 4, 4), "parallel.pp_virtual_stages");
        refused(plan("zb-h1", 2, 1, 1, 4), "parallel.pp_schedule");
    }

    #[test]
    fn stages_split_layers_as_torchtitan_with_the_remainder_first() {
        let split: Vec<_> = (0..4).map(|s| stage_layers(10, 4, s)).collect();
        assert_eq!(split, vec![(0, 3), (3, 3), (6, 2), (8, 2)]);
        let total: u64 = split.iter().map(|&(_, c)| c).sum();
        assert_eq!(total, 10);
    }
}
