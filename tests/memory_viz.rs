//! The memory_viz snapshot against an independent reading: a small pickle decoder here (the
//! opcodes MemoryViz.js reads, nothing else), and, where the project's Python venv exists,
//! torch 2.11's own `torch.cuda._memory_viz` tools.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use memplan::output::memory_viz::{snapshot, summarize, Action, VizEvent};

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

fn write_snapshot(name: &str) -> (Vec<u8>, std::path::PathBuf) {
    let bytes = snapshot(&step(), Some(CAPACITY)).expect("a consistent timeline");
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
allocated = reserved = peak_allocated = peak_reserved = 0
for e in s["device_traces"][0]:
    a = e["action"]
    if a == "alloc": allocated += e["size"]
    elif a == "free_completed": allocated -= e["size"]
    elif a == "segment_alloc": reserved += e["size"]
    elif a == "segment_free": reserved -= e["size"]
    peak_allocated = max(peak_allocated, allocated)
    peak_reserved = max(peak_reserved, reserved)
print("PEAK_ALLOCATED", peak_allocated)
print("PEAK_RESERVED", peak_reserved)
"#;

#[test]
fn torch_memory_viz_tools_read_the_snapshot_and_replay_the_same_peak() {
    if !Path::new(PYTHON).exists() {
        // scripts/test.sh runs this test again once the venv exists, with this set.
        assert!(
            std::env::var_os("MEMPLAN_REQUIRE_TORCH").is_none(),
            "{PYTHON} does not exist but MEMPLAN_REQUIRE_TORCH is set"
        );
        eprintln!(
            "SKIPPED the torch part: {PYTHON} does not exist (the pickle layout is still \
             checked in Rust by snapshot_decodes_to_the_layout_torch_writes)"
        );
        return;
    }
    let (_, path) = write_snapshot("torch");
    let out = Command::new(PYTHON)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&path)
        .output()
        .expect("run python");
    std::fs::remove_file(&path).ok();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "python failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("total_reserved: 22.0MiB"), "{stdout}");
    let value = |key: &str| -> u64 {
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} line in:\n{stdout}"));
        line.trim().parse().unwrap()
    };
    let rust = summarize(&step()).unwrap();
    assert_eq!(value("PEAK_ALLOCATED"), rust.peak_allocated_bytes);
    assert_eq!(value("PEAK_ALLOCATED"), PEAK_ALLOCATED);
    assert_eq!(value("PEAK_RESERVED"), rust.peak_reserved_bytes);
}
