//! Terminal tables (comfy-table).

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table as Ct};

use super::{layout, plan_summary, verdict, Render, Row};
use crate::profiles::{GpuSpec, ModelSpec};
use crate::search::SearchResult;
use crate::units::Bytes;

pub struct Table;

fn new_table(header: Vec<String>) -> Ct {
    let mut t = Ct::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(header);
    t
}

fn right(s: impl ToString) -> Cell {
    Cell::new(s.to_string()).set_alignment(CellAlignment::Right)
}

fn signed(d: i128) -> String {
    let sign = if d < 0 { "-" } else { "+" };
    format!("{sign}{}", Bytes(d.unsigned_abs() as u64))
}

impl Render for Table {
    fn estimate(&self, row: &Row) -> String {
        let e = row.estimate;
        let g = &e.per_gpu;
        let at = match super::stage_name(row.plan, g.stage) {
            Some(stage) => format!("{}, {stage}", g.peak_phase),
            None => g.peak_phase.to_string(),
        };
        let mut t = new_table(vec![
            format!("per GPU at peak ({at})"),
            "bytes".into(),
            "share".into(),
        ]);
        let total = g.peak_allocated_bytes.get().max(1) as f64;
        for (name, b) in g.breakdown.items() {
            if b.get() > 0 {
                t.add_row(vec![
                    Cell::new(name),
                    right(b),
                    right(format!("{:.1}%", 100.0 * b.get() as f64 / total)),
                ]);
            }
        }
        t.add_row(vec![
            Cell::new("peak allocated"),
            right(g.peak_allocated_bytes),
            right(""),
        ]);
        t.add_row(vec![
            Cell::new("peak reserved (+ fragmentation)"),
            right(g.peak_reserved_bytes),
            right(""),
        ]);
        if let Some(sim) = &g.simulation {
            let conf = if sim.alloc_conf.is_empty() {
                String::new()
            } else {
                format!(", {}", sim.alloc_conf)
            };
            t.add_row(vec![
                Cell::new(format!("simulated allocator: peak reserved{conf}")),
                right(sim.peak_reserved_bytes),
                right(""),
            ]);
            if let (Some(f), Some(l)) = (
                sim.fragmentation_at_peak_bytes,
                sim.largest_free_block_at_peak_bytes,
            ) {
                t.add_row(vec![
                    Cell::new("  at the allocated peak: reserved - allocated"),
                    right(f),
                    right(""),
                ]);
                t.add_row(vec![
                    Cell::new("  largest free cached block there"),
                    right(l),
                    right(""),
                ]);
            }
            if let Some(at) = &sim.oom_at {
                t.add_row(vec![
                    Cell::new(format!("  out of memory at {at}")),
                    right(""),
                    right(""),
                ]);
            }
        }
        t.add_row(vec![
            Cell::new("+ CUDA context, NCCL"),
            right(g.runtime_overhead_bytes),
            right(""),
        ]);
        t.add_row(vec![
            Cell::new("device total (nvidia-smi)"),
            right(g.device_total_bytes),
            right(format!("of {}", g.capacity_bytes)),
        ]);
        let mut h = new_table(vec![
            format!("host, per node ({} ranks)", e.host.ranks_per_node),
            "bytes".into(),
        ]);
        for (name, b) in e.host.breakdown.items() {
            if b.get() > 0 {
                h.add_row(vec![Cell::new(name), right(b)]);
            }
        }
        h.add_row(vec![Cell::new("total"), right(e.host.per_node_bytes)]);
        let mut tl = new_table(vec!["step".into(), "phase".into(), "allocated".into()]);
        for p in &g.timeline {
            tl.add_row(vec![
                Cell::new(if p.first_step { "first" } else { "steady" }),
                Cell::new(p.phase.name()),
                right(p.allocated_bytes),
            ]);
        }
        let stages = if row.stages.is_empty() {
            String::new()
        } else {
            let mut st = new_table(
                [
                    "pipeline stage",
                    "layers",
                    "peak allocated",
                    "at",
                    "peak reserved",
                    "simulated reserved",
                    "device total",
                    "fits",
                ]
                .map(String::from)
                .to_vec(),
            );
            for s in row.stages {
                let g = &s.per_gpu;
                st.add_row(vec![
                    right(g.stage),
                    right(super::stage_layers(row.plan, g.stage)),
                    right(g.peak_allocated_bytes),
                    Cell::new(g.peak_phase),
                    right(g.peak_reserved_bytes),
                    right(
                        g.simulation
                            .as_ref()
                            .map_or("-".to_string(), |x| x.peak_reserved_bytes.to_string()),
                    ),
                    right(g.device_total_bytes),
                    Cell::new(if s.fits_gpu { "yes" } else { "no" }),
                ]);
            }
            format!("{st}\n")
        };
        format!(
            "{}\n{t}\n{h}\n{tl}\n{stages}{}\n",
            plan_summary(row.plan),
            verdict(e)
        )
    }

    fn compare(&self, rows: &[Row]) -> String {
        let mut header = vec!["component".to_string()];
        for (i, r) in rows.iter().enumerate() {
            header.push(r.label.to_string());
            if i > 0 {
                header.push(format!("{} - {}", r.label, rows[0].label));
            }
        }
        let mut t = new_table(header);
        let n = rows[0].estimate.per_gpu.breakdown.items().len();
        let mut lines: Vec<(String, Vec<Bytes>)> = (0..n)
            .map(|i| {
                (
                    rows[0].estimate.per_gpu.breakdown.items()[i].0.to_string(),
                    rows.iter()
                        .map(|r| r.estimate.per_gpu.breakdown.items()[i].1)
                        .collect(),
                )
            })
            .collect();
        let g = |f: fn(&crate::estimate::Estimate) -> Bytes| -> Vec<Bytes> {
            rows.iter().map(|r| f(r.estimate)).collect()
        };
        lines.push((
            "peak allocated".into(),
            g(|e| e.per_gpu.peak_allocated_bytes),
        ));
        lines.push(("peak reserved".into(), g(|e| e.per_gpu.peak_reserved_bytes)));
        lines.push(("device total".into(), g(|e| e.per_gpu.device_total_bytes)));
        lines.push(("host per node".into(), g(|e| e.host.per_node_bytes)));
        for (name, vals) in lines {
            if vals.iter().all(|v| v.get() == 0) {
                continue;
            }
            let mut cells = vec![Cell::new(name)];
            for (i, v) in vals.iter().enumerate() {
                cells.push(right(v));
                if i > 0 {
                    cells.push(right(signed(v.get() as i128 - vals[0].get() as i128)));
                }
            }
            t.add_row(cells);
        }
        let mut cells = vec![Cell::new("peak phase")];
        for (i, r) in rows.iter().enumerate() {
            cells.push(Cell::new(r.estimate.per_gpu.peak_phase));
            if i > 0 {
                cells.push(Cell::new(""));
            }
        }
        t.add_row(cells);
        let mut out = String::new();
        for r in rows {
            out += &format!("{}: {}\n", r.label, plan_summary(r.plan));
        }
        out += &format!("{t}\n");
        for r in rows {
            out += &format!("{}: {}\n", r.label, verdict(r.estimate));
        }
        out
    }

    fn profiles(&self, models: &[ModelSpec], gpus: &[GpuSpec]) -> String {
        let mut t = new_table(
            [
                "model", "params", "hidden", "layers", "heads", "kv heads", "ffn", "vocab", "tied",
            ]
            .map(String::from)
            .to_vec(),
        );
        for m in models {
            t.add_row(vec![
                Cell::new(&m.name),
                right(m.param_count()),
                right(m.hidden),
                right(m.layers),
                right(m.heads),
                right(m.kv_heads),
                right(m.intermediate),
                right(m.vocab),
                Cell::new(if m.tied_embeddings { "yes" } else { "no" }),
            ]);
        }
        let mut g = new_table(vec!["gpu".into(), "memory".into(), "bf16 TFLOP/s".into()]);
        for x in gpus {
            g.add_row(vec![
                Cell::new(&x.name),
                right(x.memory_bytes),
                right(x.bf16_tflops),
            ]);
        }
        let mut pr = new_table(
            [
                "preset",
                "attention",
                "rmsnorm",
                "gqa",
                "logits",
                "optimizer",
                "rotary",
                "fsdp units",
            ]
            .map(String::from)
            .to_vec(),
        );
        for preset in crate::plan::Preset::ALL {
            let i = preset.implementation();
            pr.add_row(vec![
                Cell::new(preset),
                Cell::new(i.attention),
                Cell::new(i.rmsnorm),
                Cell::new(i.gqa),
                Cell::new(i.logits),
                Cell::new(i.optimizer),
                Cell::new(i.rotary),
                Cell::new(i.fsdp_units),
            ]);
        }
        format!("{t}\n{g}\n{pr}\n")
    }

    fn search(&self, r: &SearchResult, top: usize) -> String {
        let mut t = new_table(
            [
                "#",
                "layout",
                "micro-batch",
                "AC",
                "offload",
                "tokens/micro-step",
                "device total",
                "host/node",
                "peak phase",
                "rel. tokens/s",
            ]
            .map(String::from)
            .to_vec(),
        );
        let best = r.candidates.first().map_or(1.0, |c| c.cost.tokens_per_s);
        for (i, c) in r.candidates.iter().take(top).enumerate() {
            t.add_row(vec![
                right(i + 1),
                Cell::new(layout(c)),
                right(c.plan.batch.micro_batch_size),
                Cell::new(c.plan.activation_checkpointing),
                Cell::new(c.plan.offload),
                right(c.tokens_per_micro_step),
                right(c.device_total_bytes),
                right(c.host_per_node_bytes),
                Cell::new(c.peak_phase),
                right(format!("{:.2}", c.cost.tokens_per_s / best)),
            ]);
        }
        let mut s = format!(
            "{} feasible of {} layouts ({} estimates); GPU usable {} of {}\n{t}\n",
            r.candidates.len(),
            r.layouts,
            r.estimates,
            r.usable_bytes,
            r.capacity_bytes
        );
        for c in r.best_per_offload() {
            s += &format!(
                "best with offload {}: {}, micro-batch {}, AC {} ({} per GPU)\n",
                c.plan.offload,
                layout(c),
                c.plan.batch.micro_batch_size,
                c.plan.activation_checkpointing,
                c.device_total_bytes
            );
        }
        for mode in r.offload_modes_without_fit() {
            s += &format!("no plan fits with offload {mode}\n");
        }
        s
    }

    fn max_batch(&self, r: &super::MaxBatch) -> String {
        let mut s = r.sentence();
        if let Some(row) = &r.found {
            s += &self.estimate(row);
        }
        s
    }
}
