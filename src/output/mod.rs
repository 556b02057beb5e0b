//! Renderers: table, JSON and markdown, one file each behind [`Render`]. They format what
//! the estimator computed and compute nothing themselves. [`timeline`] draws a step's memory
//! timeline (a trace) as SVG and as a self-contained HTML page.

pub mod json;
pub mod markdown;
pub mod memory_viz;
pub mod replay;
pub mod table;
pub mod timeline;
#[cfg(feature = "trainer")]
pub mod validation;

use crate::estimate::Estimate;
use crate::plan::Plan;
use crate::profiles::{GpuSpec, ModelSpec};
use crate::search::{Candidate, SearchResult};

/// One estimated plan, labelled.
pub struct Row<'a> {
    pub label: &'a str,
    pub plan: &'a Plan,
    pub estimate: &'a Estimate,
    /// Every pipeline stage's estimate, in stage order (`estimate --all-stages`); empty
    /// otherwise.
    pub stages: &'a [Estimate],
}

/// "pipeline stage 1 of 4" where the plan has stages, else nothing.
pub fn stage_name(plan: &Plan, stage: u64) -> Option<String> {
    (plan.parallel.pp > 1).then(|| format!("pipeline stage {stage} of {}", plan.parallel.pp))
}

/// Layers a pipeline stage's ranks hold.
pub fn stage_layers(plan: &Plan, stage: u64) -> u64 {
    crate::estimate::params::stage_layers(plan.model.layers, plan.parallel.pp, stage)
}

/// An output format.
pub trait Render {
    /// One plan: breakdown, totals and verdict.
    fn estimate(&self, row: &Row) -> String;
    /// Several plans side by side, with the difference of each against the first.
    fn compare(&self, rows: &[Row]) -> String;
    /// The shipped profiles.
    fn profiles(&self, models: &[ModelSpec], gpus: &[GpuSpec]) -> String;
    /// Plan search results: the best `top`, and the best per offload mode.
    fn search(&self, result: &SearchResult, top: usize) -> String;
    /// The largest micro-batch a plan allows (`search --max-batch`), or that none does.
    fn max_batch(&self, result: &MaxBatch) -> String;
}

/// The answer of `search --max-batch`.
pub struct MaxBatch<'a> {
    /// The plan as given.
    pub plan: &'a Plan,
    /// Fraction of GPU memory kept free.
    pub headroom: f64,
    /// The largest micro-batch tried.
    pub max_micro_batch: u64,
    /// Estimates computed by the binary search.
    pub estimates: u64,
    /// The plan at the largest micro-batch that fits, if any does.
    pub found: Option<Row<'a>>,
}

impl<'a> MaxBatch<'a> {
    /// The answer for `plan`, with `at` the plan at its largest micro-batch and its estimate
    /// ([`crate::search::at_max_micro_batch`]).
    pub fn new(
        plan: &'a Plan,
        headroom: f64,
        max_micro_batch: u64,
        estimates: u64,
        at: Option<&'a (Plan, Estimate)>,
    ) -> Self {
        MaxBatch {
            plan,
            headroom,
            max_micro_batch,
            estimates,
            found: at.map(|(plan, estimate)| Row {
                stages: &[],
                label: &plan.model.name,
                plan,
                estimate,
            }),
        }
    }

    /// The answer in one sentence, as the table and markdown formats print it.
    pub fn sentence(&self) -> String {
        match &self.found {
            Some(row) => {
                let mb = row.plan.batch.micro_batch_size;
                format!(
                    "largest micro-batch that fits with {:.0}% headroom: {mb}{} ({} estimates)\n",
                    self.headroom * 100.0,
                    if mb == self.max_micro_batch {
                        " (the --max-micro-batch limit)"
                    } else {
                        ""
                    },
                    self.estimates
                )
            }
            None => format!(
                "no micro-batch fits: even 1 exceeds the GPU (with {:.0}% headroom) or the host\n",
                self.headroom * 100.0
            ),
        }
    }
}

/// The renderer for a `--format` value.
pub fn renderer(format: Format) -> Box<dyn Render> {
    match format {
        Format::Table => Box::new(table::Table),
        Format::Json => Box::new(json::Json),
        Format::Markdown => Box::new(markdown::Markdown),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Markdown,
}

/// A one-line description of a plan's parallelism, batch and memory options.
pub fn plan_summary(p: &Plan) -> String {
    let par = &p.parallel;
    let mut s = format!("{} on {} x {}", p.model.name, p.num_gpus, p.gpu.name);
    let mut deg = vec![];
    for (name, v) in [
        ("dp_replicate", par.dp_replicate),
        (
            match par.zero.map(|z| z.stage) {
                Some(2) => "deepspeed zero-2",
                Some(_) => "deepspeed zero-3",
                None => "fsdp",
            },
            par.dp_shard,
        ),
        ("tp", par.tp),
        ("pp", par.pp),
        ("cp", par.cp),
    ] {
        if v > 1 {
            deg.push(format!("{name} {v}"));
        }
    }
    if par.sp {
        deg.push("sp".into());
    }
    if !deg.is_empty() {
        s += &format!(" ({})", deg.join(", "));
    }
    s += &format!(
        ", batch {} x seq {}{}, {}/{}/{} (param/reduce/master), {}, AC {}, offload {}",
        p.batch.micro_batch_size,
        p.batch.seq_len,
        if p.batch.grad_accum_steps > 1 {
            format!(" x accum {}", p.batch.grad_accum_steps)
        } else {
            String::new()
        },
        p.precision.param,
        p.precision.reduce,
        p.precision.master,
        p.optimizer,
        p.activation_checkpointing,
        p.offload
    );
    if let Some(l) = p.lora {
        s += &format!(
            ", LoRA rank {} on {}{}{}",
            l.rank,
            l.target_names().join(","),
            if l.dropout { " with dropout" } else { "" },
            match l.quant {
                crate::plan::BaseQuant::None => String::new(),
                q => format!(", base {q} (QLoRA)"),
            }
        );
    }
    if p.preset != crate::plan::Preset::Torchtitan2024 {
        s += &format!(", preset {}", p.preset);
    }
    s
}

/// The verdict in words.
pub fn verdict(e: &Estimate) -> String {
    let g = &e.per_gpu;
    let gpu = if e.fits_gpu {
        format!(
            "fits: {} of {} per GPU, {} headroom",
            g.device_total_bytes,
            g.capacity_bytes,
            crate::units::Bytes(g.headroom_bytes.max(0) as u64)
        )
    } else {
        let at = g
            .first_oom
            .map(|p| {
                format!(
                    " at the {} {} phase",
                    if p.first_step {
                        "first step's"
                    } else {
                        "steady step's"
                    },
                    p.phase.name()
                )
            })
            .unwrap_or_default();
        format!(
            "OUT OF MEMORY{at}: needs {} per GPU, has {}",
            g.device_total_bytes, g.capacity_bytes
        )
    };
    let host = if e.fits_host {
        format!(
            "host fits: {} of {} per node",
            e.host.per_node_bytes, e.host.capacity_bytes
        )
    } else {
        format!(
            "host OUT OF MEMORY: needs {} per node, has {}",
            e.host.per_node_bytes, e.host.capacity_bytes
        )
    };
    format!("{gpu}; {host}")
}

/// A short description of a candidate's layout.
pub fn layout(c: &Candidate) -> String {
    let p = &c.plan.parallel;
    let mut parts = vec![];
    if p.dp_replicate > 1 {
        parts.push(format!("rep {}", p.dp_replicate));
    }
    match &p.zero {
        Some(z) => parts.push(format!("deepspeed zero-{} {}", z.stage, p.dp_shard)),
        None => parts.push(format!("fsdp {}", p.dp_shard)),
    }
    for (name, v) in [("tp", p.tp), ("pp", p.pp), ("cp", p.cp), ("ep", p.ep)] {
        if v > 1 {
            parts.push(format!("{name} {v}"));
        }
    }
    if let Some(l) = c.plan.lora {
        parts.push(format!("lora r{}", l.rank));
    }
    parts.join(", ")
}
