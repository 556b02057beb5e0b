//! Command-line interface: raw flags (clap) become a [`PlanFile`] overlay, which
//! [`PlanFile::resolve`] turns into a validated plan; commands call the estimator and a
//! renderer.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::estimate::{estimate, Estimate};
use crate::output::{renderer, Format, Row};
use crate::plan::{self, Plan, PlanFile};
use crate::profiles;
use crate::search::{self, Constraints, RankBy};

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
        #[arg(long, default_value_t = 64)]
        max_micro_batch: u64,
        /// Fraction of GPU memory to keep free, 0 to 0.5.
        #[arg(long, default_value_t = 0.05)]
        headroom: f64,
        #[arg(long, value_enum, default_value_t = RankBy::Tokens)]
        rank_by: RankBy,
        /// Candidates to print.
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Train a plan for a few steps on libtorch and print measured peaks per phase beside
    /// the prediction (a single-device emulation of FSDP rank 0).
    #[cfg(feature = "trainer")]
    Train {
        #[command(flatten)]
        plan: Box<PlanArgs>,
        #[arg(long, default_value_t = 3)]
        steps: u64,
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
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Run a matrix of plans through the trainer and report predicted vs measured peaks.
    #[cfg(feature = "trainer")]
    Validate {
        /// cpu (the CI matrix of small models) or a JSON file: a list of {"label", "plan"}.
        #[arg(long, default_value = "cpu")]
        matrix: String,
        #[arg(long, default_value_t = 3)]
        steps: u64,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        quiet: bool,
        /// Fail (exit 1) when any plan's peak error exceeds this percentage.
        #[arg(long)]
        max_error_pct: Option<f64>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// List the shipped model and GPU profiles and example plans.
    Profiles {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
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
    /// A torchtitan job config (TOML); give the world size with --num-gpus and the GPU with
    /// --gpu, as torchrun would.
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
    /// Pipeline schedule: gpipe, 1f1b, interleaved-1f1b, zb-h1.
    #[arg(long)]
    pub pp_schedule: Option<String>,
    /// Virtual pipeline stages per rank (interleaved schedules).
    #[arg(long, allow_negative_numbers = true)]
    pub pp_virtual_stages: Option<i64>,
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
    /// flash, efficient, math.
    #[arg(long)]
    pub attention: Option<String>,
    /// eager, fused.
    #[arg(long)]
    pub rmsnorm: Option<String>,
    /// repeat-kv, native.
    #[arg(long)]
    pub gqa: Option<String>,
    /// float-output, float-output-kept, float-in-loss, compute-dtype.
    #[arg(long)]
    pub logits: Option<String>,
    /// foreach, fused, per-param.
    #[arg(long)]
    pub optimizer_impl: Option<String>,
}

impl PlanArgs {
    /// The plan file (or example) with the flags laid over it.
    pub fn to_plan_file(&self) -> Result<PlanFile> {
        let base = match (&self.plan, &self.example, &self.torchtitan) {
            (Some(p), _, _) => PlanFile::read(p)?,
            (None, Some(name), _) => plan::example(name)?,
            (None, None, Some(toml)) => crate::torchtitan::read(toml)?,
            (None, None, None) => PlanFile::default(),
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
        };
        top.implementation = plan::ImplementationFile {
            attention: self.attention.clone(),
            rmsnorm: self.rmsnorm.clone(),
            gqa: self.gqa.clone(),
            logits: self.logits.clone(),
            optimizer: self.optimizer_impl.clone(),
        };
        // When the flags name the world size but not the FSDP degree, the degree follows the
        // world size rather than a file's value.
        if top.num_gpus.is_some() && top.parallel.dp_shard.is_none() {
            top.parallel.dp_shard = Some(-1);
        }
        Ok(base.overlay(top))
    }

    pub fn resolve(&self) -> Result<Plan> {
        self.to_plan_file()?.resolve()
    }
}

fn load_plan(arg: &str) -> Result<(String, Plan)> {
    let file = match arg.strip_prefix("example:") {
        Some(name) => plan::example(name)?,
        None => PlanFile::read(std::path::Path::new(arg))?,
    };
    let label = std::path::Path::new(arg.trim_start_matches("example:"))
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| arg.to_string());
    Ok((label, file.resolve()?))
}

fn print(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth reporting.
    match out.write_all(s.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| Error::runtime(format!("cannot write output: {e}"))),
    }
}

/// Runs a parsed command; the exit code says whether the plan fits (0), not (1) or the
/// input was bad (2, through the error).
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Estimate { plan, format } => {
            let plan = plan.resolve()?;
            let est: Estimate = estimate(&plan)?;
            print(&renderer(format).estimate(&Row {
                label: &plan.model.name,
                plan: &plan,
                estimate: &est,
            }))?;
            Ok(if est.fits {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Compare { plans, format } => {
            let loaded = plans
                .iter()
                .map(|p| load_plan(p))
                .collect::<Result<Vec<_>>>()?;
            let ests = loaded
                .iter()
                .map(|(_, p)| estimate(p))
                .collect::<Result<Vec<_>>>()?;
            let rows: Vec<Row> = loaded
                .iter()
                .zip(&ests)
                .map(|((label, plan), estimate)| Row {
                    label,
                    plan,
                    estimate,
                })
                .collect();
            print(&renderer(format).compare(&rows))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Search {
            plan,
            max_batch,
            max_micro_batch,
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
            if !(1..=crate::plan::MAX_DIM).contains(&max_micro_batch) {
                return Err(Error::invalid(
                    "--max-micro-batch",
                    max_micro_batch,
                    format!("an integer from 1 to {}", crate::plan::MAX_DIM),
                ));
            }
            let headroom_milli = (headroom * 1000.0).round() as u64;
            if max_batch {
                let p = plan.resolve()?;
                let mut n = 0;
                return match search::max_micro_batch(&p, max_micro_batch, headroom_milli, &mut n)? {
                    Some((mb, est)) => {
                        let mut at = p.clone();
                        at.batch.micro_batch_size = mb;
                        print(&format!(
                            "largest micro-batch that fits with {:.0}% headroom: {mb}{} ({n} estimates)\n",
                            headroom * 100.0,
                            if mb == max_micro_batch { " (the --max-micro-batch limit)" } else { "" }
                        ))?;
                        print(&renderer(format).estimate(&Row {
                            label: &at.model.name,
                            plan: &at,
                            estimate: &est,
                        }))?;
                        Ok(ExitCode::SUCCESS)
                    }
                    None => {
                        print(&format!(
                            "no micro-batch fits: even 1 exceeds the GPU (with {:.0}% headroom) or the host\n",
                            headroom * 100.0
                        ))?;
                        Ok(ExitCode::from(1))
                    }
                };
            }
            let u = |v: Option<i64>| v.filter(|&x| x > 0).map(|x| x as u64);
            let constraints = Constraints {
                tp: u(plan.tp),
                pp: u(plan.pp),
                cp: u(plan.cp),
                dp_shard: u(plan.dp_shard),
                ep: u(plan.ep),
                ac: plan
                    .ac
                    .as_deref()
                    .map(crate::plan::Checkpointing::parse)
                    .transpose()?,
                offload: plan
                    .offload
                    .as_deref()
                    .map(<crate::plan::Offload as crate::plan::Choice>::parse)
                    .transpose()?,
                max_micro_batch,
                headroom_milli,
                rank_by,
            };
            let result = search::search(&plan.to_plan_file()?, &constraints)?;
            print(&renderer(format).search(&result, top))?;
            Ok(if result.candidates.is_empty() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        #[cfg(feature = "trainer")]
        Command::Train {
            plan,
            steps,
            device,
            quiet,
            device_memory,
            format,
        } => {
            let mut plan = plan.resolve()?;
            let device_limit = device_memory
                .as_deref()
                .map(|s| {
                    crate::units::Bytes::parse(s)
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
                ..Default::default()
            };
            let v = crate::validate::validate_one(&plan.model.name, &plan, &opts)?;
            print(&crate::output::validation::train(&v, format))?;
            Ok(if v.report.oom.is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        #[cfg(feature = "trainer")]
        Command::Validate {
            matrix,
            steps,
            device,
            quiet,
            max_error_pct,
            format,
        } => {
            let plans = if matrix == "cpu" {
                crate::validate::cpu_matrix()
            } else {
                crate::validate::read_matrix(std::path::Path::new(&matrix))?
            };
            let (rows, failed) = crate::validate::validate_all(
                &plans,
                positive_steps(steps)?,
                parse_device(&device)?,
                !quiet,
            );
            print(&crate::output::validation::matrix(&rows, format))?;
            for (label, e) in &failed {
                eprintln!("error: {label}: {e}");
            }
            let bad = !failed.is_empty()
                || max_error_pct.is_some_and(|m| {
                    rows.iter()
                        .any(|v| v.error_pct().abs() > m || v.report.oom.is_some())
                });
            Ok(if bad {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
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
            print(&s)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(feature = "trainer")]
fn positive_steps(steps: u64) -> Result<u64> {
    if (1..=100_000).contains(&steps) {
        Ok(steps)
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
