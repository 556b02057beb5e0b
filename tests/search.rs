//! Plan search and max-batch, checked against exhaustive scans and re-estimates.

use memplan::estimate::estimate;
use memplan::plan::{Checkpointing, Offload, PlanFile};
use memplan::search::{max_micro_batch, search, Constraints, RankBy};

fn file(json: &str) -> PlanFile {
    serde_json::from_str(json).unwrap()
}

fn constraints() -> Constraints {
    Constraints {
        max_micro_batch: 64,
        headroom_milli: 50,
        rank_by: RankBy::Tokens,
        ..Constraints::default()
    }
}

const SEED: &str = r#"{"model":"llama3-8b","gpu":"rtx-a6000-48g","num_gpus":2,"gpus_per_node":2,
    "host_ram":"256GB","batch":{"seq_len":2048}}"#;

fn fits_with_headroom(plan: &memplan::plan::Plan, headroom_milli: u64) -> bool {
    let e = estimate(plan).unwrap();
    let cap = plan.gpu.memory_bytes.get();
    e.per_gpu.device_total_bytes.get() <= cap - cap / 1000 * headroom_milli && e.fits_host
}

#[test]
fn seed_question_no_plan_without_offload_fits_on_two_48gb_gpus() {
    let r = search(&file(SEED), &constraints()).unwrap();
    assert_eq!(r.offload_modes_without_fit(), vec![Offload::None]);
    let best = r.best_per_offload();
    assert!(best.iter().any(|c| c.plan.offload == Offload::Full));
    assert!(best.iter().any(|c| c.plan.offload == Offload::Optimizer));
}

#[test]
fn max_batch_agrees_with_a_linear_scan() {
    for json in [
        memplan::plan::EXAMPLES[1].1,
        r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"batch":{"seq_len":8192},"activation_checkpointing":"selective-op"}"#,
        r#"{"model":"mixtral-8x7b","gpu":"h100-80g","num_gpus":16,"parallel":{"ep":8},"batch":{"seq_len":4096},"activation_checkpointing":"full"}"#,
    ] {
        let plan = file(json).resolve().unwrap();
        let mut n = 0;
        let found = max_micro_batch(&plan, 64, 50, &mut n)
            .unwrap()
            .map(|(mb, _)| mb);
        let mut scan = None;
        for mb in 1..=64 {
            let mut p = plan.clone();
            p.batch.micro_batch_size = mb;
            if fits_with_headroom(&p, 50) {
                scan = Some(mb);
            }
        }
        assert_eq!(found, scan, "{json}");
        assert!(n <= 8, "binary search used {n} estimates");
    }
}

#[test]
fn every_candidate_fits_when_estimated_again_and_ranking_holds() {
    let r = search(&file(SEED), &constraints()).unwrap();
    assert!(!r.candidates.is_empty());
    for w in r.candidates.windows(2) {
        assert!(w[0].tokens_per_micro_step >= w[1].tokens_per_micro_step);
    }
    for c in &r.candidates {
        let par = &c.plan.parallel;
        assert_eq!(
            par.dp_replicate * par.dp_shard * par.tp * par.pp * par.cp,
            2
        );
        assert!(fits_with_headroom(&c.plan, 50));
        let mut bigger = c.plan.clone();
        bigger.batch.micro_batch_size += 1;
        assert!(
            c.plan.batch.micro_batch_size == 64 || !fits_with_headroom(&bigger, 50),
            "micro-batch {} is not the largest",
            c.plan.batch.micro_batch_size
        );
    }
}

#[test]
fn constraints_pin_what_they_name() {
    let mut c = constraints();
    c.tp = Some(2);
    c.ac = Some(Checkpointing::Full);
    c.offload = Some(Offload::Full);
    let r = search(
        &file(r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"batch":{"seq_len":4096}}"#),
        &c,
    )
    .unwrap();
    assert!(!r.candidates.is_empty());
    assert!(r.candidates.iter().all(|x| x.plan.parallel.tp == 2
        && x.plan.activation_checkpointing == Checkpointing::Full
        && x.plan.offload == Offload::Full));
}

#[test]
fn ranking_by_time_orders_by_estimated_throughput() {
    let mut c = constraints();
    c.rank_by = RankBy::Time;
    let r = search(
        &file(r#"{"model":"llama3-8b","gpu":"h100-80g","num_gpus":8,"batch":{"seq_len":4096}}"#),
        &c,
    )
    .unwrap();
    for w in r.candidates.windows(2) {
        assert!(w[0].cost.tokens_per_s >= w[1].cost.tokens_per_s);
    }
    // On 8 x 80 GB an 8B model needs no offload; the fastest plan does not pay for it.
    assert_eq!(r.candidates[0].plan.offload, Offload::None);
}

#[test]
fn tokens_per_micro_step_do_not_wrap_at_the_largest_world_and_sequence() {
    // 2^24 GPUs x seq 2^24: micro-batch x seq x data-parallel ranks passes 2^64 for some
    // layouts, which once wrapped to 0 tokens. Every candidate's tokens are recomputed here.
    let f = file(
        r#"{"model":"llama3-8b","num_gpus":16777216,
            "batch":{"seq_len":16777216,"ignore_max_position":true}}"#,
    );
    let r = search(&f, &constraints()).unwrap();
    assert!(!r.candidates.is_empty());
    for c in &r.candidates {
        let p = &c.plan;
        let dp = p.num_gpus / (p.parallel.tp * p.parallel.pp * p.parallel.cp);
        let want = p.batch.micro_batch_size as u128 * p.batch.seq_len as u128 * dp as u128;
        assert_eq!(c.tokens_per_micro_step, want);
        assert!(c.tokens_per_micro_step > 0);
        assert!(c.cost.tokens_per_step > 0 && c.cost.tokens_per_s.is_finite());
    }
}

/// "The largest LoRA rank and batch that fit on one 24 GB GPU for llama3-8b": the search over
/// ranks answers with every rank that fits (at its largest micro-batch), and the largest rank
/// it lists is the largest of those tried whose plan fits at micro-batch 1 with full
/// checkpointing, checked plan by plan with the estimator.
#[test]
fn search_finds_the_largest_lora_rank_that_fits() {
    let base = file(
        r#"{"model":"llama3-8b","gpu":"rtx4090-24g","num_gpus":1,"preset":"hf-transformers",
            "precision":{"param":"bf16","master":"fp32","reduce":"bf16"},
            "batch":{"seq_len":2048},"lora":{"targets":"all-linear"}}"#,
    );
    let ranks = [8, 16, 32, 64, 128, 256];
    let c = Constraints {
        lora_ranks: ranks.to_vec(),
        ..constraints()
    };
    let r = search(&base, &c).unwrap();
    assert!(!r.candidates.is_empty());
    // Only what a LoRA plan allows was tried: no offload, no selective checkpointing.
    assert!(r.candidates.iter().all(|c| c.plan.offload == Offload::None
        && matches!(
            c.plan.activation_checkpointing,
            Checkpointing::None | Checkpointing::Full
        )));
    let found = r
        .candidates
        .iter()
        .map(|c| c.plan.lora.unwrap().rank)
        .max()
        .unwrap();
    let fits_at = |rank: u64| {
        let mut f = base.clone();
        f.lora.as_mut().unwrap().rank = Some(rank as i64);
        f.activation_checkpointing = Some("full".into());
        f.batch.micro_batch_size = Some(1);
        fits_with_headroom(&f.resolve().unwrap(), 50)
    };
    let want = ranks.iter().copied().filter(|&r| fits_at(r)).max().unwrap();
    assert_eq!(found, want);
    assert!(want < 256, "a 24 GB GPU does not fit every rank tried");
}
