//! The estimator against independent figures: exact parameter counts, hand-derived byte
//! counts for small plans, the seed case, and published torchtitan measurements
//! (tests/data/published_cases.json, copied with its sources from the shared reference).

mod common;

use common::records;
use memplan::estimate::{estimate, Estimate, Phase};
use memplan::plan::{Plan, PlanFile};
use memplan::profiles;

fn plan(json: &str) -> Plan {
    serde_json::from_str::<PlanFile>(json)
        .unwrap()
        .resolve()
        .unwrap()
}

fn est(json: &str) -> Estimate {
    estimate(&plan(json)).unwrap()
}

fn published() -> serde_json::Value {
    serde_json::from_str(include_str!("data/published_cases.json")).unwrap()
}

fn case<'a>(all: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap()
}

#[test]
fn parameter_counts_are_exact() {
    let all = published();
    let counts = all["exact_parameter_counts"].as_object().unwrap();
    for (name, want) in counts {
        let profile = if name == "mistral-7b-v0.1" {
            "mistral-7b"
        } else {
            name
        };
        let m = profiles::model(profile).unwrap();
        assert_eq!(m.param_count(), want.as_u64().unwrap(), "{name}");
    }
    // Published totals of the other shipped profiles (model cards): Qwen2.5-7B 7.62B with
    // its q/k/v biases; Llama-3.2-1B 1.24B with tied embeddings.
    assert_eq!(
        profiles::model("qwen2.5-7b").unwrap().param_count(),
        7_615_616_512
    );
    assert_eq!(
        profiles::model("llama3.2-1b").unwrap().param_count(),
        1_235_814_400
    );
}

/// tiny (h 64, 2 layers, 4 heads, 4 KV heads, ffn 176, vocab 256, untied) in fp32 on one
/// CPU "GPU", no FSDP, no checkpointing, per-parameter AdamW; counted by hand.
/// Token ids and labels (int64, 32 tokens each), the fp32 loss, and the rotary table (2 x 16
/// positions x 8 complex64 for head_dim 16).
const TINY_INPUTS: u64 = 2 * 8 * 32 + 4 + 2 * 16 * 8 * 8;

const TINY_FP32: &str = r#"{"model":"tiny","gpu":"cpu","num_gpus":1,
    "batch":{"micro_batch_size":2,"seq_len":16},
    "precision":{"param":"fp32","reduce":"fp32","master":"fp32"},
    "implementation":{"optimizer":"per-param"}}"#;

#[test]
fn tiny_fp32_optimizer_step_is_counted_by_hand() {
    // block: 2 norms of 64 + q,k,v,o 64x64 + w1,w3 176x64 + w2 64x176 = 50,304; x2 layers
    // = 100,608; root: embedding and output 256x64 each + final norm 64 = 32,832.
    let params: u64 = 133_440;
    let e = est(TINY_FP32);
    let opt = e
        .per_gpu
        .timeline
        .iter()
        .find(|p| !p.first_step && p.phase == Phase::Optimizer)
        .unwrap();
    // params + grads + exp_avg + exp_avg_sq, fp32; plus sqrt and divide temporaries of the
    // largest parameter (the 256x64 embedding).
    assert_eq!(
        opt.allocated_bytes.get(),
        16 * params + 2 * 256 * 64 * 4 + TINY_INPUTS
    );
}

#[test]
fn tiny_fp32_activations_are_counted_by_hand() {
    // Per token per layer, fp32 (4 B): each eager RMSNorm saves the fp32 input copy (4x64),
    // rsqrt (4) and the normalised tensor (4x64) = 516; two norms 1032. Linear inputs: 2 x
    // 4x64 = 512. Attention (4 KV heads = 4 heads): q, k, v, out 4 x 4x64 + lse 4x4 = 1040.
    // wo's input is the attention output itself (flash returns a (b, s, heads, d) buffer, so
    // `.contiguous()` copies nothing). MLP: silu in, silu out, w3 out, product: 4 x 4x176 =
    // 2816. Total 5,400 per token per layer; 32 tokens, 2 layers. After the blocks, the
    // final norm saves 516 and the output projection its 4x64 input: 772 per token.
    // The first step's forward end holds the fp32 params (no grads or states yet), those
    // activations, and the loss buffers: the fp32 logits (`.float()` of fp32 is the same
    // tensor) and their log-softmax, 8 bytes per logit over 32 tokens x 256 entries.
    let e = est(TINY_FP32);
    let fwd = e.per_gpu.timeline[0];
    assert_eq!((fwd.first_step, fwd.phase), (true, Phase::Forward));
    assert_eq!(
        fwd.allocated_bytes.get(),
        4 * 133_440 + (2 * 5_400 + 772) * 32 + 8 * 32 * 256 + TINY_INPUTS
    );
    assert_eq!(
        e.per_gpu.peak_reserved_bytes,
        e.per_gpu.peak_allocated_bytes
    );
}

#[test]
fn full_checkpointing_keeps_one_block_input_per_layer() {
    let mut json: serde_json::Value = serde_json::from_str(TINY_FP32).unwrap();
    json["activation_checkpointing"] = "full".into();
    let e = estimate(
        &serde_json::from_value::<PlanFile>(json)
            .unwrap()
            .resolve()
            .unwrap(),
    )
    .unwrap();
    let fwd = e.per_gpu.timeline[0];
    assert_eq!(fwd.phase, Phase::Forward);
    // Forward end: params (no grads or states yet in step 1) + 2 layers x 32 tokens x 64 x 4 B
    // of block inputs + the final norm and output input (772 per token, not checkpointed) +
    // the loss buffers as above.
    let want = 4 * 133_440 + 2 * 32 * 64 * 4 + 772 * 32 + 8 * 32 * 256 + TINY_INPUTS;
    assert_eq!(fwd.allocated_bytes.get(), want);
}

fn within(pred: f64, measured: f64, tol: f64) -> bool {
    ((pred - measured) / measured).abs() <= tol
}

#[test]
fn seed_without_offload_runs_out_at_the_first_optimizer_step() {
    let e = est(memplan::plan::EXAMPLES[0].1);
    assert!(!e.fits_gpu);
    let oom = e.per_gpu.first_oom.unwrap();
    assert!(oom.first_step && oom.phase == Phase::Optimizer, "{oom:?}");
    // 16 bytes per parameter over 2 GPUs: 64.2 GB before any activation.
    let b = &e.per_gpu.breakdown;
    let static_bytes =
        b.master_params_bytes.get() + b.gradients_bytes.get() + b.optimizer_states_bytes.get();
    assert_eq!(static_bytes, 16 * 8_030_261_248 / 2);
    // Batch 2 does not fit either: the batch was never the problem.
    let two = est(&memplan::plan::EXAMPLES[0]
        .1
        .replace("\"micro_batch_size\": 1", "\"micro_batch_size\": 2"));
    assert!(!two.fits_gpu && two.per_gpu.first_oom.is_some());
}

#[test]
fn seed_with_offload_matches_the_reported_figures() {
    // Reported: about 18 GB per GPU and 155 GB of host RAM, batch 4. The sequence length is
    // not stated; 2048 is the one consistent with 18 GB (at 8192 the fp32 logits alone are
    // 16.8 GB). The user ran torchtitan, whose log prints reserved memory each step; that is
    // the figure compared (device total, nvidia-smi's view, is reported in the README).
    let all = published();
    let c = case(&all, "seed-8b-2x48g-cpu-offload");
    let gpu_gb = c["measured"]["gpu_gb_per_device"].as_f64().unwrap();
    let host_gb = c["measured"]["host_ram_gb_total"].as_f64().unwrap();
    let e = est(memplan::plan::EXAMPLES[1].1);
    assert!(e.fits);
    let gpu = e.per_gpu.peak_reserved_bytes.as_gb();
    let host = e.host.per_node_bytes.as_gb();
    assert!(within(gpu, gpu_gb, 0.15), "GPU {gpu:.1} GB vs {gpu_gb} GB");
    assert!(
        within(host, host_gb, 0.15),
        "host {host:.1} GB vs {host_gb} GB"
    );
}

/// The torchtitan rows of December 2024 (commit 9dec370): eager RMSNorm, repeat_kv, bf16
/// logits upcast in the loss, foreach AdamW: the estimator's default implementation.
fn torchtitan(gpus: u64, batch: u64, extra: &str) -> Estimate {
    est(&format!(
        r#"{{"model":"llama3-8b","gpu":"h100-96g","num_gpus":{gpus},
            "batch":{{"micro_batch_size":{batch},"seq_len":8192}},
            "activation_checkpointing":"selective-op"{extra}}}"#
    ))
}

#[test]
fn torchtitan_december_2024_rows_are_within_ten_percent_of_reserved() {
    let all = published();
    for (id, e) in [
        ("tt-8b-fsdp8-h100-bs2", torchtitan(8, 2, "")),
        ("tt-8b-fsdp128-h100-bs2", torchtitan(128, 2, "")),
        // torch.compile fuses the norms; the selective-op policy keeps the same tensors.
        (
            "tt-8b-fsdp8-h100-bs2-compile",
            torchtitan(8, 2, r#","implementation":{"rmsnorm":"fused"}"#),
        ),
    ] {
        let measured = case(&all, id)["measured_gib"].as_f64().unwrap();
        let pred = e.per_gpu.peak_reserved_bytes.as_gib();
        assert!(
            within(pred, measured, 0.10),
            "{id}: {pred:.2} GiB vs {measured} GiB"
        );
    }
}

#[test]
fn torchtitan_context_parallel_rows_are_within_ten_percent_of_reserved() {
    // compile + float8, full AC, local batch 1, 8 GPUs: FSDP x CP with the sequence growing
    // as CP does, so every rank holds the same tokens.
    let all = published();
    let rows = case(&all, "tt-8b-cp-sweep")["rows"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(rows.len(), 4);
    for row in rows {
        let (dp, cp) = (
            row["parallel"]["dp_shard"].as_u64().unwrap(),
            row["parallel"]["cp"].as_u64().unwrap(),
        );
        let seq = row["seq"].as_u64().unwrap();
        let e = est(&format!(
            r#"{{"model":"llama3-8b","gpu":"h100-96g","num_gpus":8,
                "parallel":{{"dp_shard":{dp},"cp":{cp}}},
                "batch":{{"micro_batch_size":1,"seq_len":{seq},"ignore_max_position":true}},
                "activation_checkpointing":"full","compile":true,"float8":true}}"#
        ));
        let measured = row["measured_gib"].as_f64().unwrap();
        let pred = e.per_gpu.peak_reserved_bytes.as_gib();
        assert!(
            within(pred, measured, 0.10),
            "cp {cp}: {pred:.2} GiB vs {measured} GiB"
        );
    }
}

#[test]
fn more_gpus_shrink_only_the_sharded_state() {
    let a = torchtitan(8, 2, "");
    let b = torchtitan(128, 2, "");
    assert_eq!(
        a.per_gpu.breakdown.activations_bytes,
        b.per_gpu.breakdown.activations_bytes
    );
    let da = a.per_gpu.peak_allocated_bytes.get() - b.per_gpu.peak_allocated_bytes.get();
    // fp32 params (4 B) and two Adam states (8 B) on 1/8 vs 1/128 of 8.03 B parameters.
    let want = 12.0 * 8_030_261_248f64 * (1.0 / 8.0 - 1.0 / 128.0);
    assert!(within(da as f64, want, 0.001), "{da} vs {want}");
}

#[test]
fn pipeline_schedules_hold_their_in_flight_micro_batches() {
    use memplan::estimate::in_flight_milli;
    let p = |sched: &str, v: u64| {
        plan(&format!(
            r#"{{"model":"llama3-8b","num_gpus":4,
                "parallel":{{"pp":4,"pp_schedule":"{sched}","pp_virtual_stages":{v}}},
                "batch":{{"grad_accum_steps":8}}}}"#
        ))
    };
    // GPipe: every one of the 8 micro-batches; 1F1B: pp - stage.
    assert_eq!(in_flight_milli(&p("gpipe", 1), 0), 8000);
    assert_eq!(in_flight_milli(&p("1f1b", 1), 0), 4000);
    assert_eq!(in_flight_milli(&p("1f1b", 1), 3), 1000);
    // ZB-H1 is refused, naming the field: torch's zero-bubble schedule holds far more than
    // 1F1B on every stage but the first (zero_bubble_stages_hold_more_than_1f1b, below).
    let zb: memplan::plan::PlanFile = serde_json::from_str(
        r#"{"model":"llama3-8b","num_gpus":4,"parallel":{"pp":4,"pp_schedule":"zb-h1"},
            "batch":{"grad_accum_steps":8}}"#,
    )
    .unwrap();
    let err = zb.resolve().unwrap_err().to_string();
    assert!(
        err.contains("parallel.pp_schedule") && err.contains("1f1b"),
        "{err}"
    );
    // Interleaved with 2 chunks per rank, rank 0: torch 2.11's warm-up of (v - 1) rounds of
    // m / (m / pp) = 4 micro-batches and 2 (pp - 1) more, and one steady forward: 11 chunk
    // forwards of half the rank's layers, 5.5 micro-batches' worth.
    assert_eq!(in_flight_milli(&p("interleaved-1f1b", 2), 0), 5500);
}

/// Why `zb-h1` is refused: torch 2.11's ScheduleInterleavedZeroBubble with one stage per rank
/// (tests/data/pipelining_zb_torch_2.11.jsonl, six plans measured by pipelining_reference.py)
/// runs each backward as an input-gradient step that keeps the micro-batch's graph, then a
/// weight-gradient step `r` slots later on rank `r` (the lowered action lists in
/// tests/data/pipelining_ir_torch_2.11.txt), so its last stage holds what 1F1B's holds and
/// more: 7% (small, pp 2) to 136% (tiny, full AC, whose input-gradient step keeps the
/// recomputed block) above the 1F1B estimate of the same stage. The first stage, whose weight
/// step follows its input step at once, is 0.0% to 4.0% above it.
#[test]
fn zero_bubble_stages_hold_more_than_1f1b() {
    for (line, c, measured) in measured_cases("pipelining_zb_torch_2.11.jsonl") {
        let one_f_one_b = c.to_string().replace(r#""interleaved-zb""#, r#""1f1b""#);
        let c1: serde_json::Value = serde_json::from_str(&one_f_one_b).unwrap();
        let plan = pipeline_plan(&c1, r#"{"param":"fp32","master":"fp32","reduce":"fp32"}"#);
        let at = |s: u64| {
            memplan::estimate::estimate_stage(&plan, s)
                .unwrap()
                .per_gpu
                .peak_allocated_bytes
                .get() as f64
        };
        let last = plan.parallel.pp - 1;
        let over = measured[last as usize] as f64 / at(last) - 1.0;
        assert!(over > 0.07, "{line}: last stage {:+.1}%", 100.0 * over);
        let first = measured[0] as f64 / at(0) - 1.0;
        assert!(
            (0.0..0.041).contains(&first),
            "{line}: first stage {:+.2}%",
            100.0 * first
        );
    }
}

#[test]
fn the_most_loaded_pipeline_stage_decides_and_is_named() {
    // 1F1B: the first stage holds 4 micro-batches of activations and the embedding; the last
    // holds 1 and the logits. With long sequences and small vocabulary the first stage wins.
    let e = est(
        r#"{"model":"llama2-7b","gpu":"h100-80g","num_gpus":4,"parallel":{"pp":4},
            "batch":{"micro_batch_size":2,"seq_len":4096,"grad_accum_steps":8}}"#,
    );
    assert_eq!(e.per_gpu.stage, 0);
    // And with one micro-batch in flight everywhere and a 128k vocabulary, the last stage.
    let e = est(
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":4,"parallel":{"pp":4},
            "batch":{"micro_batch_size":4,"seq_len":8192,"grad_accum_steps":1},
            "activation_checkpointing":"full"}"#,
    );
    assert_eq!(e.per_gpu.stage, 3);
}

#[test]
fn pipeline_stages_hold_a_receive_buffer_per_micro_batch() {
    // torch 2.11's PipelineStage keeps, per micro-batch, a buffer for its input activation
    // (every stage but the first) and one for its output's gradient (every stage but the
    // last), from the first step on. Measured with torch's own pipelining on CPU
    // (src/trainer/pipelining_reference.py): 65,536 B more than setup and AdamW states on
    // both stages of this plan: 4 micro-batches x (2 x 32 tokens x 64 hidden) x 4 B.
    let e = est(
        r#"{"model":"tiny","gpu":"cpu","num_gpus":2,"parallel":{"pp":2,"pp_schedule":"1f1b"},
            "batch":{"micro_batch_size":2,"seq_len":32,"grad_accum_steps":4},
            "precision":{"param":"fp32","master":"fp32","reduce":"fp32"},
            "activation_checkpointing":"none"}"#,
    );
    assert_eq!(e.per_gpu.stage, 0);
    // Stage 0: int64 ids of the whole step (the schedule's micro-batches are views of it: 4
    // x 8 x 64), the rotary table (2 x 32 positions x 8 complex64 of head_dim 16: 4,096 B)
    // and the gradient receive buffers.
    let buffers = 4 * (2 * 32 * 64) * 4;
    assert_eq!(
        e.per_gpu.breakdown.inputs_bytes.get(),
        4 * 8 * 64 + 4096 + buffers
    );
}

/// torch 2.11's own `torch.distributed.pipelining` on CPU/Gloo, counted byte for byte by the
/// shim's allocator (src/trainer/pipelining_reference.py, run by hand with torchrun):
/// tests/data/pipelining_torch_2.11.jsonl holds the steady step's peak of every stage of 20
/// plans (tiny and small shapes; 2 and 4 stages; GPipe and 1F1B; without FSDP and with
/// dp_shard 2, `fully_shard` per block and stage root, reshard_after_forward off as
/// torchtitan sets it under PP; 2 to 8 micro-batches; AC none and full; fp32, AdamW foreach).
/// Before the estimator modelled what the schedules keep (docs/research/
/// parallelism-torch-2.11.md, "What torch holds at each peak") it erred by -7.8% to +8.8% on
/// the first four.
#[test]
fn every_pipeline_stage_matches_torch_2_11_pipelining_measured_on_cpu() {
    let mut stages = 0;
    for (line, c, measured) in measured_cases("pipelining_torch_2.11.jsonl") {
        let plan = pipeline_plan(&c, r#"{"param":"fp32","master":"fp32","reduce":"fp32"}"#);
        assert!(!plan.reshard_after_forward, "torchtitan's default under PP");
        assert_eq!(measured.len() as u64, plan.parallel.pp);
        for (stage, &m) in measured.iter().enumerate() {
            let e = memplan::estimate::estimate_stage(&plan, stage as u64).unwrap();
            let pred = e.per_gpu.peak_allocated_bytes.get() as f64;
            assert!(
                within(pred, m as f64, 0.01),
                "{line}: stage {stage}: {pred} vs {m}"
            );
            stages += 1;
        }
        // The stage it reports is the one torch measured the highest.
        let most = estimate(&plan).unwrap().per_gpu.stage as usize;
        let highest = (0..measured.len()).max_by_key(|&i| measured[i]).unwrap();
        assert_eq!(most, highest, "{line}");
    }
    assert_eq!(stages, 50);
}

/// The `"lora"` member of a plan for a record of src/trainer/hf_reference.py (its "qkvo"
/// targets are the plan's "attention"), with `extra` members appended (e.g. the quantisation).
fn lora_member(lora: &serde_json::Value, extra: &str) -> String {
    let targets = match lora["targets"].as_str().unwrap() {
        "qkvo" => "attention",
        t => t,
    };
    format!(
        r#""lora":{{"rank":{},"targets":"{targets}","dropout":{}{extra}}}"#,
        lora["r"], lora["dropout"]
    )
}

/// The lines of a file of torch measurements in tests/data (JSON lines, one case each), each
/// parsed, with its `measured` peaks (per stage or per rank).
fn measured_cases(file: &str) -> Vec<(String, serde_json::Value, Vec<u64>)> {
    records(file)
        .into_iter()
        .map(|c| {
            let measured = c["measured"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            (c.to_string(), c, measured)
        })
        .collect()
}

/// The plan of a case of src/trainer/pipelining_reference.py, whose model returns
/// `.float()` logits, in `precision` (a plan file's precision object).
fn pipeline_plan(c: &serde_json::Value, precision: &str) -> Plan {
    let (pp, dp) = (c["pp"].as_u64().unwrap(), c["dp_shard"].as_u64().unwrap());
    plan(&format!(
        r#"{{"model":{},"gpu":"cpu","num_gpus":{},
            "parallel":{{"pp":{pp},"dp_shard":{dp},"pp_schedule":{},"pp_virtual_stages":{}}},
            "batch":{{"micro_batch_size":{},"seq_len":{},"grad_accum_steps":{}}},
            "precision":{precision},"implementation":{{"logits":"float-output"}},
            "activation_checkpointing":{}}}"#,
        c["model"],
        pp * dp,
        c["schedule"],
        c["v"].as_u64().unwrap_or(1),
        c["micro_batch_size"],
        c["seq"],
        c["micro_batches"],
        c["ac"]
    ))
}

/// torch 2.11's own tensor parallelism (DTensor `parallelize_module` as torchtitan's
/// `apply_tp`, run by hand: src/trainer/tp_reference.py, TP 2 on CPU/Gloo, counted by the
/// shim's allocator; each rank's lowest steady-step peak of three runs, as Gloo frees some
/// collective buffers on its own threads): tests/data/tp_torch_2.11.jsonl. The plans without
/// FSDP are held to 16 bytes past torch's CPU-only ones: sequence parallelism on and off, loss
/// parallelism on (its backward keeps `exp` of the logits shard: 16 bytes per logit, not 12,
/// and 33 bytes per token of index and mask tensors; the latter was the last -0.23%) and off
/// (every rank holds the whole vocabulary's logits), and the embedding's gradient, which
/// `embedding_dense_backward` makes whole (V x h) beside the row-sharded weight; without FSDP
/// the output projection's and final norm's gradients live through the blocks' backward.
/// TP x FSDP on tiny (its peak in loss parallelism's backward, the root resharded after
/// forward as torch 2.11 does for torchtitan's explicit `reshard_after_forward=True`:
/// `fsdp_units: root-resharded-keep-last`) is held to the same 16 B; it was +2.9% with the root
/// kept gathered and without the loss's per-token tensors.
/// TP 2 x FSDP 2 with full activation checkpointing (tests/data/tp_fsdp_ac_torch_2.11.jsonl,
/// tp_reference.py with `"ac": "full"`, each rank's lowest steady peak of three runs): the
/// recompute of a block runs from the parameters its pre-backward gathered. Tiny is 260 B
/// (0.02%) under torch less its CPU-only bytes, small 87,044 B (0.35%) under: within 3%, not
/// itemised (no trace under TP yet).
#[test]
fn tp_under_fsdp_with_full_checkpointing_matches_torch_within_3_percent() {
    for (line, c, measured) in measured_cases("tp_fsdp_ac_torch_2.11.jsonl") {
        let plan = plan(&format!(
            r#"{{"model":{},"gpu":"cpu","num_gpus":4,
                "parallel":{{"tp":2,"sp":true,"dp_shard":2}},
                "batch":{{"micro_batch_size":{},"seq_len":{}}},
                "precision":{{"param":"fp32","master":"fp32","reduce":"fp32"}},
                "activation_checkpointing":{},
                "implementation":{{"loss_parallel":true,"fsdp_units":"root-resharded-keep-last"}}}}"#,
            c["model"], c["batch"], c["seq"], c["ac"],
        ));
        let layers = c["model"].as_str().map(common::layers).unwrap();
        let torch = *measured.iter().min().unwrap() - (4 * (9 * layers + 3) + 1);
        let pred = estimate(&plan).unwrap().per_gpu.peak_allocated_bytes.get();
        let err = (pred as f64 - torch as f64) / torch as f64;
        assert!(
            err.abs() < 0.03,
            "{line}: {pred} vs {torch} ({:+.2}%)",
            100.0 * err
        );
    }
}

#[test]
fn tensor_parallel_plans_match_torch_2_11_dtensor_measured_on_cpu() {
    let mut held = 0;
    for (line, c, measured) in measured_cases("tp_torch_2.11.jsonl") {
        let (tp, dp) = (c["tp"].as_u64().unwrap(), c["dp_shard"].as_u64().unwrap());
        // Small TP x FSDP peaks at a prefetch's all-gather with Gloo's flat buffer of the whole
        // output (which NCCL does not make): held instead in tests/tensor_parallel.rs against
        // the trainer run without Gloo's temporaries (the trainer equals torch with them).
        if dp > 1 && c["model"] == "small" {
            continue;
        }
        let plan = plan(&format!(
            r#"{{"model":{},"gpu":"cpu","num_gpus":{},
                "parallel":{{"tp":{tp},"sp":{},"dp_shard":{dp}}},
                "batch":{{"micro_batch_size":{},"seq_len":{}}},
                "precision":{{"param":"fp32","master":"fp32","reduce":"fp32"}},
                "activation_checkpointing":{},
                "implementation":{{"loss_parallel":{}{}}}}}"#,
            c["model"],
            tp * dp,
            c["sp"],
            c["batch"],
            c["seq"],
            c["ac"],
            c["loss_parallel"],
            // tp_reference.py passes the root `reshard_after_forward=True`, as torchtitan
            // does, which torch 2.11 honours.
            if dp > 1 {
                r#","fsdp_units":"root-resharded-keep-last""#
            } else {
                ""
            }
        ));
        // Under FSDP one rank of the tiny record read a TP collective's Gloo buffer high (a
        // late free on a Gloo thread; tests/tensor_parallel.rs): the lowest rank is the step.
        let measured = if dp > 1 {
            *measured.iter().min().unwrap()
        } else {
            *measured.iter().max().unwrap()
        };
        let pred = estimate(&plan).unwrap().per_gpu.peak_allocated_bytes.get();
        // What torch's record holds that a GPU rank would not (tests/tensor_parallel.rs):
        // torch.optim's CPU `step` scalars, 4 B per parameter tensor (9 per block, 3 in the
        // root), and c10d's 1-byte barrier tensor. Beyond them the estimate lacks only 0-dim
        // scalars the reference keeps bound (its previous step's loss): at most 16 B.
        let layers = c["model"].as_str().map(common::layers).unwrap();
        let torch_only = 4 * (9 * layers + 3) + 1;
        let gap = (measured - torch_only)
            .checked_sub(pred)
            .unwrap_or_else(|| panic!("{line}: {pred} above torch's {measured}"));
        assert!(
            gap <= 16,
            "{line}: {pred} vs {measured} ({gap} B unexplained)"
        );
        held += 1;
    }
    assert_eq!(held, 9);
}

/// Interleaved 1F1B, torch 2.11's `ScheduleInterleaved1F1B` with 2 or 4 stages per rank
/// (src/trainer/pipelining_reference.py with "v"; tests/data/pipelining_interleaved_torch_2.11
/// .jsonl: 14 plans, 38 rank peaks, the tiny shape with 8 layers (tiny-deep) so that every
/// rank has two chunks or more; pp 2 and 4, dp_shard 1 and 2, 2 to 8 micro-batches, AC none
/// and full). Before the estimator walked torch's op order (`interleaved_peak`: sends are
/// waited only at the step's end, so every stage output and sent input gradient stays;
/// warm-up in rounds of `m / max(1, m / pp)` micro-batches; one rotary table per model part;
/// the root's gradients on the chunk that holds it) it erred by -9.9% to +11.3% per rank.
/// A backward walks one chunk's blocks, not the rank's (that was up to +1.8% on ranks whose
/// warm-up holds every forward), and the first block it walks gets its incoming gradient in
/// the receive buffer (one stage activation too many before), and the loss input a pipeline
/// caches until the micro-batch's backward is held only while the last chunk's backward runs
/// (one logits tensor too many, +2.1%, on a full-AC last rank whose peak is another chunk's).
/// Now all 38 are exact but for the AdamW step scalars (under 200 B).
#[test]
fn interleaved_pipelines_match_torch_2_11_on_every_rank() {
    let (mut ranks, mut exact) = (0, 0);
    for (line, c, measured) in measured_cases("pipelining_interleaved_torch_2.11.jsonl") {
        let plan = pipeline_plan(&c, r#"{"param":"fp32","master":"fp32","reduce":"fp32"}"#);
        assert_eq!(measured.len() as u64, plan.parallel.pp);
        for (s, &m) in measured.iter().enumerate() {
            let e = memplan::estimate::estimate_stage(&plan, s as u64).unwrap();
            let pred = e.per_gpu.peak_allocated_bytes.get();
            assert!(
                within(pred as f64, m as f64, 0.03),
                "{line}: stage {s}: {pred} vs {m}"
            );
            exact += usize::from(pred.abs_diff(m) < 200);
            ranks += 1;
        }
    }
    assert_eq!((ranks, exact), (38, 38));
}

/// The same reference in bf16 (tests/data/pipelining_torch_2.11_bf16.jsonl, 8 plans): without
/// FSDP the stage computes and keeps everything in bf16; with FSDP a MixedPrecisionPolicy(bf16,
/// reduce fp32), whose unsharded gradients accumulate across micro-batches in fp32 (the
/// estimator was -14% on such a stage before it modelled that). Every plan's most loaded stage
/// is within the project's 3%; bf16's other stages are not yet itemised (worst -5.2%, full AC
/// under FSDP).
#[test]
fn bf16_pipelines_match_torch_2_11_on_their_most_loaded_stage() {
    let mut n = 0;
    for (line, c, measured) in measured_cases("pipelining_torch_2.11_bf16.jsonl") {
        let precision = if c["dp_shard"] == 1 {
            r#"{"param":"bf16","master":"bf16","reduce":"bf16"}"#
        } else {
            r#"{"param":"bf16","master":"fp32","reduce":"fp32"}"#
        };
        let e = estimate(&pipeline_plan(&c, precision)).unwrap();
        let most = e.per_gpu.stage as usize;
        assert_eq!(
            most,
            (0..measured.len()).max_by_key(|&i| measured[i]).unwrap(),
            "{line}"
        );
        let pred = e.per_gpu.peak_allocated_bytes.get() as f64;
        assert!(
            within(pred, measured[most] as f64, 0.03),
            "{line}: {pred} vs {}",
            measured[most]
        );
        n += 1;
    }
    assert_eq!(n, 8);
}

/// Hugging Face Transformers 5.24.0 (with peft 0.21.2) training steps on torch 2.11, CPU,
/// counted by the shim's allocator (src/trainer/hf_reference.py, both its hand-written copy of
/// `Trainer`'s inner loop and the real `Trainer`): tests/data/hf_transformers_torch_2.11.jsonl.
/// With the `hf-transformers` preset every full fine-tune (fp32 and bf16-loaded, Llama and
/// Qwen2, MHA and GQA, with and without gradient checkpointing) and every LoRA plan (rank 8
/// and 16, attention and all-linear targets, dropout 0 and 0.05, fp32 and bf16 base, with and
/// without checkpointing) is within 0.41%: 27 configurations. The remainders are CPU-only
/// (checkpointing's saved CPU RNG state, 5,056 B per block) or a few scalars. Trainer's
/// `bf16=True` (autocast over fp32 weights) is held by the autocast test below.
#[test]
fn transformers_and_peft_steps_match_measured_on_cpu() {
    let mut n = 0;
    for r in records("hf_transformers_torch_2.11.jsonl") {
        if r["amp"] != "none" || r["attn_mask"] == true || r["use_cache"] == true {
            continue;
        }
        let model = match (r["arch"].as_str().unwrap(), r["profile"].as_str().unwrap()) {
            ("llama", p) => format!("{p:?}"),
            ("qwen2", "tiny") => "\"tests/data/hf/qwen2-tiny.json\"".to_string(),
            ("qwen2", _) => "\"tests/data/hf/qwen2-tiny-gqa.json\"".to_string(),
            other => panic!("{other:?}"),
        };
        let dt = r["dtype"].as_str().unwrap();
        let (master, lora_section) = if r["lora"].is_null() {
            (dt, String::new())
        } else {
            ("fp32", format!(",{}", lora_member(&r["lora"], "")))
        };
        let plan = plan(&format!(
            r#"{{"model":{model},"gpu":"cpu","num_gpus":1,"preset":"hf-transformers",
                "batch":{{"micro_batch_size":{},"seq_len":{}}},
                "precision":{{"param":"{dt}","master":"{master}","reduce":"{dt}"}},
                "activation_checkpointing":"{}"{lora_section}}}"#,
            r["batch"],
            r["seq"],
            if r["gc"] == true { "full" } else { "none" },
        ));
        let measured = r["steady_peak"].as_u64().unwrap() as f64;
        let pred = estimate(&plan).unwrap().per_gpu.peak_allocated_bytes.get() as f64;
        assert!(
            within(pred, measured, 0.005),
            "{}: {pred} vs {measured}",
            r["id"]
        );
        n += 1;
    }
    assert_eq!(n, 27);
}

/// torch 2.11's own context parallelism (`context_parallel` with ring attention and the
/// head-tail load balancer, as torchtitan's Dec 2024 train step applies it; FSDP2 over
/// dp_shard x cp), per rank on CPU/Gloo: src/trainer/cp_reference.py, with the CPU flash op
/// routed through torch's own ring templates (CP's handlers cover only the CUDA ops; the
/// script's docstring says why and how). tests/data/cp_torch_2.11.jsonl: 10 plans, rank 0
/// the most loaded. Before the estimator modelled what ring attention holds (its backward's
/// fp32 accumulators, the all-gathered K and V, the rotated dK/dV; no ring buffers outside
/// attention), wo's copy of the merged output, and `context_parallel`'s whole-size buffers
/// and frame, it erred by -8.3% (cp 4) to +0.9%, and +2.0% on the all-to-all rotation's plan
/// (then not a plan option); all ten are now within 729 B.
#[test]
fn context_parallel_plans_match_torch_2_11_measured_on_cpu() {
    let mut n = 0;
    for (line, c, measured) in measured_cases("cp_torch_2.11.jsonl") {
        let (cp, dp) = (c["cp"].as_u64().unwrap(), c["dp_shard"].as_u64().unwrap());
        let plan = plan(&format!(
            r#"{{"model":{},"gpu":"cpu","num_gpus":{},
                "parallel":{{"cp":{cp},"dp_shard":{dp},"cp_rotate":{}}},
                "batch":{{"micro_batch_size":{},"seq_len":{}}},
                "precision":{{"param":"fp32","master":"fp32","reduce":"fp32"}},
                "implementation":{{"logits":"float-output"}},
                "activation_checkpointing":{}}}"#,
            c["model"],
            cp * dp,
            c["rotate"],
            c["batch"],
            c["seq"],
            c["ac"]
        ));
        let measured = *measured.iter().max().unwrap();
        let pred = estimate(&plan).unwrap().per_gpu.peak_allocated_bytes.get();
        assert!(
            pred.abs_diff(measured) < 1000,
            "{line}: {pred} vs {measured}"
        );
        n += 1;
    }
    assert_eq!(n, 10);
}

/// torchtitan 0.2.2's own MoE (`MoE`, `TokenChoiceTopKRouter`, grouped-mm experts) and
/// expert parallelism (`apply_moe_ep_tp`, llama4 `apply_fsdp`), run on CPU/Gloo with five
/// small CUDA-assumption patches: src/trainer/ep_reference.py, tests/data/ep_torch_2.11.jsonl
/// (12 plans on tiny-moe, fp32). Before the estimator followed torchtitan 0.2.2 (dropless
/// routing, no capacity; bf16 grouped matmuls saving two input casts, the bf16 weights and four
/// f-wide tensors per row; 8 padding rows per local expert; the router's and reorder's int64
/// and fp32 tensors; a w2-sized MoE backward, and under checkpointing the recompute's peak at
/// the combine) it was +6.5% to +18.8% at EP 1. Now the six EP 1 plans are within 0.03%.
/// EP 2 (both data-parallel ranks taken by EP, so the experts' FSDP mesh has one rank) was
/// +4% to +8%; with torchtitan 0.2.2's units (`fsdp_units: split`) and the experts' one-rank
/// unit (no all-gather when prefetched, no reduce-scatter input) it is -2.6% to +0.3% against
/// the most loaded rank, at a balanced router's rows. Not modelled, itemised in
/// docs/research/ep2-itemised.md: the combine's transients in forward, where the no-AC plans
/// peak (the estimate's figure is its backward's), and each layer's own routed rows.
#[test]
fn expert_parallel_moe_plans_match_torchtitan_0_2_2_measured_on_cpu() {
    let mut n = 0;
    for (line, c, measured) in measured_cases("ep_torch_2.11.jsonl") {
        let ep = c["ep"].as_u64().unwrap();
        let plan = plan(&format!(
            r#"{{"model":"tiny-moe","gpu":"cpu","num_gpus":{ep},
                "parallel":{{"dp_shard":{ep},"ep":{ep}}},
                "batch":{{"micro_batch_size":{},"seq_len":{}}},
                "precision":{{"param":"fp32","master":"fp32","reduce":"fp32"}},
                "implementation":{{"logits":"float-output","fsdp_units":"{}"}},
                "activation_checkpointing":{}}}"#,
            c["batch"],
            c["seq"],
            if ep == 1 { "root-keep-last" } else { "split" },
            c["ac"]
        ));
        let measured = *measured.iter().max().unwrap() as f64;
        let pred = estimate(&plan).unwrap().per_gpu.peak_allocated_bytes.get() as f64;
        let tol = if ep == 1 { 0.0005 } else { 0.03 };
        assert!(within(pred, measured, tol), "{line}: {pred} vs {measured}");
        n += 1;
    }
    assert_eq!(n, 12);
}

/// QLoRA as Transformers 5.24, peft 0.21.2 and bitsandbytes 0.50.2 run it on CPU (the base's
/// decoder linears in 4-bit NF4, with and without double quantisation, the rest cast to fp32
/// by `prepare_model_for_kbit_training` or left in bf16 without it): src/trainer/
/// hf_reference.py, tests/data/qlora_torch_2.11.jsonl. With fused AdamW and non-reentrant
/// checkpointing every configuration is within 0.27% (13 on the tiny and small shapes): the
/// base's bytes are bitsandbytes' layout (`BaseQuant::linear_bytes`) and the activations are
/// LoRA's at the compute dtype. Not held here (not modelled): 8-bit and paged optimizers,
/// reentrant checkpointing (peft's default without kwargs), Trainer's `bf16=True` autocast,
/// and a layer so wide for its tokens that its dequantised weight is the peak.
#[test]
fn qlora_steps_match_bitsandbytes_measured_on_cpu() {
    let mut n = 0;
    for r in records("qlora_torch_2.11.jsonl") {
        let q = &r["qlora"];
        if q.is_null()
            || r["optim"] != "adamw_torch_fused"
            || r["amp"] != "none"
            || r["gc"] == "reentrant"
            || r["profile"] == "wide"
        {
            continue;
        }
        let prepared = q["prepare"] != false;
        let dt = if prepared || q["load_dtype"] == "fp32" {
            "fp32"
        } else {
            "bf16"
        };
        let quant = if q["dq"] == true { "nf4-dq" } else { "nf4" };
        let plan = plan(&format!(
            r#"{{"model":{},"gpu":"cpu","num_gpus":1,"preset":"hf-transformers",
                "batch":{{"micro_batch_size":{},"seq_len":{}}},
                "precision":{{"param":"{dt}","master":"fp32","reduce":"{dt}"}},
                "activation_checkpointing":"{}",{}}}"#,
            r["profile"],
            r["batch"],
            r["seq"],
            if r["gc"] == true { "full" } else { "none" },
            lora_member(&r["lora"], &format!(r#","quant":"{quant}""#)),
        ));
        let measured = r["steady_peak"].as_u64().unwrap() as f64;
        let pred = estimate(&plan).unwrap().per_gpu.peak_allocated_bytes.get() as f64;
        assert!(
            within(pred, measured, 0.003),
            "{}: {pred} vs {measured}",
            r["id"]
        );
        n += 1;
    }
    assert_eq!(n, 13);
}

/// Mixed precision by `torch.autocast` over fp32 weights (`precision.autocast`): Transformers'
/// `Trainer(bf16=True)` (tests/data/hf_transformers_torch_2.11.jsonl, the manual loop and the
/// real Trainer) and torchtitan 0.2.2 on one device (tests/data/torchtitan_0.2.2_torch_2.11
/// .jsonl, whose CPU RMSNorm decomposes, so eager). Before, the estimator could only express
/// FSDP's cast copies: -7.1% on Transformers, +7.6% on torchtitan. Without checkpointing both
/// are now exact but for scalars (torchtitan's rotary table covers seq positions, not 2 x seq:
/// 4,096 B here, itemised in docs/research/torchtitan-0.2.2-measured.md); with gradient
/// checkpointing +0.71% (the recomputed block's weight casts counted as FSDP's prefetch pair).
#[test]
fn autocast_steps_match_transformers_and_torchtitan_measured_on_cpu() {
    let at = |json: &str| {
        estimate(&plan(json))
            .unwrap()
            .per_gpu
            .peak_allocated_bytes
            .get() as f64
    };
    let mut n = 0;
    for r in records("hf_transformers_torch_2.11.jsonl") {
        if r["amp"] != "bf16" || r["use_cache"] == true || !r["lora"].is_null() {
            continue;
        }
        let gc = r["gc"] == true;
        let pred = at(&format!(
            r#"{{"model":"tiny","gpu":"cpu","num_gpus":1,"preset":"hf-transformers",
                "batch":{{"micro_batch_size":{},"seq_len":{}}},
                "precision":{{"param":"bf16","master":"fp32","reduce":"fp32","autocast":true}},
                "activation_checkpointing":"{}"}}"#,
            r["batch"],
            r["seq"],
            if gc { "full" } else { "none" }
        ));
        let measured = r["steady_peak"].as_u64().unwrap() as f64;
        let tol = if gc { 0.01 } else { 0.0002 };
        assert!(
            within(pred, measured, tol),
            "{}: {pred} vs {measured}",
            r["id"]
        );
        n += 1;
    }
    assert_eq!(n, 3);
    // torchtitan 0.2.2 on one device: autocast to bf16 by default.
    let a1 = records("torchtitan_0.2.2_torch_2.11.jsonl")
        .into_iter()
        .find(|r| r["name"] == "A1-amp")
        .unwrap();
    let pred = at(r#"{"model":"tiny","gpu":"cpu","num_gpus":1,
        "batch":{"micro_batch_size":2,"seq_len":64},
        "precision":{"param":"bf16","master":"fp32","reduce":"fp32","autocast":true},
        "implementation":{"rmsnorm":"eager","gqa":"native","logits":"float-in-loss"}}"#);
    let measured = a1["measured"][0].as_u64().unwrap() as f64;
    assert_eq!(
        pred - measured,
        4096.0 - 97.0,
        "the rotary table's extra seq positions, less the step scalars"
    );
}

/// The measured peak a torchtitan 0.2.2 record holds: rank 0 without Gloo's collective
/// temporaries where the reference separated them (NCCL allocates none), else the highest
/// rank.
fn torchtitan_0_2_measured(r: &serde_json::Value) -> u64 {
    r["measured_gloo_free_rank0"].as_u64().unwrap_or_else(|| {
        r["measured"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .max()
            .unwrap()
    })
}

/// The `torchtitan-0.2` preset against torchtitan 0.2.2's own Llama3 step (its model,
/// `parallelize_llama`, loss, optimizers and AMP on torch 2.11, 1 and 2 ranks on CPU/Gloo:
/// src/trainer/torchtitan_reference.py, tests/data/torchtitan_0.2.2_torch_2.11.jsonl; 19
/// configurations: fp32, bf16 FSDP mixed precision, `training.dtype = "bfloat16"`, one-device
/// autocast; AC none, full, op and every 2nd layer; reshard default, always and never; foreach
/// and fused AdamW; MHA and GQA). The CPU runs `nn.RMSNorm` as a composite (`rmsnorm:
/// composite`; a GPU runs the fused kernel the preset names). With the December 2024 model they
/// erred by -3.3% to +11.9%; what changed is the FSDP units (embedding and [norm, output] of
/// their own, the last block resharded), the rotary table's length, native GQA, fused AdamW,
/// and selective-op checkpointing's cache popping the outputs backward does not save. 18 are
/// exact but for the AdamW step scalars (CPU tensors here, host memory on a GPU: under 200 B);
/// on one, op SAC without FSDP, the CPU's attention op is not on torchtitan's save list (its
/// output and log-sum-exp are recomputed: +34,816 B, +1.22%), which a GPU's flash op is.
#[test]
fn torchtitan_0_2_preset_matches_torchtitan_0_2_2_measured_on_cpu() {
    let dtype = |s: &serde_json::Value| match s.as_str().unwrap() {
        "float32" => "fp32",
        "bfloat16" => "bf16",
        other => panic!("{other}"),
    };
    let mut n = 0;
    for r in records("torchtitan_0.2.2_torch_2.11.jsonl") {
        let k = &r["knobs"];
        let model = if r["model"]["dim"] == 64 {
            "\"tiny\""
        } else {
            "\"tests/data/hf/torchtitan-b.json\""
        };
        let precision = if k["fsdp"] == true {
            format!(
                r#"{{"param":"{}","master":"{}","reduce":"{}"}}"#,
                dtype(&k["mixed_precision_param"]),
                dtype(&k["training_dtype"]),
                dtype(&k["mixed_precision_reduce"])
            )
        } else if k["amp"].as_str().unwrap().contains("bfloat16") {
            r#"{"param":"bf16","master":"fp32","reduce":"fp32","autocast":true}"#.to_string()
        } else {
            let d = dtype(&k["training_dtype"]);
            format!(r#"{{"param":"{d}","master":"{d}","reduce":"{d}"}}"#)
        };
        let ac = match k["ac"].as_str().unwrap() {
            "op" => "selective-op",
            "2" => "selective-layer:2",
            other => other,
        };
        let (units, reshard) = match k["fsdp_reshard_after_forward"].as_str().unwrap() {
            "always" => ("split-always", true),
            "never" => ("split", false),
            _ => ("split", true),
        };
        let plan = plan(&format!(
            r#"{{"model":{model},"gpu":"cpu","num_gpus":{},"preset":"torchtitan-0.2",
                "batch":{{"micro_batch_size":{},"seq_len":{}}},"precision":{precision},
                "activation_checkpointing":"{ac}","reshard_after_forward":{reshard},
                "implementation":{{"rmsnorm":"composite","optimizer":{},"fsdp_units":"{units}"}}}}"#,
            r["world"], r["batch"], r["seq"], k["implementation"]
        ));
        let measured = torchtitan_0_2_measured(&r) as i64;
        let pred = estimate(&plan).unwrap().per_gpu.peak_allocated_bytes.get() as i64;
        let name = r["name"].as_str().unwrap();
        if name == "A1-fp32-op" {
            assert_eq!(pred - measured, 34_816 - 97, "{name}");
        } else {
            assert!(
                (-200..=0).contains(&(pred - measured)),
                "{name}: {pred} vs {measured}"
            );
        }
        n += 1;
    }
    assert_eq!(n, 19);
}

/// The `torchtitan-0.3` preset against torchtitan 0.3.0's own Llama3 step on torch 2.15 (its
/// model with fused wqkv and a RoPE cache per layer, `parallelize_llama` with `fully_shard` at
/// every world size, the chunked loss, `OptimizersContainer` and `Trainer.train_step` itself, 1
/// and 2 ranks on CPU/Gloo: src/trainer/torchtitan03_reference.py,
/// tests/data/torchtitan_0.3.0_torch_2.15.jsonl, 21 plans: fp32, bf16 FSDP mixed precision,
/// `training.dtype = "bfloat16"`; AC none, full and selective (op); reshard default, always and
/// never; fused, foreach and for-loop AdamW; 8 and 4 loss chunks; batch 2 and 1; gradients kept
/// (the default) and freed (`disable_cuda_graphs`); MHA and GQA). On CPU the attention kernel
/// is torch's flash kernel and RMSNorm allocates what CUDA's fused kernel does (the reference's
/// patches), and each phase is the peak without op-internal scratch (oneDNN's bf16 GEMM
/// workspaces, itemised per record as C1), the lowest of three steady steps. With the
/// `torchtitan-0.2` preset the same plans erred by -15.6% to -0.2% (the records' `memplan`
/// field; docs/research/torchtitan-0.3.0-measured.md).
///
/// Every phase (forward, the chunk loop, the backward, the optimizer step) is checked within
/// 3%, and itemised: with the scalars memplan leaves out (one 4-B step counter per parameter
/// tensor and the 0-dim loss and token-count tensors alive at that moment, counted from the
/// allocator's events) added, each is exact but for 8 to 12 bytes per rank that the reference
/// does not name, except for-loop AdamW's step: the previous parameter's `denom` is still bound
/// while the next one's `sqrt` and quotient are made (the embedding's fp32 denom beside wqkv's
/// two: 32,768 B beyond memplan's two temporaries of the largest parameter).
#[test]
fn torchtitan_0_3_preset_matches_torchtitan_0_3_0_measured_on_cpu() {
    let mut n = 0;
    for r in records("torchtitan_0.3.0_torch_2.15.jsonl") {
        let name = r["name"].as_str().unwrap();
        let spec = &r["memplan"]["torchtitan-0.3"]["plan"];
        let e = estimate(&plan(&spec.to_string())).unwrap();
        let steady = |phase: Phase| {
            e.per_gpu
                .timeline
                .iter()
                .find(|t| !t.first_step && t.phase == phase)
                .unwrap()
                .allocated_bytes
                .get() as i64
        };
        let phases = [
            ("fwd", steady(Phase::Forward)),
            ("loss", steady(Phase::LossBackward)),
            (
                "bwd",
                steady(Phase::Backward).max(steady(Phase::BackwardEnd)),
            ),
            ("opt", steady(Phase::Optimizer)),
        ];
        for (phase, pred) in phases {
            let measured = r["measured"][phase].as_i64().unwrap();
            let scalars = r["scalars"][phase].as_i64().unwrap();
            assert!(
                within(pred as f64, measured as f64, 0.03),
                "{name} {phase}: {pred} vs {measured}"
            );
            let residual = measured - scalars - pred;
            if (name, phase) == ("A1-bf16-forloop", "opt") {
                assert!((32_768..=32_784).contains(&residual), "{name}: {residual}");
            } else {
                assert!((0..=16).contains(&residual), "{name} {phase}: {residual}");
            }
        }
        let peak = r["measured_peak"].as_i64().unwrap();
        let pred = e.per_gpu.peak_allocated_bytes.get() as i64;
        assert!(
            within(pred as f64, peak as f64, 0.03),
            "{name}: {pred} vs {peak}"
        );
        n += 1;
    }
    assert_eq!(n, 21);
}

/// The `plain-pytorch` preset against a training loop written as PyTorch's tutorials write it
/// (src/trainer/plain_reference.py: `nn.RMSNorm`, SDPA with `enable_gqa`, `F.cross_entropy(
/// logits.float())` with the loop's names living on, foreach AdamW, `checkpoint` per block,
/// `fully_shard` on every block and the model with their defaults; 1 rank fp32 and autocast, 2
/// FSDP2 ranks fp32 and bf16 mixed precision, with and without resharding, MHA and GQA, tiny
/// and small; tests/data/plain_torch_2.11.jsonl, 16 plans). With the December 2024 torchtitan
/// model it erred by -1.2% to -5.9%: the loop keeps the logits bound through backward, the
/// optimizer step and the next forward; the rotary table covers `seq_len`; every block is
/// resharded after forward. What is left is CPU-only and itemised by the reference from the
/// allocator's own events: checkpoint's saved CPU RNG state (5,056 B per checkpointed block,
/// host memory on a GPU), AdamW's step scalars, and the composite norm's fp32 weight-gradient
/// partial; past those, every plan is within 200 B.
#[test]
fn plain_pytorch_preset_matches_a_tutorial_loop_measured_on_cpu() {
    let mut n = 0;
    for r in records("plain_torch_2.11.jsonl") {
        let k = &r["knobs"];
        let precision = if k["amp"] == "bf16" {
            r#"{"param":"bf16","master":"fp32","reduce":"fp32","autocast":true}"#
        } else if k["mp"] == "bf16" {
            r#"{"param":"bf16","master":"fp32","reduce":"fp32"}"#
        } else {
            r#"{"param":"fp32","master":"fp32","reduce":"fp32"}"#
        };
        let plan = plan(&format!(
            r#"{{"model":{},"gpu":"cpu","num_gpus":{},"preset":"plain-pytorch",
                "batch":{{"micro_batch_size":{},"seq_len":{}}},"precision":{precision},
                "activation_checkpointing":{},"reshard_after_forward":{},
                "implementation":{{"rmsnorm":"composite"}}}}"#,
            r["model"]["profile"],
            r["world"],
            r["batch"],
            r["seq"],
            k["ac"],
            k["reshard_after_forward"] != false
        ));
        let cpu_only: i64 = r["deltas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| ["C1", "C2", "C4"].contains(&d["id"].as_str().unwrap()))
            .map(|d| d["bytes"].as_i64().unwrap())
            .sum();
        let measured = r["measured"].as_i64().unwrap();
        let pred = estimate(&plan).unwrap().per_gpu.peak_allocated_bytes.get() as i64;
        let residual = measured - cpu_only - pred;
        assert!(
            (0..200).contains(&residual),
            "{}: {pred} + {cpu_only} vs {measured}",
            r["name"]
        );
        n += 1;
    }
    assert_eq!(n, 16);
}

/// The `hf-transformers` preset under accelerate's FSDP2 (Transformers 5.24, accelerate 1.15,
/// 2 ranks on CPU/Gloo; src/trainer/accel_reference.py, tests/data/accelerate_fsdp2_torch_2.11
/// .jsonl, 15 plans: no and bf16 mixed precision, fp32 and bf16 loaded, checkpointing on and
/// off, resharding on and off, MHA and GQA, 2 and 4 layers). accelerate's `fsdp2_prepare_model`
/// makes the embedding, each decoder layer and [norm, lm_head] units and keeps only the last
/// gathered (`fsdp_units: split`), and its bf16 policy reduces in bf16. Against the December
/// 2024 torchtitan layout the estimate erred by up to +8.0%; with the split units every plan is
/// within 20 B once the reference's itemised scalars are added: AdamW's step counters (4 B per
/// parameter tensor, host memory on a GPU), the rotary `inv_freq` buffers and FSDP's scalars,
/// 4 (9L + 3) + 4 head_dim + 8L + 17, and under checkpointing the `position_ids` the
/// checkpointed layers keep (8 seq).
#[test]
fn hf_transformers_preset_matches_accelerate_fsdp2_measured_on_cpu() {
    let mut n = 0;
    for r in records("accelerate_fsdp2_torch_2.11.jsonl") {
        let p = &r["memplan"]["plan"];
        let layers = r["model"]["L"].as_u64().unwrap();
        let model = match (r["model"]["profile"].as_str().unwrap(), layers) {
            ("tiny", 4) => "\"tests/data/hf/llama-tiny-l4.json\"".to_string(),
            (name, _) => format!("{name:?}"),
        };
        let plan = plan(&format!(
            r#"{{"model":{model},"gpu":"cpu","num_gpus":2,"preset":"hf-transformers",
                "batch":{},"precision":{},"activation_checkpointing":{},
                "reshard_after_forward":{}}}"#,
            p["batch"], p["precision"], p["activation_checkpointing"], p["reshard_after_forward"]
        ));
        let hd = r["model"]["hd"].as_u64().unwrap();
        let seq = p["batch"]["seq_len"].as_u64().unwrap();
        let scalars = 4 * (9 * layers + 3) + 4 * hd + 8 * layers + 17;
        let position_ids = if p["activation_checkpointing"] == "full" {
            8 * seq
        } else {
            0
        };
        let measured = r["measured"].as_i64().unwrap();
        let pred = estimate(&plan).unwrap().per_gpu.peak_allocated_bytes.get();
        let residual = measured - (pred + scalars + position_ids) as i64;
        assert!(
            (0..=20).contains(&residual),
            "{}: {pred} vs {measured}",
            r["name"]
        );
        n += 1;
    }
    assert_eq!(n, 15);
}

/// peft LoRA under accelerate's FSDP2 (peft 0.21.2, accelerate 1.15, Transformers 5.24, torch
/// 2.11, 2 ranks on CPU/Gloo, counted by the shim's allocator with Gloo's own temporaries set
/// aside: src/trainer/lora_fsdp_reference.py, tests/data/lora_fsdp2_torch_2.11.jsonl, 11 plans:
/// rank 8 on q/k/v/o and 16 on all linears, dropout 0 and 0.05, mixed precision none and bf16,
/// checkpointing off and on), against the lower rank's peak. Before LoRA was modelled under
/// FSDP (it was refused; its one-GPU figure was -12.7% to +32.3% off) it missed what FSDP does
/// with a frozen base: the base is sharded in the load dtype and gathered in the compute dtype
/// with the adapters in each block's unit (the adapters then compute in it), only adapters are
/// reduce-scattered, the embedding and output units reduce nothing, and peft leaves the final
/// norm in the root. Now every plan is within 2.5%:
///
/// | plan | measured | estimate |
/// |---|---:|---:|
/// | r8 qkvo d0.05 / d0, fp32 | 2,430,589 / 2,070,141 | -0.01% / -0.01% |
/// | r16 all d0.05 / d0, fp32 | 3,398,877 / 2,627,285 | +1.87% / +0.30% |
/// | r8 qkvo d0.05 / d0, bf16 | 1,516,535 / 1,369,079 | -0.02% / -2.41% |
/// | r16 all d0 / d0.05, bf16 | 1,687,639 / 2,058,825 | -0.02% / -0.14% |
/// | r8 qkvo d0.05, fp32 / bf16, checkpointing | 1,846,909 / 1,133,559 | -0.04% / -0.07% |
/// | r16 all d0, bf16, checkpointing | 1,319,039 | -0.49% |
///
/// Not modelled: the r16 all-linear fp32 plan peaks in forward, inside the last block's
/// wrapped down projection (its base and adapter outputs and their scaled sum beside every
/// saved tensor), where the estimate is 7.5% low; its backward, 1.9% high, decides. The d0
/// bf16 plan's output unit keeps its all-gather buffer through the loss's backward on one
/// run in two (Gloo timing: 32,768 B).
#[test]
fn lora_under_fsdp2_matches_peft_and_accelerate_measured_on_cpu() {
    let mut n = 0;
    for r in records("lora_fsdp2_torch_2.11.jsonl") {
        let c = &r["cfg"];
        let precision = match c["mp"].as_str().unwrap() {
            "no" => r#"{"param":"fp32","master":"fp32","reduce":"fp32"}"#,
            _ => r#"{"param":"bf16","master":"fp32","reduce":"bf16"}"#,
        };
        let plan = plan(&format!(
            r#"{{"model":{},"gpu":"cpu","num_gpus":{},"preset":"hf-transformers",
                "batch":{{"micro_batch_size":{},"seq_len":{}}},"precision":{precision},
                "activation_checkpointing":"{}","reshard_after_forward":{},{}}}"#,
            c["profile"],
            r["world"],
            c["batch"],
            c["seq"],
            if c["ac"] == true { "full" } else { "none" },
            c["reshard"],
            lora_member(&c["lora"], "")
        ));
        let measured = r["measured"].as_u64().unwrap() as f64;
        let pred = estimate(&plan).unwrap().per_gpu.peak_allocated_bytes.get() as f64;
        assert!(
            within(pred, measured, 0.025),
            "{}: {pred} vs {measured}",
            r["id"]
        );
        n += 1;
    }
    assert_eq!(n, 11);
}

/// AdamW with bf16 states: torchtitan 0.3.0's `optimizer.implementation =
/// "fused_opt_states_bf16"` (its own OptimizersContainer and step pre-hook on torch 2.11,
/// src/trainer/bf16_states_probe.py, tests/data/bf16_states_torchtitan_0.3.jsonl), against its
/// plain `fused`, on tiny and small. The states are counted by the shim as the hook makes them;
/// CPU's fused AdamW then refuses the mixed dtypes (the mixed-precision kernel is CUDA's), so the
/// step itself is not measured here (fused: no temporaries). Both are exact less the fused
/// group's device `step` scalars, 4 B per parameter tensor, which the estimator leaves out.
#[test]
fn bf16_adamw_states_match_torchtitan_0_3_measured_on_cpu() {
    let mut n = 0;
    for r in records("bf16_states_torchtitan_0.3.jsonl") {
        let implementation = match r["implementation"].as_str().unwrap() {
            "fused_opt_states_bf16" => "fused-bf16-states",
            other => other,
        };
        let e = est(&format!(
            r#"{{"model":{},"gpu":"cpu","num_gpus":1,
                "precision":{{"param":"fp32","master":"fp32","reduce":"fp32"}},
                "batch":{{"micro_batch_size":1,"seq_len":16}},
                "implementation":{{"optimizer":"{implementation}"}}}}"#,
            r["model"]
        ));
        let states = e.per_gpu.breakdown.optimizer_states_bytes.get();
        let scalars = 4 * r["param_tensors"].as_u64().unwrap();
        assert_eq!(states + scalars, r["states"].as_u64().unwrap(), "{r}");
        n += 1;
    }
    assert_eq!(n, 4);
}

/// bitsandbytes' 8-bit AdamW (and its paged variant) and torch's Adafactor, as Transformers'
/// `Trainer` runs them (full fine-tunes, LoRA and QLoRA on CPU: tests/data/qlora_torch_2.11
/// .jsonl, 20 configurations). The optimizer's states, read from its `state` dicts after a
/// step, are counted exactly: 8-bit states with a blockwise fp32 absmax for tensors of 4,096
/// elements or more, 32-bit ones for smaller tensors and the embedding (Trainer's override),
/// the two quantisation maps; Adafactor's row and column factors, a full variance for 1-D
/// tensors (its `step` scalars are CPU tensors, host memory on a GPU). Where the measured peak
/// is outside the optimizer step it is held at 0.1% for full fine-tunes, at the LoRA and
/// QLoRA tests' 0.3%, and at 3% with gradient checkpointing at seq 128 (the LoRA recompute's
/// own residual, +1.0% to +2.8%); inside it, bitsandbytes' CPU fallback makes 20
/// bytes per element of the largest 8-bit tensor and Adafactor's single-tensor loop on the
/// CPU copies for its column norms, neither of which a GPU's kernels do (not held).
#[test]
fn eight_bit_adamw_and_adafactor_states_match_measured_on_cpu() {
    let mut n = 0;
    for r in records("qlora_torch_2.11.jsonl") {
        let optimizer = match r["optim"].as_str().unwrap() {
            "adafactor" => "adafactor",
            "adamw_8bit" | "paged_adamw_8bit" => "adamw-8bit",
            _ => continue,
        };
        let id = r["id"].as_str().unwrap();
        let dt = r["dtype"].as_str().unwrap();
        let (precision, lora) = match (&r["qlora"], &r["lora"]) {
            (q, lora) if !q.is_null() => {
                let prepared = q["prepare"] != false;
                let pdt = if prepared || q["load_dtype"] == "fp32" {
                    "fp32"
                } else {
                    "bf16"
                };
                let quant = if q["dq"] == true { "nf4-dq" } else { "nf4" };
                (
                    format!(r#"{{"param":"{pdt}","master":"fp32","reduce":"{pdt}"}}"#),
                    format!(",{}", lora_member(lora, &format!(r#","quant":"{quant}""#))),
                )
            }
            (_, lora) if !lora.is_null() => (
                format!(r#"{{"param":"{dt}","master":"fp32","reduce":"{dt}"}}"#),
                format!(",{}", lora_member(lora, "")),
            ),
            _ => (
                format!(r#"{{"param":"{dt}","master":"{dt}","reduce":"{dt}"}}"#),
                String::new(),
            ),
        };
        let per_param = optimizer == "adafactor" && !id.contains("foreach");
        let gc = r["gc"] == true;
        let plan = plan(&format!(
            r#"{{"model":{},"gpu":"cpu","num_gpus":1,"preset":"hf-transformers",
                "batch":{{"micro_batch_size":{},"seq_len":{}}},"precision":{precision},
                "optimizer":"{optimizer}","activation_checkpointing":"{}",
                "implementation":{{"optimizer":"{}"}}{lora}}}"#,
            r["profile"],
            r["batch"],
            r["seq"],
            if gc { "full" } else { "none" },
            if per_param { "per-param" } else { "foreach" },
        ));
        let e = estimate(&plan).unwrap();
        let st = &r["opt_state"];
        let host_steps = st["step.float32"]["bytes"].as_u64().unwrap_or(0);
        assert_eq!(
            e.per_gpu.breakdown.optimizer_states_bytes.get(),
            st["_total"].as_u64().unwrap() - host_steps,
            "{id}: optimizer states"
        );
        let measured = r["steady_peak"].as_u64().unwrap() as f64;
        let in_step = r["step3"]["opt_peak"].as_u64().unwrap() as f64 >= measured;
        let pred = e.per_gpu.peak_allocated_bytes.get() as f64;
        if !(in_step && (optimizer == "adamw-8bit" || per_param)) {
            let tol = match (gc, r["lora"].is_null()) {
                (true, _) => 0.03,
                (false, false) => 0.003,
                (false, true) => 0.001,
            };
            assert!(within(pred, measured, tol), "{id}: {pred} vs {measured}");
        }
        n += 1;
    }
    assert_eq!(n, 20);
}

/// `torch.optim.Muon` (torch 2.11) with AdamW for the rest, as Transformers' Trainer steps them
/// (full fine-tunes of tiny and small in fp32, Muon on the decoder matrices and on every
/// matrix: tests/data/muon_torch_2.11.jsonl, the records of qlora_torch_2.11.jsonl itemised
/// by src/trainer/muon_probe.py). The states are exact: a momentum buffer per Muon matrix,
/// AdamW's two for the rest (the `step` scalars are host memory). The optimizer step is exact
/// but for two things: the oneDNN scratch of each CPU bf16 matmul, which depends on the thread
/// count and which the probe measured per shape (a GPU has none), and the batch the loop has
/// freed by then, which the estimator still counts (+10,148 B on tiny, +18,260 B on small).
#[test]
fn muon_states_and_step_match_measured_on_cpu() {
    let mut n = 0;
    for r in records("muon_torch_2.11.jsonl") {
        let c = &r["config"];
        let optimizer = match c["muon_scope"].as_str().unwrap() {
            "hidden" => "muon",
            _ => "muon-all-2d",
        };
        let plan = plan(&format!(
            r#"{{"model":{},"gpu":"cpu","num_gpus":1,"preset":"hf-transformers",
                "batch":{{"micro_batch_size":{},"seq_len":{}}},
                "precision":{{"param":"fp32","master":"fp32","reduce":"fp32"}},
                "optimizer":"{optimizer}"}}"#,
            c["profile"], c["batch"], c["seq"]
        ));
        let e = estimate(&plan).unwrap();
        let id = r["id"].as_str().unwrap();
        let st = &r["opt_state"];
        assert_eq!(
            e.per_gpu.breakdown.optimizer_states_bytes.get(),
            st["_total"].as_u64().unwrap() - st["step.float32"]["bytes"].as_u64().unwrap(),
            "{id}: states"
        );
        let largest = &r["prediction"]["largest"];
        let key = format!("({}, {})", largest[0], largest[1]);
        let scratch = r["W_cpu_per_matrix_probe"]["2"][&key].as_u64().unwrap()
            - r["W_structural_per_matrix"][&key].as_u64().unwrap();
        let step = r["record_2threads"]["step_peak"].as_u64().unwrap() - scratch;
        let opt = e
            .per_gpu
            .timeline
            .iter()
            .find(|t| !t.first_step && t.phase == memplan::estimate::Phase::Optimizer)
            .unwrap()
            .allocated_bytes
            .get();
        let inputs = e.per_gpu.breakdown.inputs_bytes.get();
        assert!(
            opt >= step && opt - step <= inputs,
            "{id}: optimizer step {opt} vs {step} (+ at most the inputs, {inputs})"
        );
        n += 1;
    }
    assert_eq!(n, 4);
}

/// HSDP as torch 2.11 runs it: FSDP2's `fully_shard` on a 2-D (dp_replicate, dp_shard) mesh,
/// 4 real processes over Gloo for 2 x 2, with 1 x 2 (plain FSDP2 over a 1-D mesh, the
/// control) and 2 x 1 beside it, each rank counted by the shim's allocator
/// (src/trainer/hsdp_reference.py; tests/data/hsdp_torch_2.11.jsonl: tiny and small, fp32 and
/// bf16 parameters reducing in fp32, AC none and full, 24 records). Torch's `foreach_reduce`
/// (_fsdp_collectives.py l.536-588) reduce-scatters into the gradient shard's buffer and then
/// all-reduces that same buffer in place over the replicate group, so a 2 x 2 rank holds what
/// a 1 x 2 rank holds, to the byte (asserted on the records), which is how the estimator
/// models HSDP. Gloo's scratch inside the collectives is outside the records (NCCL makes none
/// through the caching allocator); torch.optim's `step` scalars (4 B per parameter tensor,
/// host memory on a GPU) are inside them and taken off here. Every 2 x 2 and 1 x 2 plan is then
/// within 1,028 B of the estimate (at most -0.014%), and so is every 2 x 1 plan. At one shard
/// rank (2 x 1) torch's world-size-1 unshard (_fsdp_param_group.py l.368-392) still copies
/// every parameter of a unit into an unsharded buffer of its own, even at fp32 (the trainer
/// does too: tests/distributed.rs), and its prefetch (l.324-335) allocates nothing until the
/// block runs; before the estimator modelled both (`hsdp_solo` in src/estimate/mod.rs) it took
/// such a plan for one device and missed the fp32 ones by -8.7% (tiny, AC none), -15.9% (tiny,
/// full AC) and -2.9% (small, AC none).
#[test]
fn hsdp_plans_match_torch_2_11_fully_shard_on_a_2d_mesh_measured_on_cpu() {
    let cases = measured_cases("hsdp_torch_2.11.jsonl");
    let mut held = 0;
    for (line, c, measured) in &cases {
        let (r, s) = (
            c["dp_replicate"].as_u64().unwrap(),
            c["dp_shard"].as_u64().unwrap(),
        );
        assert_eq!(measured.len() as u64, r * s, "{line}");
        let plan = plan(&format!(
            r#"{{"model":{},"gpu":"cpu","num_gpus":{},
                "parallel":{{"dp_replicate":{r},"dp_shard":{s}}},
                "batch":{{"micro_batch_size":{},"seq_len":{}}},
                "precision":{{"param":{},"master":"fp32","reduce":{}}},
                "implementation":{{"logits":"float-output"}},
                "activation_checkpointing":{}}}"#,
            c["model"],
            r * s,
            c["batch"],
            c["seq"],
            c["param"],
            c["reduce"],
            c["ac"]
        ));
        let model = c["model"].as_str().unwrap();
        let step_scalars = 4 * (9 * common::layers(model) + 3);
        let most = *measured.iter().max().unwrap();
        let e = estimate(&plan).unwrap();
        let pred = e.per_gpu.peak_allocated_bytes.get();
        // Within 1,028 B (0.014% at most), as the doc says.
        assert!(
            pred.abs_diff(most - step_scalars) <= 1_028,
            "{line}: {pred} vs {most} less {step_scalars} B of step scalars"
        );
        // HSDP's replicas hold what FSDP over their shard group holds (the 1 x 2 control).
        if r > 1 && s > 1 {
            let control = cases
                .iter()
                .find(|(_, o, _)| {
                    o["dp_replicate"] == 1
                        && ["model", "batch", "seq", "param", "reduce", "ac", "dp_shard"]
                            .iter()
                            .all(|k| o[k] == c[k])
                })
                .unwrap();
            assert_eq!(most, *control.2.iter().max().unwrap(), "{line}");
        }
        held += 1;
    }
    assert_eq!(held, 24);
}
