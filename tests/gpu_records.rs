//! Measurements from a real GPU, kept in tests/data/gpu, against the estimator and the
//! allocator model. Recorded by `scripts/gpu-validate.sh` on an NVIDIA H200 (143,771 MiB,
//! driver 580.159.04, torch 2.11.0+cu130) on 2026-11-29: the caching allocator's own
//! counters and history, so these figures are independent of memplan's arithmetic.

use std::io::Read;

use assert_cmd::Command;
use memplan::estimate::simulate::replay;
use memplan::plan::PlanFile;
use memplan::trace::{Source, Trace};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/gpu");

/// The CUDA run's trace: llama3.2-1b, FSDP emulation of 1 rank, batch 2 x 2048, bf16/fp32,
/// no AC, two steps, recorded by `memplan train --device cuda --trace` from the caching
/// allocator's history.
fn h200_trace_text() -> String {
    let gz = std::fs::read(format!("{DATA}/h200-llama3.2-1b-fsdp1-trace.json.gz")).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .unwrap();
    text
}

/// What the caching allocator reported as this plan's peak reserved on the H200
/// (`peak_reserved_bytes` of the first run in h200-validate.json; the traced two-step run
/// of the same plan printed 30.46 GiB).
const H200_PEAK_RESERVED: u64 = 32_700_891_136;

/// The H200 validate records, each beside its scripts/gpu-matrix.json entry (label, plan)
/// and that plan resolved, in matrix order.
fn h200_runs() -> Vec<(serde_json::Value, serde_json::Value, memplan::plan::Plan)> {
    let read = |path: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let validated = read(&format!("{DATA}/h200-validate.json"));
    let matrix = read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/gpu-matrix.json"
    ));
    let (runs, matrix) = (
        validated["runs"].as_array().unwrap(),
        matrix.as_array().unwrap(),
    );
    assert_eq!(runs.len(), matrix.len());
    runs.iter()
        .zip(matrix)
        .map(|(run, entry)| {
            let label = entry["label"].as_str().unwrap();
            assert!(run["label"].as_str().unwrap().starts_with(label));
            let plan: PlanFile = serde_json::from_value(entry["plan"].clone()).unwrap();
            (run.clone(), entry.clone(), plan.resolve().unwrap())
        })
        .collect()
}

#[test]
fn the_allocator_model_replays_a_measured_cuda_step_to_its_measured_reserved_peak() {
    let trace: Trace = serde_json::from_str(&h200_trace_text()).unwrap();
    assert_eq!(trace.source, Source::Measured);
    let r = replay(&trace, &[]).unwrap();
    assert_eq!(r.runs[0].peak_reserved_bytes.get(), H200_PEAK_RESERVED);
    assert_eq!(r.runs[0].oom_event, None);
    // The validate run of the same plan (three steps) measured this peak allocated; the
    // trace has two steps, whose peak differs only by the optimizer's step scalars.
    let measured = h200_runs()[0].0["peak"]["measured_bytes"].as_u64().unwrap();
    let diff = r.peak_allocated_bytes.get().abs_diff(measured);
    assert!(
        diff < 1 << 20,
        "{} vs {measured}",
        r.peak_allocated_bytes.get()
    );
}

#[test]
fn replay_reads_a_trace_file_and_compares_allocator_settings() {
    let dir = std::env::temp_dir().join(format!("memplan-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("h200.json");
    std::fs::write(&path, h200_trace_text()).unwrap();
    let out = Command::cargo_bin("memplan")
        .unwrap()
        .args(["replay", "--format", "json", "--alloc-conf", ""])
        .args(["--alloc-conf", "expandable_segments:True"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["schema"], "memplan.replay/1");
    assert_eq!(doc["source"], "measured");
    assert_eq!(doc["runs"][0]["peak_reserved_bytes"], H200_PEAK_RESERVED);
    // Expandable segments map pages into a few growing segments: never more reserved than
    // whole 2 MiB-rounded blocks held in separate segments, and far fewer segments.
    let exp = &doc["runs"][1];
    assert_eq!(exp["alloc_conf"], "expandable_segments:True");
    assert!(exp["peak_reserved_bytes"].as_u64().unwrap() < H200_PEAK_RESERVED);
    assert!(exp["segments"].as_u64().unwrap() < doc["runs"][0]["segments"].as_u64().unwrap());
    // Bad input: one line naming the file, exit 2.
    std::fs::write(dir.join("bad.json"), "{\"events\": 3}").unwrap();
    let out = Command::cargo_bin("memplan")
        .unwrap()
        .arg("replay")
        .arg(dir.join("bad.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("bad.json") && err.contains("memplan.trace/1"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Every plan of the H200 matrix: the estimator's peak allocated against the caching
/// allocator's measured peak. The in-process plans after the first ran in a process whose
/// cuBLAS workspaces (two per step, one per thread's handle: 2 x 32 MiB on sm90) the first
/// plan had made, so their measured peaks lack them; the trainer frees them between runs
/// since, and the next GPU session re-measures. Those rows get the two workspaces back.
#[test]
fn the_estimator_predicts_every_measured_h200_plan_within_a_quarter_percent() {
    let mut worst = 0.0f64;
    for (i, (run, entry, plan)) in h200_runs().iter().enumerate() {
        let label = entry["label"].as_str().unwrap();
        let est = memplan::estimate::estimate(plan).unwrap();
        let own_process = i == 0 || entry.get("nproc_per_node").is_some();
        let workspaces = if own_process {
            0
        } else {
            2 * plan.gpu.workspace_bytes.get()
        };
        let measured = run["peak"]["measured_bytes"].as_u64().unwrap() + workspaces;
        let predicted = est.per_gpu.peak_allocated_bytes.get();
        let err = 100.0 * (predicted as f64 - measured as f64) / measured as f64;
        assert!(
            err.abs() < 0.25,
            "{label}: predicted {predicted}, measured {measured} ({err:+.3}%)"
        );
        worst = worst.max(err.abs());
    }
    assert!(
        worst > 0.0,
        "the records are real measurements, not the estimates"
    );
}

/// Reserved on the same H200 plans: the allocator model replaying the estimator's step as
/// the trainer runs it (one stream) against the fitted fragmentation constant, both against
/// the caching allocator's measured peak reserved. The simulation must be the closer on
/// average: the claim behind reporting it.
#[test]
fn simulated_reserved_beats_the_fitted_constant_on_the_measured_h200_plans() {
    let (mut sim_sum, mut fit_sum, mut n) = (0.0, 0.0, 0);
    for (run, entry, plan) in h200_runs() {
        let measured = run["report"]["peak_reserved_bytes"].as_u64().unwrap() as f64;
        let est = memplan::estimate::estimate(&plan).unwrap();
        let sim = memplan::estimate::simulate::reserved_on_one_stream(&plan, est.per_gpu.stage)
            .unwrap()
            .unwrap() as f64;
        let fit = est.per_gpu.peak_reserved_bytes.get() as f64;
        let (se, fe) = (
            100.0 * (sim - measured) / measured,
            100.0 * (fit - measured) / measured,
        );
        eprintln!(
            "{:40} measured {:8.0} MiB  simulated {se:+6.1}%  fitted {fe:+6.1}%",
            entry["label"].as_str().unwrap(),
            measured / 1048576.0
        );
        sim_sum += se.abs();
        fit_sum += fe.abs();
        n += 1;
    }
    let (sim_mean, fit_mean) = (sim_sum / n as f64, fit_sum / n as f64);
    eprintln!("mean |error|: simulated {sim_mean:.2}%, fitted {fit_mean:.2}% over {n} plans");
    assert_eq!(n, 14);
    assert!(
        sim_mean < fit_mean,
        "simulated {sim_mean:.2}% vs fitted {fit_mean:.2}%"
    );
}
