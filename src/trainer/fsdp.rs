//! FSDP2 (`torch.distributed.fsdp.fully_shard`) as rank 0 of an N-way mesh sees it, on one
//! device.
//!
//! Each parameter group (one per decoder block, plus the root: embedding, final norm and
//! output projection) follows `FSDPParamGroup` of torch 2.11 allocation by allocation:
//!
//! - **sharded state**: every parameter is sharded on dim 0, padded to a multiple of N rows;
//!   rank 0 holds its padded shard of the fp32 master parameter (`_sharded_param_data`), its
//!   gradient and optimizer state (over the unpadded rows it owns).
//! - **unshard** (`foreach_all_gather`): each shard cast to the param dtype (a temporary, none
//!   when the dtypes agree; with CPU offload first copied to the device), copied into rank 0's
//!   slice of one flat all-gather output of N x (sum of padded shards) elements in the param
//!   dtype; the collective fills the other slices.
//! - **wait_for_unshard** (`foreach_all_gather_copy_out`): per-parameter unsharded buffers
//!   (padded, param dtype) are allocated and filled from the flat output, which is then freed,
//!   except in forward where it is kept until the next group's copy-out (FSDP2's
//!   `all_gather_state`, which lets the copy-out overlap the next all-gather); the root's
//!   post-forward frees the last one. With N = 1 there is no flat output: each buffer is
//!   filled from the cast shard directly.
//! - **reshard**: the unsharded buffers' storage is freed (`storage.resize_(0)`); the parameter
//!   tensors autograd saved stay valid and are refilled by the next unshard.
//! - **post-backward** (`foreach_reduce`): the unsharded gradients are taken (`.grad = None`),
//!   the group is resharded, the previous reduce-scatter input is freed, a flat reduce-scatter
//!   input of N x (sum of padded shards) in the reduce dtype is allocated and filled
//!   (`chunk_cat`, casting), the unsharded gradients are freed, the reduce-scatter output
//!   (1/N) is allocated, cast to the master dtype when that differs, and becomes the sharded
//!   gradients (views into one flat buffer per group), or is added into existing ones under
//!   gradient accumulation. The reduce-scatter input is kept until the next group's
//!   post-backward or the end of backward (`reduce_scatter_state`).
//!
//! The other N-1 ranks exist only as their shards (parameters, gradients, optimizer states) in
//! host memory that the counting allocator does not count, so that the math is that of the
//! whole job: all-gather concatenates rank 0's shard with theirs, and reduce-scatter hands
//! them their chunks. Every rank is assumed to see the same micro-batch, so the averaged
//! gradient equals rank 0's; this changes the numbers, not the memory.
//!
//! The root group (embedding, final norm, output) is unsharded at the root's pre-forward and
//! stays so through backward: FSDP2 does not reshard the root after forward when
//! `reshard_after_forward` is left to it, and no torch of 2024 did. (torch 2.11 does reshard
//! the root when torchtitan passes `reshard_after_forward=True` explicitly, and re-gathers it
//! at the start of backward.) The last block is not resharded after forward either
//! (torchtitan: backward needs it first).
//!
//! Not modelled: communication time and overlap, NCCL's own buffers and streams (the caching
//! allocator's per-stream pools change reserved, not allocated, bytes), pinned host memory.

use tch::{Device, Kind, Tensor};

use super::dist::ProcessGroup;
use super::ffi::{self, Channel};
use super::model::TResult;
use super::recorder::{self, Context, ALL_GATHER_STREAM, REDUCE_SCATTER_STREAM};
use crate::plan::Offload;
use crate::trace::{Category, Module, Part};

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Device,
    Host,
}

/// The run's environment: device, dtypes, world size and what counts where.
#[derive(Clone, Copy, Debug)]
pub struct Env {
    pub device: Device,
    /// FSDP2 `param_dtype`: unsharded parameters, activations.
    pub compute: Kind,
    /// FSDP2 `reduce_dtype`.
    pub reduce: Kind,
    /// Sharded parameters, their gradients and optimizer states.
    pub master: Kind,
    pub world: i64,
    /// This rank's index in the shard group.
    pub rank: i64,
    /// Whether the other ranks' shards are materialised here (the single-device emulation of
    /// rank 0); false in a real multi-process run, where each rank holds only its own.
    pub peers: bool,
    pub offload: Offload,
}

impl Env {
    /// The tch device and the counting channel for allocations in `place`.
    pub fn at(&self, place: Place) -> (Device, Channel) {
        match (place, self.device) {
            (Place::Device, Device::Cpu) => (Device::Cpu, Channel::Device),
            (Place::Device, d) => (d, Channel::Host),
            (Place::Host, _) => (Device::Cpu, Channel::Host),
        }
    }

    /// The channel CPU allocations default to (device memory on a CPU run).
    pub fn default_channel(&self) -> Channel {
        self.at(Place::Device).1
    }

    /// Where rank 0's sharded parameters and gradients live.
    pub fn shard_place(&self) -> Place {
        if self.offload == Offload::Full {
            Place::Host
        } else {
            Place::Device
        }
    }

    /// A copy of `t` in `place` (always a new allocation, as a device/host transfer is).
    pub fn copy_to(&self, t: &Tensor, place: Place) -> TResult<Tensor> {
        let (dev, ch) = self.at(place);
        let _g = ffi::channel(ch);
        let mut out = Tensor::f_empty(t.size(), (t.kind(), dev))?;
        out.f_copy_(t)?;
        Ok(out)
    }

    /// `t` on the compute device (itself when already there, else a transfer).
    pub fn on_device(&self, t: &Tensor) -> TResult<Tensor> {
        if t.device() == self.device
            && !(self.device == Device::Cpu && self.offload == Offload::Full)
        {
            Ok(t.shallow_clone())
        } else {
            self.copy_to(t, Place::Device)
        }
    }
}

/// The two collectives FSDP needs, over flat 1-D tensors. The single-device emulation
/// implements them with copies; a c10d process group would implement them with NCCL.
pub trait Collectives {
    fn world_size(&self) -> i64;
    fn rank(&self) -> i64;
    /// `output` (world x n) gets every rank's `input` (n), rank-major. `peer_input(r)` yields
    /// rank r's input where the peers are emulated (a process group ignores it).
    fn all_gather(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        peer_input: &mut dyn FnMut(i64) -> TResult<Tensor>,
    ) -> TResult<()>;
    /// `output` (n) gets the average over ranks of chunk `rank` of each rank's `input`
    /// (world x n). `peer_output(r, chunk)` receives what rank r would get where the peers are
    /// emulated.
    fn reduce_scatter(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        peer_output: &mut dyn FnMut(i64, Tensor) -> TResult<()>,
    ) -> TResult<()>;
}

/// Rank 0 of `world` ranks that all see the same data, on one device. The peers' tensors are
/// made on the host with counting off.
pub struct Emulated {
    pub world: i64,
}

impl Collectives for Emulated {
    fn world_size(&self) -> i64 {
        self.world
    }
    fn rank(&self) -> i64 {
        0
    }
    fn all_gather(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        peer_input: &mut dyn FnMut(i64) -> TResult<Tensor>,
    ) -> TResult<()> {
        let n = input.numel() as i64;
        for r in 1..self.world {
            let t = {
                let _off = ffi::channel(Channel::Off);
                peer_input(r)?
            };
            output.f_narrow(0, r * n, n)?.f_copy_(&t)?;
        }
        Ok(())
    }
    fn reduce_scatter(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        peer_output: &mut dyn FnMut(i64, Tensor) -> TResult<()>,
    ) -> TResult<()> {
        let n = output.numel() as i64;
        // Identical data on every rank: the average of the ranks' chunks is rank 0's own.
        output.shallow_clone().f_copy_(&input.f_narrow(0, 0, n)?)?;
        for r in 1..self.world {
            let _off = ffi::channel(Channel::Off);
            let mut chunk = Tensor::f_empty([n], (input.kind(), Device::Cpu))?;
            chunk.f_copy_(&input.f_narrow(0, r * n, n)?)?;
            peer_output(r, chunk)?;
        }
        Ok(())
    }
}

/// One rank's shard of one parameter.
pub struct Shard {
    /// The padded shard (`_sharded_param_data`): shard_rows x cols, master dtype.
    pub data: Tensor,
    /// The rows of `data` this rank owns (what the optimizer updates).
    pub view: Tensor,
    /// Rows owned (`view`'s dim 0).
    pub rows: i64,
    pub grad: Option<Tensor>,
    /// Optimizer state tensors (exp_avg, exp_avg_sq; or the momentum buffer).
    pub state: Vec<Tensor>,
    /// torch.optim's per-parameter `state["step"]` (float32 scalar).
    pub step: Option<Tensor>,
}

/// A parameter under FSDP.
pub struct FsdpParam {
    /// Unsharded shape: `[rows]` or `[rows, cols]`.
    pub shape: Vec<i64>,
    pub rows: i64,
    pub cols: i64,
    pub shard_rows: i64,
    pub local: Shard,
    pub remote: Vec<Shard>,
    /// The unsharded buffer (world x shard_rows x cols, param dtype); storage freed while
    /// sharded.
    pub padded: Tensor,
    /// What the model uses: `padded[..rows*cols].view(shape)`, a leaf that requires grad.
    pub leaf: Tensor,
    /// The module it belongs to (attribution of the allocation trace).
    pub module: Module,
    /// FSDP2's `unsharded_accumulated_grad`: the unsharded gradient in the reduce dtype, kept
    /// across backwards that do not reduce (see [`Fsdp::post_backward_no_sync`]).
    pub accumulated_grad: Option<Tensor>,
}

impl FsdpParam {
    fn shard_numel(&self) -> i64 {
        self.shard_rows * self.cols
    }
    fn shard_shape(&self, rows: i64) -> Vec<i64> {
        if self.shape.len() == 1 {
            vec![rows]
        } else {
            vec![rows, self.cols]
        }
    }

    /// Shards `full` (fp32, host, uncounted) over `env.world` ranks: this rank's shard, and
    /// the others' when they are emulated. `module` owns it.
    pub fn new(full: &Tensor, env: &Env, module: Module) -> TResult<FsdpParam> {
        let _ctx = recorder::scope(Context::of(Category::MasterParams, module, Part::Shard));
        let shape = full.size();
        let rows = shape[0];
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        let n = env.world;
        let shard_rows = (rows + n - 1) / n;
        let mut shards = Vec::with_capacity(n as usize);
        let ranks: Vec<i64> = if env.peers {
            std::iter::once(env.rank)
                .chain((0..n).filter(|&r| r != env.rank))
                .collect()
        } else {
            vec![env.rank]
        };
        for r in ranks {
            let start = r * shard_rows;
            let own = (rows - start).clamp(0, shard_rows);
            let (dev, ch) = if r == env.rank {
                env.at(env.shard_place())
            } else {
                (Device::Cpu, Channel::Off)
            };
            let _g = ffi::channel(ch);
            let sshape: Vec<i64> = if shape.len() == 1 {
                vec![shard_rows]
            } else {
                vec![shard_rows, cols]
            };
            let data = Tensor::f_zeros(sshape.as_slice(), (env.master, dev))?;
            if own > 0 {
                let src = full.f_narrow(0, start, own)?;
                data.f_narrow(0, 0, own)?.f_copy_(&src)?;
            }
            let view = data.f_narrow(0, 0, own)?;
            shards.push(Shard {
                data,
                view,
                rows: own,
                grad: None,
                state: Vec::new(),
                step: None,
            });
        }
        let local = shards.remove(0);
        let (padded, leaf) = {
            let _g = ffi::channel(Channel::Off);
            let padded = Tensor::f_empty([n * shard_rows * cols], (env.compute, env.device))?;
            let leaf = padded
                .f_narrow(0, 0, rows * cols)?
                .f_view(shape.as_slice())?
                .f_detach()?
                .f_set_requires_grad(true)?;
            (padded, leaf)
        };
        ffi::storage_resize(&padded, 0).map_err(shim)?;
        Ok(FsdpParam {
            shape,
            rows,
            cols,
            shard_rows,
            local,
            remote: shards,
            padded,
            leaf,
            module,
            accumulated_grad: None,
        })
    }

    fn unsharded_nbytes(&self, env: &Env) -> u64 {
        (env.world * self.shard_numel()) as u64 * env.compute.elt_size_in_bytes() as u64
    }
}

pub fn shim(e: ffi::ShimError) -> tch::TchError {
    tch::TchError::Torch(e.0)
}

/// A parameter group: one `fully_shard` call (a block, or the root).
pub struct Group {
    pub params: Vec<FsdpParam>,
    pub unsharded: bool,
    /// Issued all-gather whose copy-out has not run.
    pending: Option<Tensor>,
    pub reshard_after_forward: bool,
    /// The module the group wraps (a block, or the root).
    pub module: Module,
    /// The parameter (index in `params`) whose unsharded gradient the reduce keeps until it
    /// returns, where the caller mirrors it: FSDP2's `foreach_reduce` loops over its
    /// (param, gradient) pairs before the copy-in (torch 2.11 fsdp/_fully_shard/
    /// _fsdp_collectives.py:503-515, world size above 1), and Python leaves the loop variable
    /// bound to the last module-registered parameter's gradient until the function returns.
    /// None: no gradient kept past the copy-in.
    pub held_in_reduce: Option<usize>,
}

impl Group {
    pub fn new(params: Vec<FsdpParam>, reshard_after_forward: bool, module: Module) -> Group {
        Group {
            params,
            unsharded: false,
            pending: None,
            reshard_after_forward,
            module,
            held_in_reduce: None,
        }
    }
    fn shard_numel(&self) -> i64 {
        self.params.iter().map(|p| p.shard_numel()).sum()
    }
    /// The tensors the model computes with.
    pub fn leaves(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.leaf.shallow_clone()).collect()
    }
}

/// All groups of the model and the collectives between ranks.
pub struct Fsdp {
    pub env: Env,
    pub groups: Vec<Group>,
    pub comm: Box<dyn Collectives>,
    /// FSDP2 `comm_ctx.all_gather_state`: the last forward all-gather output.
    all_gather_state: Option<Tensor>,
    /// FSDP2 `comm_ctx.reduce_scatter_state`: the last reduce-scatter input.
    reduce_scatter_state: Option<Tensor>,
}

impl Fsdp {
    pub fn new(env: Env, groups: Vec<Group>, comm: Box<dyn Collectives>) -> Fsdp {
        Fsdp {
            env,
            groups,
            comm,
            all_gather_state: None,
            reduce_scatter_state: None,
        }
    }

    /// Issues group `g`'s all-gather (`FSDPParamGroup.unshard`).
    pub fn unshard(&mut self, g: usize) -> TResult<()> {
        let env = self.env;
        let group = &mut self.groups[g];
        if group.unsharded || group.pending.is_some() || env.world == 1 {
            return Ok(());
        }
        let _ng = tch::no_grad_guard();
        let _ctx = recorder::scope(all_gather_context(group.module));
        let n = group.shard_numel();
        // `_get_param_all_gather_inputs`: with a param dtype and no offload, one flat cast of
        // every shard (`_foreach_copy_` into splits of one buffer); otherwise each shard's
        // `all_gather_inputs` (a device copy under offload, then the cast if needed). All are
        // alive until the copy-in.
        let inputs: Vec<Tensor> = if env.compute != env.master && env.offload != Offload::Full {
            let flat_in = Tensor::f_empty([n], (env.compute, env.device))?;
            let mut off = 0;
            let mut v = Vec::with_capacity(group.params.len());
            for p in &group.params {
                let len = p.shard_numel();
                let split = flat_in.f_narrow(0, off, len)?;
                split
                    .shallow_clone()
                    .f_copy_(&p.local.data.f_reshape([len])?)?;
                v.push(split);
                off += len;
            }
            v
        } else {
            group
                .params
                .iter()
                .map(|p| {
                    env.on_device(&p.local.data)?
                        .f_to_kind(env.compute)?
                        .f_reshape([-1])
                })
                .collect::<TResult<_>>()?
        };
        let flat = Tensor::f_empty([env.world * n], (env.compute, env.device))?;
        let mine = flat.f_narrow(0, self.comm.rank() * n, n)?;
        let mut off = 0;
        for input in &inputs {
            let len = input.numel() as i64;
            mine.f_narrow(0, off, len)?.f_copy_(input)?;
            off += len;
        }
        drop(inputs);
        let params = &group.params;
        let mut peer = |r: i64| -> TResult<Tensor> {
            let parts = params
                .iter()
                .map(|p| {
                    p.remote[(r - 1) as usize]
                        .data
                        .f_to_kind(env.compute)?
                        .f_reshape([-1])
                })
                .collect::<TResult<Vec<_>>>()?;
            Tensor::f_cat(&parts, 0)
        };
        self.comm.all_gather(&flat, &mine, &mut peer)?;
        drop(mine);
        group.pending = Some(flat);
        Ok(())
    }

    /// Copies group `g`'s all-gather out into its unsharded parameters
    /// (`FSDPParamGroup.wait_for_unshard`), issuing the all-gather first if needed.
    pub fn wait_for_unshard(&mut self, g: usize, forward: bool) -> TResult<()> {
        if self.groups[g].unsharded {
            return Ok(());
        }
        self.unshard(g)?;
        let env = self.env;
        let _ng = tch::no_grad_guard();
        if forward {
            self.all_gather_state = None;
        }
        let group = &mut self.groups[g];
        if env.world == 1 {
            // FSDP2's world-size-1 path: per parameter, `all_gather_inputs[0]` (the cast, or a
            // device copy under offload) is made while the previous one is still bound.
            let mut prev: Option<Tensor> = None;
            for p in &group.params {
                let input = {
                    let _ctx = recorder::scope(all_gather_context(p.module));
                    env.on_device(&p.local.data)?.f_to_kind(env.compute)?
                };
                drop(prev.take());
                let _ctx = recorder::scope(unsharded_context(p.module));
                ffi::storage_resize(&p.padded, p.unsharded_nbytes(&env)).map_err(shim)?;
                ffi::copy_unversioned(&p.padded, &input.f_reshape([-1])?).map_err(shim)?;
                prev = Some(input);
            }
            drop(prev);
        } else {
            let flat = group.pending.take().expect("unshard issued the all-gather");
            let n = group.shard_numel();
            let rows = flat.f_view([env.world, n])?;
            let mut off = 0;
            for p in &group.params {
                let len = p.shard_numel();
                let _ctx = recorder::scope(unsharded_context(p.module));
                ffi::storage_resize(&p.padded, p.unsharded_nbytes(&env)).map_err(shim)?;
                let dst = p.padded.f_view([env.world, len])?;
                ffi::copy_unversioned(&dst, &rows.f_narrow(1, off, len)?).map_err(shim)?;
                off += len;
            }
            drop(rows);
            if forward {
                self.all_gather_state = Some(flat);
            }
        }
        group.unsharded = true;
        Ok(())
    }

    /// Frees group `g`'s unsharded parameters.
    pub fn reshard(&mut self, g: usize) -> TResult<()> {
        let group = &mut self.groups[g];
        for p in &group.params {
            ffi::storage_resize(&p.padded, 0).map_err(shim)?;
        }
        group.unsharded = false;
        Ok(())
    }

    /// The root's post-forward: frees the last forward all-gather output.
    pub fn root_post_forward(&mut self) {
        self.all_gather_state = None;
    }

    /// End of backward: frees the last reduce-scatter input.
    pub fn finish_backward(&mut self) {
        self.reduce_scatter_state = None;
    }

    /// Group `g`'s post-backward when gradients are not synchronised and parameters stay
    /// unsharded (`set_requires_gradient_sync(False)`, `set_reshard_after_backward(False)`, as
    /// `torch.distributed.pipelining` sets them before every micro-batch's backward,
    /// torch 2.11 pipelining/stage.py:656-659): nothing is reduced or freed; the unsharded
    /// gradient is added into the one accumulated in the reduce dtype, or, in the first
    /// backward, becomes it (`accumulate_unsharded_grad_if_needed`, then
    /// `to_accumulated_grad_if_needed`: _fsdp_param_group.py:503-511, _fsdp_param.py:670-689).
    /// Without a reduce dtype other than the parameters' the gradient stays on the parameter,
    /// where autograd accumulates the next one.
    pub fn post_backward_no_sync(&mut self, g: usize) -> TResult<()> {
        let env = self.env;
        let _ng = tch::no_grad_guard();
        for p in &mut self.groups[g].params {
            accumulate_unsharded_grad(p)?;
        }
        if env.reduce == env.compute {
            return Ok(());
        }
        for p in &mut self.groups[g].params {
            // `unsharded_grad = grad; grad = None; acc = unsharded_grad.to(reduce_dtype)`: the
            // compute-dtype gradient lives until the cast returns.
            if let Some(grad) = ffi::take_grad(&p.leaf).map_err(shim)? {
                p.accumulated_grad = Some(grad.f_to_kind(env.reduce)?);
            }
        }
        Ok(())
    }

    /// Group `g`'s post-backward: reshard and reduce-scatter its gradients into the sharded
    /// gradients (`FSDPParamGroup.post_backward` and `foreach_reduce`).
    pub fn post_backward(&mut self, g: usize) -> TResult<()> {
        let mut grads = Vec::with_capacity(self.groups[g].params.len());
        for p in &mut self.groups[g].params {
            accumulate_unsharded_grad(p)?;
        }
        for p in &mut self.groups[g].params {
            // A gradient accumulated in the reduce dtype by backwards without sync goes first
            // (`unsharded_accumulated_grad`, _fsdp_param_group.py:521).
            grads.push(match p.accumulated_grad.take() {
                Some(acc) => Some(acc),
                None => ffi::take_grad(&p.leaf).map_err(shim)?,
            });
        }
        self.post_backward_with(g, grads)
    }

    /// [`Fsdp::post_backward`] with the unsharded gradients already taken from the
    /// parameters (one per parameter, in order): under tensor parallelism FSDP2 reads each
    /// DTensor gradient's local tensor in the parameter's own placements
    /// (`FSDPParam._get_grad_inner_tensor`), which the caller has redistributed.
    pub fn post_backward_with(&mut self, g: usize, grads: Vec<Option<Tensor>>) -> TResult<()> {
        let env = self.env;
        let _ng = tch::no_grad_guard();
        for (p, grad) in self.groups[g].params.iter().zip(&grads) {
            // Autograd made it during the backward; it is the unsharded gradient.
            if let Some(t) = grad {
                recorder::retag(
                    t,
                    Context::of(Category::GradientBuffers, p.module, Part::Grad),
                );
            }
        }
        self.reshard(g)?;
        if grads.iter().all(|g| g.is_none()) {
            return Ok(());
        }
        self.reduce_scatter_state = None;
        // Only parameters with a gradient take part (`fsdp_params_with_grad`).
        let with: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].is_some()).collect();
        let grads: Vec<Tensor> = grads.into_iter().flatten().collect();
        let group = &mut self.groups[g];
        let held = group
            .held_in_reduce
            .filter(|_| env.world > 1)
            .and_then(|i| with.iter().position(|&w| w == i))
            .map(|k| grads[k].shallow_clone());
        let n: i64 = with.iter().map(|&i| group.params[i].shard_numel()).sum();
        let world = env.world;
        // Attribution: the reduce-scatter buffers, and the tensor that becomes the sharded
        // gradients (a temporary instead when it is added into existing ones or moved to
        // the host).
        let module = group.module;
        let buffers = Context::of(Category::GradientBuffers, module, Part::ReduceScatter)
            .on_stream(REDUCE_SCATTER_STREAM);
        let accumulating = with.iter().any(|&i| group.params[i].local.grad.is_some());
        let final_here = env.shard_place() == Place::Device && !accumulating;
        let grads_ctx = if final_here {
            Context::of(Category::Gradients, module, Part::Grad).on_stream(REDUCE_SCATTER_STREAM)
        } else {
            buffers
        };
        let ctx = recorder::scope(buffers);
        let rs_input = Tensor::f_empty([world * n], (env.reduce, env.device))?;
        // `foreach_reduce_scatter_copy_in`: torch._chunk_cat pads each gradient to a multiple
        // of world rows on dim 0, splits it in world chunks and lays the chunks out rank-major,
        // casting to the reduce dtype.
        let _ = Tensor::f_internal_chunk_cat_out(&rs_input.f_view([world, n])?, &grads, 0, world)?;
        drop(grads);
        let rs_output = {
            let _ctx = recorder::scope(if env.reduce == env.master {
                grads_ctx
            } else {
                buffers
            });
            Tensor::f_empty([n], (env.reduce, env.device))?
        };
        let mut peer_chunks: Vec<(i64, Tensor)> = Vec::new();
        self.comm
            .reduce_scatter(&rs_output, &rs_input, &mut |r, t| {
                peer_chunks.push((r, t));
                Ok(())
            })?;
        let out = if env.reduce != env.master {
            let _ctx = recorder::scope(grads_ctx);
            rs_output.f_to_kind(env.master)?
        } else {
            rs_output
        };
        drop(ctx);
        let out = if env.shard_place() == Place::Host {
            env.copy_to(&out, Place::Host)?
        } else {
            out
        };
        accumulate(&mut self.groups[g].params, &with, &out, |p| &mut p.local)?;
        drop((out, held));
        self.reduce_scatter_state = Some(rs_input);
        let _off = ffi::channel(Channel::Off);
        for (r, chunk) in peer_chunks {
            let chunk = chunk.f_to_kind(env.master)?;
            accumulate(&mut self.groups[g].params, &with, &chunk, |p| {
                &mut p.remote[(r - 1) as usize]
            })?;
        }
        Ok(())
    }
}

/// `FSDPParam.accumulate_unsharded_grad_if_needed` (_fsdp_param.py:683): a new unsharded
/// gradient is added into the accumulated one (in place, in the reduce dtype) and dropped.
fn accumulate_unsharded_grad(p: &mut FsdpParam) -> TResult<()> {
    if let Some(acc) = &mut p.accumulated_grad {
        if let Some(grad) = ffi::take_grad(&p.leaf).map_err(shim)? {
            let _ = acc.f_add_(&grad)?;
        }
    }
    Ok(())
}

/// Attribution of `module`'s all-gather inputs and output.
fn all_gather_context(module: Module) -> Context {
    Context::of(Category::UnshardedParams, module, Part::AllGather).on_stream(ALL_GATHER_STREAM)
}

/// Attribution of a parameter's unsharded buffer (the all-gather's copy-out).
fn unsharded_context(module: Module) -> Context {
    Context::of(Category::UnshardedParams, module, Part::Whole)
}

/// Sets (or adds into) each parameter's sharded gradient from one flat reduce-scatter output.
fn accumulate(
    params: &mut [FsdpParam],
    with: &[usize],
    flat: &Tensor,
    shard: impl Fn(&mut FsdpParam) -> &mut Shard,
) -> TResult<()> {
    let mut off = 0;
    for &i in with {
        let p = &mut params[i];
        let len = p.shard_numel();
        let shape = p.shard_shape(p.shard_rows);
        let s = shard(p);
        let g = flat
            .f_narrow(0, off, len)?
            .f_view(shape.as_slice())?
            .f_narrow(0, 0, s.rows)?;
        match &mut s.grad {
            Some(acc) => {
                let _ = acc.f_add_(&g)?;
            }
            None => s.grad = Some(g),
        }
        off += len;
    }
    Ok(())
}

/// FSDP2's two collectives over this rank's `dp_shard` group, issued as the reference's Gloo
/// issues them, with the temporaries Gloo allocates on the training thread's counter there
/// (the reference counts every thread; this trainer's Gloo threads are uncounted, so they are
/// made here, on the training thread, for the same span).
/// With `average`, the reduce-scatter divides by the ranks as FSDP2 does on backends without an
/// average op; without it the result is the sum (torchtitan's EP under FSDP sets
/// `gradient_divide_factor` 1.0, which the reference runs as a SUM).
pub struct GlooShard {
    pg: *const ProcessGroup,
    average: bool,
    /// Whether Gloo's temporaries are made (the default, to equal the CPU reference); with
    /// `MEMPLAN_GLOO_TEMPORARIES=0` they are not, and the counted peaks are those of a GPU
    /// rank, whose NCCL makes neither (what the estimator models).
    temporaries: bool,
}

impl GlooShard {
    /// Over `pg`, Gloo's temporaries made unless `MEMPLAN_GLOO_TEMPORARIES=0`.
    ///
    /// # Safety
    /// `pg` must outlive the value.
    pub unsafe fn new(pg: &ProcessGroup, average: bool) -> GlooShard {
        GlooShard {
            pg: pg as *const ProcessGroup,
            average,
            temporaries: std::env::var("MEMPLAN_GLOO_TEMPORARIES").map_or(true, |v| v != "0"),
        }
    }

    fn pg(&self) -> &ProcessGroup {
        // SAFETY: `new`'s caller keeps the group alive.
        unsafe { &*self.pg }
    }
}

impl Collectives for GlooShard {
    fn world_size(&self) -> i64 {
        self.pg().size()
    }
    fn rank(&self) -> i64 {
        self.pg().rank()
    }
    /// `dist.all_gather_into_tensor` (FSDP2's `foreach_all_gather`) on Gloo:
    /// `ProcessGroupGloo::_allgather_base` issues `allgather` over the output's chunks, whose
    /// `AsyncAllgatherWork` gathers into one flat tensor like the whole output (`newLikeFlat`)
    /// and copies it into the chunks; that flat tensor is freed as the work ends, before
    /// `wait()` returns. Here the gather is one broadcast per rank into the output's slices,
    /// with a tensor of the output's size held across it.
    fn all_gather(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        _peer_input: &mut dyn FnMut(i64) -> TResult<Tensor>,
    ) -> TResult<()> {
        let pg = self.pg();
        let n = input.numel() as i64;
        let mine = output.f_narrow(0, pg.rank() * n, n)?;
        if mine.data_ptr() != input.data_ptr() {
            mine.shallow_clone().f_copy_(input)?;
        }
        let flat = self
            .temporaries
            .then(|| output.f_empty_like())
            .transpose()?;
        for r in 0..pg.size() {
            pg.broadcast(&output.f_narrow(0, r * n, n)?, r)?;
        }
        drop(flat);
        Ok(())
    }
    /// `dist.reduce_scatter_tensor` (FSDP2's `foreach_reduce`, SUM then the division by the
    /// ranks) on Gloo: `ProcessGroupGloo::reduce_scatter_tensor_coalesced` all-reduces a
    /// `clone()` of the whole input and copies this rank's chunk of it into the output; the
    /// clone lives until the work is waited on.
    fn reduce_scatter(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        _peer_output: &mut dyn FnMut(i64, Tensor) -> TResult<()>,
    ) -> TResult<()> {
        let pg = self.pg();
        let n = output.numel() as i64;
        // (Without Gloo's clone the sum is made in place in the reduce-scatter input, FSDP2's
        // own buffer, which nothing reads after.)
        let buf = if self.temporaries {
            let _g = tch::no_grad_guard();
            let c = input.f_empty_like()?;
            c.shallow_clone().f_copy_(input)?;
            c
        } else {
            input.shallow_clone()
        };
        pg.all_reduce_sum(&buf)?;
        output
            .shallow_clone()
            .f_copy_(&buf.f_narrow(0, pg.rank() * n, n)?)?;
        drop(buf);
        if self.average {
            let _ = output.shallow_clone().f_div_scalar_(pg.size() as f64)?;
        }
        Ok(())
    }
}
