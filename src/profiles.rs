//! Model and GPU profiles.
//!
//! A model profile is a Hugging Face `config.json` (same field names), read into
//! [`ModelConfig`] with `Option`s and then turned into the plain [`ModelSpec`] the arithmetic
//! uses. Shipped profiles live in `profiles/models/*.json` and `profiles/gpus/*.json` and are
//! compiled into the binary, so `--model llama3-8b` works from any directory; `--model` also
//! takes a path to any `config.json`, or to a directory holding one.
//!
//! Families are explicit: a config names its `model_type` or its `architectures` (or both,
//! and then they must agree), and only the decoder blocks modelled here are accepted (see
//! [`Family`]). A config naming neither is refused rather than read as Llama: that guess is
//! what read Pythia (`gpt_neox`) as a 9.00 B Llama instead of a 6.86 B GPT-NeoX. Every shipped
//! profile names its `model_type`.
//!
//! Every size is bounded before it is used: each integer field at most 2^32, every tensor and
//! every product of two dimensions (heads x head_dim, hidden x vocab, the grouped expert
//! tensors) at most [`MAX_TENSOR_NUMEL`] = 2^40 elements, the parameter count at most
//! [`MAX_PARAMS`] = 2^50, so the estimator's 128-bit products with batch and sequence (each
//! at most 2^24) cannot overflow and no product here wraps.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::units::Bytes;

/// Largest value of any integer field of a model config.
pub const MAX_FIELD: u64 = 1 << 32;
/// Largest number of elements of one parameter tensor, and of any product of two model
/// dimensions (2^40: 4 TiB of bf16 in one tensor, beyond any model).
pub const MAX_TENSOR_NUMEL: u64 = 1 << 40;
/// Largest parameter count accepted (2^50, about 10^15; the largest published models are
/// about 2^41).
pub const MAX_PARAMS: u64 = 1 << 50;
/// Largest GPU memory accepted (2^50 bytes, 1 PiB).
pub const MAX_GPU_BYTES: u64 = 1 << 50;

/// A Hugging Face `config.json`, as far as memory is concerned. Unknown keys are ignored.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ModelConfig {
    pub model_type: Option<String>,
    /// Model classes, e.g. `["LlamaForCausalLM"]`.
    pub architectures: Option<Vec<String>>,
    pub hidden_size: Option<u64>,
    pub num_hidden_layers: Option<u64>,
    pub num_attention_heads: Option<u64>,
    pub num_key_value_heads: Option<u64>,
    pub head_dim: Option<u64>,
    pub intermediate_size: Option<u64>,
    pub vocab_size: Option<u64>,
    pub tie_word_embeddings: Option<bool>,
    pub max_position_embeddings: Option<u64>,
    /// Bias on q, k, v and o projections (Llama, Qwen3, DeepSeek, Gemma, GPT-NeoX).
    pub attention_bias: Option<bool>,
    /// Llama: bias on the MLP projections.
    pub mlp_bias: Option<bool>,
    /// GPT-NeoX: attention and MLP both read the block input (default true).
    pub use_parallel_residual: Option<bool>,
    /// Gemma 2: tanh soft-capping of the attention scores.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: tanh soft-capping of the output logits.
    pub final_logit_softcapping: Option<f64>,
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

/// A decoder family whose block is modelled, named as its Hugging Face `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    /// DeepSeek-MoE (v1): Llama attention, shared and routed experts; no latent attention.
    Deepseek,
    Gemma,
    Gemma2,
    /// The text model of Gemma 3 (`Gemma3ForCausalLM`, e.g. gemma-3-1b).
    Gemma3Text,
    Phi3,
    GptNeox,
}

/// `model_type`, the accepted `architectures` entry, and the family.
const FAMILIES: &[(&str, &str, Family)] = &[
    ("llama", "LlamaForCausalLM", Family::Llama),
    ("mistral", "MistralForCausalLM", Family::Mistral),
    ("qwen2", "Qwen2ForCausalLM", Family::Qwen2),
    ("qwen3", "Qwen3ForCausalLM", Family::Qwen3),
    ("mixtral", "MixtralForCausalLM", Family::Mixtral),
    ("qwen2_moe", "Qwen2MoeForCausalLM", Family::Qwen2Moe),
    ("qwen3_moe", "Qwen3MoeForCausalLM", Family::Qwen3Moe),
    ("deepseek", "DeepseekForCausalLM", Family::Deepseek),
    ("gemma", "GemmaForCausalLM", Family::Gemma),
    ("gemma2", "Gemma2ForCausalLM", Family::Gemma2),
    ("gemma3_text", "Gemma3ForCausalLM", Family::Gemma3Text),
    ("phi3", "Phi3ForCausalLM", Family::Phi3),
    ("gpt_neox", "GPTNeoXForCausalLM", Family::GptNeox),
];

impl Family {
    /// Every family, in the order of the supported-families table.
    pub const ALL: [Family; 13] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Mixtral,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
        Family::Deepseek,
        Family::Gemma,
        Family::Gemma2,
        Family::Gemma3Text,
        Family::Phi3,
        Family::GptNeox,
    ];

    /// The Hugging Face `model_type`.
    pub fn model_type(self) -> &'static str {
        FAMILIES
            .iter()
            .find(|(_, _, f)| *f == self)
            .map_or("", |(t, _, _)| t)
    }

    fn is_moe(self) -> bool {
        matches!(
            self,
            Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe | Family::Deepseek
        )
    }

    fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma | Family::Gemma2 | Family::Gemma3Text)
    }
}

fn supported_families() -> String {
    FAMILIES
        .iter()
        .map(|(t, a, _)| format!("{t} ({a})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The normalisation layer of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// RMSNorm, `weight * x_normed.to(dtype)` (Llama, Qwen, Mistral, Phi-3): one weight.
    Rms,
    /// Gemma's RMSNorm, `(x_normed * (1 + weight.float())).type_as(x)`: one weight, the
    /// multiply in fp32.
    RmsOnePlus,
    /// `nn.LayerNorm` with weight and bias (GPT-NeoX).
    LayerNorm,
}

/// The feed-forward network of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// `down(act(gate(x)) * up(x))`: SwiGLU (silu) or GeGLU (gelu-tanh), three matrices.
    Gated,
    /// `fc2(act(fc1(x)))`: two matrices (GPT-NeoX, GELU).
    Plain,
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
    /// Layer `i` (0-based) is MoE when `i >= first_dense` and `i % every == phase`: DeepSeek
    /// (`moe_layer_freq`, phase 0) and Qwen-MoE (`decoder_sparse_step`, 1-based index, so
    /// phase `every - 1`). Mixtral: every 1.
    pub every: u64,
    pub phase: u64,
}

/// The plain model description the estimator uses: a decoder of one of the [`Family`]s
/// (rotary attention with grouped-query heads; the block's norms, MLP and fusions as below).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelSpec {
    pub name: String,
    pub family: Family,
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
    /// RMSNorm on each query and key head (Qwen3, Gemma 3): two head_dim weights per layer.
    pub qk_norm: bool,
    pub norm: NormKind,
    pub mlp: MlpKind,
    /// Norms per block: 2 (before attention, before the MLP), or 4 (Gemma 2 and 3: also
    /// after attention and after the MLP, before each residual add).
    pub norms_per_block: u64,
    /// Attention and MLP both read the block input through their own norms and add to it
    /// (GPT-NeoX `use_parallel_residual`).
    pub parallel_residual: bool,
    /// q, k and v are one `(q + 2 kv) x hidden` linear (Phi-3 `qkv_proj`, GPT-NeoX
    /// `query_key_value`).
    pub fused_qkv: bool,
    /// Gate and up are one `2f x hidden` linear (Phi-3 `gate_up_proj`).
    pub fused_gate_up: bool,
    /// Attention scores are soft-capped with tanh (Gemma 2): Hugging Face's eager path.
    pub attn_softcap: bool,
    /// Output logits are soft-capped with tanh (Gemma 2).
    pub final_logit_softcap: bool,
    pub moe: Option<MoeSpec>,
}

/// One parameter tensor of a block: rows (dim 0, the dimension FSDP shards) x cols.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParamShape {
    pub rows: u64,
    pub cols: u64,
}

impl ParamShape {
    /// Elements; at most [`MAX_TENSOR_NUMEL`] for every shape of an accepted model.
    pub const fn numel(self) -> u64 {
        self.rows * self.cols
    }
}

/// The parameter tensors of a module, in a fixed-capacity list (no heap allocation: the
/// estimator walks it on every call).
#[derive(Clone, Copy, Debug, Default)]
pub struct ParamList {
    items: [ParamShape; ParamList::CAPACITY],
    len: usize,
}

impl ParamList {
    /// The most tensors one list holds. The largest block any accepted config produces has
    /// 17 (a Qwen2-MoE or DeepSeek block with attention biases, q/k norms and a gated shared
    /// expert; Gemma 3 with attention biases); `every_accepted_block_fits_the_param_list`
    /// builds every family with every optional tensor switched on and checks it.
    pub const CAPACITY: usize = 24;

    /// Appends a parameter. Panics past [`ParamList::CAPACITY`], which no accepted model
    /// reaches (see above).
    pub fn push(&mut self, p: ParamShape) {
        assert!(
            self.len < Self::CAPACITY,
            "ParamList holds at most {} tensors",
            Self::CAPACITY
        );
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

/// The family a config names through `model_type` and `architectures`.
fn family_of(cfg: &ModelConfig, name: &str) -> Result<Family> {
    let from_type = match cfg.model_type.as_deref() {
        None => None,
        Some(t) => match FAMILIES.iter().find(|(mt, _, _)| *mt == t) {
            Some((_, _, f)) => Some(*f),
            None => {
                let hint = match t {
                    "deepseek_v2" | "deepseek_v3" => {
                        " (multi-head latent attention is not modelled)"
                    }
                    "gemma3" => " (a multimodal Gemma 3 config: pass a gemma3_text config)",
                    _ => "",
                };
                return Err(Error::invalid(
                    &format!("model {name}: model_type"),
                    format!("{t:?}{hint}"),
                    format!("one of the modelled families: {}", supported_families()),
                ));
            }
        },
    };
    let mut from_arch = None;
    for a in cfg.architectures.iter().flatten() {
        match FAMILIES.iter().find(|(_, arch, _)| arch == a) {
            Some((_, _, f)) if from_arch.is_none_or(|g| g == *f) => from_arch = Some(*f),
            Some(_) => {
                return Err(Error::invalid(
                    &format!("model {name}: architectures"),
                    format!("{:?}", cfg.architectures.as_deref().unwrap_or_default()),
                    "classes of one family",
                ))
            }
            None => {
                return Err(Error::invalid(
                    &format!("model {name}: model_type"),
                    format!("architectures {a:?}"),
                    format!("one of the modelled families: {}", supported_families()),
                ))
            }
        }
    }
    match (from_type, from_arch) {
        (Some(t), Some(a)) if t != a => Err(Error::invalid(
            &format!("model {name}: architectures"),
            format!("{:?}", cfg.architectures.as_deref().unwrap_or_default()),
            format!("classes of model_type {:?}", t.model_type()),
        )),
        (Some(f), _) | (None, Some(f)) => Ok(f),
        (None, None) => Err(Error::input(format!(
            "model {name}: missing model_type (and architectures): the decoder family must be \
             named, e.g. \"model_type\": \"llama\"; modelled families: {}",
            supported_families()
        ))),
    }
}

impl ModelConfig {
    /// Checks every field and yields the spec. `name` labels the model in output.
    pub fn into_spec(self, name: &str) -> Result<ModelSpec> {
        let key = |k: &str| format!("model {name}: {k}");
        let bounded = |v: u64, k: &str, min: u64| -> Result<u64> {
            if (min..=MAX_FIELD).contains(&v) {
                Ok(v)
            } else {
                Err(Error::invalid(
                    &key(k),
                    v,
                    format!("an integer from {min} to 2^32"),
                ))
            }
        };
        let field = |v: Option<u64>, k: &str| -> Result<u64> {
            match v {
                None => Err(Error::input(format!(
                    "model {name}: missing {k} (a positive integer, as in Hugging Face config.json)"
                ))),
                Some(n) => bounded(n, k, 1),
            }
        };
        let product = |a: u64, b: u64, k: &str| -> Result<u64> {
            a.checked_mul(b)
                .filter(|&p| p <= MAX_TENSOR_NUMEL)
                .ok_or_else(|| {
                    Error::invalid(
                        &key(k),
                        format!("{a} x {b}"),
                        "a product of at most 2^40 elements",
                    )
                })
        };
        if self.kv_lora_rank.is_some() {
            return Err(Error::input(format!(
                "model {name}: multi-head latent attention (kv_lora_rank) is not modelled; \
                 Llama-family attention with grouped KV heads is"
            )));
        }
        let family = family_of(&self, name)?;
        let hidden = field(self.hidden_size, "hidden_size")?;
        let layers = field(self.num_hidden_layers, "num_hidden_layers")?;
        let heads = field(self.num_attention_heads, "num_attention_heads")?;
        let kv_heads = field(
            self.num_key_value_heads.or(self.num_attention_heads),
            "num_key_value_heads",
        )?;
        let intermediate = field(self.intermediate_size, "intermediate_size")?;
        let vocab = field(self.vocab_size, "vocab_size")?;
        let max_seq_len = match self.max_position_embeddings {
            Some(n) => bounded(n, "max_position_embeddings", 1)?,
            None => u64::MAX,
        };
        if heads % kv_heads != 0 {
            return Err(Error::invalid(
                &key("num_key_value_heads"),
                kv_heads,
                format!("a divisor of num_attention_heads ({heads})"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => bounded(d, "head_dim", 1)?,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(Error::invalid(
                    &key("num_attention_heads"),
                    heads,
                    format!("a divisor of hidden_size ({hidden}) or an explicit head_dim"),
                ))
            }
        };
        let q_dim = product(heads, head_dim, "num_attention_heads x head_dim")?;
        product(
            hidden,
            q_dim,
            "hidden_size x num_attention_heads x head_dim",
        )?;
        product(hidden, vocab, "hidden_size x vocab_size")?;
        product(hidden, intermediate, "hidden_size x intermediate_size")?;
        let softcap = |v: Option<f64>, k: &str| -> Result<bool> {
            match v {
                None => Ok(false),
                Some(c) if c.is_finite() && c > 0.0 => Ok(true),
                Some(c) => Err(Error::invalid(&key(k), c, "a positive number, or null")),
            }
        };
        let attn_softcap = softcap(self.attn_logit_softcapping, "attn_logit_softcapping")?;
        let final_logit_softcap = softcap(self.final_logit_softcapping, "final_logit_softcapping")?;
        // Gemma 2 and 3 apply these caps when set (Gemma 3's default is null); the other
        // families' Hugging Face code ignores the keys, and so does this.
        let softcaps = matches!(family, Family::Gemma2 | Family::Gemma3Text);
        let moe = if family.is_moe() {
            self.moe_spec(family, name, hidden, layers, intermediate)?
        } else {
            None
        };

        // Biases as each family's Hugging Face modelling code builds them: Qwen2 hard-codes
        // one on q, k and v (not o) without a config key; Mistral, Mixtral and Phi-3 have
        // none; GPT-NeoX's `attention_bias` defaults to true and its MLP always has biases.
        let ab = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match family {
            Family::Llama => (ab, ab, self.mlp_bias.unwrap_or(false)),
            Family::Mistral | Family::Mixtral | Family::Phi3 => (false, false, false),
            Family::Qwen2 | Family::Qwen2Moe => (true, false, false),
            Family::Qwen3
            | Family::Qwen3Moe
            | Family::Deepseek
            | Family::Gemma
            | Family::Gemma2
            | Family::Gemma3Text => (ab, ab, false),
            Family::GptNeox => {
                let ab = self.attention_bias.unwrap_or(true);
                (ab, ab, true)
            }
        };
        let parallel_residual =
            family == Family::GptNeox && self.use_parallel_residual.unwrap_or(true);
        let spec = ModelSpec {
            name: name.to_string(),
            family,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            vocab,
            // Gemma's configs default to tied embeddings; the others to untied.
            tied_embeddings: self.tie_word_embeddings.unwrap_or(family.is_gemma()),
            max_seq_len,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: matches!(
                family,
                Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3Text
            ),
            norm: match family {
                Family::GptNeox => NormKind::LayerNorm,
                f if f.is_gemma() => NormKind::RmsOnePlus,
                _ => NormKind::Rms,
            },
            mlp: match family {
                Family::GptNeox => MlpKind::Plain,
                _ => MlpKind::Gated,
            },
            norms_per_block: match family {
                Family::Gemma2 | Family::Gemma3Text => 4,
                _ => 2,
            },
            parallel_residual,
            fused_qkv: matches!(family, Family::Phi3 | Family::GptNeox),
            fused_gate_up: family == Family::Phi3,
            attn_softcap: attn_softcap && softcaps,
            final_logit_softcap: final_logit_softcap && softcaps,
            moe,
        };
        spec.check_sizes()?;
        Ok(spec)
    }

    /// The MoE layout of an MoE family, with every key bounded; `None` for a DeepSeek config
    /// without routed experts (all layers dense, as in Hugging Face).
    fn moe_spec(
        &self,
        family: Family,
        name: &str,
        hidden: u64,
        layers: u64,
        intermediate: u64,
    ) -> Result<Option<MoeSpec>> {
        let key = |k: &str| format!("model {name}: {k}");
        let field = |v: Option<u64>, k: &str, min: u64| -> Result<Option<u64>> {
            match v {
                Some(n) if !(min..=MAX_FIELD).contains(&n) => Err(Error::invalid(
                    &key(k),
                    n,
                    format!("an integer from {min} to 2^32"),
                )),
                v => Ok(v),
            }
        };
        let required = |v: Option<u64>, k: &str| -> Result<u64> {
            field(v, k, 1)?.ok_or_else(|| {
                Error::input(format!(
                    "model {name}: missing {k} (a positive integer, as in Hugging Face config.json)"
                ))
            })
        };
        let (experts_key, experts) = match family {
            Family::Mixtral => ("num_local_experts", self.num_local_experts),
            Family::Qwen2Moe | Family::Qwen3Moe => ("num_experts", self.num_experts),
            _ => ("n_routed_experts", self.n_routed_experts),
        };
        let experts = match (family, experts) {
            (Family::Deepseek, None) => return Ok(None),
            (_, v) => required(v, experts_key)?,
        };
        let top_k = required(self.num_experts_per_tok, "num_experts_per_tok")?;
        if top_k > experts {
            return Err(Error::invalid(
                &key("num_experts_per_tok"),
                top_k,
                format!("at most the number of experts ({experts})"),
            ));
        }
        let expert_intermediate = match family {
            Family::Mixtral => intermediate,
            _ => required(self.moe_intermediate_size, "moe_intermediate_size")?,
        };
        let grouped = experts
            .checked_mul(hidden)
            .and_then(|n| n.checked_mul(expert_intermediate))
            .filter(|&n| n <= MAX_TENSOR_NUMEL);
        if grouped.is_none() {
            return Err(Error::invalid(
                &key(&format!(
                    "{experts_key} x hidden_size x moe_intermediate_size"
                )),
                format!("{experts} x {hidden} x {expert_intermediate}"),
                "a grouped expert tensor of at most 2^40 elements",
            ));
        }
        let (shared_intermediate, shared_gate) = match family {
            Family::Qwen2Moe => match field(
                self.shared_expert_intermediate_size,
                "shared_expert_intermediate_size",
                0,
            )? {
                Some(s) if s > 0 => (s, true),
                _ => (0, false),
            },
            Family::Deepseek => {
                let n = field(self.n_shared_experts, "n_shared_experts", 0)?.unwrap_or(0);
                let s = n
                    .checked_mul(expert_intermediate)
                    .filter(|&s| s <= MAX_FIELD)
                    .ok_or_else(|| {
                        Error::invalid(
                            &key("n_shared_experts"),
                            n,
                            format!(
                                "at most 2^32 / moe_intermediate_size ({})",
                                MAX_FIELD / expert_intermediate
                            ),
                        )
                    })?;
                (s, false)
            }
            _ => (0, false),
        };
        let (first_dense, every, phase) = match family {
            Family::Mixtral => (0, 1, 0),
            Family::Qwen2Moe | Family::Qwen3Moe => {
                if self.mlp_only_layers.as_ref().is_some_and(|v| !v.is_empty()) {
                    return Err(Error::input(format!(
                        "model {name}: mlp_only_layers (an irregular dense/MoE pattern) is not modelled"
                    )));
                }
                let every = field(self.decoder_sparse_step, "decoder_sparse_step", 1)?.unwrap_or(1);
                (0, every, every - 1)
            }
            _ => {
                let first =
                    field(self.first_k_dense_replace, "first_k_dense_replace", 0)?.unwrap_or(0);
                if first > layers {
                    return Err(Error::invalid(
                        &key("first_k_dense_replace"),
                        first,
                        format!("at most num_hidden_layers ({layers})"),
                    ));
                }
                let every = field(self.moe_layer_freq, "moe_layer_freq", 1)?.unwrap_or(1);
                (first, every, 0)
            }
        };
        Ok(Some(MoeSpec {
            experts,
            top_k,
            expert_intermediate,
            shared_intermediate,
            shared_gate,
            first_dense,
            every,
            phase,
        }))
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
    /// The MLP's weights in units of hidden x intermediate: 3 gated (a fused gate_up counts
    /// as two), 2 plain.
    pub fn mlp_matrices(&self) -> u64 {
        match self.mlp {
            MlpKind::Gated => 3,
            MlpKind::Plain => 2,
        }
    }
    /// Whether the block is torchtitan's Llama block as [`ModelSpec::block_params`] lays it
    /// out for Llama, Mistral, Qwen2 and their MoE variants (no q/k norms, fusions, extra or
    /// LayerNorm norms): what a consumer that knows only that block (the trainer) can run.
    pub fn is_llama_block(&self) -> bool {
        self.norm == NormKind::Rms
            && self.mlp == MlpKind::Gated
            && self.norms_per_block == 2
            && !self.parallel_residual
            && !self.fused_qkv
            && !self.fused_gate_up
            && !self.qk_norm
            && !self.attn_softcap
            && !self.final_logit_softcap
    }

    /// A norm's tensors: its weight, and its bias for a LayerNorm.
    fn push_norm(&self, v: &mut ParamList) {
        v.push(ParamShape {
            rows: self.hidden,
            cols: 1,
        });
        if self.norm == NormKind::LayerNorm {
            v.push(ParamShape {
                rows: self.hidden,
                cols: 1,
            });
        }
    }

    /// A linear layer's weight (rows x cols) and its bias (rows x 1) when `bias`.
    fn push_linear(v: &mut ParamList, rows: u64, cols: u64, bias: bool) {
        v.push(ParamShape { rows, cols });
        if bias {
            v.push(ParamShape { rows, cols: 1 });
        }
    }

    /// The parameter tensors of one decoder block, in the order the block uses them, as
    /// (rows, cols) with rows the output features (PyTorch's `nn.Linear.weight` layout, which
    /// is the dimension FSDP2 shards). Biases and norm weights are `rows x 1`. Fused
    /// projections are one tensor of their fused shape (`(q + 2 kv) x h`, `2f x h`), since
    /// FSDP shards and pads the fused dim 0.
    pub fn block_params(&self) -> ParamList {
        let mut v = self.attention_params();
        let (h, f) = (self.hidden, self.intermediate);
        match (self.mlp, self.fused_gate_up) {
            (MlpKind::Gated, false) => {
                for (rows, cols) in [(f, h), (f, h), (h, f)] {
                    Self::push_linear(&mut v, rows, cols, self.mlp_bias);
                }
            }
            (MlpKind::Gated, true) => {
                Self::push_linear(&mut v, 2 * f, h, self.mlp_bias);
                Self::push_linear(&mut v, h, f, self.mlp_bias);
            }
            (MlpKind::Plain, _) => {
                Self::push_linear(&mut v, f, h, self.mlp_bias);
                Self::push_linear(&mut v, h, f, self.mlp_bias);
            }
        }
        if self.norms_per_block == 4 {
            self.push_norm(&mut v); // post_feedforward_layernorm
        }
        v
    }

    /// Norms and attention of a block, and the norm before the feed-forward (what dense and
    /// MoE blocks share).
    fn attention_params(&self) -> ParamList {
        let (h, q, kv) = (self.hidden, self.q_dim(), self.kv_dim());
        let mut v = ParamList::default();
        self.push_norm(&mut v); // input_layernorm
        if self.parallel_residual {
            self.push_norm(&mut v); // post_attention_layernorm, also on the block input
        }
        if self.fused_qkv {
            Self::push_linear(&mut v, q + 2 * kv, h, self.qkv_bias);
        } else {
            for rows in [q, kv, kv] {
                Self::push_linear(&mut v, rows, h, self.qkv_bias);
            }
        }
        if self.qk_norm {
            for _ in 0..2 {
                v.push(ParamShape {
                    rows: self.head_dim,
                    cols: 1,
                });
            }
        }
        Self::push_linear(&mut v, h, q, self.o_bias); // o_proj
        if self.norms_per_block == 4 {
            self.push_norm(&mut v); // post_attention_layernorm (Gemma: after attention)
        }
        if !self.parallel_residual {
            self.push_norm(&mut v); // the norm before the feed-forward
        }
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
        if self.norms_per_block == 4 {
            self.push_norm(&mut v);
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
        self.moe_layers_in(0, self.layers)
    }

    /// Number of MoE layers among layers `start..end` (0-based), in closed form.
    pub fn moe_layers_in(&self, start: u64, end: u64) -> u64 {
        let Some(m) = self.moe else { return 0 };
        // Layers i < n with i % every == phase: ceil((n - phase) / every) for n > phase.
        let below = |n: u64| (n + m.every - 1 - m.phase) / m.every;
        let start = start.max(m.first_dense);
        if end <= start {
            0
        } else {
            below(end) - below(start)
        }
    }

    /// Whether decoder layer `i` (0-based) is an MoE layer.
    pub fn is_moe_layer(&self, i: u64) -> bool {
        self.moe
            .is_some_and(|m| i >= m.first_dense && i % m.every == m.phase)
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

    /// Parameters outside the blocks: token embedding, final norm, the output projection
    /// unless it is tied to the embedding, and the final norm's bias for a LayerNorm (last,
    /// so that the first three keep their places).
    pub fn root_params(&self) -> ParamList {
        let (v_, h) = (self.vocab, self.hidden);
        let mut v = ParamList::default();
        v.push(ParamShape { rows: v_, cols: h }); // tok_embeddings
        v.push(ParamShape { rows: h, cols: 1 }); // final norm
        if !self.tied_embeddings {
            v.push(ParamShape { rows: v_, cols: h });
        }
        if self.norm == NormKind::LayerNorm {
            v.push(ParamShape { rows: h, cols: 1 }); // final norm bias
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

    /// Checks that every tensor has at most [`MAX_TENSOR_NUMEL`] elements and the model at
    /// most [`MAX_PARAMS`] parameters, in checked arithmetic, so that the unchecked counts
    /// above cannot wrap for an accepted spec.
    fn check_sizes(&self) -> Result<()> {
        let too_big = |what: &str, got: String, accepted: &str| {
            Error::invalid(&format!("model {}: {what}", self.name), got, accepted)
        };
        let sum = |list: &ParamList, what: &str| -> Result<u64> {
            list.iter().try_fold(0u64, |acc, p| {
                let n = p
                    .rows
                    .checked_mul(p.cols)
                    .filter(|&n| n <= MAX_TENSOR_NUMEL)
                    .ok_or_else(|| {
                        too_big(
                            what,
                            format!("a {} x {} tensor", p.rows, p.cols),
                            "tensors of at most 2^40 elements",
                        )
                    })?;
                acc.checked_add(n)
                    .ok_or_else(|| too_big(what, "more than 2^64".into(), "at most 2^50"))
            })
        };
        let dense = sum(&self.block_params(), "hidden_size")?;
        let moe = match self.moe_block_params() {
            Some((list, experts)) => {
                let mut n = sum(&list, "hidden_size")?;
                for e in experts {
                    n = n
                        .checked_add(e.rows * e.cols)
                        .ok_or_else(|| Error::overflow("expert parameters"))?;
                }
                n
            }
            None => 0,
        };
        let root = sum(&self.root_params(), "vocab_size")?;
        let moe_layers = self.moe_layers();
        let total = (self.layers - moe_layers)
            .checked_mul(dense)
            .and_then(|d| moe_layers.checked_mul(moe).and_then(|m| d.checked_add(m)))
            .and_then(|b| b.checked_add(root))
            .filter(|&t| t <= MAX_PARAMS);
        match total {
            Some(_) => Ok(()),
            None => Err(too_big(
                "num_hidden_layers",
                format!("{} layers of {} parameters", self.layers, dense.max(moe)),
                "a model of at most 2^50 parameters",
            )),
        }
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
    /// The cuBLAS workspace of one handle, allocated through the caching allocator, so
    /// counted in allocated bytes. A training step has two (see the estimator's
    /// `Quantities::workspace`).
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

impl GpuSpec {
    /// Checks every field: memory positive and at most [`MAX_GPU_BYTES`], overhead and
    /// workspace at most the memory, rates finite and positive (a zero or negative rate
    /// would rank every plan as NaN), a name.
    pub fn validate(&self) -> Result<()> {
        let label = if self.name.is_empty() {
            "?"
        } else {
            &self.name
        };
        let key = |k: &str| format!("gpu profile {label}: {k}");
        if self.name.trim().is_empty() {
            return Err(Error::invalid(
                &key("name"),
                format!("{:?}", self.name),
                "a non-empty name",
            ));
        }
        let mem = self.memory_bytes.get();
        if mem == 0 || mem > MAX_GPU_BYTES {
            return Err(Error::invalid(
                &key("memory_bytes"),
                mem,
                "a byte count from 1 to 2^50",
            ));
        }
        for (k, b) in [
            ("runtime_overhead_bytes", self.runtime_overhead_bytes),
            ("workspace_bytes", self.workspace_bytes),
        ] {
            if b.get() > mem {
                return Err(Error::invalid(
                    &key(k),
                    b.get(),
                    format!("at most memory_bytes ({mem})"),
                ));
            }
        }
        for (k, r) in [
            ("bf16_tflops", self.bf16_tflops),
            ("hbm_gbps", self.hbm_gbps),
            ("host_link_gbps", self.host_link_gbps),
            ("intra_node_gbps", self.intra_node_gbps),
        ] {
            if !(r.is_finite() && r > 0.0) {
                return Err(Error::invalid(&key(k), r, "a finite positive number"));
            }
        }
        Ok(())
    }
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
    "tiny", "tiny-gqa", "tiny-tied", "tiny-moe", "tiny-deep", "small", "small-gqa",
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

/// A model by shipped name, or by path to a Hugging Face `config.json` or to a directory
/// holding one (a downloaded model's folder).
pub fn model(name_or_path: &str) -> Result<ModelSpec> {
    if let Some((name, text)) = MODELS.iter().find(|(n, _)| *n == name_or_path) {
        let cfg: ModelConfig = parse_json(&format!("model profile {name}"), text)?;
        return cfg.into_spec(name);
    }
    let given = Path::new(name_or_path);
    let (path, name) = if given.is_dir() {
        let name = given
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| name_or_path.to_string());
        (given.join("config.json"), name)
    } else if given.is_file() {
        let name = given
            .parent()
            .and_then(|p| p.file_name())
            .filter(|_| given.file_name().is_some_and(|f| f == "config.json"))
            .or_else(|| given.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| name_or_path.to_string());
        (given.to_path_buf(), name)
    } else {
        return Err(Error::invalid(
            "model",
            format!("{name_or_path:?}"),
            format!(
                "a path to a config.json (or a directory holding one) or one of: {}",
                names(MODELS)
            ),
        ));
    };
    let text = crate::input::read_text(&path, "model config")?;
    let cfg: ModelConfig = parse_json(&format!("model config {}", path.display()), &text)?;
    cfg.into_spec(&name)
}

/// A GPU by shipped name, or by path to a GPU profile JSON; every field is checked
/// ([`GpuSpec::validate`]).
pub fn gpu(name_or_path: &str) -> Result<GpuSpec> {
    let spec: GpuSpec = if let Some((name, text)) = GPUS.iter().find(|(n, _)| *n == name_or_path) {
        parse_json(&format!("gpu profile {name}"), text)?
    } else {
        let path = Path::new(name_or_path);
        if !path.is_file() {
            return Err(Error::invalid(
                "gpu",
                format!("{name_or_path:?}"),
                format!("a path to a GPU profile JSON or one of: {}", names(GPUS)),
            ));
        }
        let text = crate::input::read_text(path, "gpu profile")?;
        parse_json(&format!("gpu profile {}", path.display()), &text)?
    };
    spec.validate()?;
    Ok(spec)
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

    fn spec(json: &str) -> Result<ModelSpec> {
        serde_json::from_str::<ModelConfig>(json)
            .unwrap()
            .into_spec("m")
    }

    const DIMS: &str = r#""hidden_size":64,"num_hidden_layers":4,"num_attention_heads":4,
        "num_key_value_heads":2,"intermediate_size":128,"vocab_size":256"#;

    #[test]
    fn every_accepted_block_fits_the_param_list() {
        // Every family with every switch that adds a tensor, in every combination: biases,
        // tied or untied, shared experts (both spellings), parallel residual on and off.
        let mut largest = 0;
        for (model_type, _, family) in FAMILIES {
            for bits in 0..64u32 {
                let on = |b: u32| bits & (1 << b) != 0;
                let json = format!(
                    r#"{{"model_type":"{model_type}",{DIMS},"attention_bias":{},"mlp_bias":{},
                    "tie_word_embeddings":{},"use_parallel_residual":{},
                    "num_local_experts":4,"num_experts":4,"n_routed_experts":4,
                    "num_experts_per_tok":2,"moe_intermediate_size":32,
                    "shared_expert_intermediate_size":{},"n_shared_experts":{},
                    "first_k_dense_replace":1,"attn_logit_softcapping":50.0}}"#,
                    on(0),
                    on(1),
                    on(2),
                    on(3),
                    if on(4) { 64 } else { 0 },
                    if on(5) { 2 } else { 0 },
                );
                let m = spec(&json).unwrap();
                assert_eq!(m.family, *family);
                let moe = m.moe_block_params().map_or(0, |(v, _)| v.len());
                for n in [m.block_params().len(), moe, m.root_params().len()] {
                    assert!(n <= ParamList::CAPACITY, "{model_type}: {n}");
                    largest = largest.max(n);
                }
            }
        }
        assert_eq!(largest, 17, "update ParamList::CAPACITY's comment");
    }

    #[test]
    fn qwen3_with_every_bias_counts_what_hugging_face_builds() {
        // The config that used to overflow the list: Qwen3 honours attention_bias (q, k, v,
        // o) but its MLP has no bias whatever mlp_bias says.
        let m = spec(&format!(
            r#"{{"model_type":"qwen3",{DIMS},"attention_bias":true,"mlp_bias":true}}"#
        ))
        .unwrap();
        let (h, q, kv, f) = (64, 64, 32, 128);
        let by_hand = 2 * h + (q + 2 * kv) * (h + 1) + h * (q + 1) + 2 * 16 + 3 * f * h;
        assert_eq!(m.block_param_count(), by_hand);
        let moe = spec(&format!(
            r#"{{"model_type":"qwen3_moe",{DIMS},"attention_bias":true,"num_experts":4,
                "num_experts_per_tok":2,"moe_intermediate_size":32,
                "shared_expert_intermediate_size":64}}"#
        ))
        .unwrap();
        // Qwen3-MoE has no shared expert in Hugging Face: the key is ignored.
        assert_eq!(moe.moe.unwrap().shared_intermediate, 0);
    }

    #[test]
    fn products_that_would_wrap_are_refused_naming_the_keys() {
        let big = 1u64 << 32;
        let e = spec(&format!(
            r#"{{"model_type":"llama","hidden_size":{big},"num_hidden_layers":1,
                "num_attention_heads":{big},"num_key_value_heads":{big},"head_dim":{big},
                "intermediate_size":1,"vocab_size":1}}"#
        ))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("model m: num_attention_heads x head_dim"),
            "{e}"
        );
        let e = spec(
            r#"{"model_type":"llama","hidden_size":1048576,"num_hidden_layers":1,
                "num_attention_heads":1,"intermediate_size":1,"vocab_size":4194304}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("hidden_size x vocab_size"), "{e}");
        // 2^20 layers of a 2^31-parameter block: 2^51 parameters.
        let e = spec(
            r#"{"model_type":"llama","hidden_size":16384,"num_hidden_layers":1048576,
                "num_attention_heads":128,"intermediate_size":65536,"vocab_size":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("model m: num_hidden_layers"), "{e}");
    }

    #[test]
    fn expert_keys_are_bounded() {
        let moe = |extra: &str| {
            let experts = if extra.contains("n_routed_experts") {
                ""
            } else {
                r#""n_routed_experts":4,"#
            };
            spec(&format!(
                r#"{{"model_type":"deepseek",{DIMS},{experts}
                    "num_experts_per_tok":2,"moe_intermediate_size":32{extra}}}"#
            ))
        };
        assert_eq!(moe("").unwrap().moe.unwrap().shared_intermediate, 0);
        assert_eq!(
            moe(r#","n_shared_experts":2"#)
                .unwrap()
                .moe
                .unwrap()
                .shared_intermediate,
            64
        );
        for (extra, key) in [
            (
                r#","n_shared_experts":18014398509481986"#,
                "n_shared_experts",
            ),
            (r#","n_shared_experts":134217729"#, "n_shared_experts"),
            (r#","first_k_dense_replace":5"#, "first_k_dense_replace"),
            (r#","moe_layer_freq":0"#, "moe_layer_freq"),
            (r#","moe_layer_freq":4294967297"#, "moe_layer_freq"),
            (r#","n_routed_experts":4294967297"#, "n_routed_experts"),
        ] {
            let e = moe(extra).unwrap_err().to_string();
            assert!(e.contains(&format!("model m: {key}")), "{extra}: {e}");
        }
        let e = spec(&format!(
            r#"{{"model_type":"qwen2_moe",{DIMS},"num_experts":4,"num_experts_per_tok":2,
                "moe_intermediate_size":32,"decoder_sparse_step":0}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("decoder_sparse_step"), "{e}");
        let e = spec(&format!(
            r#"{{"model_type":"mixtral",{DIMS},"num_local_experts":4294967296,
                "num_experts_per_tok":2}}"#
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("num_local_experts x hidden_size"),
            "{e}"
        );
    }

    #[test]
    fn moe_layers_in_closed_form_agree_with_the_layer_rule() {
        for (first, every, phase) in [(0, 1, 0), (1, 1, 0), (0, 2, 1), (3, 2, 0), (2, 3, 0)] {
            let mut m = model("deepseek-moe-16b").unwrap();
            m.layers = 11;
            let mut moe = m.moe.unwrap();
            (moe.first_dense, moe.every, moe.phase) = (first, every, phase);
            m.moe = Some(moe);
            for a in 0..=11 {
                for b in a..=11 {
                    let by_rule = (a..b).filter(|&i| m.is_moe_layer(i)).count() as u64;
                    assert_eq!(m.moe_layers_in(a, b), by_rule, "{first} {every} {a}..{b}");
                }
            }
        }
    }

    #[test]
    fn zero_max_position_embeddings_is_blamed_on_the_model() {
        let e = spec(&format!(
            r#"{{"model_type":"llama",{DIMS},"max_position_embeddings":0}}"#
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("model m: max_position_embeddings"),
            "{e}"
        );
    }

    #[test]
    fn families_must_be_named_and_agree() {
        let e = spec(&format!("{{{DIMS}}}")).unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains("gpt_neox"), "{e}");
        let e = spec(&format!(r#"{{"model_type":"bert",{DIMS}}}"#))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model m: model_type") && e.contains("llama"),
            "{e}"
        );
        let e = spec(&format!(
            r#"{{"model_type":"llama","architectures":["GPTNeoXForCausalLM"],{DIMS}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("architectures"), "{e}");
        let by_arch = spec(&format!(
            r#"{{"architectures":["MistralForCausalLM"],{DIMS}}}"#
        ));
        assert_eq!(by_arch.unwrap().family, Family::Mistral);
        let e = spec(&format!(
            r#"{{"architectures":["T5ForConditionalGeneration"],{DIMS}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("model_type"), "{e}");
    }

    #[test]
    fn every_shipped_profile_names_its_family_and_is_a_llama_block() {
        for (name, text) in MODELS {
            let cfg: ModelConfig = serde_json::from_str(text).unwrap();
            assert!(cfg.model_type.is_some(), "{name}");
            assert!(model(name).unwrap().is_llama_block(), "{name}");
        }
    }

    fn gpu_json(field: &str, value: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(GPUS[5].1).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    #[test]
    fn gpu_fields_are_validated() {
        for (field, value) in [
            ("memory_bytes", "0"),
            ("memory_bytes", "1125899906842625"),
            ("runtime_overhead_bytes", "18446744073709551615"),
            ("workspace_bytes", "85520809985"),
            ("bf16_tflops", "0"),
            ("hbm_gbps", "-1"),
            ("host_link_gbps", "0.0"),
            ("intra_node_gbps", "-0.5"),
            ("name", "\"\""),
        ] {
            let g: GpuSpec = serde_json::from_str(&gpu_json(field, value)).unwrap();
            let e = g.validate().unwrap_err().to_string();
            assert!(e.contains(&format!(": {field}")), "{field}: {e}");
        }
        let g: GpuSpec = serde_json::from_str(&gpu_json("memory_bytes", "1")).unwrap();
        assert!(g
            .validate()
            .unwrap_err()
            .to_string()
            .contains("gpu profile h100-80g"));
    }

    #[test]
    fn gpu_files_are_read_and_validated() {
        let dir = std::env::temp_dir().join(format!("memplan-gpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gpu.json");
        std::fs::write(&path, format!("\u{feff}{}", GPUS[5].1)).unwrap();
        assert_eq!(gpu(path.to_str().unwrap()).unwrap().name, "h100-80g");
        std::fs::write(&path, gpu_json("hbm_gbps", "0")).unwrap();
        let e = gpu(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("gpu profile h100-80g: hbm_gbps"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
