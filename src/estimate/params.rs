//! Parameter, gradient and optimizer-state sizes per rank under TP, PP and FSDP sharding.
//!
//! FSDP2 (`fully_shard`) shards every parameter on dim 0 across the shard group, padding dim 0
//! to a multiple of the group size; rank 0 holds `ceil(rows / N)` rows of every parameter,
//! which makes it the most loaded rank (PyTorch docs, "FSDP2: fully_shard", per-parameter
//! sharding; ZeRO-3, Rajbhandari et al. 2020 section 5). The unsharded all-gather output is
//! `N * ceil(rows / N) * cols`. Tensor parallelism (Megatron-LM, Shoeybi et al. 2019
//! section 3) splits q/k/v and w1/w3 by output rows and o/w2 by input columns; norm weights
//! are replicated; the embedding and output layers are vocab-parallel.

use crate::plan::Plan;
use crate::profiles::{ParamList, ParamShape};

/// Parameter element counts of one pipeline stage on one rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageParams {
    /// Decoder blocks on the stage.
    pub layers: u64,
    /// Elements of one block that this rank holds (its FSDP shard, after TP).
    pub block_shard: u128,
    /// Elements of one block once all-gathered (padded), after TP.
    pub block_unsharded: u128,
    /// Largest single parameter shard of a block (per-parameter optimizer temporaries).
    pub block_largest_shard: u128,
    /// Root parameters (embedding, final norm, output) this stage holds: shard and unsharded.
    pub root_shard: u128,
    pub root_unsharded: u128,
    pub root_largest_shard: u128,
    /// Bytes the pinned host allocator adds to this rank's master-dtype shards of one block
    /// and of the root: it rounds every allocation up to a power of two (PyTorch
    /// `CachingHostAllocatorImpl::allocate`, "round up to the nearest power of two"), and
    /// FSDP2's CPU offload pins each parameter's shard on its own.
    pub block_pinned_extra: u128,
    pub root_pinned_extra: u128,
    /// Output-projection weight (or the tied embedding) unsharded, when this stage computes
    /// the logits: its gradient is held unsharded until the root's post-backward.
    pub output_unsharded: u128,
    /// Whether this stage holds the embedding (first stage) and the output (last stage).
    pub first: bool,
    pub last: bool,
}

impl StageParams {
    /// Elements of every parameter shard this rank holds on this stage.
    pub fn shard_total(&self) -> u128 {
        self.layers as u128 * self.block_shard + self.root_shard
    }
    /// The largest single parameter shard.
    pub fn largest_shard(&self) -> u128 {
        self.block_largest_shard.max(self.root_largest_shard)
    }
}

fn ceil_div(a: u64, b: u64) -> u64 {
    if b == 1 {
        a
    } else {
        a.div_ceil(b)
    }
}

/// Sums shard and padded-unsharded element counts over `params` for a shard group of `n`.
///
/// ```
/// use memplan::estimate::params::shard_sizes;
/// use memplan::profiles::model;
/// // llama3-8b block over 2 ranks: every dim-0 is even, so no padding: half of 218,112,000.
/// let m = model("llama3-8b").unwrap();
/// let (shard, unsharded, _) = shard_sizes(m.block_params().iter().copied(), 2);
/// assert_eq!(shard, 109_056_000);
/// assert_eq!(unsharded, 218_112_000);
/// ```
pub fn shard_sizes(params: impl Iterator<Item = ParamShape>, n: u64) -> (u128, u128, u128) {
    let (mut shard, mut full, mut largest) = (0u128, 0u128, 0u128);
    for p in params {
        let rows = ceil_div(p.rows, n) as u128;
        let s = rows * p.cols as u128;
        shard += s;
        full += s * n as u128;
        largest = largest.max(s);
    }
    (shard, full, largest)
}

/// Bytes added by rounding each shard of `params` (at `bytes` per element) up to a power of
/// two, as the pinned host allocator does.
///
/// ```
/// use memplan::estimate::params::pinned_extra;
/// use memplan::profiles::ParamShape;
/// // A 14336 x 4096 fp32 weight split over 2 ranks: 112 MiB per shard, pinned as 128 MiB.
/// let w1 = ParamShape { rows: 14336, cols: 4096 };
/// assert_eq!(pinned_extra([w1].into_iter(), 2, 4), 16 << 20);
/// ```
pub fn pinned_extra(params: impl Iterator<Item = ParamShape>, n: u64, bytes: u64) -> u128 {
    params
        .map(|p| {
            let b = ceil_div(p.rows, n) as u128 * p.cols as u128 * bytes as u128;
            b.next_power_of_two() - b
        })
        .sum()
}

fn tp_split(list: &ParamList, tp: u64, hidden: u64) -> impl Iterator<Item = ParamShape> + '_ {
    // Row-parallel weights (o and w2: rows == hidden, cols == q_dim or intermediate) split
    // their columns; column-parallel weights and biases split rows; norm weights (hidden x 1)
    // are replicated.
    list.iter().map(move |p| {
        if tp == 1 || (p.cols == 1 && p.rows == hidden) {
            *p
        } else if p.rows == hidden && p.cols > 1 {
            ParamShape {
                rows: p.rows,
                cols: p.cols / tp,
            }
        } else {
            ParamShape {
                rows: p.rows.div_ceil(tp),
                cols: p.cols,
            }
        }
    })
}

/// Layers on stage `stage` of `pp`: torchtitan splits as evenly as it can, earlier stages
/// taking the remainder.
pub fn stage_layers(layers: u64, pp: u64, stage: u64) -> u64 {
    layers / pp + u64::from(stage < layers % pp)
}

/// Parameter counts for pipeline stage `stage` on its most loaded rank (FSDP rank 0).
pub fn stage_params(plan: &Plan, stage: u64) -> StageParams {
    let m = &plan.model;
    let par = &plan.parallel;
    let n = par.fsdp_degree();
    let block = m.block_params();
    let (block_shard, block_unsharded, block_largest_shard) =
        shard_sizes(tp_split(&block, par.tp, m.hidden), n);
    let mb = plan.precision.master.bytes();
    let offload = plan.offload != crate::plan::Offload::None;
    let block_pinned_extra = if offload {
        pinned_extra(tp_split(&block, par.tp, m.hidden), n, mb)
    } else {
        0
    };
    let first = stage == 0;
    let last = stage + 1 == par.pp;
    let root = m.root_params();
    let vocab_rows = m.vocab.div_ceil(par.tp);
    // root_params: [embedding, final norm, output (untied only)].
    let mut root_list = ParamList::default();
    let mut output_unsharded = 0u128;
    for (i, p) in root.iter().enumerate() {
        let keep = match i {
            0 => first || (last && m.tied_embeddings),
            1 => last,
            _ => last,
        };
        if keep {
            let rows = if p.cols > 1 { vocab_rows } else { p.rows };
            root_list.push(ParamShape { rows, cols: p.cols });
        }
        if last && (i == 2 || (i == 0 && m.tied_embeddings)) {
            output_unsharded = ceil_div(vocab_rows, n) as u128 * n as u128 * p.cols as u128;
        }
    }
    let (root_shard, root_unsharded, root_largest_shard) =
        shard_sizes(root_list.iter().copied(), n);
    let root_pinned_extra = if offload {
        pinned_extra(root_list.iter().copied(), n, mb)
    } else {
        0
    };
    StageParams {
        layers: stage_layers(m.layers, par.pp, stage),
        block_shard,
        block_unsharded,
        block_largest_shard,
        root_shard,
        root_unsharded,
        root_largest_shard,
        block_pinned_extra,
        root_pinned_extra,
        output_unsharded,
        first,
        last,
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
    fn llama3_8b_over_two_ranks_is_half_of_every_tensor() {
        let p = plan(r#"{"model":"llama3-8b","num_gpus":2}"#);
        let s = stage_params(&p, 0);
        assert_eq!(s.shard_total() * 2, 8_030_261_248);
        assert_eq!(s.output_unsharded, 128_256 * 4096);
    }

    #[test]
    fn padding_goes_to_rank_zero() {
        // tiny: hidden 64, vocab 256, intermediate 176: over 3 ranks every dim-0 pads.
        let p = plan(r#"{"model":"tiny","num_gpus":3}"#);
        let s = stage_params(&p, 0);
        let per_block_by_hand: u128 = 22 // norm 64 -> ceil(64/3)=22 rows
            + 22 * 64 * 4 // q, k, v, o: 64 rows of 64 cols
            + 22 // ffn norm
            + 59 * 64 * 2 // w1, w3: ceil(176/3) = 59 rows of 64
            + 22 * 176; // w2: 64 rows of 176
        assert_eq!(s.block_shard, per_block_by_hand);
        assert_eq!(s.block_unsharded, per_block_by_hand * 3);
        // embedding 256x64 -> 86 rows; norm 22; output 86 rows.
        assert_eq!(s.root_shard, 86 * 64 * 2 + 22);
    }

    #[test]
    fn tensor_parallel_splits_matrices_and_replicates_norms() {
        let p = plan(r#"{"model":"llama3-8b","num_gpus":4,"parallel":{"tp":4}}"#);
        let s = stage_params(&p, 0);
        let block = 2 * 4096 + (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096) / 4;
        assert_eq!(s.block_shard, block);
    }

    #[test]
    fn pipeline_stages_split_layers_and_root() {
        let p = plan(r#"{"model":"llama3-8b","num_gpus":4,"parallel":{"pp":4}}"#);
        let first = stage_params(&p, 0);
        let last = stage_params(&p, 3);
        assert_eq!(first.layers, 8);
        assert_eq!(first.root_shard, 128_256 * 4096);
        assert_eq!(last.root_shard, 128_256 * 4096 + 4096);
        assert_eq!(stage_layers(30, 4, 0), 8);
        assert_eq!(stage_layers(30, 4, 3), 7);
    }
}
