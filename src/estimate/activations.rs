//! Activations autograd saves for backward in one decoder block, op by op, per token.
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
//! | `transpose(1,2).contiguous()` -> wo      | nothing new with flash/efficient (the kernel's output is already (b, s, heads, d)); the copy (eq) with math |
//! | residual add                             | nothing                                   |
//! | ffn RMSNorm                              | as the attention norm                     |
//! | w1, w3                                   | their shared input (eh)                   |
//! | `F.silu(w1(x))`                          | its input (ef)                            |
//! | `silu * w3(x)`                           | both operands (2ef)                       |
//! | w2                                       | its input (ef)                            |
//!
//! Other families ([`crate::profiles::Family`]) differ where their Hugging Face blocks do,
//! counted the same way:
//!
//! | op (Hugging Face modelling code)         | saved for backward                        |
//! |------------------------------------------|-------------------------------------------|
//! | Gemma RMSNorm `_norm(x.float()) * (1 + w.float())` | fp32 copy (4h), rsqrt (4 B), the fp32 normalised tensor (4h, `mul` saves `self` when `other` needs grad) |
//! | Gemma 2/3: post-attention and post-feedforward norms | as any norm: four per block          |
//! | q/k norms (Qwen3, Gemma 3)               | a norm of head_dim per head on q and on k |
//! | `native_layer_norm` (GPT-NeoX)           | input (eh), fp32 mean and rstd (8 B per row) |
//! | parallel residual (GPT-NeoX)             | both LayerNorms save the same block input: once |
//! | fused `qkv_proj`/`query_key_value` -> split | input (eh); V reaches SDPA as a view of the fused output, which it keeps whole (e(q+2kv)) unless `repeat_kv` copies |
//! | GeGLU `gelu_tanh(gate(x)) * up(x)`; fused `gate_up_proj` -> chunk | as SwiGLU (`gelu` saves its input); the chunks are views of one 2f output: 4ef |
//! | GELU MLP fc1, `gelu`, fc2 (GPT-NeoX)     | fc1 input (eh), gelu input (ef), fc2 input (ef) |
//! | Gemma embedding `* sqrt(h)`              | nothing (a constant factor); its output replaces the embedding output |
//! | Gemma 2 soft-capped scores, eager (`math`) | tanh output (e x heads x seq), fp32 softmax (4 x heads x seq), probabilities |
//! | Gemma 2 final logit soft-cap             | the tanh output, e per logit ([`super::logits`]) |
//!
//! Sliding-window attention (Mistral, Gemma 2 and 3) changes no saved tensor with flash
//! attention and no parameter.
//!
//! Worked number, llama3-8b (h 4096, q 4096, kv 1024, f 14336, 32 heads), bf16, eager norm,
//! `repeat_kv`, flash: norms 2 x (4x4096 + 4 + 2x4096), attention 2x(4x4096) + 128, linear
//! inputs 2 x 2x4096, MLP 4 x 2x14336: 213,128 bytes per token per layer, which
//! [`BlockActivations::no_ac`] gives.
//!
//! Tensor parallelism divides the attention and MLP tensors by `tp`; the norm tensors and the
//! residual stream are divided only under sequence parallelism (Korthikanti section 4.2.2).
//! The linear inputs are all-gathered to full size under SP before the column-parallel
//! matmul, and that full tensor is what the matmul saves.

use super::div;
use crate::plan::{Attention, Gqa, Plan, RmsNorm};
use crate::profiles::{MlpKind, NormKind};

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
    /// Gradient temporaries alive at the MLP's peak inside the block's backward (the
    /// `silu * w3` product's backward), beyond the saved tensors.
    pub mlp_transient: u128,
    /// Gradient temporaries alive at attention's backward, beyond the saved tensors.
    pub attn_transient: u128,
    /// Saved bytes of the feed-forward half (ffn norm, its input to w1/w3, the MLP) and wo's
    /// copy of the attention output where it has one, freed by the time the block's backward
    /// reaches attention.
    pub ffn_saved: u128,
    /// What the final norm and the output projection save (last stage only, never
    /// checkpointed by torchtitan): the norm's tensors and the output layer's input.
    pub head: u128,
    /// Bytes of `no_ac` that are the block input itself: the attention norm saves its input
    /// when it is fused, or when it is eager and the input is already fp32 (`x.float()` of an
    /// fp32 tensor is the same tensor). A checkpointed block keeps its input anyway, so its
    /// recomputation does not allocate these again.
    pub input_alias: u128,
    /// Bytes a block saves per micro-batch whatever its tokens (an MoE block's bf16 expert
    /// weight copies and padding rows), without checkpointing or when recomputed.
    pub per_block: u128,
    /// Bytes the first block saves less than the others when its input needs no gradient
    /// (LoRA: the embedding is frozen, so nothing before the first adapter needs one).
    pub first_block_less: u128,
    /// torchtitan 0.3's block ([`torchtitan03_block`]): what the stage's last block holds at
    /// two moments of its forward, per token, beyond the earlier blocks' saved tensors: at
    /// its second rotation's output (`rope_peak`: where a checkpointed block's forward peaks)
    /// and at its last residual add (`add_peak`, without checkpointing: every saved tensor,
    /// w2's output and the block's output). Zero for other blocks.
    pub rope_peak: u128,
    pub add_peak: u128,
}

/// (hidden, q width, k/v width, intermediate) of a block: h, heads x head_dim, kv_heads x
/// head_dim, f.
pub(crate) fn block_dims(m: &crate::profiles::ModelSpec) -> (u128, u128, u128, u128) {
    (
        m.hidden as u128,
        m.q_dim() as u128,
        m.kv_dim() as u128,
        m.intermediate as u128,
    )
}

/// Width of K and V as the attention kernel sees them: `repeat_kv` expands and reshapes them
/// to q's width; with one KV head the merged dims are (1, n_rep), which a reshape can view (a
/// size-1 dim's stride is free), so nothing is copied; native GQA passes them as they are.
pub(crate) fn kv_seen(plan: &Plan) -> u128 {
    let m = &plan.model;
    match plan.implementation.gqa {
        Gqa::RepeatKv if m.kv_heads > 1 => m.q_dim() as u128,
        Gqa::RepeatKv | Gqa::Native => m.kv_dim() as u128,
    }
}

/// The softmax probabilities the math attention backend saves, per token: heads x (causal row
/// of the full sequence) in the compute dtype; none with flash or efficient attention.
fn probabilities(plan: &Plan, e: u128) -> u128 {
    match plan.implementation.attention {
        Attention::Math => e * plan.model.heads as u128 * plan.batch.seq_len as u128,
        Attention::Flash | Attention::Efficient | Attention::Flex => 0,
    }
}

/// What attention saves per token in a Llama-layout block without tensor parallelism: q, k,
/// v as the kernel sees them, its output, the fp32 log-sum-exp, and the math backend's
/// probabilities.
fn attention_saved(plan: &Plan, e: u128) -> u128 {
    let q = plan.model.q_dim() as u128;
    e * (2 * q + 2 * kv_seen(plan))
        + 4 * plan.model.heads as u128
        + probabilities(plan, e)
        + rope_rows(plan)
}

/// Per-token saved bytes of one block for `plan`: a dense block, or an MoE block when
/// `moe` is set (the model must have an MoE layout).
///
/// ```
/// use memplan::estimate::activations::block_activations;
/// use memplan::plan::PlanFile;
/// let plan: PlanFile = serde_json::from_str(r#"{"model":"llama3-8b"}"#).unwrap();
/// let a = block_activations(&plan.resolve().unwrap(), false);
/// assert_eq!(a.no_ac, 213_128);
/// assert_eq!(a.full_ac, 8_192);
/// ```
pub fn block_activations(plan: &Plan, moe: bool) -> BlockActivations {
    if let (Some(lora), false) = (plan.lora, moe) {
        return lora_block(plan, lora);
    }
    if plan.precision.autocast {
        return autocast_block(plan);
    }
    let m = &plan.model;
    let par = &plan.parallel;
    let imp = &plan.implementation;
    let e = plan.precision.param.bytes() as u128;
    let (h, q, kv, f) = block_dims(m);
    let heads = m.heads as u128;
    let tp = par.tp as u128;
    let sp_div = if par.sp { tp } else { 1 };
    // torch.compile fuses each norm into one kernel and lets the partitioner recompute
    // pointwise ops (silu, the SwiGLU product) from the matmul outputs it keeps.
    let (norm_kind, fused) = norm_style(plan);
    let fused_norm = plan.compile || fused;
    // Float8 linears (torchao Float8Linear) save their input cast to fp8 (1 byte) instead
    // of the e-byte input; eager, each linear casts (and saves) its own copy; compiled, the
    // casts of a shared input are one.
    let f8 = plan.float8;
    let f8_shared = |consumers: u128| if plan.compile { 1 } else { consumers };

    // One norm's saved tensors ([`norm_saved`]); `shared` is the part that is the norm's
    // input itself (the block input for the first norm).
    let norm = div(norm_saved(norm_kind, fused_norm, e, h, 1), sp_div);
    let shared = div(norm_input_saved(norm_kind, fused_norm, e, h), sp_div);
    // Parallel residual (GPT-NeoX): both norms read the block input, saved once.
    let (norms, ffn_norms) = if m.parallel_residual {
        (2 * norm - shared, norm - shared)
    } else {
        let n = m.norms_per_block as u128;
        (n * norm, n / 2 * norm)
    };
    // Q/K norms (Qwen3, Gemma 3): a norm of head_dim per head on the q and k projections'
    // outputs, split over TP with the heads.
    let qk_norm = if m.qk_norm {
        div(
            norm_saved(norm_kind, fused_norm, e, q, heads)
                + norm_saved(norm_kind, fused_norm, e, kv, m.kv_heads as u128),
            tp,
        )
    } else {
        0
    };
    let kv_seen = kv_seen(plan);
    // A fused q/k/v projection (Phi-3, GPT-NeoX): q and k pass through rotary (new
    // tensors), but V reaches the kernel as a view of the fused output unless `repeat_kv`
    // copies it (n_rep > 1), and a saved view keeps its whole base alive: e(q + 2kv).
    let fused_qkv = div(e * (q + 2 * kv), tp);
    let v_is_view = !(imp.gqa == Gqa::RepeatKv && m.kv_heads > 1 && m.heads > m.kv_heads);
    let v_saved = if m.fused_qkv && v_is_view {
        q + 2 * kv
    } else {
        kv_seen
    };
    let lse = div(4 * heads, tp);
    let seq = plan.batch.seq_len as u128;
    let quadratic = div(probabilities(plan, e), tp);
    // Gemma 2's soft-capped scores: with `math`, taken as Hugging Face's eager attention,
    // which saves the tanh output (e) and the fp32 softmax output (4) beside the e-byte
    // probabilities. Flash-attention (2.6 and later) caps inside the kernel and saves what it
    // always does; SDPA's kernels cannot cap (Hugging Face's sdpa path drops the cap), with
    // the same memory.
    let softcap = match imp.attention {
        Attention::Math if m.attn_softcap => div((e + 4) * heads * seq, tp),
        _ => 0,
    };
    // torchtitan 0.3's per-layer RoPE cache gathered by `positions` ([B, S, 1, head_dim / 2]
    // complex64, saved by the rotation's multiply: `models/common/rope.py`,
    // `_reshape_for_broadcast`); the same on every TP rank. Measured on CPU: 8,192 B per block
    // at 128 tokens of head_dim 16 (docs/research/torchtitan-0.3.0-measured.md).
    let rope_rows = rope_rows(plan);
    let attention =
        div(e * (q + kv_seen + v_saved + q), tp) + lse + quadratic + softcap + rope_rows; // q, k, v, out
                                                                                          // `output.transpose(1, 2).contiguous()` into wo: flash and memory-efficient attention
                                                                                          // (CUDA, and the CPU flash kernel) return their output as a transposed view of a
                                                                                          // (batch, seq, heads, head_dim) buffer, so `.contiguous()` is a no-op and wo saves the
                                                                                          // attention output itself (already counted); the math backend's output is
                                                                                          // (batch, heads, seq, head_dim) and the copy is real. Float8 casts it to fp8 regardless.
                                                                                          // Ring attention (context parallelism) merges the partial outputs with `torch.cat` into a
                                                                                          // contiguous (batch, heads, seq, head_dim) tensor on every rank but the last (torch 2.11
                                                                                          // `_context_parallel/_attention.py`, `_partial_update`), so the copy is real there too
                                                                                          // (measured with torch's own `context_parallel` on CPU, rank 0).
    let o_input = match (f8, imp.attention) {
        (true, _) => div(q, tp),
        (false, _) if attention_output_copied(plan) => div(e * q, tp),
        (false, _) => 0,
    };
    // Norm outputs into q/k/v (one linear when fused) and w1/w3 (or router and experts):
    // full size (replicated, or all-gathered under SP).
    let qkv_linears = if m.fused_qkv { 1 } else { 3 };
    let qkv_input = if f8 {
        f8_shared(qkv_linears) * h
    } else {
        e * h
    };
    let block_input = div(e * h, sp_div);

    let mut per_block = 0;
    let (ffn, ffn_sac, ffn_overlap, ffn_bwd) = if moe {
        let (per_token, block) = moe_ffn(plan, e, h, tp, f8);
        per_block = block;
        per_token
    } else {
        let f_tp = div(e * f, tp);
        let linears_in = match (m.mlp, m.fused_gate_up) {
            (MlpKind::Gated, false) => 2,
            _ => 1,
        };
        let ffn_input = if f8 { f8_shared(linears_in) * h } else { e * h };
        match m.mlp {
            MlpKind::Gated => {
                // silu input, silu output, w3 output, product (w2's input: fp8 under
                // float8). Compiled: only the w1 and w3 outputs; the rest is recomputed.
                // Fused gate_up (Phi-3): the act and the product save the two halves of the
                // one 2f output, views that keep it whole: the same 4ef.
                let mlp = if plan.compile {
                    2 * f_tp
                } else if f8 {
                    3 * f_tp + div(f, tp)
                } else {
                    4 * f_tp
                };
                // torchtitan's selective-op keeps every other matmul output, counted from
                // the block's first: separate w1, w3, w2 are the 5th, 6th and 7th (w1 and
                // w2 kept; the w2 output is the pre-reduction partial sum under TP: full
                // hidden width); a fused gate_up and w2 are the 3rd and 4th (gate_up kept).
                let (sac, overlap) = if m.fused_gate_up {
                    (2 * f_tp, 2 * f_tp)
                } else {
                    (f_tp + e * h, f_tp)
                };
                // MLP backward at the `act * up` product: grad(product), grad(act), grad(up)
                // alive while the w2 input is freed: net 2ef beyond the saved set, plus the
                // block-output gradient kept for the residual branch.
                (ffn_input + mlp, sac, overlap, block_input + 2 * f_tp)
            }
            MlpKind::Plain => {
                // fc1 saves its input (above); GELU its input (ef); fc2 its input, the GELU
                // output (ef; fp8 under float8). Compiled: the fc1 output only.
                let mlp = if plan.compile {
                    f_tp
                } else if f8 {
                    f_tp + div(f, tp)
                } else {
                    2 * f_tp
                };
                // fc1 and fc2 follow one or four attention matmuls (even either way): the
                // fc1 output is kept, and is the GELU input of the no-AC set. Backward at
                // GELU: grad(GELU out) and grad(fc1 out) alive, the fc2 input freed: net ef.
                (ffn_input + mlp, f_tp, f_tp, block_input + f_tp)
            }
        }
    };

    let no_ac = norms + qk_norm + qkv_input + attention + o_input + ffn;
    // torchtitan `_save_list` with its every-other-mm rule, counted per block: the 1st, 3rd,
    // 5th and 7th mm outputs are kept (wq, wv, w1, w2; a fused qkv is the 1st), plus the
    // attention outputs (out and log-sum-exp); wk, wo, w3 and everything else are
    // recomputed.
    let sac_attention = div(e * q, tp) + lse;
    let kv_tp = div(e * kv, tp);
    // torchtitan 0.3's fused wqkv is the block's first of five matmuls: its whole output is
    // kept (then wo and w3 are recomputed, w1 and w2 kept, as with three linears).
    let copies = imp.qkv == crate::plan::Qkv::FusedCopies;
    let sac_qkv = if m.fused_qkv || copies {
        fused_qkv
    } else {
        div(e * q, tp) + kv_tp
    };
    let selective_op = block_input + sac_qkv + sac_attention + ffn_sac;
    // Shared with the no-AC set: the attention out and lse, the wv output when attention sees
    // V unexpanded (the fused qkv output when V is a view of it), the wq output when a q norm
    // saves its input, the FFN's kept matmul output, and Gemma's w2 output when the norm
    // after the MLP saves its input (without TP, where w2's output is that input).
    // (torchtitan 0.3's split copies: the fused output is not among the no-AC saved tensors.)
    let qkv_overlap = match (m.fused_qkv, imp.gqa) {
        _ if copies && !m.fused_qkv => 0,
        (true, _) if v_is_view => fused_qkv,
        (true, _) => 0,
        (false, Gqa::Native) => kv_tp,
        (false, Gqa::RepeatKv) => 0,
    };
    let q_norm_overlap = if m.qk_norm {
        div(norm_input_saved(norm_kind, fused_norm, e, q), tp)
    } else {
        0
    };
    let post_norm_overlap = if m.norms_per_block == 4 && tp == 1 && !moe {
        shared
    } else {
        0
    };
    let overlap = sac_attention + ffn_overlap + qkv_overlap + q_norm_overlap + post_norm_overlap;
    // Attention backward (flash): grad of out, dq, dk, dv, FlashAttention-2's fp32 dq
    // accumulator, plus the block-output gradient.
    let attn_bwd = block_input + div(e * (2 * q + 2 * kv_seen) + 4 * q, tp);
    let ring = if par.cp > 1 {
        let all_gather = par.cp_rotate == crate::plan::CpRotate::AllGather;
        div(
            ring_backward(par.cp as u128, all_gather, e, q, kv_seen, heads),
            tp,
        )
    } else {
        0
    };
    BlockActivations {
        no_ac,
        full_ac: block_input,
        selective_op,
        selective_op_overlap: overlap,
        // Ring buffers exist only inside attention's forward and backward.
        mlp_transient: ffn_bwd,
        attn_transient: attn_bwd + ring,
        ffn_saved: ffn_norms + ffn + if f8 { 0 } else { o_input },
        head: norm + e * h,
        input_alias: shared,
        per_block,
        first_block_less: 0,
        rope_peak: if torchtitan03_block(plan, moe) {
            // The attention norm's input (the block's) and rstd, its output, the split's q,
            // k, v copies, the gathered cache rows, q and k in fp32 and their rotated
            // complex products (fp32 bytes), and the rotated q and k back in e; under
            // selective-op also the kept wqkv output. Measured on CPU (tiny: 237,568 B of
            // the last block at 128 tokens beside its input, full AC).
            // (A checkpointed block's norm keeps no rstd: its saved tensors are discarded.)
            2 * e * h
                + if plan.activation_checkpointing == crate::plan::Checkpointing::None {
                    4
                } else {
                    0
                }
                + e * (q + 2 * kv)
                + rope_rows
                + 8 * (q + kv)
                + e * (q + kv)
                + if plan.activation_checkpointing == crate::plan::Checkpointing::SelectiveOp {
                    e * (q + 2 * kv)
                } else {
                    0
                }
        } else {
            0
        },
        add_peak: if torchtitan03_block(plan, moe)
            && plan.activation_checkpointing == crate::plan::Checkpointing::None
        {
            no_ac + 2 * e * h
        } else {
            0
        },
    }
}

/// Whether the block is torchtitan 0.3's dense Llama block whose forward moments were measured
/// (fused wqkv split into copies, the per-layer RoPE cache gathered by position), without TP,
/// CP, LoRA, float8 or compile.
pub(crate) fn torchtitan03_block(plan: &Plan, moe: bool) -> bool {
    !moe && plan.implementation.qkv == crate::plan::Qkv::FusedCopies
        && plan.implementation.rotary == crate::plan::Rotary::PerLayer
        && plan.model.is_llama_block()
        && plan.lora.is_none()
        && !plan.compile
        && !plan.float8
        && plan.parallel.tp == 1
        && plan.parallel.cp == 1
}

/// Whether the attention output reaches wo as a copy that wo saves: the math backend's
/// (batch, heads, seq, head_dim) output, and ring attention's merged output under context
/// parallelism, are made contiguous by `transpose(1, 2).contiguous()`; flash and efficient
/// kernels return a transposed view of a (batch, seq, heads, head_dim) buffer, for which the
/// call is a no-op.
pub(crate) fn attention_output_copied(plan: &Plan) -> bool {
    plan.implementation.attention == Attention::Math || plan.parallel.cp > 1
}

/// Per-token bytes of the RoPE cache rows one block gathers by `positions` and saves
/// (torchtitan 0.3, [`crate::plan::Rotary::PerLayer`]): complex64 for head_dim / 2 pairs,
/// 4 x head_dim.
pub(crate) fn rope_rows(plan: &Plan) -> u128 {
    match plan.implementation.rotary {
        crate::plan::Rotary::PerLayer => 4 * plan.model.head_dim as u128,
        _ => 0,
    }
}

/// What ring attention's backward (torch 2.11 `_templated_ring_attention_backward`) holds
/// beyond the plain attention backward, per local token, on rank 0 at its peak. Measured with torch's own `context_parallel` on CPU/Gloo (the
/// CPU flash op routed through torch's ring templates; docs/research/parallelism-torch-2.11.md):
/// - fp32 dq, dk, dv accumulators (`zeros_like`): 4(q + 2K);
/// - K and V concatenated for the rotation, and the all-gather of every rank's: (cp + 1) 2eK
///   (all-gather rotation, torchtitan's default); with the all-to-all rotation one receive
///   buffer instead of the all-gather, 2 x 2eK (measured at cp 2);
/// - the previous ring step's kernel gradients, bound while the next runs: e(q + 2K);
/// - fp32 dK and dV concatenated and the all-to-all that rotates them: 16K;
/// - the kernel outputs of a step on half of q are smaller by eq/2, and that half's
///   log-sum-exp is made contiguous (2 per head).
///
/// With more than two ranks the peak can come earlier, at step 1's concatenation: two
/// concatenations and step 0's contiguous k and v, no kernel outputs yet.
fn ring_backward(cp: u128, all_gather: bool, e: u128, q: u128, k: u128, heads: u128) -> u128 {
    let kv = if all_gather { cp + 1 } else { 2 } * 2 * e * k;
    let common = 4 * (q + 2 * k) + kv + e * (q + 2 * k) + 16 * k;
    let at_kernel = common - e * q / 2 + 2 * heads;
    if cp > 2 {
        at_kernel.max(common + 2 * 2 * e * k - (e * (q + 2 * k) + 4 * q))
    } else {
        at_kernel
    }
}

/// A block under `torch.autocast` to the 16-bit `param` dtype over fp32 weights, per token
/// (Transformers' `Trainer(bf16=True)`; torchtitan without FSDP). Measured with Transformers
/// 5.24 and torchtitan 0.2.2 on CPU (docs/research/hf-lora-measured.md,
/// docs/research/torchtitan-0.2.2-measured.md): the residual stream stays fp32, so the norms
/// compute in fp32 (eager: the input, rsqrt and the fp32 normalised tensor, which the fp32
/// weight's gradient needs; fused: the input and rstd); each of q, k, v, gate and up casts its
/// own input to 16 bits and saves that cast (autocast caches casts of weights, not of
/// activations); attention, the MLP and wo's input are 16-bit as in plain bf16 training. The
/// block's input, kept under checkpointing, is fp32.
fn autocast_block(plan: &Plan) -> BlockActivations {
    let m = &plan.model;
    let imp = &plan.implementation;
    let e = plan.precision.param.bytes() as u128;
    let (h, q, _, f) = block_dims(m);
    let fused_norm = imp.rmsnorm == RmsNorm::Fused;
    let norm = norm_saved(m.norm, fused_norm, 4, h, 1);
    let kv_seen = kv_seen(plan);
    let attention = attention_saved(plan, e);
    let o_input = if attention_output_copied(plan) {
        e * q
    } else {
        0
    };
    let casts = 5 * e * h;
    let mlp = 4 * e * f;
    let no_ac = 2 * norm + casts + attention + o_input + mlp;
    let block_input = 4 * h;
    BlockActivations {
        no_ac,
        full_ac: block_input,
        selective_op: no_ac,
        selective_op_overlap: 0,
        mlp_transient: block_input + 2 * e * f,
        attn_transient: block_input + e * (2 * q + 2 * kv_seen) + 4 * q,
        ffn_saved: norm + 2 * e * h + mlp + o_input,
        // The final norm and the output projection's own cast of its input.
        head: norm + e * h,
        input_alias: norm_input_saved(m.norm, fused_norm, 4, h),
        per_block: 0,
        first_block_less: 0,
        rope_peak: 0,
        add_peak: 0,
    }
}

/// A block with LoRA adapters on a frozen base (peft 0.21 `lora.Linear`: `base(x) +
/// lora_B(lora_A(dropout(x))) * scaling`, x first cast to the adapters' dtype), per token.
/// Measured with Transformers 5.24 and peft 0.21.2 on torch 2.11, CPU, counted by the shim's
/// allocator (docs/research/hf-lora-measured.md): what autograd saves follows from which
/// tensors need gradients once the base is frozen.
///
/// | op                                   | saved                                             |
/// |--------------------------------------|---------------------------------------------------|
/// | eager RMSNorm, frozen weight         | the fp32 copy (4h) and rsqrt (4); not the normalised tensor (`mul` saves `self` only when `other` needs grad) |
/// | frozen linear                        | nothing: its input is saved only for its weight's gradient |
/// | SDPA                                 | q, k, v, out, log-sum-exp, as without LoRA        |
/// | `silu(gate) * up`, frozen down       | silu input and both product operands (3ef); the product only if down is wrapped |
/// | wrapped linear, dropout > 0          | the dropout mask (bool on CUDA, 1 B; CPU's `at::dropout` an input-dtype noise tensor) and its output (a bytes), which lora_A saves |
/// | wrapped linear, dropout 0            | lora_A's input: a shared input once (q/k/v share the norm output, gate/up theirs; o's is the attention output, already saved) when the base is in the adapters' dtype, else each module's own cast copy (a) |
/// | lora_B                               | its input x A^T (a x rank)                        |
///
/// The first block's input comes from a frozen embedding and needs no gradient, so (without
/// checkpointing) its first norm saves nothing and its q/k/v dropouts keep no mask. With
/// Transformers' gradient checkpointing `enable_input_require_grads` makes it need one.
fn lora_block(plan: &Plan, lora: crate::plan::Lora) -> BlockActivations {
    use crate::plan::Checkpointing;
    let m = &plan.model;
    let imp = &plan.implementation;
    let e = plan.precision.param.bytes() as u128;
    // The adapters' dtype: their own (the master dtype) on one GPU; under FSDP the compute
    // dtype, to which FSDP casts them with the frozen weights (docs/research/lora-fsdp2-measured.md).
    let a = if plan.parallel.fsdp_degree() > 1 {
        e
    } else {
        plan.precision.master.bytes() as u128
    };
    let (h, q, _, f) = block_dims(m);
    let fused_norm = imp.rmsnorm == RmsNorm::Fused;
    // A frozen norm saves what normalising needs, not the tensor its weight multiplies.
    let norm = norm_saved(m.norm, fused_norm, e, h, 1)
        - match (m.norm, fused_norm) {
            (NormKind::Rms, false) => e * h,
            (NormKind::RmsOnePlus, false) => 4 * h,
            _ => 0,
        };
    let kv_seen = kv_seen(plan);
    let attention = attention_saved(plan, e);
    // silu's input and the product's two operands; the product itself when down is wrapped.
    let mlp = 3 * e * f;
    let r = lora.rank as u128;
    let dims = super::params::lora_module_dims(plan);
    let mask = if plan.gpu.caching_allocator { 1 } else { a };
    // The input each module reads: 0 the first norm's output, 1 the attention output, 2 the
    // second norm's output, 3 the MLP product.
    const INPUT: [usize; 7] = [0, 0, 0, 1, 2, 2, 3];
    let mut adapters = 0;
    let mut kept = [false; 4];
    let mut first_less_masks = 0;
    for (i, &(d_in, _)) in dims.iter().enumerate() {
        if !lora.wraps(i) {
            continue;
        }
        adapters += a * r;
        if lora.dropout {
            adapters += (mask + a) * d_in;
            if INPUT[i] == 0 {
                first_less_masks += mask * d_in;
            }
        } else if e != a {
            adapters += a * d_in;
        } else if !kept[INPUT[i]] {
            kept[INPUT[i]] = true;
            // The attention output is saved by the attention kernel already.
            adapters += if INPUT[i] == 1 { 0 } else { e * d_in };
        }
    }
    let no_ac = 2 * norm + attention + mlp + adapters;
    let block_input = e * h;
    let checkpointed = plan.activation_checkpointing == Checkpointing::Full;
    BlockActivations {
        no_ac,
        full_ac: block_input,
        selective_op: no_ac,
        selective_op_overlap: 0,
        // The `silu * up` product's backward: its incoming gradient and the two it makes.
        // Without LoRA on down (or with down's own copy of the input) nothing saved the
        // product, so none of the three replaces a freed saved tensor (measured: the peak of
        // a checkpointed LoRA block, 3ef above the recomputed set).
        // With down wrapped on a base of another dtype, its adapter branch's gradient of the
        // product (adapter dtype, cast back to the base's) is alive beside the base branch's
        // until they are summed (measured: all-linear LoRA on a bf16 base with gradient
        // checkpointing; not seen on an fp32 base, +1.3% if counted there).
        mlp_transient: block_input
            + if kept[3] { 2 } else { 3 } * e * f
            + if lora.wraps(6) && e != a { a * f } else { 0 },
        attn_transient: block_input + e * (2 * q + 2 * kv_seen) + 4 * q,
        ffn_saved: norm + mlp,
        // The final norm; the frozen output projection saves nothing.
        head: norm,
        input_alias: norm_input_saved(m.norm, fused_norm, e, h),
        per_block: 0,
        first_block_less: if checkpointed {
            0
        } else {
            norm + first_less_masks
        },
        rope_peak: 0,
        add_peak: 0,
    }
}

/// Per-token bytes one norm over `w` features in `rows` rows saves (PyTorch
/// derivatives.yaml, e-byte input):
///
/// | norm                                              | saved                              |
/// |---------------------------------------------------|------------------------------------|
/// | RMSNorm eager: `x.float()`, `pow`, `* rsqrt`, `.type_as(x) * weight` | fp32 copy (4w), rsqrt (4 per row), the normalised e-byte tensor (ew) |
/// | Gemma RMSNorm eager: `_norm(x.float()) * (1 + weight.float())` | fp32 copy (4w), rsqrt (4 per row), the normalised fp32 tensor (4w: `mul` saves `self` as `other` needs grad) |
/// | RMSNorm fused or compiled (either kind)           | input (ew), fp32 rstd (4 per row)  |
/// | `native_layer_norm` (LayerNorm, eager or compiled) | input (ew), fp32 mean and rstd (8 per row) |
///
/// ```
/// use memplan::estimate::activations::norm_saved;
/// use memplan::profiles::NormKind;
/// // llama3-8b's eager RMSNorm in bf16: 4 x 4096 + 4 + 2 x 4096.
/// assert_eq!(norm_saved(NormKind::Rms, false, 2, 4096, 1), 24_580);
/// // Pythia's LayerNorm: the bf16 input and two fp32 statistics.
/// assert_eq!(norm_saved(NormKind::LayerNorm, false, 2, 4096, 1), 8_200);
/// ```
pub fn norm_saved(kind: NormKind, fused: bool, e: u128, w: u128, rows: u128) -> u128 {
    match (kind, fused) {
        (NormKind::LayerNorm, _) => e * w + 8 * rows,
        (_, true) => e * w + 4 * rows,
        (NormKind::Rms, false) => 4 * w + 4 * rows + e * w,
        (NormKind::RmsOnePlus, false) => 4 * w + 4 * rows + 4 * w,
    }
}

/// Bytes of [`norm_saved`] that are the norm's input tensor itself: the input a LayerNorm or
/// a fused norm saves, or the fp32 copy of an eager RMSNorm when the input is already fp32
/// (`x.float()` of an fp32 tensor is the same tensor).
pub fn norm_input_saved(kind: NormKind, fused: bool, e: u128, w: u128) -> u128 {
    match (kind, fused) {
        (NormKind::LayerNorm, _) | (_, true) => e * w,
        (_, false) if e == 4 => 4 * w,
        _ => 0,
    }
}

/// The norm as its saved tensors go: its kind, and whether one fused kernel runs. A composite
/// `torch.nn.RMSNorm` (no fused kernel: torch 2.11 on the CPU) keeps the normalised tensor in
/// fp32, as Gemma's eager norm does: the fp32 copy, rsqrt, the fp32 product with rsqrt
/// (`F.rms_norm`'s decomposition multiplies by the weight in fp32 too; measured with
/// torchtitan 0.2.2 on CPU, docs/research/torchtitan-0.2.2-measured.md finding 5).
pub(crate) fn norm_style(plan: &Plan) -> (NormKind, bool) {
    let kind = plan.model.norm;
    match plan.implementation.rmsnorm {
        RmsNorm::Fused => (kind, true),
        RmsNorm::Composite if kind == NormKind::Rms => (NormKind::RmsOnePlus, false),
        _ => (kind, false),
    }
}

/// The MoE feed-forward of a block, per token: (saved without AC, kept by selective-op,
/// overlap of the two, backward transient), and what it saves per block whatever the tokens.
///
/// torchtitan 0.2.2's MoE (`models/moe/moe.py`), measured with its own `MoE` and
/// `ExpertParallel` on CPU/Gloo (docs/research/parallelism-torch-2.11.md). Routing is dropless
/// token choice: there is no capacity. A rank's experts receive R rows (N k at EP 1; under EP
/// what the routing sends, read from the plan's `moe_capacity_factor` as R / (N k), 1 for a
/// balanced router), padded per local expert to a multiple of 8 with at least 8
/// (`_permute`: P = R + 8 E/ep rows). Saved for backward:
/// - the router (`TokenChoiceTopKRouter`): fp32 scores (4E), int64 top-k indices (8k), the
///   gathered top scores and their normalised, scaled copy (4k each), the normaliser (4);
/// - the reorder: argsort indices and `idx // k` (16k, int64);
/// - `_permute`'s int32 indices (4 per row) and the offsets (4 per local expert);
/// - the grouped matmuls run in bf16 whatever the training dtype (`_run_experts_grouped_mm`):
///   the input cast twice, once for w1 and once for w3 (2 x 2h per row; in bf16 the permuted
///   input itself, 2h), the three weights cast to bf16 (per block, fp32 training only), and the
///   SwiGLU's w1 and w3 outputs, silu output and product (4 x 2f per row);
/// - the fp32 `routed_output_unsorted` the combining bmm saves (4h per routed copy).
///
/// A shared expert is a dense SwiGLU. The backward at the experts' w2 holds dY and dH in bf16
/// (2h + 2f per row) beside the block-output gradient.
fn moe_ffn(plan: &Plan, e: u128, h: u128, tp: u128, f8: bool) -> ((u128, u128, u128, u128), u128) {
    let moe = plan
        .model
        .moe
        .expect("moe_ffn is called for MoE models only");
    let _ = f8;
    let etp = plan.parallel.etp as u128;
    let (k, experts) = (moe.top_k as u128, moe.experts as u128);
    let local = div(experts, plan.parallel.ep as u128);
    let rho = plan.moe_capacity_milli as u128;
    // Rows this rank's experts receive, per token (R / N), in thousandths.
    let rows = |x: u128| div(x * k * rho, 1000);
    let f = div(moe.expert_intermediate as u128, etp);
    let fs = div(e * moe.shared_intermediate as u128, tp);
    let x_casts = if e == 2 { 2 * h } else { 2 * 2 * h };
    let swiglu = if plan.compile { 2 * 2 * f } else { 4 * 2 * f };
    let per_row = 4 + x_casts + swiglu;
    let router = 4 * experts + 16 * k + 4;
    let shared = if plan.compile { 2 * fs } else { 4 * fs };
    let saved = e * h + router + 16 * k + rows(per_row) + 4 * h * k + shared;
    // Per block: the padding rows (8 per local expert), the offsets, and in fp32 training the
    // bf16 copies of the three expert weights.
    let weights = if e == 2 { 0 } else { 3 * local * f * h * 2 };
    let per_block = 8 * local * per_row + 4 * local + weights;
    // selective-op: the mm outputs kept are the router's scores and, per row, the first
    // grouped matmul and the second (w1 and w2 outputs), and the shared expert's w1 and w2.
    let sac = 4 * experts + rows(2 * f + 2 * h) + fs + e * h;
    let overlap = 4 * experts + rows(2 * f) + fs;
    let bwd = e * h + rows(2 * h + 2 * f) + 2 * fs;
    ((saved, sac, overlap, bwd), per_block)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::plan::test_plan as plan;

    #[test]
    fn native_gqa_saves_unexpanded_kv() {
        let rep = block_activations(&plan(r#"{"model":"llama3-8b"}"#), false);
        let nat = block_activations(
            &plan(r#"{"model":"llama3-8b","implementation":{"gqa":"native"}}"#),
            false,
        );
        // K and V shrink from 4096 to 1024 wide, 2 bytes each.
        assert_eq!(rep.no_ac - nat.no_ac, 2 * 2 * (4096 - 1024));
    }

    #[test]
    fn fused_norm_saves_the_input_and_rstd_only() {
        let eager = block_activations(&plan(r#"{"model":"llama3-8b"}"#), false);
        let fused = block_activations(
            &plan(r#"{"model":"llama3-8b","implementation":{"rmsnorm":"fused"}}"#),
            false,
        );
        assert_eq!(eager.no_ac - fused.no_ac, 2 * (4 * 4096));
    }

    #[test]
    fn selective_op_keeps_four_matmuls_and_attention() {
        let a = block_activations(&plan(r#"{"model":"llama3-8b"}"#), false);
        // input 2h, wq 2h, wv 2*1024, w1 2f, w2 2h, attention out 2h, lse 4*32
        assert_eq!(a.selective_op, 2 * 4096 * 4 + 2 * 1024 + 2 * 14336 + 4 * 32);
    }

    #[test]
    fn sequence_parallel_divides_the_norm_region() {
        let tp = block_activations(
            &plan(r#"{"model":"llama3-8b","num_gpus":4,"parallel":{"tp":4,"sp":false}}"#),
            false,
        );
        let sp = block_activations(
            &plan(r#"{"model":"llama3-8b","num_gpus":4,"parallel":{"tp":4,"sp":true}}"#),
            false,
        );
        assert_eq!(tp.no_ac - sp.no_ac, 2 * (4 * 4096 + 4 + 2 * 4096) * 3 / 4);
    }

    #[test]
    fn compile_keeps_two_mlp_matmul_outputs_and_fused_norms() {
        let eager = block_activations(&plan(r#"{"model":"llama3-8b"}"#), false);
        let compiled = block_activations(&plan(r#"{"model":"llama3-8b","compile":true}"#), false);
        // norms: 2 x 4 x 4096 fp32 copies gone; MLP: silu output and product (2 x 2 x 14336).
        assert_eq!(eager.no_ac - compiled.no_ac, 2 * 4 * 4096 + 2 * 2 * 14336);
    }

    #[test]
    fn float8_saves_linear_inputs_in_one_byte() {
        let bf16 = block_activations(&plan(r#"{"model":"llama3-8b","compile":true}"#), false);
        let f8 = block_activations(
            &plan(r#"{"model":"llama3-8b","compile":true,"float8":true}"#),
            false,
        );
        // q/k/v input and w1/w3 input drop from 2 to 1 byte per element; wo saves an fp8
        // copy (1 byte) of the attention output, which bf16 wo shares with attention.
        assert_eq!(bf16.no_ac - f8.no_ac, 4096 + 4096 - 4096);
    }

    #[test]
    fn moe_block_counts_routed_rows() {
        // tiny-moe: h 64, 4 experts of 128, top-2, bf16, eager norms, balanced routing.
        let p = plan(r#"{"model":"tiny-moe"}"#);
        let a = block_activations(&p, true);
        let d = block_activations(&p, false);
        let dense_ffn = 2 * 64 + 4 * 2 * 128;
        // Per token: the router's input (2h), scores (4E), indices (8k), top scores and
        // their scaled copy (4k each), normaliser (4); argsort and idx // k (16k); per routed
        // row (k of them) the int32 index, the bf16 input (2h) and four bf16 SwiGLU tensors
        // (4 x 2f); the fp32 routed output (4h per row).
        let row = 4 + 2 * 64 + 4 * 2 * 128;
        let moe_ffn = 2 * 64 + (4 * 4 + 8 * 2 + 4 * 2 + 4 * 2 + 4) + 16 * 2 + 2 * row + 4 * 64 * 2;
        assert_eq!(a.no_ac - d.no_ac, moe_ffn - dense_ffn);
        // Per block: 8 padding rows per local expert and the 4 offsets; no weight copies in
        // bf16 training.
        assert_eq!(a.per_block, 8 * 4 * row + 4 * 4);
        let fp32 = block_activations(
            &plan(r#"{"model":"tiny-moe","precision":{"param":"fp32"}}"#),
            true,
        );
        // fp32 training casts the input twice (2 x 2h per row) and the three expert weights.
        let row32 = 4 + 2 * 2 * 64 + 4 * 2 * 128;
        assert_eq!(fp32.per_block, 8 * 4 * row32 + 4 * 4 + 3 * 4 * 128 * 64 * 2);
    }

    #[test]
    fn math_attention_saves_probabilities() {
        let seq = r#""batch":{"seq_len":1024}"#;
        let math = block_activations(
            &plan(&format!(
                r#"{{"model":"llama3-8b",{seq},"implementation":{{"attention":"math"}}}}"#
            )),
            false,
        );
        let flash = block_activations(&plan(&format!(r#"{{"model":"llama3-8b",{seq}}}"#)), false);
        // 32 heads x 1024 keys of bf16 probabilities per token; and wo's input is a real copy
        // (2 x 4096), the math backend's output being (b, heads, s, d).
        assert_eq!(math.no_ac - flash.no_ac, 2 * 32 * 1024 + 2 * 4096);
    }

    #[test]
    fn gpt_neox_block_is_counted_by_hand() {
        // Pythia-6.9B (h 4096, 32 heads, f 16384), bf16, flash. Both LayerNorms save the
        // block input (2 x 4096, once) and fp32 mean and rstd (2 x 8); query_key_value its
        // input (2 x 4096); attention q, k (2 x 4096 each, MHA), V as a view of the fused
        // qkv output (2 x 3 x 4096), out (2 x 4096), lse 4 x 32; dense_h_to_4h its input
        // (2 x 4096); GELU its input and dense_4h_to_h the GELU output (2 x 2 x 16384).
        let a = block_activations(
            &plan(r#"{"model":"tests/data/hf/pythia-6.9b.json"}"#),
            false,
        );
        let norms = 2 * 4096 + 16;
        let attention = 2 * 4096 + 2 * (4096 + 4096 + 3 * 4096 + 4096) + 4 * 32;
        let mlp = 2 * 4096 + 2 * 2 * 16384;
        assert_eq!(a.no_ac, norms + attention + mlp);
        assert_eq!(a.no_ac, 139_408);
        // The LayerNorms save the block input itself.
        assert_eq!(a.input_alias, 2 * 4096);
        // selective-op keeps the fused qkv output (1st mm) and dense_h_to_4h's (3rd).
        assert_eq!(
            a.selective_op,
            2 * 4096 + 2 * 3 * 4096 + (2 * 4096 + 4 * 32) + 2 * 16384
        );
    }

    #[test]
    fn gemma2_block_saves_four_fp32_norms_and_a_geglu() {
        // Gemma-2-9B (h 3584, q 16 x 256, kv 8 x 256, f 14336), bf16, eager norms, flash,
        // repeat_kv. Each Gemma RMSNorm saves the fp32 copy (4h), rsqrt (4) and the fp32
        // normalised tensor the (1 + weight) multiply saves (4h): 4 x 28,676.
        let a = block_activations(&plan(r#"{"model":"tests/data/hf/gemma-2-9b.json"}"#), false);
        let norms = 4 * (8 * 3584 + 4);
        let attention = 2 * 3584 + 2 * 4 * 4096 + 4 * 16;
        let mlp = 2 * 3584 + 4 * 2 * 14336;
        assert_eq!(a.no_ac, norms + attention + mlp);
        assert_eq!(a.ffn_saved, 2 * (8 * 3584 + 4) + mlp);
    }

    #[test]
    fn gemma2_softcap_under_math_saves_tanh_and_fp32_softmax() {
        let g = |attn: &str| {
            block_activations(
                &plan(&format!(
                    r#"{{"model":"tests/data/hf/gemma-2-9b.json","batch":{{"seq_len":1024}},
                        "implementation":{{"attention":"{attn}"}}}}"#
                )),
                false,
            )
        };
        // math: probabilities (2) as SDPA math, plus tanh output (2) and fp32 softmax (4),
        // 16 heads x 1024 keys; the o input copy 2 x 4096.
        assert_eq!(
            g("math").no_ac - g("flash").no_ac,
            (2 + 2 + 4) * 16 * 1024 + 2 * 4096
        );
    }

    #[test]
    fn gemma3_q_and_k_norms_are_saved() {
        // gemma-3-1b: the q norm over 4 heads x 256 (4q + 4 x 4 + 4q) and the k norm over one
        // head (4 x 256 + 4 + 4 x 256), beside the block's four norms.
        let a = block_activations(&plan(r#"{"model":"tests/data/hf/gemma-3-1b.json"}"#), false);
        let qk = (8 * 1024 + 16) + (8 * 256 + 4);
        let norms = 4 * (8 * 1152 + 4);
        let attention = 2 * 1152 + 2 * (1024 + 256 + 256 + 1024) + 4 * 4; // one KV head: no copy
        let mlp = 2 * 1152 + 4 * 2 * 6912;
        assert_eq!(a.no_ac, qk + norms + attention + mlp);
    }

    #[test]
    fn phi3_fused_qkv_keeps_its_output_alive_through_v() {
        // Phi-3-mini (h = q = kv = 3072, f 8192, MHA): as a Llama block, but V is a view of
        // the fused qkv output (3 x 3072) instead of its own 3072.
        let a = block_activations(&plan(r#"{"model":"tests/data/hf/phi-3-mini-4k"}"#), false);
        let norms = 2 * (4 * 3072 + 4 + 2 * 3072);
        let attention = 2 * 3072 + 2 * (3072 + 3072 + 3 * 3072 + 3072) + 4 * 32;
        let mlp = 2 * 3072 + 4 * 2 * 8192;
        assert_eq!(a.no_ac, norms + attention + mlp);
        assert_eq!(a.no_ac, 151_688);
    }
}
