//! Markdown tables, for pasting into issues and READMEs.

use super::{layout, plan_summary, verdict, Render, Row};
use crate::profiles::{GpuSpec, ModelSpec};
use crate::search::SearchResult;

pub struct Markdown;

fn gib(b: crate::units::Bytes) -> String {
    format!("{:.2}", b.as_gib())
}

impl Render for Markdown {
    fn estimate(&self, row: &Row) -> String {
        let e = row.estimate;
        let g = &e.per_gpu;
        let at = match super::stage_name(row.plan, g.stage) {
            Some(stage) => format!("{}, {stage}", g.peak_phase),
            None => g.peak_phase.to_string(),
        };
        let mut s = format!(
            "**{}**\n\n| per GPU at peak ({at}) | GiB |\n|---|---:|\n",
            cell(&plan_summary(row.plan)),
        );
        for (name, b) in g.breakdown.items() {
            if b.get() > 0 {
                s += &format!("| {name} | {} |\n", gib(b));
            }
        }
        s += &format!(
            "| **peak allocated** | **{}** |\n| peak reserved | {} |\n| device total | {} |\n| capacity | {} |\n\n",
            gib(g.peak_allocated_bytes),
            gib(g.peak_reserved_bytes),
            gib(g.device_total_bytes),
            gib(g.capacity_bytes)
        );
        s += "| host per node | GiB |\n|---|---:|\n";
        for (name, b) in e.host.breakdown.items() {
            if b.get() > 0 {
                s += &format!("| {name} | {} |\n", gib(b));
            }
        }
        s += &format!("| **total** | **{}** |\n\n", gib(e.host.per_node_bytes));
        if !row.stages.is_empty() {
            s += "| pipeline stage | layers | peak allocated (GiB) | at | peak reserved | simulated reserved | device total | fits |\n|---:|---:|---:|---|---:|---:|---:|---|\n";
            for st in row.stages {
                let g = &st.per_gpu;
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    g.stage,
                    super::stage_layers(row.plan, g.stage),
                    gib(g.peak_allocated_bytes),
                    g.peak_phase,
                    gib(g.peak_reserved_bytes),
                    g.simulation
                        .as_ref()
                        .map_or("-".to_string(), |x| gib(x.peak_reserved_bytes)),
                    gib(g.device_total_bytes),
                    if st.fits_gpu { "yes" } else { "no" }
                );
            }
            s += "\n";
        }
        s += &format!("{}\n", verdict(e));
        s
    }

    fn compare(&self, rows: &[Row]) -> String {
        let mut s = String::from("| GiB |");
        for r in rows {
            s += &format!(" {} |", cell(r.label));
        }
        s += "\n|---|";
        s += &"---:|".repeat(rows.len());
        s += "\n";
        let n = rows[0].estimate.per_gpu.breakdown.items().len();
        for i in 0..n {
            let name = rows[0].estimate.per_gpu.breakdown.items()[i].0;
            s += &format!("| {name} |");
            for r in rows {
                s += &format!(" {} |", gib(r.estimate.per_gpu.breakdown.items()[i].1));
            }
            s += "\n";
        }
        for (name, f) in [
            (
                "**peak allocated**",
                (|e| e.per_gpu.peak_allocated_bytes)
                    as fn(&crate::estimate::Estimate) -> crate::units::Bytes,
            ),
            ("peak reserved", |e| e.per_gpu.peak_reserved_bytes),
            ("device total", |e| e.per_gpu.device_total_bytes),
            ("host per node", |e| e.host.per_node_bytes),
        ] {
            s += &format!("| {name} |");
            for r in rows {
                s += &format!(" {} |", gib(f(r.estimate)));
            }
            s += "\n";
        }
        s += "| fits |";
        for r in rows {
            s += &format!(" {} |", if r.estimate.fits { "yes" } else { "**no**" });
        }
        s += "\n";
        s
    }

    fn profiles(&self, models: &[ModelSpec], gpus: &[GpuSpec]) -> String {
        let mut s = String::from("| model | params | hidden | layers | heads | kv heads | vocab |\n|---|---:|---:|---:|---:|---:|---:|\n");
        for m in models {
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                cell(&m.name),
                m.param_count(),
                m.hidden,
                m.layers,
                m.heads,
                m.kv_heads,
                m.vocab
            );
        }
        s += "\n| gpu | memory (GiB) |\n|---|---:|\n";
        for g in gpus {
            s += &format!("| {} | {} |\n", cell(&g.name), gib(g.memory_bytes));
        }
        s += "\n| preset | attention | rmsnorm | gqa | logits | optimizer | rotary | fsdp units |\n|---|---|---|---|---|---|---|---|\n";
        for p in crate::plan::Preset::ALL {
            let i = p.implementation();
            s += &format!(
                "| {p} | {} | {} | {} | {} | {} | {} | {} |\n",
                i.attention, i.rmsnorm, i.gqa, i.logits, i.optimizer, i.rotary, i.fsdp_units
            );
        }
        s
    }

    fn search(&self, r: &SearchResult, top: usize) -> String {
        let mut s = String::from(
            "| # | layout | micro-batch | AC | offload | tokens/micro-step | device total (GiB) |\n|---:|---|---:|---|---|---:|---:|\n",
        );
        for (i, c) in r.candidates.iter().take(top).enumerate() {
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                i + 1,
                layout(c),
                c.plan.batch.micro_batch_size,
                c.plan.activation_checkpointing,
                c.plan.offload,
                c.tokens_per_micro_step,
                gib(c.device_total_bytes)
            );
        }
        s
    }

    fn max_batch(&self, r: &super::MaxBatch) -> String {
        let mut s = r.sentence();
        if let Some(row) = &r.found {
            s += "\n";
            s += &self.estimate(row);
        }
        s
    }
}

/// Text for a markdown table cell: `|` would end the cell and a newline the row.
fn cell(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\n', '\r'], " ")
}
