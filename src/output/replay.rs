//! `memplan replay` as a table: one row per allocator setting.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};

use crate::estimate::simulate::Replay;
use crate::trace::Source;
use crate::units::Bytes;

pub fn table(r: &Replay) -> String {
    let gib = |b: Bytes| format!("{:.2} GiB", b.get() as f64 / (1u64 << 30) as f64);
    let opt = |b: Option<Bytes>| b.map_or_else(|| "-".to_string(), gib);
    let right = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "PYTORCH_CUDA_ALLOC_CONF",
        "peak reserved",
        "reserved at peak",
        "cached free at peak",
        "largest free block",
        "segments",
        "cudaMalloc calls",
        "out of memory at",
    ]);
    for s in &r.runs {
        let conf = if s.alloc_conf.is_empty() {
            "(defaults)"
        } else {
            s.alloc_conf.as_str()
        };
        t.add_row(vec![
            Cell::new(conf),
            right(gib(s.peak_reserved_bytes)),
            right(opt(s.reserved_at_peak_bytes)),
            right(opt(s.fragmentation_at_peak_bytes)),
            right(opt(s.largest_free_block_at_peak_bytes)),
            right(s.segments.to_string()),
            right(s.device_allocs.to_string()),
            Cell::new(s.oom_at.as_deref().unwrap_or("-")),
        ]);
    }
    let source = match r.source {
        Source::Measured => "measured",
        Source::Predicted => "predicted",
    };
    format!(
        "{source} trace, {} events, peak allocated {}\n{t}\n",
        r.events,
        gib(r.peak_allocated_bytes)
    )
}
