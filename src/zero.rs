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

/// What ZeRO-3's parameter coordinator keeps gathered, where memplan has a simple rule for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gather {
    /// Every non-persistent parameter gathered at the forward/backward boundary (the prefetch
    /// frontier outruns execution, or every parameter is reused within the reuse distance).
    WholeModel,
    /// prefetch_bucket_size 0 and max_reuse_distance 0: only the module running.
    CurrentModule,
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

/// ZeRO-3's gathered parameters follow a simple rule in two cases; others are refused.
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
/// the defaults, models beyond 1e9 non-persistent parameters) the bytes depend on the replay.
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
             gathered parameters depend on a replay of its prefetch, which memplan does not model",
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
