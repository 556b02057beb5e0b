//! The optimizer over the sharded master parameters, as torch.optim runs it.
//!
//! AdamW and Adam (`torch/optim/adam.py`: lerp for exp_avg, mul/addcmul for exp_avg_sq, a
//! `denom` temporary, addcdiv), SGD with momentum and plain SGD, each in the implementation
//! the plan names (single-tensor, foreach, fused; SGD's three have the same memory and run the
//! single-tensor code). The kernels are libtorch's own, called through the shim. State is
//! created lazily at the first step for every parameter before the update, as
//! `Optimizer._init_group` does, which is why step 1 is the peak of the optimizer phase.
//! Gradients are set to None at the start of each step (torchtitan's `zero_grad`).
//!
//! Offload `optimizer` keeps the states on the host and steps there: each step copies the
//! gradients and parameters to the host, updates them there and copies the parameters back.
//! Offload `full` has parameters, gradients and states on the host already (FSDP2's
//! CPUOffloadPolicy), so the step runs there in place.

use tch::{Device, Kind, Tensor};

use super::ffi::{self, AdamHyper, Channel, StepMode};
use super::fsdp::{shim, Env, Place, Shard};
use super::model::TResult;
use super::recorder::{self, Context};
use crate::plan::{Offload, Optimizer, OptimizerImpl};
use crate::trace::{Category, Module, Part};

/// Attribution of the optimizer's states (created at step 1) and of its step's temporaries.
const STATES: Context = Context::of(Category::OptimizerStates, Module::Optimizer, Part::State);
const TEMPORARIES: Context = Context::of(
    Category::OptimizerTemporaries,
    Module::Optimizer,
    Part::Whole,
);

/// AdamW defaults of torchtitan (betas 0.9/0.95, weight decay 0.1, eps 1e-8).
pub const BETAS: (f64, f64) = (0.9, 0.95);
pub const WEIGHT_DECAY: f64 = 0.1;
pub const EPS: f64 = 1e-8;
pub const MOMENTUM: f64 = 0.9;

#[derive(Clone, Copy, Debug)]
pub struct OptConfig {
    pub kind: Optimizer,
    pub imp: OptimizerImpl,
    pub lr: f64,
}

fn mode(imp: OptimizerImpl) -> StepMode {
    match imp {
        OptimizerImpl::Foreach => StepMode::Foreach,
        // (fused-bf16-states is refused before a run: `check_supported`.)
        OptimizerImpl::Fused | OptimizerImpl::FusedBf16States => StepMode::Fused,
        OptimizerImpl::PerParam => StepMode::Single,
    }
}

/// Where the optimizer state lives.
pub fn state_place(env: &Env) -> Place {
    if env.offload == Offload::None {
        Place::Device
    } else {
        Place::Host
    }
}

/// One optimizer step over `shards` (rank 0's, or one peer's). `place` is where `shards`'
/// parameters and gradients live and `counted` the channel to allocate host tensors in
/// (Off for the emulated peers).
pub fn step(cfg: &OptConfig, env: &Env, shards: &mut [&mut Shard], peers: bool) -> TResult<()> {
    let _ng = tch::no_grad_guard();
    let shards: Vec<&mut Shard> = shards
        .iter_mut()
        .filter(|s| s.grad.is_some() && s.rows > 0)
        .map(|s| &mut **s)
        .collect();
    if shards.is_empty() {
        return Ok(());
    }
    // Where the states and the step run, and which channel allocations there go to.
    let (sdev, sch) = if peers {
        (Device::Cpu, Channel::Off)
    } else {
        env.at(state_place(env))
    };
    let host_step = !peers && env.offload == Offload::Optimizer;
    let _g = ffi::channel(sch);

    // Optimizer._init_group: lazy state for every parameter first.
    let n_states = cfg.kind.states_per_param() as usize;
    let fused =
        cfg.imp == OptimizerImpl::Fused && matches!(cfg.kind, Optimizer::AdamW | Optimizer::Adam);
    let mut shards = shards;
    let is_adam = matches!(cfg.kind, Optimizer::AdamW | Optimizer::Adam);
    let first = shards.iter().any(|s| s.state.len() < n_states);
    let ctx = recorder::scope(STATES);
    if is_adam {
        for s in shards.iter_mut().filter(|s| s.step.is_none()) {
            let (stdev, stch) = if fused {
                (sdev, sch)
            } else {
                (
                    Device::Cpu,
                    if peers { Channel::Off } else { Channel::Host },
                )
            };
            {
                let _g = ffi::channel(stch);
                s.step = Some(Tensor::f_zeros([], (Kind::Float, stdev))?);
            }
            for _ in 0..n_states {
                s.state.push(Tensor::f_zeros(
                    s.view.size().as_slice(),
                    (s.view.kind(), sdev),
                )?);
            }
        }
    }

    drop(ctx);
    let _ctx = recorder::scope(TEMPORARIES);
    // Parameters and gradients where the step runs.
    let (params, grads): (Vec<Tensor>, Vec<Tensor>) = if host_step {
        let mut ps = Vec::new();
        let mut gs = Vec::new();
        for s in shards.iter() {
            gs.push(env.copy_to(s.grad.as_ref().expect("filtered"), Place::Host)?);
            ps.push(env.copy_to(&s.view, Place::Host)?);
        }
        (ps, gs)
    } else {
        let ps = shards.iter().map(|s| s.view.shallow_clone()).collect();
        let gs = shards
            .iter()
            .map(|s| s.grad.as_ref().expect("filtered").shallow_clone())
            .collect();
        (ps, gs)
    };
    let pr: Vec<&Tensor> = params.iter().collect();
    let gr: Vec<&Tensor> = grads.iter().collect();

    match cfg.kind {
        Optimizer::AdamW | Optimizer::Adam => {
            let h = AdamHyper {
                lr: cfg.lr,
                beta1: BETAS.0,
                beta2: BETAS.1,
                weight_decay: if cfg.kind == Optimizer::AdamW {
                    WEIGHT_DECAY
                } else {
                    0.0
                },
                eps: EPS,
            };
            let m: Vec<&Tensor> = shards.iter().map(|s| &s.state[0]).collect();
            let v: Vec<&Tensor> = shards.iter().map(|s| &s.state[1]).collect();
            let st: Vec<&Tensor> = shards
                .iter()
                .map(|s| s.step.as_ref().expect("initialised"))
                .collect();
            ffi::adamw_step(mode(cfg.imp), &pr, &gr, &m, &v, &st, h).map_err(shim)?;
        }
        Optimizer::SgdMomentum => {
            if first {
                // torch.optim.SGD: `buf = torch.clone(grad).detach()` on the first step.
                let _ctx = recorder::scope(STATES);
                for (s, g) in shards.iter_mut().zip(&gr) {
                    if s.state.is_empty() {
                        let mut b = Tensor::f_empty(g.size().as_slice(), (g.kind(), sdev))?;
                        b.f_copy_(g)?;
                        s.state.push(b);
                    }
                }
            }
            let b: Vec<&Tensor> = shards.iter().map(|s| &s.state[0]).collect();
            ffi::sgd_step(&pr, &gr, Some(&b), cfg.lr, MOMENTUM, first).map_err(shim)?;
        }
        Optimizer::Sgd => {
            ffi::sgd_step(&pr, &gr, None, cfg.lr, 0.0, first).map_err(shim)?;
        }
        Optimizer::AdamW8bit | Optimizer::Adafactor | Optimizer::Muon | Optimizer::MuonAll2d => {
            unreachable!("refused by check_supported: {}", cfg.kind)
        }
    }
    if host_step {
        for (s, p) in shards.iter().zip(&params) {
            s.view.shallow_clone().f_copy_(p)?;
        }
    }
    Ok(())
}
