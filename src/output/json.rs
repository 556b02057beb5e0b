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
//!     "timeline": [{"first_step": bool, "phase": str, "allocated_bytes": u64}, ...]
//!   },
//!   "host": { "per_node_bytes": u64, "capacity_bytes": u64, "ranks_per_node": u64,
//!             "breakdown": { "offloaded_params_bytes", "offloaded_gradients_bytes",
//!                            "optimizer_states_bytes", "optimizer_temporaries_bytes",
//!                            "pinned_rounding_bytes", "runtime_bytes" } },
//!   "fits_gpu": bool, "fits_host": bool, "fits": bool
//! }
//! ```
//! `compare` emits `{"schema": "memplan.compare/1", "plans": [ {"label": str, ...estimate
//! envelope without schema...}, ... ]}`; `profiles` emits `{"schema": "memplan.profiles/1",
//! "models": [...], "gpus": [...]}`.

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
    #[serde(flatten)]
    estimate: &'a Estimate,
}

#[derive(Serialize)]
struct ModelRow<'a> {
    #[serde(flatten)]
    spec: &'a ModelSpec,
    param_count: u64,
}

fn to_string<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("output types serialize") + "\n"
}

impl Render for Json {
    fn estimate(&self, row: &Row) -> String {
        to_string(&Envelope {
            schema: Some("memplan.estimate/1"),
            label: None,
            plan: row.plan,
            estimate: row.estimate,
        })
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
                .map(|r| Envelope {
                    schema: None,
                    label: Some(r.label),
                    plan: r.plan,
                    estimate: r.estimate,
                })
                .collect(),
        })
    }

    fn profiles(&self, models: &[ModelSpec], gpus: &[GpuSpec]) -> String {
        #[derive(Serialize)]
        struct Profiles<'a> {
            schema: &'static str,
            models: Vec<ModelRow<'a>>,
            gpus: &'a [GpuSpec],
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
}
