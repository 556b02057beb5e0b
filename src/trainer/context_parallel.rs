//! Context parallelism across processes: the `cp` ranks of a data-parallel position each hold a
//! shard of every sequence and meet in ring attention, as torchtitan's train step runs torch
//! 2.11's `context_parallel` (`torch/distributed/tensor/experimental/_context_parallel/
//! _attention.py`, below `_attention.py`; `cp_reference.py` next to this file runs it on Gloo).
//! FSDP2 shards over dp_shard x cp (torchtitan's flattened "dp_shard_cp" mesh): the trainer's
//! own FSDP ([`super::fsdp`]) over a shard group of that size, rank = dp_shard rank x cp + cp
//! rank.
//!
//! # The context (`context_parallel`, `_attention.py` l.1498-1584)
//! Per micro-batch, before the forward, the input ids, the labels and the rotary table are
//! sharded in place with torch's head-tail load balancing (`_load_balancer.py`
//! `_HeadTailLoadBalancer`: of 2 cp chunks of the sequence, rank r keeps r and 2cp-1-r): an int32
//! index tensor of the sequence, `gather` (ids, labels) or `index_select` (the table) by it, the
//! rank's chunk cloned (`distribute_tensor(..., src_data_rank=None).to_local()`, placement_types.py
//! `_select_split_tensor`), cloned again, and the buffer `resize_`d to the shard and filled,
//! which keeps each storage whole. Until the context exits, after the backward, its generator
//! frame holds the table's clone for restoring, the three shards and the last clone
//! ([`Context`]); on exit the table is resized back and refilled.
//!
//! # Ring attention (custom autograd node, [`ffi::link3`])
//! SDPA's CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu` and its backward,
//! called through tch) in torch's ring: `_templated_ring_attention` (l.309-478) with its merger
//! (`_SDPAMerger`, l.138-223: log-sum-exp merge, `_partial_update`'s `cat` for the second half)
//! and rotater (all-gather, torchtitan's default: one `all_gather` of the local K‖V, its chunks
//! read in turn; all-to-all: a `permute_tensor` receive buffer per ring step), and
//! `_templated_ring_attention_backward` (l.481-646: fp32 `zeros_like` accumulators, K‖V rotated
//! as in forward, dK‖dV always by all-to-all). Python's bindings are mirrored: a name rebound
//! frees its old tensor after the new one exists, locals live until the function returns. The
//! node keeps what SDPA's autograd node keeps: q, k, v, the merged output and log-sum-exp.
//! A rank whose ring updates half its output (every rank but the last) returns the `cat`'s
//! contiguous `(b, h, s, d)` output, so the model's `transpose(1, 2).contiguous()` copies it.
//!
//! Collectives run on the Gloo `cp` group: an all-gather as one broadcast per rank into slices
//! of the output funcol allocates, an all-to-all (`permute_tensor`: each rank sends to the next)
//! as an isend / irecv pair into the output funcol allocates; neither allocates on the counted
//! thread otherwise, as NCCL would not.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_int, c_void};

use tch::Tensor;
use torch_sys::C_tensor;

use super::dist::ProcessGroup;
use super::ffi;
use super::fsdp::shim;
use super::model::{Collectives, Site, TResult};
use super::unsupported;
use crate::error::Result;
use crate::plan::{Checkpointing, CpRotate, DType, Gqa, Offload, Plan};

/// Refuses what the context-parallel trainer does not run, with the reason (the caller has
/// refused what no trainer runs).
pub fn check(plan: &Plan) -> Result<()> {
    let p = &plan.parallel;
    if p.pp != 1 || p.tp != 1 || p.dp_replicate != 1 {
        return Err(unsupported(
            "parallel.pp x tp x dp_replicate",
            p.pp * p.tp * p.dp_replicate,
            "1 under context parallelism: CP runs with FSDP over dp_shard x cp only",
        ));
    }
    // (A sequence that 2 x cp does not divide is refused by the plan itself.)
    if plan.implementation.gqa != Gqa::RepeatKv && plan.model.kv_heads != plan.model.heads {
        return Err(unsupported(
            "implementation.gqa",
            format!("\"{}\"", plan.implementation.gqa),
            "repeat-kv under context parallelism: the ring calls the CPU flash kernel, which \
             takes as many key heads as query heads",
        ));
    }
    if !matches!(
        plan.activation_checkpointing,
        Checkpointing::None | Checkpointing::Full
    ) {
        return Err(unsupported(
            "activation_checkpointing",
            format!("\"{}\"", plan.activation_checkpointing),
            "none or full under context parallelism",
        ));
    }
    if plan.offload != Offload::None {
        return Err(unsupported(
            "offload",
            format!("\"{}\"", plan.offload),
            "none under context parallelism",
        ));
    }
    let pr = &plan.precision;
    if pr.param != DType::Fp32 || pr.reduce != DType::Fp32 || pr.master != DType::Fp32 {
        return Err(unsupported(
            "precision",
            format!(
                "param {}, reduce {}, master {}",
                pr.param, pr.reduce, pr.master
            ),
            "fp32 throughout under context parallelism (the precision measured against torch)",
        ));
    }
    Ok(())
}

/// How K‖V travels around the ring in forward (`_RotateMethod`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rotate {
    AllGather,
    AllToAll,
}

/// What SDPA's autograd node keeps for its backward.
struct Saved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
}

/// Ring attention over a rank's `cp` group, and the nodes' saved tensors.
pub struct Ring {
    pg: *const ProcessGroup,
    rotate: Rotate,
    saved: RefCell<HashMap<i64, Saved>>,
    next_tag: Cell<i64>,
    error: RefCell<Option<tch::TchError>>,
}

impl Ring {
    /// Ring attention over `pg`, rotating K‖V as the plan says.
    ///
    /// # Safety
    /// `pg` must outlive the ring and every graph it links.
    pub unsafe fn new(pg: &ProcessGroup, plan: &Plan) -> Ring {
        Ring {
            pg: pg as *const ProcessGroup,
            rotate: match plan.parallel.cp_rotate {
                CpRotate::AllToAll => Rotate::AllToAll,
                CpRotate::AllGather => Rotate::AllGather,
            },
            saved: RefCell::new(HashMap::new()),
            next_tag: Cell::new(0),
            error: RefCell::new(None),
        }
    }

    fn pg(&self) -> &ProcessGroup {
        // SAFETY: see `new`.
        unsafe { &*self.pg }
    }

    /// The error a ring backward failed with, if one did.
    pub fn take_error(&self) -> Option<tch::TchError> {
        self.error.borrow_mut().take()
    }

    /// `context_parallel(cp_mesh, buffers=[inputs, labels, freqs_cis], buffer_seq_dims=[1, 1,
    /// 0], no_restore_buffers={inputs, labels})` up to its `yield` (`_attention.py`
    /// l.1553-1577): the three buffers sharded in place.
    pub fn enter(&self, input: &Tensor, labels: &Tensor, freqs: &Tensor) -> TResult<Context> {
        let _ng = tch::no_grad_guard();
        let (rank, cp) = (self.pg().rank(), self.pg().size());
        // original_buffers: the table's clone (inputs and labels are not restored).
        let original = clone(freqs)?;
        let seq = input.size()[1];
        // `_context_parallel_buffers` (l.1053-1159): the head-tail indices (int32, (1, seq)).
        let shards = {
            let k = seq / (2 * cp);
            let order: Vec<i32> = (0..cp)
                .flat_map(|r| {
                    let second = 2 * cp - r - 1;
                    (r * k..(r + 1) * k).chain(second * k..(second + 1) * k)
                })
                .map(|i| i as i32)
                .collect();
            let indices = Tensor::from_slice(&order).f_unsqueeze(0)?;
            let mut shards = Vec::with_capacity(3);
            let mut buffer: Option<Tensor> = None;
            for (t, seq_dim) in [(input, 1i64), (labels, 1), (freqs, 0)] {
                // The loop rebinds `buffer`: the previous rearranged copy goes first.
                drop(buffer.take());
                let rearranged = if seq_dim == 0 {
                    t.f_index_select(0, &indices.f_select(0, 0)?)?
                } else {
                    let idx = indices.f_expand(t.size().as_slice(), false)?;
                    t.f_gather(seq_dim, &idx, false)?
                };
                buffer = Some(rearranged);
                // distribute_tensor(buffer, mesh, [Shard(seq_dim)], src_data_rank=None)
                // .to_local(): this rank's chunk, cloned.
                let chunk = buffer
                    .as_ref()
                    .expect("set above")
                    .f_chunk(cp, seq_dim)?
                    .swap_remove(rank as usize);
                shards.push(clone(&chunk)?);
            }
            drop((buffer, indices));
            shards
        };
        // for buffer, shard in zip(buffers, shards): shard = shard.clone(); buffer.resize_;
        // buffer.copy_(shard). The loop rebinds `shard`: one clone at a time.
        let mut last: Option<Tensor> = None;
        for (t, shard) in [input, labels, freqs].into_iter().zip(&shards) {
            drop(last.take());
            let c = clone(shard)?;
            let mut b = t.shallow_clone();
            let _ = b.f_resize_(c.size().as_slice())?;
            b.f_copy_(&c)?;
            last = Some(c);
        }
        Ok(Context {
            original,
            _shards: shards,
            _last: last,
        })
    }

    /// The ring's forward (`_templated_ring_attention`, load-balanced and causal), without
    /// autograd: the merged output and log-sum-exp.
    fn ring_forward(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
    ) -> TResult<(Tensor, Tensor)> {
        let _ng = tch::no_grad_guard();
        let (rank, size) = (self.pg().rank(), self.pg().size());
        let (k_shape, v_shape) = (key.size(), value.size());
        let (nk, nv) = (key.numel() as i64, value.numel() as i64);
        // key = key.contiguous(); value = value.contiguous()
        let mut key = key.f_contiguous()?;
        let mut value = value.f_contiguous()?;
        let mut merger = Merger::default();
        let mut rotater = Rotater::new(self.rotate);
        let mut next_kv: Option<Tensor>;
        let (mut q, mut k, mut v): (Option<Tensor>, Option<Tensor>, Option<Tensor>) =
            (None, None, None);
        let (mut out, mut lse): (Option<Tensor>, Option<Tensor>) = (None, None);
        for i in 0..size {
            if i > 0 {
                next_kv = Some(rotater.next_buffer(rank, size)?);
                let buf = next_kv.as_ref().expect("set above");
                key = buf.f_narrow(0, 0, nk)?.f_reshape(k_shape.as_slice())?;
                value = buf.f_narrow(0, nk, nv)?.f_reshape(v_shape.as_slice())?;
            }
            if i < size - 1 {
                next_kv = Some(Tensor::f_cat(
                    &[key.f_flatten(0, -1)?, value.f_flatten(0, -1)?],
                    0,
                )?);
                rotater.exchange(self.pg(), next_kv.as_ref().expect("set above"))?;
                // `next_kv = rotater.exchange_buffers(next_kv)` binds None.
                drop(next_kv.take());
            }
            // `_is_causal_behavior` with load balancing: causal at step 0, else full.
            let (qi, ki, vi, partial) = if i == 0 {
                (
                    query.shallow_clone(),
                    key.shallow_clone(),
                    value.shallow_clone(),
                    false,
                )
            } else if i <= rank {
                (
                    query.shallow_clone(),
                    first_half(&key)?,
                    first_half(&value)?,
                    false,
                )
            } else {
                (
                    second_half(query)?,
                    key.shallow_clone(),
                    value.shallow_clone(),
                    true,
                )
            };
            q = Some(qi);
            k = Some(ki);
            v = Some(vi);
            let (o, l) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
                q.as_ref().expect("set"),
                k.as_ref().expect("set"),
                v.as_ref().expect("set"),
                0.0,
                i == 0,
                None::<Tensor>,
                None,
            )?;
            out = Some(o);
            lse = Some(l);
            merger.step(
                out.as_ref().expect("set"),
                lse.as_ref().expect("set"),
                partial,
            )?;
        }
        let r = merger.results()?;
        drop((q, k, v, out, lse, key, value, rotater));
        Ok(r)
    }

    /// The ring's backward (`_templated_ring_attention_backward`, load-balanced and causal):
    /// dq, dk, dv.
    fn ring_backward(&self, grad_out: &Tensor, s: &Saved) -> TResult<(Tensor, Tensor, Tensor)> {
        let _ng = tch::no_grad_guard();
        let (rank, size) = (self.pg().rank(), self.pg().size());
        let (query, out, logsumexp) = (&s.q, &s.out, &s.lse);
        let (k_shape, v_shape) = (s.k.size(), s.v.size());
        let (nk, nv) = (s.k.numel() as i64, s.v.numel() as i64);
        // accum_dtype float32 (convert_to_f32): fp32 zeros_like, strides preserved.
        let mut grad_query = query.f_zeros_like()?;
        let mut grad_key = s.k.f_zeros_like()?;
        let mut grad_value = s.v.f_zeros_like()?;
        let mut key = s.k.f_contiguous()?;
        let mut value = s.v.f_contiguous()?;
        let mut kv_rotater = Rotater::new(self.rotate);
        let mut dkv_rotater = Rotater::new(Rotate::AllToAll);
        let mut buffer: Option<Tensor> = None;
        let mut next_kv: Option<Tensor> = None;
        let mut next_grad_kv: Option<Tensor>;
        let mut sel: Option<[Tensor; 6]> = None;
        let mut grads_: Option<(Tensor, Tensor, Tensor)> = None;
        for i in 0..size {
            if i > 0 {
                buffer = Some(kv_rotater.next_buffer(rank, size)?);
                let b = buffer.as_ref().expect("set above");
                key = b.f_narrow(0, 0, nk)?.f_reshape(k_shape.as_slice())?;
                value = b.f_narrow(0, nk, nv)?.f_reshape(v_shape.as_slice())?;
            }
            if i != size - 1 {
                next_kv = Some(Tensor::f_cat(
                    &[key.f_flatten(0, -1)?, value.f_flatten(0, -1)?],
                    0,
                )?);
                kv_rotater.exchange(self.pg(), next_kv.as_ref().expect("set above"))?;
            }
            // q, k, v, out_, dout, lse = ...
            let chosen = if i == 0 {
                [
                    query.shallow_clone(),
                    key.shallow_clone(),
                    value.shallow_clone(),
                    out.shallow_clone(),
                    grad_out.shallow_clone(),
                    logsumexp.shallow_clone(),
                ]
            } else if i <= rank {
                [
                    query.shallow_clone(),
                    first_half(&key)?,
                    first_half(&value)?,
                    out.shallow_clone(),
                    grad_out.shallow_clone(),
                    logsumexp.shallow_clone(),
                ]
            } else {
                // "Need to make logsumexp contiguous, otherwise there will be numerical error."
                [
                    second_half(query)?,
                    key.shallow_clone(),
                    value.shallow_clone(),
                    second_half(out)?,
                    second_half(grad_out)?,
                    second_half(logsumexp)?.f_contiguous()?,
                ]
            };
            sel = Some(chosen);
            let [q, k, v, o, dout, lse] = sel.as_ref().expect("set above");
            let (gq, gk, gv) =
                Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(
                    dout,
                    q,
                    k,
                    v,
                    o,
                    lse,
                    0.0,
                    i == 0,
                    None::<Tensor>,
                    None,
                )?;
            grads_ = Some((gq, gk, gv));
            let (gq_, gk_, gv_) = grads_.as_ref().expect("set above");
            if i == 0 {
                let _ = grad_key.f_add_(gk_)?;
                let _ = grad_value.f_add_(gv_)?;
            } else {
                next_grad_kv = Some(dkv_rotater.next_buffer(rank, size)?);
                let b = next_grad_kv.as_ref().expect("set above");
                grad_key = b.f_narrow(0, 0, nk)?.f_reshape(k_shape.as_slice())?;
                grad_value = b.f_narrow(0, nk, nv)?.f_reshape(v_shape.as_slice())?;
                if i <= rank {
                    grad_key = partial_add(&grad_key, gk_, 0)?;
                    grad_value = partial_add(&grad_value, gv_, 0)?;
                } else {
                    let _ = grad_key.f_add_(gk_)?;
                    let _ = grad_value.f_add_(gv_)?;
                }
            }
            next_grad_kv = Some(Tensor::f_cat(
                &[grad_key.f_flatten(0, -1)?, grad_value.f_flatten(0, -1)?],
                0,
            )?);
            dkv_rotater.exchange(self.pg(), next_grad_kv.as_ref().expect("set above"))?;
            if i <= rank {
                let _ = grad_query.f_add_(gq_)?;
            } else {
                grad_query = partial_add(&grad_query, gq_, 1)?;
            }
        }
        // grad_query.to(query.dtype): fp32 already. next_grad_kv = dkv_rotater.next_buffer().
        next_grad_kv = Some(dkv_rotater.next_buffer(rank, size)?);
        let b = next_grad_kv.as_ref().expect("set above");
        let grad_key = b.f_narrow(0, 0, nk)?.f_reshape(k_shape.as_slice())?;
        let grad_value = b.f_narrow(0, nk, nv)?.f_reshape(v_shape.as_slice())?;
        drop((buffer, next_kv, next_grad_kv, sel, grads_, key, value));
        drop((kv_rotater, dkv_rotater));
        Ok((grad_query, grad_key, grad_value))
    }

    fn backward(&self, tag: i64, grad: Tensor) -> TResult<[Tensor; 3]> {
        let saved = self
            .saved
            .borrow_mut()
            .remove(&tag)
            .expect("ring attention kept its inputs");
        let (dq, dk, dv) = self.ring_backward(&grad, &saved)?;
        drop((grad, saved));
        Ok([dq, dk, dv])
    }
}

impl Collectives for Ring {
    fn inputs(&self, x: &Tensor, _: Site, n: usize) -> TResult<Vec<Tensor>> {
        Ok((0..n).map(|_| x.shallow_clone()).collect())
    }
    fn output(&self, y: Tensor, _: Site) -> TResult<Tensor> {
        Ok(y)
    }
    /// Ring attention in place of SDPA: the ring without autograd, linked to q, k and v by a
    /// node that keeps what SDPA's does.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, gqa: bool) -> TResult<Tensor> {
        if gqa {
            return Err(tch::TchError::Torch(
                "ring attention takes as many key heads as query heads (repeat-kv)".into(),
            ));
        }
        let (out, lse) = self.ring_forward(q, k, v)?;
        if !(q.requires_grad() || k.requires_grad() || v.requires_grad()) {
            return Ok(out);
        }
        let tag = self.next_tag.get();
        self.next_tag.set(tag + 1);
        self.saved.borrow_mut().insert(
            tag,
            Saved {
                q: q.shallow_clone(),
                k: k.shallow_clone(),
                v: v.shallow_clone(),
                out: out.shallow_clone(),
                lse,
            },
        );
        let user = self as *const Ring as *mut c_void;
        // SAFETY: the ring outlives every graph of the run (the trainer's state owns it).
        let y = unsafe { ffi::link3([q, k, v], &out, tag, ring_hook, user) }.map_err(shim)?;
        drop(out);
        Ok(y)
    }
}

unsafe extern "C" fn ring_hook(
    user: *mut c_void,
    tag: i64,
    grad_in: *mut C_tensor,
    grads_out: *mut *mut C_tensor,
) -> c_int {
    // SAFETY: `user` is the Ring that outlives every graph of the run.
    let ring = &*(user as *const Ring);
    let grad = Tensor::from_ptr(grad_in);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ring.backward(tag, grad)));
    let err = match r {
        Ok(Ok(grads)) => {
            for (i, mut t) in grads.into_iter().enumerate() {
                *grads_out.add(i) = t.as_mut_ptr();
                std::mem::forget(t);
            }
            return 0;
        }
        Ok(Err(e)) => e,
        Err(_) => tch::TchError::Torch("panic in ring attention's backward".into()),
    };
    ring.error.borrow_mut().get_or_insert(err);
    1
}

/// What `context_parallel`'s generator frame holds from its entry to its exit.
pub struct Context {
    /// The rotary table's clone, for restoring.
    original: Tensor,
    /// The three `to_local` shards.
    _shards: Vec<Tensor>,
    /// The loop's last `shard.clone()` (the table's).
    _last: Option<Tensor>,
}

impl Context {
    /// The context's exit (`_attention.py` l.1578-1583): the table resized back (its storage
    /// was kept) and refilled; then the frame's tensors go.
    pub fn exit(self, freqs: &Tensor) -> TResult<()> {
        let _ng = tch::no_grad_guard();
        let mut f = freqs.shallow_clone();
        let _ = f.f_resize_(self.original.size().as_slice())?;
        f.f_copy_(&self.original)?;
        drop(self);
        Ok(())
    }
}

/// `tensor.clone()`: a new buffer of the same bytes (strides kept when dense, else contiguous).
fn clone(t: &Tensor) -> TResult<Tensor> {
    let out = t.f_empty_like()?;
    out.shallow_clone().f_copy_(t)?;
    Ok(out)
}

/// `x.chunk(2, dim=2)[0]`.
fn first_half(x: &Tensor) -> TResult<Tensor> {
    Ok(x.f_chunk(2, 2)?.swap_remove(0))
}

/// `x.chunk(2, dim=2)[1]`.
fn second_half(x: &Tensor) -> TResult<Tensor> {
    Ok(x.f_chunk(2, 2)?.swap_remove(1))
}

/// `_partial_update(original, new, dim=2, n_chunks=2, idx, add=True)` (l.113-135): the chunk
/// added to in place, then `cat` of the chunks (a new tensor).
fn partial_add(original: &Tensor, new: &Tensor, idx: usize) -> TResult<Tensor> {
    let chunks = original.f_chunk(2, 2)?;
    let _ = chunks[idx].shallow_clone().f_add_(new)?;
    Tensor::f_cat(&chunks, 2)
}

/// `_partial_update(original, new, dim=2, n_chunks=2, idx=1, add=False)`.
fn partial_replace(original: &Tensor, new: &Tensor) -> TResult<Tensor> {
    let mut chunks = original.f_chunk(2, 2)?;
    chunks[1] = new.shallow_clone();
    Tensor::f_cat(&chunks, 2)
}

/// `_SDPAMerger` (fp32: `convert_to_f32`'s casts are no-ops), over dim 2.
#[derive(Default)]
struct Merger {
    out: Option<Tensor>,
    lse: Option<Tensor>,
}

impl Merger {
    /// `step` / `_merge_one` (l.150-213).
    fn step(&mut self, block_out: &Tensor, block_lse: &Tensor, partial: bool) -> TResult<()> {
        let block_lse = block_lse.f_unsqueeze(-1)?;
        let (Some(self_out), Some(self_lse)) = (&self.out, &self.lse) else {
            self.lse = Some(block_lse);
            self.out = Some(block_out.shallow_clone());
            return Ok(());
        };
        let lse = if partial {
            second_half(self_lse)?
        } else {
            self_lse.shallow_clone()
        };
        let out = if partial {
            second_half(self_out)?
        } else {
            self_out.shallow_clone()
        };
        // out = out - F.sigmoid(block_lse - lse) * (out - block_out)
        let out = {
            let s = {
                let d = block_lse.f_sub(&lse)?;
                d.f_sigmoid()?
            };
            let d = out.f_sub(block_out)?;
            let p = s.f_mul(&d)?;
            drop((s, d));
            out.f_sub(&p)?
        };
        // lse = lse - F.logsigmoid(lse - block_lse)
        let lse = {
            let ls = {
                let d = lse.f_sub(&block_lse)?;
                d.f_log_sigmoid()?
            };
            lse.f_sub(&ls)?
        };
        if partial {
            let new_lse = partial_replace(self_lse, &lse)?;
            self.lse = Some(new_lse);
            let self_out = self.out.as_ref().expect("checked above");
            let new_out = partial_replace(self_out, &out)?;
            self.out = Some(new_out);
        } else {
            self.lse = Some(lse);
            self.out = Some(out);
        }
        Ok(())
    }

    /// `results` (l.215-223): the output and the log-sum-exp squeezed back to (b, h, s).
    fn results(self) -> TResult<(Tensor, Tensor)> {
        let out = self.out.expect("one step ran");
        let lse = self.lse.expect("one step ran").f_squeeze_dim(-1)?;
        Ok((out, lse))
    }
}

/// `_AllGatherRotater` / `_AllToAllRotater` (l.247-292).
enum Rotater {
    AllGather { buffer: Option<Tensor>, idx: i64 },
    AllToAll { buffer: Option<Tensor> },
}

impl Rotater {
    fn new(r: Rotate) -> Rotater {
        match r {
            Rotate::AllGather => Rotater::AllGather {
                buffer: None,
                idx: 0,
            },
            Rotate::AllToAll => Rotater::AllToAll { buffer: None },
        }
    }

    fn exchange(&mut self, pg: &ProcessGroup, curr: &Tensor) -> TResult<()> {
        match self {
            Rotater::AllGather { buffer, idx } => {
                *idx += 1;
                if buffer.is_none() {
                    // ft_c.all_gather_tensor(curr.contiguous(), gather_dim=0)
                    let c = curr.f_contiguous()?;
                    let n = c.numel() as i64;
                    let (rank, size) = (pg.rank(), pg.size());
                    let out = Tensor::f_empty([size * n], (c.kind(), c.device()))?;
                    out.f_narrow(0, rank * n, n)?.f_copy_(&c)?;
                    for r in 0..size {
                        pg.broadcast(&out.f_narrow(0, r * n, n)?, r)?;
                    }
                    *buffer = Some(out);
                }
            }
            Rotater::AllToAll { buffer } => {
                // ft_c.permute_tensor(curr.contiguous(), [1, ..., size-1, 0]): all_to_all_single
                // into a new buffer of the input's size; each rank sends to the next.
                let c = curr.f_contiguous()?;
                let (rank, size) = (pg.rank(), pg.size());
                let out = c.f_empty_like()?;
                let send = pg.isend(&c, (rank + 1) % size, RING_TAG)?;
                let recv = pg.irecv(&out, (rank + size - 1) % size, RING_TAG)?;
                send.wait()?;
                recv.wait()?;
                drop((send, recv));
                *buffer = Some(out);
            }
        }
        Ok(())
    }

    fn next_buffer(&mut self, rank: i64, size: i64) -> TResult<Tensor> {
        match self {
            Rotater::AllGather { buffer, idx } => {
                let b = buffer.as_ref().expect("exchanged before");
                // `chunk(size)[rank - idx]`, Python's negative index counting from the end.
                let i = (rank - *idx).rem_euclid(size);
                Ok(b.f_chunk(size, 0)?.swap_remove(i as usize))
            }
            Rotater::AllToAll { buffer } => {
                Ok(buffer.as_ref().expect("exchanged before").shallow_clone())
            }
        }
    }
}

/// The tag of the ring's point-to-point messages on the cp group.
const RING_TAG: i64 = 7;
