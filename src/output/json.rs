//! JSON output: one envelope object per command, stable field names, raw byte integers.
//!
//! # Schema (`memplan estimate --format json`)
//! ```text
//! {
//!   "schema": "memplan.estimate/1",
//!   "plan": { ...the resolved plan: model, gpu, num_gpus, parallel, batch, precision, ... },
//!   "per_gpu": {
//!     "stage": 0,
//!     "peak_allocated_bytes": u64,   // torch.cuda.max_memory_allocated() equivalent
//!     "peak_reserved_bytes": u64,    // + caching-allocator fragmentation
//!     "runtime_overhead_bytes": u64, // CUDA context, NCCL: outside the allocator
//!     "device_total_bytes": u64,     // reserved + runtime: what nvidia-smi shows
//!     "capacity_bytes": u64, "headroom_bytes": i64,
//!     "peak_phase": "forward" | "loss-backward" | "backward" | "backward-end" | "optimizer (first step)" | "optimizer (steady step)",
//!     "breakdown": { "master_params_bytes": u64, "unsharded_params_bytes": u64,
//!                    "gradients_bytes": u64, "gradient_buffers_bytes": u64,
//!                    "optimizer_states_bytes": u64, "optimizer_temporaries_bytes": u64,
//!                    "activations_bytes": u64, "backward_working_set_bytes": u64,
//!                    "logits_bytes": u64, "workspace_bytes": u64 },
//!     "first_oom": null | {"first_step": bool, "phase": str, "allocated_bytes": u64},
//!     "timeline": [{"first_step": bool, "phase": str, "allocated_bytes": u64}, ...],
//!     "simulation"?: {                 // the caching-allocator simulation of the step
//!       "alloc_conf": str, "peak_reserved_bytes": u64,
//!       "reserved_at_peak_bytes": u64 | null, "fragmentation_at_peak_bytes": u64 | null,
//!       "largest_free_block_at_peak_bytes": u64 | null, "segments": u64,
//!       "device_allocs": u64, "oom_event": u64 | null, "oom_at": str | null }
//!   },
//!   "host": { "per_node_bytes": u64, "capacity_bytes": u64, "ranks_per_node": u64,
//!             "breakdown": { "offloaded_params_bytes", "offloaded_gradients_bytes",
//!                            "optimizer_states_bytes", "optimizer_temporaries_bytes",
//!                            "pinned_rounding_bytes", "runtime_bytes" } },
//!   "fits_gpu": bool, "fits_host": bool, "fits": bool
//! }
//! ```
//! Every estimate envelope also carries `"param_count": u64` (the model's exact parameter
//! count) and `"warnings": [str]` (settings accepted but probably not meant; also on stderr).
//!
//! `compare` emits `{"schema": "memplan.compare/1", "plans": [ {"label": str, ...estimate
//! envelope without schema...}, ... ]}`; `profiles` emits `{"schema": "memplan.profiles/1",
//! "models": [...], "gpus": [...]}`; `search` emits `memplan.search/1`; `search --max-batch`
//! emits `{"schema": "memplan.max-batch/1", "plan", "headroom", "max_micro_batch",
//! "estimates", "micro_batch_size": u64 | null, "estimate": envelope | null}`.
//!
//! Whatever happens, stdout holds exactly one JSON document: a failing command emits
//! `{"schema": "memplan.error/1", "error": {"kind": "input" | "overflow" | "output" |
//! "runtime", "field": str | null, "message": str}, "exit_code": u8}` (see [`error`]).

use serde::Serialize;

use super::{Render, Row};
use crate::estimate::Estimate;
use crate::plan::Plan;
use crate::profiles::{GpuSpec, ModelSpec};
use crate::search::SearchResult;

pub struct Json;

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<&'a str>,
    plan: &'a Plan,
    /// The model's exact parameter count, as `profiles` gives it.
    param_count: u64,
    #[serde(flatten)]
    estimate: &'a Estimate,
    /// Settings accepted but probably not meant (also printed on stderr).
    warnings: &'a [String],
    /// `--all-stages`: every pipeline stage's ranks, in stage order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stages: Vec<StageRow<'a>>,
}

/// One pipeline stage's figures (the per-GPU estimate of its ranks).
#[derive(Serialize)]
struct StageRow<'a> {
    layers: u64,
    #[serde(flatten)]
    per_gpu: &'a crate::estimate::GpuEstimate,
    fits_gpu: bool,
}

impl<'a> Envelope<'a> {
    fn new(schema: Option<&'static str>, label: Option<&'a str>, row: &Row<'a>) -> Self {
        Envelope {
            schema,
            label,
            plan: row.plan,
            param_count: row.plan.model.param_count(),
            estimate: row.estimate,
            warnings: &row.plan.warnings,
            stages: row
                .stages
                .iter()
                .map(|e| StageRow {
                    layers: crate::output::stage_layers(row.plan, e.per_gpu.stage),
                    per_gpu: &e.per_gpu,
                    fits_gpu: e.fits_gpu,
                })
                .collect(),
        }
    }
}

/// The document printed on stdout under `--format json` when a command fails: schema
/// `memplan.error/1`, with the error's kind, the field at fault (or null), the one-line
/// message and the exit code.
pub fn error(e: &crate::error::Error) -> String {
    use crate::error::Kind;
    #[derive(Serialize)]
    struct ErrorDoc<'a> {
        schema: &'static str,
        error: Body<'a>,
        exit_code: u8,
    }
    #[derive(Serialize)]
    struct Body<'a> {
        kind: &'static str,
        field: Option<&'a str>,
        message: String,
    }
    to_string(&ErrorDoc {
        schema: "memplan.error/1",
        error: Body {
            kind: match e.kind() {
                Kind::Input | Kind::Io => "input",
                Kind::Overflow => "overflow",
                Kind::Output => "output",
                Kind::Runtime => "runtime",
            },
            field: e.field(),
            message: e.to_string(),
        },
        exit_code: e.exit_code(),
    })
}

#[derive(Serialize)]
struct ModelRow<'a> {
    #[serde(flatten)]
    spec: &'a ModelSpec,
    param_count: u64,
}

/// Any output document, pretty-printed, with a final newline.
pub fn to_string<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("output types serialize") + "\n"
}

impl Render for Json {
    fn estimate(&self, row: &Row) -> String {
        to_string(&Envelope::new(Some("memplan.estimate/1"), None, row))
    }

    fn compare(&self, rows: &[Row]) -> String {
        #[derive(Serialize)]
        struct Compare<'a> {
            schema: &'static str,
            plans: Vec<Envelope<'a>>,
        }
        to_string(&Compare {
            schema: "memplan.compare/1",
            plans: rows
                .iter()
                .map(|r| Envelope::new(None, Some(r.label), r))
                .collect(),
        })
    }

    fn profiles(&self, models: &[ModelSpec], gpus: &[GpuSpec]) -> String {
        #[derive(Serialize)]
        struct Profiles<'a> {
            schema: &'static str,
            models: Vec<ModelRow<'a>>,
            gpus: &'a [GpuSpec],
            presets: Vec<PresetRow>,
        }
        #[derive(Serialize)]
        struct PresetRow {
            name: crate::plan::Preset,
            implementation: crate::plan::Implementation,
        }
        to_string(&Profiles {
            schema: "memplan.profiles/1",
            models: models
                .iter()
                .map(|m| ModelRow {
                    spec: m,
                    param_count: m.param_count(),
                })
                .collect(),
            gpus,
            presets: crate::plan::Preset::ALL
                .into_iter()
                .map(|name| PresetRow {
                    name,
                    implementation: name.implementation(),
                })
                .collect(),
        })
    }

    fn search(&self, r: &SearchResult, top: usize) -> String {
        #[derive(Serialize)]
        struct Search<'a> {
            schema: &'static str,
            layouts: u64,
            estimates: u64,
            feasible: usize,
            capacity_bytes: crate::units::Bytes,
            usable_bytes: crate::units::Bytes,
            candidates: &'a [crate::search::Candidate],
        }
        to_string(&Search {
            schema: "memplan.search/1",
            layouts: r.layouts,
            estimates: r.estimates,
            feasible: r.candidates.len(),
            capacity_bytes: r.capacity_bytes,
            usable_bytes: r.usable_bytes,
            candidates: &r.candidates[..top.min(r.candidates.len())],
        })
    }

    fn max_batch(&self, r: &super::MaxBatch) -> String {
        #[derive(Serialize)]
        struct MaxBatchDoc<'a> {
            schema: &'static str,
            plan: &'a Plan,
            headroom: f64,
            max_micro_batch: u64,
            estimates: u64,
            /// The largest micro-batch that fits, or null when not even 1 does.
            micro_batch_size: Option<u64>,
            /// The estimate at that micro-batch, or null.
            estimate: Option<Envelope<'a>>,
        }
        to_string(&MaxBatchDoc {
            schema: "memplan.max-batch/1",
            plan: r.plan,
            headroom: r.headroom,
            max_micro_batch: r.max_micro_batch,
            estimates: r.estimates,
            micro_batch_size: r.found.as_ref().map(|row| row.plan.batch.micro_batch_size),
            estimate: r.found.as_ref().map(|row| Envelope::new(None, None, row)),
        })
    }
}
