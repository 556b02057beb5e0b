//! The caching-allocator simulation (`memplan::allocator`), rule by rule, with byte counts
//! derived by hand from the rules of c10/cuda/CUDACachingAllocator.cpp.

use std::time::Instant;

use std::collections::{HashMap, HashSet};

use memplan::allocator::{replay, AllocConf, Event, SegmentEvent, SegmentOp, SimError, Simulator};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn sim() -> Simulator {
    Simulator::new(AllocConf::default(), None)
}

fn conf(s: &str) -> AllocConf {
    AllocConf::parse(s).unwrap()
}

#[test]
fn rounds_requests_to_multiples_of_512_bytes() {
    let mut s = sim();
    s.alloc(1, 1, 0).unwrap(); // 1 B -> 512 B
    assert_eq!(s.allocated().get(), 512);
    s.alloc(2, 513, 0).unwrap(); // 513 B -> 1024 B
    assert_eq!(s.allocated().get(), 512 + 1024);
    // Both come from one 2 MiB small segment.
    assert_eq!(s.reserved().get(), 2 * MIB);
    assert_eq!(s.segments(), 1);
}

#[test]
fn zero_byte_allocations_take_nothing() {
    let mut s = sim();
    s.alloc(1, 0, 0).unwrap();
    assert_eq!((s.allocated().get(), s.reserved().get()), (0, 0));
    s.free(1).unwrap();
}

#[test]
fn small_request_takes_a_2_mib_segment_and_later_ones_split_it() {
    let mut s = sim();
    s.alloc(1, 1000, 0).unwrap(); // 1024 B, new 2 MiB segment, split
    assert_eq!(s.reserved().get(), 2 * MIB);
    for id in 2..=4 {
        s.alloc(id, 512 * KIB, 0).unwrap();
    }
    // 1024 + 3 * 524,288 = 1,573,888 B used of 2,097,152: still one segment.
    assert_eq!(s.allocated().get(), 1_573_888);
    assert_eq!(s.reserved().get(), 2 * MIB);
    // 2,097,152 - 1,573,888 = 523,264 B left < 524,288: a second 2 MiB segment.
    s.alloc(5, 512 * KIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 4 * MIB);
    assert_eq!(s.segments(), 2);
}

#[test]
fn five_mib_takes_a_20_mib_segment_and_the_next_splits_the_remainder() {
    let mut s = sim();
    s.alloc(1, 5 * MIB, 0).unwrap(); // < 10 MiB: 20 MiB segment, 15 MiB remain (> 1 MiB)
    assert_eq!(s.reserved().get(), 20 * MIB);
    assert_eq!(s.allocated().get(), 5 * MIB);
    s.alloc(2, 5 * MIB, 0).unwrap(); // from the 15 MiB remainder, 10 MiB remain
    assert_eq!(s.reserved().get(), 20 * MIB);
    assert_eq!(s.allocated().get(), 10 * MIB);
    // 9 MiB from the 10 MiB block leaves exactly 1 MiB: not more than kSmallSize, so the
    // block is not split and the whole 10 MiB counts as allocated.
    s.alloc(3, 9 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 20 * MIB);
    assert_eq!(s.allocated().get(), 20 * MIB);
    assert_eq!(s.largest_free_block().get(), 0);
}

#[test]
fn eleven_mib_gets_exactly_a_12_mib_segment() {
    let mut s = sim();
    s.alloc(1, 11 * MIB, 0).unwrap(); // >= 10 MiB: rounded up to a 2 MiB multiple
    assert_eq!(s.reserved().get(), 12 * MIB);
    // 1 MiB would remain: no split, the block is 12 MiB.
    assert_eq!(s.allocated().get(), 12 * MIB);
}

#[test]
fn freed_neighbours_coalesce_so_a_bigger_request_reuses_them() {
    let mut s = sim();
    for id in 1..=3 {
        s.alloc(id, 5 * MIB, 0).unwrap(); // [A 5][B 5][C 5][free 5] in one 20 MiB segment
    }
    s.free(1).unwrap();
    s.free(2).unwrap(); // A and B merge: [free 10][C 5][free 5]
    assert_eq!(s.largest_free_block().get(), 10 * MIB);
    s.alloc(4, 8 * MIB, 0).unwrap(); // best fit 10 MiB, 2 MiB remain (> 1 MiB): split
    assert_eq!(s.reserved().get(), 20 * MIB);
    assert_eq!(s.segments(), 1);
    s.free(3).unwrap(); // C merges with the 2 MiB before and the 5 MiB after: 12 MiB
    assert_eq!(s.largest_free_block().get(), 12 * MIB);
    s.alloc(5, 12 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 20 * MIB);
    assert_eq!(s.allocated().get(), 20 * MIB);
}

#[test]
fn a_block_freed_on_another_stream_is_not_reused() {
    let mut s = sim();
    s.alloc(1, 5 * MIB, 0).unwrap();
    s.free(1).unwrap();
    s.alloc(2, 5 * MIB, 1).unwrap(); // stream 1 cannot use stream 0's cache
    assert_eq!(s.reserved().get(), 40 * MIB);
    s.alloc(3, 5 * MIB, 0).unwrap(); // stream 0 reuses its own
    assert_eq!(s.reserved().get(), 40 * MIB);
    assert_eq!(s.segments(), 2);
}

#[test]
fn max_split_size_keeps_large_cached_blocks_whole() {
    // Default: a cached 100 MiB segment is split for a 30 MiB request.
    let mut s = sim();
    s.alloc(1, 100 * MIB, 0).unwrap();
    s.free(1).unwrap();
    s.alloc(2, 30 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 100 * MIB);

    // max_split_size_mb:20: the 100 MiB block is oversize. A 30 MiB request (>= 20 MiB) may
    // take it only if it is less than 30 + 20 = 50 MiB: no, so a new 30 MiB segment.
    let mut s = Simulator::new(conf("max_split_size_mb:20"), None);
    s.alloc(1, 100 * MIB, 0).unwrap();
    s.free(1).unwrap();
    s.alloc(2, 30 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 130 * MIB);
    // A 5 MiB request (< 20 MiB) never takes an oversize block: a new 20 MiB segment.
    s.alloc(3, 5 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 150 * MIB);
    // An 85 MiB request takes the 100 MiB block whole (100 < 85 + 20), unsplit.
    s.alloc(4, 85 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 150 * MIB);
    assert_eq!(s.allocated().get(), 30 * MIB + 5 * MIB + 100 * MIB);
}

#[test]
fn max_non_split_rounding_widens_the_oversize_reuse_window() {
    // With a 60 MiB window the 100 MiB block serves a 45 MiB request (100 < 45 + 60).
    let mut s = Simulator::new(
        conf("max_split_size_mb:20,max_non_split_rounding_mb:60"),
        None,
    );
    s.alloc(1, 100 * MIB, 0).unwrap();
    s.free(1).unwrap();
    s.alloc(2, 45 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 100 * MIB);
    assert_eq!(s.allocated().get(), 100 * MIB);
}

#[test]
fn a_freed_segment_is_reused_rather_than_growing_reserved() {
    let mut s = sim();
    s.alloc(1, 64 * MIB, 0).unwrap();
    s.free(1).unwrap();
    s.alloc(2, 64 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 64 * MIB);
    s.free(2).unwrap();
    s.alloc(3, 40 * MIB, 0).unwrap(); // split: 24 MiB remain cached
    assert_eq!(s.reserved().get(), 64 * MIB);
    assert_eq!(s.counters().device_allocs, 1);
    assert_eq!(s.peak_reserved().get(), 64 * MIB);
}

#[test]
fn oom_path_releases_unsplit_cached_segments_then_fails() {
    let mut s = Simulator::new(AllocConf::default(), Some(100 * MIB));
    s.alloc(1, 30 * MIB, 1).unwrap(); // a 30 MiB segment on stream 1
    s.free(1).unwrap(); // cached
                        // 80 MiB on stream 0: nothing to reuse; 30 + 80 > 100, so the allocator frees every
                        // unsplit cached segment (stream 1's 30 MiB too) and retries: 80 <= 100.
    s.alloc(2, 80 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 80 * MIB);
    assert_eq!(s.peak_reserved().get(), 80 * MIB);
    assert_eq!(s.counters().device_frees, 1);
    assert_eq!(s.counters().alloc_retries, 1);
    // 30 MiB more: 80 + 30 > 100 and nothing is cached.
    match s.alloc(3, 30 * MIB, 0) {
        Err(SimError::Oom(o)) => {
            assert_eq!(o.alloc_size, 30 * MIB);
            assert_eq!(o.allocated, 80 * MIB);
            assert_eq!(o.reserved, 80 * MIB);
            assert_eq!(o.capacity, 100 * MIB);
        }
        other => panic!("expected OOM, got {other:?}"),
    }
    assert_eq!(s.counters().ooms, 1);
}

#[test]
fn oom_path_cannot_release_a_segment_that_is_partly_in_use() {
    let mut s = Simulator::new(AllocConf::default(), Some(100 * MIB));
    s.alloc(1, 5 * MIB, 0).unwrap(); // 20 MiB segment, split
    s.alloc(2, 5 * MIB, 0).unwrap();
    s.free(1).unwrap(); // 5 MiB free, but the segment is split (2 is live)
                        // 82 MiB: 20 + 82 > 100; the split segment cannot be released.
    let err = s.alloc(3, 82 * MIB, 0).unwrap_err();
    let SimError::Oom(o) = err else {
        panic!("expected OOM")
    };
    assert_eq!((o.allocated, o.reserved), (5 * MIB, 20 * MIB));
    assert!(
        o.to_string().contains("15.00 MiB reserved but unallocated"),
        "{o}"
    );
}

#[test]
fn max_split_size_releases_oversize_blocks_before_everything() {
    // release_available_cached_blocks: with max_split_size set, the smallest oversize
    // cached block of the stream that covers the request is freed first.
    let mut s = Simulator::new(conf("max_split_size_mb:20"), Some(200 * MIB));
    s.alloc(1, 120 * MIB, 0).unwrap();
    s.alloc(2, 60 * MIB, 0).unwrap();
    s.free(1).unwrap();
    // 70 MiB: the cached 120 MiB is oversize and >= 70 + 20, so not reused; 180 + 70 >
    // 200, so the 120 MiB block is released and 70 MiB allocated: 60 + 70 = 130 MiB.
    s.alloc(3, 70 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 130 * MIB);
    assert_eq!(s.counters().alloc_retries, 0);
}

#[test]
fn expandable_segments_map_whole_pages_instead_of_new_segments() {
    let mut s = Simulator::new(conf("expandable_segments:True"), None);
    s.alloc(1, 5 * MIB, 0).unwrap(); // one 20 MiB large page; 15 MiB free after it
    assert_eq!(s.reserved().get(), 20 * MIB);
    // 30 MiB: the free 15 MiB plus one more 20 MiB page (35 MiB), 5 MiB remain free.
    s.alloc(2, 30 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 40 * MIB); // non-expandable: 20 + 30 = 50 MiB
    assert_eq!(s.segments(), 1);
    s.alloc(3, 1000, 0).unwrap(); // the small pool has its own segment of 2 MiB pages
    assert_eq!(s.reserved().get(), 42 * MIB);
    s.free(1).unwrap();
    s.free(2).unwrap(); // all 40 MiB merge into one free block
    assert_eq!(s.largest_free_block().get(), 40 * MIB);
    s.alloc(4, 40 * MIB, 0).unwrap();
    assert_eq!(s.reserved().get(), 42 * MIB);
}

#[test]
fn expandable_segments_unmap_free_pages_when_out_of_memory() {
    let mut s = Simulator::new(conf("expandable_segments:True"), Some(60 * MIB));
    s.alloc(1, 30 * MIB, 0).unwrap(); // two 20 MiB pages
    assert_eq!(s.reserved().get(), 40 * MIB);
    s.free(1).unwrap();
    // Stream 1 cannot use stream 0's segment; 40 + 30 > 60, so free pages are unmapped
    // (stream 0's segment empties and goes) and stream 1 maps its own two pages.
    s.alloc(2, 30 * MIB, 1).unwrap();
    assert_eq!(s.reserved().get(), 40 * MIB);
    assert_eq!(s.segments(), 1);
    assert_eq!(s.counters().alloc_retries, 1);
}

#[test]
fn rejects_bad_alloc_conf_strings_naming_the_key() {
    for (text, needle) in [
        ("max_split_size_mb:10", "max_split_size_mb"),
        ("max_split_size_mb:ten", "max_split_size_mb"),
        (
            "garbage_collection_threshold:0.6",
            "garbage_collection_threshold",
        ),
        ("expandable_segments:yes", "expandable_segments"),
        ("max_split_size:64", "max_split_size"),
        ("roundup_power2_divisions:[100:2]", "100"),
        ("roundup_power2_divisions:3", "roundup_power2_divisions"),
        ("roundup_power2_divisions:[256:2", "]"),
        ("expandable_segments", "expandable_segments"),
        ("backend:cudaMallocAsync", "cudaMallocAsync"),
    ] {
        let err = AllocConf::parse(text).unwrap_err();
        assert_eq!(err.field(), Some("--alloc-conf"), "{text}");
        assert!(err.to_string().contains(needle), "{text}: {err}");
    }
}

#[test]
fn accepts_the_documented_alloc_conf_forms() {
    let c = conf("max_split_size_mb:512, roundup_power2_divisions:[256:1,512:2,>:8],expandable_segments:False");
    assert_eq!(c.max_split_size, 512 * MIB);
    assert_eq!(c.divisions_for(1 << 30), 8);
    assert!(!c.expandable_segments);
}

#[test]
fn replay_rejects_a_free_of_an_unknown_id() {
    let err = replay(&[Event::Free { id: 7 }], &AllocConf::default(), None).unwrap_err();
    assert!(err.to_string().contains("7"), "{err}");
}

/// FSDP-like step on one rank: stream 0 computes, stream 1 all-gathers, stream 2
/// reduce-scatters. Four layers, parameter shards of 24 MiB, unsharded layers of 96 MiB,
/// 40 MiB of saved activations per layer, 250 MiB of logits.
fn fsdp_like_trace() -> Vec<Event> {
    let mut ev = Vec::new();
    let alloc = |ev: &mut Vec<Event>, id: u64, mib: u64, stream: u32| {
        ev.push(Event::Alloc {
            id,
            bytes: mib * MIB,
            stream,
        })
    };
    let free = |ev: &mut Vec<Event>, id: u64| ev.push(Event::Free { id });
    for l in 0..4 {
        alloc(&mut ev, 100 + l, 24, 0); // parameter shard
    }
    for l in 0..4 {
        alloc(&mut ev, 200 + l, 96, 1); // all-gathered layer
        alloc(&mut ev, 300 + l, 40, 0); // saved activations
        free(&mut ev, 200 + l);
    }
    alloc(&mut ev, 400, 250, 0); // logits
    free(&mut ev, 400);
    alloc(&mut ev, 401, 100, 0); // grad of logits
    free(&mut ev, 401);
    for l in (0..4).rev() {
        alloc(&mut ev, 500 + l, 96, 1); // all-gather again
        alloc(&mut ev, 600 + l, 96, 0); // unsharded gradient
        free(&mut ev, 300 + l);
        free(&mut ev, 500 + l);
        alloc(&mut ev, 700 + l, 24, 2); // reduce-scattered gradient shard, kept
        free(&mut ev, 600 + l);
    }
    ev
}

#[test]
fn fsdp_like_step_reserves_what_the_rules_predict() {
    let r = replay(&fsdp_like_trace(), &AllocConf::default(), None).unwrap();
    // Reserved, by hand (MiB): 4 shard segments of 24 = 96; the all-gather stream's one
    // 96 MiB segment is cached and reused by every later all-gather (+96 = 192); four
    // activation segments of 40 (+160 = 352); the logits segment of 250 (602), which the
    // grad of logits and then every unsharded gradient split (96 of 250, 154 remain);
    // four kept gradient shards on stream 2, each a new 24 MiB segment (+96 = 698).
    assert_eq!(r.peak_reserved_bytes.get(), 698 * MIB);
    assert_eq!(r.reserved_bytes.get(), 698 * MIB);
    // Allocated peaks at the logits: 96 shards + 160 activations + 250 = 506 MiB (the
    // backward peak is 96 + 160 + 96 + 96 = 448 MiB).
    assert_eq!(r.peak_allocated_bytes.get(), 506 * MIB);
    assert!(r.peak_reserved_bytes >= r.peak_allocated_bytes);
    // At the end: shards and gradient shards, 96 + 96 MiB.
    assert_eq!(r.allocated_bytes.get(), 192 * MIB);
    assert_eq!(r.device_allocs, 14);
    assert_eq!(r.reserved_after.len(), fsdp_like_trace().len());
    assert!(r.oom.is_none());
}

#[test]
fn fsdp_like_step_releases_cache_under_a_tighter_capacity() {
    // 600 MiB, by hand (MiB): 352 reserved before the logits; 352 + 250 > 600, so the
    // cached all-gather segment (96) is released: 256 + 250 = 506. The backward
    // all-gather: 506 + 96 > 600, so the free, unsplit logits segment is released:
    // 256 + 96 = 352; the first unsharded gradient takes a new 96 (448) that later
    // gradients reuse; four gradient shards +96: 544 MiB at the end, and the peak.
    let r = replay(&fsdp_like_trace(), &AllocConf::default(), Some(600 * MIB)).unwrap();
    assert!(r.oom.is_none());
    assert_eq!(r.peak_reserved_bytes.get(), 544 * MIB);
    assert_eq!(r.reserved_bytes.get(), 544 * MIB);
    assert_eq!((r.alloc_retries, r.device_frees), (2, 2));
    assert!(r.reserved_after.iter().all(|&b| b <= 600 * MIB));
}

#[test]
fn fsdp_like_step_runs_out_of_memory_at_the_logits() {
    // 500 MiB: at the logits (event 16: 4 shards, then 3 events per forward layer),
    // releasing the cached all-gather segment leaves 256 + 250 = 506 > 500.
    let r = replay(&fsdp_like_trace(), &AllocConf::default(), Some(500 * MIB)).unwrap();
    let oom = r.oom.expect("out of memory");
    assert_eq!((oom.event, oom.id), (16, 400));
    assert_eq!(oom.alloc_size_bytes, 250 * MIB);
    assert_eq!(
        (oom.allocated_bytes, oom.reserved_bytes),
        (256 * MIB, 256 * MIB)
    );
    assert_eq!(r.reserved_after.len(), 16);
    assert_eq!(r.peak_reserved_bytes.get(), 352 * MIB);
}

/// A deterministic pseudo-random trace of `n` events (xorshift), mixing small and large
/// sizes on two streams, with at most 512 live allocations.
fn random_trace(n: usize) -> Vec<Event> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut live: Vec<u64> = Vec::new();
    let mut ev = Vec::with_capacity(n);
    let mut id = 0;
    while ev.len() < n {
        let r = next();
        if !live.is_empty() && (r % 2 == 0 || live.len() >= 512) {
            let k = (next() as usize) % live.len();
            ev.push(Event::Free {
                id: live.swap_remove(k),
            });
        } else {
            let bytes = match r % 3 {
                0 => 1 + next() % (1 << 20),
                1 => 1 + next() % (64 << 20),
                _ => 1 + next() % (512 << 20),
            };
            ev.push(Event::Alloc {
                id,
                bytes,
                stream: (next() % 2) as u32,
            });
            live.push(id);
            id += 1;
        }
    }
    ev
}

#[test]
fn random_traces_keep_reserved_at_least_allocated() {
    for text in ["", "max_split_size_mb:128", "expandable_segments:True"] {
        let events = random_trace(10_000);
        let conf = conf(text);
        // Timing is printed (`cargo test --release -- --nocapture`), never asserted.
        let mut took = std::time::Duration::MAX;
        let mut r = None;
        for _ in 0..10 {
            let start = Instant::now();
            r = Some(replay(&events, &conf, None).unwrap());
            took = took.min(start.elapsed());
        }
        let r = r.unwrap();
        println!("replay of 10^4 random events ({text:?}): best of 10 {took:?}");
        assert!(r.peak_reserved_bytes >= r.peak_allocated_bytes, "{text}");
        assert_eq!(r.reserved_after.len(), events.len());

        // Under a capacity of half the unbounded peak, reserved never exceeds it.
        let cap = r.peak_reserved_bytes.get() / 2;
        let r = replay(&events, &conf, Some(cap)).unwrap();
        assert!(r.reserved_after.iter().all(|&b| b <= cap), "{text}");
    }
}

// ---------------------------------------------------------------------------------------
// Simulated addresses, the segment log and the segment listing (for memory snapshots).

/// Reserved bytes a segment log implies: allocs and maps add, frees and unmaps subtract.
fn logged_reserved(log: &[SegmentEvent]) -> i128 {
    log.iter()
        .map(|s| match s.op {
            SegmentOp::Alloc | SegmentOp::Map => i128::from(s.size),
            SegmentOp::Free | SegmentOp::Unmap => -i128::from(s.size),
        })
        .sum()
}

#[test]
fn block_of_gives_rounded_blocks_at_their_segments_offsets() {
    let mut s = sim();
    s.log_segments(true);
    s.alloc(1, 3 * MIB, 0).unwrap(); // new 20 MiB segment, split: block of 3 MiB
    s.alloc(2, 5 * MIB + 100, 0).unwrap(); // 5 MiB + 512 from the 17 MiB remainder
                                           // Small pool: 1024 B in a new 2 MiB segment.
    s.alloc(3, 1000, 0).unwrap();
    // 12 MiB - 512 B remain in the first segment: too little for 13 MiB, which takes a
    // 14 MiB segment (>= 10 MiB: 2 MiB multiples); 1 MiB is left, so it is not split.
    s.alloc(4, 13 * MIB, 0).unwrap();
    s.alloc(5, 0, 0).unwrap(); // null pointer, no block
    let log: Vec<SegmentEvent> = s.drain_segment_events().collect();
    let segs: Vec<(SegmentOp, u64, bool)> = log.iter().map(|e| (e.op, e.size, e.small)).collect();
    assert_eq!(
        segs,
        [
            (SegmentOp::Alloc, 20 * MIB, false),
            (SegmentOp::Alloc, 2 * MIB, true),
            (SegmentOp::Alloc, 14 * MIB, false),
        ]
    );
    let (a1, s1) = s.block_of(1).unwrap();
    let (a2, s2) = s.block_of(2).unwrap();
    let (a3, s3) = s.block_of(3).unwrap();
    let (a4, s4) = s.block_of(4).unwrap();
    assert_eq!((a1, s1), (log[0].addr, 3 * MIB)); // the front of its segment
    assert_eq!((a2, s2), (a1 + 3 * MIB, 5 * MIB + 512)); // right after it
    assert_eq!((a3, s3), (log[1].addr, 1024));
    assert_eq!((a4, s4), (log[2].addr, 14 * MIB));
    assert_eq!(s.block_of(5), None);
    assert_eq!(s.block_of(6), None);
    // Freed and allocated again with a fitting size: the cached block at the same address.
    s.free(2).unwrap();
    assert_eq!(s.block_of(2), None);
    s.alloc(6, 4 * MIB, 0).unwrap();
    assert_eq!(s.block_of(6), Some((a2, 4 * MIB)));
    assert_eq!(
        s.drain_segment_events().count(),
        0,
        "a cache hit logs nothing"
    );
}

#[test]
fn segment_infos_list_segments_with_blocks_tiling_them() {
    let mut s = sim();
    s.alloc(1, 3 * MIB, 0).unwrap();
    s.alloc(2, 1000, 1).unwrap();
    s.alloc(3, 2 * MIB, 0).unwrap();
    s.free(1).unwrap();
    let segs = s.segment_infos();
    assert_eq!(segs.len(), 2);
    let (large, small) = if segs[0].small {
        (&segs[1], &segs[0])
    } else {
        (&segs[0], &segs[1])
    };
    assert_eq!(
        (large.size, large.stream, large.expandable),
        (20 * MIB, 0, false)
    );
    let blocks: Vec<(u64, Option<u64>)> = large.blocks.iter().map(|b| (b.size, b.id)).collect();
    // 3 MiB freed (cached), 2 MiB live, 15 MiB never used.
    assert_eq!(
        blocks,
        [(3 * MIB, None), (2 * MIB, Some(3)), (15 * MIB, None)]
    );
    assert_eq!(large.blocks[1].addr, s.block_of(3).unwrap().0);
    assert_eq!((small.size, small.stream), (2 * MIB, 1));
    let blocks: Vec<(u64, Option<u64>)> = small.blocks.iter().map(|b| (b.size, b.id)).collect();
    assert_eq!(blocks, [(1024, Some(2)), (2 * MIB - 1024, None)]);
}

#[test]
fn oom_path_logs_the_released_segment_before_the_new_one() {
    let mut s = Simulator::new(AllocConf::default(), Some(30 * MIB));
    s.log_segments(true);
    // 5 MiB takes a 20 MiB segment; freed, the segment is cached whole: releasable.
    // Stream 1 cannot use stream 0's cache, and 20 + 12 > 30 MiB: release, then allocate.
    s.alloc(1, 5 * MIB, 0).unwrap();
    s.free(1).unwrap();
    s.alloc(2, 11 * MIB, 1).unwrap();
    let log: Vec<(SegmentOp, u64, u32)> = s
        .drain_segment_events()
        .map(|e| (e.op, e.size, e.stream))
        .collect();
    assert_eq!(
        log,
        [
            (SegmentOp::Alloc, 20 * MIB, 0),
            (SegmentOp::Free, 20 * MIB, 0),
            (SegmentOp::Alloc, 12 * MIB, 1),
        ]
    );
    // 12 + 26 > 30 MiB and the 12 MiB segment is in use: out of memory, nothing logged.
    assert!(matches!(s.alloc(3, 25 * MIB, 0), Err(SimError::Oom(_))));
    assert_eq!(s.drain_segment_events().count(), 0);
}

#[test]
fn expandable_segments_log_page_maps_and_unmaps() {
    let mut s = Simulator::new(conf("expandable_segments:True"), Some(50 * MIB));
    s.log_segments(true);
    // 5 MiB maps one 20 MiB page. The capacity check counts the next request's size
    // first: 20 + 30 <= 50 MiB.
    s.alloc(1, 5 * MIB, 0).unwrap();
    s.alloc(2, 30 * MIB, 0).unwrap(); // 15 MiB free + one more 20 MiB page
    s.free(2).unwrap();
    // Stream 1 has no segment and cannot use stream 0's: 40 + 12 > 50 MiB, so the free
    // whole page at [20, 40) MiB of stream 0's segment is unmapped, then stream 1 gets a
    // segment of its own with one 20 MiB page.
    s.alloc(3, 12 * MIB, 1).unwrap();
    let log: Vec<SegmentEvent> = s.drain_segment_events().collect();
    let base = log[0].addr;
    let ops: Vec<(SegmentOp, u64, u64, bool)> = log
        .iter()
        .map(|e| (e.op, e.addr.wrapping_sub(base), e.size, e.small))
        .collect();
    let other = log[3].addr.wrapping_sub(base);
    assert_eq!(
        ops,
        [
            (SegmentOp::Map, 0, 20 * MIB, false),
            (SegmentOp::Map, 20 * MIB, 20 * MIB, false),
            (SegmentOp::Unmap, 20 * MIB, 20 * MIB, false),
            (SegmentOp::Map, other, 20 * MIB, false),
        ]
    );
    assert_eq!(log[3].stream, 1);
    assert_eq!(logged_reserved(&log), i128::from(s.reserved().get()));
    assert_eq!(s.reserved().get(), 40 * MIB);
    // The listing: one mapped page per stream, the rest of each segment unmapped.
    let segs = s.segment_infos();
    let listed: Vec<(u64, u64, u32, bool)> = segs
        .iter()
        .map(|g| (g.addr.wrapping_sub(base), g.size, g.stream, g.expandable))
        .collect();
    assert_eq!(listed, [(0, 20 * MIB, 0, true), (other, 20 * MIB, 1, true)]);
    assert_eq!(s.block_of(1), Some((base, 5 * MIB)));
    assert_eq!(s.block_of(3), Some((base + other, 12 * MIB)));
}

#[test]
fn segment_log_is_off_by_default() {
    let mut s = sim();
    s.alloc(1, 5 * MIB, 0).unwrap();
    assert_eq!(s.drain_segment_events().count(), 0);
}

/// Replays `events` with the log on, skipping frees of allocations that ran out of memory,
/// and checks after every event what the segment log and listing must satisfy.
fn check_addresses_and_log(events: &[Event], conf: &AllocConf, capacity: Option<u64>) -> usize {
    let mut s = Simulator::new(conf.clone(), capacity);
    s.log_segments(true);
    let mut reserved_from_log: i128 = 0;
    let mut failed = HashSet::new();
    let mut ooms = 0;
    for (k, ev) in events.iter().enumerate() {
        match *ev {
            Event::Alloc { id, bytes, stream } => match s.alloc(id, bytes, stream) {
                Ok(()) => {}
                Err(SimError::Oom(_)) => {
                    failed.insert(id);
                    ooms += 1;
                }
                Err(e) => panic!("event {k}: {e}"),
            },
            Event::Free { id } if failed.contains(&id) => continue,
            Event::Free { id } => s.free(id).unwrap(),
        }
        let log: Vec<SegmentEvent> = s.drain_segment_events().collect();
        if !conf.expandable_segments {
            assert!(log
                .iter()
                .all(|e| matches!(e.op, SegmentOp::Alloc | SegmentOp::Free)));
        }
        reserved_from_log += logged_reserved(&log);
        assert_eq!(
            reserved_from_log,
            i128::from(s.reserved().get()),
            "event {k}"
        );

        if k % 101 != 0 && k + 1 != events.len() {
            continue; // the listing walks every block: check it now and then
        }
        let segs = s.segment_infos();
        let reserved: u64 = segs.iter().map(|g| g.size).sum();
        assert_eq!(reserved, s.reserved().get(), "event {k}");
        let mut owners = HashMap::new();
        let mut allocated = 0;
        for pair in segs.windows(2) {
            assert!(
                pair[0].addr + pair[0].size <= pair[1].addr,
                "segments overlap"
            );
        }
        for g in &segs {
            let mut at = g.addr;
            for b in &g.blocks {
                assert_eq!(b.addr, at, "blocks tile their segment (event {k})");
                assert!(b.size > 0 && b.size % 512 == 0);
                at += b.size;
                if let Some(id) = b.id {
                    assert_eq!(s.block_of(id), Some((b.addr, b.size)));
                    assert!(owners.insert(id, b.addr).is_none(), "id {id} listed twice");
                    allocated += b.size;
                }
            }
            assert_eq!(at, g.addr + g.size);
        }
        assert_eq!(allocated, s.allocated().get(), "event {k}");
        // Every live allocation with bytes is in the listing; since blocks tile disjoint
        // segments, no two live blocks overlap.
        let live_with_blocks = (0..=events.len() as u64).filter(|&id| s.block_of(id).is_some());
        assert_eq!(live_with_blocks.count(), owners.len());
    }
    ooms
}

#[test]
fn segment_log_and_listing_match_reserved_bytes_at_every_step() {
    let events = random_trace(3_000);
    for text in ["", "max_split_size_mb:128", "expandable_segments:True"] {
        let conf = conf(text);
        check_addresses_and_log(&events, &conf, None);
        // Under a third of the unbounded peak the OOM path releases and unmaps.
        let peak = replay(&events, &conf, None)
            .unwrap()
            .peak_reserved_bytes
            .get();
        let ooms = check_addresses_and_log(&events, &conf, Some(peak / 3));
        assert!(ooms > 0, "{text}: the capacity should bite");
    }
}

// ---------------------------------------------------------------------------------------
// Differential check against recorded outputs. The expected values in
// tests/data/allocator_golden.txt were written by the BTreeMap-based pools the simulator had
// before its free-block pools were rewritten for speed; any later change to the pools must
// reproduce them exactly, event by event. Regenerate (only for an intended change of
// behaviour) with `MEMPLAN_BLESS_ALLOCATOR=1 cargo test --test allocator golden`.

/// FNV-1a over 64-bit words.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn word(&mut self, w: u64) {
        for b in w.to_le_bytes() {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A trace of `n` events from `seed`: sizes log-uniform from 1 B to 1 GiB (some zero),
/// three streams, at most 400 live allocations.
fn golden_trace(seed: u64, n: usize) -> Vec<Event> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut live: Vec<u64> = Vec::new();
    let mut ev = Vec::with_capacity(n);
    let mut id = 1;
    while ev.len() < n {
        let r = next();
        if !live.is_empty() && (r % 16 < 7 || live.len() >= 400) {
            // Mostly LIFO-ish frees (as in training), sometimes random ones.
            let k = if r % 3 == 0 {
                live.len() - 1
            } else {
                (next() as usize) % live.len()
            };
            ev.push(Event::Free {
                id: live.swap_remove(k),
            });
        } else {
            let bytes = if r % 97 == 0 {
                0
            } else {
                1 + next() % (1u64 << (next() % 31))
            };
            ev.push(Event::Alloc {
                id,
                bytes,
                stream: (next() % 3) as u32,
            });
            live.push(id);
            id += 1;
        }
    }
    ev
}

/// Replays `events` (continuing past OOMs, skipping frees of failed allocations) and
/// summarises everything observable: reserved and allocated bytes after every event, every
/// block's address and size, the segment log, OOMs, and now and then the largest free block
/// and the segment listing (hashed), plus peaks, segments and counters.
fn golden_summary(events: &[Event], conf: &AllocConf, capacity: Option<u64>) -> String {
    let mut s = Simulator::new(conf.clone(), capacity);
    s.log_segments(true);
    let mut h = Fnv::new();
    let mut failed = HashSet::new();
    let (mut ooms, mut first_oom) = (0u64, None);
    for (k, ev) in events.iter().enumerate() {
        match *ev {
            Event::Alloc { id, bytes, stream } => match s.alloc(id, bytes, stream) {
                Ok(()) => {
                    let (a, b) = s.block_of(id).unwrap_or((0, 0));
                    h.word(a);
                    h.word(b);
                }
                Err(SimError::Oom(o)) => {
                    failed.insert(id);
                    ooms += 1;
                    first_oom.get_or_insert(k);
                    h.word(u64::MAX);
                    h.word(o.allocated);
                    h.word(o.reserved);
                }
                Err(e) => panic!("event {k}: {e}"),
            },
            Event::Free { id } if failed.contains(&id) => continue,
            Event::Free { id } => s.free(id).unwrap(),
        }
        h.word(s.reserved().get());
        h.word(s.allocated().get());
        for e in s.drain_segment_events() {
            h.word(e.op as u64);
            h.word(e.addr);
            h.word(e.size);
            h.word(u64::from(e.stream) << 1 | u64::from(e.small));
        }
        if k % 37 == 0 {
            h.word(s.largest_free_block().get());
        }
        if k % 401 == 0 || k + 1 == events.len() {
            for g in s.segment_infos() {
                h.word(g.addr);
                h.word(g.size);
                h.word(
                    u64::from(g.stream) << 2 | u64::from(g.small) << 1 | u64::from(g.expandable),
                );
                for b in &g.blocks {
                    h.word(b.addr);
                    h.word(b.size);
                    h.word(b.id.unwrap_or(u64::MAX));
                }
            }
        }
    }
    let c = s.counters();
    format!(
        "hash={:016x} peak_alloc={} peak_res={} res={} segs={} ooms={} first_oom={:?} \
         dev_allocs={} dev_frees={} retries={}",
        h.0,
        s.peak_allocated().get(),
        s.peak_reserved().get(),
        s.reserved().get(),
        s.segments(),
        ooms,
        first_oom,
        c.device_allocs,
        c.device_frees,
        c.alloc_retries,
    )
}

/// The estimator's llama3-70b trace (as in the benches), in both details.
fn estimator_traces() -> Vec<(String, Vec<Event>, Option<u64>)> {
    use memplan::estimate::trace::{trace_with, Detail};
    use memplan::plan::PlanFile;
    use memplan::trace::Op;
    let plan = serde_json::from_str::<PlanFile>(
        r#"{"model":"llama3-70b","gpu":"h100-80g","num_gpus":64,"parallel":{"tp":8},
            "batch":{"micro_batch_size":1,"seq_len":8192},"activation_checkpointing":"full"}"#,
    )
    .unwrap()
    .resolve()
    .unwrap();
    [("groups", Detail::Groups), ("tensors", Detail::Tensors)]
        .into_iter()
        .map(|(name, detail)| {
            let t = trace_with(&plan, 0, detail).unwrap();
            let events = t
                .events
                .iter()
                .map(|e| match e.op {
                    Op::Alloc => Event::Alloc {
                        id: e.id,
                        bytes: e.bytes,
                        stream: e.stream,
                    },
                    Op::Free => Event::Free { id: e.id },
                })
                .collect();
            (format!("llama3-70b {name}"), events, t.capacity_bytes)
        })
        .collect()
}

const GOLDEN_CONFS: [&str; 7] = [
    "",
    "max_split_size_mb:64",
    "expandable_segments:True",
    "roundup_power2_divisions:4",
    "max_split_size_mb:64,expandable_segments:True",
    "max_split_size_mb:64,roundup_power2_divisions:4",
    "max_split_size_mb:200,max_non_split_rounding_mb:300,roundup_power2_divisions:[256:1,512:2,>:8]",
];

fn golden_lines() -> Vec<String> {
    let mut out = Vec::new();
    for text in GOLDEN_CONFS {
        let c = conf(text);
        for seed in 1..=4u64 {
            let events = golden_trace(seed, 6_000);
            let peak = replay(&events, &c, None).unwrap().peak_reserved_bytes.get();
            for (label, cap) in [
                ("none", None),
                ("peak/2", Some(peak / 2)),
                ("peak/5", Some(peak / 5)),
            ] {
                let sum = golden_summary(&events, &c, cap);
                out.push(format!(
                    "random seed={seed} conf={text:?} cap={label}: {sum}"
                ));
            }
        }
        for (name, events, cap) in estimator_traces() {
            let peak = replay(&events, &c, None).unwrap().peak_reserved_bytes.get();
            for (label, cap) in [
                ("trace", cap),
                ("none", None),
                ("peak*0.9", Some(peak / 10 * 9)),
                ("peak/2", Some(peak / 2)),
            ] {
                let sum = golden_summary(&events, &c, cap);
                out.push(format!("{name} conf={text:?} cap={label}: {sum}"));
            }
        }
    }
    out
}

#[test]
fn golden_replays_match_the_recorded_outputs() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/allocator_golden.txt"
    );
    let lines = golden_lines();
    if std::env::var_os("MEMPLAN_BLESS_ALLOCATOR").is_some() {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
        return;
    }
    let want = std::fs::read_to_string(path).unwrap();
    let want: Vec<&str> = want.lines().collect();
    assert_eq!(want.len(), lines.len(), "number of recorded cases");
    let mut bad = 0;
    for (w, got) in want.iter().zip(&lines) {
        if *w != got {
            eprintln!("want {w}\n got {got}");
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{bad} of {} replays differ", lines.len());
}
