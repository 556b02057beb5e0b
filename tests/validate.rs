//! The estimator against real libtorch training on the CPU: every plan of the CI matrix
//! within 3% of the measured peak allocated bytes (exact counts of libtorch's CPU allocator).
#![cfg(feature = "trainer")]

use memplan::trainer::TrainDevice;
use memplan::validate::{cpu_matrix, validate_all};

#[test]
fn every_cpu_matrix_plan_is_within_three_percent_of_measured_peak() {
    let plans = cpu_matrix();
    assert!(plans.len() >= 12);
    let (rows, failed) = validate_all(&plans, 3, TrainDevice::Cpu, false);
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
