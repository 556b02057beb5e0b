#![cfg(feature = "trainer")]
//! The pipeline-parallel trainer (src/trainer/pipeline.rs), a stage per process over c10d
//! Gloo, through the binary: every stage's steady peak against torch 2.11's own
//! `torch.distributed.pipelining` (tests/data/pipelining_torch_2.11.jsonl, measured by
//! src/trainer/pipelining_reference.py under the same counting allocator), and the losses
//! against the single-process trainer on the same data.
//!
//! Run with `source scripts/libtorch-env.sh && cargo test --features trainer --test pipeline`.

mod common;

use common::{layers, losses};
use serde_json::Value;

fn records() -> Vec<Value> {
    common::records("pipelining_torch_2.11.jsonl")
}

/// The plan of a record (fp32, `.float()` logits as the reference's model returns them), with
/// `pp` stages or, for `pp` 1, the single-process trainer's plan of the same batch.
fn plan_json(c: &Value, pp: u64, micro_batches: u64) -> String {
    let parallel = if pp > 1 {
        format!(
            r#"{{"pp":{pp},"dp_shard":1,"pp_schedule":{}}}"#,
            c["schedule"]
        )
    } else {
        r#"{"dp_shard":1}"#.to_string()
    };
    format!(
        r#"{{"model":{},"gpu":"cpu","num_gpus":{pp},"parallel":{parallel},
            "batch":{{"micro_batch_size":{},"seq_len":{},"grad_accum_steps":{micro_batches}}},
            "precision":{{"param":"fp32","master":"fp32","reduce":"fp32"}},
            "implementation":{{"logits":"float-output"}},"activation_checkpointing":{}}}"#,
        c["model"], c["micro_batch_size"], c["seq"], c["ac"]
    )
}

/// Runs `plan` (as `pp` processes when pp > 1) for `steps` steps; the reports, in stage order.
fn train(plan: &str, pp: u64, steps: u64) -> Vec<Value> {
    common::train(plan, pp, steps, "pp_stage")
}

/// Parameter tensors a stage of a bias-free Llama holds: 9 per block (two norms, seven
/// projections), the embedding on the first stage, the final norm and the output projection on
/// the last; layers split as torchtitan splits them.
fn param_tensors(layers: u64, pp: u64, stage: u64) -> u64 {
    let blocks = layers / pp + u64::from(stage < layers % pp);
    9 * blocks + u64::from(stage == 0) + 2 * u64::from(stage + 1 == pp)
}

/// What torch's record holds that the trainer's device counter does not: torch.optim's
/// `state["step"]` scalars (a 4-byte float32 CPU tensor per parameter, counted as device bytes
/// on a CPU run of the reference, as host bytes by the trainer, as on a GPU), and the 1-byte
/// uint8 tensor that c10d's `ProcessGroup::barrier` keeps in a static variable
/// (torch/csrc/distributed/c10d/ProcessGroup.hpp), which the reference's `dist.barrier()`
/// between steps makes; the trainer's barriers go to the Gloo backend directly.
fn torch_only_bytes(layers: u64, pp: u64, stage: u64) -> u64 {
    4 * param_tensors(layers, pp, stage) + 1
}

/// Every stage of a record measures torch's steady peak to the byte, less the bytes above.
fn stages_match_torch(index: usize) {
    let c = &records()[index];
    assert_eq!(c["dp_shard"], 1, "{c}");
    let pp = c["pp"].as_u64().unwrap();
    let n = c["micro_batches"].as_u64().unwrap();
    let reports = train(&plan_json(c, pp, n), pp, 3);
    let model = c["model"].as_str().unwrap();
    for (stage, r) in reports.iter().enumerate() {
        assert_eq!(r["pp_stage"].as_u64(), Some(stage as u64));
        let torch = c["measured"][stage].as_u64().unwrap();
        let ours = r["steady_step"]["peak_allocated_bytes"].as_u64().unwrap();
        assert_eq!(
            ours + torch_only_bytes(layers(model), pp, stage as u64),
            torch,
            "{c}: stage {stage}"
        );
        // The step scalars are where a GPU keeps them: on the host.
        assert_eq!(
            r["steady_step"]["optimizer"]["peak_host_bytes"].as_u64(),
            Some(4 * param_tensors(layers(model), pp, stage as u64)),
            "{c}: stage {stage}"
        );
    }
}

#[test]
fn one_f_one_b_stages_hold_what_torch_pipelining_holds() {
    stages_match_torch(0); // tiny, pp 2, 4 micro-batches of 2 x 32
}

#[test]
fn gpipe_stages_hold_what_torch_pipelining_holds() {
    stages_match_torch(2); // tiny, pp 2, 4 micro-batches of 2 x 32
}

#[test]
fn one_f_one_b_with_eight_micro_batches_holds_what_torch_holds() {
    stages_match_torch(4); // tiny, pp 2, 8 micro-batches of 4 x 32
}

#[test]
fn gpipe_under_full_checkpointing_holds_what_torch_holds() {
    stages_match_torch(5); // tiny, pp 2, 2 micro-batches, AC full
}

#[test]
fn four_stages_hold_what_torch_holds_middle_stages_included() {
    stages_match_torch(12); // small, pp 4, 1F1B, 4 micro-batches of 1 x 64
}

fn grad_norm(r: &Value, step: usize) -> f64 {
    r["steps"][step]["grad_norm"].as_f64().unwrap()
}

/// With one micro-batch a pipeline step is the single-process step: the same weights, data
/// and arithmetic, so the same losses to the last bit.
#[test]
fn a_one_micro_batch_pipeline_learns_exactly_as_one_process() {
    let c = &records()[2];
    let pp = train(&plan_json(c, 2, 1), 2, 4);
    let one = train(&plan_json(c, 1, 1), 1, 4);
    assert_eq!(losses(&pp[0]), losses(&one[0]));
    assert_eq!(losses(&pp[1]), losses(&one[0]));
    assert_eq!(grad_norm(&pp[0], 0), grad_norm(&one[0], 0));
}

/// Over four micro-batches, GPipe and 1F1B (with and without checkpointing) compute the same
/// step. Against the single-process trainer, which sums the micro-batches' gradients, torch's
/// `scale_grads` divides them by the number of micro-batches: the first loss is the same, the
/// first gradient norm a quarter, and AdamW's update differs only through its epsilon (the
/// scaled gradient meets a 4x larger relative eps), a few 1e-6 in the loss after five steps.
#[test]
fn pipelined_losses_follow_the_single_process_run() {
    let c = &records()[0];
    let one = train(&plan_json(c, 1, 4), 1, 5);
    let reference = losses(&one[0]);
    for (schedule, ac) in [("gpipe", "none"), ("1f1b", "none"), ("1f1b", "full")] {
        let mut c = c.clone();
        c["schedule"] = schedule.into();
        c["ac"] = ac.into();
        let pp = train(&plan_json(&c, 2, 4), 2, 5);
        let l = losses(&pp[1]);
        assert_eq!(l, losses(&pp[0]), "every rank reports the job's loss");
        assert_eq!(l[0], reference[0], "{schedule} {ac}");
        let norm = grad_norm(&pp[0], 0);
        assert!(
            (4.0 * norm - grad_norm(&one[0], 0)).abs() < 1e-9 * norm,
            "{schedule} {ac}: {norm}"
        );
        for (a, b) in l.iter().zip(&reference) {
            assert!(
                (a - b).abs() < 1e-5,
                "{schedule} {ac}: {l:?} vs {reference:?}"
            );
        }
        assert!(l[4] < l[0] - 0.5, "{schedule} {ac} learns: {l:?}");
    }
}
