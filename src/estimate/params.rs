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

/// Element counts of one kind of block (dense or MoE) on one rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockParams {
    /// Elements this rank holds (its FSDP shard, after TP and EP).
    pub shard: u128,
    /// Elements once all-gathered (padded), after TP and EP.
    pub unsharded: u128,
    /// Of `unsharded`, the 2-D linear weights (float8 all-gathers these in one byte).
    pub unsharded_linear: u128,
    /// Largest single parameter shard (per-parameter optimizer temporaries).
    pub largest_shard: u128,
    /// Bytes the pinned host allocator adds to this rank's master-dtype shards: it rounds
    /// every allocation up to a power of two (PyTorch `CachingHostAllocatorImpl::allocate`,
    /// "round up to the nearest power of two"), and FSDP2's CPU offload pins each parameter's
    /// shard on its own. Computed only under offload.
    pub pinned_extra: u128,
    /// Of `unsharded`, the routed experts this rank holds, and the size of the FSDP mesh
    /// that shards them (torchtitan's `dp_shard_mod_ep`, efsdp; 0 without experts).
    pub experts_unsharded: u128,
    pub experts_world: u64,
}

impl BlockParams {
    fn add(&mut self, (shard, unsharded, largest): (u128, u128, u128), linear: bool) {
        self.shard += shard;
        self.unsharded += unsharded;
        if linear {
            self.unsharded_linear += unsharded;
        }
        self.largest_shard = self.largest_shard.max(largest);
    }
}

/// The down projection's index in [`lora_module_dims`].
pub const LORA_DOWN: usize = 6;

/// A rank's share of `elems` adapter elements under FSDP (rounded up; all of them without).
pub fn lora_shard(plan: &Plan, elems: u128) -> u128 {
    elems.div_ceil(plan.parallel.fsdp_degree() as u128)
}

/// (in, out) features of each linear a LoRA adapter can wrap, in
/// [`crate::plan::LORA_MODULES`] order: q, k, v, o, gate, up, down.
pub fn lora_module_dims(plan: &Plan) -> [(u128, u128); 7] {
    let (h, q, kv, f) = super::activations::block_dims(&plan.model);
    [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]
}

/// A QLoRA block's decoder linears: (their weight elements, the bytes bitsandbytes stores
/// them in, the largest one's elements); None when the base is not quantised.
pub fn quantised_block(plan: &Plan) -> Option<(u128, u128, u128)> {
    let quant = plan.lora?.quant;
    let dims = lora_module_dims(plan);
    let bytes = dims
        .iter()
        .map(|&(i, o)| quant.linear_bytes(i * o))
        .sum::<Option<u128>>()?;
    let elems = dims.iter().map(|&(i, o)| i * o).sum();
    let largest = dims.iter().map(|&(i, o)| i * o).max().unwrap_or(0);
    Some((elems, bytes, largest))
}

/// LoRA adapter elements of one block: A (r x in) and B (out x r) per wrapped linear; and
/// the largest single adapter matrix (per-parameter optimizer temporaries).
pub fn lora_block_params(plan: &Plan) -> (u128, u128) {
    let Some(l) = plan.lora else {
        return (0, 0);
    };
    let r = l.rank as u128;
    lora_module_dims(plan)
        .iter()
        .enumerate()
        .filter(|&(i, _)| l.wraps(i))
        .fold((0, 0), |(sum, big), (_, &(i, o))| {
            (sum + r * (i + o), big.max(r * i.max(o)))
        })
}

/// Parameter element counts of one pipeline stage on one rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageParams {
    /// Dense and MoE decoder blocks on the stage.
    pub dense_layers: u64,
    pub moe_layers: u64,
    pub dense: BlockParams,
    pub moe: BlockParams,
    /// Root parameters (embedding, final norm, output) this stage holds: shard and unsharded.
    pub root_shard: u128,
    pub root_unsharded: u128,
    pub root_largest_shard: u128,
    pub root_pinned_extra: u128,
    /// Output-projection weight (or the tied embedding) unsharded, when this stage computes
    /// the logits: its gradient is held unsharded until the root's post-backward.
    pub output_unsharded: u128,
    /// The untied embedding alone, shard and unsharded (first stage; 0 when tied): FSDP unit
    /// of its own in torchtitan of 2025 on ([`crate::plan::FsdpUnits::Split`]).
    pub embedding_shard: u128,
    pub embedding_unsharded: u128,
    /// Whether this stage holds the embedding (first stage) and the output (last stage).
    pub first: bool,
    pub last: bool,
}

impl StageParams {
    pub fn layers(&self) -> u64 {
        self.dense_layers + self.moe_layers
    }
    /// Elements of every block shard this rank holds on this stage.
    pub fn blocks_shard(&self) -> u128 {
        self.dense_layers as u128 * self.dense.shard + self.moe_layers as u128 * self.moe.shard
    }
    /// Elements of every parameter shard this rank holds on this stage.
    pub fn shard_total(&self) -> u128 {
        self.blocks_shard() + self.root_shard
    }
    /// The largest single parameter shard.
    pub fn largest_shard(&self) -> u128 {
        self.dense
            .largest_shard
            .max(self.moe.largest_shard)
            .max(self.root_largest_shard)
    }
    /// The larger kind of block present on the stage.
    pub fn biggest_block(&self) -> BlockParams {
        if self.moe_layers > 0
            && (self.dense_layers == 0 || self.moe.unsharded > self.dense.unsharded)
        {
            self.moe
        } else {
            self.dense
        }
    }
    /// Pinned-allocator rounding of every shard of the stage.
    pub fn pinned_extra(&self) -> u128 {
        self.dense_layers as u128 * self.dense.pinned_extra
            + self.moe_layers as u128 * self.moe.pinned_extra
            + self.root_pinned_extra
    }
}

/// `ceil(a / b)`; parallel degrees are usually powers of two, which need no division.
fn ceil_div(a: u64, b: u64) -> u64 {
    if b.is_power_of_two() {
        let shift = b.trailing_zeros();
        (a >> shift) + u64::from(a & (b - 1) != 0)
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

/// (shard, padded unsharded) elements of every parameter of one dense block on FSDP rank 0,
/// after TP, in the order the model registers them: what FSDP2 allocates one tensor each for
/// (the unsharded parameters after the all-gather's copy-out, the optimizer's states).
pub fn dense_block_tensors(plan: &Plan) -> Vec<(u128, u128)> {
    let n = plan.parallel.fsdp_degree();
    tp_split(
        &plan.model.block_params(),
        plan.parallel.tp,
        plan.model.hidden,
    )
    .map(|p| {
        let (s, u, _) = shard_sizes(std::iter::once(p), n);
        (s, u)
    })
    .collect()
}

/// Layers on stage `stage` of `pp`: torchtitan splits as evenly as it can, earlier stages
/// taking the remainder.
pub fn stage_layers(layers: u64, pp: u64, stage: u64) -> u64 {
    layers / pp + u64::from(stage < layers % pp)
}

/// Parameter counts for pipeline stage `stage` on its most loaded rank (FSDP rank 0).
///
/// Routed experts (torchtitan `GroupedExperts`, dim 0 the expert index) are split over the
/// expert-parallel degree first and FSDP-sharded over what is left of the data-parallel ranks
/// (torchtitan's `dp_shard_mod_ep` mesh, which also takes the TP ranks when `etp` is 1), so
/// every rank holds 1/(N x tp) of the experts, and gathers only its own E/ep experts.
pub fn stage_params(plan: &Plan, stage: u64) -> StageParams {
    let m = &plan.model;
    let par = &plan.parallel;
    let n = par.fsdp_degree();
    let offload = plan.offload != crate::plan::Offload::None;
    let mb = plan.precision.master.bytes();
    let first = stage == 0;
    let last = stage + 1 == par.pp;

    let layers = stage_layers(m.layers, par.pp, stage);
    // Layers on the stages before this one (each earlier stage of the first `layers % pp`
    // takes one extra).
    let start = stage * (m.layers / par.pp) + stage.min(m.layers % par.pp);
    let moe_layers = m.moe_layers_in(start, start + layers);

    let block_of = |list: &ParamList| {
        let mut b = BlockParams::default();
        for p in tp_split(list, par.tp, m.hidden) {
            b.add(shard_sizes(std::iter::once(p), n), p.cols > 1 && p.rows > 1);
        }
        if offload {
            b.pinned_extra = pinned_extra(tp_split(list, par.tp, m.hidden), n, mb);
        }
        b
    };
    let dense = if layers > moe_layers {
        block_of(&m.block_params())
    } else {
        BlockParams::default()
    };
    let moe = match m.moe_block_params() {
        Some((list, experts)) if moe_layers > 0 => {
            let mut b = block_of(&list);
            let local_rows = experts[0].rows / par.ep;
            let (cols_div, fsdp_e) = if par.etp == 1 {
                (1, n * par.tp / par.ep)
            } else {
                (par.tp, n / par.ep)
            };
            let local: Vec<ParamShape> = experts
                .iter()
                .map(|e| ParamShape {
                    rows: local_rows,
                    cols: e.cols / cols_div,
                })
                .collect();
            let (shard, unsharded, largest) = shard_sizes(local.iter().copied(), fsdp_e.max(1));
            b.add((shard, unsharded, largest), false);
            b.experts_unsharded = unsharded;
            b.experts_world = fsdp_e.max(1);
            if offload {
                b.pinned_extra += pinned_extra(local.iter().copied(), fsdp_e.max(1), mb);
            }
            b
        }
        _ => BlockParams::default(),
    };

    let root = m.root_params();
    let vocab_rows = m.vocab.div_ceil(par.tp);
    // root_params: [embedding, final norm, output (untied only), final norm bias
    // (LayerNorm only)]; the output is the vocabulary-sized matrix after the embedding.
    let mut root_list = ParamList::default();
    let mut output_unsharded = 0u128;
    for (i, p) in root.iter().enumerate() {
        let keep = match i {
            0 => first || (last && m.tied_embeddings),
            _ => last,
        };
        if keep {
            let rows = if p.cols > 1 { vocab_rows } else { p.rows };
            root_list.push(ParamShape { rows, cols: p.cols });
        }
        let output = if i == 0 {
            m.tied_embeddings
        } else {
            p.cols > 1
        };
        if last && output {
            output_unsharded = ceil_div(vocab_rows, n) as u128 * n as u128 * p.cols as u128;
        }
    }
    let (root_shard, root_unsharded, root_largest_shard) =
        shard_sizes(root_list.iter().copied(), n);
    let (embedding_shard, embedding_unsharded) = match root.iter().next() {
        Some(&e) if first && !m.tied_embeddings => {
            let (s, u, _) = shard_sizes(
                [ParamShape {
                    rows: vocab_rows,
                    cols: e.cols,
                }]
                .into_iter(),
                n,
            );
            (s, u)
        }
        _ => (0, 0),
    };
    let root_pinned_extra = if offload {
        pinned_extra(root_list.iter().copied(), n, mb)
    } else {
        0
    };
    StageParams {
        dense_layers: layers - moe_layers,
        moe_layers,
        dense,
        moe,
        root_shard,
        root_unsharded,
        root_largest_shard,
        root_pinned_extra,
        output_unsharded,
        embedding_shard,
        embedding_unsharded,
        first,
        last,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::plan::test_plan as plan;

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
        assert_eq!(s.dense.shard, per_block_by_hand);
        assert_eq!(s.dense.unsharded, per_block_by_hand * 3);
        // embedding 256x64 -> 86 rows; norm 22; output 86 rows.
        assert_eq!(s.root_shard, 86 * 64 * 2 + 22);
    }

    #[test]
    fn tensor_parallel_splits_matrices_and_replicates_norms() {
        let p = plan(r#"{"model":"llama3-8b","num_gpus":4,"parallel":{"tp":4}}"#);
        let s = stage_params(&p, 0);
        let block = 2 * 4096 + (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096) / 4;
        assert_eq!(s.dense.shard, block);
    }

    #[test]
    fn experts_are_split_over_ep_and_sharded_over_the_rest() {
        // mixtral-8x7b, 8 GPUs, EP 8: each rank holds one expert of each of w1, w3, w2
        // (3 x 4096 x 14336) and gathers only that one; attention etc. over 8 FSDP ranks.
        let p = plan(r#"{"model":"mixtral-8x7b","num_gpus":8,"parallel":{"ep":8}}"#);
        let s = stage_params(&p, 0);
        assert_eq!(s.moe_layers, 32);
        let experts = 3 * 4096 * 14336u128; // one expert's w1, w3, w2 = 1/8 of all experts
        let rest = (2 * 4096 + 2 * 4096 * 4096 + 2 * 1024 * 4096 + 8 * 4096) / 8;
        assert_eq!(s.moe.shard, experts + rest);
        let no_ep = stage_params(&plan(r#"{"model":"mixtral-8x7b","num_gpus":8}"#), 0);
        assert_eq!(no_ep.moe.shard, s.moe.shard);
        assert_eq!(no_ep.moe.unsharded - s.moe.unsharded, 7 * experts);
    }

    #[test]
    fn pipeline_stages_split_layers_and_root() {
        let p = plan(r#"{"model":"llama3-8b","num_gpus":4,"parallel":{"pp":4}}"#);
        let first = stage_params(&p, 0);
        let last = stage_params(&p, 3);
        assert_eq!(first.layers(), 8);
        assert_eq!(first.root_shard, 128_256 * 4096);
        assert_eq!(last.root_shard, 128_256 * 4096 + 4096);
        assert_eq!(stage_layers(30, 4, 0), 8);
        assert_eq!(stage_layers(30, 4, 3), 7);
    }

    #[test]
    fn layer_norm_bias_stays_on_the_last_stage_and_the_output_is_found() {
        // Pythia-1B over 2 ranks: every dim-0 even, so half of every tensor; with PP 2 the
        // last stage holds embed_out and the final LayerNorm's weight and bias.
        let p = plan(r#"{"model":"tests/data/hf/pythia-1b.json","num_gpus":2}"#);
        assert_eq!(stage_params(&p, 0).shard_total() * 2, 1_011_781_632);
        let p =
            plan(r#"{"model":"tests/data/hf/pythia-1b.json","num_gpus":2,"parallel":{"pp":2}}"#);
        let last = stage_params(&p, 1);
        assert_eq!(last.root_shard, 50_304 * 2048 + 2 * 2048);
        assert_eq!(last.output_unsharded, 50_304 * 2048);
    }
}
