//! Mixture of experts as torchtitan 0.2.2 trains it (`torchtitan/models/moe/moe.py`,
//! `moe/utils.py`, `moe/kernels.py`), op for op, so that autograd saves what torch saves:
//! the llama block of [`model`] with its feed-forward replaced by torchtitan's `MoE`
//! (`ep_reference.py` next to this file runs torchtitan's own classes on the same model).
//!
//! # What runs
//! - `TokenChoiceTopKRouter` (moe.py l.293-355): the gate's scores, softmax in fp32, plus the
//!   load-balancing `expert_bias` for the choice, `topk` (unsorted), the chosen scores
//!   gathered from the unbiased ones, route_norm (divided by their sum + 1e-20), times
//!   route_scale; the tokens per expert counted (`torch.histc`, which has no CPU kernel for
//!   int64: `bincount(minlength=E)` as the reference's patch 1).
//! - `MoE.forward` (moe.py l.473-549): the counts added to the `tokens_per_expert` buffer
//!   (no grad), `TokenReorderer` (moe.py l.378-419: counts again, stable argsort, scores
//!   sorted), `routed_input = x[sorted // top_k]`, the experts, the output unsorted into
//!   zeros by `index_put_`, and the scores applied after the experts by a `bmm`
//!   (score_before_experts False). No shared expert.
//! - `GroupedExperts` on the grouped_mm path through `indices_padding_wrapper` (utils.py
//!   l.69-97): `_permute` pads every local expert's rows to a multiple of
//!   TOKEN_GROUP_ALIGN_SIZE_M = 8 (at least 8), `generate_permute_indices`'s CPU path
//!   (`fill_indices_cpu`, kernels.py l.106-216, the reference's patch 2) into
//!   `P = round_up(R + 8 E_local, 8)` rows, the last row of a `vstack` with zeros standing for
//!   the padding; `_run_experts_grouped_mm` (moe.py l.113-130) casts x and each weight to bf16
//!   (x twice) for `torch._grouped_mm` (tch's `internal_grouped_mm`), and `_unpermute`
//!   scatters the fp32 output into a `new_empty` of the stacked shape.
//! - The auxiliary-loss-free balancing of `build_optimizers_with_moe_load_balancing`
//!   (components/optimizer.py l.339-443): an optimizer pre-step hook that moves `expert_bias`
//!   by `coeff * sign(mean - count)` (centred) and zeroes the counts (halved first under
//!   checkpointing, which counts every token twice).
//!
//! Capacity: torchtitan 0.2.2 routes dropless (no capacity factor anywhere in the router or
//! the dispatch), and so does this trainer: every token reaches its top-k experts; the only
//! extra rows are the alignment padding above.
//!
//! # Routing and bytes
//! The rows each expert gets depend on the data. On one process (EP 1) they do not change the
//! bytes that autograd keeps: every buffer sized by rows is sized by `N k` or by `P`, which is
//! `round_up(N k + 8 E, 8)` whatever the split. Only `fill_indices_cpu`'s `arange`s and the
//! CPU grouped_mm's per-group temporaries follow the split, and they live inside one op. They
//! never set a step's peak (the loss's backward without checkpointing; with it, the
//! optimizer, or the first block's recompute at `_unpermute`), but they set the forward
//! phase's under full checkpointing, where nothing else is kept: there the trainer's data
//! gives other bytes than the reference's (tests/expert_parallel.rs bounds them). So the
//! synthetic data of this trainer gives torch's step peaks, and its backward and optimizer
//! phases, to the byte.
//! Expert parallelism (EP > 1: the all-to-all dispatch and combine, the experts' own FSDP
//! mesh) is not run yet: it is refused.
//!
//! # Known differences from torch, kept
//! - torch.optim's `state["step"]` scalars (4 bytes per parameter tensor) are CPU tensors,
//!   counted as device bytes by the CPU reference and as host bytes here (as on a GPU).
//! - c10d's `ProcessGroup::barrier` keeps a 1-byte tensor that the reference's
//!   `dist.barrier()` makes; a single process here has no process group.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use super::ffi::{self, Channel};
use super::fsdp::{shim, Env, Place, Shard};
use super::memory::{Meter, PhaseMemory};
use super::model::{self, BlockWeights, Dims, Flavor, Local, TResult};
use super::optim::{self, OptConfig};
use super::{
    checkpointed, default_lr, first_line, is_oom, synthetic_tokens, unsupported, OomReport, Phase,
    StepReport, TrainOptions, TrainReport,
};
use crate::error::{Error, Result};
use crate::plan::{Checkpointing, DType, Offload, Plan};

/// torchtitan's `TOKEN_GROUP_ALIGN_SIZE_M` (moe/utils.py l.15): rows per expert group are
/// padded to a multiple of it, at least one multiple.
pub const ALIGN: i64 = 8;
/// `MoEArgs.load_balance_coeff`'s default (moe.py l.38), as the reference runs it.
pub const LOAD_BALANCE_COEFF: f64 = 1e-3;
/// `MoEArgs.route_scale` (1.0 in the reference's Qwen3-like router).
const ROUTE_SCALE: f64 = 1.0;
/// Parameter tensors of a block, in `model.parameters()` order of the reference:
/// attention (wq, wk, wv, wo), attention_norm, ffn_norm, experts (w1, w2, w3), router gate.
const PER_BLOCK: usize = 10;
const WQ: usize = 0;
const WK: usize = 1;
const WV: usize = 2;
const WO: usize = 3;
const ATTENTION_NORM: usize = 4;
const FFN_NORM: usize = 5;
const W1: usize = 6;
const W2: usize = 7;
const W3: usize = 8;
const GATE: usize = 9;

/// Refuses what the MoE trainer does not run, with the reason (the caller has refused what no
/// trainer runs).
pub fn check(plan: &Plan) -> Result<()> {
    let m = &plan.model;
    let moe = m.moe.as_ref().expect("check is for MoE models");
    if moe.shared_intermediate != 0 || moe.shared_gate || moe.first_dense != 0 || moe.every != 1 {
        return Err(unsupported(
            "model",
            &m.name,
            "MoE in every layer without shared experts (torchtitan's Qwen3/Mixtral-like MoE)",
        ));
    }
    let p = &plan.parallel;
    if p.ep != 1 || p.dp_shard != 1 || p.dp_replicate != 1 || p.tp != 1 || p.pp != 1 {
        return Err(unsupported(
            "parallel",
            format!(
                "ep {} x dp_shard {} x dp_replicate {} x tp {} x pp {}",
                p.ep, p.dp_shard, p.dp_replicate, p.tp, p.pp
            ),
            "ep 1 on one process: expert parallelism (all-to-all dispatch, the experts' FSDP \
             mesh) is not run by the trainer yet",
        ));
    }
    if !matches!(
        plan.activation_checkpointing,
        Checkpointing::None | Checkpointing::Full
    ) {
        return Err(unsupported(
            "activation_checkpointing",
            format!("{:?}", plan.activation_checkpointing),
            "none or full for MoE models",
        ));
    }
    for (name, d) in [
        ("precision.param", plan.precision.param),
        ("precision.reduce", plan.precision.reduce),
        ("precision.master", plan.precision.master),
    ] {
        if d != DType::Fp32 {
            return Err(unsupported(
                name,
                format!("\"{d}\""),
                "fp32 for MoE models (the experts' grouped matmuls cast to bf16 themselves)",
            ));
        }
    }
    if plan.offload != Offload::None || plan.batch.grad_accum_steps != 1 {
        return Err(unsupported(
            "offload / grad_accum_steps",
            format!("{:?} / {}", plan.offload, plan.batch.grad_accum_steps),
            "none / 1 for MoE models",
        ));
    }
    Ok(())
}

/// `_round_up(x, m)` (torchtitan/tools/utils.py).
pub fn round_up(x: i64, m: i64) -> i64 {
    (x + m - 1) / m * m
}

/// The model on one process: every parameter as a leaf, the MoE buffers, the rotary table.
struct MoeModel {
    dims: Dims,
    flavor: Flavor,
    experts: i64,
    top_k: i64,
    freqs: Tensor,
    leaves: Vec<Tensor>,
    /// `MoE.expert_bias` (persistent buffer) and `MoE.tokens_per_expert`, fp32 (E,), by block.
    expert_bias: Vec<Tensor>,
    tokens_per_expert: Vec<Tensor>,
    /// Each checkpointed block's input, by block.
    inputs: RefCell<HashMap<i64, Tensor>>,
    /// The block whose forward runs without autograd (checkpointed), if any, and the route
    /// scale tensors such forwards keep until the block's backward.
    no_grad_block: std::cell::Cell<Option<i64>>,
    scales: RefCell<HashMap<i64, Tensor>>,
    error: RefCell<Option<tch::TchError>>,
}

impl MoeModel {
    fn block(&self, j: usize, x: &Tensor, seq: i64) -> TResult<Tensor> {
        let l = &self.leaves[1 + j * PER_BLOCK..1 + (j + 1) * PER_BLOCK];
        let w = BlockWeights {
            attention_norm: &l[ATTENTION_NORM],
            wq: (&l[WQ], None),
            wk: (&l[WK], None),
            wv: (&l[WV], None),
            wo: (&l[WO], None),
            ffn_norm: &l[FFN_NORM],
            // not read: the feed-forward is the MoE below
            w1: (&l[W1], None),
            w3: (&l[W3], None),
            w2: (&l[W2], None),
        };
        // `freqs = self.freqs_cis[0:seqlen]`, a view
        let f = self.freqs.f_narrow(0, 0, seq)?;
        model::block_forward_ffn(x, &w, &f, self.dims, self.flavor, &Local, &|n| {
            self.moe(j, n)
        })
    }

    /// `MoE.forward` (moe.py l.473-549). Locals are dropped where Python drops them: a
    /// rebinding frees the old value (unless autograd keeps it), a frame's locals go at its
    /// return.
    fn moe(&self, j: usize, x: &Tensor) -> TResult<Tensor> {
        let l = &self.leaves[1 + j * PER_BLOCK..1 + (j + 1) * PER_BLOCK];
        let (e, k) = (self.experts, self.top_k);
        let (bs, slen, dim) = x.size3()?;
        let x = x.f_view([-1, dim])?;
        let (top_scores, selected, counts) = self.router(&x, &l[GATE], &self.expert_bias[j])?;
        // `self.tokens_per_expert.add_(num_tokens_per_expert)` under no_grad
        let _ = tch::no_grad(|| self.tokens_per_expert[j].shallow_clone().f_add_(&counts))?;
        // TokenReorderer.forward (moe.py l.378-419)
        let flat = selected.f_view([-1])?;
        let counts_sorted = flat.f_bincount(None::<Tensor>, e)?;
        let sorted = flat.f_argsort_stable(true, -1, false)?;
        let top_sorted = top_scores.f_view([-1])?.f_index(&[Some(&sorted)])?;
        // `num_tokens_per_expert` rebound to the reorderer's counts
        drop(counts);
        // routed_input = x[token_indices_experts_sorted // top_k]
        let routed_input = {
            let src = sorted.f_floor_divide_scalar(k)?;
            x.f_index(&[Some(&src)])?
        };
        let routed_output = self.experts(l, &routed_input, &counts_sorted)?;
        // routed_output_unsorted = zeros(...); [sorted] = routed_output; reshape(-1, k, dim)
        let unsorted = Tensor::f_zeros([bs * slen * k, dim], (Kind::Float, Device::Cpu))?;
        let unsorted =
            unsorted
                .shallow_clone()
                .f_index_put_(&[Some(&sorted)], &routed_output, false)?;
        let unsorted = unsorted.f_reshape([-1, k, dim])?;
        // bmm(top_scores.reshape(-1, 1, k), unsorted.float()).to(x.dtype).squeeze(1)
        let out = top_scores
            .f_reshape([-1, 1, k])?
            .f_bmm(&unsorted.f_to_kind(Kind::Float)?)?
            .f_squeeze_dim(1)?;
        drop((
            unsorted,
            routed_output,
            routed_input,
            top_sorted,
            counts_sorted,
        ));
        out.f_reshape([bs, slen, dim])
    }

    /// `TokenChoiceTopKRouter.forward` (moe.py l.293-355), softmax scores, route_norm.
    /// Returns the scaled top scores (N, k), the chosen experts (N, k) and the tokens per
    /// expert (E,).
    fn router(
        &self,
        x: &Tensor,
        gate: &Tensor,
        expert_bias: &Tensor,
    ) -> TResult<(Tensor, Tensor, Tensor)> {
        let logits = x.f_linear(gate, None::<&Tensor>)?;
        // F.softmax(scores.to(torch.float32), dim=1): the gate's output is rebound
        let scores = logits.f_softmax(1, Kind::Float)?;
        drop(logits);
        let choice = scores.f_add(expert_bias)?;
        // `_, selected_experts_indices = torch.topk(..., sorted=False)`: `_` holds the values
        // until the return
        let (values, selected) = choice.f_topk(self.top_k, -1, true, false)?;
        let top = scores.f_gather(1, &selected, false)?;
        // route_norm: `denominator = top_scores.sum(dim=-1, keepdim=True) + 1e-20`
        let denominator = {
            let sum = top.f_sum_dim_intlist(Some(&[-1i64][..]), true, None::<Kind>)?;
            sum.f_add_scalar(1e-20)?
        };
        let normed = top.f_div(&denominator)?;
        drop(top);
        // `top_scores * self.route_scale`: Python wraps the float in an 8-byte double tensor,
        // and MulBackward0 keeps it (`other`) until the backward.
        // Under checkpointing the node is made too (torch's non-reentrant checkpoint runs the
        // forward with grad), and a wrapped number is saved as it is, past the checkpoint's
        // pack hook, so the 8 bytes stay until the block's backward: kept here with the
        // block's input (see `recompute`).
        let scale = Tensor::from(ROUTE_SCALE);
        let scaled = normed.f_mul(&scale)?;
        if let Some(j) = self.no_grad_block.get() {
            self.scales.borrow_mut().insert(j, scale);
        }
        drop(normed);
        // torch.histc(selected.view(-1), bins=E, min=0, max=E): bincount on CPU (patch 1)
        let counts = selected
            .f_view([-1])?
            .f_bincount(None::<Tensor>, self.experts)?;
        drop((choice, values, denominator, scores));
        Ok((scaled, selected, counts))
    }

    /// `GroupedExperts.forward` through `indices_padding_wrapper` (utils.py l.69-97): permute
    /// with padding, the grouped matmuls, unpermute. Returns `out_unpermuted[:-1]`.
    fn experts(&self, l: &[Tensor], x: &Tensor, counts: &Tensor) -> TResult<Tensor> {
        let local = l[W1].size()[0];
        let ep_degree = counts.size()[0] / local;
        // _permute (utils.py l.42-59)
        let padded_max_len = round_up(x.size()[0] + local * ALIGN, ALIGN);
        let (permuted_indices, m_sizes, offsets) = tch::no_grad(|| {
            generate_permute_indices(counts, local, ep_degree, padded_max_len, ALIGN)
        })?;
        let stacked = {
            let zeros = x.f_new_zeros([x.size()[1]], (Kind::Float, Device::Cpu))?;
            Tensor::f_vstack(&[x, &zeros])?
        };
        let input_shape = stacked.size();
        let permuted = stacked.f_index(&[Some(&permuted_indices)])?;
        drop(stacked);
        // `_offsets` goes with _permute's frame
        drop(offsets);
        let out = run_experts_grouped_mm(&l[W1], &l[W2], &l[W3], &permuted, &m_sizes)?;
        // _unpermute (utils.py l.62-66)
        let unpermuted = out.f_new_empty(input_shape.as_slice(), (Kind::Float, Device::Cpu))?;
        let unpermuted =
            unpermuted
                .shallow_clone()
                .f_index_put_(&[Some(&permuted_indices)], &out, false)?;
        let result = unpermuted.f_narrow(0, 0, input_shape[0] - 1)?;
        drop((out, unpermuted, permuted, m_sizes, permuted_indices));
        Ok(result)
    }

    /// Recomputes block `tag` from its kept input with autograd and runs its backward with the
    /// incoming gradient (as [`super::tensor_parallel`]'s checkpointing).
    fn recompute(&self, tag: i64, grad: Tensor) -> TResult<Option<Tensor>> {
        let x = self
            .inputs
            .borrow_mut()
            .remove(&tag)
            .expect("checkpointed block kept its input");
        let xd = x.f_detach()?.f_set_requires_grad(true)?;
        drop(x);
        let seq = xd.size()[1];
        let y = tch::with_grad(|| self.block(tag as usize, &xd, seq))?;
        ffi::storage_resize(&y, 0).map_err(shim)?;
        ffi::backward(&[&y], &[Some(&grad)]).map_err(shim)?;
        drop((y, grad));
        // The original forward's MulBackward0 of the route scale has run: its scalar goes.
        drop(self.scales.borrow_mut().remove(&tag));
        ffi::take_grad(&xd).map_err(shim)
    }
}

/// `generate_permute_indices(..., use_cpu=True)` (kernels.py l.143-216) with
/// `fill_indices_cpu` (l.106-140): the int32 indices of `max_len` rows (-1, the zero row,
/// for padding), the padded rows per local expert (int32) and their running sum (int32).
fn generate_permute_indices(
    tokens_per_expert_group: &Tensor,
    experts_per_rank: i64,
    num_ranks: i64,
    max_len: i64,
    alignment: i64,
) -> TResult<(Tensor, Tensor, Tensor)> {
    let start_index_values = {
        let c = tokens_per_expert_group.f_cumsum(0, None::<Kind>)?;
        c.f_sub(tokens_per_expert_group)?
    };
    let total = {
        let t = tokens_per_expert_group
            .f_view([num_ranks, -1])?
            .f_sum_dim_intlist(Some(&[0i64][..]), false, None::<Kind>)?;
        t.f_clamp_min(alignment)?
    };
    // ((total + alignment - 1) // alignment * alignment).to(torch.int32)
    let m_sizes = {
        let a = total.f_add_scalar(alignment)?;
        let b = a.f_sub_scalar(1)?;
        drop(a);
        let c = b.f_floor_divide_scalar(alignment)?;
        drop(b);
        let d = c.f_mul_scalar(alignment)?;
        drop(c);
        d.f_to_kind(Kind::Int)?
    };
    let m_offsets = m_sizes.f_cumsum(0, None::<Kind>)?;
    let write_offsets = m_offsets.f_sub(&m_sizes)?;
    let permuted_indices = Tensor::f_full([max_len], -1, (Kind::Int, Device::Cpu))?;
    for e in 0..experts_per_rank {
        let mut write_start = write_offsets.f_int64_value(&[e])?;
        for r in 0..num_ranks {
            let i = r * experts_per_rank + e;
            let start_index = start_index_values.f_int64_value(&[i])?;
            let length = tokens_per_expert_group.f_int64_value(&[i])?;
            if length > 0 {
                let end = (write_start + length).min(max_len);
                let values = Tensor::f_arange_start(
                    start_index,
                    start_index + (end - write_start),
                    (Kind::Int, Device::Cpu),
                )?;
                permuted_indices
                    .f_narrow(0, write_start, end - write_start)?
                    .f_copy_(&values)?;
            }
            write_start += length;
        }
    }
    let offsets = m_offsets.f_to_kind(Kind::Int)?;
    drop((start_index_values, total, m_offsets, write_offsets));
    Ok((permuted_indices, m_sizes, offsets))
}

/// `_run_experts_grouped_mm` (moe.py l.113-130): bf16 grouped matmuls whatever the training
/// dtype; x cast once for w1 and again for w3, each weight cast for its matmul.
fn run_experts_grouped_mm(
    w1: &Tensor,
    w2: &Tensor,
    w3: &Tensor,
    x: &Tensor,
    num_tokens_per_expert: &Tensor,
) -> TResult<Tensor> {
    let offsets = num_tokens_per_expert.f_cumsum(0, Kind::Int)?;
    let gmm = |a: &Tensor, w: &Tensor| -> TResult<Tensor> {
        let wb = w.f_to_kind(Kind::BFloat16)?.f_transpose(-2, -1)?;
        a.f_internal_grouped_mm(&wb, Some(&offsets), None::<&Tensor>, None::<Kind>)
    };
    let h = {
        let xb = x.f_to_kind(Kind::BFloat16)?;
        let g = gmm(&xb, w1)?;
        drop(xb);
        g.f_silu()?
    };
    let h = {
        let xb = x.f_to_kind(Kind::BFloat16)?;
        let g = gmm(&xb, w3)?;
        drop(xb);
        let hm = h.f_mul(&g)?;
        drop((g, h));
        hm
    };
    let out = {
        let g = gmm(&h, w2)?;
        g.f_type_as(x)?
    };
    drop((h, offsets));
    Ok(out)
}

unsafe extern "C" fn ckpt_hook(
    user: *mut c_void,
    tag: i64,
    grad_in: *mut C_tensor,
    grad_out: *mut *mut C_tensor,
) -> c_int {
    // SAFETY: `user` is the MoeModel box that outlives every graph of the run.
    let m = &*(user as *const MoeModel);
    ffi::run_callback(
        grad_in,
        grad_out,
        "a checkpoint hook",
        |grad| m.recompute(tag, grad),
        |err| {
            m.error.borrow_mut().get_or_insert(err);
        },
    )
}

/// A counted copy of an uncounted weight, as a leaf that requires grad.
fn counted_leaf(full: &Tensor) -> TResult<Tensor> {
    let p = Tensor::f_empty(full.size().as_slice(), (Kind::Float, Device::Cpu))?;
    tch::no_grad(|| p.shallow_clone().f_copy_(full))?;
    p.f_set_requires_grad(true)
}

/// The optimizer pre-step hook of `build_optimizers_with_moe_load_balancing`
/// (components/optimizer.py l.367-436), on one process (no loss mesh to all-reduce over).
fn update_expert_bias(m: &MoeModel, recomputed: bool) -> TResult<()> {
    let _ng = tch::no_grad_guard();
    let list = m
        .tokens_per_expert
        .iter()
        .map(|t| {
            if recomputed {
                // the recompute counted every token again
                t.f_floor_divide_scalar(2)
            } else {
                Ok(t.shallow_clone())
            }
        })
        .collect::<TResult<Vec<_>>>()?;
    let by_layer = Tensor::f_vstack(&list)?;
    drop(list);
    for (i, (bias, count)) in m.expert_bias.iter().zip(&m.tokens_per_expert).enumerate() {
        let t = by_layer.f_select(0, i as i64)?;
        let delta = {
            let mean = t.f_mean(None::<Kind>)?;
            let diff = mean.f_sub(&t)?;
            drop(mean);
            let sign = diff.f_sign()?;
            drop(diff);
            sign.f_mul_scalar(LOAD_BALANCE_COEFF)?
        };
        let centred = {
            let mean = delta.f_mean(None::<Kind>)?;
            delta.f_sub(&mean)?
        };
        drop(delta);
        let _ = bias.shallow_clone().f_add_(&centred)?;
        let _ = count.shallow_clone().f_zero_()?;
    }
    Ok(())
}

/// Runs `plan`'s MoE model on this process for `opts.steps` steps (see the module doc).
pub fn train_moe(plan: &Plan, opts: &TrainOptions) -> Result<TrainReport> {
    let rt = |e: tch::TchError| Error::runtime(format!("trainer: {e}"));
    if opts.device != super::TrainDevice::Cpu {
        return Err(Error::input(
            "--device cpu for MoE models: the reference runs torch._grouped_mm on CPU",
        ));
    }
    if opts.record_trace {
        return Err(Error::input(
            "--trace is not recorded for MoE models yet (the peaks are reported)",
        ));
    }
    let m = &plan.model;
    let moe = m.moe.as_ref().expect("a MoE model");
    let env = Env {
        device: Device::Cpu,
        compute: Kind::Float,
        reduce: Kind::Float,
        master: Kind::Float,
        world: 1,
        rank: 0,
        peers: false,
        offload: Offload::None,
    };
    let _default = ffi::channel(Channel::Device);
    let meter = Meter::new(None)?;
    let _limit = opts.device_limit.map(|limit| {
        let base = ffi::counter(Channel::Device).0;
        ffi::device_limit(Some(base.saturating_add(limit)))
    });
    tch::manual_seed(opts.seed as i64);

    let (h, q, kv) = (m.hidden as i64, m.q_dim() as i64, m.kv_dim() as i64);
    let (e, f) = (moe.experts as i64, moe.expert_intermediate as i64);
    let setup_start = meter.start()?;
    let (leaves, expert_bias, tokens_per_expert, freqs) = (|| -> TResult<_> {
        let shapes: [Vec<i64>; PER_BLOCK] = [
            vec![q, h],
            vec![kv, h],
            vec![kv, h],
            vec![h, q],
            vec![h],
            vec![h],
            vec![e, f, h],
            vec![e, h, f],
            vec![e, f, h],
            vec![e, h],
        ];
        let draw = |shape: &[i64]| -> TResult<Tensor> {
            let _off = ffi::channel(Channel::Off);
            if shape.len() == 1 {
                Tensor::f_ones(shape, (Kind::Float, Device::Cpu))
            } else {
                Tensor::f_randn(shape, (Kind::Float, Device::Cpu))?.f_mul_scalar(0.02)
            }
        };
        let mut leaves = Vec::new();
        let (mut bias, mut counts) = (Vec::new(), Vec::new());
        // model.parameters(): tok_embeddings, the blocks, norm, output
        leaves.push(counted_leaf(&draw(&[m.vocab as i64, h])?)?);
        for _ in 0..m.layers {
            for s in &shapes {
                leaves.push(counted_leaf(&draw(s)?)?);
            }
            bias.push(Tensor::f_zeros([e], (Kind::Float, Device::Cpu))?);
            counts.push(Tensor::f_zeros([e], (Kind::Float, Device::Cpu))?);
        }
        leaves.push(counted_leaf(&draw(&[h])?)?);
        leaves.push(counted_leaf(&draw(&[m.vocab as i64, h])?)?);
        let rows = match plan.implementation.rotary {
            crate::plan::Rotary::ComplexSeq => plan.batch.seq_len,
            _ => 2 * plan.batch.seq_len,
        };
        let freqs = model::precompute_freqs_cis(m.head_dim as i64, rows as i64, Device::Cpu)?;
        Ok((leaves, bias, counts, freqs))
    })()
    .map_err(rt)?;
    let setup = meter.finish(setup_start)?;
    let mut shards: Vec<Shard> = leaves
        .iter()
        .map(|p| Shard {
            data: p.shallow_clone(),
            view: p.shallow_clone(),
            rows: p.size()[0],
            grad: None,
            state: Vec::new(),
            step: None,
        })
        .collect();
    let n_block = PER_BLOCK * m.layers as usize;
    let flavor = Flavor {
        gqa: plan.implementation.gqa,
        logits: plan.implementation.logits,
    };
    let model = Box::new(MoeModel {
        dims: Dims::new(m),
        flavor,
        experts: e,
        top_k: moe.top_k as i64,
        freqs,
        leaves: leaves.iter().map(Tensor::shallow_clone).collect(),
        expert_bias,
        tokens_per_expert,
        inputs: RefCell::new(HashMap::new()),
        no_grad_block: std::cell::Cell::new(None),
        scales: RefCell::new(HashMap::new()),
        error: RefCell::new(None),
    });
    let cfg = OptConfig {
        kind: plan.optimizer,
        imp: plan.implementation.optimizer,
        lr: opts.lr.unwrap_or_else(|| default_lr(m.hidden)),
    };
    let (b, s) = (plan.batch.micro_batch_size, plan.batch.seq_len);
    let ac = plan.activation_checkpointing;

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
        shards.iter_mut().for_each(|sh| sh.grad = None);
        let mut fwd_m: Option<PhaseMemory> = None;
        let mut bwd_m: Option<PhaseMemory> = None;
        let start = meter.start()?;
        let fwd = (|| -> TResult<(Tensor, Tensor, Tensor)> {
            let toks = {
                let _off = ffi::channel(Channel::Off);
                let all = synthetic_tokens(opts.seed, step - 1, b, s, m.vocab);
                Tensor::from_slice(&all).f_view([b as i64, s as i64 + 1])?
            };
            let inp = env.copy_to(&toks.f_narrow(1, 0, s as i64)?, Place::Device)?;
            let labels = env.copy_to(&toks.f_narrow(1, 1, s as i64)?, Place::Device)?;
            drop(toks);
            // `inp, labels = ...` rebinds: the previous step's are freed; its `loss` lives
            // until the new one is bound.
            let prev_loss = live.take().map(|(_, _, l)| l);
            let mut h = model::embed_with(&inp, &leaves[0])?;
            for j in 0..m.layers as usize {
                h = if checkpointed(ac, j as u64) {
                    model.no_grad_block.set(Some(j as i64));
                    let y = tch::no_grad(|| model.block(j, &h, s as i64));
                    model.no_grad_block.set(None);
                    let y = y?;
                    let user = &*model as *const MoeModel as *mut c_void;
                    // SAFETY: the model box outlives the graph (it lives as long as the run).
                    let y = unsafe { ffi::checkpoint_link(&h, &y, j as i64, ckpt_hook, user) }
                        .map_err(shim)?;
                    model
                        .inputs
                        .borrow_mut()
                        .insert(j as i64, h.shallow_clone());
                    y
                } else {
                    model.block(j, &h, s as i64)?
                };
            }
            let pred = model::head_with(h, &leaves[1 + n_block], &leaves[2 + n_block], flavor)?;
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
                let hooked = model.error.borrow_mut().take();
                return Err(hooked.unwrap_or(tch::TchError::Torch(e.0)));
            }
            for sh in shards.iter_mut() {
                sh.grad = ffi::take_grad(&sh.view).map_err(shim)?;
            }
            Ok(())
        })();
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

        // The gradient norm and loss, uncounted.
        let (norm, loss) = (|| -> TResult<(f64, f64)> {
            let _off = ffi::channel(Channel::Off);
            let mut sq = 0.0;
            for sh in &shards {
                if let Some(g) = &sh.grad {
                    sq += g
                        .f_to_kind(Kind::Double)?
                        .f_square()?
                        .f_sum(Kind::Double)?
                        .f_double_value(&[])?;
                }
            }
            let loss = live.as_ref().expect("set above").2.f_double_value(&[])?;
            Ok((sq.sqrt(), loss))
        })()
        .map_err(rt)?;

        let warmup = (opts.steps / 10).max(1);
        let cfg = OptConfig {
            lr: cfg.lr * (step.min(warmup) as f64 / warmup as f64),
            ..cfg
        };
        let start = meter.start()?;
        let r = update_expert_bias(&model, ac == Checkpointing::Full).and_then(|()| {
            let mut all: Vec<&mut Shard> = shards.iter_mut().collect();
            optim::step(&cfg, &env, &mut all, false)
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
        steps.push(StepReport {
            step,
            loss,
            grad_norm: norm,
            peak_allocated_bytes: forward
                .peak_allocated_bytes
                .max(backward.peak_allocated_bytes)
                .max(opt.peak_allocated_bytes),
            forward,
            backward,
            optimizer: opt,
        });
        tokens_done += b * s;
        if opts.progress_lines {
            eprintln!("memplan-progress {step} {} {loss}", opts.steps);
        }
    }
    drop(live);
    let elapsed = started.elapsed().as_secs_f64();
    let peak = |f: fn(&PhaseMemory) -> u64| {
        steps
            .iter()
            .flat_map(|s| [f(&s.forward), f(&s.backward), f(&s.optimizer)])
            .max()
            .unwrap_or(0)
    };
    let notes = vec![
        format!(
            "torchtitan 0.2.2's MoE on one process: {e} experts, top-{}, dropless (no capacity \
             factor), grouped_mm in bf16 with rows padded to multiples of {ALIGN}, \
             load-balancing expert bias",
            moe.top_k
        ),
        "CPU run: exact live bytes of a counting allocator (requested sizes); torch.optim's \
         step scalars are counted as host bytes, as on a GPU"
            .into(),
    ];
    Ok(TrainReport {
        model: m.name.clone(),
        device: opts.device,
        dp_shard: 1,
        rank: 0,
        processes: 1,
        pp_stage: None,
        steps_requested: opts.steps,
        steps_completed: steps.len() as u64,
        setup_allocated_bytes: setup.end_allocated_bytes,
        setup_host_bytes: meter.host(),
        first_step: steps.first().cloned(),
        steady_step: steps.last().cloned(),
        losses: steps.iter().map(|s| s.loss).collect(),
        peak_allocated_bytes: peak(|p| p.peak_allocated_bytes),
        peak_reserved_bytes: None,
        peak_host_bytes: peak(|p| p.peak_host_bytes),
        tokens_per_second: if elapsed > 0.0 {
            tokens_done as f64 / elapsed
        } else {
            0.0
        },
        oom,
        notes,
        steps,
        trace: None,
    })
}
