//! Logits and cross-entropy buffers, per rank, for one micro-batch.
//!
//! `F.cross_entropy` is `log_softmax` followed by `nll_loss`. `log_softmax` saves its output
//! for backward; `nll_loss` backward allocates a zero-filled gradient of the input's shape and
//! scatters into it; `log_softmax` backward then allocates its own result while both its
//! incoming gradient and its saved output are alive (PyTorch derivatives.yaml:
//! `_log_softmax_backward_data(grad, result, dim, dtype)`). With T tokens and V vocabulary
//! entries on this rank, in bytes per logit:
//!
//! | logits mode            | forward peak                         | alive after forward | backward peak |
//! |------------------------|--------------------------------------|---------------------|---------------|
//! | float-output           | fp32 logits + log-softmax output: 8  | log-softmax out: 4  | 4 + 4 + 4 = 12 |
//! | float-output-kept      | 8                                    | 8 (logits kept)     | 16            |
//! | float-in-loss          | e-byte logits + fp32 copy + log-softmax: e + 8 | 4         | 12            |
//! | compute-dtype          | e + e                                | e                   | 3e            |
//!
//! In float-output the bf16 logits exist together with their fp32 copy for a moment (e + 4),
//! always below the 8 of the next line. torchtitan deletes `pred` before `backward()` since
//! June 2024 (PR #391); before, the fp32 logits stayed alive through backward.
//!
//! A final logit soft-cap (Gemma 2) adds its saved tanh output, e bytes per logit, to each
//! moment.
//!
//! Under pipelining the last stage cannot `del pred`: the schedule caches each micro-batch's
//! stage output until that micro-batch's backward is done (torch 2.11
//! `pipelining/stage.py:720`, detached at `:843`), and keeps its loss, which holds the
//! log-softmax output, until then (`schedules.py:283-286`). So the loss input (the stage
//! output) stays alive as in float-output-kept, through the stage's whole backward, and every
//! other micro-batch in flight keeps its stage output and log-softmax output
//! ([`LogitsBytes::kept_per_micro_batch`]). Measured with torch's own pipelining on CPU
//! (docs/research/parallelism-torch-2.11.md).
//!
//! Worked number: llama3-8b at batch 4 x 2048 tokens (T = 8192), V = 128,256, float-in-loss:
//! backward peak 12 x 8192 x 128,256 = 12.61 GB, the largest single buffer of the seed case.

use crate::plan::{Logits, Plan};

/// Logits buffers in bytes, for one micro-batch of `tokens` on a rank holding `vocab`
/// entries of the vocabulary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogitsBytes {
    pub forward_peak: u128,
    pub backward_peak: u128,
    /// Alive when the output projection returns, inside the model's forward: the
    /// compute-dtype logits, and their fp32 copy when the model upcasts (float-output).
    pub at_projection: u128,
    /// Reserved but unusable at the backward peak: the compute-dtype logits' segment, freed
    /// before backward, is too small for the fp32 buffers of the loss backward, so the
    /// caching allocator keeps it and maps new segments for them.
    pub freed_segment: u128,
    /// Pipeline last stage only: the loss input (the stage output), held from the loss to
    /// the end of the micro-batch's backward; and what each other micro-batch in flight
    /// keeps from its loss to its backward (its stage output, log-softmax output and
    /// soft-cap output).
    pub held_in_backward: u128,
    pub kept_per_micro_batch: u128,
    /// float-in-loss-kept, without pipelining: the loop's `logits` name holds the model's
    /// output through the blocks' backward and the optimizer step, and the previous step's
    /// through the next forward until the name is bound again (measured with a tutorial-style
    /// loop on torch 2.11; counted from the first step's forward on, an upper bound there).
    pub kept_in_step: u128,
    /// nll_loss backward's gradient (as large as log-softmax's saved output), both freed
    /// once log-softmax's backward has run.
    pub loss_grad: u128,
    /// Loss parallelism's `exp` buffer in the loss backward and its per-token index and mask
    /// tensors, freed with it.
    pub parallel_loss: u128,
}

/// ```
/// use memplan::estimate::logits::logits_bytes;
/// use memplan::plan::PlanFile;
/// let plan: PlanFile = serde_json::from_str(r#"{"model":"llama3-8b"}"#).unwrap();
/// let l = logits_bytes(&plan.resolve().unwrap(), 8192);
/// assert_eq!(l.backward_peak, 12 * 8192 * 128_256);
/// ```
#[inline]
pub fn logits_bytes(plan: &Plan, tokens: u128) -> LogitsBytes {
    let v = vocab(plan);
    let tv = tokens * v;
    let e = plan.precision.param.bytes() as u128;
    // (projection, forward peak, backward peak) in bytes per logit: the moments of
    // [`script`], summed in closed form for speed (a unit test checks them against it).
    let (projection, fwd, bwd) = per_logit(plan.implementation.logits, e);
    let freed = match plan.implementation.logits {
        Logits::ComputeDtype | Logits::Chunked => 0,
        _ if e < 4 => e * tv,
        _ => 0,
    };
    let cap = if plan.model.final_logit_softcap { e } else { 0 };
    let (input, log_softmax) = loss_input_and_log_softmax(plan.implementation.logits, e);
    // Held like float-output-kept's fp32 logits, which already count it.
    let held = if plan.parallel.pp > 1 { input } else { 0 };
    let held_extra = if kept(plan.implementation.logits) {
        0
    } else {
        held
    };
    let lp = loss_parallel_extra(plan, e);
    let lp_tokens = loss_parallel_per_token(plan, e) * tokens;
    let kept_in_step =
        if plan.implementation.logits == Logits::FloatInLossKept && plan.parallel.pp == 1 {
            input * tv
        } else {
            0
        };
    LogitsBytes {
        kept_in_step,
        at_projection: (projection + cap) * tv,
        forward_peak: (fwd + cap) * tv,
        backward_peak: (bwd + cap + held_extra + lp) * tv + lp_tokens,
        freed_segment: freed,
        held_in_backward: held * tv + kept_in_step,
        kept_per_micro_batch: if plan.parallel.pp > 1 {
            (input + log_softmax + cap) * tv
        } else {
            0
        },
        parallel_loss: lp * tv + lp_tokens,
        loss_grad: match plan.implementation.logits {
            Logits::ComputeDtype => e * tv,
            Logits::Chunked => 0,
            _ => 4 * tv,
        },
    }
}

/// Whether the training loop keeps the model's output through backward (no `del pred`).
fn kept(mode: Logits) -> bool {
    matches!(mode, Logits::FloatOutputKept | Logits::FloatInLossKept)
}

/// Vocabulary entries whose logits a rank holds: a TP shard under loss parallelism, else all
/// of them (without loss parallelism the output projection gathers the whole vocabulary).
#[inline]
pub fn vocab(plan: &Plan) -> u128 {
    if plan.implementation.loss_parallel {
        plan.model.vocab.div_ceil(plan.parallel.tp) as u128
    } else {
        plan.model.vocab as u128
    }
}

/// Bytes per logit that torch's loss-parallel backward adds
/// (`torch/distributed/tensor/parallel/loss.py`, its fused nll / log-softmax backward keeps
/// `exp` of the input beside the gradient it builds: measured 16 bytes per logit of the
/// shard against 12 without it, with TP 2 on CPU).
#[inline]
fn loss_parallel_extra(plan: &Plan, e: u128) -> u128 {
    if plan.parallel.tp > 1
        && plan.implementation.loss_parallel
        && plan.implementation.logits != Logits::Chunked
    {
        if plan.implementation.logits == Logits::ComputeDtype {
            e
        } else {
            4
        }
    } else {
        0
    }
}

/// Bytes per token that torch's loss-parallel backward holds beside its per-logit buffers
/// (torch 2.11 `tensor/parallel/loss.py`, `_nll_loss_and_log_softmax_backward`): `safe_target`
/// from `torch.where` and the masked copy `_MaskPartial._partition_value` makes (int64, 8 + 8),
/// the mask buffer (bool, 1), `grad_update` in the gradient's dtype (g), `arange_1d` (int64, 8)
/// and the `torch.where`-masked `grad_output` (g): 25 + 2g, 33 for fp32. Measured with TP 2 on
/// CPU: 4,224 B at 128 tokens, the whole of the estimator's old -0.23% there.
#[inline]
fn loss_parallel_per_token(plan: &Plan, e: u128) -> u128 {
    match loss_parallel_extra(plan, e) {
        0 => 0,
        g => 25 + 2 * g,
    }
}

/// Which tensor of [`script`] is the loss's input (the model's output): the fp32 copy when the
/// model upcasts compute-dtype logits, else the projection's result.
pub fn loss_input_slot(plan: &Plan) -> Slot {
    match plan.implementation.logits {
        Logits::FloatOutput | Logits::FloatOutputKept if plan.precision.param.bytes() < 4 => {
            Slot::Upcast
        }
        _ => Slot::Pred,
    }
}

/// Bytes per logit of the loss's input (what `del pred` frees: the model's output) and of
/// log-softmax's saved output.
#[inline]
fn loss_input_and_log_softmax(mode: Logits, e: u128) -> (u128, u128) {
    match mode {
        Logits::ComputeDtype => (e, e),
        Logits::Chunked => (0, 0),
        Logits::FloatInLoss | Logits::FloatInLossKept => (e, 4),
        Logits::FloatOutput | Logits::FloatOutputKept => (4, 4),
    }
}

/// Bytes per logit at the projection, the forward peak and the backward peak, without a
/// soft-cap: the table of the module doc.
fn per_logit(mode: Logits, e: u128) -> (u128, u128, u128) {
    match mode {
        Logits::FloatOutput if e < 4 => (e + 4, 8, 12),
        Logits::FloatOutputKept if e < 4 => (e + 4, 8, 16),
        Logits::FloatOutput => (e, (e + 4).max(8), 12),
        Logits::FloatOutputKept => (e, (e + 4).max(8), 16),
        // `.float()` of fp32 logits is the same tensor: no copy.
        Logits::FloatInLoss if e == 4 => (e, 8, 12),
        Logits::FloatInLoss => (e, e + 8, 12),
        Logits::FloatInLossKept if e == 4 => (e, 8, 16),
        Logits::FloatInLossKept => (e, e + 8, 12 + e),
        Logits::ComputeDtype => (e, 2 * e, 3 * e),
        // The chunked loss has no [B, S, V] logits ([`chunked`]).
        Logits::Chunked => (0, 0, 0),
    }
}

/// torchtitan 0.3's chunked loss ([`Logits::Chunked`], `components/loss.py`,
/// `ChunkedLossWrapper.__call__`) on one rank, for T tokens in N chunks of c = T / N, V
/// vocabulary entries, hidden h and compute dtype e. Measured on CPU with torchtitan 0.3.0's
/// own wrapper (docs/research/torchtitan-0.3.0-measured.md).
///
/// Through the loop: each chunk of the detached hidden states made contiguous (`_chunk_local`:
/// e h T in all), the label and (with torchtitan's `positions`) position chunks (8 T each),
/// and the `GradAccumulator`'s fp32 buffer (`zeros_like`, 4 h T). Per chunk, the output
/// projection's logits (e c V, bound until the next chunk's), then `cross_entropy(pred.float())`
/// and its backward at once (`chunk_loss.backward()`): the fp32 copy, log-softmax's output,
/// nll's gradient and log-softmax's backward result (4 c V each, the copy freed before the
/// backward), then the logits' gradient in e, and the projection's backward: its weight's
/// unsharded gradient (e V h) and the chunk's input gradient (e c h). Under FSDP that weight's
/// gradient accumulates across chunks unreduced (`set_requires_gradient_sync(False)` until the
/// last chunk) in the reduce dtype when it is wider: torch 2.15 FSDP2 casts it at the first
/// chunk's post-backward (`_fsdp_param_group.py`, `_set_unsharded_grad_dtypes`,
/// `param.grad_dtype`), and every later chunk's gradient is cast by `AccumulateGrad` before
/// the in-place add, so the r V h sum, the new e V h gradient and its r V h cast are alive
/// together. The last chunk's reduce-scatter input (r V h) is kept by FSDP2 until the next
/// unit's reduce-scatter, the final norm's at the start of the decoder's backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkedLoss {
    /// Alive through the loop (logits category).
    pub buffers: u128,
    /// At the loop's highest moment: the chunk's logits and cross-entropy buffers and input
    /// gradient (logits category), and the output weight's unsharded gradients (gradient
    /// buffers).
    pub peak_logits: u128,
    pub peak_grads: u128,
    /// The gradient the decoder's backward starts from: the accumulator cast to the compute
    /// dtype (`grad_accumulator.result().to(hidden_states.dtype)`, the buffer itself in fp32),
    /// saved by `_DecoderOutputGradientBackProp` until the final norm's backward: e h T.
    pub incoming: u128,
    /// The output weight's reduce-scatter input, kept into the decoder's backward.
    pub rs_kept: u128,
}

/// [`ChunkedLoss`] for `tokens` on this rank; `output` is the output weight's unsharded
/// elements, `fsdp` whether FSDP holds it (its gradient accumulates unsharded and is
/// reduce-scattered) rather than the parameter itself (its gradient is the master-dtype
/// `.grad`, counted with the gradients).
pub fn chunked(plan: &Plan, tokens: u128, output: u128, fsdp: bool) -> ChunkedLoss {
    let pr = &plan.precision;
    let (e, r) = (pr.param.bytes() as u128, pr.reduce.bytes() as u128);
    let h = plan.model.hidden as u128;
    let n = plan.implementation.loss_chunks as u128;
    let c = super::div(tokens, n);
    let cv = c * vocab(plan);
    let positions = match plan.implementation.rotary {
        crate::plan::Rotary::PerLayer => 8 * tokens,
        _ => 0,
    };
    // (With one sequence per rank each chunk is a contiguous slice: `.contiguous()` copies
    // nothing; measured at batch 1.)
    let copies = if plan.batch.micro_batch_size > 1 {
        e * h * tokens + 8 * tokens + positions
    } else {
        0
    };
    let buffers = copies + 4 * h * tokens;
    let logits = e * cv;
    let input_grad = e * c * h;
    // The logits' gradient the projection's backward reads: the fp32 result cast to e, or the
    // result itself in fp32.
    let grad_logits = if e < 4 { e * cv } else { 4 * cv };
    let (new, acc, cast, rs) = if fsdp {
        let acc_dtype = if r > e { r } else { e };
        (
            e * output,
            if n >= 2 { acc_dtype * output } else { 0 },
            if r > e { r * output } else { 0 },
            r * output,
        )
    } else {
        (pr.master.bytes() as u128 * output, 0, 0, 0)
    };
    // (logits-category bytes, gradient bytes) at each candidate moment of a chunk after the
    // first (the sum so far exists): cross-entropy's backward, the projection's backward with
    // both its outputs, and AccumulateGrad's cast; with one chunk, the reduce-scatter input
    // beside the new gradient.
    let moments = [
        (logits + 12 * cv, acc),
        (logits + grad_logits + input_grad, acc + new),
        (logits + input_grad, acc + new + cast),
        if n == 1 && fsdp {
            (logits + input_grad, new + rs)
        } else {
            (0, 0)
        },
    ];
    let (peak_logits, peak_grads) =
        moments
            .into_iter()
            .fold((0, 0), |b, m| if m.0 + m.1 > b.0 + b.1 { m } else { b });
    ChunkedLoss {
        buffers,
        peak_logits,
        peak_grads,
        incoming: e * h * tokens,
        rs_kept: rs,
    }
}

/// A tensor of the logits and the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The output projection's result (`pred`), compute dtype.
    Pred,
    /// Its fp32 copy (`.float()`, in the model or in the loss).
    Upcast,
    /// Gemma 2's soft-cap `tanh` output, saved for backward.
    Tanh,
    /// `log_softmax`'s output, saved for backward.
    LogSoftmax,
    /// `nll_loss` backward's zero-filled gradient.
    NllGrad,
    /// `log_softmax` backward's result, the gradient of the logits.
    Result,
    /// Loss parallelism's fused backward: `exp` of the input.
    ParallelLoss,
}

/// The moments [`LogitsBytes`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    Projection = 0,
    Loss = 1,
    LossBackward = 2,
}

/// One allocation, free or moment of the logits' life, in bytes per logit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Alloc(Slot, u128),
    Free(Slot, u128),
    At(Moment),
}

/// The logits' tensors in the order they are allocated and freed, from the projection to the
/// loss backward, in bytes per logit: the one description [`logits_bytes`] sums and the
/// event trace ([`super::trace`]) replays. The moments are the table's (module doc).
pub fn script(plan: &Plan) -> ([Step; 12], usize) {
    use Slot::*;
    use Step::*;
    let e = plan.precision.param.bytes() as u128;
    let cap = if plan.model.final_logit_softcap { e } else { 0 };
    let mut out = [At(Moment::Projection); 12];
    // The chunk loop has no whole-batch logits: its tensors are [`chunked`]'s, which the trace
    // walks itself.
    if plan.implementation.logits == Logits::Chunked {
        (out[1], out[2]) = (At(Moment::Loss), At(Moment::LossBackward));
        return (out, 3);
    }
    let mut n = 0;
    {
        let mut push = |s: Step| {
            if !matches!(s, Alloc(_, 0) | Free(_, 0)) {
                out[n] = s;
                n += 1;
            }
        };
        push(Alloc(Pred, e));
        push(Alloc(Tanh, cap));
        // What holds the loss's input, and is freed by `del pred` (or kept).
        let input = match plan.implementation.logits {
            // The model returns `self.output(h).float()`: the compute-dtype result is freed as
            // the model returns; `.float()` of fp32 logits is the same tensor.
            Logits::FloatOutput | Logits::FloatOutputKept if e < 4 => {
                push(Alloc(Upcast, 4));
                push(At(Moment::Projection));
                push(Free(Pred, e));
                push(Alloc(LogSoftmax, 4));
                Some((Upcast, 4))
            }
            Logits::FloatOutput
            | Logits::FloatOutputKept
            | Logits::FloatInLoss
            | Logits::FloatInLossKept
                if e == 4 =>
            {
                push(At(Moment::Projection));
                push(Alloc(LogSoftmax, 4));
                Some((Pred, 4))
            }
            // The loss upcasts: `log_softmax` saves its fp32 output, not its input, so the copy
            // is freed as the loss returns.
            Logits::FloatInLoss | Logits::FloatInLossKept => {
                push(At(Moment::Projection));
                push(Alloc(Upcast, 4));
                push(Alloc(LogSoftmax, 4));
                Some((Pred, e))
            }
            Logits::ComputeDtype | Logits::FloatOutput | Logits::FloatOutputKept => {
                push(At(Moment::Projection));
                push(Alloc(LogSoftmax, e));
                Some((Pred, e))
            }
            // (Returned above.)
            Logits::Chunked => None,
        };
        push(At(Moment::Loss));
        if matches!(
            plan.implementation.logits,
            Logits::FloatInLoss | Logits::FloatInLossKept
        ) && e < 4
        {
            push(Free(Upcast, 4));
        }
        // `del pred` since June 2024 (PR #391), unless the plan keeps the logits or a
        // pipeline schedule caches the stage output.
        if !kept(plan.implementation.logits) && plan.parallel.pp == 1 {
            if let Some((slot, b)) = input {
                push(Free(slot, b));
            }
        }
        let g = if plan.implementation.logits == Logits::ComputeDtype {
            e
        } else {
            4
        };
        push(Alloc(NllGrad, g));
        push(Alloc(ParallelLoss, loss_parallel_extra(plan, e)));
        push(Alloc(Result, g));
        push(At(Moment::LossBackward));
    }
    (out, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::plan::test_plan as plan;

    /// The closed form of [`logits_bytes`] is the script's moments, for every mode, dtype
    /// and soft-cap.
    #[test]
    fn the_closed_form_sums_the_script() {
        for logits in [
            "float-output",
            "float-output-kept",
            "float-in-loss",
            "float-in-loss-kept",
            "compute-dtype",
        ] {
            for dtype in ["bf16", "fp32"] {
                for (model, pp) in [
                    ("llama3-8b", 1),
                    ("tests/data/hf/gemma-2-2b.json", 1),
                    ("llama3-8b", 2),
                ] {
                    let p = plan(&format!(
                        r#"{{"model":"{model}","num_gpus":{pp},"parallel":{{"pp":{pp}}},
                            "precision":{{"param":"{dtype}","master":"fp32","reduce":"fp32"}},
                            "implementation":{{"logits":"{logits}"}}}}"#
                    ));
                    let (steps, n) = script(&p);
                    let (mut live, mut at) = (0u128, [0u128; 3]);
                    for step in &steps[..n] {
                        match *step {
                            Step::Alloc(_, b) => live += b,
                            Step::Free(_, b) => live -= b,
                            Step::At(m) => at[m as usize] = live,
                        }
                    }
                    let l = logits_bytes(&p, 1);
                    let v = p.model.vocab as u128;
                    let what = format!("{logits} {dtype} {model} pp {pp}");
                    assert_eq!(l.at_projection, at[0] * v, "{what}");
                    assert_eq!(l.forward_peak, at[1] * v, "{what}");
                    assert_eq!(l.backward_peak, at[2] * v, "{what}");
                }
            }
        }
    }

    /// [`loss_input_slot`] names the tensor the script frees as `del pred`.
    #[test]
    fn the_loss_input_is_what_del_pred_frees() {
        for logits in ["float-output", "float-in-loss", "compute-dtype"] {
            for dtype in ["bf16", "fp32"] {
                let p = plan(&format!(
                    r#"{{"model":"llama3-8b","precision":{{"param":"{dtype}","master":"fp32","reduce":"fp32"}},
                        "implementation":{{"logits":"{logits}"}}}}"#
                ));
                let (steps, n) = script(&p);
                // The last tensor freed after the loss (a loss that upcasts frees its own copy
                // first).
                let freed = steps[..n]
                    .iter()
                    .skip_while(|s| **s != Step::At(Moment::Loss))
                    .filter_map(|s| match s {
                        Step::Free(slot, _) => Some(*slot),
                        _ => None,
                    })
                    .last();
                assert_eq!(freed, Some(loss_input_slot(&p)), "{logits} {dtype}");
            }
        }
    }

    #[test]
    fn gemma2_final_softcap_keeps_the_tanh_output() {
        // 1024 tokens of a 256,000 vocabulary, bf16, float-in-loss: 2 + 8 forward, 12 back,
        // plus the saved tanh output, 2 bytes per logit.
        let l = logits_bytes(&plan(r#"{"model":"tests/data/hf/gemma-2-9b.json"}"#), 1024);
        let tv = 1024 * 256_000;
        assert_eq!(l.forward_peak, (2 + 8 + 2) * tv);
        assert_eq!(l.backward_peak, (12 + 2) * tv);
        let g = logits_bytes(&plan(r#"{"model":"tests/data/hf/gemma-2-2b.json"}"#), 1024);
        let no_cap = logits_bytes(&plan(r#"{"model":"tests/data/hf/gemma-3-1b.json"}"#), 1024);
        assert_eq!(g.backward_peak, 14 * tv);
        assert_eq!(no_cap.backward_peak, 12 * 1024 * 262_144);
    }
}
