//! Hugging Face config.json files of current families, read through `--model PATH`:
//! parameter counts against the published totals of the model cards.

use assert_cmd::Command;
use memplan::profiles;

#[test]
fn qwen3_dense_reads_head_dim_and_qk_norms() {
    // Qwen3-8B: 8.19 B parameters (model card), with an explicit head_dim of 128 and an
    // RMSNorm of head_dim on each of q and k per layer.
    let m = profiles::model("tests/data/hf/qwen3-8b.json").unwrap();
    assert_eq!(m.head_dim, 128);
    assert!(m.qk_norm);
    assert_eq!(m.param_count(), 8_190_735_360);
}

#[test]
fn qwen3_moe_reads_experts() {
    // Qwen3-30B-A3B: 30.5 B parameters, 128 experts of 768, top-8, every layer MoE.
    let m = profiles::model("tests/data/hf/qwen3-30b-a3b.json").unwrap();
    let moe = m.moe.unwrap();
    assert_eq!(
        (moe.experts, moe.top_k, moe.expert_intermediate),
        (128, 8, 768)
    );
    assert_eq!(m.moe_layers(), 48);
    assert_eq!(m.param_count(), 30_532_122_624);
}

#[test]
fn shipped_moe_profiles_match_published_totals() {
    // Mixtral-8x7B 46.7 B; DeepSeek-MoE-16B 16.4 B (first layer dense, 2 shared experts);
    // Qwen1.5-MoE-A2.7B 14.3 B (gated shared expert, q/k/v biases).
    for (name, want) in [
        ("mixtral-8x7b", 46_702_792_704u64),
        ("deepseek-moe-16b", 16_375_728_128),
        ("qwen1.5-moe-a2.7b", 14_315_784_192),
    ] {
        assert_eq!(profiles::model(name).unwrap().param_count(), want, "{name}");
    }
    assert_eq!(
        profiles::model("deepseek-moe-16b").unwrap().moe_layers(),
        27
    );
}

#[test]
fn latent_attention_is_refused_naming_the_key() {
    let out = Command::cargo_bin("memplan")
        .unwrap()
        .args(["estimate", "--model", "tests/data/hf/deepseek-v3.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("kv_lora_rank"), "{err}");
}

#[test]
fn a_config_path_estimates_like_a_profile() {
    let out = Command::cargo_bin("memplan")
        .unwrap()
        .args([
            "estimate",
            "--model",
            "tests/data/hf/qwen3-30b-a3b.json",
            "--gpu",
            "h100-80g",
            "--num-gpus",
            "8",
            "--ep",
            "8",
            "--ac",
            "full",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plan"]["model"]["name"], "qwen3-30b-a3b");
    assert!(v["per_gpu"]["peak_allocated_bytes"].as_u64().unwrap() > 0);
}
