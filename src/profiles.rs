//! Model and GPU profiles.
//!
//! A model profile is a Hugging Face `config.json` (same field names), read into
//! [`ModelConfig`] with `Option`s and then turned into the plain [`ModelSpec`] the arithmetic
//! uses. Shipped profiles live in `profiles/models/*.json` and `profiles/gpus/*.json` and are
//! compiled into the binary, so `--model llama3-8b` works from any directory; `--model` also
//! takes a path to any `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::units::Bytes;

/// A Hugging Face `config.json`, as far as memory is concerned. Unknown keys are ignored.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ModelConfig {
    pub model_type: Option<String>,
    pub hidden_size: Option<u64>,
    pub num_hidden_layers: Option<u64>,
    pub num_attention_heads: Option<u64>,
    pub num_key_value_heads: Option<u64>,
    pub head_dim: Option<u64>,
    pub intermediate_size: Option<u64>,
    pub vocab_size: Option<u64>,
    pub tie_word_embeddings: Option<bool>,
    pub max_position_embeddings: Option<u64>,
    /// Llama: bias on q, k, v and o projections.
    pub attention_bias: Option<bool>,
    /// Llama: bias on the MLP projections.
    pub mlp_bias: Option<bool>,
    // Mixture-of-experts keys of current families: Mixtral (num_local_experts), Qwen-MoE
    // (num_experts, moe_intermediate_size, shared_expert_intermediate_size,
    // decoder_sparse_step, mlp_only_layers), DeepSeek (n_routed_experts, n_shared_experts,
    // first_k_dense_replace, moe_layer_freq).
    pub num_local_experts: Option<u64>,
    pub num_experts: Option<u64>,
    pub n_routed_experts: Option<u64>,
    pub num_experts_per_tok: Option<u64>,
    pub moe_intermediate_size: Option<u64>,
    pub shared_expert_intermediate_size: Option<u64>,
    pub n_shared_experts: Option<u64>,
    pub first_k_dense_replace: Option<u64>,
    pub moe_layer_freq: Option<u64>,
    pub decoder_sparse_step: Option<u64>,
    pub mlp_only_layers: Option<Vec<u64>>,
    /// DeepSeek multi-head latent attention; refused (not modelled).
    pub kv_lora_rank: Option<u64>,
}

/// Mixture-of-experts layout of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MoeSpec {
    /// Routed experts per MoE layer.
    pub experts: u64,
    /// Experts each token is routed to.
    pub top_k: u64,
    /// Intermediate size of one routed expert's SwiGLU.
    pub expert_intermediate: u64,
    /// Summed intermediate size of the shared experts (0 if none).
    pub shared_intermediate: u64,
    /// Whether the shared expert output goes through a sigmoid gate (Qwen-MoE): an h x 1
    /// weight.
    pub shared_gate: bool,
    /// Leading layers that stay dense (DeepSeek first_k_dense_replace).
    pub first_dense: u64,
    /// Every `every`-th layer after those is MoE (Qwen decoder_sparse_step, DeepSeek
    /// moe_layer_freq); 1 means all.
    pub every: u64,
}

/// The plain model description the estimator and the trainer use: a Llama-family decoder
/// (RMSNorm, rotary attention with grouped-query heads, SwiGLU MLP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelSpec {
    pub name: String,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub intermediate: u64,
    pub vocab: u64,
    pub tied_embeddings: bool,
    pub max_seq_len: u64,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm on each query and key head (Qwen3): two head_dim weights per layer.
    pub qk_norm: bool,
    pub moe: Option<MoeSpec>,
}

/// One parameter tensor of a block: rows (dim 0, the dimension FSDP shards) x cols.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParamShape {
    pub rows: u64,
    pub cols: u64,
}

impl ParamShape {
    pub const fn numel(self) -> u64 {
        self.rows * self.cols
    }
}

/// The parameter tensors of a module, in a fixed-capacity list (no heap allocation: the
/// estimator walks it on every call).
#[derive(Clone, Copy, Debug, Default)]
pub struct ParamList {
    items: [ParamShape; 16],
    len: usize,
}

impl ParamList {
    /// Appends a parameter (at most 16 per list: a block has at most 14).
    pub fn push(&mut self, p: ParamShape) {
        self.items[self.len] = p;
        self.len += 1;
    }
    pub fn iter(&self) -> std::slice::Iter<'_, ParamShape> {
        self.items[..self.len].iter()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl ModelConfig {
    /// Checks every field and yields the spec. `name` labels the model in output.
    pub fn into_spec(self, name: &str) -> Result<ModelSpec> {
        let field = |v: Option<u64>, key: &str| -> Result<u64> {
            match v {
                None => Err(Error::input(format!(
                    "model {name}: missing {key} (a positive integer, as in Hugging Face config.json)"
                ))),
                Some(0) => Err(Error::invalid(
                    &format!("model {name}: {key}"),
                    0,
                    "a positive integer",
                )),
                Some(n) if n > 1 << 32 => Err(Error::invalid(
                    &format!("model {name}: {key}"),
                    n,
                    "at most 2^32",
                )),
                Some(n) => Ok(n),
            }
        };
        if self.kv_lora_rank.is_some() {
            return Err(Error::input(format!(
                "model {name}: multi-head latent attention (kv_lora_rank) is not modelled; \
                 Llama-family attention with grouped KV heads is"
            )));
        }
        let hidden = field(self.hidden_size, "hidden_size")?;
        let layers = field(self.num_hidden_layers, "num_hidden_layers")?;
        let heads = field(self.num_attention_heads, "num_attention_heads")?;
        let kv_heads = field(
            self.num_key_value_heads.or(self.num_attention_heads),
            "num_key_value_heads",
        )?;
        let intermediate = field(self.intermediate_size, "intermediate_size")?;
        let vocab = field(self.vocab_size, "vocab_size")?;
        if heads % kv_heads != 0 {
            return Err(Error::invalid(
                &format!("model {name}: num_key_value_heads"),
                kv_heads,
                format!("a divisor of num_attention_heads ({heads})"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => field(Some(d), "head_dim")?,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(Error::invalid(
                    &format!("model {name}: num_attention_heads"),
                    heads,
                    format!("a divisor of hidden_size ({hidden}) or an explicit head_dim"),
                ))
            }
        };
        let experts = self
            .num_local_experts
            .or(self.num_experts)
            .or(self.n_routed_experts)
            .unwrap_or(0);
        let moe = if experts > 1 {
            let top_k = field(self.num_experts_per_tok, "num_experts_per_tok")?;
            if top_k > experts {
                return Err(Error::invalid(
                    &format!("model {name}: num_experts_per_tok"),
                    top_k,
                    format!("at most the number of experts ({experts})"),
                ));
            }
            if self.mlp_only_layers.as_ref().is_some_and(|v| !v.is_empty()) {
                return Err(Error::input(format!(
                    "model {name}: mlp_only_layers (an irregular dense/MoE pattern) is not modelled"
                )));
            }
            let expert_intermediate = match self.moe_intermediate_size {
                Some(_) => field(self.moe_intermediate_size, "moe_intermediate_size")?,
                None => field(self.intermediate_size, "intermediate_size")?,
            };
            let shared_intermediate =
                match (self.shared_expert_intermediate_size, self.n_shared_experts) {
                    (Some(s), _) => s,
                    (None, Some(n)) => n * expert_intermediate,
                    (None, None) => 0,
                };
            Some(MoeSpec {
                experts,
                top_k,
                expert_intermediate,
                shared_intermediate,
                shared_gate: self.shared_expert_intermediate_size.is_some(),
                first_dense: self.first_k_dense_replace.unwrap_or(0),
                every: self
                    .moe_layer_freq
                    .or(self.decoder_sparse_step)
                    .unwrap_or(1)
                    .max(1),
            })
        } else {
            None
        };
        // Qwen2 hard-codes a bias on q, k and v (not o) without a config key.
        let qwen2 = matches!(self.model_type.as_deref(), Some("qwen2" | "qwen2_moe"));
        let qk_norm = matches!(self.model_type.as_deref(), Some("qwen3" | "qwen3_moe"));
        let attention_bias = self.attention_bias.unwrap_or(false);
        Ok(ModelSpec {
            name: name.to_string(),
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            vocab,
            tied_embeddings: self.tie_word_embeddings.unwrap_or(false),
            max_seq_len: self.max_position_embeddings.unwrap_or(u64::MAX),
            qkv_bias: attention_bias || qwen2,
            o_bias: attention_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            qk_norm,
            moe,
        })
    }
}

impl ModelSpec {
    /// Width of the query projection output: heads x head_dim.
    pub fn q_dim(&self) -> u64 {
        self.heads * self.head_dim
    }
    /// Width of each of the key and value projection outputs: kv_heads x head_dim.
    pub fn kv_dim(&self) -> u64 {
        self.kv_heads * self.head_dim
    }

    /// The parameter tensors of one decoder block, in the order the block uses them, as
    /// (rows, cols) with rows the output features (PyTorch's `nn.Linear.weight` layout, which
    /// is the dimension FSDP2 shards). Biases and norm weights are `rows x 1`.
    pub fn block_params(&self) -> ParamList {
        let mut v = self.attention_params();
        let (h, f) = (self.hidden, self.intermediate);
        for (rows, cols) in [(f, h), (f, h), (h, f)] {
            v.push(ParamShape { rows, cols });
            if self.mlp_bias {
                v.push(ParamShape { rows, cols: 1 });
            }
        }
        v
    }

    /// Norms and attention of a block (what dense and MoE blocks share).
    fn attention_params(&self) -> ParamList {
        let (h, q, kv) = (self.hidden, self.q_dim(), self.kv_dim());
        let mut v = ParamList::default();
        v.push(ParamShape { rows: h, cols: 1 }); // attention_norm
        for rows in [q, kv, kv] {
            v.push(ParamShape { rows, cols: h });
            if self.qkv_bias {
                v.push(ParamShape { rows, cols: 1 });
            }
        }
        if self.qk_norm {
            v.push(ParamShape {
                rows: self.head_dim,
                cols: 1,
            });
            v.push(ParamShape {
                rows: self.head_dim,
                cols: 1,
            });
        }
        v.push(ParamShape { rows: h, cols: q }); // o_proj
        if self.o_bias {
            v.push(ParamShape { rows: h, cols: 1 });
        }
        v.push(ParamShape { rows: h, cols: 1 }); // ffn_norm
        v
    }

    /// An MoE block: its non-expert tensors (norms, attention, router, shared experts and
    /// their gate) and its routed experts as three grouped tensors (w1, w3, w2), each
    /// `experts x (hidden * expert_intermediate)` with dim 0 the expert index, as torchtitan's
    /// `GroupedExperts` stores them (FSDP and EP split dim 0).
    pub fn moe_block_params(&self) -> Option<(ParamList, [ParamShape; 3])> {
        let m = self.moe?;
        let mut v = self.attention_params();
        let h = self.hidden;
        v.push(ParamShape {
            rows: m.experts,
            cols: h,
        }); // router
        if m.shared_intermediate > 0 {
            let fs = m.shared_intermediate;
            for (rows, cols) in [(fs, h), (fs, h), (h, fs)] {
                v.push(ParamShape { rows, cols });
            }
            if m.shared_gate {
                v.push(ParamShape { rows: 1, cols: h });
            }
        }
        let e = ParamShape {
            rows: m.experts,
            cols: h * m.expert_intermediate,
        };
        Some((v, [e; 3]))
    }

    /// Number of MoE layers (0 for a dense model). DeepSeek: layers from
    /// `first_k_dense_replace` on whose index is a multiple of `moe_layer_freq`; Qwen-MoE:
    /// layers whose 1-based index is a multiple of `decoder_sparse_step`.
    pub fn moe_layers(&self) -> u64 {
        (0..self.layers).filter(|&i| self.is_moe_layer(i)).count() as u64
    }

    /// Whether decoder layer `i` (0-based) is an MoE layer.
    pub fn is_moe_layer(&self, i: u64) -> bool {
        match self.moe {
            None => false,
            Some(m) if m.first_dense > 0 => i >= m.first_dense && i % m.every == 0,
            Some(m) => (i + 1) % m.every == 0,
        }
    }

    /// Parameters of one dense decoder block.
    pub fn block_param_count(&self) -> u64 {
        self.block_params().iter().map(|p| p.numel()).sum()
    }

    /// Parameters of one MoE block (0 for a dense model).
    pub fn moe_block_param_count(&self) -> u64 {
        self.moe_block_params().map_or(0, |(v, e)| {
            v.iter().map(|p| p.numel()).sum::<u64>() + e.iter().map(|p| p.numel()).sum::<u64>()
        })
    }

    /// Parameters outside the blocks: token embedding, final norm, and the output projection
    /// unless it is tied to the embedding.
    pub fn root_params(&self) -> ParamList {
        let mut v = ParamList::default();
        v.push(ParamShape {
            rows: self.vocab,
            cols: self.hidden,
        }); // tok_embeddings
        v.push(ParamShape {
            rows: self.hidden,
            cols: 1,
        }); // final norm
        if !self.tied_embeddings {
            v.push(ParamShape {
                rows: self.vocab,
                cols: self.hidden,
            });
        }
        v
    }

    /// Exact parameter count (`sum(p.numel() for p in model.parameters())`).
    ///
    /// ```
    /// let m = memplan::profiles::model("llama3-8b").unwrap();
    /// assert_eq!(m.param_count(), 8_030_261_248);
    /// ```
    pub fn param_count(&self) -> u64 {
        let moe = self.moe_layers();
        (self.layers - moe) * self.block_param_count()
            + moe * self.moe_block_param_count()
            + self.root_params().iter().map(|p| p.numel()).sum::<u64>()
    }

    /// A 2-layer model small enough to train on a CPU in a test: hidden 64, 4 heads, 2 KV
    /// heads, vocab 256.
    pub fn tiny() -> ModelSpec {
        model("tiny").expect("the tiny profile ships with the binary")
    }
}

/// A GPU as the driver reports it.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    pub name: String,
    /// Total device memory as the driver reports it (nvidia-smi "Total", in bytes).
    pub memory_bytes: Bytes,
    /// Device memory taken outside PyTorch's caching allocator: CUDA context, kernel images,
    /// cuBLAS/cuDNN handles. What nvidia-smi shows minus what the allocator reserves.
    pub runtime_overhead_bytes: Bytes,
    /// Library workspaces allocated through the caching allocator (cuBLAS), so counted in
    /// allocated bytes.
    pub workspace_bytes: Bytes,
    /// Whether allocations go through PyTorch's CUDA caching allocator (so reserved exceeds
    /// allocated by its fragmentation). False for the CPU, whose allocator returns memory.
    #[serde(default = "yes")]
    pub caching_allocator: bool,
    /// Dense bf16 tensor throughput, TFLOP/s (for ranking plans by time).
    pub bf16_tflops: f64,
    /// Device memory bandwidth, GB/s.
    pub hbm_gbps: f64,
    /// Host link bandwidth per direction, GB/s (PCIe).
    pub host_link_gbps: f64,
    /// Intra-node GPU interconnect per direction, GB/s (NVLink, Infinity Fabric, or PCIe).
    pub intra_node_gbps: f64,
    /// Where the figures come from.
    pub source: String,
}

fn yes() -> bool {
    true
}

macro_rules! shipped {
    ($dir:literal: $($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../profiles/", $dir, "/", $name, ".json")))),*]
    };
}

/// The shipped model profiles, name and text.
pub const MODELS: &[(&str, &str)] = shipped!("models":
    "llama2-7b", "llama2-13b", "llama3-8b", "llama3-70b", "llama3.1-405b", "llama3.2-1b",
    "mistral-7b", "qwen2.5-7b", "mixtral-8x7b", "deepseek-moe-16b", "qwen1.5-moe-a2.7b",
    "tiny", "tiny-gqa", "tiny-tied", "tiny-moe", "small", "small-gqa",
);

/// The shipped GPU profiles, name and text.
pub const GPUS: &[(&str, &str)] = shipped!("gpus":
    "rtx4090-24g", "rtx-a6000-48g", "l40s-48g", "a100-40g", "a100-80g", "h100-80g", "h100-96g",
    "h200-141g", "mi300x-192g", "cpu",
);

fn names(list: &[(&str, &str)]) -> String {
    list.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        Error::input(format!(
            "{what}: malformed JSON at line {} column {}: {e}",
            e.line(),
            e.column()
        ))
    })
}

/// A model by shipped name, or by path to a Hugging Face `config.json`.
pub fn model(name_or_path: &str) -> Result<ModelSpec> {
    if let Some((name, text)) = MODELS.iter().find(|(n, _)| *n == name_or_path) {
        let cfg: ModelConfig = parse_json(&format!("model profile {name}"), text)?;
        return cfg.into_spec(name);
    }
    let path = Path::new(name_or_path);
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: ModelConfig = parse_json(&format!("model config {}", path.display()), &text)?;
        let name = path
            .parent()
            .and_then(|p| p.file_name())
            .filter(|_| path.file_name().is_some_and(|f| f == "config.json"))
            .or_else(|| path.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| name_or_path.to_string());
        return cfg.into_spec(&name);
    }
    Err(Error::invalid(
        "model",
        format!("{name_or_path:?}"),
        format!("a path to a config.json or one of: {}", names(MODELS)),
    ))
}

/// A GPU by shipped name, or by path to a GPU profile JSON.
pub fn gpu(name_or_path: &str) -> Result<GpuSpec> {
    if let Some((name, text)) = GPUS.iter().find(|(n, _)| *n == name_or_path) {
        return parse_json(&format!("gpu profile {name}"), text);
    }
    let path = Path::new(name_or_path);
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        return parse_json(&format!("gpu profile {}", path.display()), &text);
    }
    Err(Error::invalid(
        "gpu",
        format!("{name_or_path:?}"),
        format!("a path to a GPU profile JSON or one of: {}", names(GPUS)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_profile_parses() {
        for (name, _) in MODELS {
            model(name).unwrap();
        }
        for (name, _) in GPUS {
            assert_eq!(&gpu(name).unwrap().name, name);
        }
    }

    #[test]
    fn block_of_llama3_8b_is_counted_by_hand() {
        // q 4096x4096, k and v 1024x4096, o 4096x4096, three MLP 14336x4096, two norms.
        let m = model("llama3-8b").unwrap();
        let by_hand = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 2 * 4096;
        assert_eq!(m.block_param_count(), by_hand);
    }

    #[test]
    fn unknown_model_lists_the_known_ones() {
        let e = model("llama9-1t").unwrap_err().to_string();
        assert!(e.contains("llama3-8b") && e.contains("llama9-1t"), "{e}");
    }

    #[test]
    fn latent_attention_configs_are_refused_not_misread() {
        let cfg: ModelConfig = serde_json::from_str(
            r#"{"hidden_size":4096,"num_hidden_layers":32,"num_attention_heads":32,
                "intermediate_size":14336,"vocab_size":32000,"kv_lora_rank":512}"#,
        )
        .unwrap();
        assert!(cfg.into_spec("deepseek-v3").is_err());
    }
}
