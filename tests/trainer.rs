#![cfg(feature = "trainer")]
//! The libtorch trainer: it trains, its emulations keep the math, and its counter is exact.
//!
//! Run with `source scripts/libtorch-env.sh && cargo test --features trainer --test trainer`.

use memplan::plan::{Plan, PlanFile};
use memplan::trainer::{train, TrainOptions, TrainReport};

fn plan(json: &str) -> Plan {
    let f: PlanFile = serde_json::from_str(json).expect("plan JSON");
    f.resolve().expect("plan resolves")
}

fn run(json: &str, steps: u64) -> TrainReport {
    let opts = TrainOptions {
        steps,
        ..TrainOptions::default()
    };
    let r = train(&plan(json), &opts).expect("trainer runs");
    assert!(r.oom.is_none(), "{:?}", r.oom);
    assert_eq!(r.steps_completed, steps);
    r
}

/// The tiny model in fp32 on one rank, no checkpointing, batch 2 x 32, plus `extra` keys.
fn tiny(extra: &str) -> String {
    let base = r#""model":"tiny","gpu":"cpu","batch":{"micro_batch_size":2,"seq_len":32},
                  "precision":{"param":"fp32","reduce":"fp32"}"#;
    if extra.is_empty() {
        format!("{{{base}}}")
    } else {
        format!("{{{base},{extra}}}")
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

#[test]
fn loss_falls_over_thirty_steps_on_the_tiny_model() {
    let r = run(
        &tiny(r#""batch":{"micro_batch_size":8,"seq_len":32}"#)
            .replace(r#""batch":{"micro_batch_size":2,"seq_len":32},"#, ""),
        30,
    );
    let first = r.losses[0];
    let last = *r.losses.last().unwrap();
    assert!(last < 0.5 * first, "loss {first} -> {last}: {:?}", r.losses);
}

#[test]
fn the_small_model_learns_within_thirty_steps_at_its_default_batch() {
    // small (vocab 2048) at its defaults: one sequence of 1024 tokens a step, bf16 compute.
    // The loss starts near ln(2048) = 7.6; the synthetic walk over 128 tokens is learnt well
    // below ln(128) = 4.85, which a model that only learnt the token subset would reach.
    let r = run(r#"{"model":"small","gpu":"cpu"}"#, 30);
    let first = r.losses[0];
    let tail = r.losses[27..].iter().sum::<f64>() / 3.0;
    assert!(
        (first - 2048f64.ln()).abs() < 0.3,
        "starts near ln(vocab): {first}"
    );
    assert!(
        tail < 0.5 * first && tail < 128f64.ln() - 1.0,
        "{:?}",
        r.losses
    );
}

#[test]
fn mixed_precision_trains_too() {
    let r = run(
        r#"{"model":"tiny","gpu":"cpu","batch":{"micro_batch_size":8,"seq_len":32},
            "precision":{"param":"bf16","reduce":"fp32"},"num_gpus":2,"parallel":{"dp_shard":2}}"#,
        30,
    );
    assert!(r.losses[29] < 0.6 * r.losses[0], "{:?}", r.losses);
}

#[test]
fn full_checkpointing_gives_the_same_losses_and_gradients_as_none() {
    let none = run(&tiny(""), 4);
    let full = run(&tiny(r#""activation_checkpointing":"full""#), 4);
    for (a, b) in none.steps.iter().zip(&full.steps) {
        assert!(close(a.loss, b.loss, 1e-6), "loss {} vs {}", a.loss, b.loss);
        assert!(
            close(a.grad_norm, b.grad_norm, 1e-6),
            "grad norm {} vs {}",
            a.grad_norm,
            b.grad_norm
        );
    }
}

#[test]
fn selective_layer_checkpointing_keeps_the_math() {
    let none = run(&tiny(""), 3);
    let sel = run(
        &tiny(r#""activation_checkpointing":"selective-layer:2""#),
        3,
    );
    for (a, b) in none.steps.iter().zip(&sel.steps) {
        assert!(close(a.loss, b.loss, 1e-6) && close(a.grad_norm, b.grad_norm, 1e-6));
    }
    assert!(
        sel.steady_step.unwrap().forward.end_allocated_bytes
            < none.steady_step.unwrap().forward.end_allocated_bytes
    );
}

#[test]
fn fsdp_emulation_over_two_ranks_keeps_the_loss_trajectory() {
    let one = run(&tiny(""), 5);
    let two = run(&tiny(r#""num_gpus":2,"parallel":{"dp_shard":2}"#), 5);
    assert_eq!(two.dp_shard, 2);
    for (a, b) in one.steps.iter().zip(&two.steps) {
        assert!(close(a.loss, b.loss, 1e-5), "loss {} vs {}", a.loss, b.loss);
        assert!(
            close(a.grad_norm, b.grad_norm, 1e-5),
            "grad norm {} vs {}",
            a.grad_norm,
            b.grad_norm
        );
    }
    // Rank 0 holds half of the sharded parameters (the tiny model's rows are all even).
    assert_eq!(
        two.setup_allocated_bytes - FREQS,
        (one.setup_allocated_bytes - FREQS) / 2
    );
}

#[test]
fn full_checkpointing_lowers_the_peak() {
    // Activations must outweigh the parameters: batch 8 x 128.
    let big = |ac: &str| {
        tiny(&format!(
            r#""batch":{{"micro_batch_size":8,"seq_len":128}},"activation_checkpointing":"{ac}""#
        ))
        .replace(r#""batch":{"micro_batch_size":2,"seq_len":32},"#, "")
    };
    let none = run(&big("none"), 2);
    let full = run(&big("full"), 2);
    let (n, f) = (none.steady_step.unwrap(), full.steady_step.unwrap());
    let fb = |s: &memplan::trainer::StepReport| {
        s.forward
            .peak_allocated_bytes
            .max(s.backward.peak_allocated_bytes)
    };
    assert!(f.forward.peak_allocated_bytes < n.forward.peak_allocated_bytes);
    assert!(fb(&f) < fb(&n), "full AC {} vs none {}", fb(&f), fb(&n));
}

/// Hand count of the tiny profile (hidden 64, 2 layers, 4 heads of 16, 4 KV heads,
/// intermediate 176, vocab 256, untied).
const TINY_PARAMS: u64 = {
    let (h, kv, f, v) = (64, 64, 176, 256);
    let block = h + h * h + 2 * kv * h + h * h + h + 3 * f * h;
    2 * block + v * h + h + v * h
};
/// The rotary table: 2 x seq_len rows of head_dim / 2 complex64.
const FREQS: u64 = (2 * 32) * 8 * 8;
/// What the training loop holds from forward until the next batch: `input_ids` and `labels`
/// (2 x 32 int64 each) and the fp32 scalar loss.
const LOOP: u64 = 2 * (2 * 32 * 8) + 4;

#[test]
fn counter_matches_a_hand_count_of_sgd_momentum_buffers() {
    let r = run(
        &tiny(r#""optimizer":"sgd-momentum","implementation":{"optimizer":"per-param"}"#),
        2,
    );
    let s1 = r.first_step.unwrap();
    // After setup: fp32 parameters and the rotary table.
    assert_eq!(r.setup_allocated_bytes, 4 * TINY_PARAMS + FREQS);
    // The optimizer of step 1 starts with parameters, gradients and the loop's batch and loss,
    // clones each gradient into
    // its momentum buffer and updates in place: exactly one more copy of the parameters.
    assert_eq!(
        s1.optimizer.start_allocated_bytes,
        2 * 4 * TINY_PARAMS + FREQS + LOOP
    );
    assert_eq!(
        s1.optimizer.peak_allocated_bytes,
        3 * 4 * TINY_PARAMS + FREQS + LOOP
    );
    assert_eq!(
        s1.optimizer.end_allocated_bytes,
        3 * 4 * TINY_PARAMS + FREQS + LOOP
    );
}

#[test]
fn counter_matches_a_hand_count_of_adamw_states() {
    let r = run(
        &tiny(r#""optimizer":"adamw","implementation":{"optimizer":"foreach"}"#),
        2,
    );
    let (s1, s2) = (r.first_step.unwrap(), r.steady_step.unwrap());
    let p = 4 * TINY_PARAMS;
    assert_eq!(s1.optimizer.start_allocated_bytes, 2 * p + FREQS + LOOP);
    // exp_avg and exp_avg_sq for every parameter, created lazily at step 1.
    assert_eq!(s1.optimizer.end_allocated_bytes, 4 * p + FREQS + LOOP);
    // foreach: `_foreach_sqrt(exp_avg_sqs)` is one more copy of every parameter at once (plus
    // libtorch's few-byte wrapped scalars).
    let transient = s1.optimizer.peak_allocated_bytes - s1.optimizer.end_allocated_bytes;
    assert!(
        (p..p + 64).contains(&transient),
        "transient {transient}, params {p}"
    );
    // Steady state: zero_grad freed the gradients before forward.
    assert_eq!(s2.forward.start_allocated_bytes, 3 * p + FREQS + LOOP);
}

/// Prints the report of the plan in $MEMPLAN_PLAN (JSON) for $MEMPLAN_STEPS steps (default 2):
/// `cargo test --features trainer --test trainer -- --ignored --nocapture report_for_env_plan`.
#[test]
#[ignore]
fn report_for_env_plan() {
    let json = std::env::var("MEMPLAN_PLAN").expect("set MEMPLAN_PLAN to a plan JSON");
    let steps = std::env::var("MEMPLAN_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let r = run(&json, steps);
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
}

#[test]
fn native_gqa_computes_what_repeat_kv_does() {
    let p = |gqa: &str| {
        format!(
            r#"{{"model":"tiny-gqa","gpu":"cpu","batch":{{"micro_batch_size":2,"seq_len":32}},
                "precision":{{"param":"fp32","reduce":"fp32"}},"implementation":{{"gqa":"{gqa}"}}}}"#
        )
    };
    let rep = run(&p("repeat-kv"), 3);
    let nat = run(&p("native"), 3);
    for (a, b) in rep.steps.iter().zip(&nat.steps) {
        assert!(close(a.loss, b.loss, 1e-5) && close(a.grad_norm, b.grad_norm, 1e-4));
    }
    // repeat_kv materialises K and V for every query head; native attention does not.
    let (r, n) = (rep.steady_step.unwrap(), nat.steady_step.unwrap());
    assert!(n.forward.end_allocated_bytes < r.forward.end_allocated_bytes);
}

#[test]
fn offload_moves_state_from_device_to_host() {
    let none = run(&tiny(""), 2);
    let opt = run(&tiny(r#""offload":"optimizer""#), 2);
    let full = run(&tiny(r#""offload":"full""#), 2);
    for (a, b) in none.steps.iter().zip(&full.steps) {
        assert!(close(a.loss, b.loss, 1e-6), "offload keeps the math");
    }
    let p = 4 * TINY_PARAMS;
    // Optimizer offload: exp_avg and exp_avg_sq on the host, not the device.
    let (n1, o1) = (none.first_step.unwrap(), opt.first_step.unwrap());
    assert_eq!(
        n1.optimizer.end_allocated_bytes - o1.optimizer.end_allocated_bytes,
        2 * p
    );
    assert!(o1.optimizer.peak_host_bytes >= 2 * p);
    // Full offload: sharded parameters on the host from the start.
    assert_eq!(full.setup_allocated_bytes, FREQS);
    assert_eq!(full.setup_host_bytes, p);
}

#[test]
fn gradient_accumulation_runs_every_micro_batch() {
    let r = run(
        &tiny(r#""batch":{"micro_batch_size":2,"seq_len":32,"grad_accum_steps":3}"#)
            .replace(r#""batch":{"micro_batch_size":2,"seq_len":32},"#, ""),
        2,
    );
    assert!(r.losses.iter().all(|l| l.is_finite()));
}

#[test]
fn refuses_what_it_cannot_emulate() {
    let opts = TrainOptions::default();
    let e = train(
        &plan(&tiny(r#""activation_checkpointing":"selective-op""#)),
        &opts,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("not supported by the trainer"),
        "{e}"
    );
    let e = train(&plan(&tiny(r#""num_gpus":2,"parallel":{"tp":2}"#)), &opts).unwrap_err();
    assert!(e.to_string().contains("parallel.tp"), "{e}");
    // What it would otherwise run as something else: each refused by the field that asks.
    for (extra, field) in [
        (r#""lora":{"rank":8}"#, "lora"),
        (r#""compile":true"#, "compile"),
        (
            r#""implementation":{"rmsnorm":"fused"}"#,
            "implementation.rmsnorm",
        ),
        (
            r#""implementation":{"rotary":"cos-sin"}"#,
            "implementation.rotary",
        ),
        (
            r#""num_gpus":2,"implementation":{"fsdp_units":"split"}"#,
            "implementation.fsdp_units",
        ),
        (r#""preset":"torchtitan-0.2""#, "implementation.rmsnorm"),
        (r#""preset":"torchtitan-0.3""#, "implementation.logits"),
        (
            r#""implementation":{"zero_grad":"zeros"}"#,
            "implementation.zero_grad",
        ),
        (
            r#""num_gpus":2,"preset":"hf-transformers","parallel":{"zero":{"stage":3}}"#,
            "parallel.zero",
        ),
    ] {
        let e = train(&plan(&tiny(extra)), &opts).unwrap_err();
        assert_eq!(e.kind(), memplan::error::Kind::Input, "{extra}: {e}");
        assert!(e.to_string().contains(field), "{extra}: {e}");
    }
}

#[test]
fn asking_for_a_missing_gpu_is_an_input_error() {
    if tch::Cuda::is_available() {
        return;
    }
    let opts = TrainOptions {
        device: memplan::trainer::TrainDevice::Cuda(0),
        progress: true,
        ..TrainOptions::default()
    };
    let e = train(&plan(&tiny("")), &opts).unwrap_err();
    assert_eq!(e.kind(), memplan::error::Kind::Input, "{e}");
}

// ---------------------------------------------------------------------------------------------
// The measured allocation trace.

use memplan::trace::{Category, MarkKind, Section, Trace};
use memplan::trainer::memory::PhaseMemory;
use memplan::trainer::StepReport;

fn run_traced(json: &str, steps: u64) -> TrainReport {
    let opts = TrainOptions {
        steps,
        record_trace: true,
        ..TrainOptions::default()
    };
    let r = train(&plan(json), &opts).expect("trainer runs");
    assert!(r.oom.is_none(), "{:?}", r.oom);
    r
}

/// The running sum after the first `at` events.
fn sum_at(run: &[u64], at: usize) -> u64 {
    if at == 0 {
        0
    } else {
        run[at - 1]
    }
}

/// Checks a trace against the counters of the run that recorded it: every section's start and
/// highest running sum are the phase's start and peak (forward and backward: over the
/// micro-batches), the end is what the last step left allocated, and the marks are setup,
/// then forward and backward of each micro-batch and the optimizer, for step 1 and, when
/// there is more than one step, the last step, then the end.
fn check_trace_against_counters(r: &TrainReport, accum: u64) {
    let t = r.trace.as_ref().expect("a recorded run has a trace");
    let run = t.running().expect("the trace is consistent");
    let steps: Vec<(bool, &StepReport)> = if r.steps_completed > 1 {
        vec![
            (true, r.first_step.as_ref().unwrap()),
            (false, r.steady_step.as_ref().unwrap()),
        ]
    } else {
        vec![(true, r.first_step.as_ref().unwrap())]
    };
    // The marks, in order.
    let mut want = vec![(
        MarkKind::Begin {
            section: Section::Setup,
            micro: 0,
        },
        true,
    )];
    for &(first, _) in &steps {
        for micro in 0..accum {
            for section in [Section::Forward, Section::Backward] {
                want.push((MarkKind::Begin { section, micro }, first));
            }
        }
        want.push((
            MarkKind::Begin {
                section: Section::Optimizer,
                micro: 0,
            },
            first,
        ));
    }
    want.push((MarkKind::End, steps.len() == 1));
    let got: Vec<(MarkKind, bool)> = t
        .marks
        .iter()
        .map(|m| (m.kind.clone(), m.first_step))
        .collect();
    assert_eq!(got, want);
    assert_eq!(t.marks[0].at, 0);
    // Section starts and peaks.
    for &(first, s) in &steps {
        let phase = |section: Section| -> &PhaseMemory {
            match section {
                Section::Forward => &s.forward,
                Section::Backward => &s.backward,
                _ => &s.optimizer,
            }
        };
        for section in [Section::Forward, Section::Backward, Section::Optimizer] {
            let mut peak = 0;
            let mut start = None;
            for (k, m) in t.marks.iter().enumerate() {
                if m.first_step != first
                    || !matches!(m.kind, MarkKind::Begin { section: x, .. } if x == section)
                {
                    continue;
                }
                let end = t.marks[k + 1].at;
                let values =
                    std::iter::once(sum_at(&run, m.at)).chain(run[m.at..end].iter().copied());
                peak = peak.max(values.max().unwrap());
                start.get_or_insert(sum_at(&run, m.at));
            }
            let p = phase(section);
            assert_eq!(
                start,
                Some(p.start_allocated_bytes),
                "start of {section:?} (first step: {first})"
            );
            assert_eq!(
                peak, p.peak_allocated_bytes,
                "peak of {section:?} (first step: {first})"
            );
        }
    }
    // Setup ends where step 1 begins; the trace ends at the End mark, where the last step
    // left its tensors.
    assert_eq!(sum_at(&run, t.marks[1].at), r.setup_allocated_bytes);
    let end = t.marks.last().unwrap();
    assert_eq!(end.at, t.events.len());
    assert_eq!(
        sum_at(&run, end.at),
        r.steady_step
            .as_ref()
            .unwrap()
            .optimizer
            .end_allocated_bytes
    );
}

/// The tiny model with AdamW (foreach: step counters on the host), accumulation 2, on
/// `ranks` FSDP ranks, with the given precision and checkpointing.
fn traced_plan(param: &str, ranks: u64, ac: &str) -> String {
    format!(
        r#"{{"model":"tiny","gpu":"cpu","num_gpus":{ranks},"parallel":{{"dp_shard":{ranks}}},
            "batch":{{"micro_batch_size":2,"seq_len":32,"grad_accum_steps":2}},
            "precision":{{"param":"{param}","reduce":"fp32","master":"fp32"}},
            "optimizer":"adamw","implementation":{{"optimizer":"foreach"}},
            "activation_checkpointing":"{ac}"}}"#
    )
}

#[test]
fn the_trace_running_sum_is_the_counter_at_every_section_of_every_plan() {
    for (param, ranks) in [("fp32", 1), ("bf16", 2)] {
        for ac in ["none", "full"] {
            let r = run_traced(&traced_plan(param, ranks, ac), 3);
            check_trace_against_counters(&r, 2);
            let t = r.trace.as_ref().unwrap();
            // At the end: rank 0's fp32 shards (the tiny model's rows are all even, so no
            // padding), their gradients, AdamW's exp_avg and exp_avg_sq, and the inputs.
            let p = 4 * TINY_PARAMS / ranks;
            let c = t.categories_at(t.events.len());
            let at = |cat: Category| c[cat.index()];
            assert_eq!(at(Category::MasterParams), p, "{param} {ranks} {ac}");
            assert_eq!(at(Category::Gradients), p, "{param} {ranks} {ac}");
            assert_eq!(at(Category::OptimizerStates), 2 * p, "{param} {ranks} {ac}");
            assert_eq!(at(Category::Inputs), FREQS + LOOP, "{param} {ranks} {ac}");
            assert_eq!(
                c.iter().sum::<u64>(),
                4 * p + FREQS + LOOP,
                "nothing else is live at the end: {c:?}"
            );
        }
    }
}

#[test]
fn optimizer_states_appear_in_the_first_step_optimizer_section() {
    let r = run_traced(&traced_plan("fp32", 2, "none"), 2);
    let t = r.trace.as_ref().unwrap();
    let begin = |section: Section, first: bool| {
        t.marks
            .iter()
            .find(|m| {
                m.first_step == first
                    && matches!(m.kind, MarkKind::Begin { section: s, .. } if s == section)
            })
            .unwrap()
            .at
    };
    let states = |at: usize| t.categories_at(at)[Category::OptimizerStates.index()];
    // exp_avg and exp_avg_sq of rank 0's half of every parameter, in fp32: none before the
    // first optimizer step, all of them after it.
    assert_eq!(states(begin(Section::Optimizer, true)), 0);
    assert_eq!(
        states(begin(Section::Forward, false)),
        2 * 4 * TINY_PARAMS / 2
    );
    // Sharded gradients exist from the first backward on, as one fp32 copy of the shard.
    assert_eq!(
        t.categories_at(begin(Section::Optimizer, true))[Category::Gradients.index()],
        4 * TINY_PARAMS / 2
    );
    // Unsharded parameters are all-gathered (stream 1) and the reduce-scatter buffers
    // allocated on stream 2.
    assert!(t
        .events
        .iter()
        .any(|e| e.category == Category::UnshardedParams && e.stream == 1));
    assert!(t
        .events
        .iter()
        .any(|e| e.category == Category::GradientBuffers && e.stream == 2));
    assert!(t
        .events
        .iter()
        .any(|e| e.category == Category::Activations
            && e.owner.to_string() == "layers.1.feed_forward"));
}

#[test]
fn recording_changes_no_figure_and_is_off_by_default() {
    let json = traced_plan("fp32", 1, "none");
    let off = run(&json, 2);
    assert!(off.trace.is_none());
    let on = run_traced(&json, 2);
    for (a, b) in off.steps.iter().zip(&on.steps) {
        assert_eq!(a.forward, b.forward);
        assert_eq!(a.backward, b.backward);
        assert_eq!(a.optimizer, b.optimizer);
    }
    // A single step is recorded as the first step only.
    let one = run_traced(&tiny(""), 1);
    check_trace_against_counters(&one, 1);
}

fn memplan_bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_memplan"))
}

fn read_trace(path: &std::path::Path) -> Trace {
    let text = std::fs::read_to_string(path).expect("the trace file is written");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["schema"], "memplan.trace/1");
    serde_json::from_str(&text).expect("the trace file parses as a Trace")
}

#[test]
fn train_writes_the_trace_file_of_one_process_and_of_rank_zero_of_a_job() {
    let dir = std::env::temp_dir().join(format!("memplan-trace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = [
        "train",
        "--model",
        "tiny",
        "--gpu",
        "cpu",
        "--seq-len",
        "32",
        "--steps",
        "3",
        "--quiet",
        "--format",
        "json",
        "--num-gpus",
        "2",
        "--dp-shard",
        "2",
    ];
    for (what, extra) in [("emulated", vec![]), ("job", vec!["--nproc-per-node", "2"])] {
        let path = dir.join(format!("{what}.json"));
        let out = memplan_bin()
            .args(base)
            .args(&extra)
            .arg("--trace")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let t = read_trace(&path);
        assert_eq!(t.source, memplan::trace::Source::Measured);
        assert_eq!(t.rank, 0);
        let run = t.running().expect("the trace is consistent");
        // The stdout document is unchanged: no trace inside it.
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("\"events\""), "{what}: trace in stdout");
        let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let report = if extra.is_empty() {
            doc["runs"][0]["report"].clone()
        } else {
            doc["ranks"][0]["report"].clone()
        };
        assert_eq!(report["rank"], 0);
        assert_eq!(
            run.last().copied().unwrap_or(0),
            report["steady_step"]["optimizer"]["end_allocated_bytes"]
                .as_u64()
                .unwrap(),
            "{what}"
        );
        assert_eq!(
            run.iter().copied().max().unwrap_or(0),
            report["peak_allocated_bytes"].as_u64().unwrap(),
            "{what}: the trace holds the run's peak (steps 1 and 3 are recorded)"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The measured trace in the other formats: `train --trace run.svg` draws it over the
/// estimator's step, `run.pickle` is a memory_viz snapshot whose trace replays to the run's
/// measured peak; `validate --timeline DIR` draws one picture per plan.
#[test]
fn measured_traces_become_pictures_and_snapshots() {
    use memplan::output::memory_viz::summarize;
    let dir = std::env::temp_dir().join(format!("memplan-trace-formats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |trace: &std::path::Path| {
        let out = memplan_bin()
            .args([
                "train",
                "--model",
                "tiny",
                "--gpu",
                "cpu",
                "--num-gpus",
                "2",
            ])
            .args([
                "--seq-len",
                "32",
                "--steps",
                "2",
                "--quiet",
                "--format",
                "json",
            ])
            .arg("--trace")
            .arg(trace)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        doc["runs"][0]["report"]["peak_allocated_bytes"]
            .as_u64()
            .unwrap()
    };
    let svg = dir.join("run.svg");
    run(&svg);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("measured allocated") && text.contains("activations"));

    let pickle = dir.join("run.pickle");
    let peak = run(&pickle);
    let bytes = std::fs::read(&pickle).unwrap();
    assert_eq!(
        &bytes[..2],
        b"\x80\x04",
        "a protocol-4 pickle, as torch writes"
    );
    // The JSON trace of the same run, replayed by the snapshot writer's own summary.
    let json = dir.join("run.json");
    assert_eq!(run(&json), peak);
    let t = read_trace(&json);
    let events = memplan::output::memory_viz::from_trace(&t, &Default::default(), None).unwrap();
    assert_eq!(summarize(&events).unwrap().peak_allocated_bytes, peak);

    let matrix = dir.join("m.json");
    std::fs::write(
        &matrix,
        r#"[{"label":"tiny fsdp 2","plan":{"model":"tiny","gpu":"cpu","num_gpus":2,
             "batch":{"micro_batch_size":2,"seq_len":32}}}]"#,
    )
    .unwrap();
    let pics = dir.join("pictures");
    let out = memplan_bin()
        .args(["validate", "--quiet", "--steps", "2", "--matrix"])
        .arg(&matrix)
        .arg("--timeline")
        .arg(&pics)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pic = std::fs::read_to_string(pics.join("tiny_fsdp_2.svg")).unwrap();
    assert!(pic.contains("measured allocated") && pic.contains("step 1"));
    std::fs::remove_dir_all(&dir).ok();
}
