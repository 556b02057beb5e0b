//! Plan search: which plans fit, which is best, and the largest micro-batch a plan allows.
//!
//! [`search`] enumerates parallel layouts whose degrees divide the world size and the model
//! (TP within a node and dividing heads, KV heads and the MLP; PP up to the layer count; CP
//! dividing the sequence; HSDP splits of the data-parallel ranks; EP for MoE models),
//! crossed with checkpointing modes and offload modes. For each it finds the largest
//! micro-batch that fits by binary search ([`max_micro_batch`]: the estimate never falls as
//! the batch grows, a property the tests check), so the space is `layouts x modes x log2(max
//! batch)` estimates. Candidates are ranked by tokens per micro-step (every data-parallel
//! rank's micro-batch), then least recomputation, then least offload, then the relative step
//! time of [`crate::estimate::cost`]; `RankBy::Time` ranks by estimated tokens per second.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::estimate::cost::{step_cost, StepCost};
use crate::estimate::{estimate, Estimate};
use crate::plan::{Checkpointing, Offload, Plan, PlanFile};
use crate::units::Bytes;

/// What the search may change; `None` leaves a dimension free.
#[derive(Clone, Debug, Default)]
pub struct Constraints {
    pub tp: Option<u64>,
    pub pp: Option<u64>,
    pub cp: Option<u64>,
    pub dp_shard: Option<u64>,
    pub ep: Option<u64>,
    pub ac: Option<Checkpointing>,
    pub offload: Option<Offload>,
    /// LoRA ranks to try (LoRA on, with the plan's targets and dropout, or peft's q/k/v/o
    /// without dropout when the plan has none); empty: the plan's own.
    pub lora_ranks: Vec<u64>,
    /// Largest micro-batch tried.
    pub max_micro_batch: u64,
    /// Fraction of GPU memory (thousandths) that must stay free.
    pub headroom_milli: u64,
    pub rank_by: RankBy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RankBy {
    /// Tokens per micro-step, then least recomputation, then least offload.
    #[default]
    Tokens,
    /// Estimated tokens per second (the relative cost model).
    Time,
}

/// A plan that fits, with its figures.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub plan: Plan,
    pub device_total_bytes: Bytes,
    pub host_per_node_bytes: Bytes,
    pub peak_phase: &'static str,
    /// Tokens of one micro-step over every data-parallel rank (128 bits: micro-batch,
    /// sequence and data-parallel degree may each reach 2^24).
    pub tokens_per_micro_step: u128,
    pub cost: StepCost,
}

#[derive(Clone, Debug, Serialize)]
pub struct SearchResult {
    /// Offload modes searched.
    pub offload_modes: Vec<Offload>,
    /// Layouts x modes examined, and estimates computed.
    pub layouts: u64,
    pub estimates: u64,
    pub capacity_bytes: Bytes,
    pub usable_bytes: Bytes,
    /// Every feasible candidate, best first.
    pub candidates: Vec<Candidate>,
}

/// The divisors of `n` in increasing order, found up to its square root (world sizes reach
/// 2^24, where walking every integer below `n` in each nested loop would take minutes).
fn divisors(n: u64) -> impl Iterator<Item = u64> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut d = 1u64;
    while d * d <= n {
        if n % d == 0 {
            small.push(d);
            if d * d != n {
                large.push(n / d);
            }
        }
        d += 1;
    }
    small.into_iter().chain(large.into_iter().rev())
}

fn ac_rank(ac: Checkpointing) -> u64 {
    match ac {
        Checkpointing::None => 0,
        Checkpointing::SelectiveOp => 1,
        Checkpointing::SelectiveLayer(k) => 1 + 10 / k.max(1),
        Checkpointing::Full => 100,
    }
}

fn offload_rank(o: Offload) -> u64 {
    match o {
        Offload::None => 0,
        Offload::Optimizer => 1,
        Offload::Full => 2,
    }
}

/// GPU bytes usable when `headroom_milli` thousandths of `capacity` must stay free.
fn usable(capacity: Bytes, headroom_milli: u64) -> Bytes {
    Bytes(capacity.get() - capacity.get() / 1000 * headroom_milli)
}

/// Whether `e` fits `plan` with `headroom_milli` of the GPU kept free.
fn fits(plan: &Plan, e: &Estimate, headroom_milli: u64) -> bool {
    e.per_gpu.device_total_bytes <= usable(plan.gpu.memory_bytes, headroom_milli) && e.fits_host
}

/// The largest micro-batch in `1..=max` with which `plan` fits, by binary search; `None` if
/// not even 1 does. Counts the estimates made into `count`.
pub fn max_micro_batch(
    plan: &Plan,
    max: u64,
    headroom_milli: u64,
    count: &mut u64,
) -> Result<Option<(u64, Estimate)>> {
    let mut p = plan.clone();
    let mut try_mb = |mb: u64, count: &mut u64| -> Result<Option<Estimate>> {
        p.batch.micro_batch_size = mb;
        *count += 1;
        let e = estimate(&p)?;
        Ok(fits(&p, &e, headroom_milli).then_some(e))
    };
    let Some(mut best) = try_mb(1, count)? else {
        return Ok(None);
    };
    let (mut lo, mut hi) = (1u64, max.max(1));
    if let Some(e) = try_mb(hi, count)? {
        return Ok(Some((hi, e)));
    }
    // invariant: lo fits, hi does not
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match try_mb(mid, count)? {
            Some(e) => {
                lo = mid;
                best = e;
            }
            None => hi = mid,
        }
    }
    Ok(Some((lo, best)))
}

/// `plan` at the largest micro-batch in `1..=max` that fits, with its estimate
/// ([`max_micro_batch`]); `None` if not even 1 does.
pub fn at_max_micro_batch(
    plan: &Plan,
    max: u64,
    headroom_milli: u64,
    count: &mut u64,
) -> Result<Option<(Plan, Estimate)>> {
    Ok(
        max_micro_batch(plan, max, headroom_milli, count)?.map(|(mb, e)| {
            let mut at = plan.clone();
            at.batch.micro_batch_size = mb;
            (at, e)
        }),
    )
}

/// Searches the plans around `base` (whose model, GPU, world size, sequence length,
/// precision, optimizer and implementation are kept).
pub fn search(base: &PlanFile, c: &Constraints) -> Result<SearchResult> {
    let resolved = base.resolve()?;
    let (model, gpu) = (resolved.model.clone(), resolved.gpu.clone());
    let n = resolved.num_gpus;
    let seq = resolved.batch.seq_len;
    let accum = resolved.batch.grad_accum_steps;
    let per_node = resolved.gpus_per_node;
    let experts = model.moe.map_or(1, |m| m.experts);

    let acs: Vec<Checkpointing> = match c.ac {
        Some(a) => vec![a],
        None => vec![
            Checkpointing::None,
            Checkpointing::SelectiveOp,
            Checkpointing::SelectiveLayer(2),
            Checkpointing::Full,
        ],
    };
    // LoRA is modelled without offload and with no or full checkpointing (what resolving a
    // LoRA plan accepts).
    let lora = resolved.lora.is_some() || !c.lora_ranks.is_empty();
    let offloads: Vec<Offload> = match c.offload {
        Some(o) => vec![o],
        None if lora => vec![Offload::None],
        None => vec![Offload::None, Offload::Optimizer, Offload::Full],
    };
    let acs: Vec<Checkpointing> = acs
        .into_iter()
        .filter(|ac| !lora || matches!(ac, Checkpointing::None | Checkpointing::Full))
        .collect();
    // The LoRA ranks tried: the plan's own (None) unless the constraints name some.
    let lora_ranks: Vec<Option<u64>> = if c.lora_ranks.is_empty() {
        vec![None]
    } else {
        c.lora_ranks.iter().map(|&r| Some(r)).collect()
    };
    let mut layouts = 0u64;
    let mut estimates = 0u64;
    let mut out = Vec::new();
    for tp in divisors(n).filter(|&t| t <= per_node && c.tp.is_none_or(|x| x == t)) {
        if model.heads % tp != 0 || model.kv_heads % tp != 0 || model.intermediate % tp != 0 {
            continue;
        }
        for pp in divisors(n / tp).filter(|&p| p <= model.layers && c.pp.is_none_or(|x| x == p)) {
            for cp in divisors(n / tp / pp).filter(|&x| c.cp.is_none_or(|y| y == x)) {
                if cp > 1 && seq % (2 * cp) != 0 {
                    continue;
                }
                let dp = n / tp / pp / cp;
                for shard in divisors(dp).filter(|&s| c.dp_shard.is_none_or(|x| x == s)) {
                    let eps: Vec<u64> = if model.moe.is_some() {
                        divisors(experts)
                            .filter(|&e| (shard * cp * tp) % e == 0)
                            .filter(|&e| c.ep.is_none_or(|x| x == e))
                            .collect()
                    } else {
                        vec![1]
                    };
                    for (ep, rank) in eps
                        .iter()
                        .flat_map(|&e| lora_ranks.iter().map(move |&r| (e, r)))
                    {
                        let mut file = base.clone();
                        if let Some(r) = rank {
                            let mut l = file.lora.take().unwrap_or_default();
                            l.rank = Some(r as i64);
                            file.lora = Some(l);
                        }
                        file.num_gpus = Some(n as i64);
                        file.parallel.tp = Some(tp as i64);
                        file.parallel.pp = Some(pp as i64);
                        file.parallel.cp = Some(cp as i64);
                        file.parallel.dp_shard = Some(shard as i64);
                        file.parallel.dp_replicate = Some((dp / shard) as i64);
                        file.parallel.ep = Some(ep as i64);
                        if pp > 1 {
                            file.batch.grad_accum_steps = Some(accum.max(pp) as i64);
                        }
                        let Ok(mut plan) = file.resolve_with(model.clone(), gpu.clone()) else {
                            continue;
                        };
                        for &ac in &acs {
                            for &off in &offloads {
                                layouts += 1;
                                plan.activation_checkpointing = ac;
                                plan.offload = off;
                                let found = max_micro_batch(
                                    &plan,
                                    c.max_micro_batch,
                                    c.headroom_milli,
                                    &mut estimates,
                                )?;
                                if let Some((mb, e)) = found {
                                    let mut p = plan.clone();
                                    p.batch.micro_batch_size = mb;
                                    let cost = step_cost(&p);
                                    out.push(Candidate {
                                        tokens_per_micro_step: mb as u128
                                            * seq as u128
                                            * dp as u128,
                                        device_total_bytes: e.per_gpu.device_total_bytes,
                                        host_per_node_bytes: e.host.per_node_bytes,
                                        peak_phase: e.per_gpu.peak_phase,
                                        cost,
                                        plan: p,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    if layouts == 0 {
        return Err(Error::input(format!(
            "search: no parallel layout of {n} GPUs satisfies the constraints for {}",
            model.name
        )));
    }
    match c.rank_by {
        RankBy::Tokens => out.sort_by(|a, b| {
            b.tokens_per_micro_step
                .cmp(&a.tokens_per_micro_step)
                .then(
                    ac_rank(a.plan.activation_checkpointing)
                        .cmp(&ac_rank(b.plan.activation_checkpointing)),
                )
                .then(offload_rank(a.plan.offload).cmp(&offload_rank(b.plan.offload)))
                .then(b.cost.tokens_per_s.total_cmp(&a.cost.tokens_per_s))
        }),
        RankBy::Time => out.sort_by(|a, b| b.cost.tokens_per_s.total_cmp(&a.cost.tokens_per_s)),
    }
    let cap = resolved.gpu.memory_bytes;
    Ok(SearchResult {
        offload_modes: offloads,
        layouts,
        estimates,
        capacity_bytes: cap,
        usable_bytes: usable(cap, c.headroom_milli),
        candidates: out,
    })
}

impl SearchResult {
    /// Offload modes searched for which no candidate fits.
    pub fn offload_modes_without_fit(&self) -> Vec<Offload> {
        self.offload_modes
            .iter()
            .copied()
            .filter(|m| self.candidates.iter().all(|c| c.plan.offload != *m))
            .collect()
    }

    /// The best candidate for each offload mode, in the ranking's order.
    pub fn best_per_offload(&self) -> Vec<&Candidate> {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for c in &self.candidates {
            if !seen.contains(&c.plan.offload) {
                seen.push(c.plan.offload);
                out.push(c);
            }
        }
        out
    }
}
