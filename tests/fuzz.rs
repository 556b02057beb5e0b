//! The fuzzing harness: generated hostile and valid inputs through the whole program.
//!
//! Five targets, each run for [`cases`] cases (10,000 unless `MEMPLAN_FUZZ_CASES` says
//! otherwise), and a sixth, `timeline_traces`, for a tenth of them (the `timeline` command's
//! trace on the flag target's plans: consistent, and at its phase points the estimate's
//! figures):
//! - `plan_json_from_the_schema`: plan files built from the schema, every key present or not,
//!   each value valid, at an edge (0, -1, 2^24, 2^32, 2^63, ...) or of the wrong type;
//! - `plan_bytes`: raw bytes, and valid plans with bytes flipped, inserted and cut;
//! - `hf_configs`: Hugging Face config.json files of every supported and some refused
//!   families, with sizes up to and past every bound, read through `--model PATH`;
//! - `torchtitan_tomls`: torchtitan job configs in both layouts, with typos, wrong types
//!   and conflicting degrees, read through `--torchtitan PATH --num-gpus N`;
//! - `flag_vectors`: random flag vectors for estimate, search, search --max-batch, compare and
//!   profiles in every format.
//!
//! Every case runs the program in-process through [`memplan::cli::main_with`] (a process per
//! case would cost 10x the time) and asserts: no panic; an exit code in {0, 1, 2}; under
//! `--format json`, stdout is exactly one JSON document, whose schema matches the outcome.
//! When a plan is accepted, its estimate must hold the state every rank needs: the most
//! loaded GPU's peak is at least the parameter, gradient and optimizer-state bytes of an
//! average rank (without offload), the busiest node's host memory at least an average
//! node's offloaded state (with full offload); and the peak must not fall when the
//! micro-batch grows by one or the sequence doubles. `flag_vectors` also runs a sample
//! through the real binary, where a panic would exit 101. proptest keeps the seed of any
//! failing case in tests/fuzz.proptest-regressions, which is committed and re-run first.

use std::io::Write;
use std::path::PathBuf;

use memplan::estimate::estimate;
use memplan::plan::{Offload, PlanFile};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::{json, Map, Value};

/// Cases per target.
fn cases() -> u32 {
    std::env::var("MEMPLAN_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

fn config() -> Config {
    Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        // Shrinking a failure through the whole program is slow; a few hundred steps find a
        // small enough input.
        max_shrink_iters: 500,
        ..Config::default()
    }
}

/// What one in-process run of the program gave.
struct Outcome {
    code: u8,
    stdout: String,
    stderr: String,
}

/// Runs the program in-process; a panic fails the case with the arguments that caused it.
fn run(args: &[String]) -> Result<Outcome, TestCaseError> {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let argv: Vec<String> = std::iter::once("memplan".to_string())
        .chain(args.iter().cloned())
        .collect();
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        memplan::cli::main_with(argv, &mut out, &mut err)
    }))
    .map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        TestCaseError::fail(format!("panicked on {args:?}: {msg}"))
    })?;
    Ok(Outcome {
        code,
        stdout: String::from_utf8(out).map_err(|_| TestCaseError::fail("stdout not UTF-8"))?,
        stderr: String::from_utf8(err).map_err(|_| TestCaseError::fail("stderr not UTF-8"))?,
    })
}

/// The contract every run must keep; returns the JSON document when `json` was asked for.
fn check_contract(
    args: &[String],
    o: &Outcome,
    json: bool,
) -> Result<Option<Value>, TestCaseError> {
    prop_assert!(o.code <= 2, "exit {} for {args:?}: {}", o.code, o.stderr);
    if o.code == 2 {
        let lines: Vec<&str> = o
            .stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        prop_assert_eq!(
            lines.len(),
            1,
            "one error line for {:?}: {}",
            args,
            o.stderr
        );
        prop_assert!(
            lines[0].len() < 1200,
            "error too long: {} bytes",
            lines[0].len()
        );
    }
    if !json {
        return Ok(None);
    }
    let doc: Value = serde_json::from_str(&o.stdout).map_err(|e| {
        TestCaseError::fail(format!(
            "stdout is not one JSON document ({e}) for {args:?}: {:?}",
            o.stdout
        ))
    })?;
    let schema = doc["schema"].as_str().unwrap_or_default();
    if o.code == 2 {
        prop_assert_eq!(schema, "memplan.error/1", "for {:?}", args);
    } else {
        prop_assert!(
            schema.starts_with("memplan.") && schema != "memplan.error/1",
            "{schema}"
        );
    }
    Ok(Some(doc))
}

/// The estimator's invariants for an accepted plan file.
fn check_estimate(file: &PlanFile) -> Result<(), TestCaseError> {
    let Ok(plan) = file.resolve() else {
        return Ok(());
    };
    let Ok(e) = estimate(&plan) else {
        return Ok(());
    };
    let m = plan.precision.master.bytes() as u128;
    let state =
        plan.model.param_count() as u128 * m * (2 + plan.optimizer.states_per_param() as u128);
    let peak = e.per_gpu.peak_allocated_bytes.get() as u128;
    if plan.offload == Offload::None {
        let average = state / plan.num_gpus as u128;
        prop_assert!(
            peak >= average,
            "peak {peak} < average rank state {average} for {file:?}"
        );
    }
    if plan.offload == Offload::Full {
        let nodes = plan.num_gpus.div_ceil(plan.gpus_per_node) as u128;
        let host = e.host.per_node_bytes.get() as u128;
        prop_assert!(
            host >= state / nodes,
            "host {host} < average node state for {file:?}"
        );
    }
    let parts = e.per_gpu.breakdown.total().get();
    prop_assert_eq!(parts, e.per_gpu.peak_allocated_bytes.get());
    prop_assert!(e.per_gpu.peak_reserved_bytes >= e.per_gpu.peak_allocated_bytes);
    prop_assert!(e.per_gpu.device_total_bytes >= e.per_gpu.peak_reserved_bytes);
    // Monotonic in batch and sequence.
    let mut bigger = plan.clone();
    bigger.batch.micro_batch_size += 1;
    if let Ok(b) = estimate(&bigger) {
        prop_assert!(
            b.per_gpu.peak_allocated_bytes >= e.per_gpu.peak_allocated_bytes,
            "peak falls from micro-batch {} to {}: {:?}",
            plan.batch.micro_batch_size,
            bigger.batch.micro_batch_size,
            file
        );
    }
    let mut longer = file.clone();
    longer.batch.seq_len = Some(plan.batch.seq_len as i64 * 2);
    if let Ok(lp) = longer.resolve() {
        if let Ok(l) = estimate(&lp) {
            prop_assert!(
                l.per_gpu.peak_allocated_bytes >= e.per_gpu.peak_allocated_bytes,
                "peak falls when the sequence doubles: {:?}",
                file
            );
        }
    }
    Ok(())
}

/// A file for this case in a folder of this test thread.
fn case_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "memplan-fuzz-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(contents).unwrap();
    path
}

// ---- value strategies -----------------------------------------------------------------

/// Integers: mostly small valid sizes, often the edges of every bound, sometimes anything.
fn int() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::sample::select(&[1i64, 1, 2, 2, 4, 8, 16, 32, 64, 128, 256][..]).prop_map(Value::from),
        2 => prop::sample::select(&[
            0i64, -1, -5, 3, 7, 1 << 24, (1 << 24) + 1, 1 << 31, 1 << 32, (1 << 32) + 1,
            1 << 53, 1 << 62, i64::MAX, i64::MIN
        ][..]).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => prop_oneof![
            Just(json!(1.5)), Just(json!(-0.0)), Just(json!(1e300)), Just(json!("8")),
            Just(json!(null)), Just(json!(true)), Just(json!([1, 2])), Just(json!({"a": 1})),
            Just(json!(18446744073709551615u64)),
        ],
    ]
}

/// A string from `valid`, or a near miss, or junk.
fn word(valid: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => prop::sample::select(valid).prop_map(Value::from),
        1 => prop::sample::select(valid).prop_map(|s| Value::from(format!(" {}X", s.to_uppercase()))),
        1 => prop_oneof![
            Just(json!("")), Just(json!("\u{0}")), Just(json!("é|\n")), Just(json!(7)),
            Just(json!(null)), Just(json!(["a"])), "[a-z:0-9-]{0,12}".prop_map(Value::from),
        ],
    ]
}

fn boolean() -> impl Strategy<Value = Value> {
    prop_oneof![8 => any::<bool>().prop_map(Value::from), 1 => Just(json!("yes")), 1 => Just(json!(1))]
}

/// An object with each of `fields` present or not.
fn object(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
    let parts: Vec<BoxedStrategy<Option<(&'static str, Value)>>> = fields
        .into_iter()
        .map(|(k, s)| prop::option::weighted(0.5, s.prop_map(move |v| (k, v))).boxed())
        .collect();
    parts
        .prop_map(|kv| {
            Value::Object(
                kv.into_iter()
                    .flatten()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect::<Map<_, _>>(),
            )
        })
        .boxed()
}

const MODELS: &[&str] = &[
    "tiny",
    "tiny-gqa",
    "tiny-tied",
    "tiny-moe",
    "small",
    "small-gqa",
    "llama3.2-1b",
    "llama3-8b",
    "mixtral-8x7b",
    "qwen1.5-moe-a2.7b",
    "llama3-70b",
];
const GPUS: &[&str] = &[
    "cpu",
    "h100-80g",
    "rtx-a6000-48g",
    "a100-40g",
    "mi300x-192g",
];
const DTYPES: &[&str] = &["bf16", "fp32", "fp16", "float32", "bfloat16"];
const AC: &[&str] = &[
    "none",
    "full",
    "selective-layer:2",
    "selective-layer:1000",
    "selective-op",
    "selective-layer:0",
];
const OFFLOAD: &[&str] = &["none", "optimizer", "full"];
const OPTIMIZERS: &[&str] = &["adamw", "adam", "sgd", "sgd-momentum"];
const SCHEDULES: &[&str] = &["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"];

fn plan_json() -> BoxedStrategy<Value> {
    let parallel = object(vec![
        ("dp_shard", int().boxed()),
        ("dp_replicate", int().boxed()),
        ("tp", int().boxed()),
        ("pp", int().boxed()),
        ("cp", int().boxed()),
        ("sp", boolean().boxed()),
        ("ep", int().boxed()),
        ("etp", int().boxed()),
        ("pp_schedule", word(SCHEDULES).boxed()),
        ("pp_virtual_stages", int().boxed()),
    ]);
    let batch = object(vec![
        ("micro_batch_size", int().boxed()),
        ("seq_len", int().boxed()),
        ("grad_accum_steps", int().boxed()),
        ("ignore_max_position", boolean().boxed()),
    ]);
    let precision = object(vec![
        ("param", word(DTYPES).boxed()),
        ("reduce", word(DTYPES).boxed()),
        ("master", word(DTYPES).boxed()),
    ]);
    let implementation = object(vec![
        ("attention", word(&["flash", "efficient", "math"]).boxed()),
        ("rmsnorm", word(&["eager", "fused"]).boxed()),
        ("gqa", word(&["repeat-kv", "native"]).boxed()),
        (
            "logits",
            word(&[
                "float-output",
                "float-output-kept",
                "float-in-loss",
                "compute-dtype",
            ])
            .boxed(),
        ),
        (
            "optimizer",
            word(&["foreach", "fused", "per-param"]).boxed(),
        ),
    ]);
    let host_ram = prop_oneof![
        word(&["256GB", "1TiB", "64GiB", "512", "1.5TB", "0GB", "2PiB"]),
        int(),
    ];
    let top = object(vec![
        ("model", word(MODELS).boxed()),
        ("gpu", word(GPUS).boxed()),
        ("num_gpus", int().boxed()),
        ("gpus_per_node", int().boxed()),
        ("host_ram", host_ram.boxed()),
        ("optimizer", word(OPTIMIZERS).boxed()),
        ("activation_checkpointing", word(AC).boxed()),
        ("offload", word(OFFLOAD).boxed()),
        ("reshard_after_forward", boolean().boxed()),
        ("float8", boolean().boxed()),
        ("compile", boolean().boxed()),
        (
            "moe_capacity_factor",
            prop_oneof![
                Just(json!(1.0)),
                Just(json!(1.25)),
                Just(json!(0.5)),
                Just(json!(1e9)),
                int()
            ]
            .boxed(),
        ),
        ("parallel", parallel),
        ("batch", batch),
        ("precision", precision),
        ("implementation", implementation),
        ("no_such_key", int().boxed()),
    ]);
    // The model key is needed for anything to be estimated: usually there.
    (top, prop::sample::select(MODELS), 0u8..10)
        .prop_map(|(mut v, m, r)| {
            if r < 8 && v.get("model").is_none() {
                v["model"] = json!(m);
            }
            v
        })
        .boxed()
}

fn format() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&["json", "json", "table", "markdown"][..])
}

fn with_format(mut args: Vec<String>, format: &str) -> Vec<String> {
    args.extend(["--format".to_string(), format.to_string()]);
    args
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn plan_json_from_the_schema(v in plan_json(), fmt in format()) {
        let text = serde_json::to_vec(&v).unwrap();
        let path = case_file("plan.json", &text);
        let args = with_format(vec!["estimate".into(), "--plan".into(), path.display().to_string()], fmt);
        let o = run(&args)?;
        let doc = check_contract(&args, &o, fmt == "json")?;
        if let Ok(file) = PlanFile::from_json(&String::from_utf8(text).unwrap()) {
            let accepted = file.resolve().ok().and_then(|p| estimate(&p).ok());
            match &accepted {
                Some(e) => prop_assert_eq!(o.code, if e.fits { 0 } else { 1 }, "{}", o.stderr),
                None => prop_assert_eq!(o.code, 2),
            }
            if let (Some(e), Some(doc)) = (&accepted, doc) {
                prop_assert_eq!(doc["per_gpu"]["peak_allocated_bytes"].as_u64(), Some(e.per_gpu.peak_allocated_bytes.get()));
            }
            check_estimate(&file)?;
        } else {
            prop_assert_eq!(o.code, 2);
        }
    }

    #[test]
    fn plan_bytes(
        base in plan_json(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 0..6),
        raw in prop::collection::vec(any::<u8>(), 0..64),
        use_raw in 0u8..5,
    ) {
        let bytes = if use_raw == 0 {
            raw
        } else {
            let mut b = serde_json::to_vec(&base).unwrap();
            for (at, op, byte) in edits {
                if b.is_empty() { break; }
                let i = at.index(b.len());
                match op {
                    0 => b[i] = byte,
                    1 => b.insert(i, byte),
                    _ => { b.truncate(i); }
                }
            }
            b
        };
        let path = case_file("bytes.json", &bytes);
        let args = with_format(vec!["estimate".into(), "--plan".into(), path.display().to_string()], "json");
        let o = run(&args)?;
        check_contract(&args, &o, true)?;
        if let Ok(text) = std::str::from_utf8(&bytes) {
            if let Ok(file) = PlanFile::from_json(text) {
                check_estimate(&file)?;
            }
        }
    }

    #[test]
    fn hf_configs(cfg in hf_config(), gpu in prop::sample::select(GPUS), gpus in prop::sample::select(&[1i64, 2, 8][..])) {
        let path = case_file("config.json", &serde_json::to_vec(&cfg).unwrap());
        let args: Vec<String> = [
            "estimate", "--model", &path.display().to_string(), "--gpu", gpu,
            "--num-gpus", &gpus.to_string(), "--seq-len", "64", "--format", "json",
        ].iter().map(|s| s.to_string()).collect();
        let o = run(&args)?;
        check_contract(&args, &o, true)?;
        let file = PlanFile {
            model: Some(path.display().to_string()),
            gpu: Some(gpu.to_string()),
            num_gpus: Some(gpus),
            batch: memplan::plan::BatchFile { seq_len: Some(64), ..Default::default() },
            ..PlanFile::default()
        };
        check_estimate(&file)?;
    }

    #[test]
    fn torchtitan_tomls(text in torchtitan_toml(), gpus in prop::sample::select(&[1i64, 2, 8, 16, 64, 3][..]), fmt in format()) {
        let path = case_file("train.toml", text.as_bytes());
        let args = with_format(vec![
            "estimate".into(), "--torchtitan".into(), path.display().to_string(),
            "--num-gpus".into(), gpus.to_string(), "--gpu".into(), "h100-80g".into(),
        ], fmt);
        let o = run(&args)?;
        check_contract(&args, &o, fmt == "json")?;
    }

    #[test]
    fn flag_vectors(args in flags(), fmt in format()) {
        let args = with_format(args, fmt);
        let o = run(&args)?;
        check_contract(&args, &o, fmt == "json")?;
    }
}

proptest! {
    // A trace walks every block of the step and the allocator simulation replays it: a tenth
    // of the cases (most flag vectors are refused before any estimate) keeps this target
    // within CI's time.
    // Flag vectors for other commands are rejected (about two in five): the reject budget
    // grows with the cases, or a larger MEMPLAN_FUZZ_CASES aborts on proptest's default 1,024.
    #![proptest_config(Config {
        cases: (cases() / 10).max(1),
        max_global_rejects: cases().max(1024),
        ..config()
    })]

    /// `timeline --format json -o -` on the plans of the flag target: the contract (exit code,
    /// one JSON document), a consistent trace, and at its phase points the estimate's figures
    /// of the same flags.
    #[test]
    fn timeline_traces(args in flags()) {
        prop_assume!(args[0] == "estimate");
        let plan_flags = &args[1..];
        let mut t_args: Vec<String> = vec!["timeline".into()];
        t_args.extend(plan_flags.iter().cloned());
        t_args.extend(["--format", "json", "-o", "-"].map(String::from));
        let o = run(&t_args)?;
        let doc = check_contract(&t_args, &o, true)?.unwrap_or_default();
        if o.code == 2 {
            return Ok(());
        }
        prop_assert_eq!(doc["schema"].as_str(), Some("memplan.trace/1"));
        let trace: memplan::trace::Trace = serde_json::from_value(doc)
            .map_err(|e| TestCaseError::fail(format!("not a trace: {e}")))?;
        let points = trace.points().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut e_args: Vec<String> = vec!["estimate".into()];
        e_args.extend(plan_flags.iter().cloned());
        let e_args = with_format(e_args, "json");
        let est = run(&e_args)?;
        let est: Value = serde_json::from_str(&est.stdout).unwrap();
        let timeline = est["per_gpu"]["timeline"].as_array().unwrap();
        prop_assert_eq!(points.len(), timeline.len());
        for ((_, sum), want) in points.iter().zip(timeline) {
            prop_assert_eq!(Some(*sum), want["allocated_bytes"].as_u64(), "{:?}", t_args);
        }
        prop_assert_eq!(
            Some(trace.peak().unwrap().0),
            est["per_gpu"]["peak_allocated_bytes"].as_u64()
        );
    }
}

// ---- HF configs ----------------------------------------------------------------------

fn hf_config() -> BoxedStrategy<Value> {
    let types: &'static [&'static str] = &[
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "qwen2_moe",
        "mixtral",
        "gemma2",
        "gemma3_text",
        "phi3",
        "gpt_neox",
        "bert",
        "gpt2",
        "t5",
        "deepseek_v3",
    ];
    let size = || {
        prop_oneof![
            8 => prop::sample::select(&[1i64, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096][..]).prop_map(Value::from),
            2 => int(),
        ]
        .boxed()
    };
    let cfg = object(vec![
        ("model_type", word(types).boxed()),
        ("hidden_size", size()),
        ("num_hidden_layers", size()),
        ("num_attention_heads", size()),
        ("num_key_value_heads", size()),
        ("head_dim", size()),
        ("intermediate_size", size()),
        ("vocab_size", size()),
        ("max_position_embeddings", size()),
        ("tie_word_embeddings", boolean().boxed()),
        ("attention_bias", boolean().boxed()),
        ("mlp_bias", boolean().boxed()),
        ("num_local_experts", size()),
        ("num_experts", size()),
        ("n_routed_experts", size()),
        ("num_experts_per_tok", size()),
        ("moe_intermediate_size", size()),
        ("shared_expert_intermediate_size", size()),
        ("n_shared_experts", size()),
        ("first_k_dense_replace", size()),
        ("moe_layer_freq", size()),
        ("decoder_sparse_step", size()),
        ("kv_lora_rank", size()),
        (
            "partial_rotary_factor",
            prop_oneof![Just(json!(0.25)), Just(json!(1.0))].boxed(),
        ),
        ("use_parallel_residual", boolean().boxed()),
    ]);
    // Mostly a model that has every required key, so the families' arithmetic is reached.
    (cfg, prop::sample::select(types), 0u8..10)
        .prop_map(|(mut v, t, r)| {
            if r < 7 {
                let base = json!({
                    "model_type": t, "hidden_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 256,
                    "max_position_embeddings": 4096, "architectures": [format!("{t}ForCausalLM")],
                });
                for (k, x) in base.as_object().unwrap() {
                    if v.get(k).is_none() {
                        v[k] = x.clone();
                    }
                }
            }
            v
        })
        .boxed()
}

// ---- torchtitan TOMLs ----------------------------------------------------------------

/// A TOML value as text.
fn toml_value() -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::sample::select(&["1", "2", "4", "8", "-1", "16"][..]).prop_map(str::to_string),
        2 => prop::sample::select(&["0", "-5", "16777217", "9223372036854775807", "3"][..]).prop_map(str::to_string),
        2 => prop::sample::select(&[
            "\"bfloat16\"", "\"float32\"", "\"1F1B\"", "\"GPipe\"", "\"Interleaved1F1B\"",
            "\"op\"", "\"2\"", "\"full\"", "\"selective\"", "\"none\"", "\"fused\"", "\"AdamW\"",
            "\"always\"", "\"never\"", "\"default\"", "\"float8\"",
        ][..]).prop_map(str::to_string),
        1 => prop::sample::select(&["true", "false", "1.5", "[1, 2]", "\"x\"", "{ a = 1 }", "[\"float8\"]"][..]).prop_map(str::to_string),
    ]
    .boxed()
}

fn torchtitan_toml() -> BoxedStrategy<String> {
    const KEYS: &[(&str, &str)] = &[
        ("model", "name"),
        ("model", "flavor"),
        ("model", "converters"),
        ("training", "local_batch_size"),
        ("training", "batch_size"),
        ("training", "local_batchsize"),
        ("training", "global_batch_size"),
        ("training", "seq_len"),
        ("training", "gradient_accumulation_steps"),
        ("training", "mixed_precision_param"),
        ("training", "mixed_precision_reduce"),
        ("training", "dtype"),
        ("training", "enable_cpu_offload"),
        ("training", "compile"),
        ("training", "steps"),
        ("training", "data_parallel_shard_degree"),
        ("training", "tensor_parallel_degree"),
        ("parallelism", "data_parallel_replicate_degree"),
        ("parallelism", "data_parallel_shard_degree"),
        ("parallelism", "tensor_parallel_degree"),
        ("parallelism", "pipeline_parallel_degree"),
        ("parallelism", "context_parallel_degree"),
        ("parallelism", "expert_parallel_degree"),
        ("parallelism", "pipeline_parallel_schedule"),
        ("parallelism", "pipeline_parallel_microbatch_size"),
        ("parallelism", "pipeline_parallel_layers_per_stage"),
        ("parallelism", "fsdp_reshard_after_forward"),
        ("experimental", "pipeline_parallel_degree"),
        ("experimental", "context_parallel_degree"),
        ("experimental", "pipeline_parallel_microbatches"),
        ("activation_checkpoint", "mode"),
        ("activation_checkpoint", "selective_ac_option"),
        ("float8", "enable_float8_linear"),
        ("compile", "enable"),
        ("optimizer", "name"),
        ("optimizer", "implementation"),
        ("optimizer", "fused"),
        ("optimizer", "lr"),
    ];
    let names = prop_oneof![
        4 => Just(("llama3", "8B")), 1 => Just(("llama3", "70B")), 1 => Just(("llama2", "7B")),
        1 => Just(("llama3", "debugmodel")), 1 => Just(("gpt", "8B")),
    ];
    (
        names,
        prop::collection::vec((prop::sample::select(KEYS), toml_value()), 0..10),
        0u8..20,
    )
        .prop_map(|((name, flavor), kvs, junk)| {
            let mut sections: Vec<(&str, Vec<String>)> = vec![(
                "model",
                vec![
                    format!("name = \"{name}\""),
                    format!("flavor = \"{flavor}\""),
                ],
            )];
            for ((section, key), value) in kvs {
                let line = format!("{key} = {value}");
                match sections.iter_mut().find(|(s, _)| *s == section) {
                    Some((_, lines)) => {
                        if !lines.iter().any(|l| l.starts_with(&format!("{key} ="))) {
                            lines.push(line);
                        }
                    }
                    None => sections.push((section, vec![line])),
                }
            }
            let mut text: String = sections
                .iter()
                .map(|(s, lines)| format!("[{s}]\n{}\n", lines.join("\n")))
                .collect();
            match junk {
                0 => text.push_str("[training\n"),
                1 => text.insert(0, '\u{feff}'),
                2 => text.push_str("training = 3\n"),
                _ => {}
            }
            text
        })
        .boxed()
}

// ---- flag vectors --------------------------------------------------------------------

fn flags() -> BoxedStrategy<Vec<String>> {
    const FLAGS: &[(&str, &[&str])] = &[
        (
            "--model",
            &[
                "tiny",
                "tiny-moe",
                "small",
                "llama3-8b",
                "mixtral-8x7b",
                "nope",
                "tests/data/hf",
            ],
        ),
        ("--gpu", &["cpu", "h100-80g", "rtx4090-24g", "nope"]),
        (
            "--num-gpus",
            &[
                "1",
                "2",
                "4",
                "8",
                "16",
                "0",
                "-3",
                "3",
                "16777216",
                "99999999999",
            ],
        ),
        ("--gpus-per-node", &["1", "2", "8", "0"]),
        ("--host-ram", &["256GB", "1TiB", "512", "-1GB", "1e3GB", ""]),
        ("--dp-shard", &["-1", "1", "2", "4", "0", "-2"]),
        ("--dp-replicate", &["1", "2", "0"]),
        ("--tp", &["1", "2", "4", "8", "16", "3", "-1"]),
        ("--pp", &["1", "2", "4", "64"]),
        ("--cp", &["1", "2", "4"]),
        ("--sp", &["true", "false", "maybe"]),
        ("--ep", &["1", "2", "4"]),
        ("--etp", &["1", "2"]),
        (
            "--pp-schedule",
            &["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "x"],
        ),
        ("--pp-virtual-stages", &["1", "2", "0"]),
        (
            "--micro-batch-size",
            &["1", "2", "8", "0", "-5", "16777216", "16777217"],
        ),
        (
            "--seq-len",
            &["64", "128", "2048", "8192", "0", "16777216", "-1"],
        ),
        ("--grad-accum-steps", &["1", "4", "0"]),
        ("--param-dtype", &["bf16", "fp32", "fp8"]),
        ("--reduce-dtype", &["bf16", "fp32"]),
        ("--master-dtype", &["fp32", "bf16", "fp16"]),
        ("--optimizer", &["adamw", "sgd", "lion"]),
        (
            "--ac",
            &[
                "none",
                "full",
                "selective-layer:2",
                "selective-op",
                "selective-layer:0",
            ],
        ),
        ("--offload", &["none", "optimizer", "full", "disk"]),
        ("--attention", &["flash", "math"]),
        ("--rmsnorm", &["eager", "fused"]),
        ("--gqa", &["repeat-kv", "native"]),
        ("--logits", &["float-output", "compute-dtype"]),
        ("--optimizer-impl", &["foreach", "fused", "per-param"]),
        (
            "--example",
            &["seed-8b-2x48g", "seed-8b-2x48g-offload", "nope"],
        ),
        (
            "--plan",
            &["tests/data/bad.json", "/nonexistent.json", "tests/data"],
        ),
    ];
    const SWITCHES: &[&str] = &[
        "--ignore-max-position",
        "--float8",
        "--compile",
        "--no-reshard-after-forward",
        "--bogus",
    ];
    let pair = (prop::sample::select(FLAGS), any::<prop::sample::Index>()).prop_map(
        |((flag, values), i)| vec![flag.to_string(), values[i.index(values.len())].to_string()],
    );
    let switch = prop::sample::select(SWITCHES).prop_map(|s| vec![s.to_string()]);
    let item = prop_oneof![8 => pair, 1 => switch];
    let command = prop_oneof![
        6 => Just(vec!["estimate"]),
        1 => Just(vec!["search", "--max-micro-batch", "8"]),
        1 => Just(vec!["search", "--max-batch"]),
        1 => Just(vec!["compare", "example:seed-8b-2x48g", "example:seed-8b-2x48g-offload"]),
        1 => Just(vec!["profiles"]),
    ];
    (command, prop::collection::vec(item, 0..8))
        .prop_map(|(cmd, items)| {
            let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
            let plan_cmd = matches!(cmd[0], "estimate" | "search");
            let search = cmd[0] == "search";
            for it in items {
                if !plan_cmd {
                    continue;
                }
                // Search walks every layout of the world size: keep it to small worlds and
                // models so that 10,000 cases stay within CI's time.
                if search && matches!(it[0].as_str(), "--num-gpus" | "--model" | "--example") {
                    continue;
                }
                args.extend(it);
            }
            if search {
                args.extend(
                    ["--model", "tiny", "--gpu", "cpu", "--num-gpus", "4"].map(String::from),
                );
            }
            args
        })
        .boxed()
}

/// The real binary, on a sample of flag vectors: a panic there would exit 101 and print a
/// backtrace, which the in-process harness cannot see.
#[test]
fn the_binary_keeps_the_contract_on_a_sample() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = (flags(), format());
    for _ in 0..200 {
        let (args, fmt) = strategy.new_tree(&mut runner).unwrap().current();
        let args = with_format(args, fmt);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_memplan"))
            .args(&args)
            .output()
            .unwrap();
        let code = out.status.code().expect("exited");
        assert!(
            code <= 2,
            "exit {code} for {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if fmt == "json" {
            let doc: Result<Value, _> = serde_json::from_slice(&out.stdout);
            assert!(doc.is_ok(), "not one JSON document for {args:?}");
        }
    }
}
