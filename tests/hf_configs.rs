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

#[test]
fn gemma2_counts_match_the_model_cards() {
    // Gemma-2-9B: q 4096x3584, k and v 2048x3584, o 3584x4096 = 44,040,192; GeGLU
    // 3 x 14336 x 3584 = 154,140,672; four norms 4 x 3584 = 14,336: 198,195,200 per layer,
    // x 42 = 8,324,198,400; tied embedding 256000 x 3584 = 917,504,000; final norm 3,584:
    // 9,241,705,984, the model card's total.
    let m = profiles::model("tests/data/hf/gemma-2-9b.json").unwrap();
    assert_eq!(m.block_param_count(), 198_195_200);
    assert_eq!(m.param_count(), 9_241_705_984);
    assert!(m.tied_embeddings && m.attn_softcap && m.final_logit_softcap);
    assert_eq!((m.head_dim, m.norms_per_block), (256, 4));
    // Gemma-2-2B: q 2048x2304, k and v 1024x2304, o 2304x2048 = 14,155,776; GeGLU
    // 3 x 9216 x 2304 = 63,700,992; norms 9,216: 77,865,984 x 26 = 2,024,515,584; embedding
    // 256000 x 2304 = 589,824,000; final norm 2,304: 2,614,341,888.
    let m = profiles::model("tests/data/hf/gemma-2-2b.json").unwrap();
    assert_eq!(m.param_count(), 2_614_341_888);
}

#[test]
fn gemma3_text_counts_q_and_k_norms() {
    // gemma-3-1b: q 1024x1152, k and v 256x1152, o 1152x1024 = 2,949,120; GeGLU
    // 3 x 6912 x 1152 = 23,887,872; four norms 4,608; q and k norms 2 x 256: 26,842,112 per
    // layer, x 26 = 697,894,912; tied embedding 262144 x 1152 = 301,989,888; final norm
    // 1,152: 999,885,952 (the "1B" of the model card).
    let m = profiles::model("tests/data/hf/gemma-3-1b.json").unwrap();
    assert!(m.qk_norm && !m.attn_softcap && !m.final_logit_softcap);
    assert_eq!(m.block_param_count(), 26_842_112);
    assert_eq!(m.param_count(), 999_885_952);
}

#[test]
fn gemma1_counts_two_norms() {
    // Gemma-7B: q, k, v 4096x3072 and o 3072x4096 = 50,331,648; GeGLU 3 x 24576 x 3072 =
    // 226,492,416; two norms 6,144: 276,830,208 x 28 = 7,751,245,824; tied embedding
    // 256000 x 3072 = 786,432,000; final norm 3,072: 8,537,680,896 (the card's 8.54 B).
    let m = profiles::model("tests/data/hf/gemma-7b.json").unwrap();
    assert_eq!(m.param_count(), 8_537_680_896);
}

#[test]
fn phi3_from_a_directory_has_fused_shapes() {
    // A directory holding config.json reads it, and is named after the directory.
    // Phi-3-mini-4k: qkv_proj 9216x3072 = 28,311,552; o 3072x3072 = 9,437,184; gate_up_proj
    // 16384x3072 = 50,331,648; down 3072x8192 = 25,165,824; two norms 6,144: 113,252,352
    // per layer, x 32 = 3,624,075,264; embedding and lm_head 2 x 32064 x 3072 = 197,001,216;
    // final norm 3,072: 3,821,079,552 (the card's 3.8 B).
    let m = profiles::model("tests/data/hf/phi-3-mini-4k").unwrap();
    assert_eq!(m.name, "phi-3-mini-4k");
    assert_eq!(m.param_count(), 3_821_079_552);
    let shapes: Vec<(u64, u64)> = m.block_params().iter().map(|p| (p.rows, p.cols)).collect();
    assert!(shapes.contains(&(9216, 3072)) && shapes.contains(&(16384, 3072)));
    assert!(!m.is_llama_block());
}

#[test]
fn gpt_neox_is_read_as_gpt_neox_not_llama() {
    // Pythia-6.9B: two LayerNorms with bias 4 x 4096; query_key_value 12288x4096 + 12288;
    // dense 4096x4096 + 4096; dense_h_to_4h 16384x4096 + 16384; dense_4h_to_h 4096x16384 +
    // 4096: 201,379,840 per layer, x 32 = 6,444,154,880; embed_in and embed_out
    // 2 x 50432 x 4096 = 413,138,944; final LayerNorm 8,192: 6,857,302,016 (6.86 B; read as
    // Llama it was 9.00 B).
    let m = profiles::model("tests/data/hf/pythia-6.9b.json").unwrap();
    assert_eq!(m.block_param_count(), 201_379_840);
    assert_eq!(m.param_count(), 6_857_302_016);
    assert!(m.parallel_residual && m.fused_qkv && m.qkv_bias && m.o_bias && m.mlp_bias);
    // Pythia-1B: LayerNorms 8,192; qkv 6144x2048 + 6144 = 12,589,056; dense 4,196,352;
    // h_to_4h 16,785,408; 4h_to_h 16,779,264: 50,358,272 x 16 = 805,732,352; embeddings
    // 2 x 50304 x 2048 = 206,045,184; final LayerNorm 4,096: 1,011,781,632.
    let m = profiles::model("tests/data/hf/pythia-1b.json").unwrap();
    assert_eq!(m.param_count(), 1_011_781_632);
}

#[test]
fn unmodelled_families_are_refused_naming_model_type() {
    let out = Command::cargo_bin("memplan")
        .unwrap()
        .args(["estimate", "--model", "tests/data/hf/gpt2.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("model_type") && err.contains("gpt2") && err.contains("gpt_neox"),
        "{err}"
    );
}

#[test]
fn new_families_serialize_their_block_structure() {
    let m = profiles::model("tests/data/hf/pythia-1b.json").unwrap();
    let v = serde_json::to_value(&m).unwrap();
    assert_eq!(v["family"], "gpt_neox");
    assert_eq!(v["norm"], "layer_norm");
    assert_eq!(v["mlp"], "plain");
    assert_eq!(v["parallel_residual"], true);
    let g =
        serde_json::to_value(profiles::model("tests/data/hf/gemma-3-1b.json").unwrap()).unwrap();
    assert_eq!(
        (g["family"].as_str(), g["norm"].as_str()),
        (Some("gemma3_text"), Some("rms_one_plus"))
    );
}
