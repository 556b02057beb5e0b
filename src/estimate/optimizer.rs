//! Optimizer states and step temporaries of the optimizers whose states are not one tensor per
//! parameter: bitsandbytes' 8-bit AdamW and torch's Adafactor, counted tensor by tensor.
//!
//! Measured on CPU with torch 2.11, Transformers 5.24 and bitsandbytes 0.50.2 (the states as
//! the optimizers hold them after a step, read from their `state` dicts;
//! docs/research/hf-lora-measured.md, tests/data/qlora_torch_2.11.jsonl):
//!
//! | optimizer | per trainable tensor of k elements | once |
//! |---|---|---|
//! | `AdamW8bit`, `PagedAdamW8bit` (bitsandbytes) | k >= 4096 and not an embedding: `state1`, `state2` uint8 (2k) and an fp32 `absmax` per 256-element block of each (8 ceil(k / 256)); else fp32 `state1`, `state2` (8k) | `qmap1`, `qmap2`: 256 fp32 each (2,048), with the first 8-bit state |
//! | `torch.optim.Adafactor` | 2-D (r x c): `row_var` (r, 1) and `col_var` (1, c) in the parameter's dtype; 1-D: a full `variance` | the `step` scalars, CPU tensors (host memory) |
//! | `torch.optim.Muon` (+ AdamW for the rest) | a Muon matrix: `momentum_buffer` as the parameter; any other: AdamW's two | the `step` scalars |
//!
//! bitsandbytes keeps tensors under 4,096 elements (`min_8bit_size`) in 32 bits, and
//! Transformers' `Trainer` registers every `nn.Embedding` for 32-bit states
//! (`GlobalOptimManager.register_module_override(module, "weight", {"optim_bits": 32})`).
//!
//! Step temporaries: bitsandbytes updates in fused CUDA kernels, none; its CPU fallback (the
//! measurement) makes 20 bytes per element of the largest 8-bit tensor, not modelled.
//! Adafactor's `var_estimate = row_var @ col_var` is as large as the parameter: one list of
//! them for every 2-D parameter in foreach mode (torch's default on a GPU; measured to 132 B),
//! the largest one in the single-tensor loop (measured on CPU: 1.34 times that, its
//! `torch.norm` over dimension -2 copying; not modelled).
//! Muon steps one matrix at a time (torch 2.11 `_muon.py`, `_single_tensor_muon`,
//! `_zeropower_via_newtonschulz`): for a p x q matrix of N elements, m = min(p, q), the
//! Nesterov update `grad.lerp(buf)` (N in the parameter's dtype) and its bf16 copy X (2N) live
//! through five Newton-Schulz iterations, each making G = X X^T and its polynomial (2m^2 each)
//! and a new X (2N) while the old ones are alive: max(U + 4N + 4m^2, U + 2N + 6m^2 + 4) bytes at
//! the largest matrix, measured to the byte on CPU once oneDNN's per-matmul scratch (which
//! depends on the thread count) is set aside. The AdamW group steps after it, fused.

use super::params::{lora_module_dims, StageParams};
use crate::plan::{Optimizer, OptimizerImpl, Plan};

/// bitsandbytes' `min_8bit_size`: smaller tensors keep 32-bit states.
const MIN_8BIT: u128 = 4096;
/// bitsandbytes' blockwise quantisation block.
const BLOCK: u128 = 256;

/// One trainable tensor of the stage: its shape, and whether it is the embedding or belongs to
/// the root (embedding, final norm, output) rather than a block.
#[derive(Clone, Copy)]
struct Trainable {
    rows: u128,
    cols: u128,
    embedding: bool,
    root: bool,
}

impl Trainable {
    fn numel(self) -> u128 {
        self.rows * self.cols
    }
    /// Whether torch's Muon steps it (a matrix; the root's only with `muon-all-2d`).
    fn muon(self, optimizer: Optimizer) -> bool {
        self.cols > 1 && (!self.root || optimizer == Optimizer::MuonAll2d)
    }
    /// Whether bitsandbytes keeps its states in 8 bits.
    fn eight_bit(self) -> bool {
        self.numel() >= MIN_8BIT && !self.embedding
    }
}

/// The stage's trainable tensors: the LoRA adapters, or every parameter.
fn trainable_tensors(plan: &Plan, p: &StageParams) -> Vec<Trainable> {
    let m = &plan.model;
    let layers = p.layers() as usize;
    let block = |rows, cols| Trainable {
        rows,
        cols,
        embedding: false,
        root: false,
    };
    let mut out = Vec::new();
    if let Some(l) = plan.lora {
        let r = l.rank as u128;
        for _ in 0..layers {
            for (i, &(fan_in, fan_out)) in lora_module_dims(plan).iter().enumerate() {
                if l.wraps(i) {
                    out.push(block(r, fan_in));
                    out.push(block(fan_out, r));
                }
            }
        }
        return out;
    }
    for _ in 0..layers {
        out.extend(
            m.block_params()
                .iter()
                .map(|s| block(s.rows as u128, s.cols as u128)),
        );
    }
    for (i, s) in m.root_params().iter().enumerate() {
        let embedding = i == 0;
        let keep = if embedding {
            p.first || (p.last && m.tied_embeddings)
        } else {
            p.last
        };
        if keep {
            out.push(Trainable {
                rows: s.rows as u128,
                cols: s.cols as u128,
                embedding,
                root: true,
            });
        }
    }
    out
}

/// Device bytes of the optimizer's states on the stage, and of them the root's (embedding,
/// final norm, output); `per_tensor` is what an optimizer with one state tensor per parameter
/// holds, in the master dtype.
pub fn states(plan: &Plan, p: &StageParams, per_tensor: (u128, u128)) -> (u128, u128) {
    let optimizer = plan.optimizer;
    if !optimizer.factored() {
        return per_tensor;
    }
    let m = plan.precision.master.bytes() as u128;
    let each = |t: Trainable| -> u128 {
        let k = t.numel();
        match optimizer {
            Optimizer::AdamW8bit if t.eight_bit() => 2 * k + 2 * 4 * k.div_ceil(BLOCK),
            Optimizer::AdamW8bit => 2 * 4 * k,
            Optimizer::Adafactor if t.cols > 1 => m * (t.rows + t.cols),
            Optimizer::Adafactor => m * t.rows,
            // A momentum buffer for a Muon matrix, AdamW's two for the rest.
            _ if t.muon(optimizer) => m * k,
            _ => 2 * m * k,
        }
    };
    let tensors = trainable_tensors(plan, p);
    let total: u128 = tensors.iter().map(|&t| each(t)).sum();
    let root: u128 = tensors.iter().filter(|t| t.root).map(|&t| each(t)).sum();
    // The two 256-entry quantisation maps, made with the first 8-bit state.
    let qmaps = if optimizer == Optimizer::AdamW8bit && tensors.iter().any(|t| t.eight_bit()) {
        2 * 256 * 4
    } else {
        0
    };
    (total + qmaps, root + qmaps)
}

/// Step temporaries of Adafactor and Muon (see the module doc); None for other optimizers.
pub fn temporaries(plan: &Plan, p: &StageParams) -> Option<u128> {
    let optimizer = plan.optimizer;
    let m = plan.precision.master.bytes() as u128;
    if matches!(optimizer, Optimizer::Muon | Optimizer::MuonAll2d) {
        let mut muon = 0u128;
        let mut adamw = Vec::new();
        for t in trainable_tensors(plan, p) {
            let n = t.numel();
            if t.muon(optimizer) {
                let small = t.rows.min(t.cols);
                let w =
                    (m * n + 4 * n + 4 * small * small).max(m * n + 2 * n + 6 * small * small + 4);
                muon = muon.max(w);
            } else {
                adamw.push(n);
            }
        }
        // The AdamW group's step comes after Muon's, with its own temporaries.
        let adamw = match plan.implementation.optimizer {
            OptimizerImpl::Fused | OptimizerImpl::FusedBf16States => 0,
            OptimizerImpl::Foreach => m * adamw.iter().sum::<u128>(),
            OptimizerImpl::PerParam => 2 * m * adamw.iter().copied().max().unwrap_or(0),
        };
        return Some(muon.max(adamw));
    }
    if optimizer != Optimizer::Adafactor {
        return None;
    }
    let matrices = trainable_tensors(plan, p)
        .into_iter()
        .filter(|t| t.cols > 1)
        .map(Trainable::numel);
    Some(match plan.implementation.optimizer {
        OptimizerImpl::PerParam => m * matrices.max().unwrap_or(0),
        // torch's Adafactor has no fused kernel; its GPU default is foreach.
        OptimizerImpl::Foreach | OptimizerImpl::Fused | OptimizerImpl::FusedBf16States => {
            m * matrices.sum::<u128>()
        }
    })
}

#[cfg(test)]
mod tests {
    use crate::estimate::estimate;
    use crate::plan::test_plan as plan;

    fn states(optimizer: &str) -> u64 {
        let p = plan(&format!(
            r#"{{"model":"tiny","gpu":"cpu","num_gpus":1,"optimizer":"{optimizer}",
                "precision":{{"param":"fp32","master":"fp32","reduce":"fp32"}},
                "batch":{{"micro_batch_size":2,"seq_len":64}}}}"#
        ));
        estimate(&p)
            .unwrap()
            .per_gpu
            .breakdown
            .optimizer_states_bytes
            .get()
    }

    /// tiny (h 64, ffn 176, vocab 256, 2 blocks) by hand.
    #[test]
    fn tiny_states_are_counted_by_hand() {
        // 8-bit: q/k/v/o (4,096 elements each: 8,192 + 8 x 16 absmax), w1/w3/w2 (11,264:
        // 22,528 + 8 x 44), two norms in 32 bits (8 x 64); the embedding in 32 bits
        // (8 x 16,384), the final norm (8 x 64), the output 8-bit (32,768 + 8 x 64); two maps.
        let block = 4 * (8_192 + 128) + 3 * (22_528 + 352) + 2 * 512;
        assert_eq!(
            states("adamw-8bit"),
            2 * block + 131_072 + 512 + 33_280 + 2_048
        );
        // Adafactor: rows + cols of each matrix, the norms whole, fp32.
        let block = 4 * (4 * (64 + 64) + 2 * (176 + 64) + (64 + 176) + 2 * 64);
        assert_eq!(states("adafactor"), 2 * block + 4 * (256 + 64) * 2 + 4 * 64);
        // Muon: a momentum buffer per block matrix (4 x 4,096 + 3 x 11,264 elements), AdamW's
        // two for the norms, the embedding and the output; or Muon for those matrices too.
        let matrices = 4 * 4_096 + 3 * 11_264;
        let others = 2 * 2 * 64 + 64 + 2 * 16_384;
        assert_eq!(states("muon"), 4 * 2 * matrices + 8 * others);
        assert_eq!(
            states("muon-all-2d"),
            4 * (2 * matrices + 2 * 16_384) + 8 * (2 * 2 * 64 + 64)
        );
    }
}
