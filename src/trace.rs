//! A training step as ordered allocation events: what the estimator predicts
//! ([`crate::estimate::trace`]) and what the trainer measures, in one shape, so that the
//! timeline renderer ([`crate::output::timeline`]), the memory_viz writer
//! ([`crate::output::memory_viz`]) and the caching-allocator simulation
//! ([`crate::allocator`]) read either.
//!
//! A [`Trace`] is a list of [`Event`]s (allocations and frees of numbered tensors, each with a
//! [`Category`], the module that owns it and the CUDA stream it is allocated on) and a list of
//! [`Mark`]s that name moments between events: the start of each section of a step (forward
//! and backward of every micro-batch, the optimizer step) and, in a predicted trace, the
//! estimator's phase points, where the running sum equals the estimator's phase figure.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a tensor holds: the estimator's breakdown components, in display order, and
/// [`Category::Other`] for a measured tensor the trainer could not attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    MasterParams,
    UnshardedParams,
    Gradients,
    GradientBuffers,
    OptimizerStates,
    OptimizerTemporaries,
    Activations,
    BackwardWorkingSet,
    Logits,
    Workspace,
    Inputs,
    Other,
}

impl Category {
    /// Every category, in display order (the order of [`crate::estimate::Breakdown::items`],
    /// then [`Category::Other`]).
    pub const ALL: [Category; 12] = [
        Category::MasterParams,
        Category::UnshardedParams,
        Category::Gradients,
        Category::GradientBuffers,
        Category::OptimizerStates,
        Category::OptimizerTemporaries,
        Category::Activations,
        Category::BackwardWorkingSet,
        Category::Logits,
        Category::Workspace,
        Category::Inputs,
        Category::Other,
    ];

    /// The breakdown's name for it ("master params", "activations").
    pub fn name(self) -> &'static str {
        match self {
            Category::MasterParams => "master params",
            Category::UnshardedParams => "unsharded params",
            Category::Gradients => "gradients",
            Category::GradientBuffers => "gradient buffers",
            Category::OptimizerStates => "optimizer states",
            Category::OptimizerTemporaries => "optimizer temporaries",
            Category::Activations => "activations",
            Category::BackwardWorkingSet => "backward working set",
            Category::Logits => "logits",
            Category::Workspace => "workspace",
            Category::Inputs => "inputs and rotary table",
            Category::Other => "other",
        }
    }

    /// Position in [`Category::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The module that owns a tensor, as torchtitan names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Module {
    /// The root FSDP unit: embedding, final norm and output together.
    Root,
    TokEmbeddings,
    /// `layers.N`, numbered within the whole model.
    Layer(u32),
    Norm,
    Output,
    Loss,
    Optimizer,
    /// Token ids, labels, the loss scalar, the rotary table.
    Inputs,
    /// Library workspaces (cuBLAS).
    Workspace,
    /// Activations of other pipeline micro-batches in flight.
    Pipeline,
    /// Not attributed (measured).
    Unknown,
}

/// What part of the module, or what the tensor is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    /// The module as a whole.
    Whole,
    Attention,
    FeedForward,
    /// FSDP2's all-gather output (unsharded parameters).
    AllGather,
    /// FSDP2's reduce-scatter input.
    ReduceScatter,
    /// The sharded parameters.
    Shard,
    /// Gradients (sharded unless said).
    Grad,
    /// Optimizer states.
    State,
    /// Checkpointing's recomputation and the backward's gradient temporaries.
    Recompute,
    Logits,
    Ids,
    Rotary,
}

/// Owner of a tensor: a module and a part of it. Displays as torchtitan's module path,
/// `layers.3.attention`, `output.all_gather`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub module: Module,
    pub part: Part,
}

impl Owner {
    pub const fn new(module: Module, part: Part) -> Owner {
        Owner { module, part }
    }
    pub const UNKNOWN: Owner = Owner::new(Module::Unknown, Part::Whole);
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.module {
            Module::Root => f.write_str("model")?,
            Module::TokEmbeddings => f.write_str("tok_embeddings")?,
            Module::Layer(i) => write!(f, "layers.{i}")?,
            Module::Norm => f.write_str("norm")?,
            Module::Output => f.write_str("output")?,
            Module::Loss => f.write_str("loss")?,
            Module::Optimizer => f.write_str("optimizer")?,
            Module::Inputs => f.write_str("inputs")?,
            Module::Workspace => f.write_str("workspace")?,
            Module::Pipeline => f.write_str("pipeline")?,
            Module::Unknown => f.write_str("unknown")?,
        }
        let part = match self.part {
            Part::Whole => return Ok(()),
            Part::Attention => "attention",
            Part::FeedForward => "feed_forward",
            Part::AllGather => "all_gather",
            Part::ReduceScatter => "reduce_scatter",
            Part::Shard => "shard",
            Part::Grad => "grad",
            Part::State => "state",
            Part::Recompute => "recompute",
            Part::Logits => "logits",
            Part::Ids => "ids",
            Part::Rotary => "rotary",
        };
        write!(f, ".{part}")
    }
}

/// Allocation or free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Alloc,
    Free,
}

/// One allocator call. A free repeats its allocation's bytes, category and owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub op: Op,
    /// The tensor's number, unique among live tensors.
    pub id: u64,
    pub bytes: u64,
    pub category: Category,
    pub owner: Owner,
    /// CUDA stream (0: the default stream; FSDP2 all-gathers on 1, reduce-scatters on 2).
    pub stream: u32,
}

/// A section of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Section {
    /// Before the first step: parameters, inputs, workspaces.
    Setup,
    Forward,
    Backward,
    Optimizer,
}

impl Section {
    pub fn name(self) -> &'static str {
        match self {
            Section::Setup => "setup",
            Section::Forward => "forward",
            Section::Backward => "backward",
            Section::Optimizer => "optimizer",
        }
    }
}

/// What a mark names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum MarkKind {
    /// A section begins (of micro-batch `micro` for forward and backward).
    Begin { section: Section, micro: u64 },
    /// One of the estimator's phase points ("forward", "loss-backward", "backward",
    /// "backward-end", "optimizer"): the running sum here is the estimator's figure.
    Point { phase: String },
    /// The end of the trace's last step.
    End,
}

/// A moment between events: after the first `at` events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub at: usize,
    /// Whether it is in the first step (optimizer states are created there) or a steady one.
    pub first_step: bool,
    #[serde(flatten)]
    pub kind: MarkKind,
}

/// Where a trace comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Predicted,
    Measured,
}

/// A training step (the first and a steady one) of one rank as allocation events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub source: Source,
    /// Which rank: its pipeline stage and, where one is named, rank.
    pub stage: u64,
    pub rank: u64,
    /// Device bytes available to the allocator (the GPU's memory less what lives outside
    /// the allocator), for the capacity line; None: unbounded.
    pub capacity_bytes: Option<u64>,
    pub events: Vec<Event>,
    pub marks: Vec<Mark>,
}

/// The JSON schema name of a trace document.
pub const SCHEMA: &str = "memplan.trace/1";

impl Trace {
    /// The trace as a JSON document: `{"schema": "memplan.trace/1", ...its fields}`.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Doc<'a> {
            schema: &'static str,
            #[serde(flatten)]
            trace: &'a Trace,
        }
        serde_json::to_string(&Doc {
            schema: SCHEMA,
            trace: self,
        })
        .expect("traces serialize")
            + "\n"
    }

    /// Allocated bytes after each event, in order. Errors on a free of a tensor that is not
    /// live, an allocation of a live id, or a free whose bytes differ from its allocation.
    pub fn running(&self) -> Result<Vec<u64>> {
        let mut live = std::collections::HashMap::with_capacity(self.events.len() / 2);
        let mut total = 0u64;
        let mut out = Vec::with_capacity(self.events.len());
        for (k, e) in self.events.iter().enumerate() {
            match e.op {
                Op::Alloc => {
                    if live.insert(e.id, e.bytes).is_some() {
                        return Err(Error::input(format!(
                            "trace event {k}: tensor {} allocated while live",
                            e.id
                        )));
                    }
                    total = total
                        .checked_add(e.bytes)
                        .ok_or_else(|| Error::overflow("trace allocated bytes"))?;
                }
                Op::Free => match live.remove(&e.id) {
                    Some(b) if b == e.bytes => total -= b,
                    Some(b) => {
                        return Err(Error::input(format!(
                            "trace event {k}: tensor {} freed with {} bytes, allocated with {b}",
                            e.id, e.bytes
                        )))
                    }
                    None => {
                        return Err(Error::input(format!(
                            "trace event {k}: free of tensor {}, which is not live",
                            e.id
                        )))
                    }
                },
            }
            out.push(total);
        }
        Ok(out)
    }

    /// Allocated bytes per [`Category`] after the first `at` events.
    pub fn categories_at(&self, at: usize) -> [u64; 12] {
        let mut c = [0u64; 12];
        for e in &self.events[..at.min(self.events.len())] {
            let slot = &mut c[e.category.index()];
            match e.op {
                Op::Alloc => *slot = slot.wrapping_add(e.bytes),
                Op::Free => *slot = slot.wrapping_sub(e.bytes),
            }
        }
        c
    }

    /// Highest allocated bytes and the number of events up to it (0 for an empty trace).
    pub fn peak(&self) -> Result<(u64, usize)> {
        let run = self.running()?;
        let mut best = (0, 0);
        for (k, &v) in run.iter().enumerate() {
            if v > best.0 {
                best = (v, k + 1);
            }
        }
        Ok(best)
    }

    /// The allocator calls of the trace, for [`crate::allocator::replay`].
    pub fn allocator_events(&self) -> Vec<crate::allocator::Event> {
        self.events
            .iter()
            .map(|e| match e.op {
                Op::Alloc => crate::allocator::Event::Alloc {
                    id: e.id,
                    bytes: e.bytes,
                    stream: e.stream,
                },
                Op::Free => crate::allocator::Event::Free { id: e.id },
            })
            .collect()
    }

    /// The phase point marks, in order: (mark, allocated bytes there).
    pub fn points(&self) -> Result<Vec<(&Mark, u64)>> {
        let run = self.running()?;
        Ok(self
            .marks
            .iter()
            .filter(|m| matches!(m.kind, MarkKind::Point { .. }))
            .map(|m| (m, if m.at == 0 { 0 } else { run[m.at - 1] }))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(op: Op, id: u64, bytes: u64) -> Event {
        Event {
            op,
            id,
            bytes,
            category: Category::Activations,
            owner: Owner::new(Module::Layer(3), Part::Attention),
            stream: 0,
        }
    }

    fn trace(events: Vec<Event>) -> Trace {
        Trace {
            source: Source::Predicted,
            stage: 0,
            rank: 0,
            capacity_bytes: None,
            events,
            marks: vec![],
        }
    }

    #[test]
    fn running_sums_and_checks_ids() {
        let t = trace(vec![
            ev(Op::Alloc, 1, 10),
            ev(Op::Alloc, 2, 5),
            ev(Op::Free, 1, 10),
        ]);
        assert_eq!(t.running().unwrap(), vec![10, 15, 5]);
        assert_eq!(t.peak().unwrap(), (15, 2));
        assert_eq!(t.categories_at(2)[Category::Activations.index()], 15);
        assert!(trace(vec![ev(Op::Free, 1, 10)]).running().is_err());
        assert!(trace(vec![ev(Op::Alloc, 1, 10), ev(Op::Alloc, 1, 10)])
            .running()
            .is_err());
        assert!(trace(vec![ev(Op::Alloc, 1, 10), ev(Op::Free, 1, 9)])
            .running()
            .is_err());
    }

    #[test]
    fn owners_display_as_module_paths() {
        assert_eq!(
            Owner::new(Module::Layer(3), Part::Attention).to_string(),
            "layers.3.attention"
        );
        assert_eq!(
            Owner::new(Module::Output, Part::AllGather).to_string(),
            "output.all_gather"
        );
        assert_eq!(Owner::new(Module::Loss, Part::Whole).to_string(), "loss");
    }
}
