//! The binary, end to end: commands, formats, exit codes and one-line errors.

use assert_cmd::Command;
use predicates::prelude::*;

fn memplan() -> Command {
    Command::cargo_bin("memplan").unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = memplan()
        .args(args)
        .args(["--format", "json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn seed_plan_without_offload_is_out_of_memory_at_the_first_optimizer_step() {
    memplan()
        .args(["estimate", "--example", "seed-8b-2x48g"])
        .assert()
        .code(1)
        .stdout(predicate::str::contains(
            "OUT OF MEMORY at the first step's optimizer phase",
        ));
}

#[test]
fn seed_plan_with_offload_fits_and_exits_zero() {
    memplan()
        .args(["estimate", "--example", "seed-8b-2x48g-offload"])
        .assert()
        .success()
        .stdout(predicate::str::contains("fits:"));
}

#[test]
fn json_output_carries_the_documented_fields() {
    let v = json(&["estimate", "--example", "seed-8b-2x48g-offload"]);
    assert_eq!(v["schema"], "memplan.estimate/1");
    let g = &v["per_gpu"];
    let breakdown_sum: u64 = g["breakdown"]
        .as_object()
        .unwrap()
        .values()
        .map(|b| b.as_u64().unwrap())
        .sum();
    assert_eq!(breakdown_sum, g["peak_allocated_bytes"].as_u64().unwrap());
    assert!(g["peak_reserved_bytes"].as_u64().unwrap() >= breakdown_sum);
    assert_eq!(g["peak_phase"], "loss-backward");
    assert!(v["host"]["per_node_bytes"].as_u64().unwrap() > 100_000_000_000);
    assert_eq!(v["fits"], true);
}

#[test]
fn flags_override_the_example() {
    let small = json(&["estimate", "--example", "seed-8b-2x48g-offload"]);
    let big = json(&[
        "estimate",
        "--example",
        "seed-8b-2x48g-offload",
        "--micro-batch-size",
        "8",
    ]);
    assert_eq!(big["plan"]["batch"]["micro_batch_size"], 8);
    assert!(
        big["per_gpu"]["peak_allocated_bytes"].as_u64()
            > small["per_gpu"]["peak_allocated_bytes"].as_u64()
    );
}

#[test]
fn markdown_output_is_a_table() {
    memplan()
        .args([
            "estimate",
            "--model",
            "llama3-8b",
            "--num-gpus",
            "8",
            "--format",
            "markdown",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("| **peak allocated** |"));
}

#[test]
fn compare_puts_offload_beside_no_offload_with_differences() {
    memplan()
        .args([
            "compare",
            "example:seed-8b-2x48g",
            "example:seed-8b-2x48g-offload",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "seed-8b-2x48g-offload - seed-8b-2x48g",
        ))
        .stdout(predicate::str::contains("optimizer states"));
}

#[test]
fn profiles_lists_models_gpus_and_examples() {
    memplan()
        .arg("profiles")
        .assert()
        .success()
        .stdout(predicate::str::contains("8030261248"))
        .stdout(predicate::str::contains("mi300x-192g"))
        .stdout(predicate::str::contains("seed-8b-2x48g-offload"));
}

fn rejects(args: &[&str], needle: &str) {
    let out = memplan().args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(needle), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn rejects_unknown_model_and_lists_the_known_ones() {
    rejects(&["estimate", "--model", "gpt-5"], "llama3-8b");
}

#[test]
fn rejects_unknown_gpu() {
    rejects(
        &["estimate", "--model", "llama3-8b", "--gpu", "tpu"],
        "h100-80g",
    );
}

#[test]
fn rejects_tp_degree_that_does_not_divide_heads() {
    rejects(
        &[
            "estimate",
            "--model",
            "llama2-7b",
            "--num-gpus",
            "3",
            "--tp",
            "3",
        ],
        "parallel.tp",
    );
}

#[test]
fn rejects_degrees_that_do_not_divide_the_world_size() {
    rejects(
        &[
            "estimate",
            "--model",
            "llama3-8b",
            "--num-gpus",
            "6",
            "--tp",
            "4",
        ],
        "num_gpus",
    );
}

#[test]
fn rejects_zero_and_negative_sizes() {
    rejects(
        &["estimate", "--model", "tiny", "--micro-batch-size", "0"],
        "batch.micro_batch_size",
    );
    rejects(
        &["estimate", "--model", "tiny", "--seq-len", "-5"],
        "batch.seq_len",
    );
}

#[test]
fn rejects_sequences_beyond_the_model() {
    rejects(
        &["estimate", "--model", "tiny", "--seq-len", "4096"],
        "max_position_embeddings",
    );
}

#[test]
fn rejects_more_pipeline_stages_than_layers() {
    rejects(
        &[
            "estimate",
            "--model",
            "tiny",
            "--num-gpus",
            "4",
            "--pp",
            "4",
        ],
        "parallel.pp",
    );
}

#[test]
fn rejects_malformed_plan_json_with_its_line() {
    rejects(&["estimate", "--plan", "tests/data/bad.json"], "line 4");
}

#[test]
fn rejects_unknown_choices_naming_what_is_accepted() {
    rejects(
        &["estimate", "--model", "tiny", "--ac", "sometimes"],
        "selective-op",
    );
    rejects(
        &["estimate", "--model", "tiny", "--offload", "disk"],
        "optimizer",
    );
    rejects(
        &["estimate", "--model", "tiny", "--param-dtype", "fp8"],
        "bf16",
    );
}

#[test]
fn rejects_absurd_sizes_without_wrapping() {
    rejects(
        &[
            "estimate",
            "--model",
            "tiny",
            "--micro-batch-size",
            "99999999999",
        ],
        "batch.micro_batch_size",
    );
}

#[test]
fn search_answers_the_seed_question() {
    memplan()
        .args([
            "search",
            "--model",
            "llama3-8b",
            "--gpu",
            "rtx-a6000-48g",
            "--num-gpus",
            "2",
            "--seq-len",
            "2048",
            "--host-ram",
            "256GB",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("no plan fits with offload none"))
        .stdout(predicate::str::contains("best with offload full"));
}

#[test]
fn max_batch_reports_the_largest_micro_batch() {
    memplan()
        .args([
            "search",
            "--max-batch",
            "--example",
            "seed-8b-2x48g-offload",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "largest micro-batch that fits with 5% headroom: 10",
        ));
    memplan()
        .args(["search", "--max-batch", "--example", "seed-8b-2x48g"])
        .assert()
        .code(1)
        .stdout(predicate::str::contains("no micro-batch fits"));
}

#[test]
fn rejects_a_headroom_outside_its_range() {
    rejects(
        &["search", "--model", "tiny", "--headroom", "0.9"],
        "--headroom",
    );
}

#[test]
fn estimates_a_torchtitan_config_with_the_world_size_from_flags() {
    let v = json(&[
        "estimate",
        "--torchtitan",
        "tests/data/torchtitan/llama3_8b_2024.toml",
        "--num-gpus",
        "8",
        "--gpu",
        "h100-96g",
    ]);
    assert_eq!(v["plan"]["model"]["name"], "llama3-8b");
    assert_eq!(v["plan"]["parallel"]["dp_shard"], 8);
    assert_eq!(v["plan"]["activation_checkpointing"], "selective-op");
    // Same plan as the published December 2024 row at batch 1: the flags say the same thing.
    let by_flags = json(&[
        "estimate",
        "--model",
        "llama3-8b",
        "--gpu",
        "h100-96g",
        "--num-gpus",
        "8",
        "--micro-batch-size",
        "1",
        "--seq-len",
        "8192",
        "--ac",
        "selective-op",
    ]);
    assert_eq!(
        v["per_gpu"]["peak_reserved_bytes"],
        by_flags["per_gpu"]["peak_reserved_bytes"]
    );
}

/// `memplan timeline` on the seed plan: the trace's first-step optimizer crosses the
/// capacity (48 GB less the CUDA context), the picture marks the out-of-memory moment there,
/// and the JSON trace says where.
#[test]
fn timeline_of_the_seed_plan_marks_the_first_optimizer_step_out_of_memory() {
    let dir = std::env::temp_dir().join(format!("memplan-cli-timeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("seed.svg");
    memplan()
        .args(["timeline", "--example", "seed-8b-2x48g", "--output"])
        .arg(&svg)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "out of memory at step 1 optimizer: layers.",
        ));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") || text.starts_with("<?xml"));
    assert!(text.contains("out of memory") && text.contains("capacity"));

    let out = memplan()
        .args([
            "timeline",
            "--example",
            "seed-8b-2x48g",
            "--format",
            "json",
            "-o",
            "-",
        ])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["schema"], "memplan.trace/1");
    let cap = doc["capacity_bytes"].as_u64().unwrap();
    // The 48 GB card's 47.99 GiB less 512 MiB of CUDA context and 512 MiB of NCCL.
    assert_eq!(cap, 51_527_024_640 - (1 << 30));
    // Running sum: where it first exceeds the capacity is in step 1's optimizer section.
    let events = doc["events"].as_array().unwrap();
    let mut total = 0i64;
    let first_over = events
        .iter()
        .position(|e| {
            let b = e["bytes"].as_i64().unwrap();
            total += if e["op"] == "alloc" { b } else { -b };
            total as u64 > cap
        })
        .unwrap();
    let opt = doc["marks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["kind"] == "begin" && m["section"] == "optimizer")
        .unwrap();
    assert_eq!(opt["first_step"], true);
    assert!(first_over >= opt["at"].as_u64().unwrap() as usize);
    assert_eq!(events[first_over]["category"], "optimizer-states");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn timeline_refuses_a_stage_beyond_the_pipeline_and_a_bad_alloc_conf() {
    memplan()
        .args([
            "timeline",
            "--example",
            "seed-8b-2x48g",
            "--stage",
            "1",
            "-o",
            "-",
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--stage"));
    memplan()
        .args([
            "timeline",
            "--example",
            "seed-8b-2x48g",
            "--alloc-conf",
            "max_split_size_mb:1",
        ])
        .assert()
        .code(2);
}

#[test]
fn timeline_json_to_a_file_says_so_in_one_json_document() {
    let dir = std::env::temp_dir().join(format!("memplan-cli-tljson-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.json");
    let out = memplan()
        .args([
            "timeline",
            "--example",
            "seed-8b-2x48g-offload",
            "--format",
            "json",
            "-o",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["schema"], "memplan.timeline/1");
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(doc["events"], trace["events"].as_array().unwrap().len());
    // The summary's peak is the running sum's highest point over the written events.
    let (mut live, mut peak) = (0i64, 0i64);
    for e in trace["events"].as_array().unwrap() {
        let b = e["bytes"].as_i64().unwrap();
        live += if e["op"] == "alloc" { b } else { -b };
        peak = peak.max(live);
    }
    assert!(
        peak > 16 << 30,
        "the offload example peaks at its logits, over 16 GiB"
    );
    assert_eq!(doc["peak_allocated_bytes"], peak);
    std::fs::remove_dir_all(&dir).ok();
}

/// The small profile's 4 blocks over 4 pipeline stages.
const PP4_PLAN: [&str; 13] = [
    "estimate",
    "--model",
    "small",
    "--gpu",
    "h100-80g",
    "--num-gpus",
    "8",
    "--pp",
    "4",
    "--grad-accum-steps",
    "8",
    "--seq-len",
    "256",
];

#[test]
fn all_stages_lists_every_pipeline_stage_and_names_the_most_loaded() {
    let out = memplan()
        .args(PP4_PLAN)
        .args(["--all-stages", "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stages = doc["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 4);
    let layers: u64 = stages.iter().map(|s| s["layers"].as_u64().unwrap()).sum();
    assert_eq!(layers, 4, "the small profile's 4 blocks, one per stage");
    let peaks: Vec<u64> = stages
        .iter()
        .map(|s| s["peak_allocated_bytes"].as_u64().unwrap())
        .collect();
    let top = doc["per_gpu"]["peak_allocated_bytes"].as_u64().unwrap();
    let most = doc["per_gpu"]["stage"].as_u64().unwrap() as usize;
    assert_eq!(top, *peaks.iter().max().unwrap());
    assert_eq!(peaks[most], top);
    for (i, s) in stages.iter().enumerate() {
        assert_eq!(s["stage"], i as u64);
    }
    // Without --all-stages the table names the stage.
    let out = memplan().args(PP4_PLAN).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!("pipeline stage {most} of 4")),
        "{text}"
    );
}

#[test]
fn lora_errors_name_the_flag_and_what_is_accepted() {
    let base = [
        "estimate",
        "--model",
        "llama3-8b",
        "--gpu",
        "rtx4090-24g",
        "--num-gpus",
        "1",
    ];
    let one_line = |s: &str| s.trim_end().lines().count() == 1;
    memplan()
        .args(base)
        .args(["--lora-rank", "8", "--lora-targets", "q,lm_head"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--lora-targets"))
        .stderr(predicate::str::contains("all-linear"))
        .stderr(predicate::function(one_line));
    memplan()
        .args(base)
        .args(["--lora-rank", "0"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--lora-rank"));
    memplan()
        .args(base)
        .args(["--lora-dropout", "1.5"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--lora-dropout"));
    // LoRA is modelled with data parallelism only: tensor parallelism is refused, not ignored.
    memplan()
        .args([
            "estimate",
            "--model",
            "llama3-8b",
            "--num-gpus",
            "2",
            "--tp",
            "2",
            "--lora-rank",
            "8",
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("lora"))
        .stderr(predicate::str::contains("data parallelism only"));
    // QLoRA is modelled on one GPU per replica: under FSDP it is refused.
    memplan()
        .args([
            "estimate",
            "--model",
            "llama3-8b",
            "--num-gpus",
            "2",
            "--lora-rank",
            "8",
            "--lora-quant",
            "nf4",
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("lora.quant"))
        .stderr(predicate::str::contains("none under FSDP"));
    // A block the LoRA model does not describe (Gemma 2: four norms, soft-capped scores) is
    // refused, not estimated as a Llama block.
    memplan()
        .args([
            "estimate",
            "--model",
            "tests/data/hf/gemma-2-2b.json",
            "--num-gpus",
            "1",
            "--lora-rank",
            "8",
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("Llama block layout"));
    memplan()
        .args(base)
        .args(["--preset", "megatron"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--preset"))
        .stderr(predicate::str::contains("hf-transformers"));
}

#[test]
fn a_lora_plan_has_no_base_gradients_or_states() {
    // llama3-8b, rank 16 on q and v: 32 x 16 x ((4096 + 4096) + (4096 + 1024)) adapter
    // elements, fp32, with AdamW's two states; the 8.03B-parameter base in bf16.
    let adapters: u64 = 32 * 16 * ((4096 + 4096) + (4096 + 1024));
    let e = json(&[
        "estimate",
        "--model",
        "llama3-8b",
        "--gpu",
        "h100-80g",
        "--num-gpus",
        "1",
        "--preset",
        "hf-transformers",
        "--param-dtype",
        "bf16",
        "--master-dtype",
        "fp32",
        "--lora-rank",
        "16",
        "--lora-targets",
        "q,v",
    ]);
    let b = &e["per_gpu"]["breakdown"];
    assert_eq!(b["optimizer_states_bytes"], 8 * adapters);
    let base = 8_030_261_248u64;
    assert_eq!(b["master_params_bytes"], 2 * base + 4 * adapters);
    assert_eq!(e["plan"]["lora"]["rank"], 16);
    assert_eq!(e["plan"]["lora"]["targets"], serde_json::json!(["q", "v"]));
}

#[test]
fn autocast_is_refused_where_fsdp_casts_instead() {
    memplan()
        .args([
            "estimate",
            "--model",
            "llama3-8b",
            "--num-gpus",
            "8",
            "--autocast",
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--autocast"))
        .stderr(predicate::str::contains("one GPU per model replica"));
}

/// Interleaved 1F1B with a micro-batch count its rounds do not divide, which torch refuses,
/// is a one-line error naming the field (it was an arithmetic overflow in the estimator).
#[test]
fn interleaved_micro_batches_its_rounds_do_not_divide_are_refused() {
    memplan()
        .args([
            "estimate",
            "--model",
            "tiny-deep",
            "--num-gpus",
            "2",
            "--pp",
            "2",
            "--pp-schedule",
            "interleaved-1f1b",
            "--pp-virtual-stages",
            "2",
            "--grad-accum-steps",
            "9",
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("batch.grad_accum_steps"))
        .stderr(predicate::str::contains("= 4"));
}

/// HSDP at one shard rank with EP on a one-rank expert mesh: the block's prefetch-less copy
/// covers its experts (it was their sum, which underflowed in the trace; found by the fuzz
/// target `flag_vectors`). Both commands answer (1: does not fit), neither panics.
#[test]
fn hsdp_at_one_shard_rank_with_expert_parallelism_is_estimated_and_traced() {
    for cmd in [&["estimate"][..], &["timeline", "-o", "-"][..]] {
        memplan()
            .args(cmd)
            .args([
                "--model",
                "mixtral-8x7b",
                "--dp-replicate",
                "2",
                "--tp",
                "2",
                "--ep",
                "2",
                "--format",
                "json",
            ])
            .assert()
            .code(1);
    }
}
