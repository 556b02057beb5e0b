#![cfg(feature = "trainer")]
//! The recorded measurements in tests/data reproduce: plans of them are run again live with
//! PyTorch's own implementations (src/trainer/*_reference.py) on CPU/Gloo, counted by the
//! shim's allocator built as a shared library, and must give the recorded bytes exactly. The
//! estimator's tests hold the estimate against the records; these hold the records against
//! torch 2.11 itself, so the records cannot silently go stale.
//!
//! Needs the test venv's python with torch 2.11 first on PATH and a C++ compiler:
//! `source scripts/libtorch-env.sh && cargo test --features trainer --test references`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// csrc/shim.cpp as a shared library, built once per test run (the g++ line of
/// src/trainer/fsdp2_reference.py's docstring).
fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let torch = Command::new("python3")
            .args([
                "-c",
                "import torch, os; print(os.path.dirname(torch.__file__))",
            ])
            .output()
            .expect("python3 with torch on PATH (source scripts/libtorch-env.sh)");
        assert!(torch.status.success(), "torch does not import");
        let t = String::from_utf8(torch.stdout).unwrap().trim().to_string();
        let out = std::env::temp_dir().join(format!("memplan-shim-{}.so", std::process::id()));
        let status = Command::new("g++")
            .args(["-O1", "-shared", "-fPIC", "-std=c++17"])
            .args(["-D_GLIBCXX_USE_CXX11_ABI=1", "-DGLOG_USE_GLOG_EXPORT"])
            .arg(format!("-I{t}/include"))
            .arg(format!("-I{t}/include/torch/csrc/api/include"))
            .arg(root().join("csrc/shim.cpp"))
            .arg(format!("-L{t}/lib"))
            .args(["-ltorch_cpu", "-lc10", "-ltorch"])
            .arg(format!("-Wl,-rpath,{t}/lib"))
            .arg("-o")
            .arg(&out)
            .status()
            .expect("g++");
        assert!(status.success(), "building the shim failed");
        out
    })
}

/// Runs `script` under torchrun with `nproc` ranks and returns each rank's JSON line (the
/// ones starting with `tag`), in rank order.
fn torchrun(
    script: &str,
    nproc: u32,
    config: &serde_json::Value,
    tag: &str,
) -> Vec<serde_json::Value> {
    let out = Command::new("python3")
        .args(["-m", "torch.distributed.run", "--standalone"])
        .arg(format!("--nproc_per_node={nproc}"))
        .arg(root().join("src/trainer").join(script))
        .arg(shim())
        .arg(config.to_string())
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("torchrun");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ranks print concurrently: read every tagged JSON document wherever it starts.
    let mut ranks: Vec<serde_json::Value> = stdout
        .match_indices(tag)
        .map(|(i, _)| {
            let mut de = serde_json::Deserializer::from_str(&stdout[i + tag.len()..]).into_iter();
            de.next().unwrap().unwrap()
        })
        .collect();
    ranks.sort_by_key(|r| r["rank"].as_u64().unwrap());
    assert_eq!(ranks.len(), nproc as usize, "{stdout}");
    ranks
}

fn first_record(file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("tests/data").join(file)).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

/// Runs a record of src/trainer/pipelining_reference.py again: every rank's lowest
/// steady-step peak, to the byte.
fn pipelining_reproduces(file: &str, model: &str) {
    let c = first_record(file);
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(format!("profiles/models/{model}.json"))).unwrap(),
    )
    .unwrap();
    let (pp, dp) = (c["pp"].as_u64().unwrap(), c["dp_shard"].as_u64().unwrap());
    let config = serde_json::json!({
        "hidden": m["hidden_size"], "layers": m["num_hidden_layers"],
        "heads": m["num_attention_heads"], "kv_heads": m["num_key_value_heads"],
        "ffn": m["intermediate_size"], "vocab": m["vocab_size"],
        "mbs": c["micro_batch_size"], "n_microbatches": c["micro_batches"], "seq": c["seq"],
        "schedule": c["schedule"], "v": c.get("v").cloned().unwrap_or(1.into()), "pp": pp,
        "ac": c["ac"], "steps": 3,
    });
    let ranks = torchrun(
        "pipelining_reference.py",
        (pp * dp) as u32,
        &config,
        "MPPP ",
    );
    // Per stage, the highest of its data-parallel ranks (as recorded).
    let mut measured = vec![0u64; pp as usize];
    for r in &ranks {
        let peak = r["steps"].as_array().unwrap()[1..]
            .iter()
            .map(|s| s["peak"].as_u64().unwrap())
            .min()
            .unwrap();
        let s = r["stage"].as_u64().unwrap() as usize;
        measured[s] = measured[s].max(peak);
    }
    let recorded: Vec<u64> = c["measured"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(measured, recorded, "{c}");
}

/// The first 1F1B plan (pp 2 on the tiny shape, 4 micro-batches).
#[test]
fn one_f_one_b_pipelining_reproduces_its_record() {
    pipelining_reproduces("pipelining_torch_2.11.jsonl", "tiny");
}

/// The first interleaved 1F1B plan (pp 2, 2 chunks per rank, 4 micro-batches on the 8-layer
/// tiny shape).
#[test]
fn interleaved_pipelining_reproduces_its_record() {
    pipelining_reproduces("pipelining_interleaved_torch_2.11.jsonl", "tiny-deep");
}
