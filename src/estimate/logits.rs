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
}

/// ```
/// use memplan::estimate::logits::logits_bytes;
/// use memplan::plan::PlanFile;
/// let plan: PlanFile = serde_json::from_str(r#"{"model":"llama3-8b"}"#).unwrap();
/// let l = logits_bytes(&plan.resolve().unwrap(), 8192);
/// assert_eq!(l.backward_peak, 12 * 8192 * 128_256);
/// ```
pub fn logits_bytes(plan: &Plan, tokens: u128) -> LogitsBytes {
    let v = plan.model.vocab.div_ceil(plan.parallel.tp) as u128;
    let tv = tokens * v;
    let e = plan.precision.param.bytes() as u128;
    // (forward peak, backward peak) in bytes per logit; the table above has the moments.
    let (fwd, bwd) = match plan.implementation.logits {
        Logits::FloatOutput => ((e + 4).max(8), 12),
        Logits::FloatOutputKept => ((e + 4).max(8), 16),
        // `.float()` of fp32 logits is the same tensor: no copy.
        Logits::FloatInLoss if e == 4 => (8, 12),
        Logits::FloatInLoss => (e + 8, 12),
        Logits::ComputeDtype => (2 * e, 3 * e),
    };
    let freed = match plan.implementation.logits {
        Logits::ComputeDtype => 0,
        _ if e < 4 => e * tv,
        _ => 0,
    };
    let projection = match plan.implementation.logits {
        Logits::FloatOutput | Logits::FloatOutputKept if e < 4 => e + 4,
        _ => e,
    };
    // Gemma 2's final soft-cap, `tanh(logits / cap) * cap` on the compute-dtype logits
    // before the loss (Hugging Face `Gemma2ForCausalLM.forward`): `tanh` saves its output
    // (derivatives.yaml: `tanh_backward(grad, result)`), e bytes per logit alive from the
    // projection through the loss backward; the divide and multiply by a constant save
    // nothing.
    let cap = if plan.model.final_logit_softcap { e } else { 0 };
    LogitsBytes {
        at_projection: (projection + cap) * tv,
        forward_peak: (fwd + cap) * tv,
        backward_peak: (bwd + cap) * tv,
        freed_segment: freed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::plan::test_plan as plan;

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
