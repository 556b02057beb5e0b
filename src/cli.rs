//! Command-line interface: raw flags (clap) become a [`PlanFile`] overlay, which
//! [`PlanFile::resolve`] turns into a validated plan; commands call the estimator and a
//! renderer.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result, EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT, EXIT_FAILURE, EXIT_FITS};
use crate::estimate::estimate_simulated;
use crate::output::{renderer, Format, Row};
use crate::plan::{self, Plan, PlanFile};
use crate::profiles;
use crate::search::{self, Constraints, RankBy};

mod replay;
mod timeline;

#[derive(Parser, Debug)]
#[command(
    name = "memplan",
    version,
    about = "How much GPU and host memory an LLM training plan needs, and whether it fits"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Estimate one plan: per-GPU breakdown at the peak, host memory, verdict.
    Estimate {
        #[command(flatten)]
        plan: Box<PlanArgs>,
        /// The caching allocator's settings for its simulation, in PYTORCH_CUDA_ALLOC_CONF
        /// syntax, e.g. expandable_segments:True.
        #[arg(long, default_value = "")]
        alloc_conf: String,
        /// Also estimate every pipeline stage's ranks, not only the most loaded one.
        #[arg(long)]
        all_stages: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Put plan files side by side, with the difference of each against the first.
    Compare {
        /// Plan files (JSON); `example:NAME` takes a built-in example.
        #[arg(required = true, num_args = 2..)]
        plans: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Find the plans that fit, best first; or, with --max-batch, the largest micro-batch a
    /// fixed plan allows. Parallel degree, --ac and --offload flags constrain the search.
    Search {
        #[command(flatten)]
        plan: Box<PlanArgs>,
        /// Binary-search the largest micro-batch of the plan as given, instead of searching
        /// layouts.
        #[arg(long)]
        max_batch: bool,
        /// Largest micro-batch tried.
        #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
        max_micro_batch: i64,
        /// LoRA ranks to try, e.g. 8,16,32,64 (turns LoRA on; --lora-targets and
        /// --lora-dropout still apply).
        #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
        lora_ranks: Vec<i64>,
        /// Fraction of GPU memory to keep free, 0 to 0.5.
        #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
        headroom: f64,
        #[arg(long, value_enum, default_value_t = RankBy::Tokens)]
        rank_by: RankBy,
        /// Candidates to print.
        #[arg(long, default_value_t = 10, allow_negative_numbers = true)]
        top: i64,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Train a plan for a few steps on libtorch and print measured peaks per phase beside
    /// the prediction: a real multi-process job over c10d Gloo with --nproc-per-node (or as
    /// a rank torchrun started), else a single-device emulation of FSDP rank 0.
    #[cfg(feature = "trainer")]
    Train {
        #[command(flatten)]
        plan: Box<PlanArgs>,
        #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
        steps: i64,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// CPU runs: device memory available, e.g. 48GB, so the run stands for a GPU of that
        /// size and runs out of memory where it would.
        #[arg(long)]
        device_memory: Option<String>,
        /// Peak learning rate, reached by a linear warmup over the first 10% of the steps
        /// (default: 0.25 / hidden size, at most 3e-3).
        #[arg(long, allow_negative_numbers = true)]
        lr: Option<f64>,
        /// Record the run's device allocations and frees (setup, step 1 and the last step) and
        /// write them to FILE as JSON (schema memplan.trace/1); with --nproc-per-node, rank 0's.
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        #[command(flatten)]
        dist: Box<DistArgs>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Run a matrix of plans through the trainer and report predicted vs measured peaks.
    #[cfg(feature = "trainer")]
    Validate {
        /// cpu (the CI matrix of small models) or a JSON file: a list of {"label", "plan"}.
        #[arg(long, default_value = "cpu")]
        matrix: String,
        #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
        steps: i64,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        quiet: bool,
        /// Fail (exit 1) when any plan's peak error exceeds this percentage.
        #[arg(long, allow_negative_numbers = true)]
        max_error_pct: Option<f64>,
        /// Record every run's allocations and write DIR/LABEL.svg per plan (and rank): the
        /// predicted step as stacked areas, the measured one as a line over it.
        #[arg(long, value_name = "DIR")]
        timeline: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Draw the step: the estimator's allocation events of the most loaded rank (or
    /// --stage) as a picture by category with the capacity line, the out-of-memory moment
    /// and the simulated reserved line (svg, html), as a PyTorch memory_viz snapshot
    /// (memory-viz), or as the event trace (json).
    Timeline {
        #[command(flatten)]
        plan: Box<PlanArgs>,
        /// Pipeline stage to draw (default: the most loaded).
        #[arg(long, allow_negative_numbers = true)]
        stage: Option<i64>,
        /// The caching allocator's settings, in PYTORCH_CUDA_ALLOC_CONF syntax, e.g.
        /// expandable_segments:True or max_split_size_mb:512.
        #[arg(long, default_value = "")]
        alloc_conf: String,
        /// Where to write ("-": stdout; default memplan-timeline.EXT).
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = timeline::TimelineFormat::Svg)]
        format: timeline::TimelineFormat,
    },
    /// Replay a recorded allocation trace (`train --trace FILE.json`, or `timeline --format
    /// json`) through the caching-allocator model: peak reserved, cached free bytes and the
    /// largest free block at the allocated peak, segments, cudaMalloc calls, once per
    /// --alloc-conf, so settings can be compared on a measured step.
    Replay {
        /// The trace (JSON, schema memplan.trace/1).
        trace: PathBuf,
        /// A PYTORCH_CUDA_ALLOC_CONF setting to simulate, e.g. expandable_segments:True;
        /// repeat it to compare several (default: the allocator's defaults).
        #[arg(long)]
        alloc_conf: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// List the shipped model and GPU profiles and example plans.
    Profiles {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// How `train` runs: processes on this node, the job's rendezvous.
#[derive(Args, Debug, Default, Clone)]
pub struct DistArgs {
    /// Start this many rank processes on this node (as torchrun does): a real FSDP2/HSDP or
    /// pipeline, tensor- or context-parallel job over c10d Gloo, world size = nnodes x
    /// nproc-per-node = pp x tp x dp_replicate x dp_shard x cp.
    #[arg(long, allow_negative_numbers = true)]
    pub nproc_per_node: Option<i64>,
    /// Nodes in the job.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub nnodes: i64,
    /// This node's index.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub node_rank: i64,
    /// Address of the node that hosts rank 0's store.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of rank 0's store (0: a free one, single node only).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub master_port: i64,
    /// Seconds a rank waits for its peers before giving up.
    #[arg(long, default_value_t = 60, allow_negative_numbers = true)]
    pub dist_timeout: i64,
    /// Print every rank's log lines, prefixed with its rank.
    #[arg(long)]
    pub verbose: bool,
    /// Force the single-device emulation of FSDP rank 0 (the default without
    /// --nproc-per-node or a torchrun environment).
    #[arg(long, conflicts_with = "nproc_per_node")]
    pub emulate: bool,
}

/// Plan flags. Every flag overrides the same key of `--plan` or `--example`.
#[derive(Args, Debug, Default, Clone)]
pub struct PlanArgs {
    /// Plan file (JSON; schema in the README).
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Built-in example plan, e.g. seed-8b-2x48g-offload (see `memplan profiles`).
    #[arg(long, conflicts_with = "plan")]
    pub example: Option<String>,
    /// A torchtitan job config (TOML, to 0.2.x; or torchtitan 0.3's Trainer.Config as
    /// --debug.save_config_file writes it, JSON); give the world size with --num-gpus and the
    /// GPU with --gpu, as torchrun would.
    #[arg(long, conflicts_with_all = ["plan", "example"])]
    pub torchtitan: Option<PathBuf>,
    /// Model profile name or path to a Hugging Face config.json.
    #[arg(long)]
    pub model: Option<String>,
    /// GPU profile name or path to a GPU profile JSON.
    #[arg(long)]
    pub gpu: Option<String>,
    #[arg(long, allow_negative_numbers = true)]
    pub num_gpus: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub gpus_per_node: Option<i64>,
    /// Host RAM per node, e.g. 512GiB or 1TB.
    #[arg(long)]
    pub host_ram: Option<String>,
    /// FSDP shard degree (-1: whatever the other degrees leave).
    #[arg(long, allow_negative_numbers = true)]
    pub dp_shard: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub dp_replicate: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub tp: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub pp: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub cp: Option<i64>,
    /// Sequence parallelism with TP (default: on when tp > 1).
    #[arg(long)]
    pub sp: Option<bool>,
    /// Expert parallel degree (MoE models).
    #[arg(long, allow_negative_numbers = true)]
    pub ep: Option<i64>,
    /// Tensor parallel degree inside experts.
    #[arg(long, allow_negative_numbers = true)]
    pub etp: Option<i64>,
    /// Pipeline schedule: gpipe, 1f1b, interleaved-1f1b (zb-h1 is refused: not modelled).
    #[arg(long)]
    pub pp_schedule: Option<String>,
    /// Virtual pipeline stages per rank (interleaved schedules).
    #[arg(long, allow_negative_numbers = true)]
    pub pp_virtual_stages: Option<i64>,
    /// How ring attention passes K and V under CP: allgather (torchtitan's default), alltoall.
    #[arg(long)]
    pub cp_rotate: Option<String>,
    /// Allow seq_len beyond the model's max_position_embeddings.
    #[arg(long)]
    pub ignore_max_position: bool,
    /// Float8 training (torchao Float8Linear: fp8 matmul inputs, fp8 all-gather).
    #[arg(long)]
    pub float8: bool,
    /// torch.compile per block (fused norms and activations).
    #[arg(long)]
    pub compile: bool,
    /// Micro-batch size per GPU.
    #[arg(long, alias = "batch", allow_negative_numbers = true)]
    pub micro_batch_size: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub seq_len: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub grad_accum_steps: Option<i64>,
    /// Compute dtype of parameters: fp32, bf16, fp16.
    #[arg(long)]
    pub param_dtype: Option<String>,
    /// Gradient reduction dtype.
    #[arg(long)]
    pub reduce_dtype: Option<String>,
    /// Master weights, gradients and optimizer states dtype.
    #[arg(long)]
    pub master_dtype: Option<String>,
    /// Reach --param-dtype by torch.autocast over the master weights (Transformers'
    /// Trainer bf16=True; torchtitan on one GPU) instead of FSDP's cast copies.
    #[arg(long)]
    pub autocast: bool,
    /// adamw, adam, sgd-momentum, sgd.
    #[arg(long)]
    pub optimizer: Option<String>,
    /// none, full, selective-layer:K, selective-op.
    #[arg(long)]
    pub ac: Option<String>,
    /// none, optimizer, full.
    #[arg(long)]
    pub offload: Option<String>,
    /// Keep every block's gathered parameters from forward to backward.
    #[arg(long)]
    pub no_reshard_after_forward: bool,
    /// flash, efficient, math, flex (FlexAttention with a document block mask).
    #[arg(long)]
    pub attention: Option<String>,
    /// eager, fused, composite.
    #[arg(long)]
    pub rmsnorm: Option<String>,
    /// repeat-kv, native.
    #[arg(long)]
    pub gqa: Option<String>,
    /// float-output, float-output-kept, float-in-loss, float-in-loss-kept, compute-dtype,
    /// chunked (torchtitan 0.3's chunked loss).
    #[arg(long)]
    pub logits: Option<String>,
    /// foreach, fused, per-param, fused-bf16-states (Adam's states in bf16, torchtitan 0.3).
    #[arg(long)]
    pub optimizer_impl: Option<String>,
    /// With TP, compute the loss on vocabulary-sharded logits (default: on, as torchtitan).
    #[arg(long)]
    pub loss_parallel: Option<bool>,
    /// complex (torchtitan's freqs_cis for 2 x seq), complex-seq (for seq, torchtitan of 2025
    /// on), cos-sin (Hugging Face's per-forward cos and sin), per-layer (torchtitan 0.3: a
    /// cache per layer, gathered by positions).
    #[arg(long)]
    pub rotary: Option<String>,
    /// FSDP units and what stays gathered after forward: root-keep-last,
    /// root-resharded-keep-last, root, split, split-always.
    #[arg(long)]
    pub fsdp_units: Option<String>,
    /// Sequence chunks of the chunked loss (--logits chunked; torchtitan 0.3's default 8).
    #[arg(long, allow_negative_numbers = true)]
    pub loss_chunks: Option<i64>,
    /// separate, fused-copies (torchtitan 0.3's one wqkv matmul split into q, k, v copies).
    #[arg(long)]
    pub qkv: Option<String>,
    /// What zero_grad does between steps: set-to-none, zeros (kept; torchtitan 0.3's default).
    #[arg(long)]
    pub zero_grad: Option<String>,
    /// FSDP wraps the model on one GPU too (torchtitan 0.3): compute-dtype copies even in fp32.
    #[arg(long)]
    pub fsdp_one_gpu: Option<bool>,
    /// The framework whose implementation choices are the defaults: torchtitan-2024.12,
    /// torchtitan-0.2, torchtitan-0.3, hf-transformers, plain-pytorch (`memplan profiles`
    /// lists them). Implementation flags still override.
    #[arg(long)]
    pub preset: Option<String>,
    /// LoRA adapter rank on a frozen base (peft's `r`); turns LoRA on.
    #[arg(long, allow_negative_numbers = true)]
    pub lora_rank: Option<i64>,
    /// Linears LoRA wraps: attention (q,k,v,o), all-linear, or a list such as q,v.
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// lora_dropout (only whether it is above zero changes memory).
    #[arg(long, allow_negative_numbers = true)]
    pub lora_dropout: Option<f64>,
    /// QLoRA: the frozen base's linears in bitsandbytes 4-bit, nf4 or nf4-dq (double
    /// quantisation); none by default.
    #[arg(long)]
    pub lora_quant: Option<String>,
    /// DeepSpeed ZeRO stage, 2 or 3, over --num-gpus data-parallel ranks instead of FSDP
    /// (Transformers Trainer / accelerate; implies --preset hf-transformers).
    #[arg(long, allow_negative_numbers = true)]
    pub zero: Option<i64>,
    /// ZeRO's bucket and threshold keys as the Transformers docs' configs write them, "auto"
    /// (filled from the hidden size); without it, DeepSpeed's defaults (accelerate without a
    /// config file).
    #[arg(long)]
    pub zero_auto: bool,
    /// ZeRO reduce_bucket_size: elements (5e8 allowed) or auto.
    #[arg(long)]
    pub zero_reduce_bucket_size: Option<String>,
    /// ZeRO-3 stage3_prefetch_bucket_size: elements or auto.
    #[arg(long)]
    pub zero_prefetch_bucket_size: Option<String>,
    /// ZeRO-3 stage3_param_persistence_threshold: elements or auto.
    #[arg(long)]
    pub zero_param_persistence_threshold: Option<String>,
    /// ZeRO-3 stage3_max_live_parameters.
    #[arg(long)]
    pub zero_max_live_parameters: Option<String>,
    /// ZeRO-3 stage3_max_reuse_distance.
    #[arg(long)]
    pub zero_max_reuse_distance: Option<String>,
    /// ZeRO overlap_comm (default: true for stage 3, false for stage 2).
    #[arg(long)]
    pub zero_overlap_comm: Option<bool>,
    /// ZeRO contiguous_gradients (default true).
    #[arg(long)]
    pub zero_contiguous_gradients: Option<bool>,
}

impl PlanArgs {
    /// The plan file (or example, or torchtitan config) with the flags laid over it, and the
    /// warnings and key names the torchtitan reader gave.
    pub fn to_plan_file(&self) -> Result<PlanFile> {
        Ok(self.load_over(None)?.0)
    }

    /// The plan file with the flags laid over it, and the torchtitan job it came from. The
    /// base is `base` when given (a plan a library caller built), else `--plan`, `--example`
    /// or `--torchtitan`.
    pub fn load_over(
        &self,
        base: Option<PlanFile>,
    ) -> Result<(PlanFile, Option<crate::torchtitan::Job>)> {
        let mut job = None;
        let base = match (base, &self.plan, &self.example, &self.torchtitan) {
            (Some(b), _, _, _) => b,
            (None, Some(p), _, _) => PlanFile::read(p)?,
            (None, None, Some(name), _) => plan::example(name)?,
            (None, None, None, Some(toml)) => {
                let j = crate::torchtitan::read(toml)?;
                if let Some(n) = self.num_gpus {
                    crate::torchtitan::check_world_size(&j, n)?;
                }
                let p = j.plan.clone();
                job = Some(j);
                p
            }
            (None, None, None, None) => PlanFile::default(),
        };
        let mut top = PlanFile {
            model: self.model.clone(),
            gpu: self.gpu.clone(),
            num_gpus: self.num_gpus,
            gpus_per_node: self.gpus_per_node,
            host_ram: self.host_ram.clone().map(serde_json::Value::String),
            optimizer: self.optimizer.clone(),
            activation_checkpointing: self.ac.clone(),
            offload: self.offload.clone(),
            reshard_after_forward: self.no_reshard_after_forward.then_some(false),
            ..PlanFile::default()
        };
        top.parallel = plan::ParallelFile {
            dp_shard: self.dp_shard,
            dp_replicate: self.dp_replicate,
            tp: self.tp,
            pp: self.pp,
            cp: self.cp,
            sp: self.sp,
            ep: self.ep,
            etp: self.etp,
            pp_schedule: self.pp_schedule.clone(),
            pp_virtual_stages: self.pp_virtual_stages,
            cp_rotate: self.cp_rotate.clone(),
            zero: self.zero_file(),
        };
        top.batch = plan::BatchFile {
            micro_batch_size: self.micro_batch_size,
            seq_len: self.seq_len,
            grad_accum_steps: self.grad_accum_steps,
            ignore_max_position: self.ignore_max_position.then_some(true),
        };
        top.float8 = self.float8.then_some(true);
        top.compile = self.compile.then_some(true);
        top.precision = plan::PrecisionFile {
            param: self.param_dtype.clone(),
            reduce: self.reduce_dtype.clone(),
            master: self.master_dtype.clone(),
            autocast: self.autocast.then_some(true),
        };
        top.implementation = plan::ImplementationFile {
            attention: self.attention.clone(),
            rmsnorm: self.rmsnorm.clone(),
            gqa: self.gqa.clone(),
            logits: self.logits.clone(),
            optimizer: self.optimizer_impl.clone(),
            loss_parallel: self.loss_parallel,
            rotary: self.rotary.clone(),
            fsdp_units: self.fsdp_units.clone(),
            loss_chunks: self.loss_chunks,
            qkv: self.qkv.clone(),
            zero_grad: self.zero_grad.clone(),
            fsdp_one_gpu: self.fsdp_one_gpu,
        };
        top.preset = self.preset.clone();
        if self.lora_rank.is_some()
            || self.lora_targets.is_some()
            || self.lora_dropout.is_some()
            || self.lora_quant.is_some()
        {
            top.lora = Some(plan::LoraFile {
                rank: self.lora_rank,
                targets: self.lora_targets.clone(),
                dropout: self.lora_dropout,
                quant: self.lora_quant.clone(),
            });
        }
        // When the flags name the world size but not the FSDP degree, the degree follows the
        // world size rather than a plan file's value. A torchtitan config's explicit degree is
        // kept: it was checked against the world size above, as torchtitan checks it.
        let explicit_toml_shard = job
            .as_ref()
            .is_some_and(|j| j.plan.parallel.dp_shard.is_some_and(|d| d > 0));
        if top.num_gpus.is_some() && top.parallel.dp_shard.is_none() && !explicit_toml_shard {
            top.parallel.dp_shard = Some(-1);
        }
        Ok((base.overlay(top), job))
    }

    /// `parallel.zero` from the --zero flags, None when none is given.
    fn zero_file(&self) -> Option<plan::ZeroFile> {
        // --zero-auto fills the keys the Transformers docs' config of the stage says "auto".
        let text = |v: &Option<String>, stage3: bool| {
            v.clone()
                .or_else(|| {
                    (self.zero_auto && (!stage3 || self.zero != Some(2)))
                        .then(|| "auto".to_string())
                })
                .map(|t| match t.trim().parse::<f64>() {
                    Ok(x) => serde_json::json!(x),
                    Err(_) => serde_json::Value::String(t),
                })
        };
        let z = plan::ZeroFile {
            stage: self.zero,
            reduce_bucket_size: text(&self.zero_reduce_bucket_size, false),
            prefetch_bucket_size: text(&self.zero_prefetch_bucket_size, true),
            param_persistence_threshold: text(&self.zero_param_persistence_threshold, true),
            max_live_parameters: self
                .zero_max_live_parameters
                .clone()
                .map(serde_json::Value::String),
            max_reuse_distance: self
                .zero_max_reuse_distance
                .clone()
                .map(serde_json::Value::String),
            overlap_comm: self.zero_overlap_comm,
            contiguous_gradients: self.zero_contiguous_gradients,
        };
        (z != plan::ZeroFile::default()).then_some(z)
    }

    /// (plan field, flag) for every plan field a flag set, so errors name the flag.
    pub fn flag_fields(&self) -> Vec<(&'static str, &'static str)> {
        let set: [(bool, &str, &str); 28] = [
            (self.model.is_some(), "model", "--model"),
            (self.gpu.is_some(), "gpu", "--gpu"),
            (self.num_gpus.is_some(), "num_gpus", "--num-gpus"),
            (
                self.gpus_per_node.is_some(),
                "gpus_per_node",
                "--gpus-per-node",
            ),
            (self.host_ram.is_some(), "host_ram", "--host-ram"),
            (self.dp_shard.is_some(), "parallel.dp_shard", "--dp-shard"),
            (
                self.dp_replicate.is_some(),
                "parallel.dp_replicate",
                "--dp-replicate",
            ),
            (self.tp.is_some(), "parallel.tp", "--tp"),
            (self.pp.is_some(), "parallel.pp", "--pp"),
            (self.cp.is_some(), "parallel.cp", "--cp"),
            (self.sp.is_some(), "parallel.sp", "--sp"),
            (self.ep.is_some(), "parallel.ep", "--ep"),
            (self.etp.is_some(), "parallel.etp", "--etp"),
            (
                self.pp_schedule.is_some(),
                "parallel.pp_schedule",
                "--pp-schedule",
            ),
            (
                self.pp_virtual_stages.is_some(),
                "parallel.pp_virtual_stages",
                "--pp-virtual-stages",
            ),
            (
                self.micro_batch_size.is_some(),
                "batch.micro_batch_size",
                "--micro-batch-size",
            ),
            (self.seq_len.is_some(), "batch.seq_len", "--seq-len"),
            (
                self.grad_accum_steps.is_some(),
                "batch.grad_accum_steps",
                "--grad-accum-steps",
            ),
            (
                self.param_dtype.is_some(),
                "precision.param",
                "--param-dtype",
            ),
            (
                self.reduce_dtype.is_some(),
                "precision.reduce",
                "--reduce-dtype",
            ),
            (
                self.master_dtype.is_some(),
                "precision.master",
                "--master-dtype",
            ),
            (self.optimizer.is_some(), "optimizer", "--optimizer"),
            (self.ac.is_some(), "activation_checkpointing", "--ac"),
            (self.offload.is_some(), "offload", "--offload"),
            (
                self.attention.is_some(),
                "implementation.attention",
                "--attention",
            ),
            (
                self.rmsnorm.is_some(),
                "implementation.rmsnorm",
                "--rmsnorm",
            ),
            (self.gqa.is_some(), "implementation.gqa", "--gqa"),
            (self.logits.is_some(), "implementation.logits", "--logits"),
        ];
        let mut v: Vec<_> = set
            .iter()
            .filter(|(on, _, _)| *on)
            .map(|(_, f, flag)| (*f, *flag))
            .collect();
        if self.optimizer_impl.is_some() {
            v.push(("implementation.optimizer", "--optimizer-impl"));
        }
        if self.loss_parallel.is_some() {
            v.push(("implementation.loss_parallel", "--loss-parallel"));
        }
        let more = [
            (self.rotary.is_some(), "implementation.rotary", "--rotary"),
            (
                self.fsdp_units.is_some(),
                "implementation.fsdp_units",
                "--fsdp-units",
            ),
            (
                self.loss_chunks.is_some(),
                "implementation.loss_chunks",
                "--loss-chunks",
            ),
            (self.qkv.is_some(), "implementation.qkv", "--qkv"),
            (
                self.zero_grad.is_some(),
                "implementation.zero_grad",
                "--zero-grad",
            ),
            (
                self.fsdp_one_gpu.is_some(),
                "implementation.fsdp_one_gpu",
                "--fsdp-one-gpu",
            ),
            (
                self.cp_rotate.is_some(),
                "parallel.cp_rotate",
                "--cp-rotate",
            ),
            (self.preset.is_some(), "preset", "--preset"),
            (self.lora_rank.is_some(), "lora.rank", "--lora-rank"),
            (
                self.lora_targets.is_some(),
                "lora.targets",
                "--lora-targets",
            ),
            (
                self.lora_dropout.is_some(),
                "lora.dropout",
                "--lora-dropout",
            ),
            (self.lora_quant.is_some(), "lora.quant", "--lora-quant"),
            (self.autocast, "precision.autocast", "--autocast"),
            (self.zero.is_some(), "parallel.zero.stage", "--zero"),
            (
                self.zero_reduce_bucket_size.is_some(),
                "parallel.zero.reduce_bucket_size",
                "--zero-reduce-bucket-size",
            ),
            (
                self.zero_prefetch_bucket_size.is_some(),
                "parallel.zero.prefetch_bucket_size",
                "--zero-prefetch-bucket-size",
            ),
            (
                self.zero_param_persistence_threshold.is_some(),
                "parallel.zero.param_persistence_threshold",
                "--zero-param-persistence-threshold",
            ),
            (
                self.zero_max_live_parameters.is_some(),
                "parallel.zero.max_live_parameters",
                "--zero-max-live-parameters",
            ),
            (
                self.zero_max_reuse_distance.is_some(),
                "parallel.zero.max_reuse_distance",
                "--zero-max-reuse-distance",
            ),
            (
                self.zero_contiguous_gradients.is_some(),
                "parallel.zero.contiguous_gradients",
                "--zero-contiguous-gradients",
            ),
        ];
        v.extend(more.iter().filter(|m| m.0).map(|m| (m.1, m.2)));
        v
    }

    /// Errors about a value the user gave name where they gave it: a flag, or the torchtitan
    /// key it came from.
    pub fn explain(&self, job: Option<&crate::torchtitan::Job>, e: Error) -> Error {
        let flagged = e
            .field()
            .and_then(|f| self.flag_fields().into_iter().find(|(pf, _)| *pf == f));
        match (flagged, job) {
            (Some((field, flag)), _) => e.rename_field(field, flag),
            (None, Some(job)) => job.explain(e),
            (None, None) => e,
        }
    }

    /// What `search` may change: the degrees, checkpointing and offload the flags pin.
    pub fn search_constraints(
        &self,
        max_micro_batch: u64,
        headroom_milli: u64,
        rank_by: RankBy,
    ) -> Result<Constraints> {
        let constraint = |v: Option<i64>| v.filter(|&x| x > 0).map(|x| x as u64);
        Ok(Constraints {
            tp: constraint(self.tp),
            pp: constraint(self.pp),
            cp: constraint(self.cp),
            dp_shard: constraint(self.dp_shard),
            ep: constraint(self.ep),
            ac: self
                .ac
                .as_deref()
                .map(plan::Checkpointing::parse)
                .transpose()
                .map_err(|e| e.rename_field(plan::Checkpointing::FIELD, "--ac"))?,
            offload: self
                .offload
                .as_deref()
                .map(<plan::Offload as plan::Choice>::parse)
                .transpose()
                .map_err(|e| e.rename_field("offload", "--offload"))?,
            lora_ranks: Vec::new(),
            max_micro_batch,
            headroom_milli,
            rank_by,
        })
    }

    /// The resolved plan, with the torchtitan reader's warnings added to the plan's own.
    pub fn resolve(&self) -> Result<Plan> {
        let (file, job) = self.load_over(None)?;
        self.resolve_file(file, job, None)
    }

    /// Resolves `file` (from [`PlanArgs::load_over`]), against `model` when given instead of
    /// the file's model name; errors name the flag or TOML key that gave the value.
    pub fn resolve_file(
        &self,
        file: PlanFile,
        job: Option<crate::torchtitan::Job>,
        model: Option<profiles::ModelSpec>,
    ) -> Result<Plan> {
        let resolved = match model {
            None => file.resolve(),
            Some(spec) => profiles::gpu(file.gpu.as_deref().unwrap_or("h100-80g"))
                .and_then(|gpu| file.resolve_with(spec, gpu)),
        };
        let mut plan = resolved.map_err(|e| self.explain(job.as_ref(), e))?;
        if let Some(job) = job {
            plan.warnings
                .splice(0..0, job.warnings.into_iter().chain(job.note));
        }
        Ok(plan)
    }
}

/// A plan for `compare`: a file path, or `example:NAME`.
fn load_plan(arg: &str) -> Result<(String, Plan)> {
    let file = match arg.strip_prefix("example:") {
        Some(name) => plan::example(name)?,
        None => PlanFile::read(std::path::Path::new(arg))?,
    };
    let label = std::path::Path::new(arg.trim_start_matches("example:"))
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| arg.to_string());
    let plan = file
        .resolve()
        .map_err(|e| e.context(format!("plan {}", crate::input::quote(arg))))?;
    Ok((label, plan))
}

/// Writes `s` to `out`. A closed pipe (`| head`) is not an error worth reporting; any other
/// write error is (exit code 3).
fn print(out: &mut dyn Write, s: &str) -> Result<()> {
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(Error::output),
    }
}

fn warn(err: &mut dyn Write, warnings: &[String]) {
    for w in warnings {
        // Nothing useful can be done if stderr is gone.
        let _ = writeln!(err, "warning: {w}");
    }
}

fn fit_code(fits: bool) -> u8 {
    if fits {
        EXIT_FITS
    } else {
        EXIT_DOES_NOT_FIT
    }
}

/// Whether raw arguments ask for JSON output (`--format json` or `--format=json`), for
/// reporting errors that happen before or while the arguments are parsed.
fn wants_json(args: &[OsString]) -> bool {
    args.iter().enumerate().any(|(i, a)| {
        a == "--format=json" || (a == "--format" && args.get(i + 1).is_some_and(|v| v == "json"))
    })
}

/// The whole program over explicit arguments and streams: parses `args` (the first is the
/// program name), runs the command, writes its output to `out` and warnings and errors to
/// `err`, and returns the exit code: [`EXIT_FITS`], [`EXIT_DOES_NOT_FIT`], [`EXIT_BAD_INPUT`]
/// or [`EXIT_FAILURE`]. With `--format json`, `out` receives exactly one JSON document in
/// every outcome, errors included (schema `memplan.error/1`).
pub fn main_with(
    args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let json = wants_json(&args);
    let result = match Cli::try_parse_from(&args) {
        Ok(cli) => run_to(cli, out, err),
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp
            | clap::error::ErrorKind::DisplayVersion
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let code = if e.kind()
                    == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                {
                    EXIT_BAD_INPUT
                } else {
                    EXIT_FITS
                };
                return match print(out, &e.render().to_string()) {
                    Ok(()) => code,
                    Err(_) => EXIT_FAILURE,
                };
            }
            _ => Err(Error::input(clap_message(&e))),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            if json {
                let doc = crate::output::json::error(&e);
                if print(out, &doc).is_err() {
                    return EXIT_FAILURE;
                }
            }
            e.exit_code()
        }
    }
}

/// [`main_with`], with a panic reported as a one-line internal failure (exit 3) instead of a
/// backtrace and exit code 101: what the binary (and the Python package's command) runs.
pub fn main_guarded(
    args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal failure{at} (please report it): {info}");
    }));
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| main_with(args, out, err)))
        .unwrap_or(EXIT_FAILURE)
}

/// clap's error on one line: its first line without the "error: " prefix, and the flag's
/// accepted values where clap lists them.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    format!("{} (see memplan --help)", crate::plan::cut_quoted(first))
}

/// Runs a parsed command, writing to stdout and stderr; see [`main_with`].
pub fn run(cli: Cli) -> Result<ExitCode> {
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    run_to(cli, &mut out, &mut err).map(ExitCode::from)
}

/// Runs a parsed command; the exit code says whether the plan fits (0) or not (1); errors
/// carry theirs.
pub fn run_to(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> Result<u8> {
    match cli.command {
        Command::Estimate {
            plan,
            alloc_conf,
            all_stages,
            format,
        } => {
            let plan = plan.resolve()?;
            warn(err, &plan.warnings);
            let conf = crate::allocator::AllocConf::parse(&alloc_conf)?;
            let est = estimate_simulated(&plan, &conf, &alloc_conf)?;
            let stages = if all_stages {
                crate::estimate::estimate_stages(&plan, &conf, &alloc_conf)?
            } else {
                Vec::new()
            };
            print(
                out,
                &renderer(format).estimate(&Row {
                    label: &plan.model.name,
                    plan: &plan,
                    estimate: &est,
                    stages: &stages,
                }),
            )?;
            Ok(fit_code(est.fits))
        }
        Command::Compare { plans, format } => {
            let loaded = plans
                .iter()
                .map(|p| load_plan(p))
                .collect::<Result<Vec<_>>>()?;
            for (label, p) in &loaded {
                let w: Vec<String> = p.warnings.iter().map(|w| format!("{label}: {w}")).collect();
                warn(err, &w);
            }
            let ests = loaded
                .iter()
                .map(|(label, p)| {
                    estimate_simulated(p, &Default::default(), "")
                        .map_err(|e| e.context(format!("plan {}", crate::input::quote(label))))
                })
                .collect::<Result<Vec<_>>>()?;
            let rows: Vec<Row> = loaded
                .iter()
                .zip(&ests)
                .map(|((label, plan), estimate)| Row {
                    stages: &[],
                    label,
                    plan,
                    estimate,
                })
                .collect();
            print(out, &renderer(format).compare(&rows))?;
            // Compare exits by the best plan: 0 when any of them fits.
            Ok(fit_code(ests.iter().any(|e| e.fits)))
        }
        Command::Search {
            plan,
            max_batch,
            max_micro_batch,
            lora_ranks,
            headroom,
            rank_by,
            top,
            format,
        } => {
            if !(0.0..=0.5).contains(&headroom) {
                return Err(Error::invalid(
                    "--headroom",
                    headroom,
                    "a fraction from 0 to 0.5",
                ));
            }
            let max_micro_batch = u64::try_from(max_micro_batch)
                .ok()
                .filter(|m| (1..=plan::MAX_DIM).contains(m))
                .ok_or_else(|| {
                    Error::invalid(
                        "--max-micro-batch",
                        max_micro_batch,
                        format!("an integer from 1 to {}", plan::MAX_DIM),
                    )
                })?;
            let top = usize::try_from(top)
                .ok()
                .filter(|t| (1..=1_000_000).contains(t))
                .ok_or_else(|| Error::invalid("--top", top, "an integer from 1 to 1000000"))?;
            let headroom_milli = (headroom * 1000.0).round() as u64;
            if max_batch {
                let p = plan.resolve()?;
                warn(err, &p.warnings);
                let mut n = 0;
                let at = search::at_max_micro_batch(&p, max_micro_batch, headroom_milli, &mut n)?;
                let fits = at.is_some();
                let result =
                    crate::output::MaxBatch::new(&p, headroom, max_micro_batch, n, at.as_ref());
                print(out, &renderer(format).max_batch(&result))?;
                return Ok(fit_code(fits));
            }
            let mut constraints =
                plan.search_constraints(max_micro_batch, headroom_milli, rank_by)?;
            constraints.lora_ranks = lora_ranks
                .iter()
                .map(|&r| {
                    u64::try_from(r)
                        .ok()
                        .filter(|r| (1..=plan::MAX_DIM).contains(r))
                        .ok_or_else(|| {
                            Error::invalid(
                                "--lora-ranks",
                                r,
                                format!("integers from 1 to {}", plan::MAX_DIM),
                            )
                        })
                })
                .collect::<Result<_>>()?;
            // Resolving first checks every flag and names it in errors.
            let base = plan.resolve()?;
            warn(err, &base.warnings);
            let result = search::search(&plan.to_plan_file()?, &constraints)?;
            print(out, &renderer(format).search(&result, top))?;
            Ok(fit_code(!result.candidates.is_empty()))
        }
        #[cfg(feature = "trainer")]
        Command::Train {
            plan,
            steps,
            device,
            quiet,
            device_memory,
            lr,
            trace,
            dist,
            format,
        } => {
            if let Some(lr) = lr.filter(|&lr| !(lr.is_finite() && lr > 0.0 && lr <= 1.0)) {
                return Err(Error::invalid(
                    "--lr",
                    lr,
                    "a learning rate above 0 and at most 1",
                ));
            }
            let mut plan = plan.resolve()?;
            warn(err, &plan.warnings);
            let device_limit = device_memory
                .as_deref()
                .map(|s| {
                    crate::units::Bytes::parse(s)
                        .filter(|b| b.get() > 0)
                        .map(|b| b.get())
                        .ok_or_else(|| {
                            Error::invalid(
                                "--device-memory",
                                format!("{s:?}"),
                                "a size such as 48GB",
                            )
                        })
                })
                .transpose()?;
            // The prediction is for the same capacity the run has.
            if let Some(limit) = device_limit {
                plan.gpu.memory_bytes = crate::units::Bytes(limit);
            }
            let opts = crate::trainer::TrainOptions {
                steps: positive_steps(steps)?,
                device: parse_device(&device)?,
                progress: !quiet,
                device_limit,
                lr,
                record_trace: trace.is_some(),
                ..Default::default()
            };
            let trace = trace.as_deref();
            let rank_env = if dist.emulate {
                None
            } else {
                crate::trainer::dist::RankEnv::from_env()?
            };
            match (dist.nproc_per_node, rank_env) {
                (Some(n), _) => launch_ranks(&dist, n, opts.progress, &plan, trace, out, format),
                (None, Some(env)) => run_rank(env, &dist, &plan, &opts, trace, out, format),
                (None, None) => {
                    let v = crate::validate::validate_one(&plan.model.name, &plan, &opts)?;
                    if let Some(path) = trace {
                        write_trace(path, &plan, v.measured_trace.as_ref(), &v.report)?;
                    }
                    print(out, &crate::output::validation::train(&v, format))?;
                    Ok(fit_code(v.report.oom.is_none()))
                }
            }
        }
        #[cfg(feature = "trainer")]
        Command::Validate {
            matrix,
            steps,
            device,
            quiet,
            max_error_pct,
            timeline: timeline_dir,
            format,
        } => {
            if let Some(m) = max_error_pct {
                if !(m.is_finite() && m >= 0.0) {
                    return Err(Error::invalid(
                        "--max-error-pct",
                        m,
                        "a percentage of 0 or more",
                    ));
                }
            }
            let plans = if matrix == "cpu" {
                crate::validate::cpu_matrix()
            } else {
                crate::validate::read_matrix(std::path::Path::new(&matrix))?
            };
            let opts = crate::trainer::TrainOptions {
                steps: positive_steps(steps)?,
                device: parse_device(&device)?,
                progress: !quiet,
                record_trace: timeline_dir.is_some(),
                ..Default::default()
            };
            let (rows, failed) = crate::validate::validate_all_with(&plans, &opts, None);
            if let Some(dir) = &timeline_dir {
                for path in timeline::overlays(&rows, dir)? {
                    writeln!(err, "wrote {}", path.display()).map_err(Error::output)?;
                }
            }
            print(out, &crate::output::validation::matrix(&rows, format))?;
            for (label, e) in &failed {
                let _ = writeln!(err, "error: {label}: {e}");
            }
            let bad = !failed.is_empty()
                || max_error_pct.is_some_and(|m| {
                    rows.iter()
                        .any(|v| v.error_pct().abs() > m || v.report.oom.is_some())
                });
            Ok(fit_code(!bad))
        }
        Command::Replay {
            trace,
            alloc_conf,
            format,
        } => {
            let trace = replay::read(&trace)?;
            let r = crate::estimate::simulate::replay(&trace, &alloc_conf)?;
            match format {
                Format::Json => print(out, &crate::output::json::to_string(&r))?,
                Format::Table | Format::Markdown => print(out, &crate::output::replay::table(&r))?,
            }
            Ok(EXIT_FITS)
        }
        Command::Timeline {
            plan,
            stage,
            alloc_conf,
            output,
            format,
        } => {
            let plan = plan.resolve()?;
            warn(err, &plan.warnings);
            let stage = match stage {
                Some(s) if s < 0 || s as u64 >= plan.parallel.pp => {
                    return Err(Error::invalid(
                        "--stage",
                        s,
                        format!("a pipeline stage from 0 to {}", plan.parallel.pp - 1),
                    ))
                }
                s => s.map(|s| s as u64),
            };
            let (bytes, est, trace) = timeline::render(&plan, stage, &alloc_conf, format)?;
            let path = output.unwrap_or_else(|| timeline::default_path(format));
            timeline::write_to(&path, &bytes, out)?;
            if format == timeline::TimelineFormat::Json && path != std::path::Path::new("-") {
                // The output contract: under --format json, stdout is one JSON document.
                let doc = serde_json::json!({
                    "schema": "memplan.timeline/1",
                    "path": path.display().to_string(),
                    "stage": trace.stage,
                    "events": trace.events.len(),
                    "peak_allocated_bytes": est.per_gpu.peak_allocated_bytes,
                    "simulation": est.per_gpu.simulation,
                    "fits": est.fits,
                });
                print(out, &(doc.to_string() + "\n"))?;
            }
            let g = &est.per_gpu;
            let mut line = format!(
                "{}: stage {}, {} events; peak allocated {} ({})",
                path.display(),
                trace.stage,
                trace.events.len(),
                g.peak_allocated_bytes,
                g.peak_phase
            );
            if let Some(sim) = &g.simulation {
                line += &format!("; simulated reserved peak {}", sim.peak_reserved_bytes);
                if let Some(at) = &sim.oom_at {
                    line += &format!("; out of memory at {at}");
                }
            }
            writeln!(err, "{line}").map_err(Error::output)?;
            Ok(fit_code(est.fits))
        }
        Command::Profiles { format } => {
            let models = profiles::MODELS
                .iter()
                .map(|(n, _)| profiles::model(n))
                .collect::<Result<Vec<_>>>()?;
            let gpus = profiles::GPUS
                .iter()
                .map(|(n, _)| profiles::gpu(n))
                .collect::<Result<Vec<_>>>()?;
            let mut s = renderer(format).profiles(&models, &gpus);
            if format != Format::Json {
                let names: Vec<_> = plan::EXAMPLES.iter().map(|(n, _)| *n).collect();
                s += &format!("example plans (--example NAME): {}\n", names.join(", "));
            }
            print(out, &s)?;
            Ok(EXIT_FITS)
        }
    }
}

/// `train --trace FILE`: writes the run's measured trace, or says why there is none.
#[cfg(feature = "trainer")]
fn write_trace(
    path: &std::path::Path,
    plan: &Plan,
    trace: Option<&crate::trace::Trace>,
    report: &crate::trainer::TrainReport,
) -> Result<()> {
    match trace {
        Some(t) => timeline::write_measured(path, plan, t),
        None => Err(Error::runtime(format!(
            "rank {}: the run recorded no allocation trace{}",
            report.rank,
            report
                .notes
                .iter()
                .find(|n| n.starts_with("no allocation trace"))
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        ))),
    }
}

/// `train --nproc-per-node N`: starts the ranks, then prints every rank beside the prediction.
#[cfg(feature = "trainer")]
fn launch_ranks(
    dist: &DistArgs,
    nproc: i64,
    progress: bool,
    plan: &Plan,
    trace: Option<&std::path::Path>,
    out: &mut dyn Write,
    format: Format,
) -> Result<u8> {
    let bounded = |flag: &str, v: i64, min: i64, max: i64| -> Result<u64> {
        if (min..=max).contains(&v) {
            Ok(v as u64)
        } else {
            Err(Error::invalid(
                flag,
                v,
                format!("an integer from {min} to {max}"),
            ))
        }
    };
    let nproc = bounded("--nproc-per-node", nproc, 1, 256)?;
    let nnodes = bounded("--nnodes", dist.nnodes, 1, 4096)?;
    let node_rank = bounded("--node-rank", dist.node_rank, 0, nnodes as i64 - 1)?;
    let port = bounded("--master-port", dist.master_port, 0, 65535)? as u16;
    let timeout_s = bounded("--dist-timeout", dist.dist_timeout, 1, 86_400)?;
    let world = nproc * nnodes;
    let p = &plan.parallel;
    let ranks = p.pp * p.tp * p.dp_replicate * p.dp_shard * p.cp;
    if world != ranks {
        return Err(Error::invalid(
            "--nproc-per-node",
            nproc,
            format!(
                "nnodes x nproc-per-node = the plan's pp x tp x dp_replicate x dp_shard x cp ({} x {} x {} x {} x {} = {ranks}); set --num-gpus {world} or --dp-shard",
                p.pp, p.tp, p.dp_replicate, p.dp_shard, p.cp
            ),
        ));
    }
    // What no rank would run is refused before any starts.
    if p.pp > 1 {
        crate::trainer::pipeline::check(plan)?;
    }
    if p.tp > 1 {
        crate::trainer::tensor_parallel::check(plan)?;
    }
    if p.cp > 1 {
        crate::trainer::context_parallel::check(plan)?;
    }
    let launch = crate::trainer::launch::Launch {
        progress,
        nproc_per_node: nproc,
        nnodes,
        node_rank,
        master_addr: dist.master_addr.clone(),
        master_port: port,
        timeout_s,
        verbose: dist.verbose,
        exe: None,
    };
    let outcome = crate::trainer::launch::launch(&launch, &rank_args())?;
    let rows = outcome
        .reports
        .into_iter()
        .map(|r| rank_validation(plan, r))
        .collect::<Result<Vec<_>>>()?;
    // Rank 0's trace (on a node without rank 0, its first rank's).
    if let (Some(path), Some(first)) = (trace, rows.first()) {
        write_trace(path, plan, first.measured_trace.as_ref(), &first.report)?;
    }
    let oom = rows.iter().any(|v| v.report.oom.is_some());
    print(out, &crate::output::validation::ranks(&rows, format))?;
    Ok(fit_code(!oom))
}

/// This process's arguments less the launcher's own flags, with progress bars off: what each
/// rank runs.
#[cfg(feature = "trainer")]
fn rank_args() -> Vec<OsString> {
    const LAUNCHER: [&str; 5] = [
        "--nproc-per-node",
        "--nnodes",
        "--node-rank",
        "--master-port",
        "--dist-timeout",
    ];
    let mut out = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let text = a.to_string_lossy();
        if LAUNCHER.contains(&text.as_ref()) {
            args.next();
            continue;
        }
        if LAUNCHER.iter().any(|f| text.starts_with(&format!("{f}="))) {
            continue;
        }
        out.push(a);
    }
    if !out.iter().any(|a| a == "--quiet") {
        out.push("--quiet".into());
    }
    out
}

/// One rank of a job (started by `--nproc-per-node` or by torchrun): joins, trains, and
/// reports: into the launcher's folder, or, under torchrun, gathered to rank 0, which prints
/// every rank.
#[cfg(feature = "trainer")]
fn run_rank(
    env: crate::trainer::dist::RankEnv,
    dist: &DistArgs,
    plan: &Plan,
    opts: &crate::trainer::TrainOptions,
    trace: Option<&std::path::Path>,
    out: &mut dyn Write,
    format: Format,
) -> Result<u8> {
    use crate::trainer::dist::Mesh;
    let timeout_s = match std::env::var("MEMPLAN_DIST_TIMEOUT") {
        Ok(v) => v
            .parse::<u64>()
            .ok()
            .filter(|t| (1..=86_400).contains(t))
            .ok_or_else(|| {
                Error::invalid("environment MEMPLAN_DIST_TIMEOUT", v, "1 to 86400 seconds")
            })?,
        Err(_) => u64::try_from(dist.dist_timeout)
            .ok()
            .filter(|t| (1..=86_400).contains(t))
            .ok_or_else(|| {
                Error::invalid("--dist-timeout", dist.dist_timeout, "1 to 86400 seconds")
            })?,
    };
    let rank = env.rank;
    // On GPUs each rank takes the device of its LOCAL_RANK, and the data-parallel groups run
    // on NCCL.
    let cuda = match opts.device {
        crate::trainer::TrainDevice::Cuda(_) => Some(env.local_rank as usize),
        crate::trainer::TrainDevice::Cpu => None,
    };
    if let Some(i) = cuda {
        if !tch::Cuda::is_available() || i as i64 >= tch::Cuda::device_count() {
            return Err(Error::input(format!(
                "rank {rank}: device cuda:{i} (its LOCAL_RANK) is not available (libtorch sees {} GPU(s)); use --device cpu",
                tch::Cuda::device_count()
            )));
        }
    }
    // Under context parallelism FSDP shards over dp_shard x cp (torchtitan's "dp_shard_cp").
    let mut mesh = Mesh::join(
        env,
        plan.parallel.pp,
        plan.parallel.tp,
        plan.parallel.dp_replicate,
        plan.parallel.fsdp_degree(),
        std::time::Duration::from_secs(timeout_s),
        cuda,
    )?;
    mesh.join_cp(plan.parallel.cp, std::time::Duration::from_secs(timeout_s))?;
    let mesh = std::rc::Rc::new(mesh);
    // Rank-prefixed logs: the launcher shows them with --verbose; under torchrun, only
    // --verbose prints them.
    let log = dist.verbose || crate::trainer::launch::report_path(rank).is_some();
    if log {
        let m = &mesh;
        eprintln!(
            "rank {rank}: joined {} ranks at {}:{} (stage {} of {}, replica {} x shard {} of {})",
            m.env.world,
            m.env.master_addr,
            m.env.master_port,
            m.stage(),
            m.pp_size(),
            m.dp_rank() / plan.parallel.dp_shard,
            m.shard.rank(),
            m.shard.size()
        );
    }
    // Fault injection for the fault tests: MEMPLAN_FAULT_ABORT_RANK=R and
    // MEMPLAN_FAULT_ABORT_STEP=S make rank R abort at the start of step S.
    let fault = |key: &str| std::env::var(key).ok().and_then(|v| v.parse::<u64>().ok());
    let abort_at_step = match (
        fault("MEMPLAN_FAULT_ABORT_RANK"),
        fault("MEMPLAN_FAULT_ABORT_STEP"),
    ) {
        (Some(r), Some(step)) if r == rank => Some(step),
        _ => None,
    };
    let launched = crate::trainer::launch::report_path(rank).is_some();
    let opts = crate::trainer::TrainOptions {
        device: cuda.map_or(opts.device, crate::trainer::TrainDevice::Cuda),
        // Under torchrun, rank 0 draws the bar; under memplan's launcher, rank 0 reports its
        // steps and the launcher draws one bar for the job.
        progress: opts.progress && rank == 0 && !launched,
        progress_lines: launched
            && rank == 0
            && std::env::var_os("MEMPLAN_PROGRESS_LINES").is_some(),
        abort_at_step,
        ..opts.clone()
    };
    let mut report = crate::trainer::train_rank(plan, &opts, mesh.clone())
        .map_err(|e| e.context(format!("rank {rank}")))?;
    let oom = report.oom.clone();
    if log {
        eprintln!(
            "rank {rank}: {} steps, peak {} allocated, {:.0} tokens/s, last loss {:.4}",
            report.steps_completed,
            crate::units::Bytes(report.peak_allocated_bytes),
            report.tokens_per_second,
            report.losses.last().copied().unwrap_or(f64::NAN)
        );
    }
    if let Some(path) = crate::trainer::launch::report_path(rank) {
        let text = serde_json::to_string(&report).expect("reports serialize");
        std::fs::write(&path, text).map_err(|e| {
            Error::runtime(format!("rank {rank}: cannot write {}: {e}", path.display()))
        })?;
        if let Some(o) = &oom {
            eprintln!(
                "error: rank {rank} ran out of memory at step {}, {:?}: {}",
                o.step, o.phase, o.message
            );
        }
        return Ok(fit_code(oom.is_none()));
    }
    // Under torchrun, rank 0 writes its own trace; the reports travel without theirs.
    let measured = report.trace.take();
    if let (Some(path), 0) = (trace, rank) {
        write_trace(path, plan, measured.as_ref(), &report)?;
    }
    // Under torchrun: a rank out of memory cannot meet its peers again; it reports alone.
    if oom.is_some() {
        let v = rank_validation(plan, report)?;
        print(
            out,
            &crate::output::validation::ranks(std::slice::from_ref(&v), format),
        )?;
        return Ok(EXIT_DOES_NOT_FIT);
    }
    let text = serde_json::to_string(&report).expect("reports serialize");
    let all = mesh
        .all_gather_text(&text)
        .map_err(|e| Error::runtime(format!("rank {rank}: gathering reports: {e}")))?;
    if rank == 0 {
        let rows = all
            .iter()
            .map(|t| {
                let r: crate::trainer::TrainReport = serde_json::from_str(t)
                    .map_err(|e| Error::runtime(format!("a rank's report does not parse: {e}")))?;
                rank_validation(plan, r)
            })
            .collect::<Result<Vec<_>>>()?;
        print(out, &crate::output::validation::ranks(&rows, format))?;
    }
    Ok(EXIT_FITS)
}

/// A rank's report beside the prediction for what it holds: its own pipeline stage's under
/// pipelining, else the most loaded rank's.
#[cfg(feature = "trainer")]
fn rank_validation(
    plan: &Plan,
    report: crate::trainer::TrainReport,
) -> Result<crate::validate::Validation> {
    let e = match report.pp_stage {
        Some(stage) => crate::estimate::estimate_stage(plan, stage)?,
        None => crate::estimate::estimate(plan)?,
    };
    let label = match report.pp_stage {
        Some(stage) => format!("rank {} (stage {stage})", report.rank),
        None => format!("rank {}", report.rank),
    };
    Ok(crate::validate::validation_of(&label, plan, &e, report))
}

#[cfg(feature = "trainer")]
fn positive_steps(steps: i64) -> Result<u64> {
    if (1..=100_000).contains(&steps) {
        Ok(steps as u64)
    } else {
        Err(Error::invalid(
            "--steps",
            steps,
            "an integer from 1 to 100000",
        ))
    }
}

#[cfg(feature = "trainer")]
fn parse_device(s: &str) -> Result<crate::trainer::TrainDevice> {
    use crate::trainer::TrainDevice;
    match s {
        "cpu" => Ok(TrainDevice::Cpu),
        "cuda" => Ok(TrainDevice::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|&i| i < 64)
            .map(TrainDevice::Cuda)
            .ok_or_else(|| Error::invalid("--device", format!("{s:?}"), "cpu, cuda or cuda:N")),
    }
}
