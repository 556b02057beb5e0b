//! Validation: the estimator's prediction beside a real libtorch run of the same plan.
//!
//! This is the only module that sees both the estimator and the trainer. For each plan it
//! estimates first (so the measurement cannot be shaped by the prediction), then trains a few
//! steps, and compares, per phase of the first and of the steady step, the predicted peak
//! allocated bytes with the measured ones:
//!
//! | trainer phase | estimator phases                          |
//! |---------------|-------------------------------------------|
//! | forward       | forward                                   |
//! | backward      | loss-backward, backward, backward-end     |
//! | optimizer     | optimizer                                 |
//!
//! On the CPU the figures are exact allocation peaks of libtorch's CPU allocator (the
//! trainer's counting allocator); on CUDA, the caching allocator's peak allocated bytes.
//! The error of a plan is that of its overall peak, (predicted - measured) / measured.
//!
//! With [`TrainOptions::record_trace`] the run's measured allocation events come back too, as
//! [`Validation::measured_trace`], for a timeline beside the predicted one.

use serde::Serialize;

use crate::error::Result;
use crate::estimate::simulate::reserved_on_one_stream;
use crate::estimate::{estimate, Phase};
use crate::plan::{Plan, PlanFile};
use crate::trainer::{train, TrainDevice, TrainOptions, TrainReport};

/// Predicted and measured peak allocated bytes of one phase.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PhasePair {
    pub predicted_bytes: u64,
    pub measured_bytes: u64,
}

impl PhasePair {
    pub fn error_pct(&self) -> f64 {
        if self.measured_bytes == 0 {
            return 0.0;
        }
        100.0 * (self.predicted_bytes as f64 - self.measured_bytes as f64)
            / self.measured_bytes as f64
    }
}

/// One validated plan.
#[derive(Clone, Debug, Serialize)]
pub struct Validation {
    pub label: String,
    pub plan: Plan,
    /// forward, backward, optimizer of the first step, then of the steady step.
    pub phases: [PhasePair; 6],
    pub peak: PhasePair,
    /// CUDA runs: peak reserved, predicted for the trainer's one stream
    /// ([`reserved_on_one_stream`]) and measured (the caching allocator's counter).
    pub reserved: Option<PhasePair>,
    /// Where the estimator says the plan first runs out of the GPU profile's memory.
    pub predicted_first_oom: Option<crate::estimate::PhasePoint>,
    /// The run's own report (losses, per-step figures, notes), less its trace.
    pub report: TrainReport,
    /// The run's allocation events (setup, step 1, the last step), when the run recorded them
    /// ([`TrainOptions::record_trace`]). Not serialized: it is large and has its own file
    /// format (`memplan train --trace`).
    #[serde(skip)]
    pub measured_trace: Option<crate::trace::Trace>,
}

impl Validation {
    pub fn error_pct(&self) -> f64 {
        self.peak.error_pct()
    }
}

/// Predicted peaks per trainer phase, first step then steady: forward, backward, optimizer.
pub fn predicted_phases(e: &crate::estimate::Estimate) -> [u64; 6] {
    let mut out = [0u64; 6];
    for p in &e.per_gpu.timeline {
        let slot = match p.phase {
            Phase::Forward => 0,
            Phase::LossBackward | Phase::Backward | Phase::BackwardEnd => 1,
            Phase::Optimizer => 2,
        } + if p.first_step { 0 } else { 3 };
        out[slot] = out[slot].max(p.allocated_bytes.get());
    }
    out
}

/// Estimates, then trains, one plan.
pub fn validate_one(label: &str, plan: &Plan, opts: &TrainOptions) -> Result<Validation> {
    let e = estimate(plan)?;
    let report = train(plan, opts)?;
    Ok(validation_of(label, plan, &e, report))
}

/// The estimate `e` of `plan` beside a run's report (whose trace moves to
/// [`Validation::measured_trace`]).
pub fn validation_of(
    label: &str,
    plan: &Plan,
    e: &crate::estimate::Estimate,
    mut report: TrainReport,
) -> Validation {
    let measured_trace = report.trace.take();
    // Only a run that measured reserved bytes (CUDA) is traced and simulated; a failure
    // leaves the pair out rather than the run.
    let reserved =
        report.peak_reserved_bytes.and_then(|measured_bytes| {
            match reserved_on_one_stream(plan, e.per_gpu.stage) {
                Ok(Some(predicted_bytes)) => Some(PhasePair {
                    predicted_bytes,
                    measured_bytes,
                }),
                _ => None,
            }
        });
    let predicted = predicted_phases(e);
    let predicted_first_oom = e.per_gpu.first_oom;
    let mut measured = [0u64; 6];
    for (k, step) in [&report.first_step, &report.steady_step].iter().enumerate() {
        if let Some(s) = step {
            measured[3 * k] = s.forward.peak_allocated_bytes;
            measured[3 * k + 1] = s.backward.peak_allocated_bytes;
            measured[3 * k + 2] = s.optimizer.peak_allocated_bytes;
        }
    }
    // A first step that ran out of memory: its phases up to the failure.
    if let (None, Some(oom)) = (&report.first_step, &report.oom) {
        measured[..3].copy_from_slice(&oom.peak_allocated_bytes);
    }
    let mut phases = [PhasePair::default(); 6];
    for i in 0..6 {
        phases[i] = PhasePair {
            predicted_bytes: predicted[i],
            measured_bytes: measured[i],
        };
    }
    Validation {
        label: label.to_string(),
        plan: plan.clone(),
        phases,
        peak: PhasePair {
            predicted_bytes: predicted.iter().copied().max().unwrap_or(0),
            measured_bytes: report.peak_allocated_bytes,
        },
        reserved,
        predicted_first_oom,
        report,
        measured_trace,
    }
}

/// The CI matrix: small models on the CPU, covering model shapes (GQA, tied embeddings,
/// padding), FSDP degrees 1 to 4, checkpointing none / full / selective-layer, mixed, pure
/// fp32 and pure bf16 precision, every logits mode, offload, accumulation, optimizers, and a
/// batch so small that parameters dominate.
pub fn cpu_matrix() -> Vec<Entry> {
    let base = |model: &str, dp: u64, extra: &str| -> Entry {
        let json = format!(
            r#"{{"model":"{model}","gpu":"cpu","num_gpus":{dp},
                "batch":{{"micro_batch_size":4,"seq_len":128}},
                "implementation":{{"optimizer":"per-param"}}}}"#
        );
        let file: PlanFile = serde_json::from_str(&json).expect("matrix plans are valid JSON");
        let top: PlanFile =
            serde_json::from_str(&format!("{{{extra}}}")).expect("matrix plans are valid JSON");
        let label = format!("{model} fsdp{dp}{}", describe(extra));
        Entry {
            label,
            plan: file.overlay(top),
            nproc_per_node: None,
        }
    };
    // Real multi-process jobs over loopback Gloo, every rank a row: FSDP 2 and 4, HSDP 2 x 2,
    // with and without checkpointing and offload.
    let ranks = |n: u64, extra: &str| -> Entry {
        let mut e = base("small", n, extra);
        e.label = format!("small {n} processes{}", describe(extra));
        e.nproc_per_node = Some(n);
        e
    };
    const FP32: &str = r#""precision":{"param":"fp32","master":"fp32","reduce":"fp32"}"#;
    vec![
        base("small", 2, FP32),
        base(
            "small",
            2,
            &format!(r#"{FP32},"activation_checkpointing":"full""#),
        ),
        base("small", 1, ""),
        base("small", 2, ""),
        base("small", 2, r#""activation_checkpointing":"full""#),
        base(
            "small",
            4,
            r#""activation_checkpointing":"selective-layer:2""#,
        ),
        base(
            "small",
            3,
            r#""precision":{"param":"bf16","master":"bf16","reduce":"bf16"}"#,
        ),
        base(
            "small",
            2,
            r#""implementation":{"optimizer":"foreach","logits":"float-output"}"#,
        ),
        base(
            "small",
            2,
            r#""batch":{"micro_batch_size":2,"grad_accum_steps":2}"#,
        ),
        base("small-gqa", 2, r#""implementation":{"gqa":"native"}"#),
        base("small-gqa", 2, r#""activation_checkpointing":"full""#),
        base(
            "tiny-tied",
            3,
            r#""implementation":{"optimizer":"fused","logits":"compute-dtype"}"#,
        ),
        base("tiny-tied", 2, r#""offload":"full""#),
        base(
            "small",
            2,
            r#""offload":"optimizer","optimizer":"sgd-momentum""#,
        ),
        base(
            "small",
            2,
            r#""implementation":{"optimizer":"foreach","logits":"float-output-kept"}"#,
        ),
        // A hand-written loop's choices (plain-pytorch, but torchtitan's eager RMSNorm, which
        // is what the trainer runs): every block resharded after forward, the rotary table
        // for seq_len, the logits kept by the loop's name.
        base(
            "small",
            2,
            r#""preset":"plain-pytorch","implementation":{"rmsnorm":"eager","optimizer":"per-param"}"#,
        ),
        // Parameters dominate: the peaks move to all-gathers and the block's last gradients.
        base("small", 2, r#""batch":{"micro_batch_size":1,"seq_len":64}"#),
        ranks(2, ""),
        ranks(2, r#""activation_checkpointing":"full""#),
        ranks(2, r#""offload":"full""#),
        ranks(4, r#""activation_checkpointing":"selective-layer:2""#),
        ranks(4, r#""parallel":{"dp_replicate":2,"dp_shard":2}"#),
        ranks(
            4,
            r#""parallel":{"dp_replicate":2,"dp_shard":2},"activation_checkpointing":"full","offload":"optimizer""#,
        ),
    ]
}

/// One plan of a validation matrix.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub label: String,
    pub plan: PlanFile,
    /// Run as a real job of this many processes on this machine (every rank a row); absent:
    /// the single-device emulation of rank 0, in this process.
    #[serde(default)]
    pub nproc_per_node: Option<u64>,
}

fn describe(extra: &str) -> String {
    if extra.is_empty() {
        return String::new();
    }
    let v: serde_json::Value = serde_json::from_str(&format!("{{{extra}}}")).unwrap_or_default();
    let mut parts = vec![];
    fn walk(prefix: &str, v: &serde_json::Value, parts: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    walk(k, x, parts);
                }
            }
            serde_json::Value::String(s) => parts.push(format!("{prefix}={s}")),
            x => parts.push(format!("{prefix}={x}")),
        }
    }
    walk("", &v, &mut parts);
    format!(" {}", parts.join(" "))
}

/// Validates every plan of a matrix. A plan that cannot run (refused by the trainer, or a
/// runtime failure other than out of memory, which is a result) is reported beside the
/// others instead of stopping the matrix.
///
/// Multi-process entries start `exe` (a memplan binary; None: this executable) as their ranks.
pub fn validate_all(
    plans: &[Entry],
    steps: u64,
    device: TrainDevice,
    progress: bool,
    exe: Option<&std::path::Path>,
) -> (Vec<Validation>, Vec<(String, crate::error::Error)>) {
    let opts = TrainOptions {
        steps,
        device,
        progress,
        ..TrainOptions::default()
    };
    validate_all_with(plans, &opts, exe)
}

/// As [`validate_all`], with the run's options: `opts.steps`, `opts.device` and
/// `opts.record_trace` apply to every entry (a multi-process entry records every rank's trace
/// and carries each in its row's [`Validation::measured_trace`]); `opts.progress` to the
/// single-process ones.
pub fn validate_all_with(
    plans: &[Entry],
    opts: &TrainOptions,
    exe: Option<&std::path::Path>,
) -> (Vec<Validation>, Vec<(String, crate::error::Error)>) {
    let (steps, device) = (opts.steps, opts.device);
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for entry in plans {
        let label = &entry.label;
        let result = entry
            .plan
            .resolve()
            .and_then(|plan| match entry.nproc_per_node {
                None => validate_one(label, &plan, opts).map(|v| vec![v]),
                Some(n) => validate_ranks(
                    label,
                    &entry.plan,
                    &plan,
                    n,
                    (steps, device, opts.record_trace),
                    exe,
                ),
            });
        match result {
            Ok(v) => done.extend(v),
            Err(e) => failed.push((label.clone(), e)),
        }
    }
    (done, failed)
}

/// Runs `plan` as a job of `n` processes on this machine and compares every rank with the
/// estimate; rows are labelled `LABEL rank R`.
fn validate_ranks(
    label: &str,
    file: &PlanFile,
    plan: &Plan,
    n: u64,
    (steps, device, record_trace): (u64, TrainDevice, bool),
    exe: Option<&std::path::Path>,
) -> Result<Vec<Validation>> {
    let e = estimate(plan)?;
    let dir = std::env::temp_dir().join(format!(
        "memplan-validate-{}-{}",
        std::process::id(),
        label.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|err| crate::error::Error::runtime(format!("{}: {err}", dir.display())))?;
    let path = dir.join("plan.json");
    std::fs::write(
        &path,
        serde_json::to_string(file).expect("plan files serialize"),
    )
    .map_err(|err| crate::error::Error::runtime(format!("{}: {err}", path.display())))?;
    let mut args: Vec<std::ffi::OsString> = vec![
        "train".into(),
        "--plan".into(),
        path.clone().into(),
        "--steps".into(),
        steps.to_string().into(),
        "--quiet".into(),
        "--device".into(),
        match device {
            TrainDevice::Cpu => "cpu".into(),
            // Each rank takes the GPU of its LOCAL_RANK.
            TrainDevice::Cuda(_) => "cuda".into(),
        },
    ];
    if record_trace {
        // A launched rank records its trace into its report (it writes no trace file).
        args.extend(["--trace".into(), dir.join("trace.json").into()]);
    }
    let launch = crate::trainer::launch::Launch {
        progress: false,
        nproc_per_node: n,
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 0,
        timeout_s: 120,
        verbose: false,
        exe: exe.map(|p| p.to_path_buf()),
    };
    let outcome = crate::trainer::launch::launch(&launch, &args);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(outcome?
        .reports
        .into_iter()
        .map(|r| validation_of(&format!("{label} rank {}", r.rank), plan, &e, r))
        .collect())
}

/// Reads a matrix file: a JSON list of `{"label": str, "plan": {...plan file...}}`, each
/// optionally with `"nproc_per_node": N` to run it as a real job of N processes.
pub fn read_matrix(path: &std::path::Path) -> Result<Vec<Entry>> {
    let text = crate::input::read_text(path, "matrix")?;
    let entries: Vec<Entry> = serde_json::from_str(&text).map_err(|e| {
        crate::error::Error::input(format!(
            "matrix {}: malformed at line {} column {}: {e}",
            path.display(),
            e.line(),
            e.column()
        ))
    })?;
    Ok(entries)
}
