#![cfg(feature = "trainer")]
//! The context-parallel trainer (src/trainer/context_parallel.rs), a sequence shard per process
//! over c10d Gloo with FSDP over dp_shard x cp, through the binary: every rank's steady peak
//! against torch 2.11's own `context_parallel` ring attention as torchtitan's train step runs it
//! (tests/data/cp_torch_2.11.jsonl, measured by src/trainer/cp_reference.py under the same
//! counting allocator), and the losses against the trainer without CP on the same data.
//!
//! Run with `source scripts/libtorch-env.sh && cargo test --features trainer --test
//! context_parallel`; `-- --ignored` runs every record (about two minutes on two cores).

mod common;

use common::{layers, losses, run};
use serde_json::Value;

fn records() -> Vec<Value> {
    common::records("cp_torch_2.11.jsonl")
}

/// The plan of a record (fp32, `.float()` logits as the reference's model returns them), on
/// dp_shard x `cp` ranks; with `cp` 1, the same batch without context parallelism.
fn plan_json(c: &Value, cp: u64) -> String {
    let dp = c["dp_shard"].as_u64().unwrap();
    let parallel = if cp > 1 {
        format!(
            r#"{{"dp_shard":{dp},"cp":{cp},"cp_rotate":{}}}"#,
            c["rotate"]
        )
    } else {
        format!(r#"{{"dp_shard":{dp}}}"#)
    };
    format!(
        r#"{{"model":{},"gpu":"cpu","num_gpus":{},"parallel":{parallel},
            "batch":{{"micro_batch_size":{},"seq_len":{}}},
            "precision":{{"param":"fp32","master":"fp32","reduce":"fp32"}},
            "implementation":{{"logits":"float-output"}},
            "activation_checkpointing":{}}}"#,
        c["model"],
        dp * cp,
        c["batch"],
        c["seq"],
        c["ac"]
    )
}

/// Runs `plan` on `ranks` processes for `steps` steps; the reports, in rank order.
fn train(plan: &str, ranks: u64, steps: u64) -> Vec<Value> {
    common::train(plan, ranks, steps, "rank")
}

/// Parameter tensors: 9 per block (two norms, seven projections), the embedding, the final
/// norm and the output projection.
fn param_tensors(layers: u64) -> u64 {
    9 * layers + 3
}

/// Runs record `index` on its dp_shard x cp ranks: every rank holds torch's steady peak to the
/// byte, less the bytes above. Returns the reports.
fn ranks_match_torch(index: usize) -> Vec<Value> {
    let c = &records()[index];
    let cp = c["cp"].as_u64().unwrap();
    let n = cp * c["dp_shard"].as_u64().unwrap();
    let reports = train(&plan_json(c, cp), n, 3);
    assert_eq!(reports.len() as u64, n);
    let l = layers(c["model"].as_str().unwrap());
    for (rank, r) in reports.iter().enumerate() {
        let torch = c["measured"][rank].as_u64().unwrap();
        let ours = r["steady_step"]["peak_allocated_bytes"].as_u64().unwrap();
        assert_eq!(
            ours + common::torch_only_bytes(param_tensors(l)),
            torch,
            "{c}: rank {rank}"
        );
        // The step scalars are where a GPU keeps them: on the host.
        assert_eq!(
            r["steady_step"]["optimizer"]["peak_host_bytes"].as_u64(),
            Some(4 * param_tensors(l)),
            "{c}: rank {rank}"
        );
    }
    reports
}

/// On the same data the ring learns as the whole sequence does: every rank reports the job's
/// loss, equal to the run without CP to float rounding (the merge of partial softmaxes sums in
/// another order), and the same gradient norm.
fn losses_follow_the_run_without_cp(index: usize, ranks: &[Value]) {
    let c = &records()[index];
    let dp = c["dp_shard"].as_u64().unwrap();
    let whole = train(&plan_json(c, 1), dp, 3);
    let reference = losses(&whole[0]);
    let l = losses(&ranks[0]);
    for r in ranks {
        assert_eq!(losses(r), l, "{c}: every rank reports the job's loss");
    }
    for (a, b) in l.iter().zip(&reference) {
        assert!((a - b).abs() < 2e-6, "{c}: {l:?} vs {reference:?}");
    }
    for (s, w) in ranks[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .zip(whole[0]["steps"].as_array().unwrap())
    {
        let (a, b) = (
            s["grad_norm"].as_f64().unwrap(),
            w["grad_norm"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-5 * b, "{c}: grad norm {a} vs {b}");
    }
    assert!(l[2] < l[0], "{c} learns: {l:?}");
}

#[test]
fn ring_attention_ranks_hold_what_torch_holds_and_learn_as_the_whole_sequence() {
    // tiny, CP 2, all-gather rotation: the peak in the ring's backward
    let reports = ranks_match_torch(0);
    losses_follow_the_run_without_cp(0, &reports);
}

#[test]
fn fully_checkpointed_ring_ranks_hold_what_torch_holds() {
    ranks_match_torch(3); // tiny, CP 2, checkpoint_wrapper on every block: the ring recomputed
}

#[test]
fn all_to_all_rotation_holds_what_torch_holds() {
    ranks_match_torch(8); // tiny, CP 2, a permute_tensor receive buffer per ring step
}

#[test]
fn fsdp_over_dp_shard_x_cp_holds_what_torch_holds_and_learns_as_fsdp_alone() {
    // tiny, dp_shard 2 x CP 2 (four ranks), FSDP over all four
    let reports = ranks_match_torch(6);
    losses_follow_the_run_without_cp(6, &reports);
}

#[test]
fn a_four_way_ring_holds_what_torch_holds() {
    ranks_match_torch(9); // tiny, CP 4: the last rank never updates half its output
}

/// Every record (the CI subset above covers each layout once): run by hand with `--ignored`.
#[test]
#[ignore]
fn every_record_holds_what_torch_holds() {
    for index in 0..records().len() {
        ranks_match_torch(index);
    }
}

/// What the CP trainer does not run is refused before any rank starts, with the reason.
#[test]
fn unsupported_cp_layouts_are_refused() {
    let c = &records()[0];
    // Native GQA (fewer key heads than query heads) is not what the CPU flash kernel takes.
    let gqa = plan_json(c, 2)
        .replace(r#""model":"tiny""#, r#""model":"tiny-gqa""#)
        .replace(
            r#""logits":"float-output""#,
            r#""logits":"float-output","gqa":"native""#,
        );
    let out = run(&gqa, 2, 1);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("implementation.gqa"), "{err}");
    // One process does not emulate the ring.
    let one = run(&plan_json(c, 2), 1, 1);
    assert!(!one.status.success());
    let err = String::from_utf8_lossy(&one.stderr);
    assert!(err.contains("parallel.cp"), "{err}");
}
