//! Invariants of the estimator over generated plans (proptest).

use memplan::estimate::estimate;
use memplan::plan::{Plan, PlanFile};
use proptest::prelude::*;

const MODELS: &[&str] = &[
    "tiny",
    "tiny-gqa",
    "tiny-tied",
    "llama3.2-1b",
    "llama3-8b",
    "qwen2.5-7b",
    "llama3-70b",
];
const AC: &[&str] = &["none", "full", "selective-layer:2", "selective-op"];
const OFFLOAD: &[&str] = &["none", "optimizer", "full"];
const DTYPES: &[(&str, &str)] = &[("bf16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")];

#[derive(Clone, Debug)]
struct Knobs {
    model: &'static str,
    shard_pow: u32,
    batch: u64,
    seq: u64,
    ac: &'static str,
    offload: &'static str,
    dtypes: (&'static str, &'static str),
    accum: u64,
}

fn knobs() -> impl Strategy<Value = Knobs> {
    (
        prop::sample::select(MODELS),
        0u32..7,
        1u64..16,
        prop::sample::select(&[64u64, 128, 256][..]),
        prop::sample::select(AC),
        prop::sample::select(OFFLOAD),
        prop::sample::select(DTYPES),
        1u64..4,
    )
        .prop_map(
            |(model, shard_pow, batch, seq, ac, offload, dtypes, accum)| Knobs {
                model,
                shard_pow,
                batch,
                seq,
                ac,
                offload,
                dtypes,
                accum,
            },
        )
}

fn plan(k: &Knobs) -> Plan {
    let json = format!(
        r#"{{"model":"{}","num_gpus":{},"batch":{{"micro_batch_size":{},"seq_len":{},"grad_accum_steps":{}}},
            "activation_checkpointing":"{}","offload":"{}",
            "precision":{{"param":"{}","master":"{}","reduce":"fp32"}}}}"#,
        k.model,
        1u64 << k.shard_pow,
        k.batch,
        k.seq,
        k.accum,
        k.ac,
        k.offload,
        k.dtypes.0,
        k.dtypes.1
    );
    serde_json::from_str::<PlanFile>(&json)
        .unwrap()
        .resolve()
        .unwrap()
}

fn peak(k: &Knobs) -> u64 {
    estimate(&plan(k))
        .unwrap()
        .per_gpu
        .peak_allocated_bytes
        .get()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn breakdown_sums_to_the_peak(k in knobs()) {
        let e = estimate(&plan(&k)).unwrap();
        prop_assert_eq!(e.per_gpu.breakdown.total(), e.per_gpu.peak_allocated_bytes);
        prop_assert!(e.per_gpu.peak_reserved_bytes >= e.per_gpu.peak_allocated_bytes);
        prop_assert!(e.per_gpu.timeline.iter().all(|p| p.allocated_bytes <= e.per_gpu.peak_allocated_bytes));
    }

    /// The estimator's event trace (src/estimate/trace.rs) walks the whole step; at each of
    /// the estimator's phase points its running sum is the phase figure, and nothing in the
    /// trace rises above the estimator's peak.
    #[test]
    fn the_event_trace_reproduces_the_phases(k in knobs(), pp in prop::sample::select(&[1u64, 2][..])) {
        let mut plan = plan(&k);
        if pp == 2 && plan.model.layers >= 2 && plan.num_gpus >= 2 {
            plan = serde_json::from_str::<PlanFile>(&format!(
                r#"{{"model":"{}","num_gpus":{},"parallel":{{"pp":2}},"batch":{{"micro_batch_size":{},"seq_len":{},"grad_accum_steps":{}}},
                    "activation_checkpointing":"{}","offload":"{}"}}"#,
                k.model, 1u64 << k.shard_pow, k.batch, k.seq, k.accum.max(2), k.ac, k.offload
            )).unwrap().resolve().unwrap();
        }
        let e = estimate(&plan).unwrap();
        let t = memplan::estimate::trace::trace(&plan, e.per_gpu.stage).unwrap();
        let points = t.points().unwrap();
        prop_assert_eq!(points.len(), 10);
        for ((_, sum), want) in points.iter().zip(e.per_gpu.timeline.iter()) {
            prop_assert_eq!(*sum, want.allocated_bytes.get(), "{:?}", want);
        }
        prop_assert_eq!(t.peak().unwrap().0, e.per_gpu.peak_allocated_bytes.get());
    }

    /// LoRA plans: the event trace reproduces every phase, and bytes never fall as the rank,
    /// the batch or the targets grow.
    #[test]
    fn lora_plans_trace_their_phases_and_grow_with_rank_and_batch(
        k in knobs(),
        rank in 1u64..128,
        targets in prop::sample::select(&["attention", "q,v", "all-linear", "gate,up,down"][..]),
        dropout in prop::sample::select(&[0.0f64, 0.1][..]),
        gc in any::<bool>(),
        base_bf16 in any::<bool>(),
    ) {
        let lora = |rank: u64, batch: u64, targets: &str| {
            serde_json::from_str::<PlanFile>(&format!(
                r#"{{"model":"{}","num_gpus":1,"preset":"hf-transformers",
                    "batch":{{"micro_batch_size":{batch},"seq_len":{},"grad_accum_steps":{}}},
                    "precision":{{"param":"{}","master":"fp32","reduce":"fp32"}},
                    "activation_checkpointing":"{}",
                    "lora":{{"rank":{rank},"targets":"{targets}","dropout":{dropout}}}}}"#,
                k.model, k.seq, k.accum,
                if base_bf16 { "bf16" } else { "fp32" },
                if gc { "full" } else { "none" },
            )).unwrap().resolve().unwrap()
        };
        let p = lora(rank, k.batch, targets);
        let e = estimate(&p).unwrap();
        let t = memplan::estimate::trace::trace(&p, 0).unwrap();
        for ((_, sum), want) in t.points().unwrap().iter().zip(e.per_gpu.timeline.iter()) {
            prop_assert_eq!(*sum, want.allocated_bytes.get(), "{:?}", want);
        }
        prop_assert_eq!(t.peak().unwrap().0, e.per_gpu.peak_allocated_bytes.get());
        let at = |p: &Plan| estimate(p).unwrap().per_gpu.peak_allocated_bytes;
        prop_assert!(at(&lora(rank + 1, k.batch, targets)) >= at(&p));
        prop_assert!(at(&lora(rank, k.batch + 1, targets)) >= at(&p));
        prop_assert!(at(&lora(rank, k.batch, "all-linear")) >= at(&p));
    }

    /// Autocast plans: the event trace reproduces every phase, and bytes never fall as the
    /// batch grows.
    #[test]
    fn autocast_plans_trace_their_phases(k in knobs(), gc in any::<bool>(), hf in any::<bool>()) {
        let autocast = |batch: u64| {
            serde_json::from_str::<PlanFile>(&format!(
                r#"{{"model":"{}","num_gpus":1,"preset":"{}",
                    "batch":{{"micro_batch_size":{batch},"seq_len":{},"grad_accum_steps":{}}},
                    "precision":{{"param":"bf16","master":"fp32","reduce":"fp32","autocast":true}},
                    "activation_checkpointing":"{}"}}"#,
                k.model,
                if hf { "hf-transformers" } else { "torchtitan-2024.12" },
                k.seq, k.accum,
                if gc { "full" } else { "none" },
            )).unwrap().resolve().unwrap()
        };
        let p = autocast(k.batch);
        let e = estimate(&p).unwrap();
        let t = memplan::estimate::trace::trace(&p, 0).unwrap();
        for ((_, sum), want) in t.points().unwrap().iter().zip(e.per_gpu.timeline.iter()) {
            prop_assert_eq!(*sum, want.allocated_bytes.get(), "{:?}", want);
        }
        prop_assert_eq!(t.peak().unwrap().0, e.per_gpu.peak_allocated_bytes.get());
        let bigger = estimate(&autocast(k.batch + 1)).unwrap().per_gpu.peak_allocated_bytes;
        prop_assert!(bigger >= e.per_gpu.peak_allocated_bytes);
    }

    /// `estimate` reports the most loaded pipeline stage having looked at the first and the
    /// last only ("they bound every stage"); `estimate_stage` estimates each stage alone, and
    /// each stage's own event trace, walked independently, peaks at that stage's figure.
    #[test]
    fn the_most_loaded_stage_is_the_highest_of_every_stage(
        k in knobs(),
        pp in prop::sample::select(&[2u64, 4][..]),
        schedule in prop::sample::select(&["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"][..]),
    ) {
        let model = if pp == 4 { "small" } else { k.model };
        let virtual_stages = if schedule == "interleaved-1f1b" { 2 } else { 1 };
        let Ok(plan) = serde_json::from_str::<PlanFile>(&format!(
            r#"{{"model":"{model}","num_gpus":{},"parallel":{{"pp":{pp},"pp_schedule":"{schedule}","pp_virtual_stages":{virtual_stages}}},
                "batch":{{"micro_batch_size":{},"seq_len":{},"grad_accum_steps":{}}},
                "activation_checkpointing":"{}","offload":"{}"}}"#,
            pp << k.shard_pow.min(3), k.batch, k.seq, k.accum * pp, k.ac, k.offload
        )).unwrap().resolve() else {
            // Too few layers for the stages: refused, which no_input_panics covers.
            return Ok(());
        };
        let e = estimate(&plan).unwrap();
        let stages: Vec<_> = (0..pp)
            .map(|s| memplan::estimate::estimate_stage(&plan, s).unwrap())
            .collect();
        let highest = stages.iter().map(|s| s.per_gpu.peak_allocated_bytes).max().unwrap();
        prop_assert_eq!(e.per_gpu.peak_allocated_bytes, highest);
        prop_assert_eq!(
            &stages[e.per_gpu.stage as usize].per_gpu.breakdown,
            &e.per_gpu.breakdown
        );
        for (s, st) in stages.iter().enumerate() {
            prop_assert_eq!(st.per_gpu.stage, s as u64);
            let t = memplan::estimate::trace::trace(&plan, s as u64).unwrap();
            prop_assert_eq!(t.peak().unwrap().0, st.per_gpu.peak_allocated_bytes.get(), "stage {}", s);
        }
    }

    #[test]
    fn more_sharding_never_raises_per_gpu_bytes(k in knobs()) {
        prop_assume!(k.shard_pow < 6);
        let more = Knobs { shard_pow: k.shard_pow + 1, ..k.clone() };
        // Going from one rank to two turns plain fp32 training into FSDP, which adds gathered
        // copies; the invariant is about sharding an already sharded plan further.
        prop_assume!(k.shard_pow > 0 || k.dtypes.0 != k.dtypes.1);
        // FSDP2 pads every dim 0 to a multiple of the degree; where the padding of the
        // gathered buffers outgrows what the shard saves (tiny models over 64 ranks) more
        // sharding can cost bytes. The invariant holds where no tensor is padded.
        let m = memplan::profiles::model(k.model).unwrap();
        let n = 1u64 << (k.shard_pow + 1);
        prop_assume!([m.hidden, m.kv_dim(), m.intermediate, m.vocab].iter().all(|d| d % n == 0));
        prop_assert!(peak(&more) <= peak(&k), "{} > {}", peak(&more), peak(&k));
    }

    #[test]
    fn offload_never_raises_gpu_bytes(k in knobs()) {
        let none = peak(&Knobs { offload: "none", ..k.clone() });
        let opt = peak(&Knobs { offload: "optimizer", ..k.clone() });
        let full = peak(&Knobs { offload: "full", ..k.clone() });
        prop_assert!(opt <= none && full <= opt, "{none} {opt} {full}");
    }

    #[test]
    fn bytes_never_fall_as_batch_or_sequence_grow(k in knobs()) {
        let base = peak(&k);
        let bigger_batch = peak(&Knobs { batch: k.batch + 1, ..k.clone() });
        let longer_seq = peak(&Knobs { seq: k.seq * 2, ..k.clone() });
        prop_assert!(bigger_batch >= base, "batch: {} < {}", bigger_batch, base);
        prop_assert!(longer_seq >= base, "seq: {} < {}", longer_seq, base);
    }

    /// Any values at all in a plan file: an error or an estimate, never a panic.
    #[test]
    fn no_input_panics(
        model in prop::sample::select(MODELS),
        n in any::<i64>(), dp in any::<i64>(), tp in any::<i64>(), pp in any::<i64>(),
        cp in any::<i64>(), b in any::<i64>(), s in any::<i64>(), acc in any::<i64>(),
        small in prop::collection::vec(1i64..64, 8),
        pick in any::<u8>(),
    ) {
        // Mix arbitrary values with small plausible ones so both paths are exercised.
        let v = |i: usize, x: i64| if pick & (1 << (i % 8)) != 0 { x } else { small[i] };
        let json = format!(
            r#"{{"model":"{model}","num_gpus":{},"parallel":{{"dp_shard":{},"tp":{},"pp":{},"cp":{}}},
                "batch":{{"micro_batch_size":{},"seq_len":{},"grad_accum_steps":{}}}}}"#,
            v(0, n), v(1, dp), v(2, tp), v(3, pp), v(4, cp), v(5, b), v(6, s), v(7, acc)
        );
        let file: PlanFile = serde_json::from_str(&json).unwrap();
        if let Ok(p) = file.resolve() {
            let _ = estimate(&p);
        }
    }
}
