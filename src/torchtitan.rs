//! torchtitan job configs (TOML) as plan input: `memplan estimate --torchtitan train.toml`.
//!
//! A torchtitan user already has the file that says what to train; this module reads it into a
//! [`PlanFile`] so the question "will this fit" needs no second description of the job. The
//! serde types below mirror torchtitan's config sections with every key optional; keys memplan
//! does not need (dataset, lr, checkpointing, ...) are ignored, as are unknown sections. The
//! world size is not in the file (torchrun supplies it), so `num_gpus` and `gpu` stay unset for
//! the CLI to fill; `batch.ignore_max_position` is set because torchtitan computes rotary
//! frequencies for whatever `seq_len` it is given.
//!
//! # Sources
//! pytorch/torchtitan at two layouts, both accepted, newest key winning where both appear:
//! - 2024: `torchtitan/config_manager.py` and `train_configs/llama3_{8b,70b,405b}.toml` at
//!   f6a9daa (2024-12-20): degrees under `[training]` and `[experimental]`, `batch_size`,
//!   `[float8] enable_float8_linear`, `training.compile`, `optimizer.fused`.
//! - 2025: `torchtitan/config/job_config.py` and
//!   `torchtitan/models/llama3/train_configs/llama3_*.toml` at 9810191~1 (2026-02-23, the last
//!   TOML layout): `[parallelism]` (from 785c34c, 2025-03-18), `local_batch_size` and
//!   `global_batch_size` (8570415, 2025-06-05), `model.converters` (57387af, 2025-02-15),
//!   `[compile] enable` (08b8b24, 2025-08-20), `optimizer.implementation` (6e49885, 2025-02-24).
//!
//! # Mapping
//! | torchtitan key | plan key |
//! |---|---|
//! | `model.name` + `model.flavor`: llama3 8B (also 8B_flex, 8B_varlen), 70B, 405B; llama2 7B, 13B | `model`: llama3-8b, llama3-70b, llama3.1-405b, llama2-7b, llama2-13b |
//! | `model.converters` containing `float8` or `quantize.{linear,dense,grouped_mm,moe}.float8`; `float8.enable_float8_linear` | `float8` |
//! | `training.local_batch_size` or `training.batch_size` (default 8) | `batch.micro_batch_size` |
//! | `training.seq_len` (default 2048) | `batch.seq_len` |
//! | `training.gradient_accumulation_steps`, else `global_batch_size / (local_batch_size x dp_replicate x dp_shard)` | `batch.grad_accum_steps` (unset when dp_shard is -1) |
//! | `training.mixed_precision_param`, `mixed_precision_reduce` (bfloat16, float32) | `precision.param`, `precision.reduce` |
//! | `training.dtype` (full bf16 training) | `precision.master` |
//! | `training.enable_cpu_offload` | `offload` full / none |
//! | `compile.enable`, `training.compile` | `compile` |
//! | `data_parallel_replicate_degree`, `data_parallel_shard_degree` (-1 allowed), `tensor_parallel_degree`, `pipeline_parallel_degree`, `context_parallel_degree`, `expert_parallel_degree`, `expert_tensor_parallel_degree` under `[parallelism]`, `[experimental]` or `[training]` | `parallel.dp_replicate`, `dp_shard`, `tp`, `pp`, `cp`, `ep`, `etp` |
//! | `pipeline_parallel_schedule`: 1F1B, GPipe, Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble (others, and a schedule CSV, are rejected) | `parallel.pp_schedule`: 1f1b, gpipe, interleaved-1f1b, zb-h1, zb-h1 (the two looped zero-bubble schedules are estimated as ZB-H1 with one stage per rank) |
//! | stages per rank of Interleaved1F1B: from `pipeline_parallel_layers_per_stage`, `pipeline_parallel_split_points` or `module_fqns_per_model_part`, else 2 | `parallel.pp_virtual_stages` |
//! | with pp > 1: `pipeline_parallel_microbatch_size` (default 1), or the count `pipeline_parallel_microbatches` (2024, default pp) | `batch.micro_batch_size` = the micro-batch, `batch.grad_accum_steps` x= micro-batches per local batch |
//! | `parallelism.fsdp_reshard_after_forward`: always, never, default (= not pp) | `reshard_after_forward` |
//! | `activation_checkpoint.mode` none, full, selective (default) with `selective_ac_option` "op" or "K" (default "2"; "0" checkpoints every block) | `activation_checkpointing`: none, full, selective-op, selective-layer:K |
//! | `optimizer.name` AdamW, Adam | `optimizer` adamw, adam |
//! | `optimizer.implementation` fused, foreach, for-loop; `optimizer.fused` true / false | `implementation.optimizer` fused, foreach, per-param |
//!
//! Where torchtitan's default differs from memplan's and was the same in both layouts (batch 8,
//! selective AC every second block, no resharding under PP), the default is written into the
//! plan, so a file that leaves the key out is estimated as torchtitan would run it. The
//! optimizer kernel is left unset when the file does not name it: torchtitan's default changed
//! from foreach to fused in February 2025, and memplan's foreach default errs on the high side.
//!
//! Malformed TOML is an input error with the file and line; a key of the wrong type, or a value
//! memplan cannot map, is an invalid-value error naming the TOML key.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::plan::{PlanFile, MAX_DIM};
use crate::profiles;

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
];

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

/// Reads a torchtitan job config file into a plan.
pub fn read(path: &Path) -> Result<PlanFile> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    from_toml_str(&text, &path.display().to_string())
}

/// Turns the text of a torchtitan job config into a plan; `origin` (a file name) goes into
/// error messages.
///
/// ```
/// let plan = memplan::torchtitan::from_toml_str(
///     "[model]\nname = \"llama3\"\nflavor = \"8B\"\n[training]\nlocal_batch_size = 2\n",
///     "train.toml",
/// )
/// .unwrap();
/// assert_eq!(plan.model.as_deref(), Some("llama3-8b"));
/// assert_eq!(plan.batch.micro_batch_size, Some(2));
/// assert_eq!(plan.activation_checkpointing.as_deref(), Some("selective-layer:2"));
/// ```
pub fn from_toml_str(text: &str, origin: &str) -> Result<PlanFile> {
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
    convert(&cfg)
}

fn convert(cfg: &JobConfig) -> Result<PlanFile> {
    let mut plan = PlanFile {
        model: Some(model_name(&cfg.model)?.to_string()),
        ..PlanFile::default()
    };
    plan.batch.ignore_max_position = Some(true);

    // Degrees: [parallelism] (2025) over [experimental] and [training] (2024).
    let layers = [
        ("parallelism", cfg.parallelism.degrees()),
        ("experimental", cfg.experimental.degrees()),
        ("training", cfg.training.degrees()),
    ];
    let degree = |key: &str, get: fn(&Degrees) -> Option<i64>| -> Result<Option<i64>> {
        match layers.iter().find_map(|(s, d)| get(d).map(|v| (*s, v))) {
            None => Ok(None),
            Some((s, v)) => positive(&format!("{s}.{key}"), v).map(Some),
        }
    };
    let dp_replicate = degree("data_parallel_replicate_degree", |d| {
        d.data_parallel_replicate_degree
    })?;
    let dp_shard = match layers
        .iter()
        .find_map(|(s, d)| d.data_parallel_shard_degree.map(|v| (*s, v)))
    {
        None | Some((_, -1)) => None,
        Some((s, v)) => Some(degree_or_minus_one(
            &format!("{s}.data_parallel_shard_degree"),
            v,
        )?),
    };
    let pp = degree("pipeline_parallel_degree", |d| d.pipeline_parallel_degree)?;
    let p = &mut plan.parallel;
    p.dp_replicate = dp_replicate;
    p.dp_shard = Some(dp_shard.unwrap_or(-1));
    p.tp = degree("tensor_parallel_degree", |d| d.tensor_parallel_degree)?;
    p.pp = pp;
    p.cp = degree("context_parallel_degree", |d| d.context_parallel_degree)?;
    p.ep = degree("expert_parallel_degree", |d| d.expert_parallel_degree)?;
    p.etp = degree("expert_tensor_parallel_degree", |d| {
        d.expert_tensor_parallel_degree
    })?;

    // Batch.
    let t = &cfg.training;
    let (local_key, local) = match (t.local_batch_size, t.batch_size) {
        (Some(v), _) => ("training.local_batch_size", v),
        (None, Some(v)) => ("training.batch_size", v),
        (None, None) => ("training.local_batch_size", DEFAULT_LOCAL_BATCH),
    };
    let local = positive(local_key, local)?;
    plan.batch.seq_len = Some(positive(
        "training.seq_len",
        t.seq_len.unwrap_or(DEFAULT_SEQ_LEN),
    )?);
    let accum = match (t.gradient_accumulation_steps, t.global_batch_size) {
        (Some(n), _) => Some(positive("training.gradient_accumulation_steps", n)?),
        (None, Some(g)) if g > 0 => match dp_shard {
            // The world size is not in the file: the data-parallel degree is unknown.
            None => None,
            Some(shard) => {
                let g = positive("training.global_batch_size", g)?;
                let per_step = local
                    .checked_mul(dp_replicate.unwrap_or(1))
                    .and_then(|n| n.checked_mul(shard))
                    .ok_or_else(|| Error::overflow("local batch x data-parallel degree"))?;
                if g % per_step != 0 {
                    return Err(Error::invalid(
                        "training.global_batch_size",
                        g,
                        format!(
                            "a multiple of local_batch_size x data_parallel_replicate_degree x \
                             data_parallel_shard_degree ({per_step})"
                        ),
                    ));
                }
                Some(g / per_step)
            }
        },
        (None, _) => None,
    };
    let pp_on = pp.unwrap_or(1) > 1;
    if pp_on {
        let (micro, count) = pipeline_microbatches(cfg, local, pp.unwrap_or(1))?;
        plan.batch.micro_batch_size = Some(micro);
        plan.batch.grad_accum_steps = Some(accum.unwrap_or(1) * count);
        let (schedule, virtual_stages) = pipeline_schedule(cfg, pp.unwrap_or(1), &plan)?;
        plan.parallel.pp_schedule = Some(schedule.to_string());
        plan.parallel.pp_virtual_stages = virtual_stages;
    } else {
        plan.batch.micro_batch_size = Some(local);
        plan.batch.grad_accum_steps = accum;
    }

    // Sharding policy.
    plan.reshard_after_forward = match cfg.parallelism.fsdp_reshard_after_forward.as_deref() {
        None => pp_on.then_some(false),
        Some(s) => match s.trim().to_ascii_lowercase().as_str() {
            "default" => pp_on.then_some(false),
            "always" => Some(true),
            "never" => Some(false),
            _ => {
                return Err(Error::invalid(
                    "parallelism.fsdp_reshard_after_forward",
                    format!("{s:?}"),
                    "one of default, always, never",
                ))
            }
        },
    };

    // Precision and offload.
    plan.precision.param = dtype("training.mixed_precision_param", &t.mixed_precision_param)?;
    plan.precision.reduce = dtype("training.mixed_precision_reduce", &t.mixed_precision_reduce)?;
    plan.precision.master = dtype("training.dtype", &t.dtype)?;
    plan.offload = t
        .enable_cpu_offload
        .map(|on| if on { "full" } else { "none" }.to_string());

    // Activation checkpointing.
    plan.activation_checkpointing = Some(checkpointing(&cfg.activation_checkpoint)?);

    // Float8 and compile.
    let from_converters = match &cfg.model.converters {
        None => None,
        Some(list) => Some(converters(list)?),
    };
    plan.float8 = match (from_converters, cfg.float8.enable_float8_linear) {
        (Some(true), _) => Some(true),
        (c, linear) => linear.or(c),
    };
    plan.compile = cfg.compile.enable.or(t.compile);

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
    plan.implementation.optimizer = match (o.implementation.as_deref(), o.fused) {
        (Some(s), _) => Some(
            match s.trim().to_ascii_lowercase().as_str() {
                "fused" => "fused",
                "foreach" => "foreach",
                "for-loop" => "per-param",
                _ => {
                    return Err(Error::invalid(
                        "optimizer.implementation",
                        format!("{s:?}"),
                        "one of fused, foreach, for-loop",
                    ))
                }
            }
            .to_string(),
        ),
        (None, Some(true)) => Some("fused".to_string()),
        (None, Some(false)) => Some("foreach".to_string()),
        (None, None) => None,
    };
    Ok(plan)
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

/// Micro-batch size and micro-batches per local batch under pipeline parallelism.
fn pipeline_microbatches(cfg: &JobConfig, local: i64, pp: i64) -> Result<(i64, i64)> {
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
        return Ok((mb, local / mb));
    }
    // 2024 and early 2025: a count, defaulting to the pipeline degree. From April 2025 the
    // size defaults to 1 (so the count to the local batch); the [parallelism] layout gets that.
    let count = match par.pipeline_parallel_microbatches {
        Some(n) => positive(&format!("{section}.pipeline_parallel_microbatches"), n)?,
        None if section == "experimental" => pp,
        None => local,
    };
    if local % count != 0 {
        return Err(Error::invalid(
            &format!("{section}.pipeline_parallel_microbatches"),
            count,
            format!("a divisor of the local batch size ({local})"),
        ));
    }
    Ok((local / count, count))
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

/// memplan schedule and virtual stages per rank for torchtitan's `pipeline_parallel_schedule`.
fn pipeline_schedule(
    cfg: &JobConfig,
    pp: i64,
    plan: &PlanFile,
) -> Result<(&'static str, Option<i64>)> {
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
    let per_rank = |key: String, stages: i64| -> Result<i64> {
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
        Ok(stages / pp)
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
        2
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

fn degree_or_minus_one(key: &str, v: i64) -> Result<i64> {
    positive(key, v).map_err(|_| {
        Error::invalid(
            key,
            v,
            format!("-1 (the ranks the other degrees leave) or an integer from 1 to {MAX_DIM}"),
        )
    })
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
        from_toml_str(text, "t.toml").unwrap()
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
