//! The Llama decoder as torchtitan wrote it in late 2024 (`torchtitan/models/llama/model.py`),
//! op for op, so that autograd saves the same tensors the estimator models.
//!
//! The layers take their weights as arguments instead of owning them: under FSDP the weights
//! are the unsharded parameters that [`super::fsdp`] materialises and frees around each block.
//! Every op is a fallible `f_*` call, so an allocation failure is an error, not a panic.

use tch::{Kind, Tensor};

use super::recorder::{self, Context};
use crate::plan::{Gqa, Logits};
use crate::profiles::ModelSpec;
use crate::trace::{Category, Module, Part};

pub type TResult<T> = Result<T, tch::TchError>;

/// RMSNorm epsilon (torchtitan's `norm_eps`, Hugging Face `rms_norm_eps` of the profiles).
pub const NORM_EPS: f64 = 1e-5;
/// Rotary base (torchtitan's `rope_theta` default); it does not change memory.
pub const ROPE_THETA: f64 = 10_000.0;

/// Sizes derived once from the model spec.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub hidden: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub vocab: i64,
}

impl Dims {
    pub fn new(m: &ModelSpec) -> Dims {
        Dims {
            hidden: m.hidden as i64,
            heads: m.heads as i64,
            kv_heads: m.kv_heads as i64,
            head_dim: m.head_dim as i64,
            vocab: m.vocab as i64,
        }
    }
}

/// How attention and logits are computed (from `plan.implementation`).
#[derive(Clone, Copy, Debug)]
pub struct Flavor {
    pub gqa: Gqa,
    pub logits: Logits,
}

/// The weights of one block, in the order of [`ModelSpec::block_params`].
pub struct BlockWeights<'a> {
    pub attention_norm: &'a Tensor,
    pub wq: (&'a Tensor, Option<&'a Tensor>),
    pub wk: (&'a Tensor, Option<&'a Tensor>),
    pub wv: (&'a Tensor, Option<&'a Tensor>),
    pub wo: (&'a Tensor, Option<&'a Tensor>),
    pub ffn_norm: &'a Tensor,
    pub w1: (&'a Tensor, Option<&'a Tensor>),
    pub w3: (&'a Tensor, Option<&'a Tensor>),
    pub w2: (&'a Tensor, Option<&'a Tensor>),
}

impl<'a> BlockWeights<'a> {
    /// Names the tensors of `params`, laid out as [`ModelSpec::block_params`] lists them.
    pub fn from_list(m: &ModelSpec, params: &'a [Tensor]) -> BlockWeights<'a> {
        let mut i = 0;
        let mut one = || {
            i += 1;
            &params[i - 1]
        };
        let attention_norm = one();
        let mut lin = |bias: bool| {
            let w = one();
            (w, bias.then(&mut one))
        };
        let wq = lin(m.qkv_bias);
        let wk = lin(m.qkv_bias);
        let wv = lin(m.qkv_bias);
        let wo = lin(m.o_bias);
        let ffn_norm = lin(false).0;
        let w1 = lin(m.mlp_bias);
        let w3 = lin(m.mlp_bias);
        let w2 = lin(m.mlp_bias);
        BlockWeights {
            attention_norm,
            wq,
            wk,
            wv,
            wo,
            ffn_norm,
            w1,
            w3,
            w2,
        }
    }
}

/// The root's weights: token embedding, final norm, output projection (the embedding again
/// when tied).
pub struct RootWeights<'a> {
    pub embedding: &'a Tensor,
    pub norm: &'a Tensor,
    pub output: &'a Tensor,
}

impl<'a> RootWeights<'a> {
    pub fn from_list(m: &ModelSpec, params: &'a [Tensor]) -> RootWeights<'a> {
        RootWeights {
            embedding: &params[0],
            norm: &params[1],
            output: if m.tied_embeddings {
                &params[0]
            } else {
                &params[2]
            },
        }
    }
}

fn linear(x: &Tensor, w: (&Tensor, Option<&Tensor>)) -> TResult<Tensor> {
    x.f_linear(w.0, w.1)
}

/// torchtitan `RMSNorm.forward`: `self._norm(x.float()).type_as(x) * self.weight` with
/// `_norm(x) = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)`. One `x.float()` copy
/// (none when x is already fp32), reused by `pow` and the multiply.
///
/// Here and below, temporaries are freed exactly when the Python code drops its last
/// reference (end of expression, rebinding, or return), which decides transient peaks when
/// autograd does not keep them (under checkpointing).
pub fn rms_norm(x: &Tensor, weight: &Tensor) -> TResult<Tensor> {
    let normed = {
        let xf = x.f_to_kind(Kind::Float)?;
        let r = {
            let ms = {
                let sq = xf.f_pow_tensor_scalar(2)?;
                sq.f_mean_dim(Some(&[-1i64][..]), true, None::<Kind>)?
            };
            let mse = ms.f_add_scalar(NORM_EPS)?;
            drop(ms);
            mse.f_rsqrt()?
        };
        xf.f_mul(&r)?
    };
    let output = normed.f_type_as(x)?;
    drop(normed);
    output.f_mul(weight)
}

/// torchtitan's rotary table for `plan`: `2 x seq_len` rows (`seq_len` from 2025 on,
/// `rotary: complex-seq`), of the model's head dimension.
pub fn rotary_table(plan: &crate::plan::Plan, device: tch::Device) -> TResult<Tensor> {
    let rows = match plan.implementation.rotary {
        crate::plan::Rotary::ComplexSeq => plan.batch.seq_len,
        _ => 2 * plan.batch.seq_len,
    };
    precompute_freqs_cis(plan.model.head_dim as i64, rows as i64, device)
}

/// torchtitan `precompute_freqs_cis(head_dim, end, theta)`: complex64 `(end, head_dim / 2)`.
pub fn precompute_freqs_cis(head_dim: i64, end: i64, device: tch::Device) -> TResult<Tensor> {
    let _g = tch::no_grad_guard();
    let idx = Tensor::f_arange_start_step(0, head_dim, 2, (Kind::Float, device))?.f_narrow(
        0,
        0,
        head_dim / 2,
    )?;
    let freqs = idx.f_div_scalar(head_dim as f64)?;
    let freqs = Tensor::f_pow_scalar(ROPE_THETA, &freqs)?.f_reciprocal()?;
    let t = Tensor::f_arange(end, (Kind::Float, device))?;
    let angles = t.f_outer(&freqs)?;
    let ones = angles.f_ones_like()?;
    Tensor::f_polar(&ones, &angles)
}

/// torchtitan `apply_rotary_emb(xq, xk, freqs_cis)`, q and k interleaved as there: both fp32
/// complex views and both products are alive until the function returns.
fn rotary(xq: &Tensor, xk: &Tensor, freqs_cis: &Tensor) -> TResult<(Tensor, Tensor)> {
    let complex = |x: &Tensor| -> TResult<Tensor> {
        let (b, s, h, d) = x.size4()?;
        x.f_to_kind(Kind::Float)?
            .f_reshape([b, s, h, d / 2, 2])?
            .f_view_as_complex()
    };
    let xq_ = complex(xq)?;
    let xk_ = complex(xk)?;
    let (_, s, _, half) = xq_.size4()?;
    let f = freqs_cis.f_view([1, s, 1, half])?;
    let xq_out = xq_.f_mul(&f)?.f_view_as_real()?.f_flatten(3, -1)?;
    let xk_out = xk_.f_mul(&f)?.f_view_as_real()?.f_flatten(3, -1)?;
    let q = xq_out.f_type_as(xq)?;
    let k = xk_out.f_type_as(xk)?;
    Ok((q, k))
}

/// torchtitan `repeat_kv`: `x[:, :, :, None, :].expand(...).reshape(...)`, or x itself.
fn repeat_kv(x: &Tensor, n_rep: i64) -> TResult<Tensor> {
    if n_rep == 1 {
        return Ok(x.shallow_clone());
    }
    let (b, s, kv, d) = x.size4()?;
    x.f_unsqueeze(3)?
        .f_expand([b, s, kv, n_rep, d], false)?
        .f_reshape([b, s, kv * n_rep, d])
}

/// Where a block meets its tensor-parallel collectives (see [`super::tensor_parallel`]): the
/// input of the column-parallel projections (`inputs` returns one tensor per projection, so
/// that each projection's input gradient reaches the hook on its own) and the output of the
/// row-parallel one. A single process has none: [`Local`].
pub trait Collectives {
    /// The tensors `n` column-parallel projections of `site` read, from the module input `x`.
    fn inputs(&self, x: &Tensor, site: Site, n: usize) -> TResult<Vec<Tensor>>;
    /// The row-parallel projection's output `y` of `site`, made whole as the plan lays it out.
    fn output(&self, y: Tensor, site: Site) -> TResult<Tensor>;
    /// Causal scaled dot-product attention of `(b, heads, s, head_dim)` q, k, v (`gqa`: k and v
    /// have fewer heads): SDPA on one process; ring attention over the sequence's shards under
    /// context parallelism ([`super::context_parallel`]).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, gqa: bool) -> TResult<Tensor> {
        Tensor::f_scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, true, None, gqa)
    }
}

/// The block's two tensor-parallel modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    Attention,
    FeedForward,
}

/// No collectives: the module's input as it is, the projection's output as it is.
pub struct Local;

impl Collectives for Local {
    fn inputs(&self, x: &Tensor, _: Site, n: usize) -> TResult<Vec<Tensor>> {
        Ok((0..n).map(|_| x.shallow_clone()).collect())
    }
    fn output(&self, y: Tensor, _: Site) -> TResult<Tensor> {
        Ok(y)
    }
}

/// torchtitan `Attention.forward`, with scaled_dot_product_attention (causal). Python's
/// bindings are mirrored: `keys`, `values` and the transposed q/k/v live until the return.
/// Head counts come from the shapes (`view(bs, seqlen, -1, head_dim)`), so a rank holding a
/// column shard of wq/wk/wv runs its own heads.
fn attention(
    x: &Tensor,
    w: &BlockWeights,
    freqs_cis: &Tensor,
    d: Dims,
    f: Flavor,
    c: &dyn Collectives,
) -> TResult<Tensor> {
    let ins = c.inputs(x, Site::Attention, 3)?;
    // The projections' input: under sequence parallelism the whole sequence, gathered.
    let (b, s, _) = ins[0].size3()?;
    // xq, xk, xv = self.wq(x), self.wk(x), self.wv(x); then .view(...)
    let xq = linear(&ins[0], w.wq)?.f_view([b, s, -1, d.head_dim])?;
    let xk = linear(&ins[1], w.wk)?.f_view([b, s, -1, d.head_dim])?;
    let xv = linear(&ins[2], w.wv)?.f_view([b, s, -1, d.head_dim])?;
    // xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
    let (q_rot, k_rot) = rotary(&xq, &xk, freqs_cis)?;
    drop((xq, xk));
    let (xq, xk) = (q_rot, k_rot);
    let (native, n_rep) = match f.gqa {
        Gqa::RepeatKv => (false, d.heads / d.kv_heads),
        Gqa::Native => (d.heads != d.kv_heads, 1),
    };
    // keys = repeat_kv(xk, n_rep); values = repeat_kv(xv, n_rep)
    let keys = repeat_kv(&xk, n_rep)?;
    let values = repeat_kv(&xv, n_rep)?;
    // xq = xq.transpose(1, 2); xk = keys.transpose(1, 2); xv = values.transpose(1, 2)
    let xq = xq.f_transpose(1, 2)?;
    let xk_t = keys.f_transpose(1, 2)?;
    drop(xk);
    let xv_t = values.f_transpose(1, 2)?;
    drop(xv);
    let output = c.attend(&xq, &xk_t, &xv_t, native)?;
    // output = output.transpose(1, 2).contiguous(); output = output.view(bs, seqlen, -1)
    let contiguous = output.f_transpose(1, 2)?.f_contiguous()?;
    drop(output);
    let output = contiguous.f_view([b, s, -1])?;
    drop(contiguous);
    let out = c.output(linear(&output, w.wo)?, Site::Attention)?;
    drop((output, xq, xk_t, xv_t, keys, values, ins));
    Ok(out)
}

/// torchtitan `FeedForward.forward`: `w2(F.silu(w1(x)) * w3(x))`.
fn feed_forward(x: &Tensor, w: &BlockWeights, c: &dyn Collectives) -> TResult<Tensor> {
    let ins = c.inputs(x, Site::FeedForward, 2)?;
    let a = linear(&ins[0], w.w1)?.f_silu()?;
    let g = linear(&ins[1], w.w3)?;
    let h = a.f_mul(&g)?;
    drop((a, g));
    let out = c.output(linear(&h, w.w2)?, Site::FeedForward)?;
    drop((h, ins));
    Ok(out)
}

/// torchtitan `TransformerBlock.forward`:
/// `h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))`.
///
/// Allocations of the attention and feed-forward halves (norms included) are attributed to
/// those parts of the block; the residual adds to the block as a whole.
pub fn block_forward(
    x: &Tensor,
    w: &BlockWeights,
    freqs_cis: &Tensor,
    d: Dims,
    f: Flavor,
) -> TResult<Tensor> {
    block_forward_with(x, w, freqs_cis, d, f, &Local)
}

/// [`block_forward`] with a rank's shards of the projections and the collectives `c` between
/// them (tensor parallelism).
pub fn block_forward_with(
    x: &Tensor,
    w: &BlockWeights,
    freqs_cis: &Tensor,
    d: Dims,
    f: Flavor,
    c: &dyn Collectives,
) -> TResult<Tensor> {
    block_forward_ffn(x, w, freqs_cis, d, f, c, &|n| feed_forward(n, w, c))
}

/// [`block_forward_with`] with another feed-forward, `ffn(ffn_norm(h))` (a mixture of experts,
/// [`super::expert_parallel`]); `w`'s w1, w3 and w2 are then not read.
pub fn block_forward_ffn(
    x: &Tensor,
    w: &BlockWeights,
    freqs_cis: &Tensor,
    d: Dims,
    f: Flavor,
    c: &dyn Collectives,
    ffn: &dyn Fn(&Tensor) -> TResult<Tensor>,
) -> TResult<Tensor> {
    let part = recorder::part(Part::Attention);
    let n = rms_norm(x, w.attention_norm)?;
    let a = attention(&n, w, freqs_cis, d, f, c)?;
    drop(n);
    drop(part);
    let h = x.f_add(&a)?;
    drop(a);
    let part = recorder::part(Part::FeedForward);
    let n = rms_norm(&h, w.ffn_norm)?;
    let m = ffn(&n)?;
    drop(n);
    drop(part);
    h.f_add(&m)
}

/// torchtitan `Transformer.forward` up to the first block: `tok_embeddings(tokens)`.
pub fn embed(tokens: &Tensor, r: &RootWeights) -> TResult<Tensor> {
    embed_with(tokens, r.embedding)
}

/// [`embed`] with the embedding table alone (a first pipeline stage holds no head).
pub fn embed_with(tokens: &Tensor, embedding: &Tensor) -> TResult<Tensor> {
    Tensor::f_embedding(embedding, tokens, -1, false, false)
}

/// The model's output per `implementation.logits`: final norm, output projection, and
/// `.float()` when the model upcasts (`float-output`).
pub fn head(h: Tensor, r: &RootWeights, f: Flavor) -> TResult<Tensor> {
    head_with(h, r.norm, r.output, f)
}

/// [`head`] with the final norm's and the output projection's weights alone (a last pipeline
/// stage holds no embedding).
pub fn head_with(h: Tensor, norm: &Tensor, output: &Tensor, f: Flavor) -> TResult<Tensor> {
    // `h = self.norm(h)` rebinds: the last block's output is freed once normalised; the
    // normalised h stays bound until the model returns.
    let n = {
        let _ctx = recorder::scope(Context::of(
            Category::Activations,
            Module::Norm,
            Part::Whole,
        ));
        rms_norm(&h, norm)?
    };
    drop(h);
    let _ctx = recorder::scope(Context::of(Category::Logits, Module::Output, Part::Logits));
    let logits = n.f_linear(output, None::<&Tensor>)?;
    let out = match f.logits {
        Logits::FloatOutput | Logits::FloatOutputKept => logits.f_to_kind(Kind::Float)?,
        // (The chunked loss is refused before a step runs.)
        Logits::FloatInLoss | Logits::FloatInLossKept | Logits::ComputeDtype | Logits::Chunked => {
            logits
        }
    };
    drop(n);
    Ok(out)
}

/// torchtitan's loss: `cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1))`, with the
/// upcast inside the loss for `float-in-loss`.
pub fn loss(pred: &Tensor, labels: &Tensor, f: Flavor) -> TResult<Tensor> {
    let flat = pred.f_flatten(0, 1)?;
    let flat = match f.logits {
        Logits::FloatInLoss | Logits::FloatInLossKept => flat.f_to_kind(Kind::Float)?,
        _ => flat,
    };
    let l = labels.f_flatten(0, 1)?;
    flat.f_cross_entropy_loss(&l, None::<Tensor>, tch::Reduction::Mean, -100, 0.0)
}
