//! The estimator against real libtorch training on the CPU: every plan of the CI matrix
//! within 3% of the measured peak allocated bytes (exact counts of libtorch's CPU allocator).
#![cfg(feature = "trainer")]

use memplan::trainer::TrainDevice;
use memplan::validate::{cpu_matrix, validate_all};

#[test]
fn every_cpu_matrix_plan_is_within_three_percent_of_measured_peak() {
    let plans = cpu_matrix();
    assert!(plans.len() >= 12);
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_memplan"));
    let (rows, failed) = validate_all(&plans, 3, TrainDevice::Cpu, false, Some(exe));
    // Every multi-process entry gives a row per rank, labelled with it.
    let ranks: u64 = plans.iter().filter_map(|e| e.nproc_per_node).sum();
    assert_eq!(
        rows.iter().filter(|v| v.label.contains(" rank ")).count() as u64,
        ranks
    );
    assert!(failed.is_empty(), "{failed:?}");
    let table = memplan::output::validation::matrix(&rows, memplan::output::Format::Table);
    println!("{table}");
    for v in &rows {
        assert!(v.report.oom.is_none(), "{}: out of memory", v.label);
        assert!(v.peak.measured_bytes > 0, "{}: nothing measured", v.label);
        assert!(
            v.error_pct().abs() <= 3.0,
            "{}: predicted {} vs measured {} ({:+.2}%)\n{table}",
            v.label,
            v.peak.predicted_bytes,
            v.peak.measured_bytes,
            v.error_pct()
        );
    }
}

/// The seed case in miniature: a plan whose first forward and backward fit a device of 30 MB
/// but whose first optimizer step (where AdamW's states are created) does not. The estimator
/// names that moment; the trainer, with its CPU device capped at 30 MB, runs out of memory
/// exactly there and reports it as a result.
#[test]
fn trainer_runs_out_of_memory_where_the_estimator_says() {
    use memplan::estimate::{estimate, Phase};
    use memplan::trainer::{train, Phase as TrainPhase, TrainOptions};
    use memplan::units::Bytes;
    let mut plan: memplan::plan::Plan = serde_json::from_str::<memplan::plan::PlanFile>(
        r#"{"model":"small","gpu":"cpu","num_gpus":2,
            "batch":{"micro_batch_size":1,"seq_len":64},
            "implementation":{"optimizer":"per-param"}}"#,
    )
    .unwrap()
    .resolve()
    .unwrap();
    let capacity = 30_000_000;
    plan.gpu.memory_bytes = Bytes(capacity);
    let e = estimate(&plan).unwrap();
    let oom = e.per_gpu.first_oom.expect("predicted out of memory");
    assert!(oom.first_step && oom.phase == Phase::Optimizer, "{oom:?}");

    let opts = |limit| TrainOptions {
        steps: 2,
        device_limit: Some(limit),
        ..TrainOptions::default()
    };
    let r = train(&plan, &opts(capacity)).unwrap();
    let got = r.oom.expect("measured out of memory");
    assert_eq!(
        (got.step, got.phase),
        (1, TrainPhase::Optimizer),
        "{}",
        got.message
    );
    assert_eq!(r.steps_completed, 0);

    // With room for the steady step's peak (42.1 MB predicted), it trains.
    let r = train(&plan, &opts(43_000_000)).unwrap();
    assert!(r.oom.is_none(), "{:?}", r.oom);
    assert_eq!(r.steps_completed, 2);
}
