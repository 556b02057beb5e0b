//! A real distributed run over libtorch's c10d: the rank's place in the job (from the torchrun
//! environment), its TCPStore and Gloo process groups (csrc/dist.cpp), and the collectives
//! FSDP2 needs over them.
//!
//! The mesh is torchtitan's 2-D data-parallel mesh, `(dp_replicate, dp_shard)` rank-major:
//! rank = replica x dp_shard + shard. Parameters are sharded over the shard group (the ranks
//! of one replica); under HSDP the reduce-scattered gradients are then all-reduced over the
//! replicate group (the ranks holding the same shard), as FSDP2's HSDP does. Under pipeline
//! parallelism a third dimension, `pp`, is outermost (torchtitan's order): rank = stage x
//! dp_replicate x dp_shard + the data-parallel rank, and the stages of one data-parallel
//! position form a Gloo `pp` group, over which the stages' activations and gradients travel
//! by isend / irecv ([`ProcessGroup::isend`], a [`Work`] per op, as torch's P2P ops).
//!
//! How the collectives are issued, and why: Gloo's own `_allgather_base` allocates two
//! temporaries of the whole output through the CPU allocator (a flat bookkeeping tensor and a
//! flat output buffer on its worker thread), and its `_reduce_scatter_base` clones the whole
//! input and all-reduces it (torch 2.11 ProcessGroupGloo.cpp). NCCL, which FSDP2 uses on GPUs
//! and which the estimator models, allocates neither through the caching allocator. So the
//! all-gather here is one in-place broadcast per rank into that rank's slice of the flat output,
//! and the reduce-scatter one in-place all-reduce per rank chunk of the flat input followed by
//! a copy of this rank's chunk: the same bytes arrive, and the only tensors allocated are
//! FSDP2's own (the flat all-gather output, the reduce-scatter input and output), so a rank's
//! counted peaks are those a GPU rank would have. Averaging is a sum and an in-place division,
//! as FSDP2 does on backends without an average op.

use std::ffi::{c_char, c_int, c_void, CString};
use std::time::Duration;

use tch::Tensor;
use torch_sys::C_tensor;

use super::fsdp::Collectives;
use super::model::TResult;
use crate::error::{Error, Result};

extern "C" {
    fn mp_store_new(
        host: *const c_char,
        port: c_int,
        is_server: c_int,
        world: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_store_free(store: *mut c_void);
    fn mp_pg_new(
        store: *mut c_void,
        prefix: *const c_char,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        iface_host: *const c_char,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_pg_new_nccl(
        store: *mut c_void,
        prefix: *const c_char,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        device: c_int,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_pg_free(pg: *mut c_void);
    fn mp_pg_all_gather_base(
        pg: *mut c_void,
        out: *mut C_tensor,
        input: *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_pg_alltoall_base(
        pg: *mut c_void,
        out: *mut C_tensor,
        input: *mut C_tensor,
        out_splits: *const i64,
        in_splits: *const i64,
        n: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_pg_reduce_scatter_base(
        pg: *mut c_void,
        out: *mut C_tensor,
        input: *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_pg_all_reduce(
        pg: *mut c_void,
        t: *mut C_tensor,
        op: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_pg_broadcast(
        pg: *mut c_void,
        t: *mut C_tensor,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_pg_barrier(pg: *mut c_void, err: *mut *mut c_char) -> c_int;
    fn mp_pg_send(
        pg: *mut c_void,
        t: *mut C_tensor,
        dst: c_int,
        tag: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_pg_recv(
        pg: *mut c_void,
        t: *mut C_tensor,
        src: c_int,
        tag: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_pg_isend(
        pg: *mut c_void,
        t: *mut C_tensor,
        dst: c_int,
        tag: c_int,
        work: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_pg_irecv(
        pg: *mut c_void,
        t: *mut C_tensor,
        src: c_int,
        tag: c_int,
        work: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_work_wait(work: *mut c_void, err: *mut *mut c_char) -> c_int;
    fn mp_work_free(work: *mut c_void);
}

/// A c10d call through the shim; a failure is its message's first line (c10 appends a C++
/// backtrace).
fn call(f: impl FnOnce(*mut *mut c_char) -> c_int) -> std::result::Result<(), String> {
    super::ffi::call(f).map_err(|e| e.0.lines().next().unwrap_or_default().to_string())
}

fn ptr(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).expect("NULs removed")
}

/// Where this process stands in the job, as torchrun (or `memplan train --nproc-per-node`)
/// tells it: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: u64,
    pub world: u64,
    pub local_rank: u64,
    pub local_world: u64,
    pub master_addr: String,
    pub master_port: u16,
}

impl RankEnv {
    /// The torchrun variables, if RANK or WORLD_SIZE is set; every one must then be valid.
    pub fn from_env() -> Result<Option<RankEnv>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`RankEnv::from_env`], over any variable lookup.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>> {
        if get("RANK").is_none() && get("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let num = |key: &str, default: Option<u64>, max: u64| -> Result<u64> {
            match (get(key), default) {
                (None, Some(d)) => Ok(d),
                (None, None) => Err(Error::input(format!(
                    "environment: {key} is not set (a rank needs RANK, WORLD_SIZE, MASTER_ADDR \
                     and MASTER_PORT, as torchrun sets them)"
                ))),
                (Some(v), _) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n <= max)
                    .ok_or_else(|| {
                        Error::invalid(
                            &format!("environment {key}"),
                            format!("{v:?}"),
                            format!("an integer from 0 to {max}"),
                        )
                    }),
            }
        };
        let world = num("WORLD_SIZE", None, 1 << 16)?;
        if world == 0 {
            return Err(Error::invalid("environment WORLD_SIZE", 0, "at least 1"));
        }
        let rank = num("RANK", None, world - 1)?;
        let local_world = num("LOCAL_WORLD_SIZE", Some(world), world)?.max(1);
        let local_rank = num("LOCAL_RANK", Some(rank % local_world), local_world - 1)?;
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        if master_addr.trim().is_empty() {
            return Err(Error::invalid(
                "environment MASTER_ADDR",
                "\"\"",
                "the address of rank 0",
            ));
        }
        let master_port = num("MASTER_PORT", None, 65535)?;
        if master_port == 0 {
            return Err(Error::invalid(
                "environment MASTER_PORT",
                0,
                "a port from 1 to 65535",
            ));
        }
        Ok(Some(RankEnv {
            rank,
            world,
            local_rank,
            local_world,
            master_addr,
            master_port: master_port as u16,
        }))
    }
}

/// The job's TCPStore: rank 0 hosts it, every rank connects.
pub struct Store(*mut c_void);

impl Store {
    pub fn connect(env: &RankEnv, timeout: Duration) -> Result<Store> {
        let host = cstring(&env.master_addr);
        let mut out = std::ptr::null_mut();
        call(|e| unsafe {
            mp_store_new(
                host.as_ptr(),
                env.master_port as c_int,
                (env.rank == 0) as c_int,
                env.world as c_int,
                timeout.as_millis() as i64,
                &mut out,
                e,
            )
        })
        .map_err(|m| {
            let what = if env.rank == 0 {
                format!(
                    "rank 0 cannot host the store at {}:{} (is the port in use?)",
                    env.master_addr, env.master_port
                )
            } else {
                format!(
                    "rank {} cannot reach the store at {}:{} within {} s",
                    env.rank,
                    env.master_addr,
                    env.master_port,
                    timeout.as_secs()
                )
            };
            Error::runtime(format!("{what}: {m}"))
        })?;
        Ok(Store(out))
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        unsafe { mp_store_free(self.0) }
    }
}

/// Which c10d backend a group runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors, TCP (loopback or the node's interface).
    Gloo,
    /// CUDA tensors on this device.
    Nccl(usize),
}

/// A c10d process group.
pub struct ProcessGroup {
    handle: *mut c_void,
    rank: i64,
    size: i64,
    name: String,
    backend: Backend,
}

impl ProcessGroup {
    /// The group `name` of `size` ranks in which this process is `rank`, over `store`;
    /// Gloo binds to `iface_host` ("" for the machine's hostname).
    pub fn new(
        store: &Store,
        name: &str,
        rank: i64,
        size: i64,
        timeout: Duration,
        backend: Backend,
        iface_host: &str,
    ) -> Result<ProcessGroup> {
        let prefix = cstring(name);
        let host = cstring(iface_host);
        let mut out = std::ptr::null_mut();
        let ms = timeout.as_millis() as i64;
        call(|e| unsafe {
            match backend {
                Backend::Gloo => mp_pg_new(
                    store.0,
                    prefix.as_ptr(),
                    rank as c_int,
                    size as c_int,
                    ms,
                    host.as_ptr(),
                    &mut out,
                    e,
                ),
                Backend::Nccl(d) => mp_pg_new_nccl(
                    store.0,
                    prefix.as_ptr(),
                    rank as c_int,
                    size as c_int,
                    ms,
                    d as c_int,
                    &mut out,
                    e,
                ),
            }
        })
        .map_err(|m| {
            Error::runtime(format!("process group {name} (rank {rank} of {size}): {m}"))
        })?;
        Ok(ProcessGroup {
            handle: out,
            rank,
            size,
            name: name.to_string(),
            backend,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// c10d's own all_gather_into_tensor (NCCL; on Gloo it allocates whole-output
    /// temporaries, see the module doc).
    pub fn all_gather_into(&self, output: &Tensor, input: &Tensor) -> TResult<()> {
        self.check(
            "all_gather_into_tensor",
            call(|e| unsafe { mp_pg_all_gather_base(self.handle, ptr(output), ptr(input), e) }),
        )
    }
    /// c10d's own reduce_scatter_tensor, summing.
    pub fn reduce_scatter_into(&self, output: &Tensor, input: &Tensor) -> TResult<()> {
        self.check(
            "reduce_scatter_tensor",
            call(|e| unsafe { mp_pg_reduce_scatter_base(self.handle, ptr(output), ptr(input), e) }),
        )
    }

    /// c10d's own `alltoall_base` (`all_to_all_single`): `output`'s rows come from each rank
    /// in turn (`out_splits` rows from rank i), `input`'s rows go to each (`in_splits`).
    pub fn all_to_all_into(
        &self,
        output: &Tensor,
        input: &Tensor,
        out_splits: &[i64],
        in_splits: &[i64],
    ) -> TResult<()> {
        assert_eq!(out_splits.len(), in_splits.len());
        self.check(
            "all_to_all_single",
            call(|e| unsafe {
                mp_pg_alltoall_base(
                    self.handle,
                    ptr(output),
                    ptr(input),
                    out_splits.as_ptr(),
                    in_splits.as_ptr(),
                    out_splits.len() as c_int,
                    e,
                )
            }),
        )
    }

    pub fn rank(&self) -> i64 {
        self.rank
    }
    pub fn size(&self) -> i64 {
        self.size
    }

    fn check(&self, what: &str, r: std::result::Result<(), String>) -> TResult<()> {
        r.map_err(|m| {
            tch::TchError::Torch(format!(
                "{what} on process group {} (rank {} of {}): {m}",
                self.name, self.rank, self.size
            ))
        })
    }

    /// In-place sum over the group.
    pub fn all_reduce_sum(&self, t: &Tensor) -> TResult<()> {
        self.check(
            "all_reduce",
            call(|e| unsafe { mp_pg_all_reduce(self.handle, ptr(t), 0, e) }),
        )
    }
    /// In-place max over the group.
    pub fn all_reduce_max(&self, t: &Tensor) -> TResult<()> {
        self.check(
            "all_reduce",
            call(|e| unsafe { mp_pg_all_reduce(self.handle, ptr(t), 1, e) }),
        )
    }
    /// In-place: every rank's `t` becomes `root`'s.
    pub fn broadcast(&self, t: &Tensor, root: i64) -> TResult<()> {
        self.check(
            "broadcast",
            call(|e| unsafe { mp_pg_broadcast(self.handle, ptr(t), root as c_int, e) }),
        )
    }
    pub fn barrier(&self) -> TResult<()> {
        self.check(
            "barrier",
            call(|e| unsafe { mp_pg_barrier(self.handle, e) }),
        )
    }
    /// Point to point, for pipeline stages.
    pub fn send(&self, t: &Tensor, dst: i64, tag: i64) -> TResult<()> {
        self.check(
            "send",
            call(|e| unsafe { mp_pg_send(self.handle, ptr(t), dst as c_int, tag as c_int, e) }),
        )
    }
    pub fn recv(&self, t: &Tensor, src: i64, tag: i64) -> TResult<()> {
        self.check(
            "recv",
            call(|e| unsafe { mp_pg_recv(self.handle, ptr(t), src as c_int, tag as c_int, e) }),
        )
    }
    /// Non-blocking send (`torch.distributed.isend`): the returned [`Work`] holds `t` until it
    /// is dropped, as torch's Work object does.
    pub fn isend(&self, t: &Tensor, dst: i64, tag: i64) -> TResult<Work> {
        let mut w = std::ptr::null_mut();
        self.check(
            "isend",
            call(|e| unsafe {
                mp_pg_isend(self.handle, ptr(t), dst as c_int, tag as c_int, &mut w, e)
            }),
        )?;
        Ok(Work(w))
    }
    /// Non-blocking receive into `t` (`torch.distributed.irecv`).
    pub fn irecv(&self, t: &Tensor, src: i64, tag: i64) -> TResult<Work> {
        let mut w = std::ptr::null_mut();
        self.check(
            "irecv",
            call(|e| unsafe {
                mp_pg_irecv(self.handle, ptr(t), src as c_int, tag as c_int, &mut w, e)
            }),
        )?;
        Ok(Work(w))
    }
}

/// An issued point-to-point operation (c10d's `Work`); it holds its tensor until dropped.
pub struct Work(*mut c_void);

impl Work {
    /// Blocks until the operation completed (`Work.wait()`); the tensor stays held.
    pub fn wait(&self) -> TResult<()> {
        call(|e| unsafe { mp_work_wait(self.0, e) })
            .map_err(|m| tch::TchError::Torch(format!("waiting for a point-to-point op: {m}")))
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        unsafe { mp_work_free(self.0) }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { mp_pg_free(self.handle) }
    }
}

/// The mesh of one rank: its pipeline group (when pp > 1), its shard group and, under HSDP,
/// its replicate group.
pub struct Mesh {
    pub env: RankEnv,
    /// Kept alive for the groups' lifetime.
    _store: Store,
    /// Every rank of the job (reports, barriers).
    pub world: ProcessGroup,
    pub shard: ProcessGroup,
    pub replicate: Option<ProcessGroup>,
    /// The ranks holding the other pipeline stages of this rank's data-parallel position, in
    /// stage order (torchtitan's "pp" mesh dimension, outermost); None without pipelining.
    pub pp: Option<ProcessGroup>,
    /// The ranks sharing this rank's tensor-parallel shards, in TP order (torchtitan's "tp"
    /// mesh dimension, innermost); None without tensor parallelism.
    pub tp: Option<ProcessGroup>,
    /// The ranks sharing this rank's sequence, in CP order (torchtitan's "cp" mesh dimension,
    /// inside dp_shard); None without context parallelism ([`Mesh::join_cp`]).
    pub cp: Option<ProcessGroup>,
}

impl Mesh {
    /// Joins the job: connects to the store and builds the `(pp, dp_replicate, dp_shard)`
    /// groups (rank = stage x dp_replicate x dp_shard + replica x dp_shard + shard, as
    /// torchtitan's mesh with pp outermost), the data-parallel ones on NCCL over this rank's
    /// GPU when `cuda` names it, else on Gloo. The pipeline group is Gloo. The world group, for
    /// the job's loss, gradient norm and reports, is always Gloo over CPU tensors.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        env: RankEnv,
        pp: u64,
        tp: u64,
        dp_replicate: u64,
        dp_shard: u64,
        timeout: Duration,
        cuda: Option<usize>,
    ) -> Result<Mesh> {
        if env.world != pp * tp * dp_replicate * dp_shard {
            return Err(Error::input(format!(
                "world size {} does not match the plan: pp x tp x dp_replicate x dp_shard = {pp} x {tp} x {dp_replicate} x {dp_shard} = {} (under context parallelism dp_shard here is the plan's dp_shard x cp)",
                env.world,
                pp * tp * dp_replicate * dp_shard
            )));
        }
        let store = Store::connect(&env, timeout)?;
        // Loopback jobs bind Gloo to the loopback address; others to the machine's hostname,
        // as torch's default Gloo device does.
        let iface = if is_loopback(&env.master_addr) {
            "127.0.0.1"
        } else {
            ""
        };
        let group = |name: &str, rank: u64, size: u64, backend: Backend| {
            ProcessGroup::new(
                &store,
                name,
                rank as i64,
                size as i64,
                timeout,
                backend,
                iface,
            )
        };
        // A group of more than one rank, else none.
        let beyond_one = |name: String, rank: u64, size: u64, backend: Backend| {
            (size > 1)
                .then(|| group(&name, rank, size, backend))
                .transpose()
        };
        let world = group("world/", env.rank, env.world, Backend::Gloo)?;
        let backend = cuda.map_or(Backend::Gloo, Backend::Nccl);
        let dp = dp_replicate * dp_shard;
        // TP innermost: rank = (stage x dp + dp_rank) x tp + tp_rank.
        let (tp_rank, outer) = (env.rank % tp, env.rank / tp);
        let (stage, dp_rank) = (outer / dp, outer % dp);
        let (replica, shard_rank) = (dp_rank / dp_shard, dp_rank % dp_shard);
        // Without pipelining or TP the names are those of a data-parallel job.
        let at = match (pp > 1, tp > 1) {
            (true, _) => format!("stage{stage}."),
            (false, true) => format!("tp{tp_rank}."),
            _ => String::new(),
        };
        let shard = group(
            &format!("{at}shard{replica}/"),
            shard_rank,
            dp_shard,
            backend,
        )?;
        let replicate = beyond_one(
            format!("{at}replicate{shard_rank}/"),
            replica,
            dp_replicate,
            backend,
        )?;
        let pp = beyond_one(format!("pp{dp_rank}/"), stage, pp, Backend::Gloo)?;
        let tp = beyond_one(format!("tp.outer{outer}/"), tp_rank, tp, Backend::Gloo)?;
        Ok(Mesh {
            env,
            _store: store,
            world,
            shard,
            replicate,
            pp,
            tp,
            cp: None,
        })
    }

    /// Context parallelism: groups the job's ranks into runs of `cp` consecutive ranks, each a
    /// Gloo `cp` group (torchtitan's mesh `(dp_shard, cp)`, cp innermost: rank = dp_shard rank x
    /// cp + cp rank). The job must have been joined with the FSDP degree dp_shard x cp as its
    /// shard group (torchtitan's flattened "dp_shard_cp" mesh), without pp, tp or replicas.
    pub fn join_cp(&mut self, cp: u64, timeout: Duration) -> Result<()> {
        if cp <= 1 {
            return Ok(());
        }
        if self.env.world % cp != 0
            || self.pp.is_some()
            || self.tp.is_some()
            || self.replicate.is_some()
        {
            return Err(Error::input(format!(
                "context parallelism over {cp} ranks needs a world size that cp divides ({}) \
                 and no pipeline, tensor parallelism or replicas",
                self.env.world
            )));
        }
        let iface = if is_loopback(&self.env.master_addr) {
            "127.0.0.1"
        } else {
            ""
        };
        let (group, rank) = (self.env.rank / cp, self.env.rank % cp);
        self.cp = Some(ProcessGroup::new(
            &self._store,
            &format!("cp{group}/"),
            rank as i64,
            cp as i64,
            timeout,
            Backend::Gloo,
            iface,
        )?);
        Ok(())
    }

    /// Every rank's `text`, in rank order, on every rank (for gathering reports; uncounted).
    pub fn all_gather_text(&self, text: &str) -> TResult<Vec<String>> {
        let _off = super::ffi::channel(super::ffi::Channel::Off);
        let len = Tensor::from_slice(&[text.len() as i64]);
        self.world.all_reduce_max(&len)?;
        let max = len.f_int64_value(&[0])?;
        let mut out = Vec::with_capacity(self.world.size() as usize);
        for r in 0..self.world.size() {
            let buf = if r == self.world.rank() {
                let mut bytes = text.as_bytes().to_vec();
                bytes.resize(max as usize, b' ');
                Tensor::from_slice(&bytes)
            } else {
                Tensor::f_zeros([max], (tch::Kind::Uint8, tch::Device::Cpu))?
            };
            self.world.broadcast(&buf, r)?;
            let bytes: Vec<u8> = Vec::<u8>::try_from(&buf)?;
            out.push(String::from_utf8_lossy(&bytes).trim_end().to_string());
        }
        Ok(out)
    }

    /// Pipeline stages (1 without pipelining).
    pub fn pp_size(&self) -> u64 {
        self.pp.as_ref().map_or(1, |g| g.size() as u64)
    }
    /// This rank's pipeline stage (0 without pipelining).
    pub fn stage(&self) -> u64 {
        self.pp.as_ref().map_or(0, |g| g.rank() as u64)
    }
    /// Tensor-parallel degree (1 without TP).
    pub fn tp_size(&self) -> u64 {
        self.tp.as_ref().map_or(1, |g| g.size() as u64)
    }
    /// This rank's index among the data-parallel ranks (which rows of the global batch it
    /// reads): its global rank without pipelining.
    pub fn dp_rank(&self) -> u64 {
        self.env.rank % self.dp_world()
    }
    pub fn dp_world(&self) -> u64 {
        self.env.world / self.pp_size()
    }

    /// In-place sum of a CPU tensor over every rank of the job.
    pub fn all_reduce_sum(&self, t: &Tensor) -> TResult<()> {
        self.world.all_reduce_sum(t)
    }
    /// Replicas per shard (1 without HSDP).
    pub fn replicas(&self) -> u64 {
        self.replicate.as_ref().map_or(1, |r| r.size() as u64)
    }
}

fn is_loopback(addr: &str) -> bool {
    let a = addr.trim();
    a == "localhost" || a == "::1" || a.starts_with("127.")
}

/// FSDP2's collectives over a rank's mesh (see the module doc for how they are issued).
pub struct C10d {
    pub mesh: std::rc::Rc<Mesh>,
}

impl Collectives for C10d {
    fn world_size(&self) -> i64 {
        self.mesh.shard.size()
    }
    fn rank(&self) -> i64 {
        self.mesh.shard.rank()
    }
    fn all_gather(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        _peer_input: &mut dyn FnMut(i64) -> TResult<Tensor>,
    ) -> TResult<()> {
        let pg = &self.mesh.shard;
        let n = input.numel() as i64;
        if let Backend::Nccl(_) = pg.backend() {
            // NCCL gathers in place when the input is this rank's slice, as FSDP2 passes it.
            return pg.all_gather_into(output, input);
        }
        let mine = output.f_narrow(0, pg.rank() * n, n)?;
        if mine.data_ptr() != input.data_ptr() {
            mine.shallow_clone().f_copy_(input)?;
        }
        for r in 0..pg.size() {
            pg.broadcast(&output.f_narrow(0, r * n, n)?, r)?;
        }
        Ok(())
    }
    fn reduce_scatter(
        &mut self,
        output: &Tensor,
        input: &Tensor,
        _peer_output: &mut dyn FnMut(i64, Tensor) -> TResult<()>,
    ) -> TResult<()> {
        let pg = &self.mesh.shard;
        let n = output.numel() as i64;
        let mut out = output.shallow_clone();
        if let Backend::Nccl(_) = pg.backend() {
            pg.reduce_scatter_into(output, input)?;
        } else {
            for r in 0..pg.size() {
                pg.all_reduce_sum(&input.f_narrow(0, r * n, n)?)?;
            }
            out.f_copy_(&input.f_narrow(0, pg.rank() * n, n)?)?;
        }
        let mut ranks = pg.size();
        if let Some(rep) = &self.mesh.replicate {
            rep.all_reduce_sum(output)?;
            ranks *= rep.size();
        }
        let _ = out.f_div_scalar_(ranks as f64)?;
        Ok(())
    }
}
