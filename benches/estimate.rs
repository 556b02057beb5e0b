//! Criterion benches: one estimate, and a sweep of 100,000 plans.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use memplan::estimate::estimate;
use memplan::plan::{Checkpointing, Offload, Plan, PlanFile};

fn seed() -> Plan {
    serde_json::from_str::<PlanFile>(memplan::plan::EXAMPLES[1].1)
        .unwrap()
        .resolve()
        .unwrap()
}

fn one(c: &mut Criterion) {
    let plan = seed();
    c.bench_function("estimate/one (llama3-8b seed offload)", |b| {
        b.iter(|| estimate(black_box(&plan)).unwrap())
    });
}

/// DeepSpeed ZeRO-2 and ZeRO-3 ("auto" buckets) on 8 GPUs: the ZeRO-2 estimate takes each
/// rank's grads_in_partition, the most loaded rank's; a ZeRO-3 estimate replays DeepSpeed's
/// parameter coordinator over the model's module calls (a few microseconds for llama3-8b,
/// ZeRO-3 plans only).
fn zero(c: &mut Criterion) {
    for (name, zero) in [
        (
            "estimate/one (llama3-8b zero-2 auto, 8 GPUs)",
            r#"{"stage":2,"reduce_bucket_size":"auto","overlap_comm":true}"#,
        ),
        (
            "estimate/one (small zero-3 auto, 8 GPUs)",
            r#"{"stage":3,"reduce_bucket_size":"auto","prefetch_bucket_size":"auto","param_persistence_threshold":"auto"}"#,
        ),
        (
            "estimate/one (llama3-8b zero-3 auto, 8 GPUs)",
            r#"{"stage":3,"reduce_bucket_size":"auto","prefetch_bucket_size":"auto","param_persistence_threshold":"auto"}"#,
        ),
    ] {
        let (model, seq) = if name.contains("8b") {
            ("llama3-8b", 2048)
        } else {
            ("small", 512)
        };
        let plan = serde_json::from_str::<PlanFile>(&format!(
            r#"{{"model":"{model}","gpu":"h100-80g","num_gpus":8,"batch":{{"micro_batch_size":1,"seq_len":{seq}}},
                "activation_checkpointing":"full","parallel":{{"zero":{zero}}}}}"#
        ))
        .unwrap()
        .resolve()
        .unwrap();
        c.bench_function(name, |b| b.iter(|| estimate(black_box(&plan)).unwrap()));
    }
}

/// 100,000 plans: FSDP degrees x checkpointing modes x offload modes x micro-batches x
/// accumulation x sequence lengths (9 x 4 x 3 x 64 x 15 = 103,680, truncated at 100,000),
/// each estimated in full, on one thread.
fn sweep(c: &mut Criterion) {
    let mut plan = seed();
    let acs = [
        Checkpointing::None,
        Checkpointing::Full,
        Checkpointing::SelectiveLayer(2),
        Checkpointing::SelectiveOp,
    ];
    let offs = [Offload::None, Offload::Optimizer, Offload::Full];
    let mut g = c.benchmark_group("estimate");
    g.sample_size(10);
    g.bench_function("sweep/100k plans", |b| {
        b.iter(|| {
            let mut fits = 0u32;
            let mut n = 0u32;
            'outer: for shard in [1u64, 2, 4, 8, 16, 32, 64, 128, 256] {
                for ac in acs {
                    for off in offs {
                        for (mb, accum) in (1..=32u64).flat_map(|m| [(m, 1u64), (m, 4)]) {
                            for seq in [
                                512u64, 1024, 2048, 4096, 8192, 1536, 3072, 6144, 768, 2560, 5120,
                                7168, 256, 384, 640,
                            ] {
                                plan.parallel.dp_shard = shard;
                                plan.num_gpus = shard;
                                plan.activation_checkpointing = ac;
                                plan.offload = off;
                                plan.batch.micro_batch_size = mb;
                                plan.batch.seq_len = seq;
                                plan.batch.grad_accum_steps = accum;
                                fits += estimate(&plan).unwrap().fits as u32;
                                n += 1;
                                if n == 100_000 {
                                    break 'outer;
                                }
                            }
                        }
                    }
                }
            }
            assert_eq!(n, 100_000);
            black_box(fits)
        })
    });
    g.finish();
}

/// The whole plan space of llama3-70b on 64 H100s (8 per node): every TP/PP/CP/HSDP layout,
/// checkpointing and offload mode, each with a binary search for its largest micro-batch.
fn search_64(c: &mut Criterion) {
    let base: PlanFile = serde_json::from_str(
        r#"{"model":"llama3-70b","gpu":"h100-80g","num_gpus":64,"gpus_per_node":8,
            "batch":{"seq_len":8192}}"#,
    )
    .unwrap();
    let cons = memplan::search::Constraints {
        max_micro_batch: 64,
        headroom_milli: 50,
        ..Default::default()
    };
    let mut g = c.benchmark_group("search");
    g.sample_size(10);
    g.bench_function("llama3-70b on 64 GPUs", |b| {
        b.iter(|| memplan::search::search(black_box(&base), &cons).unwrap())
    });
    g.finish();
}

fn llama70b() -> Plan {
    serde_json::from_str::<PlanFile>(
        r#"{"model":"llama3-70b","gpu":"h100-80g","num_gpus":64,"parallel":{"tp":8},
            "batch":{"micro_batch_size":1,"seq_len":8192},"activation_checkpointing":"full"}"#,
    )
    .unwrap()
    .resolve()
    .unwrap()
}

/// The step of llama3-70b (80 blocks) as events, and the estimate with its allocator
/// simulation (the group-level trace replayed through the caching allocator).
fn traced(c: &mut Criterion) {
    use memplan::estimate::trace::{trace_with, Detail};
    let plan = llama70b();
    let conf = memplan::allocator::AllocConf::default();
    c.bench_function("trace/llama3-70b tensors", |b| {
        b.iter(|| trace_with(black_box(&plan), 0, Detail::Tensors).unwrap())
    });
    c.bench_function("trace/llama3-70b groups", |b| {
        b.iter(|| trace_with(black_box(&plan), 0, Detail::Groups).unwrap())
    });
    c.bench_function("estimate/simulated (llama3-70b, 64 GPUs, tp 8)", |b| {
        b.iter(|| memplan::estimate::estimate_simulated(black_box(&plan), &conf, "").unwrap())
    });
}

criterion_group!(benches, one, zero, sweep, search_64, traced);
criterion_main!(benches);
