//! Tensor parallelism across processes: the ranks of a `tp`-rank job each hold a shard of every
//! projection, as torchtitan's `apply_tp` lays a Llama out with DTensor (torch 2.11,
//! `parallelize_module`), with or without sequence parallelism and loss parallelism, with or
//! without full activation checkpointing (every block recomputed in its backward, its
//! collectives included, as torch's `checkpoint_wrapper`), alone or under FSDP2 on a 2-D
//! `(dp_shard, tp)` mesh (torchtitan's `apply_fsdp` after `apply_tp`, with or without full
//! AC: `checkpoint_wrapper` inside `fully_shard`, so the recompute runs no FSDP hook).
//!
//! # What a rank holds (`tp_reference.py` next to this file)
//! - `tok_embeddings`: RowwiseParallel, the table's rows `[r V/tp, (r+1) V/tp)`.
//! - wq, wk, wv, w1, w3, output: ColwiseParallel, rows (output features) split; wo, w2:
//!   RowwiseParallel, columns (input features) split, each shard a contiguous tensor.
//! - The norms, whole on every rank: torchtitan's NoParallel without SP (activations whole),
//!   SequenceParallel with it (activations `(b, s/tp, h)`, the weight's gradient a Partial
//!   sum over the ranks' sequence shards, which torch.optim's DTensor ops all-reduce; here it
//!   is all-reduced in place once after the backward).
//!
//! # The collectives, and what DTensor allocates around them
//! Autograd crosses them through custom nodes ([`ffi::checkpoint_link`]) whose backward calls
//! back into this module:
//! - A row-parallel output (wo, w2) is a partial sum, made whole by `funcol.all_reduce`: a
//!   clone, reduced in place; the partial result is freed with the module's return. Its
//!   backward passes the gradient on (Replicate to Partial is local).
//! - The input of the column-parallel projections (attention: wq, wk, wv; feed-forward: w1,
//!   w3; the output projection) is `DTensor.from_local(x, Replicate)`. Each projection's
//!   input gradient is a Partial DTensor; autograd sums them out of place (a tensor subclass is
//!   never accumulated in place, `InputBuffer::accumulate`), and the sum is all-reduced into a
//!   clone (`_FromTorchTensor.backward`, Partial to Replicate). Here each projection reads its
//!   own branch, whose node adds the arriving gradient to the site's running sum out of place;
//!   the last one all-reduces it.
//! - The embedding (`_MaskPartial`): rows outside the shard are looked up at index 0 of a
//!   shifted copy of the ids and zeroed, then all-reduced into a clone. Its backward is
//!   `embedding_dense_backward` on Replicate DTensors: the whole `(V, h)` gradient, which the
//!   optimizer reads as its rows' shard (a view of it) and which lives until `zero_grad`.
//! - The output projection's Shard(-1) logits are all-gathered to Replicate
//!   (`funcol.all_gather_tensor`: a `(tp b, s, V/tp)` buffer, then `cat` of its chunks along
//!   the vocabulary into `(b, s, V)`); the backward takes this rank's vocabulary slice of the
//!   logits' gradient as a clone (`_replicate_to_shard`).
//!
//!
//! With sequence parallelism (`Shard(1)` between the modules):
//! - `PrepareModuleInput(Shard(1) -> Replicate)` all-gathers the normalised sequence shard
//!   (`funcol.all_gather_tensor`: a `(tp b, s/tp, h)` buffer, then `cat` along the sequence);
//!   the whole is what the column-parallel projections save. The backward reduce-scatters the
//!   summed input gradient (Partial to Shard(1)).
//! - A row-parallel output, and the embedding's, is reduce-scattered
//!   (`funcol.reduce_scatter_tensor` along dim 1: `cat(chunk(x, tp, 1))`, a full-size copy,
//!   then the `(b, s/tp, h)` output); its backward all-gathers the gradient.
//!
//! Loss parallelism (`tensor/parallel/loss.py`): the Shard(-1) logits stay local, and the
//! cross-entropy is `_log_softmax` (all-reduces of the row max and of the summed exponentials)
//! and `_nll_loss_forward` (the target's logit through `_MaskPartial`, all-reduced), tensor for
//! tensor in one custom node, which keeps what NllLossBackward keeps (the log-softmax of the
//! shard and `total_weight`). Its backward is `_nll_loss_and_log_softmax_backward`: the
//! `zeros_like` gradient, the shifted targets and their mask, `exp` of the log-softmax and the
//! sum beside it (16 bytes per logit of the shard at once).
//!
//! Gloo's all-reduce works in place; an all-gather is issued as one broadcast per rank into
//! slices of the gather buffer, a reduce-scatter as an all-reduce of the chunk-cat copy (which
//! funcol makes anyway) and a copy of this rank's chunk. None allocates on the counted threads.
//!
//! # TP x FSDP (dp_shard > 1)
//! Rank = dp_rank x tp + tp_rank (TP innermost, [`Mesh::join`]); the TP ranks of one
//! data-parallel rank read its rows of the batch. As `tp_reference.py` runs it, `fully_shard`
//! over the dp_shard ranks goes on every block (resharded after forward, the last one not)
//! and on the root (embedding, final norm, output), after TP, so FSDP shards each DTensor
//! parameter's local tensor on dim 0 (`_fsdp_param.py`; the 2-D placements are e.g.
//! `(Shard(0), Replicate())` for the norms, `(_StridedShard(0, sf=2), Shard(0))` for the
//! embedding and the other row-split weights): [`fsdp`]'s
//! groups over the TP shards, unchanged, with what FSDP2 does differently for DTensors here
//! ([`FsdpRun`]):
//! - With `implementation.fsdp_units` root-resharded-keep-last (what the reference runs) the
//!   root is resharded after forward: torchtitan passes `reshard_after_forward=True`
//!   explicitly for it (not pipelining), and torch 2.11 keeps the root unsharded only when the
//!   setting is left to it (`_fsdp_state.py:193`). Its pre-backward hook, on the model's output,
//!   gathers it again once the loss's backward has reached the logits
//!   (`_fsdp_state.py:282, 356-362`), so the loss's backward runs without it. With
//!   root-keep-last (torch of 2024, FSDP2's automatic setting) the root stays gathered.
//! - Backward prefetch (`_fsdp_param_group.py:634-647`): each pre-backward all-gathers the
//!   group whose post-forward came before its own; the root's is the last block, kept
//!   unsharded, so it prefetches nothing.
//! - Post-backward reads each gradient in its parameter's TP placements
//!   (`_fsdp_param.py:818-832`): under SP a norm's Partial gradient is all-reduced into a clone
//!   (what the optimizer did without FSDP), and the embedding's whole `(V, h)` gradient becomes
//!   a clone of this rank's rows (`_replicate_to_shard`, `placement_types.py:401-419`); then
//!   `.grad = None` frees the original.
//! - Gloo's own temporaries, which the reference counts (it counts every thread) and this
//!   trainer's uncounted Gloo threads do not make, are made on the training thread for the same
//!   span ([`fsdp::GlooShard`]): `_allgather_base`'s flat buffer of the whole output, for the span of
//!   every FSDP all-gather; `reduce_scatter_tensor_coalesced`'s clone of the whole input, for the
//!   span of every reduce-scatter. The first is in the small model's peak (a pre-backward's
//!   prefetch); NCCL makes neither. The TP collectives' Gloo buffers are not mirrored: no
//!   steady-step phase peaks there, and a late free of one of them on a Gloo thread is what
//!   makes a run of the reference a `(b, s, h)` buffer higher now and then.
//!
//! # Known differences from torch, kept
//! - torch.optim's `state["step"]` scalars (4 bytes per parameter tensor) are CPU tensors,
//!   counted as device bytes by the CPU reference and as host bytes here (as on a GPU).
//! - c10d's `ProcessGroup::barrier` keeps a 1-byte tensor that the reference's
//!   `dist.barrier()` makes; this trainer's barriers go to the Gloo backend directly.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use super::dist::{Mesh, ProcessGroup};
use super::ffi::{self, Channel};
use super::fsdp::{self, shim, Env, Fsdp, FsdpParam, Group, Place, Shard};
use super::memory::{Meter, PhaseMemory};
use super::model::{self, BlockWeights, Collectives, Dims, Flavor, Site, TResult};
use super::optim::{self, OptConfig};
use super::{
    checkpointed, default_lr, first_line, init_weights, is_oom, steps_peak, synthetic_tokens,
    tokens_per_second, unsupported, OomReport, Phase, StepReport, TrainOptions, TrainReport,
};
use crate::error::{Error, Result};
use crate::plan::{Checkpointing, DType, FsdpUnits, Logits, Offload, Plan};
use crate::trace::Module;

/// Refuses what the tensor-parallel trainer does not run, with the reason (the caller has
/// refused what no trainer runs).
pub fn check(plan: &Plan) -> Result<()> {
    let p = &plan.parallel;
    let m = &plan.model;
    if p.pp != 1 || p.dp_replicate != 1 {
        return Err(unsupported(
            "parallel.pp x dp_replicate",
            p.pp * p.dp_replicate,
            "1 under tensor parallelism: TP x HSDP and TP x PP are not run yet",
        ));
    }
    if p.dp_shard > 1
        && !matches!(
            plan.implementation.fsdp_units,
            FsdpUnits::RootKeepLast | FsdpUnits::RootReshardedKeepLast
        )
    {
        return Err(unsupported(
            "implementation.fsdp_units",
            format!("\"{}\"", plan.implementation.fsdp_units),
            "root-keep-last or root-resharded-keep-last under TP x FSDP (torchtitan's \
             units: a block each, and the root)",
        ));
    }
    if plan.implementation.loss_parallel && plan.implementation.logits != Logits::FloatOutput {
        return Err(unsupported(
            "implementation.logits",
            format!("\"{}\"", plan.implementation.logits),
            "float-output under loss parallelism",
        ));
    }
    for (what, n) in [
        ("heads", m.heads),
        ("kv_heads", m.kv_heads),
        ("intermediate size", m.intermediate),
        ("vocabulary", m.vocab),
        ("hidden size", m.hidden),
    ] {
        if n % p.tp != 0 {
            return Err(unsupported(
                "parallel.tp",
                p.tp,
                &format!("a divisor of the model's {what} ({n})"),
            ));
        }
    }
    if p.sp && plan.batch.seq_len % p.tp != 0 {
        return Err(unsupported(
            "batch.seq_len",
            plan.batch.seq_len,
            &format!("a multiple of tp = {} under sequence parallelism", p.tp),
        ));
    }
    if m.tied_embeddings || m.qkv_bias || m.o_bias || m.mlp_bias {
        return Err(unsupported(
            "model",
            &m.name,
            "untied embeddings and bias-free projections under tensor parallelism",
        ));
    }
    if !matches!(
        plan.activation_checkpointing,
        Checkpointing::None | Checkpointing::Full
    ) {
        return Err(unsupported(
            "activation_checkpointing",
            format!("\"{}\"", plan.activation_checkpointing),
            "none or full under tensor parallelism",
        ));
    }
    if plan.offload != Offload::None {
        return Err(unsupported(
            "offload",
            format!("\"{}\"", plan.offload),
            "none under tensor parallelism",
        ));
    }
    if !matches!(
        plan.implementation.logits,
        Logits::FloatOutput | Logits::ComputeDtype
    ) {
        return Err(unsupported(
            "implementation.logits",
            format!("\"{}\"", plan.implementation.logits),
            "float-output or compute-dtype under tensor parallelism",
        ));
    }
    let pr = &plan.precision;
    if pr.param != DType::Fp32 || pr.master != DType::Fp32 || pr.reduce != DType::Fp32 {
        return Err(unsupported(
            "precision",
            format!(
                "param {} with master {} and reduce {}",
                pr.param, pr.master, pr.reduce
            ),
            "fp32 parameters and reductions under tensor parallelism",
        ));
    }
    Ok(())
}

/// Kinds of custom node, in the low 3 bits of a tag; then the branch count (3 bits), then the
/// site.
const COLUMN_INPUT: i64 = 0;
const ROW_OUTPUT: i64 = 1;
const GATHER_VOCAB: i64 = 2;
const EMBEDDING: i64 = 3;
const LOSS: i64 = 4;

/// What the forward and the backward callbacks share.
struct TpState {
    pg: *const ProcessGroup,
    tp: i64,
    rank: i64,
    vocab: i64,
    /// Sequence parallelism: activations between the projections are sequence shards.
    sp: bool,
    /// What loss parallelism's NllLossBackward keeps: the log-softmax of the logits' shard,
    /// the flattened labels and `total_weight`.
    loss_saved: Option<(Tensor, Tensor, Tensor)>,
    /// The column-parallel inputs' running gradient sums, by site tag: (arrivals, sum).
    pending: HashMap<i64, (usize, Option<Tensor>)>,
    /// The step's token ids (the embedding's saved indices).
    tokens: Option<Tensor>,
    /// The embedding's whole (V, h) gradient, from its backward.
    embedding_grad: Option<Tensor>,
    error: Option<tch::TchError>,
}

impl TpState {
    fn pg(&self) -> &ProcessGroup {
        // SAFETY: the mesh outlives the run (train_tp borrows it for its whole body).
        unsafe { &*self.pg }
    }

    /// The sequence's length over a block input's (tp under sequence parallelism).
    fn seq_factor(&self) -> i64 {
        if self.sp {
            self.tp
        } else {
            1
        }
    }

    /// `funcol.all_gather_tensor(x, gather_dim=1)`: a `(tp b, s/tp, ...)` buffer gathered
    /// (one broadcast per rank on Gloo), then `cat` of its chunks along the sequence.
    fn all_gather_seq(&self, local: &Tensor) -> TResult<Tensor> {
        let _ng = tch::no_grad_guard();
        let mut shape = local.size();
        let b = shape[0];
        shape[0] *= self.tp;
        let buf = Tensor::f_empty(shape.as_slice(), (local.kind(), Device::Cpu))?;
        buf.f_narrow(0, self.rank * b, b)?.f_copy_(local)?;
        for r in 0..self.tp {
            self.pg().broadcast(&buf.f_narrow(0, r * b, b)?, r)?;
        }
        let chunks = buf.f_chunk(self.tp, 0)?;
        let whole = Tensor::f_cat(&chunks, 1)?;
        drop((chunks, buf));
        Ok(whole)
    }

    /// `funcol.reduce_scatter_tensor(x, "sum", scatter_dim=1)`: `cat(chunk(x, tp, 1))` (a
    /// full-size copy), reduced, and this rank's chunk of it as the new output. On Gloo the
    /// copy is all-reduced in place and the chunk copied out.
    fn reduce_scatter_seq(&self, whole: &Tensor) -> TResult<Tensor> {
        let _ng = tch::no_grad_guard();
        let chunks = whole.f_chunk(self.tp, 1)?;
        let cat = Tensor::f_cat(&chunks, 0)?;
        drop(chunks);
        self.pg().all_reduce_sum(&cat)?;
        let b = whole.size()[0];
        let out = clone(&cat.f_narrow(0, self.rank * b, b)?)?;
        drop(cat);
        Ok(out)
    }

    /// `_MaskPartial._partition_value(t)` for the vocabulary shard of this rank: the mask of
    /// ids outside it and the ids shifted into it, the masked ones set to 0.
    fn partition(&self, t: &Tensor) -> TResult<(Tensor, Tensor)> {
        let _ng = tch::no_grad_guard();
        let n = self.vocab / self.tp;
        let lo = self.rank * n;
        let mask = {
            let below = t.f_lt(lo)?;
            let above = t.f_ge(lo + n)?;
            below.f_logical_or(&above)?
        };
        let masked = {
            let c = clone(t)?;
            c.f_sub_scalar(lo)?
        };
        let masked =
            masked
                .shallow_clone()
                .f_index_put_(&[Some(&mask)], &Tensor::from(0i64), false)?;
        Ok((mask, masked))
    }

    /// Loss parallelism's forward (`tensor/parallel/loss.py`: `_log_softmax`, then
    /// `_nll_loss_forward` with mean reduction), on the logits' vocabulary shard `x`
    /// (`(b s, V/tp)`); keeps what NllLossBackward saves and returns the loss.
    fn parallel_loss(&mut self, x: &Tensor, target: &Tensor) -> TResult<Tensor> {
        let _ng = tch::no_grad_guard();
        // _log_softmax: its locals (the reduced max and sum of exponentials among them) live
        // until it returns.
        let logp = {
            let x_max = {
                let m = x.f_amax(&[1i64][..], true)?;
                let r = clone(&m)?;
                drop(m);
                self.pg().all_reduce_max(&r)?;
                r
            };
            let shifted = x.f_sub(&x_max)?;
            let sumexp = {
                let e = shifted.f_exp()?;
                e.f_sum_dim_intlist(&[1i64][..], true, None::<Kind>)?
            };
            let sumexp = {
                let r = clone(&sumexp)?;
                drop(sumexp);
                self.pg().all_reduce_sum(&r)?;
                r
            };
            let lse = sumexp.f_log()?;
            let result = shifted.f_sub(&lse)?;
            drop((lse, sumexp, shifted, x_max));
            result
        };
        // _nll_loss_forward
        let (loss, total_weight) = {
            let safe = {
                let ne = target.f_ne(-100)?;
                target.f_where_scalarother(&ne, 0)?
            };
            let safe_ = safe.f_unsqueeze(1)?;
            let (mask, masked) = self.partition(&safe_)?;
            let partial = logp.f_gather(1, &masked, false)?;
            drop(masked);
            let partial =
                partial
                    .shallow_clone()
                    .f_index_put_(&[Some(&mask)], &Tensor::from(0f32), false)?;
            drop(mask);
            let reduced = clone(&partial)?;
            drop(partial);
            self.pg().all_reduce_sum(&reduced)?;
            let result = reduced.f_squeeze_dim(1)?.f_neg()?;
            drop(reduced);
            let result = {
                let ne = target.f_ne(-100)?;
                result.f_where_scalarother(&ne, 0)?
            };
            drop((safe_, safe));
            let total_weight = {
                let ne = target.f_ne(-100)?;
                let n = ne.f_sum(Kind::Int64)?;
                drop(ne);
                n.f_to_kind(Kind::Float)?
            };
            let sum = result.f_sum(Kind::Float)?;
            drop(result);
            let loss = sum.f_div(&total_weight)?;
            drop(sum);
            (loss, total_weight)
        };
        self.loss_saved = Some((logp, target.shallow_clone(), total_weight));
        Ok(loss)
    }

    /// `_nll_loss_and_log_softmax_backward` (mean reduction, no weight), tensor for tensor.
    fn parallel_loss_backward(&mut self, grad_output: Tensor) -> TResult<Tensor> {
        let _ng = tch::no_grad_guard();
        let (x, target, total_weight) = self.loss_saved.take().expect("the loss ran forward");
        let grad_output = {
            let g = grad_output.f_div(&total_weight)?;
            drop(grad_output);
            g
        };
        let target = target.f_unsqueeze(1)?;
        let safe = {
            let ne = target.f_ne(-100)?;
            target.f_where_scalarother(&ne, 0)?
        };
        let grad_input = x.f_zeros_like()?;
        let flat = safe.f_squeeze_dim(1)?.f_flatten(0, -1)?;
        let (mask, masked) = self.partition(&flat)?;
        let grad_update = {
            let m = mask.f_to_kind(grad_input.kind())?;
            m.f_sub_scalar(1.0)?
        };
        let arange = Tensor::f_arange(masked.size()[0], (Kind::Int64, Device::Cpu))?;
        let grad_input = grad_input.shallow_clone().f_index_put_(
            &[Some(&arange), Some(&masked)],
            &grad_update,
            false,
        )?;
        let grad_output = {
            let ne = target.f_ne(-100)?;
            let g = grad_output.f_where_scalarother(&ne, 0)?;
            drop((ne, grad_output));
            g
        };
        let sum = {
            let e = x.f_exp()?;
            grad_input.f_add(&e)?
        };
        drop(grad_input);
        let out = sum.f_mul(&grad_output)?;
        drop((
            sum,
            grad_output,
            arange,
            grad_update,
            masked,
            mask,
            flat,
            safe,
            target,
        ));
        drop((x, total_weight));
        Ok(out)
    }

    fn backward(&mut self, tag: i64, grad: Tensor) -> TResult<Option<Tensor>> {
        match tag & 7 {
            COLUMN_INPUT => {
                let n = ((tag >> 3) & 7) as usize;
                let site = tag >> 6;
                let entry = self.pending.entry(site).or_insert((0, None));
                entry.0 += 1;
                // InputBuffer::accumulate of a tensor subclass: `old + new`, out of place.
                let sum = match entry.1.take() {
                    None => grad,
                    Some(old) => {
                        let s = old.f_add(&grad)?;
                        drop((old, grad));
                        s
                    }
                };
                if entry.0 < n {
                    entry.1 = Some(sum);
                    return Ok(None);
                }
                self.pending.remove(&site);
                if self.sp {
                    // Partial to Shard(1): a reduce-scatter along the sequence.
                    let out = self.reduce_scatter_seq(&sum)?;
                    drop(sum);
                    return Ok(Some(out));
                }
                // `_FromTorchTensor.backward`: Partial to Replicate, `funcol.all_reduce`.
                let reduced = clone(&sum)?;
                drop(sum);
                self.pg().all_reduce_sum(&reduced)?;
                Ok(Some(reduced))
            }
            // Shard(1) to Replicate under SP: an all-gather; Replicate to Partial: local.
            ROW_OUTPUT if self.sp => {
                let whole = self.all_gather_seq(&grad)?;
                drop(grad);
                Ok(Some(whole))
            }
            ROW_OUTPUT => Ok(Some(grad)),
            LOSS => self.parallel_loss_backward(grad).map(Some),
            GATHER_VOCAB => {
                let v = grad.size().last().copied().unwrap_or(0) / self.tp;
                let mine = clone(&grad.f_narrow(-1, self.rank * v, v)?)?;
                drop(grad);
                Ok(Some(mine))
            }
            _ => {
                let grad = if self.sp {
                    let whole = self.all_gather_seq(&grad)?;
                    drop(grad);
                    whole
                } else {
                    grad
                };
                let tokens = self.tokens.as_ref().expect("the step's tokens are set");
                let g = Tensor::f_embedding_dense_backward(&grad, tokens, self.vocab, -1, false)?;
                drop(grad);
                self.embedding_grad = Some(g);
                Ok(None)
            }
        }
    }
}

struct Hooks(RefCell<TpState>);

unsafe extern "C" fn hook(
    user: *mut c_void,
    tag: i64,
    grad_in: *mut C_tensor,
    grad_out: *mut *mut C_tensor,
) -> c_int {
    // SAFETY: `user` is the Hooks box that outlives every graph of the run.
    let hooks = &*(user as *const Hooks);
    ffi::run_callback(
        grad_in,
        grad_out,
        "a TP hook",
        |grad| {
            let mut st = hooks
                .0
                .try_borrow_mut()
                .map_err(|_| tch::TchError::Torch("TP state busy in a hook".into()))?;
            st.backward(tag, grad)
        },
        |err| {
            if let Ok(mut st) = hooks.0.try_borrow_mut() {
                st.error.get_or_insert(err);
            }
        },
    )
}

/// The block's collectives for one block (`index` tells its sites apart).
struct Tp<'a> {
    hooks: &'a Hooks,
    index: i64,
}

impl Tp<'_> {
    fn user(&self) -> *mut c_void {
        self.hooks as *const Hooks as *mut c_void
    }
    fn link(&self, x: &Tensor, y: &Tensor, tag: i64) -> TResult<Tensor> {
        // SAFETY: the Hooks box outlives every graph (it lives as long as the run).
        unsafe { ffi::checkpoint_link(x, y, tag, hook, self.user()) }.map_err(shim)
    }
    fn site(&self, site: Site) -> i64 {
        2 * self.index + i64::from(site == Site::FeedForward)
    }
    fn pg(&self) -> &ProcessGroup {
        // SAFETY: as TpState::pg.
        unsafe { &*self.hooks.0.borrow().pg }
    }
    /// `DTensor.from_local(x, Replicate)` read by `n` column-parallel projections.
    /// Under SP, `PrepareModuleInput(Shard(1) -> Replicate)` first: the sequence gathered.
    fn column_inputs(&self, x: &Tensor, site: i64, n: usize) -> TResult<Vec<Tensor>> {
        let whole = if self.hooks.0.borrow().sp {
            self.hooks.0.borrow().all_gather_seq(x)?
        } else {
            x.f_detach()?
        };
        let tag = (site << 6) | ((n as i64) << 3) | COLUMN_INPUT;
        let out = (0..n)
            .map(|_| self.link(x, &whole, tag))
            .collect::<TResult<Vec<_>>>()?;
        drop(whole);
        Ok(out)
    }
    /// A partial sum made whole (`funcol.all_reduce`: a clone, reduced in place) or, under SP,
    /// reduce-scattered along the sequence.
    fn all_reduce(&self, y: Tensor) -> TResult<Tensor> {
        let whole = if self.hooks.0.borrow().sp {
            self.hooks.0.borrow().reduce_scatter_seq(&y)?
        } else {
            let whole = tch::no_grad(|| clone(&y))?;
            self.pg().all_reduce_sum(&whole)?;
            whole
        };
        let out = self.link(&y, &whole, ROW_OUTPUT)?;
        drop((y, whole));
        Ok(out)
    }
}

impl Collectives for Tp<'_> {
    fn inputs(&self, x: &Tensor, site: Site, n: usize) -> TResult<Vec<Tensor>> {
        self.column_inputs(x, self.site(site), n)
    }
    fn output(&self, y: Tensor, _: Site) -> TResult<Tensor> {
        self.all_reduce(y)
    }
}

/// Full activation checkpointing: what a checkpointed block's recompute needs. Every rank
/// recomputes its blocks in the same order, so the forward's collectives meet again.
struct Ckpt {
    spec: crate::profiles::ModelSpec,
    dims: Dims,
    flavor: Flavor,
    freqs: Tensor,
    leaves: Vec<Tensor>,
    per_block: usize,
    tp: *const Hooks,
    /// Each checkpointed block's input, by block.
    inputs: RefCell<HashMap<i64, Tensor>>,
    error: RefCell<Option<tch::TchError>>,
}

impl Ckpt {
    fn block(&self, j: usize, x: &Tensor, seq: i64) -> TResult<Tensor> {
        let w = BlockWeights::from_list(
            &self.spec,
            &self.leaves[j * self.per_block..(j + 1) * self.per_block],
        );
        let f = self.freqs.f_narrow(0, 0, seq)?;
        // SAFETY: the TP hooks outlive every graph of the run.
        let c = Tp {
            hooks: unsafe { &*self.tp },
            index: j as i64,
        };
        model::block_forward_with(x, &w, &f, self.dims, self.flavor, &c)
    }

    /// Recomputes block `tag` from its kept input with autograd and runs its backward with the
    /// incoming gradient (reentrant checkpointing, as the single-process trainer's).
    fn recompute(&self, tag: i64, grad: Tensor, seq: i64) -> TResult<Option<Tensor>> {
        let x = self
            .inputs
            .borrow_mut()
            .remove(&tag)
            .expect("checkpointed block kept its input");
        super::recompute_block(x, grad, |xd| self.block(tag as usize, xd, seq))
    }
}

unsafe extern "C" fn ckpt_hook(
    user: *mut c_void,
    tag: i64,
    grad_in: *mut C_tensor,
    grad_out: *mut *mut C_tensor,
) -> c_int {
    // SAFETY: `user` is the Ckpt box that outlives every graph of the run.
    let ck = &*(user as *const Ckpt);
    ffi::run_callback(
        grad_in,
        grad_out,
        "a checkpoint hook",
        |grad| {
            let seq = grad.size()[1] * (*ck.tp).0.borrow().seq_factor();
            ck.recompute(tag, grad, seq)
        },
        |err| {
            ck.error.borrow_mut().get_or_insert(err);
        },
    )
}

/// `tensor.clone()`: a new buffer of the same bytes (contiguous unless dense and strided).
fn clone(t: &Tensor) -> TResult<Tensor> {
    let _g = tch::no_grad_guard();
    let out = t.f_empty_like()?;
    out.shallow_clone().f_copy_(t)?;
    Ok(out)
}

/// The shard of a whole `(rows, cols)` (or `(rows,)`) weight that rank `rank` of `tp` holds:
/// rows split (`dim` 0), columns split (1) or the whole (None), as a contiguous tensor.
fn shard_of(full: &Tensor, dim: Option<i64>, rank: i64, tp: i64) -> TResult<Tensor> {
    let part = match dim {
        None => full.shallow_clone(),
        Some(d) => {
            let n = full.size()[d as usize] / tp;
            full.f_narrow(d, rank * n, n)?
        }
    };
    let p = Tensor::f_empty(part.size().as_slice(), (Kind::Float, Device::Cpu))?;
    tch::no_grad(|| p.shallow_clone().f_copy_(&part))?;
    Ok(p)
}

/// Tags of the FSDP boundary nodes: the kind times [`FSDP_TAG`] plus the group.
const FSDP_PRE: i64 = 1;
const FSDP_POST: i64 = 2;
const FSDP_TAG: i64 = 1 << 32;

/// FSDP2 over the `dp_shard` ranks of the TP-sharded parameters (`fully_shard` per block and on
/// the root, after TP, as torchtitan's `apply_fsdp`): each group's parameters are the TP
/// shards, sharded again on dim 0 ([`fsdp`], which follows `FSDPParamGroup` allocation by
/// allocation); what FSDP2 does differently for DTensor parameters is here.
struct FsdpRun {
    fsdp: RefCell<Fsdp>,
    tp: *const Hooks,
    layers: usize,
    /// TP ranks and this rank's index among them; vocabulary rows per TP rank.
    tp_size: i64,
    tp_rank: i64,
    vshard: i64,
    error: RefCell<Option<tch::TchError>>,
}

impl FsdpRun {
    fn user(&self) -> *mut c_void {
        self as *const FsdpRun as *mut c_void
    }

    fn boundary(&self, x: &Tensor, kind: i64, group: usize) -> TResult<Tensor> {
        // SAFETY: the FsdpRun box outlives every graph (it lives as long as the run).
        unsafe { ffi::boundary(x, kind * FSDP_TAG + group as i64, fsdp_hook, self.user()) }
            .map_err(shim)
    }

    /// `FSDPParamGroup.pre_backward`: unshard (a no-op for a group still unsharded), then
    /// `_backward_prefetch` of the group whose post-forward came before this one's
    /// (`_fsdp_param_group.py:634-647`; the root's post-forward is the last, so it prefetches
    /// the last block, which torchtitan keeps unsharded: a no-op).
    fn pre_backward(&self, g: usize) -> TResult<()> {
        let mut f = self.fsdp.borrow_mut();
        f.wait_for_unshard(g, false)?;
        let previous = if g == self.layers {
            self.layers.checked_sub(1)
        } else {
            g.checked_sub(1)
        };
        if let Some(p) = previous {
            f.unshard(p)?;
        }
        Ok(())
    }

    /// `FSDPParamGroup.post_backward`: per parameter, the gradient's local tensor in the
    /// parameter's TP placements (`_fsdp_param.py:818-832`, `_get_grad_inner_tensor`), then
    /// `unsharded_param.grad = None` (`_fsdp_param_group.py:525-528`); then the reshard and the
    /// reduce-scatter ([`Fsdp::post_backward_with`]). Under SP a norm's gradient is Partial:
    /// redistributed to Replicate, `funcol.all_reduce` (a clone, reduced in place). The
    /// embedding's is the whole `(V, h)` Replicate gradient: redistributed to Shard(0),
    /// `_replicate_to_shard`, a clone of this rank's rows (`placement_types.py:401-419`).
    fn post_backward(&self, g: usize) -> TResult<()> {
        let _ng = tch::no_grad_guard();
        let grads = {
            let f = self.fsdp.borrow();
            // SAFETY: the TP hooks outlive every graph of the run.
            let tp = unsafe { &*self.tp };
            let mut st =
                tp.0.try_borrow_mut()
                    .map_err(|_| tch::TchError::Torch("TP state busy in an FSDP hook".into()))?;
            let root = g == self.layers;
            let mut grads = Vec::new();
            for (k, p) in f.groups[g].params.iter().enumerate() {
                let norm = if root { k == 1 } else { k == 0 || k == 5 };
                let grad = if root && k == 0 {
                    match st.embedding_grad.take() {
                        Some(whole) => {
                            let rows =
                                whole.f_narrow(0, self.tp_rank * self.vshard, self.vshard)?;
                            let mine = clone(&rows)?;
                            drop((rows, whole));
                            Some(mine)
                        }
                        None => None,
                    }
                } else {
                    match ffi::take_grad(&p.leaf).map_err(shim)? {
                        Some(partial) if st.sp && norm && self.tp_size > 1 => {
                            let whole = clone(&partial)?;
                            st.pg().all_reduce_sum(&whole)?;
                            drop(partial);
                            Some(whole)
                        }
                        other => other,
                    }
                };
                grads.push(grad);
            }
            grads
        };
        self.fsdp.borrow_mut().post_backward_with(g, grads)
    }

    fn on_backward(&self, tag: i64, grad: Tensor) -> TResult<Option<Tensor>> {
        let (kind, g) = (tag / FSDP_TAG, (tag % FSDP_TAG) as usize);
        drop(grad);
        match kind {
            FSDP_PRE => self.pre_backward(g)?,
            FSDP_POST => self.post_backward(g)?,
            _ => unreachable!("unknown FSDP hook tag {tag}"),
        }
        Ok(None)
    }
}

unsafe extern "C" fn fsdp_hook(
    user: *mut c_void,
    tag: i64,
    grad_in: *mut C_tensor,
    grad_out: *mut *mut C_tensor,
) -> c_int {
    // SAFETY: `user` is the FsdpRun box that outlives every graph of the run.
    let run = &*(user as *const FsdpRun);
    ffi::run_callback(
        grad_in,
        grad_out,
        "an FSDP hook",
        |grad| run.on_backward(tag, grad),
        |err| {
            run.error.borrow_mut().get_or_insert(err);
        },
    )
}

/// The optimizer's shards, in the model's order (blocks, then the root): the TP shards
/// themselves without FSDP, FSDP's local shards with it.
fn with_shards<R>(
    shards: &mut [Shard],
    fsdp_run: Option<&FsdpRun>,
    f: impl FnOnce(&mut [&mut Shard]) -> R,
) -> R {
    match fsdp_run {
        None => f(&mut shards.iter_mut().collect::<Vec<_>>()),
        Some(run) => {
            let mut st = run.fsdp.borrow_mut();
            let mut all: Vec<&mut Shard> = st
                .groups
                .iter_mut()
                .flat_map(|g| g.params.iter_mut().map(|p| &mut p.local))
                .collect();
            f(&mut all)
        }
    }
}

/// The root's post-forward as the model returns `out` (its locals already freed): under FSDP
/// the root resharded (its `reshard_after_forward=True`) and the last forward all-gather
/// output freed (`_fsdp_state.py` `_post_forward`), and the pre-backward hook put on the
/// output, which gathers the root again once the loss's backward has reached it.
fn root_post_forward(fsdp_run: Option<&FsdpRun>, out: Tensor) -> TResult<Tensor> {
    let Some(run) = fsdp_run else {
        return Ok(out);
    };
    let mut st = run.fsdp.borrow_mut();
    let root = run.layers;
    if st.groups[root].reshard_after_forward {
        st.reshard(root)?;
    }
    st.root_post_forward();
    drop(st);
    run.boundary(&out, FSDP_PRE, root)
}

/// Runs this rank's tensor-parallel shard of `plan` for `opts.steps` steps (see the module
/// doc). The report is this rank's memory; losses and gradient norms are the job's.
pub fn train_tp(plan: &Plan, opts: &TrainOptions, mesh: &Mesh) -> Result<TrainReport> {
    let rt = |e: tch::TchError| Error::runtime(format!("trainer: {e}"));
    if opts.device != super::TrainDevice::Cpu {
        return Err(Error::input(
            "--device cpu under tensor parallelism: ranks exchange activations over Gloo",
        ));
    }
    if opts.record_trace {
        return Err(Error::input(
            "--trace is not recorded under tensor parallelism yet (the rank's peaks are \
             reported)",
        ));
    }
    let pg = mesh.tp.as_ref().expect("a TP job has a tp group");
    let (rank, tp) = (pg.rank(), pg.size());
    let m = &plan.model;
    let env = Env {
        device: Device::Cpu,
        compute: Kind::Float,
        reduce: Kind::Float,
        master: Kind::Float,
        world: mesh.shard.size(),
        rank: mesh.shard.rank(),
        peers: false,
        offload: Offload::None,
    };
    // FSDP over the data-parallel ranks of this TP rank (torchtitan's ("dp_shard", "tp") mesh).
    let dp = env.world;
    let _default = ffi::channel(Channel::Device);
    let meter = Meter::new(None)?;
    let _limit = opts.device_limit.map(|limit| {
        let base = ffi::counter(Channel::Device).0;
        ffi::device_limit(Some(base.saturating_add(limit)))
    });
    tch::manual_seed(opts.seed as i64);

    // Setup: the whole model's weights drawn as the single-process trainer draws them (every
    // block, then the root), each rank keeping its TP shards; under FSDP each TP shard is
    // sharded again over the dp_shard ranks on dim 0 (FSDP2 shards a DTensor parameter's local
    // tensor, `_fsdp_param.py` `_init_sharded_param`), a group per block and the root.
    let setup_start = meter.start()?;
    let (leaves, freqs, groups) = (|| -> TResult<_> {
        let mut groups = Vec::new();
        // A TP shard: the parameter itself without FSDP; with it, the uncounted whole that
        // FSDP shards.
        let local = |t: &Tensor, d: Option<i64>| -> TResult<Tensor> {
            if dp == 1 {
                shard_of(t, d, rank, tp)?.f_set_requires_grad(true)
            } else {
                let _off = ffi::channel(Channel::Off);
                shard_of(t, d, rank, tp)
            }
        };
        let block = m.block_params();
        let shapes: Vec<(u64, u64)> = block.iter().map(|p| (p.rows, p.cols)).collect();
        let norms: Vec<bool> = shapes.iter().map(|&(_, c)| c == 1).collect();
        // ModelSpec::block_params: attention_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2.
        let split = [
            None,
            Some(0),
            Some(0),
            Some(0),
            Some(1),
            None,
            Some(0),
            Some(0),
            Some(1),
        ];
        let mut leaves = Vec::new();
        for i in 0..m.layers {
            let full = init_weights(&shapes, &norms)?;
            let module = Module::Layer(i as u32);
            let mut params = Vec::new();
            for (t, d) in full.iter().zip(split) {
                let l = local(t, d)?;
                if dp == 1 {
                    leaves.push(l);
                } else {
                    params.push(FsdpParam::new(&l, &env, module)?);
                }
            }
            if dp > 1 {
                // torchtitan's apply_fsdp: every block but the last resharded after forward.
                let reshard = plan.reshard_after_forward && i + 1 < m.layers;
                groups.push(Group::new(params, reshard, module));
            }
        }
        let root: Vec<(u64, u64)> = m.root_params().iter().map(|p| (p.rows, p.cols)).collect();
        let root_norms: Vec<bool> = root.iter().map(|&(_, c)| c == 1).collect();
        let full = init_weights(&root, &root_norms)?;
        // tok_embeddings (rows), the final norm (whole), output (rows).
        let modules = [Module::TokEmbeddings, Module::Norm, Module::Output];
        let mut params = Vec::new();
        for ((t, d), module) in full.iter().zip([Some(0), None, Some(0)]).zip(modules) {
            let l = local(t, d)?;
            if dp == 1 {
                leaves.push(l);
            } else {
                params.push(FsdpParam::new(&l, &env, module)?);
            }
        }
        if dp > 1 {
            // The root: torchtitan passes `reshard_after_forward=True` explicitly (not
            // pipelining), and torch 2.11 keeps a root unsharded after forward only when the
            // setting is left to it (`_fsdp_state.py:193`): with root-resharded-keep-last it
            // is resharded after forward and gathered again by the pre-backward hook on its
            // output; with root-keep-last (torch of 2024, or FSDP2's automatic setting) it
            // stays gathered.
            let reshard = plan.implementation.fsdp_units == FsdpUnits::RootReshardedKeepLast
                && plan.reshard_after_forward;
            groups.push(Group::new(params, reshard, Module::Root));
            leaves = groups.iter().flat_map(Group::leaves).collect();
        }
        let freqs = model::rotary_table(plan, Device::Cpu)?;
        Ok((leaves, freqs, groups))
    })()
    .map_err(rt)?;
    let setup = meter.finish(setup_start)?;
    let per_block = m.block_params().len();
    let n_block = per_block * m.layers as usize;
    // Without FSDP the optimizer's shards are the TP shards themselves; with it, FSDP's.
    let mut shards: Vec<Shard> = leaves
        .iter()
        .filter(|_| dp == 1)
        .map(|p| Shard {
            data: p.shallow_clone(),
            view: p.shallow_clone(),
            rows: p.size()[0],
            grad: None,
            state: Vec::new(),
            step: None,
        })
        .collect();
    // Which shards are whole on every rank (the norms): counted once in the gradient norm.
    let replicated: Vec<bool> = (0..leaves.len())
        .map(|i| {
            if i < n_block {
                matches!(i % per_block, 0 | 5)
            } else {
                i == n_block + 1
            }
        })
        .collect();

    let (sp, lp) = (plan.parallel.sp, plan.implementation.loss_parallel);
    let hooks = Box::new(Hooks(RefCell::new(TpState {
        pg: pg as *const ProcessGroup,
        tp,
        rank,
        vocab: m.vocab as i64,
        sp,
        loss_saved: None,
        pending: HashMap::new(),
        tokens: None,
        embedding_grad: None,
        error: None,
    })));
    let fsdp_run: Option<Box<FsdpRun>> = (dp > 1).then(|| {
        // SAFETY: the mesh outlives the run (train_tp borrows it for its whole body).
        let comm = unsafe { fsdp::GlooShard::new(&mesh.shard, true) };
        Box::new(FsdpRun {
            fsdp: RefCell::new(Fsdp::new(env, groups, Box::new(comm))),
            tp: &*hooks as *const Hooks,
            layers: m.layers as usize,
            tp_size: tp,
            tp_rank: rank,
            vshard: m.vocab as i64 / tp,
            error: RefCell::new(None),
        })
    });
    let dims = Dims::new(m);
    let flavor = Flavor {
        gqa: plan.implementation.gqa,
        logits: plan.implementation.logits,
    };
    let ckpt = Box::new(Ckpt {
        spec: m.clone(),
        dims,
        flavor,
        freqs: freqs.shallow_clone(),
        leaves: leaves.iter().map(Tensor::shallow_clone).collect(),
        per_block,
        tp: &*hooks as *const Hooks,
        inputs: RefCell::new(HashMap::new()),
        error: RefCell::new(None),
    });
    let cfg = OptConfig {
        kind: plan.optimizer,
        imp: plan.implementation.optimizer,
        lr: opts.lr.unwrap_or_else(|| default_lr(m.hidden)),
    };
    let (b, s) = (plan.batch.micro_batch_size, plan.batch.seq_len);
    let vshard = m.vocab as i64 / tp;
    let root_group = m.layers as usize;

    let mut steps = Vec::new();
    let mut oom = None;
    let started = Instant::now();
    let mut tokens_done = 0u64;
    // The loop's `inp`, `labels` and `loss`, kept until the next step rebinds them.
    let mut live: Option<(Tensor, Tensor, Tensor)> = None;
    for step in 1..=opts.steps {
        if opts.abort_at_step == Some(step) {
            eprintln!("error: aborting at step {step} (fault injection)");
            std::process::abort();
        }
        // `opt.zero_grad()`: gradients set to None.
        with_shards(&mut shards, fsdp_run.as_deref(), |all| {
            all.iter_mut().for_each(|sh| sh.grad = None)
        });
        mesh.world.barrier().map_err(rt)?;
        let mut fwd_m: Option<PhaseMemory> = None;
        let mut bwd_m: Option<PhaseMemory> = None;
        let start = meter.start()?;
        let fwd = (|| -> TResult<(Tensor, Tensor, Tensor)> {
            // The TP ranks of a data-parallel rank read the same batch: its rows of the
            // single-process trainer's micro-batch of dp x b rows.
            let toks = {
                let _off = ffi::channel(Channel::Off);
                let all = synthetic_tokens(opts.seed, step - 1, b * dp as u64, s, m.vocab);
                let t = Tensor::from_slice(&all).f_view([b as i64 * dp, s as i64 + 1])?;
                t.f_narrow(0, env.rank * b as i64, b as i64)?
            };
            let inp = env.copy_to(&toks.f_narrow(1, 0, s as i64)?, Place::Device)?;
            let labels = env.copy_to(&toks.f_narrow(1, 1, s as i64)?, Place::Device)?;
            drop(toks);
            // `inp, labels = ...` rebinds: the previous step's are freed; its `loss` lives
            // until the new one is bound.
            let prev_loss = live.take().map(|(_, _, l)| l);
            hooks.0.borrow_mut().tokens = Some(inp.shallow_clone());
            let tp_at = |index: i64| Tp {
                hooks: &hooks,
                index,
            };
            // The root's pre-forward: its parameters gathered (FSDPParamGroup.pre_forward).
            if let Some(f) = &fsdp_run {
                f.fsdp.borrow_mut().wait_for_unshard(root_group, true)?;
            }
            let emb = &leaves[n_block];
            // RowwiseParallel embedding: `_MaskPartial` lookup, then all-reduce.
            let h = {
                let root = tp_at(-1);
                let local = tch::no_grad(|| -> TResult<Tensor> {
                    let lo = rank * vshard;
                    let mask = inp.f_lt(lo)?.f_logical_or(&inp.f_ge(lo + vshard)?)?;
                    let masked = {
                        let c = clone(&inp)?;
                        c.f_sub_scalar(lo)?
                    };
                    let zero = Tensor::from(0i64);
                    let masked =
                        masked
                            .shallow_clone()
                            .f_index_put_(&[Some(&mask)], &zero, false)?;
                    let e = Tensor::f_embedding(emb, &masked, -1, false, false)?;
                    drop(masked);
                    let zf = Tensor::from(0f32);
                    let e = e.shallow_clone().f_index_put_(&[Some(&mask)], &zf, false)?;
                    drop(mask);
                    // Replicate: all-reduced into a clone; Shard(1): reduce-scattered.
                    let out = if sp {
                        root.hooks.0.borrow().reduce_scatter_seq(&e)?
                    } else {
                        let whole = clone(&e)?;
                        root.pg().all_reduce_sum(&whole)?;
                        whole
                    };
                    drop(e);
                    Ok(out)
                })?;
                let out = root.link(emb, &local, EMBEDDING)?;
                drop(local);
                out
            };
            let mut h = h;
            for j in 0..m.layers as usize {
                // Under FSDP the block's pre-forward: its parameters gathered, the
                // post-backward hook on its input.
                let x = match &fsdp_run {
                    Some(f) => {
                        f.fsdp.borrow_mut().wait_for_unshard(j, true)?;
                        f.boundary(&h, FSDP_POST, j)?
                    }
                    None => h.shallow_clone(),
                };
                drop(h);
                let y = if checkpointed(plan.activation_checkpointing, j as u64) {
                    // `checkpoint_wrapper` (applied before `fully_shard`, so FSDP's hooks are
                    // outside it and its recompute runs none of them): the block without
                    // autograd, linked to its input; the input kept for the recompute.
                    let y = tch::no_grad(|| ckpt.block(j, &x, s as i64))?;
                    let user = &*ckpt as *const Ckpt as *mut c_void;
                    // SAFETY: the Ckpt box outlives the graph (it lives as long as the run).
                    let y = unsafe { ffi::checkpoint_link(&x, &y, j as i64, ckpt_hook, user) }
                        .map_err(shim)?;
                    ckpt.inputs.borrow_mut().insert(j as i64, x.shallow_clone());
                    y
                } else {
                    ckpt.block(j, &x, s as i64)?
                };
                drop(x);
                // Under FSDP the post-forward: resharded unless it is the last block, the
                // pre-backward hook on its output.
                h = match &fsdp_run {
                    Some(f) => {
                        let mut st = f.fsdp.borrow_mut();
                        if st.groups[j].reshard_after_forward {
                            st.reshard(j)?;
                        }
                        drop(st);
                        f.boundary(&y, FSDP_PRE, j)?
                    }
                    None => y,
                };
            }
            // The final norm (NoParallel), then the ColwiseParallel output: its input a
            // Replicate DTensor, its Shard(-1) logits all-gathered to Replicate.
            let n = model::rms_norm(&h, &leaves[n_block + 1])?;
            drop(h);
            let root = tp_at(-1);
            let ins = root.column_inputs(&n, 2 * m.layers as i64, 1)?;
            let local = ins[0].f_linear(&leaves[n_block + 2], None::<&Tensor>)?;
            drop(ins);
            // `h = self.norm(h)` is bound until the model returns: through the output's
            // redistribution, after the output projection's input was gathered from it.
            if lp {
                drop(n);
                let local = root_post_forward(fsdp_run.as_deref(), local)?;
                // loss_parallel: the Shard(-1) logits stay local; `pred.flatten(0, 1)`, the
                // distributed cross-entropy, `del pred`.
                let flat = local.f_flatten(0, 1)?;
                let value = hooks
                    .0
                    .borrow_mut()
                    .parallel_loss(&flat, &labels.f_flatten(0, 1)?)?;
                let loss = root.link(&flat, &value, LOSS)?;
                drop((prev_loss, value, flat, local));
                return Ok((inp, labels, loss));
            }
            let whole = tch::no_grad(|| -> TResult<Tensor> {
                let (bb, ss, v) = local.size3()?;
                let buf = Tensor::f_empty([tp * bb, ss, v], (Kind::Float, Device::Cpu))?;
                buf.f_narrow(0, rank * bb, bb)?.f_copy_(&local)?;
                for r in 0..tp {
                    root.pg().broadcast(&buf.f_narrow(0, r * bb, bb)?, r)?;
                }
                let chunks = buf.f_chunk(tp, 0)?;
                let whole = Tensor::f_cat(&chunks, 2)?;
                drop((chunks, buf));
                Ok(whole)
            })?;
            let pred = root.link(&local, &whole, GATHER_VOCAB)?;
            drop((whole, local, n));
            let pred = root_post_forward(fsdp_run.as_deref(), pred)?;
            let pred = match flavor.logits {
                Logits::FloatOutput => pred.f_to_kind(Kind::Float)?,
                _ => pred,
            };
            let loss = model::loss(&pred, &labels, flavor)?;
            drop((prev_loss, pred));
            Ok((inp, labels, loss))
        })();
        Meter::merge(&mut fwd_m, meter.finish(start)?);
        let (inp, labels, loss) = match fwd {
            Ok(t) => t,
            Err(e) if is_oom(&e) => {
                oom = Some(OomReport {
                    step,
                    phase: Phase::Forward,
                    message: first_line(&e),
                    peak_allocated_bytes: [fwd_m.map_or(0, |m| m.peak_allocated_bytes), 0, 0],
                });
                break;
            }
            Err(e) => return Err(rt(e)),
        };
        let start = meter.start()?;
        let r = (|| -> TResult<()> {
            if let Err(e) = ffi::backward(&[&loss], &[None]) {
                let hooked = (ckpt.error.borrow_mut().take())
                    .or_else(|| hooks.0.borrow_mut().error.take())
                    .or_else(|| fsdp_run.as_ref().and_then(|f| f.error.borrow_mut().take()));
                return Err(hooked.unwrap_or(tch::TchError::Torch(e.0)));
            }
            if let Some(f) = &fsdp_run {
                // `_root_post_backward_final_callback`: the root's post-backward (the blocks'
                // ran from their hooks), then the last reduce-scatter input freed.
                f.post_backward(root_group)?;
                f.fsdp.borrow_mut().finish_backward();
                return Ok(());
            }
            let _ng = tch::no_grad_guard();
            for (i, sh) in shards.iter_mut().enumerate() {
                sh.grad = if i == n_block {
                    // The whole embedding gradient; the optimizer reads this rank's rows.
                    let g = hooks.0.borrow_mut().embedding_grad.take();
                    match g {
                        Some(g) => Some(g.f_narrow(0, rank * vshard, vshard)?),
                        None => None,
                    }
                } else {
                    ffi::take_grad(&sh.view).map_err(shim)?
                };
            }
            // Under SP a norm's gradient is a Partial DTensor (each rank's sequence shard's
            // part); torch.optim's foreach ops redistribute it to Replicate, an all-reduce,
            // which is done here once, in place.
            if sp {
                for (sh, _) in shards.iter().zip(&replicated).filter(|(_, &r)| r) {
                    if let Some(g) = &sh.grad {
                        pg.all_reduce_sum(g)?;
                    }
                }
            }
            Ok(())
        })();
        hooks.0.borrow_mut().tokens = None;
        live = Some((inp, labels, loss));
        Meter::merge(&mut bwd_m, meter.finish(start)?);
        match r {
            Ok(()) => {}
            Err(e) if is_oom(&e) => {
                oom = Some(OomReport {
                    step,
                    phase: Phase::Backward,
                    message: first_line(&e),
                    peak_allocated_bytes: [
                        fwd_m.map_or(0, |m| m.peak_allocated_bytes),
                        bwd_m.map_or(0, |m| m.peak_allocated_bytes),
                        0,
                    ],
                });
                break;
            }
            Err(e) => return Err(rt(e)),
        }

        // The job's gradient norm (shards summed over ranks, replicated weights once) and
        // loss (the same on every rank), uncounted.
        let (norm, loss) = (|| -> TResult<(f64, f64)> {
            let _off = ffi::channel(Channel::Off);
            let sq = with_shards(&mut shards, fsdp_run.as_deref(), |all| {
                let mut sq = 0.0;
                for (sh, &rep) in all.iter().zip(&replicated) {
                    if let Some(g) = &sh.grad {
                        let v = g
                            .f_to_kind(Kind::Double)?
                            .f_square()?
                            .f_sum(Kind::Double)?
                            .f_double_value(&[])?;
                        sq += if rep { v / tp as f64 } else { v };
                    }
                }
                Ok::<f64, tch::TchError>(sq)
            })?;
            // Over every rank; each data-parallel rank's loss is its own batch's (the TP ranks
            // of one agree), the job's their mean.
            let t =
                Tensor::from_slice(&[sq, live.as_ref().expect("set above").2.f_double_value(&[])?]);
            mesh.world.all_reduce_sum(&t)?;
            let loss = t.f_double_value(&[1])? / mesh.world.size() as f64;
            Ok((t.f_double_value(&[0])?.sqrt(), loss))
        })()
        .map_err(rt)?;

        let warmup = (opts.steps / 10).max(1);
        let cfg = OptConfig {
            lr: cfg.lr * (step.min(warmup) as f64 / warmup as f64),
            ..cfg
        };
        let start = meter.start()?;
        let r = with_shards(&mut shards, fsdp_run.as_deref(), |all| {
            optim::step(&cfg, &env, all, false)
        });
        let opt = meter.finish(start)?;
        let (fwd_peak, bwd_peak) = (
            fwd_m.map_or(0, |m| m.peak_allocated_bytes),
            bwd_m.map_or(0, |m| m.peak_allocated_bytes),
        );
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
        let (forward, backward) = (fwd_m.unwrap_or_default(), bwd_m.unwrap_or_default());
        steps.push(StepReport::of_phases(
            step, loss, norm, forward, backward, opt,
        ));
        tokens_done += b * s;
        if opts.progress_lines {
            eprintln!("memplan-progress {step} {} {loss}", opts.steps);
        }
    }
    drop(live);
    let elapsed = started.elapsed().as_secs_f64();
    let notes = vec![
        format!(
            "rank {} of a {tp}-way tensor-parallel job over c10d Gloo (TP rank {rank}, \
             dp_shard rank {} of {dp}): torchtitan's apply_tp (sequence parallelism {}, loss \
             parallelism {}){}",
            mesh.env.rank,
            env.rank,
            if sp { "on" } else { "off" },
            if lp { "on" } else { "off" },
            if dp > 1 {
                ", then fully_shard per block and on the root over the dp_shard ranks"
            } else {
                ", no FSDP"
            }
        ),
        "CPU run: exact live bytes of a counting allocator (requested sizes); torch.optim's \
         step scalars are counted as host bytes, as on a GPU"
            .into(),
    ];
    Ok(TrainReport {
        model: m.name.clone(),
        device: opts.device,
        dp_shard: dp as u64,
        rank: mesh.env.rank,
        processes: mesh.env.world,
        pp_stage: None,
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
