//! The memory_viz snapshot against an independent reading: a small pickle decoder here (the
//! opcodes MemoryViz.js reads, nothing else), and, where the project's Python venv exists,
//! torch 2.11's own `torch.cuda._memory_viz` tools. Two sources of events: a timeline written
//! by hand ([`step`]) and a trace replayed through the allocator simulation
//! ([`from_trace`]), whose byte counts are derived here by hand from the allocator's rules.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use memplan::allocator::{AllocConf, Simulator};
use memplan::output::memory_viz::{from_trace, op, snapshot, summarize, Action, VizEvent};
use memplan::trace::{
    Category, Event, Mark, MarkKind, Module, Op, Owner, Part, Section, Source, Trace,
};

/// The project's libtorch venv (scripts/libtorch-env.sh creates it).
const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
const MIB: u64 = 1 << 20;
const A: u64 = 0x7f3a_0000_0000;
const B: u64 = 0x7f3b_0000_0000;
const C: u64 = 0x7f3c_0000_0000;
const CAPACITY: u64 = 80 << 30;

/// A step by hand: a 20 MiB segment with parameters, activations and logits (the peak,
/// 18 MiB), activations freed, a 2 MiB segment on stream 1 with a workspace, logits freed
/// but not yet completed, a 4 MiB segment reserved and returned (reserved peak 26 MiB), an
/// OOM and a marker.
fn step() -> Vec<VizEvent> {
    let ev = |t: u64, action, addr, size| VizEvent::new(action, addr, size).at(t);
    let mut workspace = ev(7, Action::Alloc, B, 512).category("workspace");
    workspace.stream = 1;
    let mut small = ev(6, Action::SegmentAlloc, B, 2 * MIB);
    small.stream = 1;
    vec![
        ev(0, Action::SegmentAlloc, A, 20 * MIB).frame("train.py", 3, "setup"),
        ev(1, Action::Alloc, A, 8 * MIB)
            .category("parameters")
            .frame("model.py", 12, "embed"),
        ev(2, Action::Alloc, A + 8 * MIB, 6 * MIB)
            .category("activations")
            .frame("model.py", 40, "layers.0.attention")
            .frame("train.py", 9, "forward"),
        ev(3, Action::Alloc, A + 14 * MIB, 4 * MIB).category("logits"),
        ev(4, Action::FreeRequested, A + 8 * MIB, 6 * MIB).category("activations"),
        ev(5, Action::FreeCompleted, A + 8 * MIB, 6 * MIB).category("activations"),
        small,
        workspace,
        ev(8, Action::FreeRequested, A + 14 * MIB, 4 * MIB).category("logits"),
        ev(9, Action::SegmentAlloc, C, 4 * MIB),
        ev(10, Action::SegmentFree, C, 4 * MIB),
        ev(11, Action::Oom, 0, 100 << 30),
        ev(12, Action::Snapshot, 0, 0),
    ]
}

const PEAK_ALLOCATED: u64 = 18 * MIB;
const PEAK_RESERVED: u64 = 26 * MIB;

// ---------------------------------------------------------------------------------------
// A pickle decoder for the opcodes of MemoryViz.js's `unpickle` that the writer uses.

#[derive(Clone, Debug, PartialEq)]
enum Py {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    List(Vec<Py>),
    Tuple(Vec<Py>),
    Dict(BTreeMap<String, Py>),
}

impl Py {
    fn get(&self, key: &str) -> &Py {
        match self {
            Py::Dict(d) => d
                .get(key)
                .unwrap_or_else(|| panic!("no key {key:?} in {self:?}")),
            _ => panic!("{self:?} is not a dict"),
        }
    }
    fn has(&self, key: &str) -> bool {
        matches!(self, Py::Dict(d) if d.contains_key(key))
    }
    fn int(&self, key: &str) -> i128 {
        match self.get(key) {
            Py::Int(n) => *n,
            v => panic!("{key}: {v:?} is not an int"),
        }
    }
    fn str(&self, key: &str) -> &str {
        match self.get(key) {
            Py::Str(s) => s,
            v => panic!("{key}: {v:?} is not a str"),
        }
    }
    fn list(&self, key: &str) -> &[Py] {
        match self.get(key) {
            Py::List(l) => l,
            v => panic!("{key}: {v:?} is not a list"),
        }
    }
}

fn unpickle(bytes: &[u8]) -> Py {
    let mut stack: Vec<Py> = vec![];
    let mut marks: Vec<usize> = vec![];
    let mut i = 0;
    let take = |n: usize, i: &mut usize| {
        let s = &bytes[*i..*i + n];
        *i += n;
        s
    };
    loop {
        let code = take(1, &mut i)[0];
        match code {
            0x80 => assert!((2..=4).contains(&take(1, &mut i)[0]), "protocol"),
            b'.' => {
                assert_eq!(i, bytes.len(), "bytes after STOP");
                assert_eq!(stack.len(), 1);
                return stack.pop().unwrap();
            }
            b'(' => marks.push(stack.len()),
            b'}' => stack.push(Py::Dict(BTreeMap::new())),
            b']' => stack.push(Py::List(vec![])),
            b')' => stack.push(Py::Tuple(vec![])),
            b'N' => stack.push(Py::None),
            0x88 => stack.push(Py::Bool(true)),
            0x89 => stack.push(Py::Bool(false)),
            b'K' => stack.push(Py::Int(take(1, &mut i)[0].into())),
            b'M' => stack.push(Py::Int(
                u16::from_le_bytes(take(2, &mut i).try_into().unwrap()).into(),
            )),
            b'J' => stack.push(Py::Int(
                i32::from_le_bytes(take(4, &mut i).try_into().unwrap()).into(),
            )),
            0x8a => {
                let n = take(1, &mut i)[0] as usize;
                assert!(n <= 16, "LONG1 of {n} bytes");
                let b = take(n, &mut i);
                let fill = if b.last().is_some_and(|x| x & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                let mut full = [fill; 16];
                full[..n].copy_from_slice(b);
                stack.push(Py::Int(i128::from_le_bytes(full)));
            }
            b'G' => stack.push(Py::Float(f64::from_be_bytes(
                take(8, &mut i).try_into().unwrap(),
            ))),
            0x8c | b'X' => {
                let n = if code == 0x8c {
                    take(1, &mut i)[0] as usize
                } else {
                    u32::from_le_bytes(take(4, &mut i).try_into().unwrap()) as usize
                };
                let s = std::str::from_utf8(take(n, &mut i)).expect("utf-8");
                stack.push(Py::Str(s.to_string()));
            }
            0x85..=0x87 => {
                let n = (code - 0x84) as usize;
                let items = stack.split_off(stack.len() - n);
                stack.push(Py::Tuple(items));
            }
            b't' => {
                let items = stack.split_off(marks.pop().unwrap());
                stack.push(Py::Tuple(items));
            }
            b'e' => {
                let items = stack.split_off(marks.pop().unwrap());
                match stack.last_mut() {
                    Some(Py::List(l)) => l.extend(items),
                    v => panic!("APPENDS onto {v:?}"),
                }
            }
            b'u' => {
                let items = stack.split_off(marks.pop().unwrap());
                let Some(Py::Dict(d)) = stack.last_mut() else {
                    panic!("SETITEMS onto a non-dict")
                };
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    let Py::Str(k) = k else { panic!("key {k:?}") };
                    d.insert(k, v);
                }
            }
            _ => panic!(
                "opcode {code:#04x} at byte {} is not one the writer may use",
                i - 1
            ),
        }
    }
}

/// The opcodes of `bytes`, walked by their argument lengths; panics on any opcode outside
/// [`op::ALL`] (those MemoryViz.js's `unpickle` reads).
fn assert_only_memory_viz_opcodes(bytes: &[u8]) {
    let mut i = 0;
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
    while i < bytes.len() {
        let code = bytes[i];
        assert!(
            op::ALL.contains(&code),
            "opcode {code:#04x} at byte {i} is not one MemoryViz reads"
        );
        i += 1 + match code {
            op::PROTO | op::BININT1 => 1,
            op::BININT2 => 2,
            op::BININT => 4,
            op::BINFLOAT => 8,
            op::LONG1 | op::SHORT_BINUNICODE => 1 + bytes[i + 1] as usize,
            op::BINUNICODE => 4 + u32_at(i + 1),
            _ => 0,
        };
        if code == op::STOP {
            assert_eq!(i, bytes.len(), "bytes after STOP");
        }
    }
}

fn write_snapshot(name: &str) -> (Vec<u8>, std::path::PathBuf) {
    let bytes = snapshot(&step(), Some(CAPACITY)).expect("a consistent timeline");
    assert_only_memory_viz_opcodes(&bytes);
    let path = std::env::temp_dir().join(format!("memplan-{name}-{}.pickle", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    // To look at it: MEMPLAN_MEMORY_VIZ_OUT=step.pickle, then drop the file on
    // https://pytorch.org/memory_viz.
    if let Some(out) = std::env::var_os("MEMPLAN_MEMORY_VIZ_OUT") {
        std::fs::write(out, &bytes).unwrap();
    }
    (bytes, path)
}

#[test]
fn summary_replays_the_step_to_its_hand_computed_peaks() {
    let s = summarize(&step()).unwrap();
    assert_eq!(s.peak_allocated_bytes, PEAK_ALLOCATED);
    assert_eq!(s.peak_reserved_bytes, PEAK_RESERVED);
    assert_eq!(s.end_allocated_bytes, 12 * MIB + 512);
    assert_eq!(s.end_reserved_bytes, 22 * MIB);
}

#[test]
fn snapshot_decodes_to_the_layout_torch_writes() {
    let (bytes, path) = write_snapshot("layout");
    std::fs::remove_file(path).ok();
    let snap = unpickle(&bytes);
    for key in [
        "segments",
        "device_traces",
        "allocator_settings",
        "external_annotations",
    ] {
        assert!(snap.has(key), "top-level key {key}");
    }

    // Segments: the state after the last event, blocks tiling each one.
    let segments = snap.list("segments");
    assert_eq!(segments.len(), 2);
    let (big, small) = (&segments[0], &segments[1]);
    assert_eq!(big.int("address"), A as i128);
    assert_eq!(big.int("total_size"), (20 * MIB) as i128);
    assert_eq!(big.str("segment_type"), "large");
    assert_eq!(small.str("segment_type"), "small");
    assert_eq!(small.int("stream"), 1);
    assert_eq!(
        big.get("segment_pool_id"),
        &Py::Tuple(vec![Py::Int(0), Py::Int(0)])
    );
    assert_eq!(big.get("is_expandable"), &Py::Bool(false));
    assert_eq!(big.int("device"), 0);
    assert_eq!(big.int("allocated_size"), (8 * MIB) as i128);
    assert_eq!(big.int("active_size"), (12 * MIB) as i128);
    for seg in segments {
        let mut at = seg.int("address");
        for b in seg.list("blocks") {
            assert_eq!(b.int("address"), at, "blocks tile the segment");
            at += b.int("size");
            assert!(b.has("frames") && b.has("requested_size"));
        }
        assert_eq!(at, seg.int("address") + seg.int("total_size"));
    }
    let states: Vec<(&str, i128)> = big
        .list("blocks")
        .iter()
        .map(|b| (b.str("state"), b.int("size")))
        .collect();
    let mib = MIB as i128;
    assert_eq!(
        states,
        [
            ("active_allocated", 8 * mib),
            ("inactive", 6 * mib),
            ("active_pending_free", 4 * mib),
            ("inactive", 2 * mib),
        ]
    );
    let params = &big.list("blocks")[0];
    assert_eq!(params.str("category"), "parameters");
    assert_eq!(params.list("frames")[0].str("name"), "parameters: embed");
    assert_eq!(params.list("frames")[0].int("line"), 12);

    // The trace: every event in order, plus the "unknown" category marker.
    let traces = snap.list("device_traces");
    assert_eq!(traces.len(), 1);
    let Py::List(trace) = &traces[0] else {
        panic!("device trace is not a list")
    };
    let actions: Vec<&str> = trace.iter().map(|t| t.str("action")).collect();
    assert_eq!(
        actions,
        [
            "segment_alloc",
            "alloc",
            "alloc",
            "alloc",
            "free_requested",
            "free_completed",
            "segment_alloc",
            "alloc",
            "free_requested",
            "segment_alloc",
            "segment_free",
            "oom",
            "snapshot",
            "snapshot",
        ]
    );
    for t in trace {
        for key in ["size", "stream", "time_us", "frames", "compile_context"] {
            assert!(t.has(key), "trace entry key {key} in {t:?}");
        }
    }
    assert_eq!(trace[3].list("frames")[0].str("name"), "logits");
    assert_eq!(trace[3].list("frames")[0].str("filename"), "memplan");
    assert_eq!(trace[11].int("device_free"), (CAPACITY - 22 * MIB) as i128);
    assert!(!trace[11].has("addr"));
    assert_eq!(trace[13].str("category"), "unknown");
    assert!(matches!(
        snap.get("allocator_settings").get("garbage_collection_threshold"),
        Py::Float(x) if *x == 0.0
    ));
    assert!(matches!(
        snap.get("allocator_settings").get("max_split_size"),
        Py::Int(-1)
    ));
    assert!(!matches!(snap.get("external_annotations"), Py::None));
}

/// torch's own tools on the pickle: `segsum` (asserts the accounting), `trace`, `memory`,
/// `segments`, `compare`, `trace_plot`, `segment_plot`, and a replay of the trace.
const SCRIPT: &str = r#"
import pickle, sys
from torch.cuda import _memory_viz as mv
with open(sys.argv[1], "rb") as f:
    s = pickle.load(f)
assert set(s) >= {"segments", "device_traces", "allocator_settings"}, set(s)
for seg in s["segments"]:
    assert {"device", "address", "total_size", "stream", "segment_type", "blocks"} <= set(seg)
    assert sum(b["size"] for b in seg["blocks"]) == seg["total_size"]
print("== segsum\n" + mv.segsum(s))
print("== trace\n" + mv.trace(s))
flat = lambda lines: lines
print("== memory\n" + mv.memory(s, format_flamegraph=flat))
print("== segments\n" + mv.segments(s, format_flamegraph=flat))
assert mv.compare(s["segments"], s["segments"], format_flamegraph=flat) == ""
for name, html in [("trace_plot", mv.trace_plot(s)), ("segment_plot", mv.segment_plot(s)),
                   ("trace_plot(plot_segments)", mv.trace_plot(s, plot_segments=True))]:
    assert html.lstrip().startswith("<!DOCTYPE html>") and "MemoryViz.js" in html, name
    print(f"{name}: {len(html)} chars of HTML")
# Replay the trace as the tools count it: alloc and free_completed by their size, segments
# by segment_alloc/segment_map and segment_free/segment_unmap; every alloc must lie in
# memory mapped at the time.
allocated = reserved = peak_allocated = peak_reserved = 0
ranges = {}
def covered(addr, size):
    at = addr
    for a, n in sorted(ranges.items()):
        if a <= at < a + n:
            at = a + n
    return at >= addr + size
for e in s["device_traces"][0]:
    a = e["action"]
    if a == "alloc":
        assert covered(e["addr"], e["size"]), e
        allocated += e["size"]
    elif a == "free_completed": allocated -= e["size"]
    elif a in ("segment_alloc", "segment_map"):
        reserved += e["size"]
        ranges[e["addr"]] = e["size"]
    elif a == "segment_free":
        reserved -= e["size"]
        del ranges[e["addr"]]
    elif a == "segment_unmap":
        reserved -= e["size"]
        start = max(x for x in ranges if x <= e["addr"])
        end, cut_end = start + ranges.pop(start), e["addr"] + e["size"]
        assert cut_end <= end, e
        if start < e["addr"]: ranges[start] = e["addr"] - start
        if cut_end < end: ranges[cut_end] = end - cut_end
    peak_allocated = max(peak_allocated, allocated)
    peak_reserved = max(peak_reserved, reserved)
print("PEAK_ALLOCATED", peak_allocated)
print("PEAK_RESERVED", peak_reserved)
print("END_RESERVED", reserved)
print("SEGMENTS_RESERVED", sum(seg["total_size"] for seg in s["segments"]))
active = [b for seg in s["segments"] for b in seg["blocks"] if b["state"] == "active_allocated"]
print("END_BLOCK_BYTES", sum(b["size"] for b in active))
print("END_REQUESTED_BYTES", sum(b["requested_size"] for b in active))
categories = {e["category"] for e in s["device_traces"][0] if "category" in e}
print("CATEGORIES", ",".join(sorted(categories)))
"#;

/// Runs [`SCRIPT`] on `bytes` with the venv's torch and returns its `KEY value` lines and
/// its whole output; `None` (after saying so) where the venv does not exist and
/// MEMPLAN_REQUIRE_TORCH is unset.
fn torch_tools(name: &str, bytes: &[u8]) -> Option<(BTreeMap<String, String>, String)> {
    if !Path::new(PYTHON).exists() {
        // scripts/test.sh runs these tests again once the venv exists, with this set.
        assert!(
            std::env::var_os("MEMPLAN_REQUIRE_TORCH").is_none(),
            "{PYTHON} does not exist but MEMPLAN_REQUIRE_TORCH is set"
        );
        eprintln!(
            "SKIPPED the torch part of {name}: {PYTHON} does not exist (the pickle layout is \
             still checked in Rust)"
        );
        return None;
    }
    let path = std::env::temp_dir().join(format!("memplan-{name}-{}.pickle", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new(PYTHON)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&path)
        .output()
        .expect("run python");
    std::fs::remove_file(&path).ok();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "python failed:\n{stdout}\n{stderr}");
    let values = stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    Some((values, stdout))
}

fn number(values: &BTreeMap<String, String>, key: &str) -> u64 {
    values
        .get(key)
        .unwrap_or_else(|| panic!("no {key} line in {values:?}"))
        .parse()
        .unwrap()
}

#[test]
fn torch_memory_viz_tools_read_the_snapshot_and_replay_the_same_peak() {
    let (bytes, path) = write_snapshot("torch");
    std::fs::remove_file(path).ok();
    let Some((values, stdout)) = torch_tools("step", &bytes) else {
        return;
    };
    assert!(stdout.contains("total_reserved: 22.0MiB"), "{stdout}");
    let rust = summarize(&step()).unwrap();
    assert_eq!(number(&values, "PEAK_ALLOCATED"), rust.peak_allocated_bytes);
    assert_eq!(number(&values, "PEAK_ALLOCATED"), PEAK_ALLOCATED);
    assert_eq!(number(&values, "PEAK_RESERVED"), rust.peak_reserved_bytes);
}

// ---------------------------------------------------------------------------------------
// A trace replayed through the allocator simulation (`from_trace`).

/// To look at a snapshot: MEMPLAN_MEMORY_VIZ_DIR=dir keeps each as `dir/<name>.pickle`,
/// to drop on https://pytorch.org/memory_viz.
fn keep(name: &str, bytes: &[u8]) {
    if let Some(dir) = std::env::var_os("MEMPLAN_MEMORY_VIZ_DIR") {
        std::fs::write(Path::new(&dir).join(format!("{name}.pickle")), bytes).unwrap();
    }
}

fn owner(module: Module, part: Part) -> Owner {
    Owner::new(module, part)
}

fn event(op: Op, id: u64, bytes: u64, category: Category, owner: Owner, stream: u32) -> Event {
    Event {
        op,
        id,
        bytes,
        category,
        owner,
        stream,
    }
}

fn trace(events: Vec<Event>, marks: Vec<Mark>) -> Trace {
    Trace {
        source: Source::Predicted,
        stage: 0,
        rank: 0,
        capacity_bytes: None,
        events,
        marks,
    }
}

/// A step by hand, with what PyTorch 2.11's allocator rules make of it (default
/// `PYTORCH_CUDA_ALLOC_CONF`):
///
/// | # | event (stream 0 unless said) | block | segment |
/// |---|---|---|---|
/// | 0 | alloc 1: 3 MiB master params | 3 MiB at A | new 20 MiB at A (< 10 MiB asks 20) |
/// | 1 | alloc 2: 1000 B inputs | 1024 B (512 B multiples) | new 2 MiB small segment |
/// | 2 | alloc 3: 5 MiB + 100 B activations | 5 MiB + 512 at A + 3 MiB | A's 17 MiB rest |
/// | 3 | alloc 4: 2 MiB all-gather, stream 1 | 2 MiB | new 20 MiB (no cross-stream reuse) |
/// | 4 | free 3 | merges: 17 MiB free at A + 3 MiB | |
/// | 5 | alloc 5: 4 MiB backward | 4 MiB at A + 3 MiB (cached) | none |
/// | 6 | alloc 6: 31 MiB + 1 B logits | 32 MiB (1 MiB - 512 left: no split) | new 32 MiB |
/// | 7-9 | free 6, 4, 5 | | all cached |
///
/// Reserved: 20 + 2 + 20 + 32 = 74 MiB from event 6 on. Allocated blocks peak at event 6:
/// 3 MiB + 1024 + 2 MiB + 4 MiB + 32 MiB; the requested bytes torch's trace records peak
/// there too, at 3 MiB + 1000 + 2 MiB + 4 MiB + 31 MiB + 1.
fn hand_trace() -> Trace {
    use Category::*;
    let (alloc, free) = (Op::Alloc, Op::Free);
    let params = owner(Module::Layer(0), Part::Shard);
    let ids = owner(Module::Inputs, Part::Ids);
    let attention = owner(Module::Layer(0), Part::Attention);
    let gather = owner(Module::Layer(1), Part::AllGather);
    let ffn = owner(Module::Layer(0), Part::FeedForward);
    let logits = owner(Module::Output, Part::Logits);
    let mark = |at, first_step, kind| Mark {
        at,
        first_step,
        kind,
    };
    trace(
        vec![
            event(alloc, 1, 3 * MIB, MasterParams, params, 0),
            event(alloc, 2, 1000, Inputs, ids, 0),
            event(alloc, 3, 5 * MIB + 100, Activations, attention, 0),
            event(alloc, 4, 2 * MIB, UnshardedParams, gather, 1),
            event(free, 3, 5 * MIB + 100, Activations, attention, 0),
            event(alloc, 5, 4 * MIB, BackwardWorkingSet, ffn, 0),
            event(alloc, 6, 31 * MIB + 1, Logits, logits, 0),
            event(free, 6, 31 * MIB + 1, Logits, logits, 0),
            event(free, 4, 2 * MIB, UnshardedParams, gather, 1),
            event(free, 5, 4 * MIB, BackwardWorkingSet, ffn, 0),
        ],
        vec![
            mark(
                0,
                true,
                MarkKind::Begin {
                    section: Section::Setup,
                    micro: 0,
                },
            ),
            mark(
                2,
                true,
                MarkKind::Begin {
                    section: Section::Forward,
                    micro: 0,
                },
            ),
            mark(
                7,
                true,
                MarkKind::Point {
                    phase: "forward".into(),
                },
            ),
            mark(10, true, MarkKind::End),
        ],
    )
}

const HAND_PEAK_RESERVED: u64 = 74 * MIB;
const HAND_PEAK_BLOCKS: u64 = 3 * MIB + 1024 + 2 * MIB + 4 * MIB + 32 * MIB;
const HAND_PEAK_REQUESTED: u64 = 3 * MIB + 1000 + 2 * MIB + 4 * MIB + 31 * MIB + 1;

/// The simulator after the whole trace, for its own figures.
fn simulated(t: &Trace, conf: &AllocConf, capacity: Option<u64>) -> Simulator {
    let mut sim = Simulator::new(conf.clone(), capacity);
    for e in &t.events {
        let r = match e.op {
            Op::Alloc => sim.alloc(e.id, e.bytes, e.stream),
            Op::Free => sim.free(e.id),
        };
        if r.is_err() {
            break;
        }
    }
    sim
}

fn trace_entries(snap: &Py) -> &[Py] {
    let traces = snap.list("device_traces");
    assert_eq!(traces.len(), 1);
    let Py::List(trace) = &traces[0] else {
        panic!("device trace is not a list")
    };
    trace
}

/// Replays the decoded trace entries: every alloc inside memory mapped at the time and
/// over no live block, every free of a live block with the size it was allocated with.
fn check_entries_replay(entries: &[Py]) {
    let mut mapped: BTreeMap<i128, i128> = BTreeMap::new();
    let mut live: BTreeMap<i128, i128> = BTreeMap::new();
    let inside = |mapped: &BTreeMap<i128, i128>, addr: i128, size: i128| {
        let mut at = addr;
        for (&a, &n) in mapped.range(..addr + size) {
            if a <= at && at < a + n {
                at = a + n;
            }
        }
        at >= addr + size
    };
    for e in entries {
        let action = e.str("action");
        if matches!(action, "oom" | "snapshot") {
            continue;
        }
        let (addr, size) = (e.int("addr"), e.int("size"));
        match action {
            "segment_alloc" | "segment_map" => {
                assert!(mapped
                    .range(..addr + size)
                    .next_back()
                    .is_none_or(|(a, n)| a + n <= addr));
                mapped.insert(addr, size);
            }
            "segment_free" => assert_eq!(mapped.remove(&addr), Some(size)),
            "segment_unmap" => {
                let (&start, &n) = mapped.range(..=addr).next_back().unwrap();
                assert!(addr + size <= start + n, "{e:?}");
                assert!(live.range(addr..addr + size).next().is_none());
                mapped.remove(&start);
                if start < addr {
                    mapped.insert(start, addr - start);
                }
                if addr + size < start + n {
                    mapped.insert(addr + size, start + n - addr - size);
                }
            }
            "alloc" => {
                assert!(inside(&mapped, addr, size), "{e:?} outside mapped memory");
                assert!(live
                    .range(..addr + size)
                    .next_back()
                    .is_none_or(|(a, n)| a + n <= addr));
                live.insert(addr, size);
            }
            "free_requested" => assert_eq!(live.get(&addr), Some(&size), "{e:?}"),
            "free_completed" => assert_eq!(live.remove(&addr), Some(size), "{e:?}"),
            other => panic!("unexpected action {other}"),
        }
    }
}

/// The decoded segments against the simulator's own listing, block by block, and the
/// accounting `_memory_viz.segsum` asserts.
fn check_segments_match(snap: &Py, sim: &Simulator) {
    let segments = snap.list("segments");
    let infos = sim.segment_infos();
    assert_eq!(segments.len(), infos.len());
    for (seg, info) in segments.iter().zip(&infos) {
        assert_eq!(seg.int("address"), info.addr as i128);
        assert_eq!(seg.int("total_size"), info.size as i128);
        assert_eq!(seg.int("stream"), info.stream as i128);
        assert_eq!(
            seg.str("segment_type"),
            if info.small { "small" } else { "large" }
        );
        assert_eq!(seg.get("is_expandable"), &Py::Bool(info.expandable));
        // Consecutive free blocks of the simulator show as one inactive gap.
        let mut expected: Vec<(i128, i128, bool)> = vec![];
        for b in &info.blocks {
            match expected.last_mut() {
                Some(last) if !last.2 && b.id.is_none() => last.1 += b.size as i128,
                _ => expected.push((b.addr as i128, b.size as i128, b.id.is_some())),
            }
        }
        let blocks: Vec<(i128, i128, bool)> = seg
            .list("blocks")
            .iter()
            .map(|b| {
                let a = b.int("address");
                let inside = a >= seg.int("address")
                    && a + b.int("size") <= seg.int("address") + seg.int("total_size");
                assert!(inside, "block {b:?} outside its segment");
                (a, b.int("size"), b.str("state") == "active_allocated")
            })
            .collect();
        assert_eq!(blocks, expected);
        let allocated: i128 = blocks.iter().filter(|b| b.2).map(|b| b.1).sum();
        assert_eq!(seg.int("allocated_size"), allocated);
    }
}

#[test]
fn from_trace_replays_the_hand_step_through_the_allocator() {
    let t = hand_trace();
    let conf = AllocConf::default();
    let events = from_trace(&t, &conf, None).unwrap();
    let sim = simulated(&t, &conf, None);
    // The simulator against the hand-derived figures.
    assert_eq!(sim.peak_reserved().get(), HAND_PEAK_RESERVED);
    assert_eq!(sim.peak_allocated().get(), HAND_PEAK_BLOCKS);
    assert_eq!(t.peak().unwrap(), (HAND_PEAK_REQUESTED, 7));

    let bytes = snapshot(&events, None).unwrap();
    assert_only_memory_viz_opcodes(&bytes);
    keep("from-trace", &bytes);
    let snap = unpickle(&bytes);
    let entries = trace_entries(&snap);
    let actions: Vec<&str> = entries.iter().map(|e| e.str("action")).collect();
    assert_eq!(
        actions,
        [
            "snapshot", // step 1: setup begins
            "segment_alloc",
            "alloc",
            "segment_alloc",
            "alloc",
            "snapshot", // forward begins
            "alloc",
            "segment_alloc",
            "alloc",
            "free_requested",
            "free_completed",
            "alloc",
            "segment_alloc",
            "alloc",
            "snapshot", // phase point
            "free_requested",
            "free_completed",
            "free_requested",
            "free_completed",
            "free_requested",
            "free_completed",
            "snapshot", // end
            "snapshot", // the "unknown" category marker
        ]
    );
    let segment_allocs: Vec<(i128, i128)> = entries
        .iter()
        .filter(|e| e.str("action") == "segment_alloc")
        .map(|e| (e.int("size"), e.int("stream")))
        .collect();
    let mib = MIB as i128;
    assert_eq!(
        segment_allocs,
        [(20 * mib, 0), (2 * mib, 0), (20 * mib, 1), (32 * mib, 0)]
    );
    let allocs: Vec<&Py> = entries
        .iter()
        .filter(|e| e.str("action") == "alloc")
        .collect();
    // Requested sizes, as torch records `orig_size`.
    let sizes: Vec<i128> = allocs.iter().map(|e| e.int("size")).collect();
    assert_eq!(
        sizes,
        [3 * mib, 1000, 5 * mib + 100, 2 * mib, 4 * mib, 31 * mib + 1]
    );
    let addr = |k: usize| allocs[k].int("addr");
    let seg_addr = |k: usize| {
        entries
            .iter()
            .filter(|e| e.str("action") == "segment_alloc")
            .nth(k)
            .unwrap()
            .int("addr")
    };
    assert_eq!(addr(0), seg_addr(0), "the first block opens its segment");
    assert_eq!(addr(1), seg_addr(1));
    assert_eq!(
        addr(2),
        addr(0) + 3 * mib,
        "split off right after the first"
    );
    assert_eq!(addr(3), seg_addr(2));
    assert_eq!(addr(4), addr(2), "the freed block is reused from the cache");
    assert_eq!(addr(5), seg_addr(3));
    assert_eq!(allocs[3].int("stream"), 1);
    check_entries_replay(entries);

    // Categories and frames on every block entry; marks named in theirs.
    let named = [
        ("master params", "layers.0.shard"),
        ("inputs and rotary table", "inputs.ids"),
        ("activations", "layers.0.attention"),
        ("unsharded params", "layers.1.all_gather"),
        ("backward working set", "layers.0.feed_forward"),
        ("logits", "output.logits"),
    ];
    for (e, (category, owner)) in allocs.iter().zip(named) {
        assert_eq!(e.str("category"), category);
        let frames = e.list("frames");
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].str("filename"), "memplan");
        assert_eq!(frames[0].int("line"), 0);
        assert_eq!(frames[0].str("name"), format!("{category}: {owner}"));
    }
    for e in entries
        .iter()
        .filter(|e| e.str("action").starts_with("free"))
    {
        assert!(e.has("category") && !e.list("frames").is_empty(), "{e:?}");
    }
    let marks: Vec<&str> = entries
        .iter()
        .filter(|e| e.str("action") == "snapshot" && !e.has("category"))
        .map(|e| e.list("frames")[0].str("name"))
        .collect();
    assert_eq!(
        marks,
        [
            "step 1: setup begins",
            "step 1: forward begins (micro-batch 0)",
            "step 1: phase point forward",
            "step 1: end",
        ]
    );

    // The final state: the simulator's segments, blocks at their rounded sizes with the
    // requested bytes beside them.
    check_segments_match(&snap, &sim);
    let segments = snap.list("segments");
    let first = &segments[0].list("blocks")[0];
    assert_eq!(
        (
            first.int("size"),
            first.int("requested_size"),
            first.str("category")
        ),
        (3 * mib, 3 * mib, "master params")
    );
    let small = segments
        .iter()
        .find(|s| s.str("segment_type") == "small")
        .unwrap();
    let ids = &small.list("blocks")[0];
    assert_eq!((ids.int("size"), ids.int("requested_size")), (1024, 1000));

    let summary = summarize(&events).unwrap();
    assert_eq!(summary.peak_reserved_bytes, sim.peak_reserved().get());
    assert_eq!(summary.peak_allocated_bytes, HAND_PEAK_REQUESTED);
    assert_eq!(summary.end_reserved_bytes, 74 * MIB);
    assert_eq!(summary.end_allocated_bytes, 3 * MIB + 1000);

    // torch's own tools on the same pickle.
    let Some((values, stdout)) = torch_tools("from-trace", &bytes) else {
        return;
    };
    assert!(stdout.contains("total_reserved: 74.0MiB"), "{stdout}");
    assert!(stdout.contains("segments: 4"), "{stdout}");
    assert_eq!(number(&values, "PEAK_RESERVED"), sim.peak_reserved().get());
    assert_eq!(number(&values, "PEAK_RESERVED"), HAND_PEAK_RESERVED);
    assert_eq!(number(&values, "END_RESERVED"), sim.reserved().get());
    assert_eq!(number(&values, "SEGMENTS_RESERVED"), sim.reserved().get());
    // torch's trace counts requested bytes: its peak is the trace's own, not the blocks'.
    assert_eq!(number(&values, "PEAK_ALLOCATED"), t.peak().unwrap().0);
    assert_eq!(number(&values, "PEAK_ALLOCATED"), HAND_PEAK_REQUESTED);
    // The final blocks carry the rounded sizes: the simulator's allocated bytes.
    assert_eq!(number(&values, "END_BLOCK_BYTES"), sim.allocated().get());
    assert_eq!(number(&values, "END_BLOCK_BYTES"), 3 * MIB + 1024);
    assert_eq!(number(&values, "END_REQUESTED_BYTES"), 3 * MIB + 1000);
    assert_eq!(
        values["CATEGORIES"],
        "activations,backward working set,inputs and rotary table,logits,master params,\
         unknown,unsharded params"
    );
}

/// Under a 30 MiB capacity: 5 MiB takes a 20 MiB segment and is freed; 11 MiB on stream 1
/// cannot use stream 0's cache and 20 + 12 > 30 MiB, so the cached segment is returned
/// (`segment_free`) before the 12 MiB one; 25 MiB then needs 26 MiB more with the 12 MiB
/// segment in use: out of memory, and the timeline stops.
#[test]
fn from_trace_records_the_release_path_and_stops_at_the_oom() {
    use Category::*;
    let o = owner(Module::Output, Part::Logits);
    let t = trace(
        vec![
            event(Op::Alloc, 1, 5 * MIB, Activations, o, 0),
            event(Op::Free, 1, 5 * MIB, Activations, o, 0),
            event(Op::Alloc, 2, 11 * MIB, UnshardedParams, o, 1),
            event(Op::Alloc, 3, 25 * MIB, Logits, o, 0),
            event(Op::Free, 2, 11 * MIB, UnshardedParams, o, 1),
        ],
        vec![],
    );
    let capacity = 30 * MIB;
    let events = from_trace(&t, &AllocConf::default(), Some(capacity)).unwrap();
    let summary: Vec<(Action, u64, u32)> = events
        .iter()
        .map(|e| (e.action, e.size, e.stream))
        .collect();
    assert_eq!(
        summary,
        [
            (Action::SegmentAlloc, 20 * MIB, 0),
            (Action::Alloc, 5 * MIB, 0),
            (Action::FreeRequested, 5 * MIB, 0),
            (Action::FreeCompleted, 5 * MIB, 0),
            (Action::SegmentFree, 20 * MIB, 0),
            (Action::SegmentAlloc, 12 * MIB, 1),
            (Action::Alloc, 11 * MIB, 1),
            (Action::Oom, 25 * MIB, 0),
        ]
    );
    assert_eq!(events[4].addr, events[0].addr);
    assert_eq!(events[6].block_size, Some(12 * MIB)); // 1 MiB left: not split
    let bytes = snapshot(&events, Some(capacity)).unwrap();
    assert_only_memory_viz_opcodes(&bytes);
    keep("oom", &bytes);
    let snap = unpickle(&bytes);
    let entries = trace_entries(&snap);
    let oom = entries.iter().find(|e| e.str("action") == "oom").unwrap();
    assert_eq!(oom.int("device_free"), (18 * MIB) as i128); // 30 - 12 MiB reserved
    assert_eq!(oom.str("category"), "logits");
    check_entries_replay(entries);
    check_segments_match(&snap, &simulated(&t, &AllocConf::default(), Some(capacity)));
    let Some((values, stdout)) = torch_tools("oom", &bytes) else {
        return;
    };
    assert!(
        stdout.contains("raise OutOfMemoryError # 25.0MiB requested, 18.0MiB free"),
        "{stdout}"
    );
    assert_eq!(number(&values, "PEAK_RESERVED"), 20 * MIB);
    assert_eq!(number(&values, "END_RESERVED"), 12 * MIB);
}

/// `expandable_segments:True` under 50 MiB: 5 MiB maps one 20 MiB page; 30 MiB maps a second
/// page (the capacity check counts 20 + 30 <= 50 MiB first) and takes 30 MiB from 5 MiB on;
/// after its free, 12 MiB on stream 1 finds 40 + 12 > 50 MiB, so the free page at 20 MiB is
/// unmapped and stream 1 maps a page of its own segment.
#[test]
fn from_trace_records_page_maps_and_unmaps_of_expandable_segments() {
    use Category::*;
    let o = owner(Module::Layer(2), Part::Attention);
    let t = trace(
        vec![
            event(Op::Alloc, 1, 5 * MIB, Activations, o, 0),
            event(Op::Alloc, 2, 30 * MIB, Activations, o, 0),
            event(Op::Free, 2, 30 * MIB, Activations, o, 0),
            event(Op::Alloc, 3, 12 * MIB, Workspace, o, 1),
        ],
        vec![],
    );
    let conf = AllocConf::parse("expandable_segments:True").unwrap();
    let capacity = 50 * MIB;
    let events = from_trace(&t, &conf, Some(capacity)).unwrap();
    let base = events[0].addr;
    let other = events[7].addr.wrapping_sub(base);
    let summary: Vec<(Action, u64, u64, u32)> = events
        .iter()
        .map(|e| (e.action, e.addr.wrapping_sub(base), e.size, e.stream))
        .collect();
    assert_eq!(
        summary,
        [
            (Action::SegmentMap, 0, 20 * MIB, 0),
            (Action::Alloc, 0, 5 * MIB, 0),
            (Action::SegmentMap, 20 * MIB, 20 * MIB, 0),
            (Action::Alloc, 5 * MIB, 30 * MIB, 0),
            (Action::FreeRequested, 5 * MIB, 30 * MIB, 0),
            (Action::FreeCompleted, 5 * MIB, 30 * MIB, 0),
            (Action::SegmentUnmap, 20 * MIB, 20 * MIB, 0),
            (Action::SegmentMap, other, 20 * MIB, 1),
            (Action::Alloc, other, 12 * MIB, 1),
        ]
    );
    let s = summarize(&events).unwrap();
    assert_eq!(
        (s.peak_reserved_bytes, s.end_reserved_bytes),
        (40 * MIB, 40 * MIB)
    );

    let bytes = snapshot(&events, Some(capacity)).unwrap();
    assert_only_memory_viz_opcodes(&bytes);
    keep("expandable", &bytes);
    let snap = unpickle(&bytes);
    check_entries_replay(trace_entries(&snap));
    // One segment per contiguous mapped range: the two maps of stream 0 merged, then cut
    // back to the first page by the unmap.
    let sim = simulated(&t, &conf, Some(capacity));
    check_segments_match(&snap, &sim);
    let segments = snap.list("segments");
    let listed: Vec<(i128, i128, bool)> = segments
        .iter()
        .map(|g| {
            (
                g.int("address") - base as i128,
                g.int("total_size"),
                g.get("is_expandable") == &Py::Bool(true),
            )
        })
        .collect();
    let mib = MIB as i128;
    assert_eq!(
        listed,
        [(0, 20 * mib, true), (other as i128, 20 * mib, true)]
    );
    assert_eq!(
        snap.get("allocator_settings").get("expandable_segments"),
        &Py::Bool(true)
    );
    let Some((values, stdout)) = torch_tools("expandable", &bytes) else {
        return;
    };
    assert!(stdout.contains("total_reserved: 40.0MiB"), "{stdout}");
    assert_eq!(number(&values, "PEAK_RESERVED"), sim.peak_reserved().get());
    assert_eq!(number(&values, "END_RESERVED"), 40 * MIB);
    assert_eq!(number(&values, "PEAK_ALLOCATED"), 35 * MIB);
}

/// The whole path a user takes: `memplan timeline --format memory-viz` on the offload
/// example writes the estimator's step; torch's tools read it and replay the estimator's
/// own peak allocated (the loss backward, 16.37 GiB) and the simulation's reserved peak.
#[test]
fn the_estimators_timeline_opens_in_torch_with_the_estimated_peak() {
    let dir = std::env::temp_dir().join(format!("memplan-viz-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("offload.pickle");
    let out = Command::new(env!("CARGO_BIN_EXE_memplan"))
        .args([
            "timeline",
            "--example",
            "seed-8b-2x48g-offload",
            "--format",
            "memory-viz",
        ])
        .arg("--output")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_only_memory_viz_opcodes(&bytes);

    let plan = memplan::plan::example("seed-8b-2x48g-offload")
        .unwrap()
        .resolve()
        .unwrap();
    let est = memplan::estimate::estimate(&plan).unwrap();
    let t = memplan::estimate::trace::trace(&plan, est.per_gpu.stage).unwrap();
    let sim = memplan::estimate::simulate::simulate(&t, &AllocConf::default(), "").unwrap();
    // The pickle decoded here: the trace entries replay to the same peaks.
    let summary =
        summarize(&from_trace(&t, &AllocConf::default(), t.capacity_bytes).unwrap()).unwrap();
    assert_eq!(
        summary.peak_allocated_bytes,
        est.per_gpu.peak_allocated_bytes.get()
    );
    assert_eq!(summary.peak_reserved_bytes, sim.peak_reserved_bytes.get());

    let Some((values, stdout)) = torch_tools("estimator-offload", &bytes) else {
        return;
    };
    assert_eq!(
        number(&values, "PEAK_ALLOCATED"),
        est.per_gpu.peak_allocated_bytes.get(),
        "{stdout}"
    );
    assert_eq!(
        number(&values, "PEAK_RESERVED"),
        sim.peak_reserved_bytes.get()
    );
    for c in [
        "logits",
        "activations",
        "unsharded params",
        "gradient buffers",
    ] {
        assert!(values["CATEGORIES"].contains(c), "{}", values["CATEGORIES"]);
    }
}
