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
//!
//! # Expert parallelism (EP = dp_shard > 1, one process per rank)
//! As torchtitan 0.2.2 parallelizes a MoE Llama (models/llama4/infra/parallelize.py: EP, AC,
//! then FSDP), with EP borrowing the dp_shard ranks:
//! - Each rank holds `E / ep` experts (`ExpertParallel._partition_fn`, Shard(0)) and its own
//!   rows of the batch. `_token_dispatch` (distributed/expert_parallel.py l.102-166) exchanges
//!   the per-expert counts (`all_to_all_single`, no grad: an (E,) int64 output), sums them per
//!   rank into the splits, sends the routed rows (`all_to_all_single_autograd`: a `new_empty`
//!   of the rows received, R) and `_permute`s them into `P = round_up(R + 8 E_local, 8)` padded
//!   rows; the grouped matmuls run without the padding wrapper (the weights are DTensors on
//!   the "ep" mesh); `_token_combine` unpermutes (R + 1 rows) and sends the rows back (a
//!   `new_empty` of `N k` rows). Both all-to-alls are c10d's `alltoall_base` through the shim
//!   (csrc/dist.cpp), autograd nodes whose backward sends the gradient back the other way into
//!   a new tensor of the input's rows (c10d Functional.cpp `AllToAllSingle`). The padded rows,
//!   their counts per local expert and the experts' output live until the combine returns
//!   (`Module._call_impl` holds the arguments `input_fn` returned and the output);
//!   `permuted_indices` lives on the ParallelStyle until the layer's next dispatch.
//! - FSDP (`apply_fsdp` l.324-490, torch 2.11 `fully_shard`, [`fsdp`]): tok_embeddings, each
//!   block without its experts, and [norm, output] on the dp_shard mesh; each block's experts
//!   on the one-rank efsdp mesh, FSDP2's world-size-1 path: no all-gather, each parameter's own
//!   unsharded copy made at `wait_for_unshard`, and a "reduce-scatter" that is
//!   `reduce_output.copy_(input / 1.0)` (torchtitan's gradient divide factor 1, run as SUM).
//!   Embedding and blocks reshard after forward, [norm, output] stay gathered; torchtitan's
//!   explicit prefetch (forward: embedding -> block 0, block j -> block j + 1 and its experts,
//!   the last block -> [norm, output]; backward the reverse, [norm, output] -> the last block).
//!   FSDP2's one comm context (the forward all-gather output and the reduce-scatter input it
//!   holds) is shared by both meshes' units: each side frees the other's before it sets its
//!   own. A recompute (full AC) does not reshard the experts after their forward (`is_bw()`).
//! - The load-balancing hook sums the counts over the ranks (`all_reduce` in place).
//!
//! The rows each rank receives depend on the data and set the peaks; the trainer's draws and
//! batches are reproduced by `ep_reference.py` (`"data": "trainer"`), so tests/expert_parallel.rs
//! compares every rank's every phase with torch's on the same routing. The report notes the
//! rows each layer received.
//!
//! # Known differences from torch, kept
//! - torch.optim's `state["step"]` scalars (4 bytes per parameter tensor) are CPU tensors,
//!   counted as device bytes by the CPU reference and as host bytes here (as on a GPU).
//! - c10d's `ProcessGroup::barrier` keeps a 1-byte tensor that the reference's
//!   `dist.barrier()` makes; a single process here has no process group, and under EP the
//!   trainer's barrier goes to the Gloo backend directly.
//! - Under EP, Gloo's temporaries of FSDP's all-gather and reduce-scatter are made on the
//!   training thread as in tensor_parallel.rs (`MEMPLAN_GLOO_TEMPORARIES=0` leaves them out,
//!   as on NCCL). On a CPU run the reference's Gloo work objects now and then keep a dispatch's
//!   buffers alive a little longer (up to ~220 kB, run to run); the records keep each phase's
//!   least of three runs.

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
use super::model::{self, BlockWeights, Dims, Flavor, Local, TResult};
use super::optim::{self, OptConfig};
use super::{
    checkpointed, default_lr, first_line, is_oom, steps_peak, synthetic_tokens, tokens_per_second,
    unsupported, OomReport, Phase, StepReport, TrainOptions, TrainReport,
};
use crate::error::{Error, Result};
use crate::plan::{Checkpointing, DType, Logits, Offload, Plan};
use crate::trace::Module;

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
    let one = p.ep == 1 && p.dp_shard == 1;
    let ep = p.ep > 1 && p.dp_shard == p.ep && moe.experts % p.ep == 0;
    if !(one || ep) || p.dp_replicate != 1 || p.tp != 1 || p.pp != 1 || p.cp != 1 {
        return Err(unsupported(
            "parallel",
            format!(
                "ep {} x dp_shard {} x dp_replicate {} x tp {} x pp {} x cp {}",
                p.ep, p.dp_shard, p.dp_replicate, p.tp, p.pp, p.cp
            ),
            "ep 1 on one process, or ep = dp_shard over that many processes (torchtitan's EP \
             borrowing the dp_shard ranks, the experts on a one-rank efsdp mesh), with ep \
             dividing the experts",
        ));
    }
    if !matches!(
        plan.activation_checkpointing,
        Checkpointing::None | Checkpointing::Full
    ) {
        return Err(unsupported(
            "activation_checkpointing",
            format!("\"{}\"", plan.activation_checkpointing),
            "none or full for MoE models",
        ));
    }
    if m.tied_embeddings || m.qkv_bias || m.o_bias || m.mlp_bias {
        return Err(unsupported(
            "model",
            &m.name,
            "untied embeddings and bias-free projections for MoE models",
        ));
    }
    if matches!(
        plan.implementation.logits,
        Logits::FloatOutputKept | Logits::FloatInLossKept
    ) {
        return Err(unsupported(
            "implementation.logits",
            format!("\"{}\"", plan.implementation.logits),
            "a loop that does not keep its logits (`del pred`, as torchtitan's) for MoE models",
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
            format!("\"{}\" / {}", plan.offload, plan.batch.grad_accum_steps),
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
    /// This rank's experts (`E / ep`) and the experts' inner width.
    local_experts: i64,
    expert_inter: i64,
    /// Expert parallelism with FSDP over the ranks (EP > 1), else None.
    ep: Option<EpRun>,
    /// Whether a checkpointed block is being recomputed (FSDP2's post-forward does not
    /// reshard then: `is_bw()`, _fsdp_param_group.py:458-463).
    recomputing: std::cell::Cell<bool>,
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
        let routed_output = match &self.ep {
            None => self.experts(l, &routed_input, &counts_sorted)?,
            Some(ep) => self.experts_ep(ep, j, l, &routed_input, &counts_sorted)?,
        };
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
        let local = self.local_experts;
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
        let [w1, w2, w3] = self.expert_weights(l)?;
        let out = run_experts_grouped_mm(&w1, &w2, &w3, &permuted, &m_sizes)?;
        drop((w1, w2, w3));
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

    /// `GroupedExperts` under `ExpertParallel` and FSDP2 (torchtitan
    /// distributed/expert_parallel.py l.89-192, torch 2.11 fsdp/_fully_shard): FSDP's
    /// pre-forward (its hook runs before ExpertParallel's `input_fn`) unshards this layer's
    /// experts on their one-rank mesh; `_token_dispatch` exchanges the counts and the rows;
    /// `_permute` pads them per local expert; the grouped matmuls run without the padding
    /// wrapper (the weights are DTensors on the "ep" mesh, moe.py l.166-176);
    /// `_token_combine` unpermutes and sends the rows back; FSDP's post-forward reshards the
    /// experts (not in a recompute). Returns the combined rows, `N k` of them.
    fn experts_ep(
        &self,
        ep: &EpRun,
        j: usize,
        l: &[Tensor],
        x: &Tensor,
        counts: &Tensor,
    ) -> TResult<Tensor> {
        let (local, degree, dim) = (self.local_experts, ep.degree, self.dims.hidden);
        let grad = x.requires_grad();
        // FSDPParamGroup.pre_forward: unshard + wait_for_unshard (world size 1: each
        // parameter's own unsharded copy), which frees the forward all-gather output held
        // in the shared comm context (`_fsdp_param_group.py:360-363`) when it proceeds.
        {
            let mut ex = ep.experts.borrow_mut();
            if !ex.groups[j].unsharded {
                ep.main.borrow_mut().root_post_forward();
            }
            ex.wait_for_unshard(j, true)?;
        }
        // `_register_post_backward_hook` on the module's inputs.
        let x = if grad {
            ep.boundary(self, x, POST_EXPERTS, j)?
        } else {
            x.shallow_clone()
        };
        // _token_dispatch: the counts exchanged (all_to_all_single, no grad), the splits.
        let (group_counts, input_splits, output_splits) = tch::no_grad(|| -> TResult<_> {
            let group_counts = counts.f_empty_like()?;
            ep.pg().all_to_all_into(&group_counts, counts, &[], &[])?;
            let sums = |t: &Tensor| -> TResult<Vec<i64>> {
                let s = t.f_view([degree, -1])?.f_sum_dim_intlist(
                    Some(&[1i64][..]),
                    false,
                    None::<Kind>,
                )?;
                (0..degree).map(|i| s.f_int64_value(&[i])).collect()
            };
            let (inp, out) = (sums(counts)?, sums(&group_counts)?);
            Ok((group_counts, inp, out))
        })?;
        ep.splits.borrow_mut()[j] = (input_splits.clone(), output_splits.clone());
        let received: i64 = output_splits.iter().sum();
        ep.recv.borrow_mut()[j] = received;
        let routed = ep.all_to_all(self, &x, &output_splits, &input_splits, A2A_DISPATCH, j)?;
        drop(x);
        // _permute (utils.py l.42-59); ExpertParallel keeps `permuted_indices` until the
        // layer's next dispatch.
        let padded_max_len = round_up(received + local * ALIGN, ALIGN);
        let (permuted_indices, m_sizes, offsets) = tch::no_grad(|| {
            generate_permute_indices(&group_counts, local, degree, padded_max_len, ALIGN)
        })?;
        let stacked = {
            let zeros = routed.f_new_zeros([dim], (Kind::Float, Device::Cpu))?;
            Tensor::f_vstack(&[&routed, &zeros])?
        };
        drop(routed);
        let input_shape = stacked.size();
        let permuted = stacked.f_index(&[Some(&permuted_indices)])?;
        drop((stacked, offsets));
        ep.permuted.borrow_mut()[j] = Some(permuted_indices.shallow_clone());
        drop(group_counts);
        let [w1, w2, w3] = self.expert_weights(l)?;
        let out = run_experts_grouped_mm(&w1, &w2, &w3, &permuted, &m_sizes)?;
        drop((w1, w2, w3));
        // _token_combine: _unpermute (utils.py l.62-66), then the rows sent back.
        let unpermuted = out.f_new_empty(input_shape.as_slice(), (Kind::Float, Device::Cpu))?;
        let unpermuted =
            unpermuted
                .shallow_clone()
                .f_index_put_(&[Some(&permuted_indices)], &out, false)?;
        drop(permuted_indices);
        let rows = unpermuted.f_narrow(0, 0, input_shape[0] - 1)?;
        let combined = ep.all_to_all(self, &rows, &input_splits, &output_splits, A2A_COMBINE, j)?;
        // The module's arguments (the padded rows and their counts per local expert, which
        // `input_fn` returned) and its output live in `Module._call_impl` until the output
        // hook (the combine) returns.
        drop((rows, unpermuted, out, permuted, m_sizes));
        // FSDPParamGroup.post_forward (not in a recompute), then the pre-backward hook on
        // the output.
        if !self.recomputing.get() {
            ep.experts.borrow_mut().reshard(j)?;
        }
        if combined.requires_grad() {
            ep.boundary(self, &combined, PRE_EXPERTS, j)
        } else {
            Ok(combined)
        }
    }

    /// This rank's expert weights as `(E_local, f, h)`, `(E_local, h, f)`, `(E_local, f, h)`
    /// views of the leaves (which FSDP keeps two-dimensional under EP).
    fn expert_weights(&self, l: &[Tensor]) -> TResult<[Tensor; 3]> {
        let (e, f, h) = (self.local_experts, self.expert_inter, self.dims.hidden);
        Ok([
            l[W1].f_view([e, f, h])?,
            l[W2].f_view([e, h, f])?,
            l[W3].f_view([e, f, h])?,
        ])
    }

    /// Recomputes block `tag` from its kept input with autograd and runs its backward with the
    /// incoming gradient (as [`super::tensor_parallel`]'s checkpointing).
    fn recompute(&self, tag: i64, grad: Tensor) -> TResult<Option<Tensor>> {
        let x = self
            .inputs
            .borrow_mut()
            .remove(&tag)
            .expect("checkpointed block kept its input");
        let dx = super::recompute_block(x, grad, |xd| {
            self.recomputing.set(true);
            let y = self.block(tag as usize, xd, xd.size()[1]);
            self.recomputing.set(false);
            y
        })?;
        // The original forward's MulBackward0 of the route scale has run: its scalar goes.
        drop(self.scales.borrow_mut().remove(&tag));
        Ok(dx)
    }
}

/// Kinds of the EP backward hooks (tag = kind x [`TAG`] + index).
const A2A_DISPATCH: i64 = 1;
const A2A_COMBINE: i64 = 2;
const PRE: i64 = 3;
const POST: i64 = 4;
const PRE_EXPERTS: i64 = 5;
const POST_EXPERTS: i64 = 6;
const TAG: i64 = 1 << 32;

/// Expert parallelism over the `dp_shard` ranks with torchtitan's FSDP layout
/// (models/llama4/infra/parallelize.py `apply_fsdp`): `main` holds the units on the dp_shard
/// mesh (0 tok_embeddings, 1 + j block j without its experts, L + 1 [norm, output]);
/// `experts` one unit per block on the one-rank efsdp mesh. FSDP2 keeps one comm context
/// for all of them (one forward all-gather output, one reduce-scatter input held): each
/// side frees the other's before it sets its own.
struct EpRun {
    pg: *const ProcessGroup,
    degree: i64,
    layers: usize,
    main: RefCell<Fsdp>,
    experts: RefCell<Fsdp>,
    /// ExpertParallel's `input_splits` and `output_splits` per layer.
    splits: RefCell<Vec<(Vec<i64>, Vec<i64>)>>,
    /// ExpertParallel's `permuted_indices` per layer.
    permuted: RefCell<Vec<Option<Tensor>>>,
    /// Rows received by each layer's experts in the last dispatch.
    recv: RefCell<Vec<i64>>,
}

impl EpRun {
    fn pg(&self) -> &ProcessGroup {
        // SAFETY: the mesh outlives the run (train_moe borrows it for its whole body).
        unsafe { &*self.pg }
    }

    fn boundary(&self, m: &MoeModel, x: &Tensor, kind: i64, index: usize) -> TResult<Tensor> {
        let user = m as *const MoeModel as *mut c_void;
        // SAFETY: the model box outlives every graph (it lives as long as the run).
        unsafe { ffi::boundary(x, kind * TAG + index as i64, ep_hook, user) }.map_err(shim)
    }

    /// `all_to_all_single_autograd` (torch distributed/_functional_collectives.py l.510-549,
    /// c10d Functional.cpp): the output a `new_empty` of the received rows, filled by
    /// `alltoall_base`; its backward sends the gradient back the other way into a new
    /// tensor of the input's rows.
    fn all_to_all(
        &self,
        m: &MoeModel,
        x: &Tensor,
        out_splits: &[i64],
        in_splits: &[i64],
        kind: i64,
        j: usize,
    ) -> TResult<Tensor> {
        let rows: i64 = out_splits.iter().sum();
        let out = Tensor::f_empty([rows, x.size()[1]], (Kind::Float, Device::Cpu))?;
        tch::no_grad(|| self.pg().all_to_all_into(&out, x, out_splits, in_splits))?;
        if !x.requires_grad() {
            return Ok(out);
        }
        let user = m as *const MoeModel as *mut c_void;
        // SAFETY: as `boundary`.
        unsafe { ffi::checkpoint_link(x, &out, kind * TAG + j as i64, ep_hook, user) }.map_err(shim)
    }

    /// The backward of a dispatch or combine: the gradient's rows sent back.
    fn all_to_all_back(&self, kind: i64, j: usize, grad: Tensor) -> TResult<Tensor> {
        let (input_splits, output_splits) = self.splits.borrow()[j].clone();
        // dispatch: received rows (output_splits) go back as input_splits; combine: reverse
        let (out_s, in_s) = if kind == A2A_DISPATCH {
            (input_splits, output_splits)
        } else {
            (output_splits, input_splits)
        };
        let rows: i64 = out_s.iter().sum();
        let g = grad.f_contiguous()?;
        let out = Tensor::f_empty([rows, g.size()[1]], (Kind::Float, Device::Cpu))?;
        self.pg().all_to_all_into(&out, &g, &out_s, &in_s)?;
        drop((g, grad));
        Ok(out)
    }

    /// FSDPState's pre-backward of main unit `g`: unshard (a no-op when still unsharded),
    /// then the explicit backward prefetch torchtitan sets under EP
    /// (parallelize.py l.471-490): [norm, output] -> the last block; block j -> block j - 1
    /// and its experts (an unshard of a one-rank unit allocates nothing); block 0 ->
    /// tok_embeddings.
    fn pre_backward(&self, g: usize) -> TResult<()> {
        let mut f = self.main.borrow_mut();
        f.wait_for_unshard(g, false)?;
        let l = self.layers;
        if g == l + 1 {
            f.unshard(l)?;
        } else if g >= 2 {
            f.unshard(g - 1)?;
            self.experts.borrow_mut().unshard(g - 2)?;
        } else if g == 1 {
            f.unshard(0)?;
        }
        Ok(())
    }

    fn post_backward(&self, g: usize) -> TResult<()> {
        self.experts.borrow_mut().finish_backward();
        self.main.borrow_mut().post_backward(g)
    }

    fn on_backward(&self, tag: i64, grad: Tensor) -> TResult<Option<Tensor>> {
        let (kind, i) = (tag / TAG, (tag % TAG) as usize);
        match kind {
            A2A_DISPATCH | A2A_COMBINE => return self.all_to_all_back(kind, i, grad).map(Some),
            PRE => self.pre_backward(i)?,
            POST => self.post_backward(i)?,
            PRE_EXPERTS => self.experts.borrow_mut().wait_for_unshard(i, false)?,
            POST_EXPERTS => {
                self.main.borrow_mut().finish_backward();
                self.experts.borrow_mut().post_backward(i)?;
            }
            _ => unreachable!("unknown EP hook tag {tag}"),
        }
        drop(grad);
        Ok(None)
    }
}

unsafe extern "C" fn ep_hook(
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
        "an EP hook",
        |grad| {
            m.ep.as_ref()
                .expect("EP hooks are made under EP")
                .on_backward(tag, grad)
        },
        |err| {
            m.error.borrow_mut().get_or_insert(err);
        },
    )
}

impl EpRun {
    /// FSDPState's pre-forward of main unit `g`: unshard and copy out, then torchtitan's
    /// explicit forward prefetch under EP (parallelize.py l.439-467): tok_embeddings ->
    /// block 0; block j -> block j + 1 and its experts; the last block -> [norm, output].
    fn pre_forward(&self, g: usize) -> TResult<()> {
        let mut f = self.main.borrow_mut();
        f.wait_for_unshard(g, true)?;
        let l = self.layers;
        if g == 0 {
            f.unshard(1)?;
        } else if g < l {
            f.unshard(g + 1)?;
            self.experts.borrow_mut().unshard(g)?;
        } else if g == l {
            f.unshard(l + 1)?;
        }
        Ok(())
    }

    /// Post-forward: tok_embeddings and the blocks reshard (`reshard_after_forward=True`
    /// without PP); [norm, output] stay gathered (True only under the "always" policy).
    fn post_forward(&self, g: usize) -> TResult<()> {
        if g <= self.layers {
            self.main.borrow_mut().reshard(g)?;
        }
        Ok(())
    }

    /// The root's final backward callback: the units whose post-backward did not run (the
    /// embedding, whose input needs no gradient) reduce now; the last reduce-scatter input
    /// is freed.
    fn finish_backward(&self) -> TResult<()> {
        self.post_backward(0)?;
        self.main.borrow_mut().finish_backward();
        self.experts.borrow_mut().finish_backward();
        Ok(())
    }

    /// The optimizer's shards in `model.parameters()` order: tok_embeddings; per block the
    /// attention, the norms, the experts, the router; the final norm and the output.
    fn with_shards<R>(&self, f: impl FnOnce(&mut [&mut Shard]) -> R) -> R {
        let mut main = self.main.borrow_mut();
        let mut experts = self.experts.borrow_mut();
        let mut main_groups = main.groups.iter_mut();
        let mut all: Vec<&mut Shard> = Vec::new();
        let emb = main_groups.next().expect("the embedding unit");
        all.extend(emb.params.iter_mut().map(|p| &mut p.local));
        for ex in experts.groups.iter_mut() {
            let block = main_groups.next().expect("a block unit");
            let mut b = block.params.iter_mut();
            for _ in 0..6 {
                all.push(&mut b.next().expect("attention and norms").local);
            }
            all.extend(ex.params.iter_mut().map(|p| &mut p.local));
            all.push(&mut b.next().expect("the router").local);
        }
        let tail = main_groups.next().expect("the [norm, output] unit");
        all.extend(tail.params.iter_mut().map(|p| &mut p.local));
        f(&mut all)
    }
}

/// torchtitan's `apply_fsdp` under EP (models/llama4/infra/parallelize.py l.324-427) over
/// the whole weights `full` (model order): tok_embeddings; per block the experts on the
/// one-rank efsdp mesh (this rank's `local` experts, kept 2-D) and the rest of the block on
/// the dp_shard mesh; [norm, output]. Returns the leaves the model computes with, in model
/// order, and the run.
fn ep_units(
    m: &crate::profiles::ModelSpec,
    env: &Env,
    mesh: &Mesh,
    full: &[Tensor],
    local: i64,
) -> TResult<(Vec<Tensor>, EpRun)> {
    let layers = m.layers as usize;
    let one = Env {
        world: 1,
        rank: 0,
        ..*env
    };
    // FSDP2's foreach_reduce keeps the loop's last gradient bound until it returns
    // (_fsdp_collectives.py:503-515, world size above 1).
    let held = |params: Vec<FsdpParam>, reshard: bool, module: Module| {
        let mut g = Group::new(params, reshard, module);
        g.held_in_reduce = Some(g.params.len() - 1);
        g
    };
    let mut main = vec![held(
        vec![FsdpParam::new(&full[0], env, Module::TokEmbeddings)?],
        true,
        Module::TokEmbeddings,
    )];
    let mut experts = Vec::new();
    for j in 0..layers {
        let b = &full[1 + j * PER_BLOCK..1 + (j + 1) * PER_BLOCK];
        let module = Module::Layer(j as u32);
        let params = [WQ, WK, WV, WO, ATTENTION_NORM, FFN_NORM, GATE]
            .iter()
            .map(|&i| FsdpParam::new(&b[i], env, module))
            .collect::<TResult<Vec<_>>>()?;
        main.push(held(params, true, module));
        let ex = [W1, W2, W3]
            .iter()
            .map(|&i| {
                let mine = {
                    let _off = ffi::channel(Channel::Off);
                    let t = b[i].f_narrow(0, env.rank * local, local)?;
                    let last = t.size()[2];
                    t.f_reshape([-1, last])?
                };
                FsdpParam::new(&mine, &one, module)
            })
            .collect::<TResult<Vec<_>>>()?;
        experts.push(Group::new(ex, true, module));
    }
    let n = full.len();
    main.push(held(
        vec![
            FsdpParam::new(&full[n - 2], env, Module::Norm)?,
            FsdpParam::new(&full[n - 1], env, Module::Output)?,
        ],
        false,
        Module::Root,
    ));
    let mut leaves = vec![main[0].params[0].leaf.shallow_clone()];
    for j in 0..layers {
        let b = &main[1 + j].params;
        leaves.extend(b[..6].iter().map(|p| p.leaf.shallow_clone()));
        leaves.extend(experts[j].params.iter().map(|p| p.leaf.shallow_clone()));
        leaves.push(b[6].leaf.shallow_clone());
    }
    leaves.extend(
        main[layers + 1]
            .params
            .iter()
            .map(|p| p.leaf.shallow_clone()),
    );
    // SAFETY: the mesh outlives the run. torchtitan sets gradient_divide_factor 1.0: a sum.
    let comm = unsafe { fsdp::GlooShard::new(&mesh.shard, false) };
    let run = EpRun {
        pg: &mesh.shard as *const ProcessGroup,
        degree: mesh.shard.size(),
        layers,
        main: RefCell::new(Fsdp::new(*env, main, Box::new(comm))),
        experts: RefCell::new(Fsdp::new(one, experts, Box::new(OneRank))),
        splits: RefCell::new(vec![(Vec::new(), Vec::new()); layers]),
        permuted: RefCell::new((0..layers).map(|_| None).collect()),
        recv: RefCell::new(vec![0; layers]),
    };
    Ok((leaves, run))
}

/// FSDP2 on a one-rank mesh (the experts' efsdp mesh at EP = dp_shard): nothing is gathered;
/// the "reduce-scatter" is `reduce_output.copy_(reduce_scatter_input / gradient_divide_factor)`
/// (torch 2.11 _fsdp_collectives.py:550-556, the factor 1.0 that torchtitan sets): a
/// temporary of the whole input for the division.
struct OneRank;

impl fsdp::Collectives for OneRank {
    fn world_size(&self) -> i64 {
        1
    }
    fn rank(&self) -> i64 {
        0
    }
    fn all_gather(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        _peer_input: &mut dyn FnMut(i64) -> TResult<Tensor>,
    ) -> TResult<()> {
        output.shallow_clone().f_copy_(input)?;
        Ok(())
    }
    fn reduce_scatter(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        _peer_output: &mut dyn FnMut(i64, Tensor) -> TResult<()>,
    ) -> TResult<()> {
        let divided = input.f_div_scalar(1.0)?;
        output.shallow_clone().f_copy_(&divided)?;
        Ok(())
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
    // Under EP the counts are summed over the loss mesh (dp_shard), in place.
    if let Some(run) = &m.ep {
        run.pg().all_reduce_sum(&by_layer)?;
    }
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
pub fn train_moe(plan: &Plan, opts: &TrainOptions, mesh: Option<&Mesh>) -> Result<TrainReport> {
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
    let degree = plan.parallel.ep as i64;
    let mesh = match (degree, mesh) {
        (1, _) => None,
        (_, Some(mesh)) => Some(mesh),
        (_, None) => {
            return Err(Error::input(format!(
                "expert parallelism (ep {degree}) runs over {degree} processes: launch with \
                 --nproc-per-node {degree}"
            )))
        }
    };
    let env = Env {
        device: Device::Cpu,
        compute: Kind::Float,
        reduce: Kind::Float,
        master: Kind::Float,
        world: mesh.map_or(1, |m| m.shard.size()),
        rank: mesh.map_or(0, |m| m.shard.rank()),
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
        // Under EP the whole weights stay uncounted: FSDP shards them below.
        let leaf = |t: Tensor| {
            if mesh.is_some() {
                Ok(t)
            } else {
                counted_leaf(&t)
            }
        };
        let mut leaves = Vec::new();
        let (mut bias, mut counts) = (Vec::new(), Vec::new());
        // model.parameters(): tok_embeddings, the blocks, norm, output
        leaves.push(leaf(draw(&[m.vocab as i64, h])?)?);
        for _ in 0..m.layers {
            for s in &shapes {
                leaves.push(leaf(draw(s)?)?);
            }
            bias.push(Tensor::f_zeros([e], (Kind::Float, Device::Cpu))?);
            counts.push(Tensor::f_zeros([e], (Kind::Float, Device::Cpu))?);
        }
        leaves.push(leaf(draw(&[h])?)?);
        leaves.push(leaf(draw(&[m.vocab as i64, h])?)?);
        let freqs = model::rotary_table(plan, Device::Cpu)?;
        Ok((leaves, bias, counts, freqs))
    })()
    .map_err(rt)?;
    let local_experts = e / degree;
    // Under EP: this rank's experts, and FSDP's units over the whole weights.
    let (leaves, ep_run) = match mesh {
        None => (leaves, None),
        Some(mesh) => {
            let (leaves, run) = ep_units(m, &env, mesh, &leaves, local_experts).map_err(rt)?;
            (leaves, Some(run))
        }
    };
    let setup = meter.finish(setup_start)?;
    let mut shards: Vec<Shard> = leaves
        .iter()
        .filter(|_| ep_run.is_none())
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
        local_experts,
        expert_inter: f,
        ep: ep_run,
        recomputing: std::cell::Cell::new(false),
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
        if let Some(run) = &model.ep {
            run.with_shards(|all| all.iter_mut().for_each(|sh| sh.grad = None));
        }
        if let Some(mesh) = mesh {
            mesh.world.barrier().map_err(rt)?;
        }
        let mut fwd_m: Option<PhaseMemory> = None;
        let mut bwd_m: Option<PhaseMemory> = None;
        let start = meter.start()?;
        let fwd = (|| -> TResult<(Tensor, Tensor, Tensor)> {
            // Under EP every rank reads its own rows of a micro-batch of dp_shard x b rows.
            let toks = {
                let _off = ffi::channel(Channel::Off);
                let all = synthetic_tokens(opts.seed, step - 1, b * env.world as u64, s, m.vocab);
                let t = Tensor::from_slice(&all).f_view([b as i64 * env.world, s as i64 + 1])?;
                t.f_narrow(0, env.rank * b as i64, b as i64)?
            };
            let inp = env.copy_to(&toks.f_narrow(1, 0, s as i64)?, Place::Device)?;
            let labels = env.copy_to(&toks.f_narrow(1, 1, s as i64)?, Place::Device)?;
            drop(toks);
            // `inp, labels = ...` rebinds: the previous step's are freed; its `loss` lives
            // until the new one is bound.
            let prev_loss = live.take().map(|(_, _, l)| l);
            let ep = model.ep.as_ref();
            if let Some(run) = ep {
                run.pre_forward(0)?;
            }
            let mut h = model::embed_with(&inp, &leaves[0])?;
            if let Some(run) = ep {
                run.post_forward(0)?;
                h = run.boundary(&model, &h, PRE, 0)?;
            }
            for j in 0..m.layers as usize {
                if let Some(run) = ep {
                    run.pre_forward(1 + j)?;
                    h = run.boundary(&model, &h, POST, 1 + j)?;
                }
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
                if let Some(run) = ep {
                    run.post_forward(1 + j)?;
                    h = run.boundary(&model, &h, PRE, 1 + j)?;
                }
            }
            let tail = m.layers as usize + 1;
            if let Some(run) = ep {
                run.pre_forward(tail)?;
                h = run.boundary(&model, &h, POST, tail)?;
            }
            let pred = model::head_with(h, &leaves[1 + n_block], &leaves[2 + n_block], flavor)?;
            let pred = match ep {
                Some(run) => {
                    let pred = run.boundary(&model, &pred, PRE, tail)?;
                    run.main.borrow_mut().root_post_forward();
                    pred
                }
                None => pred,
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
                let hooked = model.error.borrow_mut().take();
                return Err(hooked.unwrap_or(tch::TchError::Torch(e.0)));
            }
            if let Some(e) = model.error.borrow_mut().take() {
                return Err(e);
            }
            if let Some(run) = &model.ep {
                return run.finish_backward();
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
            let mut add = |all: &mut [&mut Shard]| -> TResult<()> {
                for sh in all.iter() {
                    if let Some(g) = &sh.grad {
                        sq += g
                            .f_to_kind(Kind::Double)?
                            .f_square()?
                            .f_sum(Kind::Double)?
                            .f_double_value(&[])?;
                    }
                }
                Ok(())
            };
            match &model.ep {
                Some(run) => run.with_shards(|all| add(all))?,
                None => add(&mut shards.iter_mut().collect::<Vec<_>>())?,
            }
            // Under EP every parameter element lives on one rank only (FSDP shards, this
            // rank's experts): the job's squared norm is the sum over the ranks.
            if let Some(mesh) = mesh {
                let t = Tensor::from_slice(&[sq]);
                mesh.world.all_reduce_sum(&t)?;
                sq = t.f_double_value(&[0])?;
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
        let r =
            update_expert_bias(&model, ac == Checkpointing::Full).and_then(|()| match &model.ep {
                Some(run) => run.with_shards(|all| optim::step(&cfg, &env, all, false)),
                None => {
                    let mut all: Vec<&mut Shard> = shards.iter_mut().collect();
                    optim::step(&cfg, &env, &mut all, false)
                }
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
    let mut notes = vec![
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
    if let Some(run) = &model.ep {
        notes.push(format!(
            "expert parallelism over {degree} ranks: rows received by this rank's experts in \
             the last step, by layer: {:?}",
            run.recv.borrow()
        ));
    }
    Ok(TrainReport {
        model: m.name.clone(),
        device: opts.device,
        dp_shard: env.world as u64,
        rank: mesh.map_or(0, |m| m.env.rank),
        processes: mesh.map_or(1, |m| m.env.world),
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
