//! DeepSpeed ZeRO-2 and ZeRO-3 as a Transformers `Trainer` / accelerate user runs them: the
//! plan's `parallel.zero` fields, their DeepSpeed and "auto" defaults, what is refused, and
//! the parameter layout ZeRO partitions. The memory model is [`crate::estimate::zero`].
//!
//! Measured with deepspeed 0.19.8, transformers 5.24.0, accelerate 1.15.0 and torch 2.11 on
//! CPU/Gloo (src/trainer/deepspeed_reference.py; docs/research/deepspeed-zero-measured.md;
//! tests/data/deepspeed_zero_torch_2.11.jsonl). DeepSpeed file:line references are to
//! deepspeed 0.19.8.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::profiles::{ModelSpec, ParamList};

/// `parallel.zero` as written in a plan: DeepSpeed's `zero_optimization` keys that change
/// memory. A numeric key is an integer (JSON numbers such as 5e8 too) or "auto", the value
/// accelerate and Transformers' Trainer fill in from the model's hidden size h; an absent key
/// takes DeepSpeed's default, which is what accelerate runs without a DeepSpeed config file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ZeroFile {
    /// 2 or 3.
    pub stage: Option<i64>,
    /// `reduce_bucket_size` (elements): default 5e8, "auto" h².
    pub reduce_bucket_size: Option<serde_json::Value>,
    /// `stage3_prefetch_bucket_size` (elements): default 5e7, "auto" 0.9 h².
    pub prefetch_bucket_size: Option<serde_json::Value>,
    /// `stage3_param_persistence_threshold` (elements): default 1e5, "auto" 10 h.
    pub param_persistence_threshold: Option<serde_json::Value>,
    /// `stage3_max_live_parameters`: default 1e9.
    pub max_live_parameters: Option<serde_json::Value>,
    /// `stage3_max_reuse_distance`: default 1e9.
    pub max_reuse_distance: Option<serde_json::Value>,
    /// `overlap_comm`: default true for stage 3, false for stage 2 (the Transformers docs'
    /// configs set it true).
    pub overlap_comm: Option<bool>,
    /// `contiguous_gradients`: default true.
    pub contiguous_gradients: Option<bool>,
}

/// Resolved `parallel.zero`: every key in elements or flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Zero {
    pub stage: u8,
    pub reduce_bucket_size: u64,
    pub prefetch_bucket_size: u64,
    pub param_persistence_threshold: u64,
    pub max_live_parameters: u64,
    pub max_reuse_distance: u64,
    pub overlap_comm: bool,
    pub contiguous_gradients: bool,
    /// How much of ZeRO-3's model stays gathered in forward and backward (see [`Gather`]).
    pub gather: Gather,
}

/// What ZeRO-3's parameter coordinator keeps gathered: replayed, or a simple rule for models the
/// replay does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gather {
    /// Every non-persistent parameter gathered at the forward/backward boundary (the prefetch
    /// frontier outruns execution, or every parameter is reused within the reuse distance).
    WholeModel,
    /// prefetch_bucket_size 0 and max_reuse_distance 0: only the module running.
    CurrentModule,
    /// Any other setting on a model whose module order [`z3_replay`] knows: the bytes come
    /// from replaying the coordinator.
    Replay,
}

/// DeepSpeed's defaults (`runtime/zero/config.py`: reduce_bucket_size l.113,
/// stage3_prefetch_bucket_size l.222, stage3_param_persistence_threshold l.228,
/// stage3_max_live_parameters l.245, stage3_max_reuse_distance l.251).
pub const DS_REDUCE_BUCKET: u64 = 500_000_000;
pub const DS_PREFETCH_BUCKET: u64 = 50_000_000;
pub const DS_PERSISTENCE: u64 = 100_000;
pub const DS_MAX_LIVE: u64 = 1_000_000_000;
pub const DS_MAX_REUSE: u64 = 1_000_000_000;
/// `sub_group_size` (config.py l.182; the Transformers docs' ZeRO-3 config has the same).
pub const SUB_GROUP_SIZE: u64 = 1_000_000_000;

/// Largest accepted element count for a ZeRO key (far beyond any bucket a GPU holds).
const MAX_ELEMS: u64 = 1 << 50;

fn elems(field: &str, v: Option<&serde_json::Value>, default: u64, auto: u64) -> Result<u64> {
    let accepted = "a non-negative element count (an integer, or a number such as 5e8) or \"auto\"";
    let bad = |v: &serde_json::Value| Error::invalid(field, v, accepted);
    let n = match v {
        None | Some(serde_json::Value::Null) => return Ok(default),
        Some(serde_json::Value::String(s)) if s.trim() == "auto" => return Ok(auto),
        Some(serde_json::Value::String(s)) => {
            s.trim().parse::<f64>().map_err(|_| bad(v.unwrap()))?
        }
        Some(serde_json::Value::Number(x)) => x.as_f64().ok_or_else(|| bad(v.unwrap()))?,
        Some(other) => return Err(bad(other)),
    };
    if !(n.is_finite() && n >= 0.0 && n.fract() == 0.0 && n <= MAX_ELEMS as f64) {
        return Err(bad(v.unwrap()));
    }
    Ok(n as u64)
}

/// The trainable parameters in the order DeepSpeed flattens them: Transformers' Trainer
/// makes two optimizer groups, the weights that decay (every matrix) and those that do not
/// (biases and norm weights, `get_decay_parameter_names`), each in `named_parameters` order
/// (transformers `integrations/deepspeed.py:586-589` keeps Trainer's optimizer when the
/// config has no "optimizer" section). A group is one tensor, `reps` copies of a block's
/// tensors, and a last tensor: no allocation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Group {
    pub head: u64,
    pub period: ParamList,
    pub reps: u64,
    pub tail: u64,
    /// Elements of one period.
    pub per: u128,
}

impl Group {
    /// Elements of the group.
    pub fn numel(&self) -> u128 {
        self.head as u128 + self.reps as u128 * self.per + self.tail as u128
    }
    /// Every tensor's numel, as (numel, how many such tensors).
    pub fn tensors(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        [(self.head, 1), (self.tail, 1)]
            .into_iter()
            .filter(|(n, _)| *n > 0)
            .chain(self.period.iter().map(|p| (p.numel(), self.reps)))
    }
    /// Largest tensor.
    pub fn largest(&self) -> u64 {
        self.tensors().map(|(n, _)| n).max().unwrap_or(0)
    }
    /// (start, end) of the tensor holding element `x` (< numel) of the flat group.
    fn span(&self, x: u128) -> (u128, u128) {
        let head = self.head as u128;
        if x < head {
            return (0, head);
        }
        let per = self.per;
        let body = per * self.reps as u128;
        if x < head + body {
            // (64-bit division: every group of an accepted model is below 2^64 elements.)
            let (x_, per_) = ((x - head) as u64, per as u64);
            let (k, mut off) = ((x_ / per_) as u128, (x_ % per_) as u128);
            let mut start = head + k * per;
            for p in self.period.iter() {
                let n = p.numel() as u128;
                if off < n {
                    return (start, start + n);
                }
                off -= n;
                start += n;
            }
        }
        (head + body, head + body + self.tail as u128)
    }
    /// ZeRO-2's `grads_in_partition` elements of a rank whose partition is [a, b) of the
    /// padded group: every parameter overlapping it counted whole (`get_partition_info`,
    /// stage_1_and_2.py:2579-2609).
    pub fn in_partition(&self, a: u128, b: u128) -> u128 {
        let phi = self.numel();
        let b = b.min(phi);
        if a >= b {
            return 0;
        }
        self.span(b - 1).1 - self.span(a).0
    }
}

/// Trainer's two groups of a dense model: (decay, no decay).
pub fn groups(m: &ModelSpec) -> [Group; 2] {
    let mut mats = ParamList::default();
    let mut vecs = ParamList::default();
    // `block_params` lists a Llama block in the order it uses its tensors: input_layernorm,
    // q, k, v (with biases), o, post_attention_layernorm, gate, up, down. named_parameters
    // lists the attention's and MLP's tensors first and the two norms last.
    let block = m.block_params();
    let mut first_norm = None;
    for p in block.iter() {
        if p.cols > 1 {
            mats.push(*p);
        } else if first_norm.is_none() {
            first_norm = Some(*p);
        } else {
            vecs.push(*p);
        }
    }
    if let Some(n) = first_norm {
        // input_layernorm comes before post_attention_layernorm in named_parameters.
        let mut rot = ParamList::default();
        let last = vecs.len().saturating_sub(1);
        for (i, p) in vecs.iter().enumerate() {
            if i == last {
                rot.push(n);
            }
            rot.push(*p);
        }
        if vecs.is_empty() {
            rot.push(n);
        }
        vecs = rot;
    }
    let (v, h) = (m.vocab, m.hidden);
    let per = |l: &ParamList| l.iter().map(|p| p.numel() as u128).sum();
    [
        Group {
            head: v * h,
            per: per(&mats),
            period: mats,
            reps: m.layers,
            tail: if m.tied_embeddings { 0 } else { v * h },
        },
        Group {
            head: 0,
            per: per(&vecs),
            period: vecs,
            reps: m.layers,
            tail: h,
        },
    ]
}

/// What a resolution needs of the rest of the plan.
pub struct Context<'a> {
    pub model: &'a ModelSpec,
    /// Data-parallel ranks (num_gpus).
    pub ranks: u64,
}

/// Resolves and checks `parallel.zero` against the model; `warnings` gets what is accepted
/// but probably not meant.
pub fn resolve(f: &ZeroFile, cx: &Context, warnings: &mut Vec<String>) -> Result<Zero> {
    let stage = match f.stage {
        Some(s @ (2 | 3)) => s as u8,
        Some(s) => {
            return Err(Error::invalid(
                "parallel.zero.stage",
                s,
                "2 or 3 (ZeRO stages 0 and 1 are not modelled)",
            ))
        }
        None => {
            return Err(Error::invalid(
                "parallel.zero.stage",
                "nothing",
                "2 or 3 (DeepSpeed's zero_optimization.stage)",
            ))
        }
    };
    let h = cx.model.hidden;
    // "auto" as accelerate fills it (accelerator.py:2296-2327) and Trainer does
    // (integrations/deepspeed.py:203-241): h², int(0.9 h²), 10 h.
    let hh = h.saturating_mul(h);
    let rbs = elems(
        "parallel.zero.reduce_bucket_size",
        f.reduce_bucket_size.as_ref(),
        DS_REDUCE_BUCKET,
        hh,
    )?;
    if rbs == 0 {
        return Err(Error::invalid(
            "parallel.zero.reduce_bucket_size",
            0,
            "at least 1 element, or \"auto\"",
        ));
    }
    let z = Zero {
        stage,
        reduce_bucket_size: rbs,
        prefetch_bucket_size: elems(
            "parallel.zero.prefetch_bucket_size",
            f.prefetch_bucket_size.as_ref(),
            DS_PREFETCH_BUCKET,
            (hh as f64 * 0.9) as u64,
        )?,
        param_persistence_threshold: elems(
            "parallel.zero.param_persistence_threshold",
            f.param_persistence_threshold.as_ref(),
            DS_PERSISTENCE,
            10 * h,
        )?,
        max_live_parameters: elems(
            "parallel.zero.max_live_parameters",
            f.max_live_parameters.as_ref(),
            DS_MAX_LIVE,
            DS_MAX_LIVE,
        )?,
        max_reuse_distance: elems(
            "parallel.zero.max_reuse_distance",
            f.max_reuse_distance.as_ref(),
            DS_MAX_REUSE,
            DS_MAX_REUSE,
        )?,
        // overlap_comm None means stage == 3 (config.py l.138, validator l.384-387).
        overlap_comm: f.overlap_comm.unwrap_or(stage == 3),
        contiguous_gradients: f.contiguous_gradients.unwrap_or(true),
        gather: Gather::WholeModel,
    };
    if stage == 2 {
        for (set, field) in [
            (f.prefetch_bucket_size.is_some(), "prefetch_bucket_size"),
            (
                f.param_persistence_threshold.is_some(),
                "param_persistence_threshold",
            ),
            (f.max_live_parameters.is_some(), "max_live_parameters"),
            (f.max_reuse_distance.is_some(), "max_reuse_distance"),
        ] {
            if set {
                warnings.push(format!(
                    "parallel.zero.{field} is a ZeRO-3 setting: ignored under stage 2"
                ));
            }
        }
    }
    if stage == 3 && !z.contiguous_gradients {
        return Err(Error::invalid(
            "parallel.zero.contiguous_gradients",
            false,
            "true under stage 3 (ZeRO-3 without contiguous gradients was not measured)",
        ));
    }
    let z = if stage == 3 {
        Zero {
            gather: gather_rule(&z, cx)?,
            ..z
        }
    } else {
        z
    };
    if f.reduce_bucket_size.is_none() {
        let gb = rbs as f64 * 2.0 * (1 + u64::from(z.overlap_comm && stage == 2)) as f64 / 1e9;
        warnings.push(format!(
            "parallel.zero.reduce_bucket_size is DeepSpeed's default 5e8 elements (accelerate \
             without a DeepSpeed config file writes no bucket keys): about {gb:.1} GB of \
             gradient buckets in bf16; the Transformers docs' configs say \"auto\", hidden² = \
             {hh} elements"
        ));
    }
    Ok(z)
}

/// How ZeRO-3's gathered parameters are estimated: by [`z3_replay`] on a model whose module
/// order it knows (every Llama-shaped model, whatever the settings); otherwise by a simple
/// rule in two cases, others refused.
///
/// The coordinator (partitioned_param_coordinator.py `_fetch_sub_module_impl` l.353-490,
/// `release_sub_module` l.494-534, `__params_to_release` l.634-664) prefetches after every
/// module call (13 per Llama layer, 7 to 9 parameters) until the numel popped reaches
/// min(max_live - available, prefetch_bucket_size), at least one parameter: the frontier
/// outruns execution into the backward half of the trace, and every parameter gathered in
/// forward is then marked as used again and kept. Measured (docs/research/deepspeed-zero-
/// measured.md §6, replayed to the byte by its `simulate_z3`): with prefetch_bucket_size > 0
/// and the non-persistent numel within max_live_parameters, the whole model is gathered at
/// the forward/backward boundary, even with max_reuse_distance 0; with max_reuse_distance at
/// least twice the model's numel nothing used in forward is released before backward, whatever
/// max_live_parameters (T-z3-bf16-maxlive40k); prefetch 0 and reuse 0 keep only the module
/// running. With max_reuse_distance 0 and max_live_parameters below the model (and so, with
/// the defaults, models beyond 1e9 non-persistent parameters) the bytes depend on the replay,
/// which needs the module order: refused for the other models (tied embeddings, biases,
/// LayerNorm, fused projections, MoE, 4 norms per block, over [`REPLAY_MAX_LAYERS`] layers).
fn gather_rule(z: &Zero, cx: &Context) -> Result<Gather> {
    let gs = groups(cx.model);
    let total: u128 = gs.iter().map(Group::numel).sum();
    let non_persistent: u128 = gs
        .iter()
        .flat_map(|g| g.tensors())
        .filter(|(n, _)| *n > z.param_persistence_threshold)
        .map(|(n, k)| n as u128 * k as u128)
        .sum();
    if cx.ranks == 1 {
        // One rank gathers nothing (NoGatherHandle, partition_parameters.py:1559-1560).
        return Ok(Gather::WholeModel);
    }
    if z3_replayable(cx.model) {
        return Ok(Gather::Replay);
    }
    if (z.prefetch_bucket_size > 0 && non_persistent <= z.max_live_parameters as u128)
        || z.max_reuse_distance as u128 >= 2 * total
    {
        return Ok(Gather::WholeModel);
    }
    if z.prefetch_bucket_size == 0 && z.max_reuse_distance == 0 {
        return Ok(Gather::CurrentModule);
    }
    Err(Error::invalid(
        "parallel.zero.max_live_parameters",
        z.max_live_parameters,
        format!(
            "at least the model's {non_persistent} non-persistent parameters with \
             prefetch_bucket_size above 0, or max_reuse_distance at least {} (twice the \
             model), or prefetch_bucket_size 0 with max_reuse_distance 0: otherwise ZeRO-3's \
             gathered parameters need a replay of its prefetch, which memplan has only for a \
             Llama model (untied head, RMSNorm, no biases, up to {REPLAY_MAX_LAYERS} layers)",
            2 * total
        ),
    ))
}

/// Checks the rest of a plan against what was measured under ZeRO: refusals name the field
/// and what is accepted.
pub fn check_plan(
    degrees: [(&str, u64); 5],
    param: crate::plan::DType,
    master: crate::plan::DType,
    reduce_set: Option<crate::plan::DType>,
    autocast: bool,
    others: &[(&str, String, bool, &str)],
) -> Result<()> {
    use crate::plan::DType;
    for (field, d) in degrees {
        if d != 1 {
            return Err(Error::invalid(
                field,
                d,
                "1 with parallel.zero (DeepSpeed ZeRO is modelled as data parallelism over \
                 num_gpus; TP, PP, CP, EP and replicas with ZeRO were not measured)",
            ));
        }
    }
    if !matches!(param, DType::Bf16 | DType::Fp32) {
        return Err(Error::invalid(
            "precision.param",
            format!("\"{param}\""),
            "bf16 or fp32 with parallel.zero (fp16 was not measured)",
        ));
    }
    if master != DType::Fp32 {
        return Err(Error::invalid(
            "precision.master",
            format!("\"{master}\""),
            "fp32 with parallel.zero (ZeRO always keeps an fp32 master partition)",
        ));
    }
    if let Some(r) = reduce_set.filter(|r| *r != param) {
        return Err(Error::invalid(
            "precision.reduce",
            format!("\"{r}\""),
            format!(
                "precision.param ({param}) with parallel.zero (ZeRO reduces in the model dtype)"
            ),
        ));
    }
    if autocast {
        return Err(Error::invalid(
            "precision.autocast",
            true,
            "false with parallel.zero (the DeepSpeed engine casts the model to bf16)",
        ));
    }
    for (field, got, bad, accepted) in others {
        if *bad {
            return Err(Error::invalid(field, got, accepted));
        }
    }
    Ok(())
}

/// Partition elements of one parameter under ZeRO-3: ceil(numel / n)
/// (partition_parameters.py:1690-1696, 1816-1817).
pub fn z3_partition(numel: u64, n: u64) -> u128 {
    numel.div_ceil(n) as u128
}

/// Layers up to which ZeRO-3's coordinator is replayed (fixed buffers on the stack; Llama
/// 3.1 405B has 126).
pub const REPLAY_MAX_LAYERS: u64 = 160;
const REPLAY_PARAMS: usize = 3 + 9 * REPLAY_MAX_LAYERS as usize;
/// Forward (4 + 13 L + 2 module calls) and backward with checkpoint recompute (4 + 25 L + 1).
const REPLAY_TRACE: usize = 11 + 38 * REPLAY_MAX_LAYERS as usize;
const NO_PARAM: u16 = u16::MAX;

/// Whether [`z3_replay`] knows the model's module order: a Llama block (input_layernorm,
/// q, k, v, o, post_attention_layernorm, gate, up, down; RMSNorm, no biases) and an untied
/// output projection, every module holding at most one parameter, as the measured tiny and
/// small models.
pub fn z3_replayable(m: &ModelSpec) -> bool {
    let b = m.block_params();
    let mut shape = [false; 9];
    for (s, p) in shape.iter_mut().zip(b.iter()) {
        *s = p.cols > 1;
    }
    b.len() == 9
        && m.layers >= 1
        && m.layers <= REPLAY_MAX_LAYERS
        && m.moe.is_none()
        && !m.tied_embeddings
        && m.norm == crate::profiles::NormKind::Rms
        && shape == [false, true, true, true, true, false, true, true, true]
}

/// ZeRO-3's gathered parameters (bytes, persistent ones excluded) at the points memplan
/// estimates: forward (the larger of the last block's end and the loss), the loss's backward, a block's backward (the largest
/// over the blocks) and the embedding's backward (the last module).
///
/// Replays DeepSpeed's `PartitionedParameterCoordinator` (partitioned_param_coordinator.py,
/// deepspeed 0.19.8) over a Llama model's module calls as the trace recorded by
/// src/trainer/deepspeed_reference.py has them: the forward (root, model, embedding, rotary,
/// per layer: layer, input_layernorm, self_attn, q, k, v, o, post_attention_layernorm, mlp,
/// gate, act, up, down; norm, head), then the backward (root, head, model, norm, per layer
/// from the last: layer, mlp, down, under full checkpointing the layer's recompute
/// (input_layernorm .. down without the layer and rotary), up, act, gate,
/// post_attention_layernorm, self_attn, o, v, k, q, input_layernorm; embedding). At each
/// module call:
/// - fetch (`_fetch_sub_module_impl` l.353-490): its parameter is gathered alone (a buffer of
///   ceil(numel/n) n elements, partition_parameters.py:1376-1391) unless available or in
///   flight; one in flight is waited, which copies every parameter of its handle out of the
///   flat buffer (numel each, l.782-795);
/// - the parameter-use queue advances past the module's parameter when it was not already
///   marked as used here, then prefetch pops uses (marking each parameter used at that
///   point) until the numel of new parameters reaches min(max_live - available numel,
///   prefetch_bucket_size), gathering them as one handle (sum of ceil(numel/n) n);
/// - release (`release_sub_module` l.494-534, `__params_to_release` l.634-664): the module's
///   parameter unless persistent, marked as used after this module, or used again before
///   max_reuse_distance numel of parameter uses.
///
/// Equal, on every trace position, to the replay of docs/research/deepspeed-zero-measured.md
/// (its `simulate_z3`), which reproduces the measured gathered bytes of all 20 ZeRO-3 plans;
/// tests/deepspeed.rs checks llama3-8b, 70b and 405b against it. Runs over about 13 L + 13 L
/// (25 L under checkpointing) module calls with stack buffers (about 100 KB), no allocation:
/// a ZeRO-3 estimate of llama3-8b takes about 8 us instead of 1 (criterion median,
/// benches/estimate.rs), a cost only ZeRO-3 plans pay. `None` when the model is not
/// [`z3_replayable`].
pub fn z3_replay(m: &ModelSpec, z: &Zero, n: u64, e: u64, ac: bool) -> Option<[u128; 4]> {
    if !z3_replayable(m) {
        return None;
    }
    if n <= 1 {
        return Some([0; 4]);
    }
    let layers = m.layers as usize;
    let block = m.block_params();
    // Parameter ids: 0 the embedding, 1 + 9 i + k layer i's k-th tensor in block order, then
    // the final norm and the head.
    let n_params = 3 + 9 * layers;
    let (norm, head) = (n_params - 2, n_params - 1);
    let mut numel = [0u64; REPLAY_PARAMS];
    numel[0] = m.vocab * m.hidden;
    for i in 0..layers {
        for (k, p) in block.iter().enumerate() {
            numel[1 + 9 * i + k] = p.numel();
        }
    }
    numel[norm] = m.hidden;
    numel[head] = m.vocab * m.hidden;
    let p = |i: usize, k: usize| (1 + 9 * i + k) as u16;
    let mut trace = [NO_PARAM; REPLAY_TRACE];
    let mut len = 0;
    fn push(trace: &mut [u16], len: &mut usize, ids: &[u16]) {
        trace[*len..*len + ids.len()].copy_from_slice(ids);
        *len += ids.len();
    }
    const X: u16 = NO_PARAM;
    push(&mut trace, &mut len, &[X, X, 0, X]);
    for i in 0..layers {
        push(
            &mut trace,
            &mut len,
            &[X, p(i, 0), X, p(i, 1), p(i, 2), p(i, 3), p(i, 4), p(i, 5)],
        );
        push(&mut trace, &mut len, &[X, p(i, 6), X, p(i, 7), p(i, 8)]);
    }
    push(&mut trace, &mut len, &[norm as u16, head as u16]);
    let boundary = len;
    push(&mut trace, &mut len, &[X, head as u16, X, norm as u16]);
    for i in (0..layers).rev() {
        push(&mut trace, &mut len, &[X, X, p(i, 8)]);
        if ac {
            push(
                &mut trace,
                &mut len,
                &[p(i, 0), X, p(i, 1), p(i, 2), p(i, 3), p(i, 4), p(i, 5)],
            );
            push(&mut trace, &mut len, &[X, p(i, 6), X, p(i, 7), p(i, 8)]);
        }
        push(
            &mut trace,
            &mut len,
            &[
                p(i, 7),
                X,
                p(i, 6),
                p(i, 5),
                X,
                p(i, 4),
                p(i, 3),
                p(i, 2),
                p(i, 1),
                p(i, 0),
            ],
        );
    }
    push(&mut trace, &mut len, &[0]);
    let blocks_bwd = (boundary + 4, len - 1);
    // prefix[j]: numel of the parameter uses before position j; next[j]: the next position
    // using position j's parameter (len if none).
    let mut prefix = [0u64; REPLAY_TRACE + 1];
    let mut next = [0u16; REPLAY_TRACE];
    let mut last = [len as u16; REPLAY_PARAMS];
    for j in 0..len {
        prefix[j + 1] = prefix[j]
            + if trace[j] == X {
                0
            } else {
                numel[trace[j] as usize]
            };
    }
    for j in (0..len).rev() {
        if trace[j] != X {
            next[j] = last[trace[j] as usize];
            last[trace[j] as usize] = j as u16;
        }
    }
    const OFF: u8 = 0;
    const AVAIL: u8 = 1;
    const FLIGHT: u8 = 2;
    let t = z.param_persistence_threshold;
    let mut state = [OFF; REPLAY_PARAMS];
    for id in 0..n_params {
        if numel[id] <= t {
            // Persistent: gathered whole for the whole step, counted apart.
            state[id] = AVAIL;
        }
    }
    let persistent = |id: usize| numel[id] <= t;
    let padded = |id: usize| numel[id].div_ceil(n) * n * e;
    let mut bytes = [0u64; REPLAY_PARAMS];
    // In flight: the handle (its first parameter), the next parameter of the handle, and the
    // flat buffer's bytes at the handle's first parameter.
    let mut handle = [0u16; REPLAY_PARAMS];
    let mut link = [NO_PARAM; REPLAY_PARAMS];
    let mut flat = [0u64; REPLAY_PARAMS];
    let mut most_recent = [i64::MIN; REPLAY_PARAMS];
    let (mut total, mut live) = (0u64, 0u64);
    // The queue: positions of the trace holding a parameter, from `q`.
    let mut q = 0;
    let advance = |q: &mut usize| {
        while *q < len && trace[*q] == X {
            *q += 1;
        }
    };
    let mut out = [0u128; 4];
    for s in 0..len {
        let id = trace[s];
        if id != X {
            let id = id as usize;
            match state[id] {
                OFF => {
                    state[id] = AVAIL;
                    bytes[id] = padded(id);
                    total += bytes[id];
                    live += numel[id];
                }
                FLIGHT => {
                    let h = handle[id] as usize;
                    total -= flat[h];
                    let mut k = h;
                    while k != X as usize {
                        state[k] = AVAIL;
                        bytes[k] = numel[k] * e;
                        total += bytes[k];
                        k = link[k] as usize;
                    }
                }
                _ => {}
            }
            if most_recent[id] < s as i64 {
                advance(&mut q);
                if q < len {
                    most_recent[trace[q] as usize] = q as i64;
                    q += 1;
                }
            }
        }
        let budget =
            (z.max_live_parameters as i128 - live as i128).min(z.prefetch_bucket_size as i128);
        let (mut got, mut first, mut prev, mut count, mut flat_bytes) =
            (0i128, X as usize, X as usize, 0, 0);
        while got < budget {
            advance(&mut q);
            if q >= len {
                break;
            }
            let k = trace[q] as usize;
            most_recent[k] = most_recent[k].max(q as i64);
            q += 1;
            if state[k] == OFF {
                state[k] = FLIGHT;
                if first == X as usize {
                    first = k;
                } else {
                    link[prev] = k as u16;
                }
                link[k] = NO_PARAM;
                prev = k;
                handle[k] = first as u16;
                count += 1;
                got += numel[k] as i128;
                flat_bytes += padded(k);
            }
        }
        if count == 1 {
            state[first] = AVAIL;
            bytes[first] = flat_bytes;
            total += flat_bytes;
        } else if count > 1 {
            flat[first] = flat_bytes;
            total += flat_bytes;
        }
        live += got as u64;
        let now = total as u128;
        if s == boundary - 3 {
            // During the last block's down projection (the end of the blocks).
            out[0] = now;
        } else if s == boundary {
            out[1] = now;
        } else if s >= blocks_bwd.0 && s < blocks_bwd.1 {
            out[2] = out[2].max(now);
        } else if s == len - 1 {
            out[3] = now;
        }
        if id != X {
            let id = id as usize;
            let step = s + 1;
            let reused = (next[s] as usize) < len
                && prefix[next[s] as usize] - prefix[step] < z.max_reuse_distance;
            if !persistent(id) && most_recent[id] <= step as i64 && !reused && state[id] == AVAIL {
                state[id] = OFF;
                live -= numel[id];
                total -= bytes[id];
            }
        }
        if s == boundary - 1 {
            // At the loss, once the head has been released or kept.
            out[0] = out[0].max(total as u128);
        }
    }
    Some(out)
}
