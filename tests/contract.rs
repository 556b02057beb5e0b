//! The output contract and the input boundary, one regression test per hostile input that
//! once broke them: exit codes (0 fits, 1 does not fit, 2 bad input, 3 output or internal
//! failure), exactly one JSON document on stdout under `--format json` whatever happens, and
//! one-line errors that name the flag, field or key and what is accepted.

use std::path::PathBuf;

use assert_cmd::Command;

fn memplan() -> Command {
    Command::cargo_bin("memplan").unwrap()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Run {
    let out = memplan().args(args).output().unwrap();
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs with `--format json` and parses stdout as exactly one JSON document.
fn run_json(args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    let r = run(&all);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {:?}", r.stdout));
    (r.code, doc, r.stderr)
}

/// Exit 2 with one stderr line that contains every needle.
fn refused(args: &[&str], needles: &[&str]) -> String {
    let r = run(args);
    assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
    assert_eq!(
        r.stderr.trim_end().lines().count(),
        1,
        "one line: {}",
        r.stderr
    );
    for n in needles {
        assert!(r.stderr.contains(n), "{n:?} not in {}", r.stderr);
    }
    r.stderr
}

/// A file in a fresh temporary folder, for inputs the tests write.
fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "memplan-contract-{}-{}",
        std::process::id(),
        name.replace(['/', '|'], "_")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn max_batch_json_is_one_document_when_a_batch_fits() {
    let (code, doc, _) = run_json(&[
        "search",
        "--max-batch",
        "--example",
        "seed-8b-2x48g-offload",
    ]);
    assert_eq!(code, 0);
    assert_eq!(doc["schema"], "memplan.max-batch/1");
    assert_eq!(doc["micro_batch_size"], 10, "the README's seed answer");
    assert_eq!(doc["estimate"]["plan"]["batch"]["micro_batch_size"], 10);
    assert_eq!(doc["estimate"]["fits"], true);
}

#[test]
fn max_batch_json_is_one_document_when_nothing_fits() {
    let (code, doc, _) = run_json(&["search", "--max-batch", "--example", "seed-8b-2x48g"]);
    assert_eq!(code, 1);
    assert_eq!(doc["schema"], "memplan.max-batch/1");
    assert!(doc["micro_batch_size"].is_null());
    assert!(doc["estimate"].is_null());
}

#[test]
fn compare_exits_by_its_best_plan() {
    // Both out of memory: 1. One fits: 0.
    let r = run(&["compare", "example:seed-8b-2x48g", "example:seed-8b-2x48g"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let r = run(&[
        "compare",
        "example:seed-8b-2x48g",
        "example:seed-8b-2x48g-offload",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_write_error_is_exit_3_not_does_not_fit() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full");
    let Ok(full) = full else {
        eprintln!("no /dev/full on this system; skipped");
        return;
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memplan"))
        .args(["estimate", "--example", "seed-8b-2x48g-offload"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cannot write output"), "{err}");
}

#[test]
fn host_ram_without_a_unit_is_refused() {
    refused(
        &[
            "estimate",
            "--example",
            "seed-8b-2x48g-offload",
            "--host-ram",
            "512",
        ],
        &["--host-ram", "512GB or 512GiB"],
    );
    // A unit makes it a size: 512 GB is enough for the seed plan's 174 GB.
    let r = run(&[
        "estimate",
        "--example",
        "seed-8b-2x48g-offload",
        "--host-ram",
        "512GB",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A JSON integer is bytes, and must be at least a MiB.
    let plan = temp_file("tiny-host.json", br#"{"model":"tiny","host_ram":512}"#);
    refused(
        &["estimate", "--plan", plan.to_str().unwrap()],
        &["host_ram", "1 MiB"],
    );
}

#[test]
fn a_pipe_in_a_label_does_not_break_the_markdown_table() {
    let a = temp_file("a|b.json", br#"{"model":"tiny","gpu":"cpu"}"#);
    let r = run(&[
        "compare",
        a.to_str().unwrap(),
        "example:seed-8b-2x48g-offload",
        "--format",
        "markdown",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let header = r.stdout.lines().next().unwrap();
    assert!(header.contains(r"a\|b"), "{header}");
    // Every row has the header's number of unescaped cell separators.
    let cells = |l: &str| l.replace(r"\|", "").matches('|').count();
    for line in r.stdout.lines().filter(|l| l.starts_with('|')) {
        assert_eq!(cells(line), cells(header), "{line}");
    }
}

#[test]
fn estimate_json_carries_the_parameter_count() {
    let (code, doc, _) = run_json(&["estimate", "--example", "seed-8b-2x48g-offload"]);
    assert_eq!(code, 0);
    assert_eq!(doc["param_count"], 8_030_261_248u64);
    assert_eq!(doc["warnings"], serde_json::json!([]));
}

#[test]
fn a_huge_plan_value_is_not_echoed_whole() {
    let big = "x".repeat(600_000);
    let plan = temp_file(
        "big-value.json",
        format!(r#"{{"model":"tiny","offload":"{big}"}}"#).as_bytes(),
    );
    let err = refused(
        &["estimate", "--plan", plan.to_str().unwrap()],
        &["offload"],
    );
    assert!(err.len() < 400, "{} bytes", err.len());
}

#[test]
fn an_oversized_input_file_is_refused_before_it_is_read() {
    let mut text = String::from(r#"{"model":"tiny","host_ram":["#);
    while text.len() < 3 << 20 {
        text.push_str("1,");
    }
    text.push_str("1]}");
    let plan = temp_file("huge.json", text.as_bytes());
    refused(
        &["estimate", "--plan", plan.to_str().unwrap()],
        &["larger than 1024 KiB"],
    );
}

#[test]
fn negative_flag_values_name_the_flag() {
    refused(
        &["estimate", "--model", "tiny", "--micro-batch-size", "-5"],
        &["--micro-batch-size", "got -5"],
    );
    refused(
        &["search", "--model", "tiny", "--gpu", "cpu", "--top", "-1"],
        &["--top", "got -1"],
    );
    refused(
        &[
            "search",
            "--max-batch",
            "--model",
            "tiny",
            "--max-micro-batch",
            "-3",
        ],
        &["--max-micro-batch", "got -3"],
    );
    refused(
        &["search", "--model", "tiny", "--headroom", "-0.1"],
        &["--headroom", "got -0.1"],
    );
}

#[test]
fn a_plan_that_is_not_an_object_says_so() {
    let plan = temp_file("array.json", b"[1, 2, 3]");
    refused(
        &["estimate", "--plan", plan.to_str().unwrap()],
        &["array.json", "expected a JSON object", "got an array"],
    );
}

#[test]
fn compare_names_the_bad_file() {
    let bad = temp_file(
        "bad-tp.json",
        br#"{"model":"tiny","num_gpus":3,"parallel":{"tp":3}}"#,
    );
    refused(
        &["compare", "example:seed-8b-2x48g", bad.to_str().unwrap()],
        &["bad-tp.json", "parallel.tp"],
    );
}

#[test]
fn a_byte_order_mark_is_accepted() {
    let mut text = "\u{feff}".as_bytes().to_vec();
    text.extend_from_slice(br#"{"model":"tiny","gpu":"cpu"}"#);
    let plan = temp_file("bom.json", &text);
    let r = run(&["estimate", "--plan", plan.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn errors_under_json_are_one_json_document() {
    let (code, doc, stderr) = run_json(&["estimate", "--model", "tiny", "--tp", "0"]);
    assert_eq!(code, 2);
    assert_eq!(doc["schema"], "memplan.error/1");
    assert_eq!(doc["error"]["field"], "--tp");
    assert_eq!(doc["exit_code"], 2);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    // Before the arguments parse, too.
    let (code, doc, _) = run_json(&["estimate", "--no-such-flag"]);
    assert_eq!(code, 2);
    assert_eq!(doc["error"]["kind"], "input");
    assert!(doc["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--no-such-flag"));
    // And for every command.
    for args in [
        &["compare", "example:nope", "example:seed-8b-2x48g"][..],
        &["search", "--model", "tiny", "--gpu", "nope"][..],
        &["profiles", "--format", "yaml"][..],
    ] {
        let (code, doc, _) = run_json(args);
        assert_eq!(code, 2, "{args:?}");
        assert_eq!(doc["schema"], "memplan.error/1", "{args:?}");
    }
}

#[test]
fn clap_errors_are_one_line_naming_the_flag() {
    refused(&["estimate", "--model", "tiny", "--sp", "maybe"], &["--sp"]);
    refused(&["estimate", "--plan"], &["--plan"]);
}

/// (stderr, JSON) of an accepted plan with flags that earn a warning.
fn warned(args: &[&str]) -> (String, serde_json::Value) {
    let (code, doc, stderr) = run_json(args);
    assert!(code == 0 || code == 1, "{args:?}: {stderr}");
    (stderr, doc)
}

#[test]
fn settings_accepted_but_not_meant_are_warned_about() {
    let tiny = ["estimate", "--model", "tiny", "--gpu", "cpu"];
    for (extra, needle) in [
        (
            &["--param-dtype", "fp32", "--master-dtype", "bf16"][..],
            "precision.param fp32 is wider",
        ),
        (
            &["--ac", "selective-layer:1000"][..],
            "checkpoints no block of 2",
        ),
        (&["--sp", "true"][..], "parallel.sp is ignored with tp 1"),
        (
            &["--num-gpus", "16", "--gpus-per-node", "2", "--tp", "4"][..],
            "spans nodes of 2 GPUs",
        ),
    ] {
        let args: Vec<&str> = tiny.iter().chain(extra).copied().collect();
        let (stderr, doc) = warned(&args);
        assert!(
            stderr.contains("warning: ") && stderr.contains(needle),
            "{stderr}"
        );
        let ws = doc["warnings"].as_array().unwrap();
        assert!(
            ws.iter().any(|w| w.as_str().unwrap().contains(needle)),
            "{ws:?}"
        );
    }
    let plan = temp_file(
        "dense-capacity.json",
        br#"{"model":"tiny","gpu":"cpu","moe_capacity_factor":1.25}"#,
    );
    let (stderr, _) = warned(&["estimate", "--plan", plan.to_str().unwrap()]);
    assert!(
        stderr.contains("moe_capacity_factor is ignored: tiny is a dense model"),
        "{stderr}"
    );
    // Without such settings, no warning.
    let (stderr, doc) = warned(&tiny);
    assert_eq!(stderr, "");
    assert_eq!(doc["warnings"], serde_json::json!([]));
}

#[test]
fn expert_tensor_parallelism_on_a_dense_model_is_refused() {
    refused(
        &[
            "estimate",
            "--model",
            "tiny",
            "--gpu",
            "cpu",
            "--num-gpus",
            "2",
            "--tp",
            "2",
            "--etp",
            "2",
        ],
        &["--etp", "dense model"],
    );
}

#[test]
fn choices_in_json_output_read_back_as_plan_values() {
    let (_, doc, _) = run_json(&[
        "estimate",
        "--model",
        "llama3-8b",
        "--num-gpus",
        "8",
        "--pp",
        "2",
        "--ac",
        "selective-layer:2",
    ]);
    let plan = &doc["plan"];
    assert_eq!(plan["parallel"]["pp_schedule"], "1f1b");
    assert_eq!(plan["optimizer"], "adamw");
    assert_eq!(plan["activation_checkpointing"], "selective-layer:2");
    assert_eq!(plan["implementation"]["optimizer"], "foreach");
}

#[test]
fn a_torchtitan_degree_that_conflicts_with_the_world_size_is_refused() {
    let toml = temp_file(
        "shard16.toml",
        b"[model]\nname = \"llama3\"\nflavor = \"8B\"\n[parallelism]\ndata_parallel_shard_degree = 16\n",
    );
    refused(
        &[
            "estimate",
            "--torchtitan",
            toml.to_str().unwrap(),
            "--num-gpus",
            "8",
        ],
        &["parallelism.data_parallel_shard_degree", "got 16", "(8)"],
    );
    // With the matching world size the explicit degree is what is estimated.
    let (code, doc, _) = run_json(&[
        "estimate",
        "--torchtitan",
        toml.to_str().unwrap(),
        "--num-gpus",
        "16",
    ]);
    assert!(code <= 1);
    assert_eq!(doc["plan"]["parallel"]["dp_shard"], 16);
}

#[test]
fn a_torchtitan_typo_is_warned_about_and_values_are_blamed_on_their_key() {
    let toml = temp_file(
        "typo.toml",
        b"[model]\nname = \"llama3\"\nflavor = \"8B\"\n[training]\nlocal_batchsize = 1\n",
    );
    let (_, doc, stderr) = run_json(&[
        "estimate",
        "--torchtitan",
        toml.to_str().unwrap(),
        "--num-gpus",
        "8",
    ]);
    let needle = "unknown key training.local_batchsize (did you mean training.local_batch_size?)";
    assert!(stderr.contains(needle), "{stderr}");
    assert!(doc["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w.as_str().unwrap().contains(needle)));
    // A value the plan refuses is named by the TOML key it came from.
    let toml = temp_file(
        "tp3.toml",
        b"[model]\nname = \"llama3\"\nflavor = \"8B\"\n[parallelism]\ntensor_parallel_degree = 3\n",
    );
    refused(
        &[
            "estimate",
            "--torchtitan",
            toml.to_str().unwrap(),
            "--num-gpus",
            "3",
        ],
        &["invalid parallelism.tensor_parallel_degree (plan field parallel.tp)"],
    );
}

#[test]
fn a_non_llama_config_is_refused_not_misread() {
    refused(
        &["estimate", "--model", "tests/data/hf/gpt2.json"],
        &["model_type", "gpt2"],
    );
    // A directory holding config.json is read as the model.
    let r = run(&[
        "estimate",
        "--model",
        "tests/data/hf/phi-3-mini-4k",
        "--format",
        "json",
    ]);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["param_count"], 3_821_079_552u64);
}
