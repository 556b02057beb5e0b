//! A real training run on libtorch (through tch) that executes a [`Plan`] and measures the
//! exact peak allocations of each phase, so that the estimator can be checked against it.
//!
//! # What runs
//! The Llama decoder of torchtitan (late 2024) op for op ([`model`]), trained on synthetic
//! token sequences with learnable structure, under FSDP2 as rank 0 of `dp_shard` ranks sees it
//! ([`fsdp`]), with torchtitan's mixed precision (fp32 master parameters, compute copies in
//! `precision.param`, gradients reduced in `precision.reduce`), activation checkpointing,
//! offload and torch.optim's optimizers ([`optim`]). One training step is torchtitan's:
//! `zero_grad` (gradients set to None), then per micro-batch forward, loss, `del pred`,
//! backward; then the optimizer step.
//!
//! # What is measured
//! Per step and per phase (forward, backward, optimizer), with peaks reset between phases:
//! - CPU run: exact bytes of live tensors from a counting CPU allocator (requested sizes, no
//!   allocator rounding). Tensors the device would hold and tensors the host would hold
//!   (offloaded state) are counted in separate channels, so a CPU run reports what a GPU
//!   would hold even though both are the same RAM here.
//! - CUDA run: the caching allocator's allocated and reserved bytes (current and peak), the
//!   process's device use from the driver, and host bytes from the counting allocator.
//!
//! Step 1 (optimizer states are created there) and the last step (steady state) are
//! reported separately. Out of memory is a result: the report names the step and phase.
//!
//! On request ([`TrainOptions::record_trace`]) the run also records its device allocations
//! and frees, in order and attributed to what they hold, as a [`Trace`] ([`recorder`]):
//! setup, step 1 and the last step, whose running sum is the device counter at every event.
//!
//! # What is and is not modelled
//! It is a single-device emulation of rank 0: the other ranks' shards live on the host,
//! outside the counters; every rank sees the same data, so rank 0's gradient is the average.
//! Not modelled: communication time, NCCL buffers, FSDP2's separate CUDA streams (which
//! change reserved, not allocated, bytes), pinned host memory, gradient clipping, the
//! dataloader. Fp16, selective per-op checkpointing and what the plan asks that the trainer
//! does not execute (`check_supported`) are refused with an error; HSDP, tensor, pipeline and
//! context parallelism run only as real multi-process jobs (pipelining: [`pipeline`], a stage
//! per rank under GPipe and 1F1B or several under interleaved 1F1B, with or without FSDP2
//! inside a stage; tensor parallelism:
//! [`tensor_parallel`], with or without SP and loss parallelism, and under FSDP on a
//! (dp_shard, tp) mesh; context parallelism: [`context_parallel`], a sequence shard per rank in
//! torch's ring attention, under this module's FSDP over dp_shard x cp). Mixture-of-experts
//! models run as torchtitan 0.2.2's MoE ([`expert_parallel`]: router, grouped-mm experts,
//! load balancing), on one process or with expert parallelism across the dp_shard processes
//! (all-to-all dispatch and combine, the experts on their one-rank FSDP mesh).
//!
//! # Checked against PyTorch itself
//! `fsdp2_reference.py` (next to this file) runs torchtitan's model under PyTorch's own
//! `fully_shard` as rank 0 of a fake process group, counted by the same allocator. On the
//! tiny profile (fp32 and bf16/fp32 mixed precision; 1, 2 and 3 ranks, 3 exercising padding;
//! no AC and full AC) every phase's start, peak and end bytes agree to the byte, except 4
//! bytes per parameter tensor: torch.optim's CPU `step` scalars, which this trainer counts as
//! host memory because on a GPU run they are.
//!
//! Checkpointing recomputes a block from its kept input with a custom autograd node and frees
//! the recomputed output's data before the block's backward (the block ends in a residual
//! add, which saves nothing), so it allocates what torch's non-reentrant checkpoint
//! (torchtitan's `checkpoint_wrapper`) does. The block's incoming gradient is handed to the
//! recompute's backward ([`ffi::backward_owned`]), which frees it once the residual sum
//! replaces it, as torch's checkpoint does (held to the block's end, it stood one activation
//! above torch in ring attention's backward under context parallelism).

pub mod context_parallel;
pub mod dist;
pub mod expert_parallel;
pub mod ffi;
pub mod fsdp;
pub mod launch;
pub mod memory;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod recorder;
pub mod tensor_parallel;

use std::cell::RefCell;
use std::ffi::{c_int, c_void};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::{Error, Result};
use crate::plan::{Checkpointing, DType, Logits, Offload, Plan};
use crate::profiles::ModelSpec;
use crate::trace::{Category, Module, Part, Section, Trace};
use ffi::Channel;
use fsdp::{Emulated, Env, Fsdp, FsdpParam, Group};
use memory::{Meter, PhaseMemory};
use model::{BlockWeights, Dims, Flavor, RootWeights, TResult};
use optim::OptConfig;
use recorder::Context;

/// Where the run happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainDevice {
    Cpu,
    Cuda(usize),
}

/// How to run a plan.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Optimizer steps to run.
    pub steps: u64,
    pub device: TrainDevice,
    /// Seeds the weights and the data.
    pub seed: u64,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Peak learning rate; None: [`default_lr`] of the model's width.
    pub lr: Option<f64>,
    /// CPU runs only: device bytes available to the run (beyond what was allocated before
    /// it), so that a CPU run stands for a GPU of that capacity and runs out of memory where
    /// the GPU would. None: unlimited.
    pub device_limit: Option<u64>,
    /// Fault injection for tests of a multi-process job: abort the process (SIGABRT) at the
    /// start of this step, as a crashed rank would end.
    pub abort_at_step: Option<u64>,
    /// Print `memplan-progress STEP STEPS LOSS` on stderr after each step, for a launcher
    /// that draws one progress bar for the whole job.
    pub progress_lines: bool,
    /// Record the run's device allocations and frees as a [`Trace`] ([`recorder`]): setup,
    /// step 1 and the last step, in [`TrainReport::trace`].
    pub record_trace: bool,
}

/// The default peak learning rate for a model of width `hidden`: 0.25 / hidden, at most 3e-3
/// (narrow models take larger steps; `small`, h 256, diverges into the uniform
/// distribution at 3e-3 and learns at 1e-3; `tiny`, h 64, learns at 3e-3).
pub fn default_lr(hidden: u64) -> f64 {
    (0.25 / hidden.max(1) as f64).min(3e-3)
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 3,
            device: TrainDevice::Cpu,
            seed: 0,
            progress: false,
            lr: None,
            device_limit: None,
            abort_at_step: None,
            progress_lines: false,
            record_trace: false,
        }
    }
}

/// The three phases of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Setup,
    Forward,
    Backward,
    Optimizer,
}

/// Memory and loss of one optimizer step. With gradient accumulation, forward and backward
/// hold the maxima over the micro-batches.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepReport {
    /// 1-based.
    pub step: u64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// L2 norm of the whole job's gradient (every rank's shard), before the optimizer.
    pub grad_norm: f64,
    pub forward: PhaseMemory,
    pub backward: PhaseMemory,
    pub optimizer: PhaseMemory,
    /// Highest device bytes allocated in the step.
    pub peak_allocated_bytes: u64,
}

impl StepReport {
    /// A step's report from its three phases' memory: the step's peak is the highest of theirs.
    pub(crate) fn of_phases(
        step: u64,
        loss: f64,
        grad_norm: f64,
        forward: PhaseMemory,
        backward: PhaseMemory,
        optimizer: PhaseMemory,
    ) -> StepReport {
        StepReport {
            step,
            loss,
            grad_norm,
            peak_allocated_bytes: forward
                .peak_allocated_bytes
                .max(backward.peak_allocated_bytes)
                .max(optimizer.peak_allocated_bytes),
            forward,
            backward,
            optimizer,
        }
    }
}

/// The highest `f` of any phase of `steps` (0 for none).
pub(crate) fn steps_peak(steps: &[StepReport], f: fn(&PhaseMemory) -> u64) -> u64 {
    steps
        .iter()
        .flat_map(|s| [f(&s.forward), f(&s.backward), f(&s.optimizer)])
        .max()
        .unwrap_or(0)
}

/// Tokens per second of a run (0 for a run that took no measurable time).
pub(crate) fn tokens_per_second(tokens: u64, elapsed: f64) -> f64 {
    if elapsed > 0.0 {
        tokens as f64 / elapsed
    } else {
        0.0
    }
}

/// Where a run ran out of memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OomReport {
    pub step: u64,
    pub phase: Phase,
    pub message: String,
    /// Peak device bytes allocated in the failing step's forward, backward and optimizer
    /// phases up to the failure (0 for a phase not reached).
    pub peak_allocated_bytes: [u64; 3],
}

/// What a run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    pub model: String,
    pub device: TrainDevice,
    /// FSDP degree (emulated: rank 0 of this many).
    pub dp_shard: u64,
    /// This process's rank (0 for the emulation).
    pub rank: u64,
    /// Processes in the job (1 for the single-device emulation).
    pub processes: u64,
    /// The pipeline stage this rank ran (pipelined jobs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pp_stage: Option<u64>,
    pub steps_requested: u64,
    /// Steps that completed.
    pub steps_completed: u64,
    /// Device bytes allocated after setup (rank 0's sharded parameters, rotary table).
    pub setup_allocated_bytes: u64,
    /// Host bytes allocated after setup (offloaded shards).
    pub setup_host_bytes: u64,
    /// Step 1 (optimizer states are created there).
    pub first_step: Option<StepReport>,
    /// The last completed step.
    pub steady_step: Option<StepReport>,
    pub steps: Vec<StepReport>,
    pub losses: Vec<f64>,
    /// Highest device bytes allocated over the run.
    pub peak_allocated_bytes: u64,
    /// CUDA only: highest bytes reserved by the caching allocator over the run.
    pub peak_reserved_bytes: Option<u64>,
    /// Highest counted host bytes over the run.
    pub peak_host_bytes: u64,
    pub tokens_per_second: f64,
    pub oom: Option<OomReport>,
    pub notes: Vec<String>,
    /// The measured allocation events of setup, step 1 and the last step (only when
    /// [`TrainOptions::record_trace`] asked for them; see [`recorder`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Trace>,
}

fn unsupported(what: &str, got: impl std::fmt::Display, accepted: &str) -> Error {
    Error::invalid(
        what,
        got,
        format!("{accepted} (not supported by the trainer)"),
    )
}

fn kind(d: DType) -> Kind {
    match d {
        DType::Fp32 => Kind::Float,
        DType::Bf16 => Kind::BFloat16,
        DType::Fp16 => Kind::Half,
    }
}

/// A checkpointed block's backward (every trainer's checkpoint hook): recomputes the block
/// from its kept input `x` with autograd and runs its backward with the incoming `grad`;
/// returns the gradient of `x`.
pub(crate) fn recompute_block(
    x: Tensor,
    grad: Tensor,
    block: impl FnOnce(&Tensor) -> TResult<Tensor>,
) -> TResult<Option<Tensor>> {
    let xd = x.f_detach()?.f_set_requires_grad(true)?;
    drop(x);
    let y = tch::with_grad(|| block(&xd))?;
    // The block ends in a residual add, which saves nothing: its output's data is not needed
    // for backward. Freeing it matches torch's non-reentrant checkpoint, whose early stop
    // never keeps the recomputed output.
    ffi::storage_resize(&y, 0).map_err(fsdp::shim)?;
    // The incoming gradient is handed over: torch's checkpoint holds no reference to it once
    // the block's last node has taken it (measured under CP, where ring attention's backward
    // peaks: one activation above torch while it was held).
    ffi::backward_owned(&y, grad).map_err(fsdp::shim)?;
    drop(y);
    ffi::take_grad(&xd).map_err(fsdp::shim)
}

/// Refuses what the trainer cannot run, with the reason.
fn check_supported(plan: &Plan, distributed: bool) -> Result<()> {
    let m = &plan.model;
    if m.moe.is_some() {
        expert_parallel::check(plan)?;
    }
    if !m.is_llama_block() {
        return Err(unsupported(
            "model",
            format!("{} ({:?} block)", m.name, m.family),
            "a Llama-family block (RMSNorm, separate q/k/v, SwiGLU, no q/k norms): the trainer \
             runs torchtitan's Llama block only",
        ));
    }
    let p = &plan.parallel;
    if p.cp != 1 {
        if !distributed {
            return Err(unsupported(
                "parallel.cp",
                p.cp,
                "1 in the single-device emulation (a multi-process run, --nproc-per-node \
                 dp_shard x cp, runs a sequence shard per rank)",
            ));
        }
        context_parallel::check(plan)?;
    }
    if p.tp != 1 {
        if !distributed {
            return Err(unsupported(
                "parallel.tp",
                p.tp,
                "1 in the single-device emulation (a multi-process run, --nproc-per-node tp, \
                 runs a shard per rank)",
            ));
        }
        tensor_parallel::check(plan)?;
    }
    if p.pp != 1 {
        if !distributed {
            return Err(unsupported(
                "parallel.pp",
                p.pp,
                "1 in the single-device emulation (a multi-process run, --nproc-per-node pp, \
                 runs a stage per rank)",
            ));
        }
        pipeline::check(plan)?;
    }
    if p.dp_replicate != 1 && !distributed {
        return Err(unsupported(
            "parallel.dp_replicate",
            p.dp_replicate,
            "1: HSDP is not emulated (a multi-process run, --nproc-per-node, runs it)",
        ));
    }
    if plan.activation_checkpointing == Checkpointing::SelectiveOp {
        return Err(unsupported(
            "activation_checkpointing",
            "\"selective-op\"",
            "none, full or selective-layer:K: per-op policies need saved-tensor hooks tch lacks",
        ));
    }
    // What the trainer does not execute is refused, never run as something else.
    let imp = &plan.implementation;
    let refused: [(bool, &str, String, &str); 16] = [
        (
            plan.parallel.zero.is_some(),
            "parallel.zero",
            "a DeepSpeed ZeRO stage".into(),
            "absent: the trainer runs FSDP2, not DeepSpeed (ZeRO plans are estimated and \
             measured against DeepSpeed itself: src/trainer/deepspeed_reference.py)",
        ),
        (
            imp.logits == crate::plan::Logits::Chunked,
            "implementation.logits",
            "\"chunked\"".into(),
            "float-output, float-in-loss, compute-dtype or a kept mode: the trainer computes \
             the whole batch's logits",
        ),
        (
            imp.qkv == crate::plan::Qkv::FusedCopies,
            "implementation.qkv",
            "\"fused-copies\"".into(),
            "separate: the trainer projects q, k and v with three linears",
        ),
        (
            imp.zero_grad == crate::plan::ZeroGrad::Zeros,
            "implementation.zero_grad",
            "\"zeros\"".into(),
            "set-to-none: the trainer frees the gradients after each step",
        ),
        (
            imp.fsdp_one_gpu,
            "implementation.fsdp_one_gpu",
            "true".into(),
            "false: the trainer wraps FSDP only over more than one rank",
        ),
        (
            imp.rotary == crate::plan::Rotary::PerLayer,
            "implementation.rotary",
            "\"per-layer\"".into(),
            "complex or complex-seq: the trainer builds one freqs_cis table",
        ),
        (
            imp.optimizer == crate::plan::OptimizerImpl::FusedBf16States,
            "implementation.optimizer",
            "\"fused-bf16-states\"".into(),
            "foreach, fused or per-param: bf16 states beside fp32 parameters need CUDA's \
             mixed-precision fused kernel",
        ),
        (
            plan.lora.is_some(),
            "lora",
            "adapters".into(),
            "none: the trainer trains every parameter",
        ),
        (
            plan.precision.autocast,
            "precision.autocast",
            "true".into(),
            "false: the trainer casts as FSDP's mixed precision does",
        ),
        (plan.compile, "compile", "true".into(), "false (eager ops)"),
        (
            plan.optimizer.factored(),
            "optimizer",
            format!("\"{}\"", plan.optimizer),
            "adamw, adam, sgd or sgd-momentum: libtorch has no 8-bit AdamW, Adafactor or Muon",
        ),
        (plan.float8, "float8", "true".into(), "false"),
        (
            imp.rmsnorm != crate::plan::RmsNorm::Eager,
            "implementation.rmsnorm",
            format!("\"{}\"", imp.rmsnorm),
            "eager: the trainer runs torchtitan's op-by-op RMSNorm",
        ),
        (
            imp.attention != crate::plan::Attention::Flash,
            "implementation.attention",
            format!("\"{}\"", imp.attention),
            "flash: the trainer calls SDPA's flash kernel",
        ),
        (
            imp.rotary == crate::plan::Rotary::CosSin,
            "implementation.rotary",
            "\"cos-sin\"".into(),
            "complex or complex-seq: the trainer builds torchtitan's freqs_cis",
        ),
        (
            match imp.fsdp_units {
                crate::plan::FsdpUnits::Split | crate::plan::FsdpUnits::SplitAlways => true,
                // Run by the tensor-parallel trainer under FSDP (tensor_parallel.rs).
                crate::plan::FsdpUnits::RootReshardedKeepLast => {
                    !(plan.parallel.tp > 1 && plan.parallel.dp_shard > 1)
                }
                _ => false,
            },
            "implementation.fsdp_units",
            format!("\"{}\"", imp.fsdp_units),
            "root-keep-last or root (and root-resharded-keep-last under TP x FSDP): the \
             trainer's root unit holds the embedding, final norm and output, and stays gathered \
             after forward",
        ),
    ];
    if let Some((_, name, got, accepted)) = refused.into_iter().find(|r| r.0) {
        return Err(unsupported(name, got, accepted));
    }
    for (name, d) in [
        ("precision.param", plan.precision.param),
        ("precision.reduce", plan.precision.reduce),
    ] {
        if d == DType::Fp16 {
            return Err(unsupported(
                name,
                "\"fp16\"",
                "fp32 or bf16: fp16 needs loss scaling",
            ));
        }
    }
    Ok(())
}

/// Whether block `i` is checkpointed: torchtitan's `_apply_ac_to_transformer_block` counts
/// blocks from 1 and wraps a block when the count is a multiple of K.
pub fn checkpointed(ac: Checkpointing, i: u64) -> bool {
    match ac {
        Checkpointing::None | Checkpointing::SelectiveOp => false,
        Checkpointing::Full => true,
        Checkpointing::SelectiveLayer(k) => (i + 1) % k == 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Autograd hooks: pre-backward (unshard, prefetch), checkpoint recompute, post-backward.

const PRE: i64 = 1;
const CKPT: i64 = 2;
const POST: i64 = 3;
const TAG: i64 = 1 << 32;

struct State {
    fsdp: Fsdp,
    spec: ModelSpec,
    dims: Dims,
    flavor: Flavor,
    freqs: Tensor,
    /// Inputs kept by checkpointed blocks.
    ckpt: Vec<Option<Tensor>>,
    /// Ring attention in place of SDPA under context parallelism.
    /// (An `Rc`, not a `Box`: the ring's backward hook reads it through a shared pointer
    /// while the checkpoint hook holds this state mutably, which a `Box`'s unique ownership
    /// would not allow.)
    cp: Option<std::rc::Rc<context_parallel::Ring>>,
    error: Option<tch::TchError>,
}

impl State {
    fn block(&self, i: usize, x: &Tensor) -> TResult<Tensor> {
        let leaves = self.fsdp.groups[i].leaves();
        let w = BlockWeights::from_list(&self.spec, &leaves);
        let s = x.size()[1];
        let f = self.freqs.f_narrow(0, 0, s)?;
        match &self.cp {
            None => model::block_forward(x, &w, &f, self.dims, self.flavor),
            Some(ring) => model::block_forward_with(x, &w, &f, self.dims, self.flavor, &**ring),
        }
    }

    fn on_backward(&mut self, tag: i64, grad: Tensor) -> TResult<Option<Tensor>> {
        let (what, i) = (tag / TAG, (tag % TAG) as usize);
        match what {
            PRE => {
                drop(grad);
                self.fsdp.wait_for_unshard(i, false)?;
                if i > 0 {
                    self.fsdp.unshard(i - 1)?;
                }
                // Block i's backward follows.
                recorder::set(backward_context(Module::Layer(i as u32)));
                Ok(None)
            }
            CKPT => {
                let x = self.ckpt[i]
                    .take()
                    .expect("checkpointed block kept its input");
                recompute_block(x, grad, |xd| self.block(i, xd))
            }
            POST => {
                drop(grad);
                self.fsdp.post_backward(i)?;
                // The previous block's backward follows (its pre-backward hook sets the same),
                // or, after block 0, the embedding's.
                recorder::set(backward_context(if i > 0 {
                    Module::Layer(i as u32 - 1)
                } else {
                    Module::TokEmbeddings
                }));
                Ok(None)
            }
            _ => unreachable!("unknown hook tag {tag}"),
        }
    }
}

struct Hooks(RefCell<State>);

unsafe extern "C" fn hook(
    user: *mut c_void,
    tag: i64,
    grad_in: *mut C_tensor,
    grad_out: *mut *mut C_tensor,
) -> c_int {
    // SAFETY: `user` is the Hooks box that outlives every graph of the run (see `train`).
    let hooks = &*(user as *const Hooks);
    ffi::run_callback(
        grad_in,
        grad_out,
        "a backward hook",
        |grad| {
            let mut st = hooks
                .0
                .try_borrow_mut()
                .map_err(|_| tch::TchError::Torch("trainer state busy in a hook".into()))?;
            st.on_backward(tag, grad)
        },
        |err| {
            if let Ok(mut st) = hooks.0.try_borrow_mut() {
                st.error.get_or_insert(err);
            }
        },
    )
}

impl Hooks {
    fn user(&self) -> *mut c_void {
        self as *const Hooks as *mut c_void
    }

    fn boundary(&self, x: &Tensor, what: i64, i: usize) -> TResult<Tensor> {
        // SAFETY: self outlives the graph (see `train`).
        unsafe { ffi::boundary(x, what * TAG + i as i64, hook, self.user()) }.map_err(fsdp::shim)
    }

    /// One micro-batch's forward and loss, FSDP2 hooks and checkpointing included.
    /// Returns the loss, and the fp32 logits when the plan keeps them through backward
    /// (`float-output-kept`, torchtitan before `del pred`).
    /// `previous`: the logits a loop that keeps them (float-in-loss-kept) still holds from the
    /// previous forward, dropped as the new ones are bound.
    fn forward(
        &self,
        plan: &Plan,
        tokens: &Tensor,
        labels: &Tensor,
        previous: &mut Option<Tensor>,
    ) -> TResult<(Tensor, Option<Tensor>)> {
        let layers = plan.model.layers as usize;
        let root = layers;
        let mut st = self.0.borrow_mut();
        st.fsdp.wait_for_unshard(root, true)?;
        let root_leaves = st.fsdp.groups[root].leaves();
        let rw = RootWeights::from_list(&st.spec, &root_leaves);
        let mut h = {
            let _ctx = recorder::scope(Context::of(
                Category::Activations,
                Module::TokEmbeddings,
                Part::Whole,
            ));
            model::embed(tokens, &rw)?
        };
        for i in 0..layers {
            let _ctx = recorder::scope(Context::of(
                Category::Activations,
                Module::Layer(i as u32),
                Part::Whole,
            ));
            st.fsdp.wait_for_unshard(i, true)?;
            let x = self.boundary(&h, POST, i)?;
            drop(h);
            let y = if checkpointed(plan.activation_checkpointing, i as u64) {
                let y = tch::no_grad(|| st.block(i, &x))?;
                // SAFETY: as for `boundary`.
                let y = unsafe {
                    ffi::checkpoint_link(&x, &y, CKPT * TAG + i as i64, hook, self.user())
                }
                .map_err(fsdp::shim)?;
                st.ckpt[i] = Some(x.shallow_clone());
                y
            } else {
                st.block(i, &x)?
            };
            drop(x);
            if st.fsdp.groups[i].reshard_after_forward {
                st.fsdp.reshard(i)?;
            }
            h = self.boundary(&y, PRE, i)?;
        }
        let pred = model::head(h, &rw, st.flavor)?;
        st.fsdp.root_post_forward();
        // `logits = model(x)` rebinds the loop's name: the previous logits go.
        drop(previous.take());
        let loss = {
            let _ctx = recorder::scope(Context::of(Category::Logits, Module::Loss, Part::Whole));
            model::loss(&pred, labels, st.flavor)?
        };
        // The loss scalar lives with the loop's inputs until the next batch.
        recorder::retag(
            &loss,
            Context::of(Category::Inputs, Module::Inputs, Part::Whole),
        );
        if matches!(
            plan.implementation.logits,
            Logits::FloatOutputKept | Logits::FloatInLossKept
        ) {
            return Ok((loss, Some(pred)));
        }
        drop(pred); // torchtitan: `del pred` before backward
        Ok((loss, None))
    }

    /// Backward from the loss, then the root's post-backward.
    fn backward(&self, plan: &Plan, loss: &Tensor) -> TResult<()> {
        // Up to the last block's pre-backward hook: the loss's and the head's backward.
        let ctx = recorder::scope(Context::of(Category::Logits, Module::Loss, Part::Whole));
        let r = ffi::backward(&[loss], &[None]);
        drop(ctx);
        let mut st = self.0.borrow_mut();
        if let Err(e) = r {
            let ring = st.cp.as_ref().and_then(|c| c.take_error());
            // The ring's own error names the cause; the hook's says only that it failed.
            return Err(ring
                .or(st.error.take())
                .unwrap_or(tch::TchError::Torch(e.0)));
        }
        st.fsdp.post_backward(plan.model.layers as usize)?;
        st.fsdp.finish_backward();
        Ok(())
    }
}

/// Attribution of a module's backward: its recomputation and gradient temporaries (the
/// parameters' unsharded gradients are re-attributed at the post-backward).
fn backward_context(module: Module) -> Context {
    Context::of(Category::BackwardWorkingSet, module, Part::Recompute)
}

// ---------------------------------------------------------------------------------------------
// Setup: weights, sharding, data.

/// Full fp32 weights of one group (host, uncounted), in [`ModelSpec`]'s order: torchtitan's
/// init is trunc-normal; a plain normal of std 0.02 (norms at one) trains as well here.
fn init_weights(shapes: &[(u64, u64)], norm_rows: &[bool]) -> TResult<Vec<Tensor>> {
    let _off = ffi::channel(Channel::Off);
    shapes
        .iter()
        .zip(norm_rows)
        .map(|(&(r, c), &is_norm)| {
            let shape: Vec<i64> = if c == 1 {
                vec![r as i64]
            } else {
                vec![r as i64, c as i64]
            };
            if is_norm {
                Tensor::f_ones(shape.as_slice(), (Kind::Float, Device::Cpu))
            } else {
                Tensor::f_randn(shape.as_slice(), (Kind::Float, Device::Cpu))?.f_mul_scalar(0.02)
            }
        })
        .collect()
}

fn build_groups(plan: &Plan, env: &Env) -> TResult<Vec<Group>> {
    let m = &plan.model;
    let mut groups = Vec::new();
    let block = m.block_params();
    // Norm weights (and biases) are the 1-column entries; biases start at zero like nn.Linear's
    // would not, but their memory is what matters.
    let shapes: Vec<(u64, u64)> = block.iter().map(|p| (p.rows, p.cols)).collect();
    let norms: Vec<bool> = shapes.iter().map(|&(_, c)| c == 1).collect();
    let layers = m.layers as usize;
    for i in 0..layers {
        let full = init_weights(&shapes, &norms)?;
        let module = Module::Layer(i as u32);
        let params = full
            .iter()
            .map(|t| FsdpParam::new(t, env, module))
            .collect::<TResult<Vec<_>>>()?;
        // torchtitan of 2024: the last block is not resharded after forward (backward needs
        // it first); `fully_shard`'s defaults reshard it too.
        let reshard = plan.reshard_after_forward
            && (i + 1 < layers || plan.implementation.fsdp_units == crate::plan::FsdpUnits::Root);
        groups.push(Group::new(params, reshard, module));
    }
    let root_shapes: Vec<(u64, u64)> = m.root_params().iter().map(|p| (p.rows, p.cols)).collect();
    let root_norms: Vec<bool> = root_shapes.iter().map(|&(_, c)| c == 1).collect();
    let full = init_weights(&root_shapes, &root_norms)?;
    // ModelSpec::root_params: tok_embeddings, the final norm, the output projection unless
    // tied, then the final norm's bias where there is one.
    let root_module = |k: usize| match k {
        0 => Module::TokEmbeddings,
        2 if !m.tied_embeddings => Module::Output,
        _ => Module::Norm,
    };
    let params = full
        .iter()
        .enumerate()
        .map(|(k, t)| FsdpParam::new(t, env, root_module(k)))
        .collect::<TResult<Vec<_>>>()?;
    groups.push(Group::new(params, false, Module::Root));
    Ok(groups)
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// `batch x (seq + 1)` tokens: each row starts at a random token and walks a fixed cycle
/// (`next = (5 x + 3) mod P`, which visits all of `0..P` for a power of two P) over the first
/// P = min(vocab, 128), rounded down to a power of two, tokens of the vocabulary. So the next
/// token is learnable from the current one from a table small enough to learn in a few dozen
/// steps at any batch size: the loss falls from ln(vocab) through ln(P) towards zero. (A walk
/// over the whole vocabulary, as before, left `small`'s 2048-entry table barely learnt after
/// 20 steps of one 1024-token sequence.) The token values change the numbers, not the memory.
/// Same seed and index, same batch.
fn synthetic_tokens(seed: u64, index: u64, batch: u64, seq: u64, vocab: u64) -> Vec<i64> {
    let cycle = 1u64 << vocab.clamp(1, 128).ilog2();
    let mut rng = Rng(seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let mut v = Vec::with_capacity((batch * (seq + 1)) as usize);
    for _ in 0..batch {
        let mut x = rng.next() % cycle;
        for _ in 0..=seq {
            v.push(x as i64);
            x = (5 * x + 3) % cycle;
        }
    }
    v
}

/// The micro-batch on the device: `input_ids` and `labels`, each `batch x seq` int64. In a
/// multi-process run (`dp` = (this rank, data-parallel ranks)) each rank reads its own rows of
/// the global micro-batch of `ranks x batch` rows, so that one rank reading the whole global
/// batch sees exactly the same data; the emulation gives every rank rank 0's rows.
fn batch_on_device(
    env: &Env,
    plan: &Plan,
    seed: u64,
    index: u64,
    dp: Option<(u64, u64)>,
) -> TResult<(Tensor, Tensor)> {
    let (b, s) = (plan.batch.micro_batch_size, plan.batch.seq_len);
    let (rank, ranks) = dp.unwrap_or((0, 1));
    let _ctx = recorder::scope(Context::of(Category::Inputs, Module::Inputs, Part::Ids));
    let toks = {
        let _off = ffi::channel(Channel::Off);
        let all = synthetic_tokens(seed, index, b * ranks, s, plan.model.vocab);
        let row = (s + 1) as usize;
        let mine = &all[rank as usize * b as usize * row..(rank + 1) as usize * b as usize * row];
        Tensor::from_slice(mine).f_view([b as i64, s as i64 + 1])?
    };
    let input = env.copy_to(&toks.f_narrow(1, 0, s as i64)?, fsdp::Place::Device)?;
    let labels = env.copy_to(&toks.f_narrow(1, 1, s as i64)?, fsdp::Place::Device)?;
    Ok((input, labels))
}

fn is_oom(e: &tch::TchError) -> bool {
    let m = e.to_string().to_ascii_lowercase();
    m.contains("out of memory")
        || m.contains("can't allocate memory")
        || m.contains("cannot allocate memory")
}

/// The first line of a libtorch error (its message, without the C++ backtrace c10 appends).
fn first_line(e: &tch::TchError) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or_default().trim().to_string()
}

/// Global L2 norm of every rank's sharded gradients (uncounted): the emulated peers' are here;
/// a real rank's are summed over its shard group (replicas hold the same shards).
fn grad_norm(fsdp: &Fsdp, mesh: Option<&dist::Mesh>) -> TResult<f64> {
    let _off = ffi::channel(Channel::Off);
    let _ng = tch::no_grad_guard();
    let mut sq = 0.0;
    for g in &fsdp.groups {
        for p in &g.params {
            for s in std::iter::once(&p.local).chain(&p.remote) {
                if let Some(gr) = &s.grad {
                    let n = gr
                        .f_to_kind(Kind::Double)?
                        .f_square()?
                        .f_sum(Kind::Double)?
                        .f_double_value(&[])?;
                    sq += n;
                }
            }
        }
    }
    if let Some(mesh) = mesh {
        // Over every rank, where each shard is held by every replica.
        let t = Tensor::from_slice(&[sq]);
        mesh.all_reduce_sum(&t)?;
        sq = t.f_double_value(&[0])? / mesh.replicas() as f64;
    }
    Ok(sq.sqrt())
}

/// Runs `opts.steps` optimizer steps of `plan` and reports the memory of each phase.
///
/// Errors are for plans the trainer cannot run and for failures other than running out of
/// memory; an out-of-memory is reported in [`TrainReport::oom`].
pub fn train(plan: &Plan, opts: &TrainOptions) -> Result<TrainReport> {
    train_on(plan, opts, None)
}

/// Runs this process's rank of a real multi-process job over `mesh` (see [`dist`]): it holds
/// only its own shards, reads its own rows of each global micro-batch, and all-gathers,
/// reduce-scatters (and under HSDP all-reduces) through c10d. The report is this rank's;
/// losses and gradient norms are the job's.
pub fn train_rank(
    plan: &Plan,
    opts: &TrainOptions,
    mesh: std::rc::Rc<dist::Mesh>,
) -> Result<TrainReport> {
    train_on(plan, opts, Some(mesh))
}

fn train_on(
    plan: &Plan,
    opts: &TrainOptions,
    mesh: Option<std::rc::Rc<dist::Mesh>>,
) -> Result<TrainReport> {
    check_supported(plan, mesh.is_some())?;
    // The counters are process-wide: one run at a time.
    static RUN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = RUN.lock().unwrap_or_else(|p| p.into_inner());
    let rt = |e: tch::TchError| Error::runtime(format!("trainer: {e}"));
    ffi::install_counting_allocator()
        .map_err(|e| Error::runtime(format!("installing the counting allocator: {e}")))?;
    if plan.model.moe.is_some() {
        return expert_parallel::train_moe(plan, opts, mesh.as_deref());
    }
    if let (Some(m), true) = (&mesh, plan.parallel.pp > 1) {
        return pipeline::train_stage(plan, opts, m);
    }
    if let (Some(m), true) = (&mesh, plan.parallel.tp > 1) {
        return tensor_parallel::train_tp(plan, opts, m);
    }
    if plan.parallel.cp > 1 && opts.device != TrainDevice::Cpu {
        return Err(Error::input(
            "--device cpu under context parallelism: the ring passes K and V over Gloo",
        ));
    }
    let (device, cuda) = match opts.device {
        TrainDevice::Cpu => (Device::Cpu, None),
        TrainDevice::Cuda(i) => {
            let n = ffi::accelerator_count().map_err(|e| Error::runtime(e.0))?;
            if !tch::Cuda::is_available() || i as i64 >= n {
                return Err(Error::input(format!(
                    "device cuda:{i} is not available (libtorch sees {n} accelerator(s)); use --device cpu"
                )));
            }
            (Device::Cuda(i), Some(i as i64))
        }
    };
    let env = Env {
        device,
        compute: kind(plan.precision.param),
        reduce: kind(plan.precision.reduce),
        master: kind(plan.precision.master),
        world: plan.parallel.fsdp_degree() as i64,
        rank: mesh.as_ref().map_or(0, |m| m.shard.rank()),
        peers: mesh.is_none(),
        offload: plan.offload,
    };
    let _default = ffi::channel(env.default_channel());
    // A CUDA run starts as a fresh process would: without the cuBLAS workspaces an earlier
    // run in this process made (the estimator counts them; on an H200 only the first of 14
    // validate plans did) and without its cached blocks, which would stand in this run's
    // reserved peak (all 14 read the first plan's 30.5 GiB).
    if let Some(d) = cuda {
        ffi::accelerator_empty_cache(d)
            .map_err(|e| Error::runtime(format!("emptying the CUDA cache: {e}")))?;
    }
    // The recording starts with the meter, so that both count from the same live bytes.
    let _recording = if opts.record_trace {
        recorder::start(cuda)?;
        Some(Recording)
    } else {
        None
    };
    let meter = Meter::new(cuda)?;
    let _limit = match (opts.device, opts.device_limit) {
        (TrainDevice::Cpu, Some(limit)) => {
            let base = ffi::counter(Channel::Device).0;
            Some(ffi::device_limit(Some(base.saturating_add(limit))))
        }
        (TrainDevice::Cuda(_), Some(_)) => {
            return Err(Error::input(
                "--device-memory applies to CPU runs: a GPU has its own capacity",
            ))
        }
        _ => None,
    };
    tch::manual_seed(opts.seed as i64);

    let setup_start = meter.start()?;
    let (groups, freqs) = (|| -> TResult<_> {
        let groups = build_groups(plan, &env)?;
        // torchtitan's rotary table: a buffer of 2 x seq_len rows (seq_len from 2025 on),
        // replicated on every rank.
        let _ctx = recorder::scope(Context::of(Category::Inputs, Module::Inputs, Part::Rotary));
        let freqs = model::rotary_table(plan, device)?;
        Ok((groups, freqs))
    })()
    .map_err(rt)?;
    let setup = meter.finish(setup_start)?;
    let setup_host = meter.host();

    let layers = plan.model.layers as usize;
    let hooks = Box::new(Hooks(RefCell::new(State {
        fsdp: Fsdp::new(
            env,
            groups,
            match &mesh {
                None => Box::new(Emulated { world: env.world }),
                Some(m) => Box::new(dist::C10d { mesh: m.clone() }),
            },
        ),
        spec: plan.model.clone(),
        dims: Dims::new(&plan.model),
        flavor: Flavor {
            gqa: plan.implementation.gqa,
            logits: plan.implementation.logits,
        },
        freqs,
        ckpt: (0..layers).map(|_| None).collect(),
        // SAFETY: the mesh (and its cp group) outlives the run's state and graphs.
        cp: mesh
            .as_ref()
            .and_then(|m| m.cp.as_ref())
            .map(|pg| std::rc::Rc::new(unsafe { context_parallel::Ring::new(pg, plan) })),
        error: None,
    })));
    let cfg = OptConfig {
        kind: plan.optimizer,
        imp: plan.implementation.optimizer,
        lr: opts.lr.unwrap_or_else(|| default_lr(plan.model.hidden)),
    };

    let bar = opts.progress.then(|| {
        let b = indicatif::ProgressBar::new(opts.steps);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });

    let mut steps = Vec::new();
    let mut oom = None;
    let mut live: Option<(Tensor, Tensor, Tensor)> = None;
    let accum = plan.batch.grad_accum_steps;
    let started = Instant::now();
    let mut tokens = 0u64;
    // The rows each data-parallel position reads: the ranks of one cp group read the same.
    let cp = plan.parallel.cp;
    let dp = mesh.as_ref().map(|m| (m.dp_rank() / cp, m.dp_world() / cp));
    // Setup, step 1 and the last step are recorded; the steps between are not (see recorder).
    let between = |step: u64| step > 1 && step < opts.steps;
    let mut last_step = 0;
    let mut kept_logits: Option<Tensor> = None;
    'steps: for step in 1..=opts.steps {
        last_step = step;
        if step == opts.steps {
            recorder::resume();
        }
        if opts.abort_at_step == Some(step) {
            eprintln!("error: aborting at step {step} (fault injection)");
            std::process::abort();
        }
        // torchtitan's `optimizers.zero_grad()`: gradients set to None.
        {
            let mut st = hooks.0.borrow_mut();
            for g in &mut st.fsdp.groups {
                for p in &mut g.params {
                    p.local.grad = None;
                    let _off = ffi::channel(Channel::Off);
                    p.remote.iter_mut().for_each(|s| s.grad = None);
                }
            }
        }
        let (mut fwd, mut bwd) = (None, None);
        let mut loss_sum = 0.0;
        let mut cp_context: Option<context_parallel::Context> = None;
        for micro in 0..accum {
            let start = meter.start()?;
            recorder::mark(Section::Forward, micro, step == 1);
            let r = (|| -> TResult<_> {
                let (input, labels) =
                    batch_on_device(&env, plan, opts.seed, (step - 1) * accum + micro, dp)?;
                // torchtitan rebinds `input_ids, labels` here: the previous ones are freed.
                live = None;
                // Under CP the step runs inside `context_parallel(...)`, entered here.
                let ring = hooks.0.borrow().cp.as_ref().map(|r| &**r as *const _);
                cp_context = match ring {
                    // SAFETY: the ring lives in the hooks' state, which outlives the step.
                    Some(r) => {
                        let r: &context_parallel::Ring = unsafe { &*r };
                        let freqs = hooks.0.borrow().freqs.shallow_clone();
                        Some(r.enter(&input, &labels, &freqs)?)
                    }
                    None => None,
                };
                let (loss, kept_pred) = hooks.forward(plan, &input, &labels, &mut kept_logits)?;
                Ok((input, labels, loss, kept_pred))
            })();
            Meter::merge(&mut fwd, meter.finish(start)?);
            let (input, labels, loss, kept_pred) = match r {
                Ok(l) => l,
                Err(e) if is_oom(&e) => {
                    oom = Some(OomReport {
                        step,
                        phase: Phase::Forward,
                        message: first_line(&e),
                        peak_allocated_bytes: [
                            fwd.as_ref().map_or(0, |m| m.peak_allocated_bytes),
                            0,
                            0,
                        ],
                    });
                    break 'steps;
                }
                Err(e) => return Err(rt(e)),
            };
            loss_sum += loss.f_double_value(&[]).map_err(rt)?;
            let start = meter.start()?;
            recorder::mark(Section::Backward, micro, step == 1);
            let r = hooks.backward(plan, &loss);
            // The context's exit, after the backward (torchtitan's train step).
            let r = match (r, cp_context.take()) {
                (Ok(()), Some(c)) => c.exit(&hooks.0.borrow().freqs),
                (r, _) => r,
            };
            // A loop's `logits` name holds them until its next forward rebinds it
            // (float-in-loss-kept); torchtitan's old loop's `pred` went with the backward.
            if plan.implementation.logits == Logits::FloatInLossKept {
                kept_logits = kept_pred;
            } else {
                drop(kept_pred);
            }
            // The training loop's `input_ids`, `labels` and `loss` live until the next batch.
            live = Some((input, labels, loss));
            Meter::merge(&mut bwd, meter.finish(start)?);
            match r {
                Ok(()) => {}
                Err(e) if is_oom(&e) => {
                    oom = Some(OomReport {
                        step,
                        phase: Phase::Backward,
                        message: first_line(&e),
                        peak_allocated_bytes: [
                            fwd.as_ref().map_or(0, |m| m.peak_allocated_bytes),
                            bwd.as_ref().map_or(0, |m| m.peak_allocated_bytes),
                            0,
                        ],
                    });
                    break 'steps;
                }
                Err(e) => return Err(rt(e)),
            }
            // (Under context parallelism a rank trains its shard of each sequence.)
            tokens += plan.batch.micro_batch_size * plan.batch.seq_len / plan.parallel.cp;
        }
        let norm = grad_norm(&hooks.0.borrow().fsdp, mesh.as_deref()).map_err(rt)?;

        // Linear warmup over the first tenth of the steps (at least one), then constant:
        // without it, Adam's first steps at the peak rate scatter a freshly initialised
        // model's logits and the loss of the larger profiles stalls near ln(vocab).
        let warmup = (opts.steps / 10).max(1);
        let cfg = OptConfig {
            lr: cfg.lr * (step.min(warmup) as f64 / warmup as f64),
            ..cfg
        };
        let start = meter.start()?;
        recorder::mark(Section::Optimizer, 0, step == 1);
        let r = (|| -> TResult<()> {
            let mut st = hooks.0.borrow_mut();
            let mut local: Vec<&mut fsdp::Shard> = st
                .fsdp
                .groups
                .iter_mut()
                .flat_map(|g| g.params.iter_mut().map(|p| &mut p.local))
                .collect();
            optim::step(&cfg, &env, &mut local, false)?;
            drop(local);
            let peers = st
                .fsdp
                .groups
                .first()
                .map_or(0, |g| g.params.first().map_or(0, |p| p.remote.len()));
            for r in 0..peers {
                let mut peer: Vec<&mut fsdp::Shard> = st
                    .fsdp
                    .groups
                    .iter_mut()
                    .flat_map(|g| g.params.iter_mut().map(|p| &mut p.remote[r]))
                    .collect();
                optim::step(&cfg, &env, &mut peer, true)?;
            }
            Ok(())
        })();
        let opt = meter.finish(start)?;
        match r {
            Ok(()) => {}
            Err(e) if is_oom(&e) => {
                oom = Some(OomReport {
                    step,
                    phase: Phase::Optimizer,
                    message: first_line(&e),
                    peak_allocated_bytes: [
                        fwd.as_ref().map_or(0, |m| m.peak_allocated_bytes),
                        bwd.as_ref().map_or(0, |m| m.peak_allocated_bytes),
                        opt.peak_allocated_bytes,
                    ],
                });
                break 'steps;
            }
            Err(e) => return Err(rt(e)),
        }
        let (forward, backward) = (fwd.unwrap_or_default(), bwd.unwrap_or_default());
        let mut loss = loss_sum / accum as f64;
        if let Some(m) = &mesh {
            // The job's loss: the mean over every data-parallel rank's rows.
            let t = {
                let _off = ffi::channel(Channel::Off);
                Tensor::from_slice(&[loss])
            };
            m.all_reduce_sum(&t).map_err(rt)?;
            loss = t.f_double_value(&[0]).map_err(rt)? / m.dp_world() as f64;
        }
        steps.push(StepReport::of_phases(
            step, loss, norm, forward, backward, opt,
        ));
        if between(step + 1) {
            recorder::pause();
        }
        recorder::drain();
        if opts.progress_lines {
            eprintln!("memplan-progress {step} {} {loss}", opts.steps);
        }
        if let Some(b) = &bar {
            b.set_message(format!("loss {loss:.4}"));
            b.inc(1);
        }
    }
    recorder::end(last_step <= 1);
    drop(live);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let peak_reserved = steps
        .iter()
        .flat_map(|s| {
            [
                s.forward.peak_reserved_bytes,
                s.backward.peak_reserved_bytes,
                s.optimizer.peak_reserved_bytes,
            ]
        })
        .flatten()
        .max();
    let mut notes = vec![match &mesh {
        None => format!(
            "single-device emulation of rank 0 of {} FSDP2 ranks: the device holds what rank 0 \
             would (its 1/{} shards, all-gathered blocks, its activations); the other ranks' \
             shards live on the host, uncounted; every rank sees the same data; no \
             communication time, no NCCL buffers",
            env.world, env.world
        ),
        Some(m) => format!(
            "rank {} of a {}-process job over c10d Gloo (dp_replicate {} x dp_shard {}): this \
             rank's own shards and rows of each global micro-batch; all-gather by in-place \
             broadcasts and reduce-scatter by in-place all-reduces, so that only FSDP2's own \
             buffers are allocated, as with NCCL",
            m.env.rank, m.env.world, plan.parallel.dp_replicate, plan.parallel.dp_shard
        ),
    }];
    if let (Some(m), true) = (&mesh, plan.parallel.cp > 1) {
        notes.push(format!(
            "context parallelism: rank {} of a {}-way ring (torch's context_parallel: head-tail \
             sequence shards, {} rotation of K and V); FSDP shards over dp_shard x cp = {}",
            m.cp.as_ref().map_or(0, |g| g.rank()),
            plan.parallel.cp,
            plan.parallel.cp_rotate,
            env.world
        ));
    }
    if device == Device::Cpu {
        notes.push(
            "CPU run: exact live bytes of a counting allocator (requested sizes); device and host \
             are the same RAM here, counted in separate channels"
                .into(),
        );
        if plan.offload != Offload::None {
            notes.push(format!(
                "offload {}: on a CPU run nothing moves physically; offloaded tensors are counted \
                 as host bytes, not device bytes",
                plan.offload
            ));
        }
    } else {
        notes.push(
            "CUDA run: one stream (FSDP2's all-gather and reduce-scatter streams are not used, \
             which may change reserved but not allocated bytes)"
                .into(),
        );
    }
    notes.push(format!(
        "device memory includes the micro-batch's input ids and labels (2 x {} x {} int64) and \
         the rotary table (2 x seq_len x head_dim/2 complex64)",
        plan.batch.micro_batch_size, plan.batch.seq_len
    ));
    if plan.activation_checkpointing != Checkpointing::None {
        notes.push(
            "activation checkpointing: a recompute node per block that allocates what torch's \
             non-reentrant checkpoint does"
                .into(),
        );
    }
    let trace = if opts.record_trace {
        let capacity = match cuda {
            None => opts.device_limit,
            // What the allocator can hand out: free device memory and what it has reserved.
            Some(d) => match (ffi::accelerator_mem_info(d), ffi::accelerator_stats(d)) {
                (Ok((free, _)), Ok(s)) => Some(free + s.reserved),
                _ => None,
            },
        };
        let rank = mesh.as_ref().map_or(0, |m| m.env.rank);
        recorder::finish(rank, capacity, &mut notes)
    } else {
        None
    };
    Ok(TrainReport {
        model: plan.model.name.clone(),
        device: opts.device,
        dp_shard: env.world as u64,
        rank: mesh.as_ref().map_or(0, |m| m.env.rank),
        processes: mesh.as_ref().map_or(1, |m| m.env.world),
        pp_stage: None,
        steps_requested: opts.steps,
        steps_completed: steps.len() as u64,
        setup_allocated_bytes: setup.end_allocated_bytes,
        setup_host_bytes: setup_host,
        first_step: steps.first().cloned(),
        steady_step: steps.last().cloned(),
        losses: steps.iter().map(|s| s.loss).collect(),
        peak_allocated_bytes: steps_peak(&steps, |p| p.peak_allocated_bytes),
        peak_reserved_bytes: peak_reserved,
        peak_host_bytes: steps_peak(&steps, |p| p.peak_host_bytes),
        tokens_per_second: tokens_per_second(tokens, elapsed),
        oom,
        notes,
        steps,
        trace,
    })
}

/// Drops an unfinished recording when a run ends early with an error.
struct Recording;

impl Drop for Recording {
    fn drop(&mut self) {
        recorder::abandon();
    }
}
