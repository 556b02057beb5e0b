//! torchtitan job configs read as plans: fixtures shaped like torchtitan's shipped Llama
//! presets in the 2024 and 2025 layouts (tests/data/torchtitan/), the plans they become, the
//! degrees those plans resolve to, and the errors for files memplan cannot map.

use std::path::{Path, PathBuf};

use memplan::error::Kind;
use memplan::plan::{Checkpointing, OptimizerImpl, PlanFile, PpSchedule};
use memplan::torchtitan::{check_world_size, from_toml_str, read, Job};
use proptest::prelude::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/torchtitan")
        .join(name)
}

fn load(name: &str) -> PlanFile {
    read(&fixture(name)).unwrap().plan
}

fn with_gpus(mut plan: PlanFile, n: i64) -> PlanFile {
    plan.num_gpus = Some(n);
    plan
}

fn error(text: &str) -> String {
    from_toml_str(text, "train.toml").unwrap_err().to_string()
}

const LLAMA3_8B: &str = "[model]\nname = \"llama3\"\nflavor = \"8B\"\n";

#[test]
fn reads_the_2024_llama3_8b_layout() {
    let p = load("llama3_8b_2024.toml");
    assert_eq!(p.model.as_deref(), Some("llama3-8b"));
    assert_eq!(p.num_gpus, None);
    assert_eq!(p.gpu, None);
    assert_eq!(p.batch.micro_batch_size, Some(1));
    assert_eq!(p.batch.seq_len, Some(8192));
    assert_eq!(p.batch.grad_accum_steps, None);
    assert_eq!(p.batch.ignore_max_position, Some(true));
    assert_eq!(p.parallel.dp_replicate, Some(1));
    assert_eq!(p.parallel.dp_shard, Some(-1));
    assert_eq!(p.parallel.tp, Some(1));
    assert_eq!(p.parallel.pp, Some(1));
    assert_eq!(p.parallel.cp, Some(1));
    assert_eq!(p.parallel.pp_schedule, None);
    assert_eq!(p.activation_checkpointing.as_deref(), Some("selective-op"));
    assert_eq!(p.float8, Some(false));
    assert_eq!(p.compile, Some(false));
    assert_eq!(p.optimizer.as_deref(), Some("adamw"));
    assert_eq!(p.implementation.optimizer, None);
    assert_eq!(p.reshard_after_forward, None);
    assert_eq!(p.offload, None);
}

#[test]
fn llama3_8b_on_8_gpus_shards_over_all_8() {
    let plan = with_gpus(load("llama3_8b_2024.toml"), 8).resolve().unwrap();
    assert_eq!(plan.model.name, "llama3-8b");
    assert_eq!(plan.num_gpus, 8);
    assert_eq!(plan.parallel.dp_shard, 8);
    assert_eq!(plan.parallel.tp, 1);
    assert_eq!(plan.parallel.pp, 1);
    assert_eq!(plan.batch.micro_batch_size, 1);
    assert_eq!(plan.batch.seq_len, 8192);
    assert_eq!(plan.batch.grad_accum_steps, 1);
    assert_eq!(plan.activation_checkpointing, Checkpointing::SelectiveOp);
    assert!(!plan.float8 && !plan.compile);
}

#[test]
fn reads_the_2025_llama3_70b_layout() {
    let p = load("llama3_70b_2025.toml");
    assert_eq!(p.model.as_deref(), Some("llama3-70b"));
    assert_eq!(p.batch.micro_batch_size, Some(8));
    assert_eq!(p.batch.seq_len, Some(8192));
    assert_eq!(p.parallel.tp, Some(8));
    assert_eq!(p.parallel.dp_shard, Some(-1));
    assert_eq!(p.activation_checkpointing.as_deref(), Some("full"));
    assert_eq!(p.compile, Some(false));
    // The converters line is commented out and [quantize.linear.float8] alone enables nothing.
    assert_eq!(p.float8, None);

    let plan = with_gpus(p, 64).resolve().unwrap();
    assert_eq!(plan.parallel.dp_shard, 8);
    assert_eq!(plan.parallel.tp, 8);
    assert!(
        plan.parallel.sp,
        "torchtitan runs sequence parallel with TP"
    );
    assert_eq!(plan.activation_checkpointing, Checkpointing::Full);
}

#[test]
fn reads_the_2025_llama3_405b_pipeline_layout() {
    let p = load("llama3_405b_2025_pp.toml");
    assert_eq!(p.model.as_deref(), Some("llama3.1-405b"));
    assert_eq!(p.float8, Some(true));
    assert_eq!(p.compile, Some(true));
    assert_eq!(p.parallel.dp_shard, Some(2));
    assert_eq!(p.parallel.tp, Some(8));
    assert_eq!(p.parallel.pp, Some(8));
    assert_eq!(p.parallel.pp_schedule.as_deref(), Some("interleaved-1f1b"));
    // (126 layers + 1 + 1) / 8 layers per stage = 16 stages over 8 ranks.
    assert_eq!(p.parallel.pp_virtual_stages, Some(2));
    // Pipeline micro-batches of 2 from a local batch of 16: 8 per step, and
    // 64 / (16 x dp_shard 2) = 2 accumulation steps of them.
    assert_eq!(p.batch.micro_batch_size, Some(2));
    assert_eq!(p.batch.grad_accum_steps, Some(16));
    // "default" does not reshard under PP.
    assert_eq!(p.reshard_after_forward, Some(false));
    assert_eq!(p.precision.param.as_deref(), Some("bf16"));
    assert_eq!(p.precision.reduce.as_deref(), Some("fp32"));
    assert_eq!(p.implementation.optimizer.as_deref(), Some("fused"));

    let plan = with_gpus(p, 128).resolve().unwrap();
    assert_eq!(
        (plan.parallel.dp_shard, plan.parallel.tp, plan.parallel.pp),
        (2, 8, 8)
    );
    assert_eq!(plan.parallel.pp_schedule, PpSchedule::Interleaved1F1B);
    assert_eq!(plan.parallel.pp_virtual_stages, 2);
    assert_eq!(plan.batch.grad_accum_steps, 16);
    assert!(plan.float8 && plan.compile && !plan.reshard_after_forward);
    assert_eq!(plan.implementation.optimizer, OptimizerImpl::Fused);
}

#[test]
fn reads_the_2024_pipeline_keys_under_experimental() {
    let p = load("llama2_7b_2024_pp.toml");
    assert_eq!(p.model.as_deref(), Some("llama2-7b"));
    assert_eq!(p.parallel.tp, Some(2));
    assert_eq!(p.parallel.pp, Some(2));
    assert_eq!(p.parallel.pp_schedule.as_deref(), Some("gpipe"));
    assert_eq!(p.parallel.pp_virtual_stages, None);
    // 4 micro-batches of a batch of 8.
    assert_eq!(p.batch.micro_batch_size, Some(2));
    assert_eq!(p.batch.grad_accum_steps, Some(4));
    assert_eq!(
        p.activation_checkpointing.as_deref(),
        Some("selective-layer:2")
    );
    assert_eq!(p.implementation.optimizer.as_deref(), Some("fused"));
    assert_eq!(p.offload.as_deref(), Some("none"));
    assert_eq!(p.compile, Some(true));

    let plan = with_gpus(p, 16).resolve().unwrap();
    assert_eq!(plan.parallel.dp_shard, 4);
    assert_eq!(plan.parallel.pp_schedule, PpSchedule::GPipe);
    assert_eq!(
        plan.activation_checkpointing,
        Checkpointing::SelectiveLayer(2)
    );
    assert!(!plan.reshard_after_forward);
}

#[test]
fn every_fixture_resolves_with_the_cli_supplying_the_world_size() {
    for (name, gpus) in [
        ("llama3_8b_2024.toml", 64),
        ("llama3_70b_2025.toml", 8),
        ("llama3_405b_2025_pp.toml", 128),
        ("llama2_7b_2024_pp.toml", 4),
    ] {
        let plan = with_gpus(load(name), gpus).resolve();
        assert!(plan.is_ok(), "{name}: {:?}", plan.err());
    }
}

#[test]
fn global_batch_gives_accumulation_steps_when_the_shard_degree_is_known() {
    let p = from_toml_str(
        &format!(
            "{LLAMA3_8B}[training]\nlocal_batch_size = 2\nglobal_batch_size = 32\n\
             [parallelism]\ndata_parallel_replicate_degree = 2\ndata_parallel_shard_degree = 4\n"
        ),
        "train.toml",
    )
    .unwrap()
    .plan;
    assert_eq!(p.batch.micro_batch_size, Some(2));
    assert_eq!(p.batch.grad_accum_steps, Some(2));

    // With dp_shard -1 the world size decides the data-parallel degree: left unset.
    let p = from_toml_str(
        &format!("{LLAMA3_8B}[training]\nlocal_batch_size = 2\nglobal_batch_size = 32\n"),
        "train.toml",
    )
    .unwrap()
    .plan;
    assert_eq!(p.batch.grad_accum_steps, None);

    let e = error(&format!(
        "{LLAMA3_8B}[training]\nlocal_batch_size = 3\nglobal_batch_size = 32\n\
         [parallelism]\ndata_parallel_shard_degree = 4\n"
    ));
    assert_eq!(
        e,
        "invalid training.global_batch_size: got 32, expected a multiple of local_batch_size x \
         data_parallel_replicate_degree x data_parallel_shard_degree (12)"
    );
}

#[test]
fn explicit_gradient_accumulation_steps_are_taken() {
    let p = from_toml_str(
        &format!("{LLAMA3_8B}[training]\ngradient_accumulation_steps = 4\n"),
        "train.toml",
    )
    .unwrap()
    .plan;
    assert_eq!(p.batch.grad_accum_steps, Some(4));
}

#[test]
fn pipeline_micro_batch_size_defaults_to_one_in_the_2025_layout() {
    let p = from_toml_str(
        &format!(
            "{LLAMA3_8B}[training]\nlocal_batch_size = 4\n[parallelism]\npipeline_parallel_degree = 2\n"
        ),
        "train.toml",
    )
    .unwrap()
        .plan;
    assert_eq!(p.batch.micro_batch_size, Some(1));
    assert_eq!(p.batch.grad_accum_steps, Some(4));
    assert_eq!(p.parallel.pp_schedule.as_deref(), Some("1f1b"));
    assert_eq!(p.reshard_after_forward, Some(false));
}

#[test]
fn zero_bubble_schedules_map_to_zb_h1() {
    for name in ["ZBVZeroBubble", "InterleavedZeroBubble"] {
        let p = from_toml_str(
            &format!(
                "{LLAMA3_8B}[parallelism]\npipeline_parallel_degree = 4\n\
                 pipeline_parallel_schedule = \"{name}\"\n"
            ),
            "train.toml",
        )
        .unwrap()
        .plan;
        assert_eq!(p.parallel.pp_schedule.as_deref(), Some("zb-h1"), "{name}");
    }
}

#[test]
fn interleaved_schedule_takes_stages_from_split_points() {
    let p = from_toml_str(
        &format!(
            "{LLAMA3_8B}[experimental]\npipeline_parallel_degree = 2\n\
             pipeline_parallel_schedule = \"Interleaved1F1B\"\n\
             pipeline_parallel_split_points = [\"layers.8\", \"layers.16\", \"layers.24\"]\n"
        ),
        "train.toml",
    )
    .unwrap()
    .plan;
    assert_eq!(p.parallel.pp_virtual_stages, Some(2));
    // 2024 default: as many micro-batches as pipeline ranks.
    assert_eq!(p.batch.grad_accum_steps, Some(2));
    assert_eq!(p.batch.micro_batch_size, Some(4));
}

#[test]
fn reshard_policy_is_read() {
    let read = |policy: &str| {
        from_toml_str(
            &format!("{LLAMA3_8B}[parallelism]\nfsdp_reshard_after_forward = \"{policy}\"\n"),
            "train.toml",
        )
        .unwrap()
        .plan
        .reshard_after_forward
    };
    assert_eq!(read("always"), Some(true));
    assert_eq!(read("never"), Some(false));
    assert_eq!(read("default"), None);
}

#[test]
fn full_bf16_training_and_cpu_offload_are_read() {
    let p = from_toml_str(
        &format!(
            "{LLAMA3_8B}[training]\ndtype = \"bfloat16\"\nmixed_precision_param = \"float32\"\n\
             enable_cpu_offload = true\n"
        ),
        "train.toml",
    )
    .unwrap()
    .plan;
    assert_eq!(p.precision.master.as_deref(), Some("bf16"));
    assert_eq!(p.precision.param.as_deref(), Some("fp32"));
    assert_eq!(p.offload.as_deref(), Some("full"));
}

#[test]
fn float8_comes_from_converters_of_either_naming() {
    for conv in ["float8", "quantize.linear.float8"] {
        let p = from_toml_str(
            &format!("{LLAMA3_8B}converters = [\"{conv}\"]\n"),
            "train.toml",
        )
        .unwrap()
        .plan;
        assert_eq!(p.float8, Some(true), "{conv}");
    }
    let p = from_toml_str(
        &format!("{LLAMA3_8B}[float8]\nenable_float8_linear = true\n"),
        "train.toml",
    )
    .unwrap()
    .plan;
    assert_eq!(p.float8, Some(true));
}

#[test]
fn optimizer_implementations_map_to_memplan_names() {
    for (tt, ours) in [
        ("fused", "fused"),
        ("foreach", "foreach"),
        ("for-loop", "per-param"),
    ] {
        let p = from_toml_str(
            &format!("{LLAMA3_8B}[optimizer]\nname = \"Adam\"\nimplementation = \"{tt}\"\n"),
            "train.toml",
        )
        .unwrap()
        .plan;
        assert_eq!(p.implementation.optimizer.as_deref(), Some(ours));
        assert_eq!(p.optimizer.as_deref(), Some("adam"));
    }
}

#[test]
fn rejects_malformed_toml_with_file_and_line() {
    let e = from_toml_str(
        "[model]\nname = \"llama3\"\nflavor = \"8B\"\n[training]\nseq_len = = 8192\n",
        "train.toml",
    )
    .unwrap_err();
    assert_eq!(e.kind(), Kind::Input);
    let e = e.to_string();
    assert!(
        e.starts_with("torchtitan config train.toml: malformed TOML at line 5 column"),
        "{e}"
    );
}

#[test]
fn malformed_file_is_reported_with_its_path() {
    let dir = std::env::temp_dir().join(format!("memplan-tt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.toml");
    std::fs::write(&path, "[training]\nseq_len = 8192\n[training]\n").unwrap();
    let e = read(&path).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        e.contains(&path.display().to_string()) && e.contains("line 3"),
        "{e}"
    );
}

#[test]
fn missing_file_is_an_io_error() {
    let e = read(Path::new("/nonexistent/train.toml")).unwrap_err();
    assert_eq!(e.kind(), Kind::Io);
}

#[test]
fn rejects_a_key_of_the_wrong_type_naming_it() {
    let e = error(&format!(
        "{LLAMA3_8B}[training]\nlocal_batch_size = 2\nseq_len = \"8192\"\n"
    ));
    assert_eq!(
        e,
        "invalid training.seq_len: got \"8192\" (train.toml line 6), expected an integer"
    );
    let e = error(&format!(
        "{LLAMA3_8B}[training]\ntensor_parallel_degree = \"2\"\n"
    ));
    assert_eq!(
        e,
        "invalid training.tensor_parallel_degree: got \"2\" (train.toml line 5), expected an integer"
    );
    let e = error(&format!("{LLAMA3_8B}[compile]\nenable = 1\n"));
    assert_eq!(
        e,
        "invalid compile.enable: got 1 (train.toml line 5), expected a boolean"
    );
}

#[test]
fn rejects_the_debug_flavor_listing_the_known_ones() {
    let e = error("[model]\nname = \"llama3\"\nflavor = \"debugmodel\"\n");
    assert!(
        e.starts_with("invalid model.flavor: got \"debugmodel\""),
        "{e}"
    );
    for known in ["8B", "70B", "405B"] {
        assert!(e.contains(known), "{e}");
    }
}

#[test]
fn rejects_an_unknown_model_listing_the_known_ones() {
    let e = error("[model]\nname = \"deepseek_v3\"\nflavor = \"16B\"\n");
    assert!(
        e.starts_with("invalid model.name: got \"deepseek_v3\""),
        "{e}"
    );
    assert!(e.contains("llama3 8B") && e.contains("llama2 13B"), "{e}");
    let e = error("[model]\nname = \"llama3\"\n");
    assert!(e.starts_with("invalid model.flavor"), "{e}");
}

#[test]
fn rejects_a_selective_ac_option_that_is_neither_op_nor_a_number() {
    let e = error(&format!(
        "{LLAMA3_8B}[activation_checkpoint]\nmode = \"selective\"\nselective_ac_option = \"x\"\n"
    ));
    assert_eq!(
        e,
        "invalid activation_checkpoint.selective_ac_option: got \"x\", expected \"op\" or a \
         layer frequency such as \"2\""
    );
}

#[test]
fn rejects_values_memplan_cannot_map_naming_the_key() {
    for (toml, key) in [
        (
            "[parallelism]\npipeline_parallel_degree = 2\npipeline_parallel_schedule = \"DualPipeV\"\n",
            "parallelism.pipeline_parallel_schedule",
        ),
        (
            "[parallelism]\ndata_parallel_shard_degree = 0\n",
            "parallelism.data_parallel_shard_degree",
        ),
        (
            "[training]\ntensor_parallel_degree = -2\n",
            "training.tensor_parallel_degree",
        ),
        (
            "[activation_checkpoint]\nmode = \"memory_budget\"\n",
            "activation_checkpoint.mode",
        ),
        (
            "[training]\nmixed_precision_param = \"float16\"\n",
            "training.mixed_precision_param",
        ),
        ("[optimizer]\nname = \"Muon\"\n", "optimizer.name"),
        (
            "[parallelism]\nfsdp_reshard_after_forward = \"sometimes\"\n",
            "parallelism.fsdp_reshard_after_forward",
        ),
        (
            "[training]\nlocal_batch_size = 6\n[parallelism]\npipeline_parallel_degree = 2\n\
             pipeline_parallel_microbatch_size = 4\n",
            "parallelism.pipeline_parallel_microbatch_size",
        ),
    ] {
        let e = error(&format!("{LLAMA3_8B}{toml}"));
        assert!(e.starts_with(&format!("invalid {key}: got ")), "{key}: {e}");
    }
}

#[test]
fn ignores_sections_and_keys_memplan_does_not_read() {
    let p = from_toml_str(
        &format!(
            "[fault_tolerance]\nenable = \"yes\"\n{LLAMA3_8B}hf_assets_path = 3\n\
             [training]\nseq_len = 4096\ndataset = [1, 2]\n[training.dataloader]\nnum_workers = 2\n"
        ),
        "train.toml",
    )
    .unwrap()
    .plan;
    assert_eq!(p.batch.seq_len, Some(4096));
}

#[test]
fn never_panics_on_extreme_integers() {
    for v in [i64::MIN, -1, 0, 1, 1 << 24, (1 << 24) + 1, i64::MAX] {
        for key in [
            "local_batch_size",
            "global_batch_size",
            "seq_len",
            "gradient_accumulation_steps",
            "data_parallel_shard_degree",
            "data_parallel_replicate_degree",
        ] {
            let _ = from_toml_str(
                &format!(
                    "{LLAMA3_8B}[training]\n{key} = {v}\n[parallelism]\n\
                     data_parallel_shard_degree = 16777216\ndata_parallel_replicate_degree = 16777216\n\
                     pipeline_parallel_degree = 2\npipeline_parallel_layers_per_stage = {}\n\
                     pipeline_parallel_schedule = \"Interleaved1F1B\"\n",
                    v.max(1)
                ),
                "train.toml",
            );
        }
    }
}

const KEYS: &[(&str, &str)] = &[
    ("training", "local_batch_size"),
    ("training", "batch_size"),
    ("training", "global_batch_size"),
    ("training", "gradient_accumulation_steps"),
    ("training", "seq_len"),
    ("training", "data_parallel_shard_degree"),
    ("training", "mixed_precision_param"),
    ("training", "dtype"),
    ("training", "compile"),
    ("parallelism", "data_parallel_replicate_degree"),
    ("parallelism", "data_parallel_shard_degree"),
    ("parallelism", "tensor_parallel_degree"),
    ("parallelism", "pipeline_parallel_degree"),
    ("parallelism", "context_parallel_degree"),
    ("parallelism", "pipeline_parallel_schedule"),
    ("parallelism", "pipeline_parallel_microbatch_size"),
    ("parallelism", "pipeline_parallel_layers_per_stage"),
    ("parallelism", "pipeline_parallel_split_points"),
    ("parallelism", "fsdp_reshard_after_forward"),
    ("experimental", "pipeline_parallel_degree"),
    ("experimental", "pipeline_parallel_microbatches"),
    ("activation_checkpoint", "mode"),
    ("activation_checkpoint", "selective_ac_option"),
    ("model", "converters"),
    ("optimizer", "implementation"),
];

fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        (-3i64..20).prop_map(|v| v.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        prop::sample::select(vec![
            "\"op\"",
            "\"2\"",
            "\"0\"",
            "\"x\"",
            "\"Interleaved1F1B\"",
            "\"GPipe\"",
            "\"bfloat16\"",
            "\"float8\"",
            "[\"float8\"]",
            "[\"layers.4\"]",
            "\"never\"",
            "\"fused\"",
            "1.5",
            "[1, 2]",
            "{ a = 1 }",
        ])
        .prop_map(str::to_string),
    ]
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
        let _ = from_toml_str(&text, "train.toml");
    }

    /// Any value of any key either maps or is rejected; neither reading nor resolving the
    /// plan panics, and every rejection is an input error.
    #[test]
    fn never_panics_on_any_value_of_the_keys_it_reads(
        picks in prop::collection::vec((prop::sample::select(KEYS), toml_value()), 1..6),
        gpus in 1i64..300,
    ) {
        let mut sections: Vec<(&str, Vec<String>)> = Vec::new();
        for ((section, key), value) in &picks {
            let line = format!("{key} = {value}");
            match sections.iter_mut().find(|(s, _)| s == section) {
                Some((_, lines)) if !lines.iter().any(|l| l.starts_with(&format!("{key} ="))) => {
                    lines.push(line)
                }
                Some(_) => {}
                None => sections.push((section, vec![line])),
            }
        }
        let mut text = String::from(LLAMA3_8B);
        if let Some((_, lines)) = sections.iter().find(|(s, _)| *s == "model") {
            text.push_str(&format!("{}\n", lines.join("\n")));
        }
        for (section, lines) in sections.iter().filter(|(s, _)| *s != "model") {
            text.push_str(&format!("[{section}]\n{}\n", lines.join("\n")));
        }
        match from_toml_str(&text, "train.toml") {
            Ok(job) => {
                let _ = with_gpus(job.plan, gpus).resolve();
            }
            Err(e) => prop_assert!(matches!(e.kind(), Kind::Input | Kind::Overflow), "{e}"),
        }
    }
}

fn job(text: &str) -> Job {
    from_toml_str(text, "t.toml").unwrap()
}

#[test]
fn warns_about_a_misspelt_key_with_its_line_and_the_key_meant() {
    let j = job(&format!("{LLAMA3_8B}[training]\nlocal_batchsize = 2\n"));
    assert_eq!(
        j.warnings,
        [
            "torchtitan config t.toml line 5: unknown key training.local_batchsize (did you mean \
          training.local_batch_size?)"
        ]
    );
    // The typo is not read: torchtitan's default batch stands.
    assert_eq!(j.plan.batch.micro_batch_size, Some(8));
}

#[test]
fn warns_about_unknown_keys_in_every_section_it_reads() {
    for (section, typo, meant) in [
        ("model", "flavour", "model.flavor"),
        ("training", "seqlen", "training.seq_len"),
        ("training", "Seq_Len", "training.seq_len"),
        (
            "parallelism",
            "tensor_paralel_degree",
            "parallelism.tensor_parallel_degree",
        ),
        (
            "experimental",
            "pipeline_parallel_degre",
            "experimental.pipeline_parallel_degree",
        ),
        ("activation_checkpoint", "mod", "activation_checkpoint.mode"),
        (
            "float8",
            "enable_float8_liner",
            "float8.enable_float8_linear",
        ),
        ("compile", "enabled", "compile.enable"),
        ("optimizer", "nme", "optimizer.name"),
        // The right key in the wrong section.
        (
            "training",
            "pipeline_parallel_degree",
            "parallelism.pipeline_parallel_degree",
        ),
        ("model", "seq_len", "training.seq_len"),
    ] {
        let text = if section == "model" {
            format!("{LLAMA3_8B}{typo} = 1\n")
        } else {
            format!("{LLAMA3_8B}[{section}]\n{typo} = 1\n")
        };
        let j = job(&text);
        assert_eq!(j.warnings.len(), 1, "{section}.{typo}: {:?}", j.warnings);
        assert!(
            j.warnings[0].ends_with(&format!(
                "unknown key {section}.{typo} (did you mean {meant}?)"
            )),
            "{:?}",
            j.warnings
        );
    }
    let j = job(&format!(
        "{LLAMA3_8B}[parallelism]\nwhatever = 1\n[parallelism.nested]\nx = 1\n"
    ));
    assert_eq!(
        j.warnings,
        [
            "torchtitan config t.toml line 5: unknown key parallelism.whatever (not a torchtitan \
             key; ignored)",
            "torchtitan config t.toml line 6: unknown key parallelism.nested (not a torchtitan \
             key; ignored)",
        ]
    );
}

#[test]
fn keys_torchtitan_knows_pass_without_warnings() {
    let j = job(&format!(
        "{LLAMA3_8B}tokenizer_path = \"t\"\nhf_assets_path = \"a\"\nnorm_type = \"rmsnorm\"\n\
         [training]\nsteps = 10\ndataset = \"c4\"\nmax_norm = 1.0\nwarmup_steps = 2\nseed = 1\n\
         gc_freq = 50\n[training.dataloader]\nnum_workers = 2\n\
         [optimizer]\nlr = 8e-4\neps = 1e-8\nweight_decay = 0.1\nbeta1 = 0.9\n\
         early_step_in_backward = false\n\
         [float8]\nrecipe_name = \"rowwise\"\nenable_fsdp_float8_all_gather = true\n\
         [compile]\ncomponents = [\"model\"]\nbackend = \"inductor\"\n\
         [parallelism]\nenable_async_tensor_parallel = true\ndisable_loss_parallel = true\n\
         context_parallel_rotate_method = \"allgather\"\n\
         [experimental]\ncustom_import = \"\"\nenable_compiled_autograd = false\n\
         [activation_checkpoint]\nmemory_budget = 0.5\nearly_stop = false\n\
         [lr_scheduler]\nwarmup_stepz = 2\n[checkpoint]\nenabel = true\n"
    ));
    // Sections memplan does not read ([lr_scheduler], [checkpoint]) are not checked.
    assert!(j.warnings.is_empty(), "{:?}", j.warnings);
}

#[test]
fn shipped_layouts_read_without_warnings() {
    for name in [
        "llama3_8b_2024.toml",
        "llama3_70b_2025.toml",
        "llama3_405b_2025_pp.toml",
        "llama2_7b_2024_pp.toml",
    ] {
        let j = read(&fixture(name)).unwrap();
        assert!(j.warnings.is_empty(), "{name}: {:?}", j.warnings);
    }
}

#[test]
fn keys_only_memplan_reads_are_used_with_a_warning() {
    let j = job(&format!(
        "{LLAMA3_8B}[training]\ngradient_accumulation_steps = 4\n\
         [experimental]\ntensor_parallel_degree = 2\n"
    ));
    assert_eq!(j.plan.batch.grad_accum_steps, Some(4));
    assert_eq!(j.plan.parallel.tp, Some(2));
    assert_eq!(
        j.warnings,
        [
            "torchtitan config t.toml line 5: training.gradient_accumulation_steps is memplan's \
             own key, read as given; torchtitan would refuse or ignore it (it derives \
             accumulation from training.global_batch_size)",
            "torchtitan config t.toml line 7: experimental.tensor_parallel_degree is memplan's \
             own key, read as given; torchtitan would refuse or ignore it (its key is \
             parallelism.tensor_parallel_degree)",
        ]
    );
}

#[test]
fn unknown_key_warnings_are_capped() {
    let keys: String = (0..30).map(|i| format!("junk_{i} = 1\n")).collect();
    let j = job(&format!("{LLAMA3_8B}[training]\n{keys}"));
    assert_eq!(j.warnings.len(), 21, "{:?}", j.warnings);
    assert_eq!(
        j.warnings.last().map(String::as_str),
        Some("torchtitan config t.toml: 10 more unknown keys")
    );
}

#[test]
fn a_layout_overridden_by_a_newer_one_is_a_warning() {
    let j = job(&format!(
        "{LLAMA3_8B}[training]\ntensor_parallel_degree = 4\nbatch_size = 2\nlocal_batch_size = 4\n\
         [parallelism]\ntensor_parallel_degree = 2\n"
    ));
    assert_eq!(j.plan.parallel.tp, Some(2));
    assert_eq!(j.plan.batch.micro_batch_size, Some(4));
    assert_eq!(
        j.warnings,
        [
            "torchtitan config t.toml line 5: training.tensor_parallel_degree = 4 is overridden \
             by parallelism.tensor_parallel_degree = 2",
            "torchtitan config t.toml line 6: training.batch_size = 2 is overridden by \
             training.local_batch_size = 4",
        ]
    );
    // Equal values say nothing.
    let j = job(&format!(
        "{LLAMA3_8B}[training]\ntensor_parallel_degree = 2\n[parallelism]\ntensor_parallel_degree = 2\n"
    ));
    assert!(j.warnings.is_empty(), "{:?}", j.warnings);
}

#[test]
fn reshard_policy_of_early_2025_is_read_under_training() {
    let j = job(&format!(
        "{LLAMA3_8B}[training]\nfsdp_reshard_after_forward = \"never\"\n"
    ));
    assert_eq!(j.plan.reshard_after_forward, Some(false));
    assert!(j.warnings.is_empty(), "{:?}", j.warnings);
}

#[test]
fn negative_global_batch_means_local_times_data_parallel() {
    // -1 is torchtitan's default: no accumulation, nothing to say.
    let j = job(&format!(
        "{LLAMA3_8B}[training]\nglobal_batch_size = -1\n[parallelism]\ndata_parallel_shard_degree = 4\n"
    ));
    assert_eq!(j.plan.batch.grad_accum_steps, None);
    assert!(j.warnings.is_empty(), "{:?}", j.warnings);
    // Any other negative value means the same to torchtitan (`if global_batch_size < 0`), but
    // is likely a slip: said.
    let j = job(&format!(
        "{LLAMA3_8B}[training]\nglobal_batch_size = -5\n[parallelism]\ndata_parallel_shard_degree = 4\n"
    ));
    assert_eq!(j.plan.batch.grad_accum_steps, None);
    assert_eq!(
        j.warnings,
        ["torchtitan config t.toml line 5: training.global_batch_size = -5: torchtitan takes any \
          negative value as -1, local_batch_size x the data-parallel degree (no gradient \
          accumulation)"]
    );
}

#[test]
fn rejects_a_zero_global_batch() {
    let e = error(&format!("{LLAMA3_8B}[training]\nglobal_batch_size = 0\n"));
    assert_eq!(
        e,
        "invalid training.global_batch_size: got 0, expected -1 (local_batch_size x the \
         data-parallel degree) or an integer from 1 to 16777216"
    );
}

#[test]
fn global_batch_is_checked_even_when_the_shard_degree_waits_for_the_world_size() {
    let e = error(&format!(
        "{LLAMA3_8B}[training]\nlocal_batch_size = 4\nglobal_batch_size = 6\n"
    ));
    assert_eq!(
        e,
        "invalid training.global_batch_size: got 6, expected a multiple of local_batch_size x \
         data_parallel_replicate_degree (4) x the data-parallel shard degree"
    );
    let j = job(&format!(
        "{LLAMA3_8B}[training]\nlocal_batch_size = 4\nglobal_batch_size = 64\n"
    ));
    assert_eq!(j.plan.batch.grad_accum_steps, None);
    assert_eq!(
        j.warnings,
        [
            "torchtitan config t.toml line 6: training.global_batch_size = 64 sets gradient \
          accumulation by the world size (data_parallel_shard_degree is -1); memplan estimates \
          one accumulation step"
        ]
    );
}

#[test]
fn rejects_every_invalid_number_naming_its_key() {
    for (toml, key) in [
        (
            "[training]\nlocal_batch_size = 0\n",
            "training.local_batch_size",
        ),
        ("[training]\nbatch_size = -1\n", "training.batch_size"),
        ("[training]\nseq_len = 0\n", "training.seq_len"),
        ("[training]\nseq_len = 16777217\n", "training.seq_len"),
        (
            "[training]\ngradient_accumulation_steps = 0\n",
            "training.gradient_accumulation_steps",
        ),
        (
            "[training]\nglobal_batch_size = 0\n",
            "training.global_batch_size",
        ),
        (
            "[training]\nglobal_batch_size = 16777217\n",
            "training.global_batch_size",
        ),
        (
            "[training]\ndata_parallel_replicate_degree = 0\n",
            "training.data_parallel_replicate_degree",
        ),
        (
            "[training]\ndata_parallel_shard_degree = -2\n",
            "training.data_parallel_shard_degree",
        ),
        (
            "[parallelism]\ndata_parallel_shard_degree = -2\n",
            "parallelism.data_parallel_shard_degree",
        ),
        (
            "[parallelism]\ntensor_parallel_degree = 0\n",
            "parallelism.tensor_parallel_degree",
        ),
        (
            "[parallelism]\npipeline_parallel_degree = -1\n",
            "parallelism.pipeline_parallel_degree",
        ),
        (
            "[experimental]\npipeline_parallel_degree = 0\n",
            "experimental.pipeline_parallel_degree",
        ),
        (
            "[parallelism]\ncontext_parallel_degree = 0\n",
            "parallelism.context_parallel_degree",
        ),
        (
            "[experimental]\ncontext_parallel_degree = -1\n",
            "experimental.context_parallel_degree",
        ),
        (
            "[parallelism]\nexpert_parallel_degree = 0\n",
            "parallelism.expert_parallel_degree",
        ),
        (
            "[parallelism]\nexpert_tensor_parallel_degree = 0\n",
            "parallelism.expert_tensor_parallel_degree",
        ),
        // Numbers are checked even where the plan does not need them (no pipeline here).
        (
            "[parallelism]\npipeline_parallel_microbatch_size = 0\n",
            "parallelism.pipeline_parallel_microbatch_size",
        ),
        (
            "[experimental]\npipeline_parallel_microbatches = 0\n",
            "experimental.pipeline_parallel_microbatches",
        ),
        (
            "[parallelism]\npipeline_parallel_layers_per_stage = 0\n",
            "parallelism.pipeline_parallel_layers_per_stage",
        ),
        (
            "[parallelism]\npipeline_parallel_first_stage_less_layers = -1\n",
            "parallelism.pipeline_parallel_first_stage_less_layers",
        ),
        (
            "[parallelism]\npipeline_parallel_last_stage_less_layers = -1\n",
            "parallelism.pipeline_parallel_last_stage_less_layers",
        ),
        (
            "[activation_checkpoint]\nselective_ac_option = -1\n",
            "activation_checkpoint.selective_ac_option",
        ),
        // A value the newer layout overrides is still checked.
        (
            "[training]\ntensor_parallel_degree = 0\n[parallelism]\ntensor_parallel_degree = 2\n",
            "training.tensor_parallel_degree",
        ),
        (
            "[training]\nlocal_batch_size = 2\nbatch_size = 0\n",
            "training.batch_size",
        ),
    ] {
        let e = from_toml_str(&format!("{LLAMA3_8B}{toml}"), "t.toml").unwrap_err();
        assert_eq!(e.kind(), Kind::Input);
        assert_eq!(e.field(), Some(key), "{e}");
        assert!(
            e.to_string().starts_with(&format!("invalid {key}: got ")),
            "{e}"
        );
    }
}

#[test]
fn a_defaulted_micro_batch_count_that_does_not_divide_the_batch_names_the_batch() {
    let e = error(&format!(
        "{LLAMA3_8B}[training]\nbatch_size = 6\n[experimental]\npipeline_parallel_degree = 4\n"
    ));
    assert_eq!(
        e,
        "invalid training.batch_size: got 6, expected a multiple of the pipeline micro-batches, \
         which experimental.pipeline_parallel_microbatches leaves at pipeline_parallel_degree (4)"
    );
}

#[test]
fn refuses_a_shard_degree_the_world_size_does_not_match() {
    let j = job(&format!(
        "{LLAMA3_8B}[parallelism]\ndata_parallel_shard_degree = 16\n"
    ));
    let e = check_world_size(&j, 8).unwrap_err();
    assert_eq!(e.kind(), Kind::Input);
    assert_eq!(e.field(), Some("parallelism.data_parallel_shard_degree"));
    assert_eq!(
        e.to_string(),
        "invalid parallelism.data_parallel_shard_degree: got 16, expected a degree with \
         data_parallel_replicate_degree x data_parallel_shard_degree x context_parallel_degree x \
         tensor_parallel_degree x pipeline_parallel_degree = --num-gpus (8): 1 x 16 x 1 x 1 x 1 = 16"
    );
    assert!(check_world_size(&j, 16).is_ok());

    // The 2024 layout, every degree counted.
    let j = job(&format!(
        "{LLAMA3_8B}[training]\ndata_parallel_replicate_degree = 2\ndata_parallel_shard_degree = 2\n\
         tensor_parallel_degree = 2\n[experimental]\npipeline_parallel_degree = 2\n\
         context_parallel_degree = 2\n"
    ));
    assert!(check_world_size(&j, 32).is_ok());
    let e = check_world_size(&j, 64).unwrap_err();
    assert_eq!(e.field(), Some("training.data_parallel_shard_degree"));
    assert!(
        e.to_string()
            .ends_with("= --num-gpus (64): 2 x 2 x 2 x 2 x 2 = 32"),
        "{e}"
    );
}

#[test]
fn refuses_a_world_size_the_other_degrees_do_not_divide_when_the_shard_degree_is_derived() {
    for shard in ["", "data_parallel_shard_degree = -1\n"] {
        let j = job(&format!(
            "{LLAMA3_8B}[parallelism]\n{shard}tensor_parallel_degree = 8\npipeline_parallel_degree = 2\n"
        ));
        assert!(check_world_size(&j, 16).is_ok());
        assert!(check_world_size(&j, 64).is_ok());
        for n in [8, 12, 24] {
            let e = check_world_size(&j, n).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "invalid --num-gpus: got {n}, expected a multiple of \
                     data_parallel_replicate_degree x context_parallel_degree x \
                     tensor_parallel_degree x pipeline_parallel_degree = 1 x 1 x 8 x 2 = 16 (set \
                     by parallelism.tensor_parallel_degree, parallelism.pipeline_parallel_degree), \
                     the ranks data_parallel_shard_degree -1 shares out"
                )
            );
        }
    }
    // Nothing set: any world size will do.
    let j = job(LLAMA3_8B);
    for n in [1, 3, 7, 1024] {
        assert!(check_world_size(&j, n).is_ok());
    }
    assert!(check_world_size(&j, 0).is_err());
}

#[test]
fn every_fixture_passes_the_world_size_check_it_resolves_with() {
    for (name, gpus) in [
        ("llama3_8b_2024.toml", 64),
        ("llama3_70b_2025.toml", 8),
        ("llama3_405b_2025_pp.toml", 128),
        ("llama2_7b_2024_pp.toml", 4),
    ] {
        let j = read(&fixture(name)).unwrap();
        assert!(check_world_size(&j, gpus).is_ok(), "{name}");
    }
    let j = read(&fixture("llama3_405b_2025_pp.toml")).unwrap();
    assert!(check_world_size(&j, 64).is_err());
}

#[test]
fn records_the_key_behind_every_plan_field_it_sets() {
    let j = read(&fixture("llama3_405b_2025_pp.toml")).unwrap();
    let key = |field: &str| {
        j.keys
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, k)| k.as_str())
    };
    for (field, toml) in [
        ("model", "model.flavor"),
        (
            "parallel.dp_shard",
            "parallelism.data_parallel_shard_degree",
        ),
        ("parallel.tp", "parallelism.tensor_parallel_degree"),
        ("parallel.pp", "parallelism.pipeline_parallel_degree"),
        ("parallel.cp", "parallelism.context_parallel_degree"),
        (
            "parallel.pp_schedule",
            "parallelism.pipeline_parallel_schedule",
        ),
        (
            "parallel.pp_virtual_stages",
            "parallelism.pipeline_parallel_layers_per_stage",
        ),
        (
            "batch.micro_batch_size",
            "parallelism.pipeline_parallel_microbatch_size",
        ),
        ("batch.seq_len", "training.seq_len"),
        ("batch.grad_accum_steps", "training.global_batch_size"),
        ("precision.param", "training.mixed_precision_param"),
        ("precision.reduce", "training.mixed_precision_reduce"),
        ("activation_checkpointing", "activation_checkpoint.mode"),
        (
            "reshard_after_forward",
            "parallelism.fsdp_reshard_after_forward",
        ),
        ("float8", "model.converters"),
        ("compile", "compile.enable"),
        ("optimizer", "optimizer.name"),
        ("implementation.optimizer", "optimizer.implementation"),
    ] {
        assert_eq!(key(field), Some(toml), "{field}");
    }
    // Each plan field once.
    let mut fields: Vec<&str> = j.keys.iter().map(|(f, _)| *f).collect();
    fields.sort_unstable();
    fields.dedup();
    assert_eq!(fields.len(), j.keys.len());

    let j = job(&format!(
        "{LLAMA3_8B}[training]\ndtype = \"bfloat16\"\nenable_cpu_offload = true\n\
         [parallelism]\nexpert_parallel_degree = 2\nexpert_tensor_parallel_degree = 2\n\
         [optimizer]\nfused = true\n"
    ));
    for (field, toml) in [
        ("precision.master", "training.dtype"),
        ("offload", "training.enable_cpu_offload"),
        ("parallel.ep", "parallelism.expert_parallel_degree"),
        ("parallel.etp", "parallelism.expert_tensor_parallel_degree"),
        ("implementation.optimizer", "optimizer.fused"),
    ] {
        assert!(
            j.keys.contains(&(field, toml.to_string())),
            "{field}: {:?}",
            j.keys
        );
    }
    // Defaults come from no key.
    let j = job(LLAMA3_8B);
    assert_eq!(j.keys, [("model", "model.flavor".to_string())]);
}

#[test]
fn errors_found_when_resolving_name_the_toml_key() {
    let resolve = |text: &str, gpus: i64| {
        let j = job(text);
        let e = with_gpus(j.plan.clone(), gpus).resolve().unwrap_err();
        j.explain(e)
    };
    // tp 3 does not divide Llama 3 8B's 32 heads.
    let e = resolve(
        &format!("{LLAMA3_8B}[parallelism]\ntensor_parallel_degree = 3\n"),
        3,
    );
    assert_eq!(e.field(), Some("parallelism.tensor_parallel_degree"));
    assert!(
        e.to_string().starts_with(
            "invalid parallelism.tensor_parallel_degree (plan field parallel.tp): got 3"
        ),
        "{e}"
    );
    // cp 3 does not split 8192 tokens into 2 x 3 chunks: the 2024 key is named.
    let e = resolve(
        &format!(
            "{LLAMA3_8B}[training]\nseq_len = 8192\n[experimental]\ncontext_parallel_degree = 3\n"
        ),
        3,
    );
    assert_eq!(e.field(), Some("experimental.context_parallel_degree"));
    // Expert parallelism on a dense model.
    let e = resolve(
        &format!("{LLAMA3_8B}[parallelism]\nexpert_parallel_degree = 2\n"),
        2,
    );
    assert_eq!(e.field(), Some("parallelism.expert_parallel_degree"));
    // More pipeline stages than layers.
    let e = resolve(
        &format!("{LLAMA3_8B}[parallelism]\npipeline_parallel_degree = 64\n"),
        64,
    );
    assert_eq!(e.field(), Some("parallelism.pipeline_parallel_degree"));
    // Default interleaving (2 stages per rank) on 32 ranks of 32 layers: the schedule is named.
    let e = resolve(
        &format!(
            "{LLAMA3_8B}[parallelism]\npipeline_parallel_degree = 32\n\
             pipeline_parallel_schedule = \"Interleaved1F1B\"\n"
        ),
        32,
    );
    assert_eq!(e.field(), Some("parallelism.pipeline_parallel_schedule"));
    // An error about a field the file did not set keeps the plan's name.
    let e = resolve(LLAMA3_8B, 0);
    assert_eq!(e.field(), Some("num_gpus"));
}

#[test]
fn strips_a_byte_order_mark() {
    let j = job(&format!("\u{feff}{LLAMA3_8B}[training]\nseq_len = 4096\n"));
    assert_eq!(j.plan.batch.seq_len, Some(4096));

    let dir = std::env::temp_dir().join(format!("memplan-tt-bom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bom.toml");
    std::fs::write(&path, format!("\u{feff}{LLAMA3_8B}local_batchsize = 1\n")).unwrap();
    let j = read(&path).unwrap();
    let big = dir.join("big.toml");
    std::fs::write(&big, format!("{LLAMA3_8B}# {}\n", "x".repeat(2 << 20))).unwrap();
    let e = read(&big).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(j.plan.model.as_deref(), Some("llama3-8b"));
    // Lines count from the first line after the mark.
    assert_eq!(j.warnings.len(), 1);
    assert!(
        j.warnings[0].contains(" line 4: unknown key model.local_batchsize"),
        "{:?}",
        j.warnings
    );
    assert_eq!(e.kind(), Kind::Input);
    assert!(e.to_string().contains("larger than"), "{e}");
}

#[test]
fn disable_loss_parallel_turns_loss_parallelism_off() {
    for section in ["parallelism", "training"] {
        let text = format!(
            "{LLAMA3_8B}[{section}]\ntensor_parallel_degree = 2\ndisable_loss_parallel = true\n"
        );
        let job = from_toml_str(&text, "train.toml").unwrap();
        assert_eq!(
            job.plan.implementation.loss_parallel,
            Some(false),
            "{section}"
        );
        let plan = with_gpus(job.plan, 2).resolve().unwrap();
        assert!(!plan.implementation.loss_parallel);
    }
    let job = from_toml_str(
        &format!("{LLAMA3_8B}[parallelism]\ntensor_parallel_degree = 2\n"),
        "train.toml",
    )
    .unwrap();
    assert_eq!(job.plan.implementation.loss_parallel, None);
    assert!(
        with_gpus(job.plan, 2)
            .resolve()
            .unwrap()
            .implementation
            .loss_parallel
    );
}

#[test]
fn ring_attention_rotation_is_read_from_either_section() {
    for (section, method, want) in [
        ("parallelism", "alltoall", memplan::plan::CpRotate::AllToAll),
        (
            "experimental",
            "allgather",
            memplan::plan::CpRotate::AllGather,
        ),
    ] {
        let j = from_toml_str(
            &format!(
                "{LLAMA3_8B}[{section}]\ncontext_parallel_degree = 2\n\
                 context_parallel_rotate_method = \"{method}\"\n"
            ),
            "train.toml",
        )
        .unwrap();
        let plan = with_gpus(j.plan, 8).resolve().unwrap();
        assert_eq!(plan.parallel.cp, 2);
        assert_eq!(plan.parallel.cp_rotate, want, "{section}");
    }
}

#[test]
fn a_2025_layout_picks_the_torchtitan_0_2_preset_and_says_so() {
    let new = read(&fixture("llama3_70b_2025.toml")).unwrap();
    let note = new.note.clone().expect("a 2025-layout file gets a note");
    assert!(
        note.contains("torchtitan-0.2") && note.contains("0.2.2"),
        "{note}"
    );
    assert_eq!(new.plan.preset.as_deref(), Some("torchtitan-0.2"));
    let plan = new.plan.resolve().unwrap();
    assert_eq!(plan.preset, memplan::plan::Preset::Torchtitan02);
    assert_eq!(
        plan.implementation.fsdp_units,
        memplan::plan::FsdpUnits::Split
    );
    // A December 2024 file keeps its preset, and says nothing.
    let old = read(&fixture("llama3_8b_2024.toml")).unwrap();
    assert!(old.note.is_none());
    assert_eq!(old.plan.preset, None);
    assert_eq!(
        old.plan.resolve().unwrap().preset,
        memplan::plan::Preset::Torchtitan2024
    );
}

/// `fsdp_reshard_after_forward = "always"` in a 2025-layout file reshards [norm, output] too
/// (torchtitan 0.2.2's `apply_fsdp`); "never" keeps every unit gathered.
#[test]
fn a_2025_reshard_policy_sets_the_fsdp_units() {
    let text = std::fs::read_to_string(fixture("llama3_70b_2025.toml")).unwrap();
    for (policy, units, reshard) in [
        ("always", memplan::plan::FsdpUnits::SplitAlways, true),
        ("never", memplan::plan::FsdpUnits::Split, false),
        ("default", memplan::plan::FsdpUnits::Split, true),
    ] {
        let edited = text.replace(
            "\n[parallelism]\n",
            &format!("\n[parallelism]\nfsdp_reshard_after_forward = \"{policy}\"\n"),
        );
        assert_ne!(edited, text);
        let plan = from_toml_str(&edited, "train.toml")
            .unwrap()
            .plan
            .resolve()
            .unwrap();
        assert_eq!(plan.implementation.fsdp_units, units, "{policy}");
        assert_eq!(plan.reshard_after_forward, reshard, "{policy}");
    }
}

/// torchtitan 0.3.0 has no TOML: its `Trainer.Config` as `--debug.save_config_file` writes it
/// (JSON; the fixture is llama3_8b's from 0.3.0's config registry, with a batch of 2 and the
/// model's own fields trimmed) is read, and picks the `torchtitan-0.3` preset and says so: the
/// chunked loss with its chunks, gradients kept (CUDA graphs on), selective (op) checkpointing
/// from the policy's fields, AdamW from the parameter groups.
#[test]
fn a_torchtitan_0_3_saved_config_picks_the_torchtitan_0_3_preset_and_says_so() {
    let job = read(&fixture("llama3_8b_0.3.json")).unwrap();
    let p = &job.plan;
    assert_eq!(p.preset.as_deref(), Some("torchtitan-0.3"));
    assert!(job
        .note
        .as_deref()
        .unwrap()
        .contains("torchtitan 0.3 config: preset torchtitan-0.3"));
    assert_eq!(p.model.as_deref(), Some("llama3-8b"));
    assert_eq!(p.batch.micro_batch_size, Some(2));
    assert_eq!(p.batch.seq_len, Some(8192));
    assert_eq!(p.activation_checkpointing.as_deref(), Some("selective-op"));
    assert_eq!(p.implementation.logits.as_deref(), Some("chunked"));
    assert_eq!(p.implementation.loss_chunks, Some(8));
    assert_eq!(p.implementation.zero_grad.as_deref(), Some("zeros"));
    assert_eq!(p.optimizer.as_deref(), Some("adamw"));
    assert_eq!(p.implementation.optimizer.as_deref(), Some("fused"));
    assert!(job.warnings.is_empty(), "{:?}", job.warnings);
    let plan = with_gpus(p.clone(), 8).resolve().unwrap();
    assert_eq!(plan.preset, memplan::plan::Preset::Torchtitan03);
    assert_eq!(plan.parallel.dp_shard, 8);
    assert!(plan.implementation.fsdp_one_gpu);
    assert!(memplan::estimate::estimate(&plan).is_ok());
}

/// A TOML written with torchtitan 0.3's keys (`[loss]`, `training.disable_cuda_graphs`,
/// `parallelism.spmd_backend`, ...) is a 0.3 config too; 0.3 checkpoints selectively by op
/// unless told otherwise, and `disable_cuda_graphs = true` frees the gradients.
#[test]
fn torchtitan_0_3_keys_in_a_toml_pick_the_torchtitan_0_3_preset() {
    let job = from_toml_str(
        &format!(
            "{LLAMA3_8B}[training]\nlocal_batch_size = 1\ndisable_cuda_graphs = true\n\
             [loss]\nnum_chunks = 4\n"
        ),
        "train.toml",
    )
    .unwrap();
    assert_eq!(job.plan.preset.as_deref(), Some("torchtitan-0.3"));
    assert_eq!(job.plan.implementation.loss_chunks, Some(4));
    assert_eq!(
        job.plan.implementation.zero_grad.as_deref(),
        Some("set-to-none")
    );
    assert_eq!(
        job.plan.activation_checkpointing.as_deref(),
        Some("selective-op")
    );
    assert!(job.warnings.is_empty(), "{:?}", job.warnings);
    // The plain cross-entropy: a `[loss]` without chunks.
    let job = from_toml_str(
        &format!("{LLAMA3_8B}[parallelism]\nspmd_backend = \"spmd_types\"\n[loss]\nglobal_vocab_size = 128256\n"),
        "train.toml",
    )
    .unwrap();
    assert_eq!(job.plan.preset.as_deref(), Some("torchtitan-0.3"));
    assert_eq!(
        job.plan.implementation.logits.as_deref(),
        Some("float-in-loss")
    );
}

/// What a 0.3 JSON cannot be: another JSON document, a memory-budget policy (not modelled),
/// or parameter groups with different optimizers.
#[test]
fn a_json_config_that_is_not_torchtitan_0_3_or_not_modelled_is_refused() {
    use memplan::torchtitan::from_json_str;
    let e = from_json_str(r#"{"model": "llama3-8b"}"#, "c.json").unwrap_err();
    assert_eq!(e.kind(), Kind::Input);
    assert!(e.to_string().contains("Trainer.Config"), "{e}");
    let base = std::fs::read_to_string(fixture("llama3_8b_0.3.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["activation_checkpoint"] = serde_json::json!({"memory_budget": 0.5});
    let e = from_json_str(&v.to_string(), "c.json").unwrap_err();
    assert_eq!(e.field(), Some("activation_checkpoint.mode"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["optimizer"]["param_groups"] = serde_json::json!([
        {"pattern": "bias", "optimizer_name": "AdamW"},
        {"pattern": ".*", "optimizer_name": "DistMuon"}
    ]);
    let e = from_json_str(&v.to_string(), "c.json").unwrap_err();
    assert_eq!(e.field(), Some("optimizer.param_groups"), "{e}");
    let e = from_json_str("{", "c.json").unwrap_err();
    assert!(e.to_string().contains("malformed JSON"), "{e}");
}
