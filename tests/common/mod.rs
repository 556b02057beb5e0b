//! Helpers shared by the tests against recorded measurements (tests/estimator.rs) and by the
//! multi-process trainer tests (tests/pipeline.rs, tests/tensor_parallel.rs): records of
//! torch's own measurements, and `memplan train` jobs run through the binary.
#![allow(dead_code)]

use std::process::{Command, Output};

use serde_json::Value;

/// The records of a file of measurements in tests/data (JSON lines, one case each).
pub fn records(file: &str) -> Vec<Value> {
    let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `memplan train` on `plan` (as `nproc` processes when above 1) for `steps` steps, one
/// thread each; its output as it is.
pub fn run(plan: &str, nproc: u64, steps: u64) -> Output {
    run_env(plan, nproc, steps, &[])
}

/// [`run`] with environment variables set for the job.
pub fn run_env(plan: &str, nproc: u64, steps: u64, vars: &[(&str, &str)]) -> Output {
    run_with(plan, nproc, steps, vars, &[])
}

/// [`run_env`] with more command-line arguments for `memplan train` (e.g. `--lr`).
pub fn run_with(
    plan: &str,
    nproc: u64,
    steps: u64,
    vars: &[(&str, &str)],
    args: &[&str],
) -> Output {
    let dir = std::env::temp_dir().join(format!(
        "memplan-job-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("plan.json");
    std::fs::write(&path, plan).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_memplan"));
    cmd.args(["train", "--quiet", "--format", "json", "--plan"])
        .arg(&path)
        .args(["--steps", &steps.to_string()])
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .envs(vars.iter().copied());
    if nproc > 1 {
        cmd.args(["--nproc-per-node", &nproc.to_string()]);
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// [`run`], which must succeed; the reports, ordered by the report's `order` field (the rank,
/// or the pipeline stage).
pub fn train(plan: &str, nproc: u64, steps: u64, order: &str) -> Vec<Value> {
    train_env(plan, nproc, steps, order, &[])
}

/// [`train`] with environment variables set for the job.
pub fn train_env(
    plan: &str,
    nproc: u64,
    steps: u64,
    order: &str,
    vars: &[(&str, &str)],
) -> Vec<Value> {
    train_with(plan, nproc, steps, order, vars, &[])
}

/// [`train_env`] with more command-line arguments for `memplan train`.
pub fn train_with(
    plan: &str,
    nproc: u64,
    steps: u64,
    order: &str,
    vars: &[(&str, &str)],
    args: &[&str],
) -> Vec<Value> {
    let out = run_with(plan, nproc, steps, vars, args);
    assert!(
        out.status.success(),
        "{plan}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut reports: Vec<Value> = if nproc > 1 {
        doc["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["report"].clone())
            .collect()
    } else {
        vec![doc["runs"][0]["report"].clone()]
    };
    reports.sort_by_key(|r| r[order].as_u64().unwrap_or(0));
    reports
}

/// The layers of a shipped model profile.
pub fn layers(model: &str) -> u64 {
    let path = format!(
        "{}/profiles/models/{model}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let m: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    m["num_hidden_layers"].as_u64().unwrap()
}

/// The losses a report gives, step by step.
pub fn losses(r: &Value) -> Vec<f64> {
    r["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// What torch's record holds that a trainer rank's device counter does not, for a rank holding
/// `param_tensors` parameter tensors: torch.optim's `state["step"]` scalars (a 4-byte float32
/// CPU tensor each, device bytes on a CPU run of the reference, host bytes in the trainer, as
/// on a GPU) and the 1-byte uint8 tensor c10d's `ProcessGroup::barrier` keeps in a static
/// variable (torch/csrc/distributed/c10d/ProcessGroup.hpp), which the references'
/// `dist.barrier()` makes; the trainer's barriers go to the Gloo backend directly.
pub fn torch_only_bytes(param_tensors: u64) -> u64 {
    4 * param_tensors + 1
}
