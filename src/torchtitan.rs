//! torchtitan job configs (TOML, and torchtitan 0.3's saved JSON) as plan input:
//! `memplan estimate --torchtitan train.toml`.
//!
//! A torchtitan user already has the file that says what to train; this module reads it into a
//! [`Job`]: a [`PlanFile`], the warnings the user should see, and for each plan field the TOML
//! key it came from, so that an error found later by [`PlanFile::resolve`] names the key the
//! user wrote ([`Job::explain`]). The serde types below mirror torchtitan's config sections
//! with every key optional. Sections memplan does not read (`[checkpoint]`, `[metrics]`, ...)
//! are ignored; in the sections it reads, a key torchtitan does not know either (a typo such as
//! `local_batchsize`) is a warning with its line and the closest known key, since the default
//! memplan then uses is rarely what the user meant. Keys torchtitan knows but memplan does not
//! need (`training.steps`, `optimizer.lr`, ...) pass silently. The world size is not in the file
//! (torchrun supplies it), so `num_gpus` and `gpu` stay unset for the CLI to fill, and
//! [`check_world_size`] refuses a world size the file's degrees cannot fill, as torchtitan's
//! `ParallelDims._validate` would; `batch.ignore_max_position` is set because torchtitan
//! computes rotary frequencies for whatever `seq_len` it is given.
//!
//! # Sources
//! pytorch/torchtitan at two layouts, both accepted, newest key winning where both appear (with
//! a warning when they disagree):
//! - 2024: `torchtitan/config_manager.py` and `train_configs/llama3_{8b,70b,405b}.toml` at
//!   f6a9daa (2024-12-20): degrees under `[training]` and `[experimental]`, `batch_size`,
//!   `[float8] enable_float8_linear`, `training.compile`, `optimizer.fused`.
//! - 2025: `torchtitan/config/job_config.py` and
//!   `torchtitan/models/llama3/train_configs/llama3_*.toml` at 9810191~1 (2026-02-23, the last
//!   TOML layout): `[parallelism]` (from 785c34c, 2025-03-18), `local_batch_size` and
//!   `global_batch_size` (8570415, 2025-06-05), `model.converters` (57387af, 2025-02-15),
//!   `[compile] enable` (08b8b24, 2025-08-20), `optimizer.implementation` (6e49885, 2025-02-24).
//! - 0.3.0 (2026-09-03, [`from_json_str`]): no TOML; the `Trainer.Config` it saves with
//!   `--debug.save_config_file` (JSON) is read through the same sections, plus `[loss]`
//!   `num_chunks` (`ChunkedLossWrapper`) and `training.disable_cuda_graphs`; any 0.3-only key
//!   (`loss.*`, `training.disable_cuda_graphs`, `parallelism.spmd_backend`,
//!   `enable_sequence_parallel`, `enable_fsdp_symm_mem`) makes it a 0.3 config: preset
//!   `torchtitan-0.3`, logits `chunked` with `loss_chunks` = `num_chunks` (a `[loss]` without
//!   it: the plain cross-entropy, `float-in-loss`), `zero_grad` `set-to-none` when CUDA graphs
//!   are disabled, and selective-op checkpointing when none is named.
//! - Known keys (`TORCHTITAN_KEYS`): every key declared in those two files at f6a9daa, at
//!   9810191~1, and at each commit between them that changed either file, so a config written
//!   for any torchtitan of that span warns about typos only.
//! - Checks: `global_batch_size` below 0 means local batch x data-parallel degree, and 0 is
//!   refused (`torchtitan/train.py` at 9810191~1); `data_parallel_shard_degree` is -1 or at
//!   least 1, and the degrees' product must equal the world size (`ParallelDims._validate` in
//!   `torchtitan/distributed/parallel_dims.py` at 9810191~1, `parallelisms/parallel_dims.py` at
//!   f6a9daa).
//!
//! # Mapping
//! | torchtitan key | plan key |
//! |---|---|
//! | `model.name` + `model.flavor`: llama3 8B (also 8B_flex, 8B_varlen), 70B, 405B; llama2 7B, 13B | `model`: llama3-8b, llama3-70b, llama3.1-405b, llama2-7b, llama2-13b |
//! | `model.converters` containing `float8` or `quantize.{linear,dense,grouped_mm,moe}.float8`; `float8.enable_float8_linear` | `float8` |
//! | `training.local_batch_size` or `training.batch_size` (default 8) | `batch.micro_batch_size` |
//! | `training.seq_len` (default 2048) | `batch.seq_len` |
//! | `training.gradient_accumulation_steps` (memplan's own key; torchtitan has none), else `global_batch_size / (local_batch_size x dp_replicate x dp_shard)`; a negative `global_batch_size` (torchtitan's default -1) means one step, 0 is refused | `batch.grad_accum_steps` (unset when dp_shard is -1) |
//! | `training.mixed_precision_param`, `mixed_precision_reduce` (bfloat16, float32) | `precision.param`, `precision.reduce` |
//! | `training.dtype` (full bf16 training) | `precision.master` |
//! | `training.enable_cpu_offload` | `offload` full / none |
//! | `compile.enable`, `training.compile` | `compile` |
//! | `data_parallel_replicate_degree`, `data_parallel_shard_degree` (-1 allowed), `tensor_parallel_degree`, `pipeline_parallel_degree`, `context_parallel_degree`, `expert_parallel_degree`, `expert_tensor_parallel_degree` under `[parallelism]`, `[experimental]` or `[training]` | `parallel.dp_replicate`, `dp_shard`, `tp`, `pp`, `cp`, `ep`, `etp` |
//! | `pipeline_parallel_schedule`: 1F1B, GPipe, Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble (others, and a schedule CSV, are rejected) | `parallel.pp_schedule`: 1f1b, gpipe, interleaved-1f1b, zb-h1, zb-h1 (the two looped zero-bubble schedules map to ZB-H1 with one stage per rank, which the plan then refuses: not modelled) |
//! | stages per rank of Interleaved1F1B: from `pipeline_parallel_layers_per_stage`, `pipeline_parallel_split_points` or `module_fqns_per_model_part`, else 2 | `parallel.pp_virtual_stages` |
//! | with pp > 1: `pipeline_parallel_microbatch_size` (default 1), or the count `pipeline_parallel_microbatches` (2024, default pp) | `batch.micro_batch_size` = the micro-batch, `batch.grad_accum_steps` x= micro-batches per local batch |
//! | `fsdp_reshard_after_forward` under `[parallelism]` or (February to March 2025) `[training]`: always, never, default (= not pp) | `reshard_after_forward` |
//! | `activation_checkpoint.mode` none, full, selective (default) with `selective_ac_option` "op" or "K" (default "2"; "0" checkpoints every block) | `activation_checkpointing`: none, full, selective-op, selective-layer:K |
//! | `optimizer.name` AdamW, Adam | `optimizer` adamw, adam |
//! | `optimizer.implementation` fused, foreach, for-loop; `optimizer.fused` true / false | `implementation.optimizer` fused, foreach, per-param |
//! | `disable_loss_parallel` under `[parallelism]` or (to March 2025) `[training]` | `implementation.loss_parallel` (negated) |
//! | `context_parallel_rotate_method` under `[parallelism]` or (to March 2025) `[experimental]`: allgather, alltoall | `parallel.cp_rotate` |
//!
//! Where torchtitan's default differs from memplan's and was the same in both layouts (batch 8,
//! selective AC every second block, no resharding under PP), the default is written into the
//! plan, so a file that leaves the key out is estimated as torchtitan would run it. The
//! optimizer kernel is left unset when the file does not name it: torchtitan's default changed
//! from foreach to fused in February 2025, and memplan's foreach default errs on the high side.
//!
//! Malformed TOML is an input error with the file and line; a key of the wrong type, or a value
//! memplan cannot map or torchtitan would refuse, is an invalid-value error naming the TOML key.
//! memplan also reads a few keys torchtitan never had (`training.gradient_accumulation_steps`,
//! and under `[experimental]` the degrees and pipeline keys of `[parallelism]`); each is used,
//! with a warning that torchtitan would not take it.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::plan::{PlanFile, MAX_DIM};
use crate::profiles;

/// A torchtitan job config read into a plan.
#[derive(Debug)]
pub struct Job {
    pub plan: PlanFile,
    /// One line each, without a "warning: " prefix: unknown keys (with line numbers and
    /// suggestions) and anything else the user should know.
    pub warnings: Vec<String>,
    /// (plan field, TOML key) for every plan field set from a key in the file, e.g.
    /// ("batch.seq_len", "training.seq_len"); plan field names as `PlanFile::resolve` names them
    /// in errors.
    pub keys: Vec<(&'static str, String)>,
    /// What the estimate assumes about the torchtitan release the file was written for, when
    /// that is not what it models (a 2025-layout file); printed with the warnings.
    pub note: Option<String>,
}

impl Job {
    /// Applies [`Job::keys`] to an error from resolving this job's plan: an error about a plan
    /// field set from the file names the TOML key instead.
    ///
    /// ```
    /// let job = memplan::torchtitan::from_toml_str(
    ///     "[model]\nname = \"llama3\"\nflavor = \"8B\"\n[parallelism]\ntensor_parallel_degree = 3\n",
    ///     "train.toml",
    /// )
    /// .unwrap();
    /// let mut plan = job.plan.clone();
    /// plan.num_gpus = Some(3);
    /// let e = job.explain(plan.resolve().unwrap_err());
    /// assert_eq!(e.field(), Some("parallelism.tensor_parallel_degree"));
    /// ```
    pub fn explain(&self, e: Error) -> Error {
        self.keys
            .iter()
            .fold(e, |e, (field, key)| e.rename_field(field, key))
    }

    /// The TOML key plan field `field` was set from, if any.
    fn key(&self, field: &str) -> Option<&str> {
        self.keys
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, k)| k.as_str())
    }
}

/// The sections of a torchtitan job config that memplan reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct JobConfig {
    model: Model,
    training: Training,
    parallelism: Parallelism,
    /// 2024: the pipeline and context parallel degrees lived here.
    experimental: Parallelism,
    activation_checkpoint: ActivationCheckpoint,
    float8: Float8,
    compile: Compile,
    optimizer: Optimizer,
    /// torchtitan 0.3's `loss` (`ChunkedLossWrapper.Config`: `num_chunks`; a plain
    /// `CrossEntropyLoss.Config` has only `global_vocab_size`).
    loss: Loss,
}

/// Section names of [`JobConfig`], for finding the key behind a type error.
const SECTIONS: &[&str] = &[
    "model",
    "training",
    "parallelism",
    "experimental",
    "activation_checkpoint",
    "float8",
    "compile",
    "optimizer",
    "loss",
];

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Loss {
    num_chunks: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Model {
    name: Option<String>,
    flavor: Option<String>,
    converters: Option<StringList>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Training {
    /// 2025 name of the per-rank batch.
    local_batch_size: Option<i64>,
    /// 2024 name of the per-rank batch.
    batch_size: Option<i64>,
    global_batch_size: Option<i64>,
    /// memplan's own key: torchtitan derives accumulation from `global_batch_size`.
    gradient_accumulation_steps: Option<i64>,
    seq_len: Option<i64>,
    mixed_precision_param: Option<String>,
    mixed_precision_reduce: Option<String>,
    dtype: Option<String>,
    enable_cpu_offload: Option<bool>,
    /// 2024 to mid-2025; later `[compile] enable`.
    compile: Option<bool>,
    /// 2024 to March 2025: the data and tensor parallel degrees lived here.
    data_parallel_replicate_degree: Option<i64>,
    data_parallel_shard_degree: Option<i64>,
    tensor_parallel_degree: Option<i64>,
    /// February to March 2025, before `[parallelism]`.
    fsdp_reshard_after_forward: Option<String>,
    /// 2024 to March 2025; later under `[parallelism]`.
    disable_loss_parallel: Option<bool>,
    /// torchtitan 0.3: False (the default) keeps the gradients between steps (`zero_grad(set_to_none=False)`).
    disable_cuda_graphs: Option<bool>,
}

/// `[parallelism]` (2025); also 2024's `[experimental]`, which held the pipeline and context
/// parallel keys.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Parallelism {
    data_parallel_replicate_degree: Option<i64>,
    data_parallel_shard_degree: Option<i64>,
    tensor_parallel_degree: Option<i64>,
    pipeline_parallel_degree: Option<i64>,
    context_parallel_degree: Option<i64>,
    expert_parallel_degree: Option<i64>,
    expert_tensor_parallel_degree: Option<i64>,
    pipeline_parallel_schedule: Option<String>,
    pipeline_parallel_schedule_csv: Option<String>,
    /// 2025 (from April): micro-batch size; the count is local batch / this.
    pipeline_parallel_microbatch_size: Option<i64>,
    /// 2024 to April 2025: the number of micro-batches.
    pipeline_parallel_microbatches: Option<i64>,
    pipeline_parallel_layers_per_stage: Option<i64>,
    pipeline_parallel_first_stage_less_layers: Option<i64>,
    pipeline_parallel_last_stage_less_layers: Option<i64>,
    pipeline_parallel_split_points: Option<StringList>,
    module_fqns_per_model_part: Option<Vec<Vec<String>>>,
    fsdp_reshard_after_forward: Option<String>,
    disable_loss_parallel: Option<bool>,
    context_parallel_rotate_method: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ActivationCheckpoint {
    mode: Option<String>,
    selective_ac_option: Option<StringOrInt>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Float8 {
    enable_float8_linear: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Compile {
    enable: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Optimizer {
    name: Option<String>,
    implementation: Option<String>,
    /// 2024: fused AdamW, else foreach.
    fused: Option<bool>,
}

/// The parallel degrees one section sets.
#[derive(Debug, Default)]
struct Degrees {
    data_parallel_replicate_degree: Option<i64>,
    data_parallel_shard_degree: Option<i64>,
    tensor_parallel_degree: Option<i64>,
    pipeline_parallel_degree: Option<i64>,
    context_parallel_degree: Option<i64>,
    expert_parallel_degree: Option<i64>,
    expert_tensor_parallel_degree: Option<i64>,
}

impl Training {
    fn degrees(&self) -> Degrees {
        Degrees {
            data_parallel_replicate_degree: self.data_parallel_replicate_degree,
            data_parallel_shard_degree: self.data_parallel_shard_degree,
            tensor_parallel_degree: self.tensor_parallel_degree,
            ..Degrees::default()
        }
    }
}

impl Parallelism {
    fn degrees(&self) -> Degrees {
        Degrees {
            data_parallel_replicate_degree: self.data_parallel_replicate_degree,
            data_parallel_shard_degree: self.data_parallel_shard_degree,
            tensor_parallel_degree: self.tensor_parallel_degree,
            pipeline_parallel_degree: self.pipeline_parallel_degree,
            context_parallel_degree: self.context_parallel_degree,
            expert_parallel_degree: self.expert_parallel_degree,
            expert_tensor_parallel_degree: self.expert_tensor_parallel_degree,
        }
    }

    /// Validates the pipeline keys that hold numbers, wherever they are later read.
    fn check_numbers(&self, section: &str) -> Result<()> {
        for (key, v) in [
            (
                "pipeline_parallel_microbatch_size",
                self.pipeline_parallel_microbatch_size,
            ),
            (
                "pipeline_parallel_microbatches",
                self.pipeline_parallel_microbatches,
            ),
            (
                "pipeline_parallel_layers_per_stage",
                self.pipeline_parallel_layers_per_stage,
            ),
        ] {
            if let Some(v) = v {
                positive(&format!("{section}.{key}"), v)?;
            }
        }
        for (key, v) in [
            (
                "pipeline_parallel_first_stage_less_layers",
                self.pipeline_parallel_first_stage_less_layers,
            ),
            (
                "pipeline_parallel_last_stage_less_layers",
                self.pipeline_parallel_last_stage_less_layers,
            ),
        ] {
            if let Some(v) = v {
                non_negative(&format!("{section}.{key}"), v)?;
            }
        }
        Ok(())
    }
}

/// A list of names, written as a TOML array or as one comma-separated string.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
enum StringList {
    One(String),
    Many(Vec<String>),
}

impl StringList {
    fn items(&self) -> Vec<&str> {
        match self {
            StringList::One(s) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect(),
            StringList::Many(v) => v.iter().map(|s| s.trim()).collect(),
        }
    }
}

/// `selective_ac_option`: torchtitan declares a string ("op", "2"); an integer is taken too.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string such as \"op\" or \"2\"")]
enum StringOrInt {
    Str(String),
    Int(i64),
}

/// The keys written in each section memplan reads, with their positions (for warnings).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Written {
    model: KeysOf,
    training: KeysOf,
    parallelism: KeysOf,
    experimental: KeysOf,
    activation_checkpoint: KeysOf,
    float8: KeysOf,
    compile: KeysOf,
    optimizer: KeysOf,
    loss: KeysOf,
}

impl Written {
    fn sections(&self) -> [(&'static str, &KeysOf); 9] {
        [
            ("model", &self.model),
            ("training", &self.training),
            ("parallelism", &self.parallelism),
            ("experimental", &self.experimental),
            ("activation_checkpoint", &self.activation_checkpoint),
            ("float8", &self.float8),
            ("compile", &self.compile),
            ("optimizer", &self.optimizer),
            ("loss", &self.loss),
        ]
    }
}

/// The keys of one TOML table, each with its byte span in the file.
#[derive(Debug, Default)]
struct KeysOf(Vec<toml::Spanned<String>>);

impl<'de> Deserialize<'de> for KeysOf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeysOf, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = KeysOf;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<KeysOf, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<toml::Spanned<String>>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(KeysOf(keys))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// Keys torchtitan accepts in each section memplan reads: every field declared for that
/// section in `torchtitan/config_manager.py` (argparse, then dataclasses) at f6a9daa
/// (2024-12-20), in `torchtitan/config/job_config.py` at 9810191~1 (= e347b1e, its last change
/// before the TOML layout was dropped, 2026-02-15), and at each of the 119 commits between that
/// changed either file (`git log f6a9daa..9810191~1 -- torchtitan/config_manager.py
/// torchtitan/config/job_config.py`). Keys in both end points carry no comment; the others say
/// from which commit, or up to which commit (the last that declared it), torchtitan had them.
/// A sub-table such as `[training.dataloader]` is its section's key (`dataloader`).
const TORCHTITAN_KEYS: &[(&str, &[&str])] = &[
    (
        "model",
        &[
            "attn_mask_type", // 7090a7b (2025-04-03) to f64cf3c (2025-04-15)
            "converters",     // from 57387af (2025-02-15)
            "flavor",
            "hf_assets_path", // from fd5a87f (2025-08-11)
            "name",
            "norm_type",              // to c1c2f55 (2025-04-18)
            "print_after_conversion", // from 4e3d8ea (2025-02-27)
            "tokenizer_path",
            "use_flex_attn", // 986f680 (2025-03-20) to f64cf3c (2025-04-15)
        ],
    ),
    (
        "training",
        &[
            "batch_size",                     // to 29fb3f9 (2025-05-30)
            "compile",                        // to aeb3a4b (2025-08-13)
            "data_parallel_replicate_degree", // to 38e7ee7 (2025-03-14)
            "data_parallel_shard_degree",     // to 38e7ee7 (2025-03-14)
            "dataloader",                     // from 658f94c (2025-12-18)
            "dataset",
            "dataset_path",
            "debug_moe_force_load_balance", // 99fee81 (2025-10-03) to 8228c08 (2025-10-28)
            "deterministic",                // to 8228c08 (2025-10-28)
            "disable_cuda_graphs",          // 0.3.0
            "disable_loss_parallel",        // to 38e7ee7 (2025-03-14)
            "dtype",                        // from e99e16c (2025-09-16)
            "enable_cpu_offload",
            "fsdp_reshard_after_forward", // 5940dde (2025-02-06) to 38e7ee7 (2025-03-14)
            "gc_debug",                   // from f8f545c (2025-05-28)
            "gc_freq",
            "global_batch_size", // from 8570415 (2025-06-05)
            "local_batch_size",  // from 8570415 (2025-06-05)
            "max_norm",
            "mixed_precision_param",
            "mixed_precision_reduce",
            "seed", // to 8228c08 (2025-10-28)
            "seq_len",
            "steps",
            "tensor_parallel_degree", // to 38e7ee7 (2025-03-14)
            "warmup_steps",           // to 99f7396 (2025-03-10)
        ],
    ),
    (
        "parallelism",
        &[
            "context_parallel_degree",                   // from 785c34c (2025-03-18)
            "context_parallel_load_balancer",            // from 0a2107f (2026-01-20)
            "context_parallel_rotate_method",            // from 785c34c (2025-03-18)
            "data_parallel_replicate_degree",            // from 785c34c (2025-03-18)
            "data_parallel_shard_degree",                // from 785c34c (2025-03-18)
            "disable_loss_parallel",                     // from 785c34c (2025-03-18)
            "enable_async_tensor_parallel",              // from 785c34c (2025-03-18)
            "enable_compiled_autograd", // 785c34c (2025-03-18) to 10d694b (2025-10-24)
            "enable_fsdp_symm_mem",     // 0.3.0
            "enable_sequence_parallel", // 0.3.0
            "expert_parallel_comm_backend", // from 36a4b69 (2025-12-17)
            "expert_parallel_degree",   // from 01f4e50 (2025-07-08)
            "expert_tensor_parallel_degree", // from aeb3a4b (2025-08-13)
            "fsdp_reshard_after_forward", // from 785c34c (2025-03-18)
            "module_fqns_per_model_part", // from 3c84ce0 (2025-07-30)
            "pipeline_parallel_degree", // from 785c34c (2025-03-18)
            "pipeline_parallel_expert_parallel_overlap", // from fcc5643 (2025-12-12)
            "pipeline_parallel_first_stage_less_layers", // from 3c84ce0 (2025-07-30)
            "pipeline_parallel_last_stage_less_layers", // from 3c84ce0 (2025-07-30)
            "pipeline_parallel_layers_per_stage", // from 8b737fe (2025-04-07)
            "pipeline_parallel_microbatch_size", // from 5e2033c (2025-04-07)
            "pipeline_parallel_microbatches", // 785c34c (2025-03-18) to 8b737fe (2025-04-07)
            "pipeline_parallel_schedule", // from 785c34c (2025-03-18)
            "pipeline_parallel_schedule_csv", // from 785c34c (2025-03-18)
            "pipeline_parallel_split_points", // 785c34c (2025-03-18) to a82b77a (2025-10-12)
            "spmd_backend",             // 0.3.0
            "tensor_parallel_degree",   // from 785c34c (2025-03-18)
        ],
    ),
    (
        "experimental",
        &[
            "context_parallel_degree",        // to 38e7ee7 (2025-03-14)
            "context_parallel_rotate_method", // to 38e7ee7 (2025-03-14)
            "custom_args_module",             // from 048f65d (2025-03-20)
            "custom_import",                  // from b315517 (2025-03-19)
            "custom_model_path",              // fb0a942 (2025-02-12) to 7fe3620 (2025-03-19)
            "enable_async_tensor_parallel",   // to 38e7ee7 (2025-03-14)
            "enable_compiled_autograd",       // to 38e7ee7 (2025-03-14)
            "pipeline_parallel_degree",       // to 38e7ee7 (2025-03-14)
            "pipeline_parallel_microbatches", // to 38e7ee7 (2025-03-14)
            "pipeline_parallel_schedule",     // to 38e7ee7 (2025-03-14)
            "pipeline_parallel_schedule_csv", // to 38e7ee7 (2025-03-14)
            "pipeline_parallel_split_points", // to 38e7ee7 (2025-03-14)
        ],
    ),
    (
        "activation_checkpoint",
        &[
            "debug",             // from e61f2cc (2025-10-29)
            "determinism_check", // from e61f2cc (2025-10-29)
            "early_stop",        // from 25413d2 (2025-08-29)
            "memory_budget",     // from b276387 (2025-10-09)
            "mode",
            "per_op_sac_force_recompute_mm_shapes_by_fqns", // from 9a8cb98 (2025-07-16)
            "preserve_rng_state",                           // from e61f2cc (2025-10-29)
            "selective_ac_option",
            "visualize_memory_budget_pareto", // from b276387 (2025-10-09)
        ],
    ),
    (
        "float8",
        &[
            "emulate",                                  // 594a120 (2025-05-28) to 0f34257 (2025-09-23)
            "enable_float8_linear",                     // to fb0a942 (2025-02-12)
            "enable_fsdp_float8_all_gather",            // to 0f34257 (2025-09-23)
            "filter_fqns", // a6524d8 (2025-04-07) to 0f34257 (2025-09-23)
            "force_recompute_fp8_weight_in_bwd", // 473674a (2025-02-18) to f3e2a75 (2025-07-24)
            "moe_fqns_prototype", // 5990fa3 (2025-06-27) to 0f34257 (2025-09-23)
            "precompute_float8_dynamic_scale_for_fsdp", // to 0f34257 (2025-09-23)
            "recipe_name", // 069bae2 (2025-02-27) to 0f34257 (2025-09-23)
            "scaling_type_grad_output", // to f6a9daa (2024-12-20)
            "scaling_type_input", // to f6a9daa (2024-12-20)
            "scaling_type_weight", // to f6a9daa (2024-12-20)
        ],
    ),
    (
        "compile",
        &[
            "backend",    // from 177b050 (2025-10-02)
            "components", // from 08b8b24 (2025-08-20)
            "enable",     // from 08b8b24 (2025-08-20)
        ],
    ),
    (
        "optimizer",
        &[
            "beta1", // from 7c8301a (2025-06-11)
            "beta2", // from 7c8301a (2025-06-11)
            "early_step_in_backward",
            "eps",            // from 733296f (2025-03-04)
            "fused",          // to 3aff9bd (2025-02-24)
            "implementation", // from 6e49885 (2025-02-24)
            "lr",
            "name",
            "weight_decay", // from 7c8301a (2025-06-11)
        ],
    ),
    // torchtitan 0.3.0 (2026-09-03) has no TOML: its `Trainer.Config` as saved by
    // `--debug.save_config_file` (JSON, [`from_json_str`]) is read through this table too.
    ("loss", &["global_vocab_size", "num_chunks"]), // 0.3.0
];

/// Keys memplan reads that torchtitan never declared in that section. They are used, with a
/// warning: torchtitan itself would refuse them (2025) or ignore them (2024).
const MEMPLAN_ONLY_KEYS: &[(&str, &[&str])] = &[
    ("training", &["gradient_accumulation_steps"]),
    (
        "experimental",
        &[
            "data_parallel_replicate_degree",
            "data_parallel_shard_degree",
            "tensor_parallel_degree",
            "expert_parallel_degree",
            "expert_tensor_parallel_degree",
            "pipeline_parallel_microbatch_size",
            "pipeline_parallel_layers_per_stage",
            "pipeline_parallel_first_stage_less_layers",
            "pipeline_parallel_last_stage_less_layers",
            "module_fqns_per_model_part",
        ],
    ),
];

/// Sections searched for a key written in the wrong one, newest layout first.
const SUGGEST_ORDER: &[&str] = &[
    "parallelism",
    "training",
    "model",
    "optimizer",
    "activation_checkpoint",
    "compile",
    "experimental",
    "float8",
];

/// At most this many unknown-key warnings; the rest are counted in one more line.
const MAX_KEY_WARNINGS: usize = 20;

fn keys_of(table: &[(&str, &'static [&'static str])], section: &str) -> &'static [&'static str] {
    table
        .iter()
        .find(|(s, _)| *s == section)
        .map_or(&[], |(_, keys)| keys)
}

/// torchtitan model name and flavor -> memplan profile.
const MODELS: &[(&str, &str, &str)] = &[
    ("llama3", "8B", "llama3-8b"),
    ("llama3", "8B_flex", "llama3-8b"),
    ("llama3", "8B_varlen", "llama3-8b"),
    ("llama3", "70B", "llama3-70b"),
    ("llama3", "405B", "llama3.1-405b"),
    ("llama2", "7B", "llama2-7b"),
    ("llama2", "13B", "llama2-13b"),
];

/// torchtitan's default per-rank batch (`training.local_batch_size`, 2024 `batch_size`).
const DEFAULT_LOCAL_BATCH: i64 = 8;
/// torchtitan's default `training.seq_len`.
const DEFAULT_SEQ_LEN: i64 = 2048;

/// Reads a torchtitan job config file (at most 1 MiB) into a plan: TOML (torchtitan to 0.2.x),
/// or JSON, torchtitan 0.3's saved `Trainer.Config` ([`from_json_str`]).
pub fn read(path: &Path) -> Result<Job> {
    let text = crate::input::read_text(path, "torchtitan config")?;
    let origin = path.display().to_string();
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        || crate::input::strip_bom(&text).trim_start().starts_with('{');
    if json {
        from_json_str(&text, &origin)
    } else {
        from_toml_str(&text, &origin)
    }
}

/// Reads torchtitan 0.3's configuration. 0.3.0 has no TOML: a run is `--module llama3 --config
/// llama3_8b` (a Python function returning a `Trainer.Config`) with `--section.key`
/// overrides, and `--debug.save_config_file NAME` writes the resolved config as JSON
/// (`trainer.py`, `Trainer.Config.to_dict`; `--debug.print_config` logs the same). This takes
/// that JSON: `model_spec` (name, flavor), and of `training`, `parallelism`, `compile`,
/// `optimizer` and `loss` the keys the TOML reader knows, each read as in a TOML file of the
/// same sections; `activation_checkpoint` is its policy's fields (`null` for none,
/// `force_recompute_mm_shapes_by_fqns` for selective, `memory_budget` for memory-budget, the
/// bare base fields for full) and `optimizer.param_groups` names the optimizer. The result is
/// a torchtitan 0.3 config: preset `torchtitan-0.3`, said in [`Job::note`].
///
/// ```
/// let job = memplan::torchtitan::from_json_str(
///     r#"{"model_spec": {"name": "llama3", "flavor": "8B", "model": {}},
///         "training": {"local_batch_size": 1, "seq_len": 8192, "disable_cuda_graphs": false},
///         "parallelism": {"data_parallel_shard_degree": -1, "spmd_backend": "spmd_types"},
///         "activation_checkpoint": {"preserve_rng_state": true, "force_recompute_mm_shapes_by_fqns": []},
///         "optimizer": {"param_groups": [{"pattern": ".*", "optimizer_name": "AdamW"}], "implementation": "fused"},
///         "loss": {"num_chunks": 8, "loss_fn": {"global_vocab_size": 128256}}}"#,
///     "config.json",
/// )
/// .unwrap();
/// assert_eq!(job.plan.preset.as_deref(), Some("torchtitan-0.3"));
/// assert_eq!(job.plan.implementation.logits.as_deref(), Some("chunked"));
/// assert_eq!(job.plan.activation_checkpointing.as_deref(), Some("selective-op"));
/// assert!(job.note.unwrap().contains("torchtitan-0.3"));
/// ```
pub fn from_json_str(text: &str, origin: &str) -> Result<Job> {
    let doc: serde_json::Value =
        serde_json::from_str(crate::input::strip_bom(text)).map_err(|e| {
            Error::input(format!(
                "torchtitan config {origin}: malformed JSON at line {} column {}: {}",
                e.line(),
                e.column(),
                one_line(&e.to_string())
            ))
        })?;
    let obj = doc
        .as_object()
        .filter(|o| {
            o.contains_key("training")
                && o.contains_key("parallelism")
                && (o.contains_key("model_spec") || o.contains_key("loss"))
        })
        .ok_or_else(|| {
            Error::input(format!(
                "torchtitan config {origin}: a JSON config is torchtitan 0.3's Trainer.Config as \
                 it saves it (--debug.save_config_file): an object with training, parallelism, \
                 model_spec and loss"
            ))
        })?;
    let section = |name: &str| obj.get(name).and_then(|v| v.as_object());
    let mut t = toml::Table::new();
    let mut copy =
        |name: &str, from: Option<&serde_json::Map<String, serde_json::Value>>, keys: &[&str]| {
            let mut out = toml::Table::new();
            for &k in keys {
                if let Some(v) = from.and_then(|f| f.get(k)).and_then(json_to_toml) {
                    out.insert(k.to_string(), v);
                }
            }
            if !out.is_empty() {
                t.insert(name.to_string(), toml::Value::Table(out));
            }
        };
    copy("model", section("model_spec"), &["name", "flavor"]);
    copy(
        "training",
        section("training"),
        &[
            "local_batch_size",
            "global_batch_size",
            "seq_len",
            "mixed_precision_param",
            "mixed_precision_reduce",
            "dtype",
            "enable_cpu_offload",
            "disable_cuda_graphs",
        ],
    );
    let mut parallelism = section("parallelism").cloned().unwrap_or_default();
    // An empty schedule file name is 0.3's "none".
    if parallelism
        .get("pipeline_parallel_schedule_csv")
        .is_some_and(|v| v.as_str() == Some(""))
    {
        parallelism.remove("pipeline_parallel_schedule_csv");
    }
    copy(
        "parallelism",
        Some(&parallelism),
        &[
            "data_parallel_replicate_degree",
            "data_parallel_shard_degree",
            "tensor_parallel_degree",
            "pipeline_parallel_degree",
            "context_parallel_degree",
            "expert_parallel_degree",
            "pipeline_parallel_schedule",
            "pipeline_parallel_schedule_csv",
            "pipeline_parallel_microbatch_size",
            "pipeline_parallel_layers_per_stage",
            "pipeline_parallel_first_stage_less_layers",
            "pipeline_parallel_last_stage_less_layers",
            "module_fqns_per_model_part",
            "fsdp_reshard_after_forward",
            "spmd_backend",
            "enable_sequence_parallel",
        ],
    );
    copy("compile", section("compile"), &["enable"]);
    copy("loss", section("loss"), &["num_chunks"]);
    if section("loss").is_some_and(|l| !l.contains_key("num_chunks")) {
        // The plain cross-entropy: the section says so.
        let mut l = toml::Table::new();
        l.insert("global_vocab_size".into(), toml::Value::Integer(0));
        t.insert("loss".into(), toml::Value::Table(l));
    }
    // The checkpointing policy, by its fields.
    let mode = match obj.get("activation_checkpoint") {
        None => None,
        Some(serde_json::Value::Null) => Some("none"),
        Some(serde_json::Value::Object(ac)) if ac.contains_key("memory_budget") => {
            Some("memory_budget")
        }
        Some(serde_json::Value::Object(ac))
            if ac.contains_key("force_recompute_mm_shapes_by_fqns") =>
        {
            Some("selective")
        }
        Some(serde_json::Value::Object(_)) => Some("full"),
        Some(_) => {
            return Err(Error::invalid(
                "activation_checkpoint",
                "not an object",
                "null or a checkpointing policy's fields",
            ))
        }
    };
    if let Some(mode) = mode {
        let mut ac = toml::Table::new();
        ac.insert("mode".into(), toml::Value::String(mode.into()));
        if mode == "selective" {
            ac.insert(
                "selective_ac_option".into(),
                toml::Value::String("op".into()),
            );
        }
        t.insert("activation_checkpoint".into(), toml::Value::Table(ac));
    }
    // The optimizer: its implementation, and the name every parameter group uses.
    if let Some(o) = section("optimizer") {
        let mut out = toml::Table::new();
        if let Some(v) = o.get("implementation").and_then(json_to_toml) {
            out.insert("implementation".into(), v);
        }
        let mut names: Vec<&str> = o
            .get("param_groups")
            .and_then(|g| g.as_array())
            .map(|groups| {
                groups
                    .iter()
                    .filter_map(|g| g.get("optimizer_name").and_then(|n| n.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        names.dedup();
        match names.as_slice() {
            [] => {}
            [one] => {
                out.insert("name".into(), toml::Value::String(one.to_string()));
            }
            many => {
                return Err(Error::invalid(
                    "optimizer.param_groups",
                    format!("{many:?}"),
                    "one optimizer for every parameter group (AdamW or Adam)",
                ))
            }
        }
        if !out.is_empty() {
            t.insert("optimizer".into(), toml::Value::Table(out));
        }
    }
    let text = toml::to_string(&t)
        .map_err(|e| Error::input(format!("torchtitan config {origin}: {e}")))?;
    from_toml_str(&text, origin)
}

/// A JSON value as TOML (None for null, which TOML cannot write: the key is left out).
fn json_to_toml(v: &serde_json::Value) -> Option<toml::Value> {
    Some(match v {
        serde_json::Value::Null => return None,
        serde_json::Value::Bool(b) => toml::Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        serde_json::Value::String(s) => toml::Value::String(s.clone()),
        serde_json::Value::Array(a) => {
            toml::Value::Array(a.iter().filter_map(json_to_toml).collect())
        }
        serde_json::Value::Object(o) => toml::Value::Table(
            o.iter()
                .filter_map(|(k, v)| json_to_toml(v).map(|v| (k.clone(), v)))
                .collect(),
        ),
    })
}

/// Turns the text of a torchtitan job config into a plan; `origin` (a file name) goes into
/// error messages and warnings.
///
/// ```
/// let job = memplan::torchtitan::from_toml_str(
///     "[model]\nname = \"llama3\"\nflavor = \"8B\"\n[training]\nlocal_batch_size = 2\n",
///     "train.toml",
/// )
/// .unwrap();
/// assert_eq!(job.plan.model.as_deref(), Some("llama3-8b"));
/// assert_eq!(job.plan.batch.micro_batch_size, Some(2));
/// assert_eq!(job.plan.activation_checkpointing.as_deref(), Some("selective-layer:2"));
/// assert!(job.warnings.is_empty());
/// assert!(job.keys.contains(&("batch.micro_batch_size", "training.local_batch_size".into())));
/// ```
pub fn from_toml_str(text: &str, origin: &str) -> Result<Job> {
    let text = crate::input::strip_bom(text);
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|s| {
                let (line, col) = line_col(text, s.start);
                format!(" at line {line} column {col}")
            })
            .unwrap_or_default();
        Error::input(format!(
            "torchtitan config {origin}: malformed TOML{at}: {}",
            one_line(e.message())
        ))
    })?;
    let cfg: JobConfig = toml::from_str(text).map_err(|e| type_error(text, origin, &doc, &e))?;
    let written: Written = toml::from_str(text).map_err(|e| type_error(text, origin, &doc, &e))?;
    let mut reader = Reader {
        origin,
        lines: written
            .sections()
            .iter()
            .flat_map(|(section, keys)| {
                keys.0.iter().map(move |k| {
                    (
                        format!("{section}.{}", k.get_ref()),
                        line_col(text, k.span().start).0,
                    )
                })
            })
            .collect(),
        warnings: Vec::new(),
        keys: Vec::new(),
        note: None,
    };
    let plan = reader.convert(&cfg)?;
    reader.check_keys(&written);
    reader.warnings.sort_by_key(|(line, _)| *line);
    Ok(Job {
        plan,
        warnings: reader.warnings.into_iter().map(|(_, w)| w).collect(),
        keys: reader.keys,
        note: reader.note,
    })
}

/// Refuses a world size the file's parallel degrees cannot fill, as torchtitan's
/// `ParallelDims._validate` does: dp_replicate x dp_shard x cp x tp x pp must equal it, with a
/// dp_shard of -1 taking the ranks the others leave (so their product must divide it).
///
/// ```
/// let job = memplan::torchtitan::from_toml_str(
///     "[model]\nname = \"llama3\"\nflavor = \"8B\"\n[parallelism]\ndata_parallel_shard_degree = 16\n",
///     "train.toml",
/// )
/// .unwrap();
/// assert!(memplan::torchtitan::check_world_size(&job, 16).is_ok());
/// let e = memplan::torchtitan::check_world_size(&job, 8).unwrap_err();
/// assert_eq!(e.field(), Some("parallelism.data_parallel_shard_degree"));
/// ```
pub fn check_world_size(job: &Job, num_gpus: i64) -> Result<()> {
    let n = crate::plan::bounded("num_gpus", num_gpus, 1)?;
    let p = &job.plan.parallel;
    let degree = |field: &str, v: Option<i64>| match v {
        None => Ok(1),
        Some(v) => crate::plan::bounded(job.key(field).unwrap_or(field), v, 1),
    };
    let r = degree("parallel.dp_replicate", p.dp_replicate)?;
    let c = degree("parallel.cp", p.cp)?;
    let t = degree("parallel.tp", p.tp)?;
    let pp = degree("parallel.pp", p.pp)?;
    // Each degree is at most 2^24: the product of five fits in 128 bits.
    let others: i128 = [r, c, t, pp].iter().map(|&d| i128::from(d)).product();
    match p.dp_shard {
        None | Some(-1) => {
            if i128::from(n) % others != 0 {
                let set: Vec<&str> = [
                    "parallel.dp_replicate",
                    "parallel.cp",
                    "parallel.tp",
                    "parallel.pp",
                ]
                .iter()
                .filter_map(|f| job.key(f))
                .collect();
                let by = if set.is_empty() {
                    String::new()
                } else {
                    format!(" (set by {})", set.join(", "))
                };
                return Err(Error::invalid(
                    "--num-gpus",
                    n,
                    format!(
                        "a multiple of data_parallel_replicate_degree x context_parallel_degree x \
                         tensor_parallel_degree x pipeline_parallel_degree = {r} x {c} x {t} x \
                         {pp} = {others}{by}, the ranks data_parallel_shard_degree -1 shares out"
                    ),
                ));
            }
        }
        Some(s) => {
            let s = degree("parallel.dp_shard", Some(s)).map_err(|_| {
                shard_degree_error(
                    job.key("parallel.dp_shard").unwrap_or("parallel.dp_shard"),
                    s,
                )
            })?;
            let product = others * i128::from(s);
            if product != i128::from(n) {
                return Err(Error::invalid(
                    job.key("parallel.dp_shard").unwrap_or("parallel.dp_shard"),
                    s,
                    format!(
                        "a degree with data_parallel_replicate_degree x data_parallel_shard_degree \
                         x context_parallel_degree x tensor_parallel_degree x \
                         pipeline_parallel_degree = --num-gpus ({n}): {r} x {s} x {c} x {t} x \
                         {pp} = {product}"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Reading one file: where its keys are, and what the reading found to say.
struct Reader<'a> {
    origin: &'a str,
    /// ("section.key", 1-based line) for every key of the sections memplan reads.
    lines: Vec<(String, usize)>,
    /// (line, warning); a warning about no line sorts last.
    warnings: Vec<(usize, String)>,
    keys: Vec<(&'static str, String)>,
    note: Option<String>,
}

impl Reader<'_> {
    /// A warning about `key` (section.key), placed at its line.
    fn warn(&mut self, key: &str, message: impl std::fmt::Display) {
        let line = self.lines.iter().find(|(k, _)| k == key).map(|(_, l)| *l);
        let at = match line {
            Some(l) => format!("torchtitan config {} line {l}", self.origin),
            None => format!("torchtitan config {}", self.origin),
        };
        self.warnings
            .push((line.unwrap_or(usize::MAX), format!("{at}: {message}")));
    }

    /// Records that plan field `field` came from TOML key `key`.
    fn set(&mut self, field: &'static str, key: impl Into<String>) {
        let key = key.into();
        match self.keys.iter_mut().find(|(f, _)| *f == field) {
            Some(entry) => entry.1 = key,
            None => self.keys.push((field, key)),
        }
    }

    /// Warns about keys torchtitan does not know, and about keys only memplan reads.
    fn check_keys(&mut self, written: &Written) {
        let mut unknown = 0;
        for (section, keys) in written.sections() {
            for key in &keys.0 {
                let name = key.get_ref().as_str();
                let full = format!("{section}.{name}");
                if keys_of(TORCHTITAN_KEYS, section).contains(&name) {
                    continue;
                }
                if keys_of(MEMPLAN_ONLY_KEYS, section).contains(&name) {
                    let theirs = if name == "gradient_accumulation_steps" {
                        " (it derives accumulation from training.global_batch_size)".to_string()
                    } else {
                        elsewhere(section, name)
                            .map_or(String::new(), |k| format!(" (its key is {k})"))
                    };
                    self.warn(
                        &full,
                        format!(
                            "{full} is memplan's own key, read as given; torchtitan would refuse \
                             or ignore it{theirs}"
                        ),
                    );
                    continue;
                }
                unknown += 1;
                if unknown > MAX_KEY_WARNINGS {
                    continue;
                }
                match suggest(section, name) {
                    Some(s) => self.warn(&full, format!("unknown key {full} (did you mean {s}?)")),
                    None => self.warn(
                        &full,
                        format!("unknown key {full} (not a torchtitan key; ignored)"),
                    ),
                }
            }
        }
        if unknown > MAX_KEY_WARNINGS {
            let more = unknown - MAX_KEY_WARNINGS;
            self.warn("", format!("{more} more unknown keys"));
        }
    }

    /// The value of a degree from the newest layout that sets it; every layer's value is
    /// validated with `check`, and a value the newer layout overrides is a warning.
    fn degree(
        &mut self,
        layers: &[(&str, Degrees)],
        field: &'static str,
        key: &str,
        get: fn(&Degrees) -> Option<i64>,
        check: fn(&str, i64) -> Result<i64>,
    ) -> Result<Option<i64>> {
        let mut found: Option<(String, i64)> = None;
        for (section, d) in layers {
            let Some(v) = get(d) else { continue };
            let full = format!("{section}.{key}");
            let v = check(&full, v)?;
            match &found {
                None => found = Some((full, v)),
                Some((winner, w)) if *w != v => {
                    let message = format!("{full} = {v} is overridden by {winner} = {w}");
                    self.warn(&full, message);
                }
                Some(_) => {}
            }
        }
        Ok(found.map(|(full, v)| {
            self.set(field, full);
            v
        }))
    }

    fn convert(&mut self, cfg: &JobConfig) -> Result<PlanFile> {
        let mut plan = PlanFile {
            model: Some(model_name(&cfg.model)?.to_string()),
            ..PlanFile::default()
        };
        if cfg.model.flavor.is_some() {
            self.set("model", "model.flavor");
        }
        plan.batch.ignore_max_position = Some(true);

        // Degrees: [parallelism] (2025) over [experimental] and [training] (2024).
        cfg.parallelism.check_numbers("parallelism")?;
        cfg.experimental.check_numbers("experimental")?;
        let layers = [
            ("parallelism", cfg.parallelism.degrees()),
            ("experimental", cfg.experimental.degrees()),
            ("training", cfg.training.degrees()),
        ];
        let dp_replicate = self.degree(
            &layers,
            "parallel.dp_replicate",
            "data_parallel_replicate_degree",
            |d| d.data_parallel_replicate_degree,
            positive,
        )?;
        let dp_shard = self
            .degree(
                &layers,
                "parallel.dp_shard",
                "data_parallel_shard_degree",
                |d| d.data_parallel_shard_degree,
                shard_degree,
            )?
            .filter(|&v| v != -1);
        let pp = self.degree(
            &layers,
            "parallel.pp",
            "pipeline_parallel_degree",
            |d| d.pipeline_parallel_degree,
            positive,
        )?;
        plan.parallel.dp_replicate = dp_replicate;
        plan.parallel.dp_shard = Some(dp_shard.unwrap_or(-1));
        plan.parallel.pp = pp;
        plan.parallel.tp = self.degree(
            &layers,
            "parallel.tp",
            "tensor_parallel_degree",
            |d| d.tensor_parallel_degree,
            positive,
        )?;
        plan.parallel.cp = self.degree(
            &layers,
            "parallel.cp",
            "context_parallel_degree",
            |d| d.context_parallel_degree,
            positive,
        )?;
        plan.parallel.ep = self.degree(
            &layers,
            "parallel.ep",
            "expert_parallel_degree",
            |d| d.expert_parallel_degree,
            positive,
        )?;
        plan.parallel.etp = self.degree(
            &layers,
            "parallel.etp",
            "expert_tensor_parallel_degree",
            |d| d.expert_tensor_parallel_degree,
            positive,
        )?;

        // Batch: the 2025 name over the 2024 one.
        let t = &cfg.training;
        let mut given: Option<(&str, i64)> = None;
        for (key, v) in [
            ("training.local_batch_size", t.local_batch_size),
            ("training.batch_size", t.batch_size),
        ] {
            let Some(v) = v else { continue };
            let v = positive(key, v)?;
            match given {
                None => given = Some((key, v)),
                Some((winner, w)) if w != v => {
                    self.warn(key, format!("{key} = {v} is overridden by {winner} = {w}"))
                }
                Some(_) => {}
            }
        }
        let (local_key, local) =
            given.unwrap_or(("training.local_batch_size", DEFAULT_LOCAL_BATCH));
        plan.batch.seq_len = Some(positive(
            "training.seq_len",
            t.seq_len.unwrap_or(DEFAULT_SEQ_LEN),
        )?);
        if t.seq_len.is_some() {
            self.set("batch.seq_len", "training.seq_len");
        }
        let steps = t
            .gradient_accumulation_steps
            .map(|n| positive("training.gradient_accumulation_steps", n))
            .transpose()?;
        let global = match t.global_batch_size {
            None => None,
            // torchtitan/train.py: `if global_batch_size < 0:` local batch x dp degree.
            Some(g) if g < 0 => {
                if g != -1 {
                    self.warn(
                        "training.global_batch_size",
                        format!(
                            "training.global_batch_size = {g}: torchtitan takes any negative \
                             value as -1, local_batch_size x the data-parallel degree (no \
                             gradient accumulation)"
                        ),
                    );
                }
                None
            }
            Some(g) => Some(positive("training.global_batch_size", g).map_err(|_| {
                Error::invalid(
                    "training.global_batch_size",
                    g,
                    format!(
                        "-1 (local_batch_size x the data-parallel degree) or an integer from 1 \
                         to {MAX_DIM}"
                    ),
                )
            })?),
        };
        let (accum, accum_key) = match (steps, global) {
            (Some(n), _) => (Some(n), Some("training.gradient_accumulation_steps")),
            (None, Some(g)) => {
                let per_step = |shard: i64| {
                    local
                        .checked_mul(dp_replicate.unwrap_or(1))
                        .and_then(|n| n.checked_mul(shard))
                        .ok_or_else(|| Error::overflow("local batch x data-parallel degree"))
                };
                match dp_shard {
                    Some(shard) => {
                        let per_step = per_step(shard)?;
                        if g % per_step != 0 {
                            return Err(Error::invalid(
                                "training.global_batch_size",
                                g,
                                format!(
                                    "a multiple of local_batch_size x \
                                     data_parallel_replicate_degree x data_parallel_shard_degree \
                                     ({per_step})"
                                ),
                            ));
                        }
                        (Some(g / per_step), Some("training.global_batch_size"))
                    }
                    // The world size is not in the file: the data-parallel degree is unknown.
                    None => {
                        let per_rank = per_step(1)?;
                        if g % per_rank != 0 {
                            return Err(Error::invalid(
                                "training.global_batch_size",
                                g,
                                format!(
                                    "a multiple of local_batch_size x \
                                     data_parallel_replicate_degree ({per_rank}) x the \
                                     data-parallel shard degree"
                                ),
                            ));
                        }
                        if g > per_rank {
                            self.warn(
                                "training.global_batch_size",
                                format!(
                                    "training.global_batch_size = {g} sets gradient accumulation \
                                     by the world size (data_parallel_shard_degree is -1); \
                                     memplan estimates one accumulation step"
                                ),
                            );
                        }
                        (None, None)
                    }
                }
            }
            (None, None) => (None, None),
        };
        if let Some(key) = accum_key {
            self.set("batch.grad_accum_steps", key);
        }
        let pp_on = pp.unwrap_or(1) > 1;
        if pp_on {
            let pp = pp.unwrap_or(1);
            let mb = pipeline_microbatches(cfg, local, local_key, pp)?;
            plan.batch.micro_batch_size = Some(mb.size);
            plan.batch.grad_accum_steps = Some(accum.unwrap_or(1) * mb.count);
            match (&mb.key, given) {
                (Some(key), _) => self.set("batch.micro_batch_size", key.clone()),
                (None, Some((key, _))) => self.set("batch.micro_batch_size", key),
                (None, None) => {}
            }
            if let (None, Some(key)) = (accum_key, &mb.key) {
                self.set("batch.grad_accum_steps", key.clone());
            }
            let (section, par) = pipeline_section(cfg);
            let schedule_key = format!("{section}.pipeline_parallel_schedule");
            let (schedule, stages) = pipeline_schedule(cfg, pp, &plan)?;
            if par.pipeline_parallel_schedule.is_some() {
                self.set("parallel.pp_schedule", schedule_key.clone());
            }
            plan.parallel.pp_schedule = Some(schedule.to_string());
            if let Some((stages, key)) = stages {
                plan.parallel.pp_virtual_stages = Some(stages);
                self.set("parallel.pp_virtual_stages", key.unwrap_or(schedule_key));
            }
        } else {
            plan.batch.micro_batch_size = Some(local);
            if let Some((key, _)) = given {
                self.set("batch.micro_batch_size", key);
            }
            plan.batch.grad_accum_steps = accum;
        }

        // Sharding policy: [parallelism] over the brief [training] key of early 2025.
        let reshard = |key: &str, s: &str| -> Result<Option<bool>> {
            match s.trim().to_ascii_lowercase().as_str() {
                "default" => Ok(pp_on.then_some(false)),
                "always" => Ok(Some(true)),
                "never" => Ok(Some(false)),
                _ => Err(Error::invalid(
                    key,
                    format!("{s:?}"),
                    "one of default, always, never",
                )),
            }
        };
        let mut policy: Option<(&str, &str, Option<bool>)> = None;
        for (key, v) in [
            (
                "parallelism.fsdp_reshard_after_forward",
                &cfg.parallelism.fsdp_reshard_after_forward,
            ),
            (
                "training.fsdp_reshard_after_forward",
                &t.fsdp_reshard_after_forward,
            ),
        ] {
            let Some(s) = v else { continue };
            let r = reshard(key, s)?;
            match policy {
                None => policy = Some((key, s, r)),
                Some((winner, _, w)) if w != r => {
                    self.warn(key, format!("{key} = {s:?} is overridden by {winner}"))
                }
                Some(_) => {}
            }
        }
        plan.reshard_after_forward = match policy {
            None => pp_on.then_some(false),
            Some((key, _, r)) => {
                self.set("reshard_after_forward", key);
                r
            }
        };
        // "always" reshards [norm, output] too, a unit of its own from 2025 on.
        let always = policy.is_some_and(|(_, s, _)| s.trim().eq_ignore_ascii_case("always"));

        // Precision and offload.
        plan.precision.param = dtype("training.mixed_precision_param", &t.mixed_precision_param)?;
        plan.precision.reduce =
            dtype("training.mixed_precision_reduce", &t.mixed_precision_reduce)?;
        plan.precision.master = dtype("training.dtype", &t.dtype)?;
        for (field, key, v) in [
            (
                "precision.param",
                "training.mixed_precision_param",
                &plan.precision.param,
            ),
            (
                "precision.reduce",
                "training.mixed_precision_reduce",
                &plan.precision.reduce,
            ),
            ("precision.master", "training.dtype", &plan.precision.master),
        ] {
            if v.is_some() {
                self.set(field, key);
            }
        }
        plan.offload = t
            .enable_cpu_offload
            .map(|on| if on { "full" } else { "none" }.to_string());
        if t.enable_cpu_offload.is_some() {
            self.set("offload", "training.enable_cpu_offload");
        }

        // Activation checkpointing.
        let ac = &cfg.activation_checkpoint;
        plan.activation_checkpointing = Some(checkpointing(ac)?);
        let selective = ac
            .mode
            .as_deref()
            .is_none_or(|m| m.trim().eq_ignore_ascii_case("selective"));
        if selective && ac.selective_ac_option.is_some() {
            self.set(
                "activation_checkpointing",
                "activation_checkpoint.selective_ac_option",
            );
        } else if ac.mode.is_some() {
            self.set("activation_checkpointing", "activation_checkpoint.mode");
        }

        // Float8 and compile.
        let from_converters = match &cfg.model.converters {
            None => None,
            Some(list) => Some(converters(list)?),
        };
        let linear = cfg.float8.enable_float8_linear;
        plan.float8 = match (from_converters, linear) {
            (Some(true), _) => Some(true),
            (c, linear) => linear.or(c),
        };
        match (from_converters, linear) {
            (Some(true), _) | (Some(false), None) => self.set("float8", "model.converters"),
            (_, Some(_)) => self.set("float8", "float8.enable_float8_linear"),
            (None, None) => {}
        }
        plan.compile = cfg.compile.enable.or(t.compile);
        if cfg.compile.enable.is_some() {
            self.set("compile", "compile.enable");
        } else if t.compile.is_some() {
            self.set("compile", "training.compile");
        }

        // Optimizer.
        let o = &cfg.optimizer;
        plan.optimizer = match o.name.as_deref() {
            None => None,
            Some(n) => Some(
                match n.trim().to_ascii_lowercase().as_str() {
                    "adamw" => "adamw",
                    "adam" => "adam",
                    _ => {
                        return Err(Error::invalid(
                            "optimizer.name",
                            format!("{n:?}"),
                            "one of AdamW, Adam (the optimizers torchtitan builds)",
                        ))
                    }
                }
                .to_string(),
            ),
        };
        if o.name.is_some() {
            self.set("optimizer", "optimizer.name");
        }
        plan.implementation.optimizer = match (o.implementation.as_deref(), o.fused) {
            (Some(s), _) => Some(
                match s.trim().to_ascii_lowercase().as_str() {
                    "fused" => "fused",
                    "foreach" => "foreach",
                    "for-loop" => "per-param",
                    "fused_opt_states_bf16" => "fused-bf16-states",
                    _ => {
                        return Err(Error::invalid(
                            "optimizer.implementation",
                            format!("{s:?}"),
                            "one of fused, foreach, for-loop, fused_opt_states_bf16",
                        ))
                    }
                }
                .to_string(),
            ),
            (None, Some(true)) => Some("fused".to_string()),
            (None, Some(false)) => Some("foreach".to_string()),
            (None, None) => None,
        };
        if o.implementation.is_some() {
            self.set("implementation.optimizer", "optimizer.implementation");
        } else if o.fused.is_some() {
            self.set("implementation.optimizer", "optimizer.fused");
        }
        // Ring attention's rotation: [parallelism] from March 2025, [experimental] before.
        for (key, v) in [
            (
                "parallelism.context_parallel_rotate_method",
                &cfg.parallelism.context_parallel_rotate_method,
            ),
            (
                "experimental.context_parallel_rotate_method",
                &cfg.experimental.context_parallel_rotate_method,
            ),
        ] {
            if let (Some(m), None) = (v, &plan.parallel.cp_rotate) {
                plan.parallel.cp_rotate = Some(m.clone());
                self.set("parallel.cp_rotate", key);
            }
        }
        // torchtitan computes the loss on vocabulary-sharded logits unless told not to.
        for (key, v) in [
            (
                "parallelism.disable_loss_parallel",
                cfg.parallelism.disable_loss_parallel,
            ),
            (
                "training.disable_loss_parallel",
                cfg.training.disable_loss_parallel,
            ),
        ] {
            if let Some(off) = v {
                if plan.implementation.loss_parallel.is_none() {
                    plan.implementation.loss_parallel = Some(!off);
                    self.set("implementation.loss_parallel", key);
                }
            }
        }
        // A torchtitan 0.3 config ([`from_json_str`]: its saved `Trainer.Config`; or a TOML
        // written with its keys): the `torchtitan-0.3` preset (measured with torchtitan
        // 0.3.0's own step on CPU: docs/research/torchtitan-0.3.0-measured.md), its chunked
        // loss from `loss.num_chunks` (a `[loss]` without it is the plain cross-entropy),
        // `training.disable_cuda_graphs` deciding whether gradients survive `zero_grad`, and
        // selective (op) checkpointing when none is named (0.3's `Trainer.Config` default).
        let layout_03 = self.lines.iter().any(|(k, _)| {
            k.starts_with("loss.")
                || k == "training.disable_cuda_graphs"
                || k == "parallelism.spmd_backend"
                || k == "parallelism.enable_sequence_parallel"
                || k == "parallelism.enable_fsdp_symm_mem"
        });
        if layout_03 && plan.preset.is_none() {
            plan.preset = Some("torchtitan-0.3".to_string());
            if always && plan.implementation.fsdp_units.is_none() {
                plan.implementation.fsdp_units = Some("split-always".to_string());
            }
            match cfg.loss.num_chunks {
                Some(n) => {
                    plan.implementation.logits = Some("chunked".to_string());
                    plan.implementation.loss_chunks = Some(n);
                    self.set("implementation.logits", "loss.num_chunks");
                    self.set("implementation.loss_chunks", "loss.num_chunks");
                }
                None if self.lines.iter().any(|(k, _)| k.starts_with("loss.")) => {
                    plan.implementation.logits = Some("float-in-loss".to_string());
                    self.set("implementation.logits", "loss");
                }
                None => {}
            }
            if let Some(off) = cfg.training.disable_cuda_graphs {
                plan.implementation.zero_grad =
                    Some(if off { "set-to-none" } else { "zeros" }.to_string());
                self.set("implementation.zero_grad", "training.disable_cuda_graphs");
            }
            // 0.3 has only op-level selective checkpointing (`SelectiveAC`).
            let ac = &cfg.activation_checkpoint;
            let selective = ac
                .mode
                .as_deref()
                .is_none_or(|m| m.trim().eq_ignore_ascii_case("selective"));
            if selective && ac.selective_ac_option.is_none() {
                plan.activation_checkpointing = Some("selective-op".to_string());
            }
            self.note = Some(format!(
                "torchtitan config {}: a torchtitan 0.3 config: preset torchtitan-0.3 (measured \
                 against torchtitan 0.3.0's own step)",
                self.origin
            ));
        }
        // A config of the 2025 layout is a torchtitan of 0.1 to 0.2.x, whose step differs
        // from the December 2024 one memplan models (measured with torchtitan 0.2.2's own code
        // on CPU: docs/research/torchtitan-0.2.2-measured.md). Said, not hidden.
        let layout_2025 = self.lines.iter().any(|(k, _)| {
            k.starts_with("parallelism.")
                || k.starts_with("compile.")
                || k == "training.local_batch_size"
        });
        if layout_2025 && plan.preset.is_none() {
            plan.preset = Some("torchtitan-0.2".to_string());
            if always && plan.implementation.fsdp_units.is_none() {
                plan.implementation.fsdp_units = Some("split-always".to_string());
            }
            self.note = Some(format!(
                "torchtitan config {}: a 2025-layout config (torchtitan 0.1 to 0.2.x): preset \
                 torchtitan-0.2 (measured against torchtitan 0.2.2's own step)",
                self.origin
            ));
        }
        Ok(plan)
    }
}

/// A suggestion for an unknown `key` in `section`, as "section.key": a known key of the section
/// one or two edits away (a typo), else the same key in another section (the right key in the
/// wrong place), else a known key of the section up to a quarter of its length away.
fn suggest(section: &str, key: &str) -> Option<String> {
    let lower = key.to_ascii_lowercase();
    let len = lower.chars().count();
    // Keys are short; a long one is no typo of a known key, and would be slow to compare.
    if len > 64 {
        return None;
    }
    let closest = keys_of(TORCHTITAN_KEYS, section)
        .iter()
        .chain(keys_of(MEMPLAN_ONLY_KEYS, section))
        .map(|k| (edit_distance(&lower, k), *k))
        .min_by_key(|(d, _)| *d);
    let within = |limit: usize| {
        closest
            .filter(|(d, _)| *d <= limit)
            .map(|(_, k)| format!("{section}.{k}"))
    };
    within(2)
        .or_else(|| elsewhere(section, &lower))
        .or_else(|| within(len / 4))
}

/// `key` in the first other section where torchtitan has it, as "section.key".
fn elsewhere(section: &str, key: &str) -> Option<String> {
    SUGGEST_ORDER
        .iter()
        .filter(|s| **s != section)
        .find(|s| keys_of(TORCHTITAN_KEYS, s).contains(&key))
        .map(|s| format!("{s}.{key}"))
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

fn accepted_models() -> String {
    let pairs: Vec<String> = MODELS.iter().map(|(n, f, _)| format!("{n} {f}")).collect();
    format!("one of {}", pairs.join(", "))
}

fn model_name(m: &Model) -> Result<&'static str> {
    // torchtitan's default model name is llama3 (2025); its default flavor, debugmodel, has no
    // memplan profile.
    let name = m.name.as_deref().unwrap_or("llama3").trim();
    if !MODELS.iter().any(|(n, _, _)| n.eq_ignore_ascii_case(name)) {
        return Err(Error::invalid(
            "model.name",
            format!("{name:?}"),
            format!("a model memplan has a profile for: {}", accepted_models()),
        ));
    }
    let Some(flavor) = m.flavor.as_deref().map(str::trim) else {
        return Err(Error::invalid(
            "model.flavor",
            "nothing (torchtitan would train its debugmodel, which memplan has no profile for)",
            accepted_models(),
        ));
    };
    MODELS
        .iter()
        .find(|(n, f, _)| n.eq_ignore_ascii_case(name) && f.eq_ignore_ascii_case(flavor))
        .map(|(_, _, profile)| *profile)
        .ok_or_else(|| {
            let known: Vec<&str> = MODELS
                .iter()
                .filter(|(n, _, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, f, _)| *f)
                .collect();
            Error::invalid(
                "model.flavor",
                format!("{flavor:?}"),
                format!(
                    "for {name} one of {} (memplan has profiles for these; debug and other \
                     flavors have none)",
                    known.join(", ")
                ),
            )
        })
}

/// Whether `model.converters` turns float8 on; converters memplan cannot model are rejected.
fn converters(list: &StringList) -> Result<bool> {
    let mut float8 = false;
    for c in list.items() {
        match c.to_ascii_lowercase().as_str() {
            "float8"
            | "quantize.linear.float8"
            | "quantize.dense.float8"
            | "quantize.grouped_mm.float8"
            | "quantize.moe.float8" => float8 = true,
            _ => {
                return Err(Error::invalid(
                    "model.converters",
                    format!("{c:?}"),
                    "float8 converters only (float8, quantize.linear.float8, \
                     quantize.grouped_mm.float8); memplan does not model MX or other converters",
                ))
            }
        }
    }
    Ok(float8)
}

/// Micro-batches under pipeline parallelism: their size and count per local batch, and the
/// key that set them (none when both are torchtitan's defaults).
struct Microbatches {
    size: i64,
    count: i64,
    key: Option<String>,
}

fn pipeline_microbatches(
    cfg: &JobConfig,
    local: i64,
    local_key: &str,
    pp: i64,
) -> Result<Microbatches> {
    let (section, par) = pipeline_section(cfg);
    if let Some(mb) = par.pipeline_parallel_microbatch_size {
        let key = format!("{section}.pipeline_parallel_microbatch_size");
        let mb = positive(&key, mb)?;
        if local % mb != 0 {
            return Err(Error::invalid(
                &key,
                mb,
                format!("a divisor of the local batch size ({local})"),
            ));
        }
        return Ok(Microbatches {
            size: mb,
            count: local / mb,
            key: Some(key),
        });
    }
    // 2024 and early 2025: a count, defaulting to the pipeline degree. From April 2025 the
    // size defaults to 1 (so the count to the local batch); the [parallelism] layout gets that.
    let key = format!("{section}.pipeline_parallel_microbatches");
    let count = match par.pipeline_parallel_microbatches {
        Some(n) => positive(&key, n)?,
        None if section == "experimental" => pp,
        None => local,
    };
    if local % count != 0 {
        return Err(match par.pipeline_parallel_microbatches {
            Some(_) => Error::invalid(
                &key,
                count,
                format!("a divisor of the local batch size ({local})"),
            ),
            None => Error::invalid(
                local_key,
                local,
                format!(
                    "a multiple of the pipeline micro-batches, which {key} leaves at \
                     pipeline_parallel_degree ({count})"
                ),
            ),
        });
    }
    Ok(Microbatches {
        size: local / count,
        count,
        key: par.pipeline_parallel_microbatches.map(|_| key),
    })
}

/// The section that holds the pipeline keys: `[parallelism]`, or 2024's `[experimental]`.
fn pipeline_section(cfg: &JobConfig) -> (&'static str, &Parallelism) {
    let e = &cfg.experimental;
    let in_experimental =
        e.pipeline_parallel_degree.is_some() && cfg.parallelism.pipeline_parallel_degree.is_none();
    if in_experimental {
        ("experimental", e)
    } else {
        ("parallelism", &cfg.parallelism)
    }
}

/// Virtual stages per rank, and the key that set them (none for the default).
type Stages = (i64, Option<String>);

/// memplan schedule and virtual stages per rank for torchtitan's `pipeline_parallel_schedule`,
/// with the key that set the stages (none for the default of 2).
fn pipeline_schedule(
    cfg: &JobConfig,
    pp: i64,
    plan: &PlanFile,
) -> Result<(&'static str, Option<Stages>)> {
    let (section, par) = pipeline_section(cfg);
    if par
        .pipeline_parallel_schedule_csv
        .as_deref()
        .is_some_and(|s| !s.trim().is_empty())
    {
        return Err(Error::invalid(
            &format!("{section}.pipeline_parallel_schedule_csv"),
            format!(
                "{:?}",
                par.pipeline_parallel_schedule_csv.as_deref().unwrap_or("")
            ),
            "no schedule file (memplan cannot read one; name the closest schedule in \
             pipeline_parallel_schedule instead)",
        ));
    }
    let key = format!("{section}.pipeline_parallel_schedule");
    let name = par.pipeline_parallel_schedule.as_deref().unwrap_or("1F1B");
    let schedule = match name.trim().to_ascii_lowercase().as_str() {
        "1f1b" => "1f1b",
        "gpipe" => "gpipe",
        "interleaved1f1b" => "interleaved-1f1b",
        "interleavedzerobubble" | "zbvzerobubble" => "zb-h1",
        _ => {
            return Err(Error::invalid(
                &key,
                format!("{name:?}"),
                "one of 1F1B, GPipe, Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble \
                 (the schedules memplan models)",
            ))
        }
    };
    if schedule != "interleaved-1f1b" {
        return Ok((schedule, None));
    }
    // Stages per rank of a looped schedule: torchtitan's pipeline_llm (2025) and
    // generate_split_points (2024) default to 2, and a looped schedule needs at least 2.
    let per_rank = |key: String, stages: i64| -> Result<Stages> {
        if stages % pp != 0 || stages / pp < 2 {
            return Err(Error::invalid(
                &key,
                format!("a value giving {stages} stages"),
                format!(
                    "at least 2 stages per rank for Interleaved1F1B, a multiple of \
                     pipeline_parallel_degree ({pp})"
                ),
            ));
        }
        Ok((stages / pp, Some(key)))
    };
    let stages = if let Some(lps) = par.pipeline_parallel_layers_per_stage {
        let key = format!("{section}.pipeline_parallel_layers_per_stage");
        let lps = positive(&key, lps)?;
        let first = non_negative(
            &format!("{section}.pipeline_parallel_first_stage_less_layers"),
            par.pipeline_parallel_first_stage_less_layers.unwrap_or(1),
        )?;
        let last = non_negative(
            &format!("{section}.pipeline_parallel_last_stage_less_layers"),
            par.pipeline_parallel_last_stage_less_layers.unwrap_or(1),
        )?;
        let model = profiles::model(plan.model.as_deref().unwrap_or_default())?;
        let layers = i64::try_from(model.layers).unwrap_or(i64::MAX);
        per_rank(key, (layers + first + last + lps - 1) / lps)?
    } else if let Some(parts) = &par.module_fqns_per_model_part {
        let n = i64::try_from(parts.len()).unwrap_or(i64::MAX);
        per_rank(format!("{section}.module_fqns_per_model_part"), n)?
    } else if let Some(points) = &par.pipeline_parallel_split_points {
        let n = i64::try_from(points.items().len()).unwrap_or(i64::MAX);
        per_rank(format!("{section}.pipeline_parallel_split_points"), n + 1)?
    } else {
        (2, None)
    };
    Ok((schedule, Some(stages)))
}

fn checkpointing(ac: &ActivationCheckpoint) -> Result<String> {
    let mode = ac.mode.as_deref().unwrap_or("selective");
    match mode.trim().to_ascii_lowercase().as_str() {
        "none" => Ok("none".into()),
        "full" => Ok("full".into()),
        "selective" => {
            let option = match &ac.selective_ac_option {
                None => "2".to_string(),
                Some(StringOrInt::Str(s)) => s.trim().to_ascii_lowercase(),
                Some(StringOrInt::Int(n)) => n.to_string(),
            };
            let bad = || {
                let got = match &ac.selective_ac_option {
                    Some(StringOrInt::Int(n)) => n.to_string(),
                    Some(StringOrInt::Str(s)) => format!("{s:?}"),
                    None => String::new(),
                };
                Error::invalid(
                    "activation_checkpoint.selective_ac_option",
                    got,
                    "\"op\" or a layer frequency such as \"2\"",
                )
            };
            if option == "op" {
                return Ok("selective-op".into());
            }
            if !option.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            match option.parse::<u64>() {
                // torchtitan: `if not ac_freq or count % ac_freq == 0`: 0 wraps every block.
                Ok(0) => Ok("full".into()),
                Ok(k) if k <= MAX_DIM => Ok(format!("selective-layer:{k}")),
                _ => Err(bad()),
            }
        }
        _ => Err(Error::invalid(
            "activation_checkpoint.mode",
            format!("{mode:?}"),
            "one of none, full, selective (memory_budget is not modelled)",
        )),
    }
}

fn dtype(key: &str, v: &Option<String>) -> Result<Option<String>> {
    let Some(s) = v else { return Ok(None) };
    match s.trim().to_ascii_lowercase().as_str() {
        "bfloat16" => Ok(Some("bf16".into())),
        "float32" => Ok(Some("fp32".into())),
        _ => Err(Error::invalid(
            key,
            format!("{s:?}"),
            "one of bfloat16, float32",
        )),
    }
}

fn positive(key: &str, v: i64) -> Result<i64> {
    crate::plan::bounded(key, v, 1)
}

fn non_negative(key: &str, v: i64) -> Result<i64> {
    crate::plan::bounded(key, v, 0)
}

/// `data_parallel_shard_degree`: -1 (the ranks the other degrees leave) or a degree.
fn shard_degree(key: &str, v: i64) -> Result<i64> {
    if v == -1 {
        return Ok(-1);
    }
    positive(key, v).map_err(|_| shard_degree_error(key, v))
}

fn shard_degree_error(key: &str, v: i64) -> Error {
    Error::invalid(
        key,
        v,
        format!("-1 (the ranks the other degrees leave) or an integer from 1 to {MAX_DIM}"),
    )
}

/// 1-based line and column of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The TOML parses but a key memplan reads has the wrong type: find that key by deserializing
/// one key at a time, and report it with its line.
fn type_error(text: &str, origin: &str, doc: &toml::Table, e: &toml::de::Error) -> Error {
    let line = e
        .span()
        .map(|s| format!(" ({origin} line {})", line_col(text, s.start).0))
        .unwrap_or_else(|| format!(" ({origin})"));
    let fails = |section: &str, value: toml::Value| {
        let mut one = toml::Table::new();
        one.insert(section.to_string(), value);
        toml::Value::Table(one).try_into::<JobConfig>().err()
    };
    for section in SECTIONS {
        let Some(value) = doc.get(*section) else {
            continue;
        };
        let Some(err) = fails(section, value.clone()) else {
            continue;
        };
        let toml::Value::Table(table) = value else {
            return Error::invalid(
                section,
                format!("{}{line}", short(value)),
                "a table of settings",
            );
        };
        for (key, v) in table {
            let mut single = toml::Table::new();
            single.insert(key.clone(), v.clone());
            if let Some(err) = fails(section, toml::Value::Table(single)) {
                return Error::invalid(
                    &format!("{section}.{key}"),
                    format!("{}{line}", short(v)),
                    expected(err.message()),
                );
            }
        }
        return Error::input(format!(
            "torchtitan config {origin}: [{section}]{line}: {}",
            one_line(err.message())
        ));
    }
    Error::input(format!(
        "torchtitan config {origin}{line}: {}",
        one_line(e.message())
    ))
}

/// A TOML value as the user wrote it, cut short if long.
fn short(v: &toml::Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}

/// What serde expected, in words: "invalid type: string \"x\", expected i64" -> "an integer".
fn expected(message: &str) -> String {
    let tail = message
        .rsplit_once(", expected ")
        .map_or(message, |(_, t)| t)
        .trim();
    match tail {
        "i64" | "u64" | "i32" | "u32" => "an integer".to_string(),
        "a sequence" => "an array".to_string(),
        t if t.starts_with("struct ") || t.starts_with("a map") => "a table".to_string(),
        t => one_line(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> PlanFile {
        from_toml_str(text, "t.toml").unwrap().plan
    }

    fn err(text: &str) -> String {
        from_toml_str(text, "t.toml").unwrap_err().to_string()
    }

    const LLAMA3_8B: &str = "[model]\nname = \"llama3\"\nflavor = \"8B\"\n";

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_col("a\nbc\n", 0), (1, 1));
        assert_eq!(line_col("a\nbc\n", 3), (2, 2));
    }

    #[test]
    fn serde_messages_become_words() {
        assert_eq!(
            expected("invalid type: string \"x\", expected i64"),
            "an integer"
        );
        assert_eq!(
            expected("invalid type: integer `1`, expected a boolean"),
            "a boolean"
        );
        assert_eq!(
            expected("a string or an array of strings"),
            "a string or an array of strings"
        );
    }

    #[test]
    fn torchtitan_defaults_fill_what_the_file_leaves_out() {
        let p = plan(LLAMA3_8B);
        assert_eq!(p.batch.micro_batch_size, Some(8));
        assert_eq!(p.batch.seq_len, Some(2048));
        assert_eq!(p.batch.grad_accum_steps, None);
        assert_eq!(p.parallel.dp_shard, Some(-1));
        assert_eq!(
            p.activation_checkpointing.as_deref(),
            Some("selective-layer:2")
        );
        assert_eq!(p.reshard_after_forward, None);
        assert_eq!(p.implementation.optimizer, None);
        assert_eq!(p.num_gpus, None);
        assert_eq!(p.batch.ignore_max_position, Some(true));
    }

    #[test]
    fn selective_ac_option_zero_checkpoints_every_block() {
        let p = plan(&format!(
            "{LLAMA3_8B}[activation_checkpoint]\nmode = \"selective\"\nselective_ac_option = \"0\"\n"
        ));
        assert_eq!(p.activation_checkpointing.as_deref(), Some("full"));
        let p = plan(&format!(
            "{LLAMA3_8B}[activation_checkpoint]\nselective_ac_option = 3\n"
        ));
        assert_eq!(
            p.activation_checkpointing.as_deref(),
            Some("selective-layer:3")
        );
    }

    #[test]
    fn a_section_that_is_not_a_table_is_named() {
        let e = err(&format!("training = 3\n{LLAMA3_8B}"));
        assert!(
            e.starts_with("invalid training: got 3 (t.toml line 1)"),
            "{e}"
        );
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("local_batchsize", "local_batch_size"), 1);
        assert_eq!(edit_distance("seqlen", "seq_len"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn suggestions_prefer_a_near_typo_then_the_same_key_elsewhere() {
        assert_eq!(
            suggest("training", "local_batchsize").as_deref(),
            Some("training.local_batch_size")
        );
        assert_eq!(
            suggest("training", "pipeline_parallel_degree").as_deref(),
            Some("parallelism.pipeline_parallel_degree")
        );
        assert_eq!(suggest("training", "zzz"), None);
        assert_eq!(suggest("training", &"x".repeat(10_000)), None);
    }

    #[test]
    fn known_key_lists_are_sorted_without_repeats_and_cover_each_section() {
        for table in [TORCHTITAN_KEYS, MEMPLAN_ONLY_KEYS] {
            for (section, keys) in table {
                assert!(SECTIONS.contains(section), "{section}");
                if std::ptr::eq(table, TORCHTITAN_KEYS) {
                    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{section}");
                }
            }
        }
        for section in SECTIONS {
            assert!(!keys_of(TORCHTITAN_KEYS, section).is_empty(), "{section}");
            for key in keys_of(MEMPLAN_ONLY_KEYS, section) {
                assert!(
                    !keys_of(TORCHTITAN_KEYS, section).contains(key),
                    "{section}.{key} is torchtitan's"
                );
            }
        }
    }

    /// Every key memplan deserializes is either torchtitan's or listed as memplan's own, and
    /// is really read: a table in its place is a type error naming it.
    #[test]
    fn every_key_memplan_reads_is_known() {
        let parallel = [
            "data_parallel_replicate_degree",
            "data_parallel_shard_degree",
            "tensor_parallel_degree",
            "pipeline_parallel_degree",
            "context_parallel_degree",
            "expert_parallel_degree",
            "expert_tensor_parallel_degree",
            "pipeline_parallel_schedule",
            "pipeline_parallel_schedule_csv",
            "pipeline_parallel_microbatch_size",
            "pipeline_parallel_microbatches",
            "pipeline_parallel_layers_per_stage",
            "pipeline_parallel_first_stage_less_layers",
            "pipeline_parallel_last_stage_less_layers",
            "pipeline_parallel_split_points",
            "module_fqns_per_model_part",
        ];
        let read: &[(&str, &[&str])] = &[
            ("model", &["name", "flavor", "converters"]),
            (
                "training",
                &[
                    "local_batch_size",
                    "batch_size",
                    "global_batch_size",
                    "gradient_accumulation_steps",
                    "seq_len",
                    "mixed_precision_param",
                    "mixed_precision_reduce",
                    "dtype",
                    "enable_cpu_offload",
                    "compile",
                    "data_parallel_replicate_degree",
                    "data_parallel_shard_degree",
                    "tensor_parallel_degree",
                    "fsdp_reshard_after_forward",
                ],
            ),
            ("parallelism", &parallel),
            ("parallelism", &["fsdp_reshard_after_forward"]),
            ("experimental", &parallel),
            ("activation_checkpoint", &["mode", "selective_ac_option"]),
            ("float8", &["enable_float8_linear"]),
            ("compile", &["enable"]),
            ("optimizer", &["name", "implementation", "fused"]),
        ];
        for (section, keys) in read {
            for key in *keys {
                assert!(
                    keys_of(TORCHTITAN_KEYS, section).contains(key)
                        || keys_of(MEMPLAN_ONLY_KEYS, section).contains(key),
                    "{section}.{key}"
                );
                // The type error comes before anything is mapped.
                let text = format!("[{section}]\n{key} = {{ x = 1 }}\n");
                let e = from_toml_str(&text, "t.toml").unwrap_err();
                assert_eq!(e.field(), Some(format!("{section}.{key}").as_str()), "{e}");
            }
        }
    }

    #[test]
    fn comma_separated_converters_are_split() {
        let p = plan("[model]\nname = \"llama3\"\nflavor = \"8B\"\nconverters = \"float8\"\n");
        assert_eq!(p.float8, Some(true));
        let e = err("[model]\nname = \"llama3\"\nflavor = \"8B\"\nconverters = [\"mx\"]\n");
        assert!(
            e.contains("model.converters") && e.contains("\"mx\""),
            "{e}"
        );
    }
}
