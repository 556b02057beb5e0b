//! Activations autograd saves for backward in one Llama decoder block, op by op, per token.
//!
//! The method is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
//! Transformer Models", section 4.1: count every tensor an op saves for its backward), applied
//! to torchtitan's Llama block of December 2024 instead of GPT-3's, and checked against
//! PyTorch's derivatives.yaml (which inputs/outputs each aten op saves). Per token, with
//! h = hidden, q = heads x head_dim, kv = kv_heads x head_dim, f = intermediate, e = bytes of
//! the compute dtype:
//!
//! | op (torchtitan `model.py`)               | saved for backward                        |
//! |------------------------------------------|-------------------------------------------|
//! | RMSNorm eager: `x.float()`, `pow(2)`, `x*rsqrt(..)` | the fp32 copy (4h) and rsqrt (4 B)  |
//! | `.type_as(x) * weight`                   | the normalised e-byte tensor (eh)         |
//! | wq, wk, wv (`F.linear`)                  | their shared input, the norm output (eh)  |
//! | rotary (`view_as_complex(x.float()) * freqs_cis`) | only `freqs_cis`, a constant: 0  |
//! | `repeat_kv` (expand + reshape)           | nothing; its outputs are new e-byte copies |
//! | SDPA flash/efficient                     | q, k, v as passed (e(q+2kv), or e*3q with `repeat_kv`), output (eq), log-sum-exp (4 B x heads) |
//! | SDPA math                                | as above plus the softmax probabilities (e x heads x seq) |
//! | `transpose(1,2).contiguous()` -> wo      | the contiguous copy (eq)                  |
//! | residual add                             | nothing                                   |
//! | ffn RMSNorm                              | as the attention norm                     |
//! | w1, w3                                   | their shared input (eh)                   |
//! | `F.silu(w1(x))`                          | its input (ef)                            |
//! | `silu * w3(x)`                           | both operands (2ef)                       |
//! | w2                                       | its input (ef)                            |
//!
//! Worked number, llama3-8b (h 4096, q 4096, kv 1024, f 14336, 32 heads), bf16, eager norm,
//! `repeat_kv`, flash: norms 2 x (4x4096 + 4 + 2x4096), attention 2x(4x4096) + 128, linear
//! and o inputs 3 x 2x4096, MLP 4 x 2x14336: 221,320 bytes per token per layer, which
//! [`BlockActivations::no_ac`] gives.
//!
//! Tensor parallelism divides the attention and MLP tensors by `tp`; the norm tensors and the
//! residual stream are divided only under sequence parallelism (Korthikanti section 4.2.2).
//! The linear inputs are all-gathered to full size under SP before the column-parallel
//! matmul, and that full tensor is what the matmul saves.

use crate::plan::{Attention, Gqa, Plan, RmsNorm};

/// Bytes per token of one block, under each checkpointing regime, after TP/SP division.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockActivations {
    /// Everything autograd saves without checkpointing.
    pub no_ac: u128,
    /// What a fully checkpointed block keeps: its input.
    pub full_ac: u128,
    /// What torchtitan's selective-op policy keeps.
    pub selective_op: u128,
    /// Tensors the selective-op policy keeps that the no-AC set also contains (so that the
    /// recompute working set is not counted twice).
    pub selective_op_overlap: u128,
    /// Largest set of gradient temporaries alive at once inside the block's backward, beyond
    /// the saved tensors.
    pub backward_transient: u128,
    /// Extra per-token bytes of attention that scale with sequence length (math backend);
    /// already included in `no_ac`.
    pub attention_quadratic: u128,
}

/// Per-token saved bytes of one block for `plan`, at the per-rank sequence length
/// `seq_local` (the math backend's probabilities scale with the full causal row, which with
/// context parallelism is the local chunk times `cp` for the ring's key chunks).
///
/// ```
/// use memplan::estimate::activations::block_activations;
/// use memplan::plan::PlanFile;
/// let plan: PlanFile = serde_json::from_str(r#"{"model":"llama3-8b"}"#).unwrap();
/// let a = block_activations(&plan.resolve().unwrap());
/// assert_eq!(a.no_ac, 221_320);
/// assert_eq!(a.full_ac, 8_192);
/// ```
pub fn block_activations(plan: &Plan) -> BlockActivations {
    // Division by a parallel degree, skipped when the degree is 1 (the common case; 128-bit
    // division is a library call and this runs on every estimate).
    fn div(x: u128, d: u128) -> u128 {
        if d == 1 {
            x
        } else {
            x / d
        }
    }
    let m = &plan.model;
    let par = &plan.parallel;
    let imp = &plan.implementation;
    let e = plan.precision.param.bytes() as u128;
    let (h, q, kv, f) = (
        m.hidden as u128,
        m.q_dim() as u128,
        m.kv_dim() as u128,
        m.intermediate as u128,
    );
    let heads = m.heads as u128;
    let tp = par.tp as u128;
    let sp_div = if par.sp { tp } else { 1 };

    // One RMSNorm's saved tensors. Eager: fp32 copy of the input (4h) plus the rsqrt per row
    // (4 B, fp32) plus the normalised tensor before the weight multiply (eh). Fused: the input
    // (eh) and the fp32 reciprocal RMS per row (4 B).
    let norm = match imp.rmsnorm {
        RmsNorm::Eager => div(4 * h + 4 + e * h, sp_div),
        RmsNorm::Fused => div(e * h + 4, sp_div),
    };
    // K and V as the attention kernel sees them.
    let kv_seen = match imp.gqa {
        Gqa::RepeatKv => q,
        Gqa::Native => kv,
    };
    let lse = div(4 * heads, tp);
    let quadratic = match imp.attention {
        // softmax output, heads x (causal row of the full sequence) per token
        Attention::Math => div(e * heads * plan.batch.seq_len as u128, tp),
        Attention::Flash | Attention::Efficient => 0,
    };
    let attention = div(e * (q + 2 * kv_seen + q), tp) + lse + quadratic; // q, k, v, out
    let o_input = div(e * q, tp);
    let linear_inputs = 2 * e * h; // norm outputs, full size (replicated or all-gathered)
    let mlp = div(4 * e * f, tp); // silu input, silu output, w3 output, product
    let no_ac = 2 * norm + linear_inputs + attention + o_input + mlp;

    let block_input = div(e * h, sp_div);
    // torchtitan `_save_list` with its every-other-mm rule, counted per block: the 1st, 3rd,
    // 5th and 7th mm outputs are kept (wq, wv, w1, w2), plus the attention outputs (out and
    // log-sum-exp); wk, wo, w3 and everything else are recomputed. The w2 output is the
    // pre-reduction partial sum under TP: full hidden width.
    let sac_attention = o_input + lse;
    let (kv_tp, f_tp) = (div(e * kv, tp), div(e * f, tp));
    let selective_op = block_input + o_input + kv_tp + f_tp + e * h + sac_attention;
    // Shared with the no-AC set: w1 output (silu input), attention out and lse, and the wv
    // output when attention sees V unexpanded.
    let overlap = f_tp
        + sac_attention
        + match imp.gqa {
            Gqa::Native => kv_tp,
            Gqa::RepeatKv => 0,
        };

    // Backward transients beyond the saved tensors. MLP, at the `silu * w3` backward: the
    // incoming gradient of the block output (eh) stays alive for the residual branch, and the
    // product's backward holds grad(product), grad(silu) and grad(w3 out) while freeing the
    // w2 input: net eh + 2ef. Attention, at the flash backward: grad of out (eq), dq, dk, dv
    // (e(q + 2kv_seen)) and FlashAttention-2's fp32 dq accumulator (4q), plus eh.
    let mlp_bwd = block_input + 2 * f_tp;
    let attn_bwd = block_input + div(e * (2 * q + 2 * kv_seen) + 4 * q, tp);
    BlockActivations {
        no_ac,
        full_ac: block_input,
        selective_op,
        selective_op_overlap: overlap,
        backward_transient: mlp_bwd.max(attn_bwd),
        attention_quadratic: quadratic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlanFile;

    fn plan(json: &str) -> Plan {
        serde_json::from_str::<PlanFile>(json)
            .unwrap()
            .resolve()
            .unwrap()
    }

    #[test]
    fn native_gqa_saves_unexpanded_kv() {
        let rep = block_activations(&plan(r#"{"model":"llama3-8b"}"#));
        let nat = block_activations(&plan(
            r#"{"model":"llama3-8b","implementation":{"gqa":"native"}}"#,
        ));
        // K and V shrink from 4096 to 1024 wide, 2 bytes each.
        assert_eq!(rep.no_ac - nat.no_ac, 2 * 2 * (4096 - 1024));
    }

    #[test]
    fn fused_norm_saves_the_input_and_rstd_only() {
        let eager = block_activations(&plan(r#"{"model":"llama3-8b"}"#));
        let fused = block_activations(&plan(
            r#"{"model":"llama3-8b","implementation":{"rmsnorm":"fused"}}"#,
        ));
        assert_eq!(eager.no_ac - fused.no_ac, 2 * (4 * 4096));
    }

    #[test]
    fn selective_op_keeps_four_matmuls_and_attention() {
        let a = block_activations(&plan(r#"{"model":"llama3-8b"}"#));
        // input 2h, wq 2h, wv 2*1024, w1 2f, w2 2h, attention out 2h, lse 4*32
        assert_eq!(a.selective_op, 2 * 4096 * 4 + 2 * 1024 + 2 * 14336 + 4 * 32);
    }

    #[test]
    fn sequence_parallel_divides_the_norm_region() {
        let tp = block_activations(&plan(
            r#"{"model":"llama3-8b","num_gpus":4,"parallel":{"tp":4,"sp":false}}"#,
        ));
        let sp = block_activations(&plan(
            r#"{"model":"llama3-8b","num_gpus":4,"parallel":{"tp":4,"sp":true}}"#,
        ));
        assert_eq!(tp.no_ac - sp.no_ac, 2 * (4 * 4096 + 4 + 2 * 4096) * 3 / 4);
    }

    #[test]
    fn math_attention_saves_probabilities() {
        let a = block_activations(&plan(
            r#"{"model":"llama3-8b","batch":{"seq_len":1024},"implementation":{"attention":"math"}}"#,
        ));
        assert_eq!(a.attention_quadratic, 2 * 32 * 1024);
    }
}
