//! Safe wrappers over the C++ shim in `csrc/shim.cpp`: the counting CPU allocator, the
//! accelerator's allocator counters, and the autograd pieces tch does not expose.
//!
//! Every call is fallible: the shim catches C++ exceptions (out of memory included) and
//! returns their message, which becomes a [`ShimError`].

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

/// A C++ exception caught by the shim, or a failure reported by the trainer's callbacks.
#[derive(Debug, Clone)]
pub struct ShimError(pub String);

impl std::fmt::Display for ShimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Callback from an autograd node: `grad_in` is a new heap tensor the callee owns; the callee
/// may store a new heap tensor in `grad_out`. Returns 0 on success.
pub type Callback = unsafe extern "C" fn(
    user: *mut c_void,
    tag: i64,
    grad_in: *mut C_tensor,
    grad_out: *mut *mut C_tensor,
) -> c_int;

/// The body every [`Callback`] shares: takes the incoming gradient, runs `f` on it with panics
/// caught (a panic must not unwind into C++), and on success writes the gradient `f` returns,
/// if any, to `grad_out` and returns 0; on an error (or a panic, reported as one naming `what`)
/// hands the error to `keep` and returns 1, which the shim turns into a torch error.
///
/// # Safety
/// `grad_in` and `grad_out` as the shim passes them to a [`Callback`].
pub unsafe fn run_callback(
    grad_in: *mut C_tensor,
    grad_out: *mut *mut C_tensor,
    what: &str,
    f: impl FnOnce(Tensor) -> Result<Option<Tensor>, tch::TchError>,
    keep: impl FnOnce(tch::TchError),
) -> c_int {
    let grad = Tensor::from_ptr(grad_in);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(grad)));
    let err = match r {
        Ok(Ok(Some(mut t))) => {
            *grad_out = t.as_mut_ptr();
            std::mem::forget(t);
            return 0;
        }
        Ok(Ok(None)) => return 0,
        Ok(Err(e)) => e,
        Err(_) => tch::TchError::Torch(format!("panic in {what}")),
    };
    keep(err);
    1
}

extern "C" {
    fn mp_free_error(e: *mut c_char);
    fn mp_install_counting_allocator(err: *mut *mut c_char) -> c_int;
    fn mp_set_channel(ch: c_int);
    fn mp_set_device_limit(bytes: i64);
    fn mp_get_channel() -> c_int;
    fn mp_counter(ch: c_int, current: *mut i64, peak: *mut i64);
    fn mp_reset_peak(ch: c_int);
    fn mp_accel_count(n: *mut i64, err: *mut *mut c_char) -> c_int;
    fn mp_accel_stats(device: i64, out: *mut i64, err: *mut *mut c_char) -> c_int;
    fn mp_accel_reset_peak(device: i64, err: *mut *mut c_char) -> c_int;
    fn mp_accel_synchronize(device: i64, err: *mut *mut c_char) -> c_int;
    fn mp_accel_empty_cache(device: i64, err: *mut *mut c_char) -> c_int;
    fn mp_accel_mem_info(
        device: i64,
        free: *mut i64,
        total: *mut i64,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_backward(
        tensors: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        n: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_backward_owned(t: *mut C_tensor, g: *mut C_tensor, err: *mut *mut c_char) -> c_int;
    fn mp_boundary(
        x: *mut C_tensor,
        tag: i64,
        cb: Callback,
        user: *mut c_void,
        out: *mut *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_checkpoint_link(
        x: *mut C_tensor,
        y: *mut C_tensor,
        tag: i64,
        cb: Callback,
        user: *mut c_void,
        out: *mut *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_link3(
        a: *mut C_tensor,
        b: *mut C_tensor,
        c: *mut C_tensor,
        y: *mut C_tensor,
        tag: i64,
        cb: Callback3,
        user: *mut c_void,
        out: *mut *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_storage_resize(t: *mut C_tensor, nbytes: i64, err: *mut *mut c_char) -> c_int;
    fn mp_storage_nbytes(t: *mut C_tensor) -> i64;
    fn mp_copy_unversioned(dst: *mut C_tensor, src: *mut C_tensor, err: *mut *mut c_char) -> c_int;
    fn mp_take_grad(t: *mut C_tensor, out: *mut *mut C_tensor, err: *mut *mut c_char) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn mp_adamw_step(
        mode: c_int,
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        steps: *const *mut C_tensor,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mp_sgd_step(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        bufs: *const *mut C_tensor,
        n: c_int,
        lr: f64,
        momentum: f64,
        first: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
}

fn check(rc: c_int, err: *mut c_char) -> Result<(), ShimError> {
    if rc == 0 {
        return Ok(());
    }
    if err.is_null() {
        return Err(ShimError("libtorch call failed without a message".into()));
    }
    // SAFETY: the shim hands back a NUL-terminated string from malloc, freed here once.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { mp_free_error(err) };
    Err(ShimError(msg))
}

/// Runs a shim call that reports errors through an `err` out-parameter.
pub(crate) fn call(f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<(), ShimError> {
    let mut err: *mut c_char = std::ptr::null_mut();
    let rc = f(&mut err);
    check(rc, err)
}

fn ptr(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

/// Where CPU allocations are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Counted as device memory (CPU runs: what a GPU would hold).
    Device = 0,
    /// Counted as host memory (offloaded state; every CPU allocation of a CUDA run).
    Host = 1,
    /// Not counted: the emulated other ranks, setup scratch. Frees of these are not
    /// subtracted; frees of counted allocations always are.
    Off = 2,
}

/// Installs the counting CPU allocator (once per process; later calls check it is in place).
/// Tensors allocated before it was installed are never counted.
pub fn install_counting_allocator() -> Result<(), ShimError> {
    call(|e| unsafe { mp_install_counting_allocator(e) })
}

/// Sets the channel for CPU allocations from now on, returning the previous one.
pub fn set_channel(ch: Channel) -> Channel {
    let prev = unsafe { mp_get_channel() };
    unsafe { mp_set_channel(ch as c_int) };
    match prev {
        0 => Channel::Device,
        1 => Channel::Host,
        _ => Channel::Off,
    }
}

/// Caps the device channel at `bytes` live bytes (None: no cap) until the guard is dropped:
/// a CPU run standing for a GPU of that capacity fails beyond it with an out-of-memory
/// error, as the GPU would.
pub fn device_limit(bytes: Option<u64>) -> DeviceLimitGuard {
    let b = bytes.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
    unsafe { mp_set_device_limit(b) };
    DeviceLimitGuard
}

/// Lifts the device cap when dropped.
pub struct DeviceLimitGuard;

impl Drop for DeviceLimitGuard {
    fn drop(&mut self) {
        unsafe { mp_set_device_limit(-1) };
    }
}

/// Restores the previous channel when dropped.
pub struct ChannelGuard(Channel);

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        set_channel(self.0);
    }
}

/// Counts CPU allocations in `ch` until the guard is dropped.
pub fn channel(ch: Channel) -> ChannelGuard {
    ChannelGuard(set_channel(ch))
}

/// Live and peak bytes of one counting channel.
pub fn counter(ch: Channel) -> (u64, u64) {
    let (mut cur, mut peak) = (0i64, 0i64);
    unsafe { mp_counter(ch as c_int, &mut cur, &mut peak) };
    (cur.max(0) as u64, peak.max(0) as u64)
}

/// Sets a channel's peak to its current bytes.
pub fn reset_peak(ch: Channel) {
    unsafe { mp_reset_peak(ch as c_int) }
}

/// Number of accelerator devices libtorch sees (0 without one).
pub fn accelerator_count() -> Result<i64, ShimError> {
    let mut n = 0i64;
    call(|e| unsafe { mp_accel_count(&mut n, e) })?;
    Ok(n)
}

/// The caching allocator's counters for one device.
#[derive(Clone, Copy, Debug, Default)]
pub struct AccelStats {
    pub allocated: u64,
    pub allocated_peak: u64,
    pub reserved: u64,
    pub reserved_peak: u64,
    pub num_ooms: u64,
}

pub fn accelerator_stats(device: i64) -> Result<AccelStats, ShimError> {
    let mut out = [0i64; 5];
    call(|e| unsafe { mp_accel_stats(device, out.as_mut_ptr(), e) })?;
    let u = |v: i64| v.max(0) as u64;
    Ok(AccelStats {
        allocated: u(out[0]),
        allocated_peak: u(out[1]),
        reserved: u(out[2]),
        reserved_peak: u(out[3]),
        num_ooms: u(out[4]),
    })
}

pub fn accelerator_reset_peak(device: i64) -> Result<(), ShimError> {
    call(|e| unsafe { mp_accel_reset_peak(device, e) })
}

pub fn accelerator_synchronize(device: i64) -> Result<(), ShimError> {
    call(|e| unsafe { mp_accel_synchronize(device, e) })
}

/// Synchronizes, frees the cuBLAS workspaces and returns the caching allocator's unused
/// blocks to the driver.
pub fn accelerator_empty_cache(device: i64) -> Result<(), ShimError> {
    call(|e| unsafe { mp_accel_empty_cache(device, e) })
}

/// (free, total) device bytes as the driver reports them.
pub fn accelerator_mem_info(device: i64) -> Result<(u64, u64), ShimError> {
    let (mut free, mut total) = (0i64, 0i64);
    call(|e| unsafe { mp_accel_mem_info(device, &mut free, &mut total, e) })?;
    Ok((free.max(0) as u64, total.max(0) as u64))
}

/// `torch::autograd::backward(tensors, grads)`; a `None` grad is the implicit one of a scalar.
pub fn backward(tensors: &[&Tensor], grads: &[Option<&Tensor>]) -> Result<(), ShimError> {
    assert_eq!(tensors.len(), grads.len());
    let ts: Vec<_> = tensors.iter().map(|t| ptr(t)).collect();
    let gs: Vec<_> = grads
        .iter()
        .map(|g| g.map_or(std::ptr::null_mut(), ptr))
        .collect();
    call(|e| unsafe { mp_backward(ts.as_ptr(), gs.as_ptr(), ts.len() as c_int, e) })
}

/// `torch::autograd::backward([t], [grad])` that takes the gradient over: no reference to it
/// outlives `t`'s node's use of it (see csrc/shim.cpp `mp_backward_owned`).
pub fn backward_owned(t: &Tensor, mut grad: Tensor) -> Result<(), ShimError> {
    let g = grad.as_mut_ptr();
    std::mem::forget(grad);
    call(|e| unsafe { mp_backward_owned(ptr(t), g, e) })
}

/// An identity node whose backward calls `cb(user, tag, grad, _)`.
///
/// # Safety
/// `user` must stay valid, and `cb` callable with it, until the graph holding the returned
/// tensor has run its backward or been dropped.
pub unsafe fn boundary(
    x: &Tensor,
    tag: i64,
    cb: Callback,
    user: *mut c_void,
) -> Result<Tensor, ShimError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    call(|e| mp_boundary(ptr(x), tag, cb, user, &mut out, e))?;
    Ok(Tensor::from_ptr(out))
}

/// Returns `y` linked to `x`: backward calls `cb(user, tag, grad_y, &mut grad_x)`.
///
/// # Safety
/// As for [`boundary`].
pub unsafe fn checkpoint_link(
    x: &Tensor,
    y: &Tensor,
    tag: i64,
    cb: Callback,
    user: *mut c_void,
) -> Result<Tensor, ShimError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    call(|e| mp_checkpoint_link(ptr(x), ptr(y), tag, cb, user, &mut out, e))?;
    Ok(Tensor::from_ptr(out))
}

/// Callback from a three-input node ([`link3`]): `grad_in` as for [`Callback`]; the callee may
/// store a new heap tensor in each of the three `grads_out` slots. Returns 0 on success.
pub type Callback3 = unsafe extern "C" fn(
    user: *mut c_void,
    tag: i64,
    grad_in: *mut C_tensor,
    grads_out: *mut *mut C_tensor,
) -> c_int;

/// Returns `y` linked to `a`, `b` and `c`: backward calls `cb(user, tag, grad_y, grads)`, which
/// writes the gradients of `a`, `b` and `c` (context parallelism's ring attention).
///
/// # Safety
/// As for [`boundary`].
pub unsafe fn link3(
    inputs: [&Tensor; 3],
    y: &Tensor,
    tag: i64,
    cb: Callback3,
    user: *mut c_void,
) -> Result<Tensor, ShimError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let [a, b, c] = inputs;
    call(|e| mp_link3(ptr(a), ptr(b), ptr(c), ptr(y), tag, cb, user, &mut out, e))?;
    Ok(Tensor::from_ptr(out))
}

/// Gives `t`'s storage `nbytes` fresh bytes (0 frees it); the contents are undefined.
pub fn storage_resize(t: &Tensor, nbytes: u64) -> Result<(), ShimError> {
    call(|e| unsafe { mp_storage_resize(ptr(t), nbytes as i64, e) })
}

/// Bytes of `t`'s storage.
pub fn storage_nbytes(t: &Tensor) -> u64 {
    unsafe { mp_storage_nbytes(ptr(t)) }.max(0) as u64
}

/// `dst.copy_(src)` without autograd and without bumping version counters.
pub fn copy_unversioned(dst: &Tensor, src: &Tensor) -> Result<(), ShimError> {
    call(|e| unsafe { mp_copy_unversioned(ptr(dst), ptr(src), e) })
}

/// Takes `t.grad` (setting it to None).
pub fn take_grad(t: &Tensor) -> Result<Option<Tensor>, ShimError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    call(|e| unsafe { mp_take_grad(ptr(t), &mut out, e) })?;
    Ok((!out.is_null()).then(|| unsafe { Tensor::from_ptr(out) }))
}

/// Hyper-parameters of AdamW.
#[derive(Clone, Copy, Debug)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// How an optimizer step walks the parameters (torch.optim's three implementations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMode {
    /// One parameter at a time (`foreach=False`).
    Single = 0,
    /// `torch._foreach_*` over every parameter at once (`foreach=True`).
    Foreach = 1,
    /// `torch._fused_adamw_` (`fused=True`).
    Fused = 2,
}

/// One AdamW step over parallel lists, as torch.optim.AdamW runs it in `mode`. `steps` are
/// float32 scalar tensors, incremented here.
pub fn adamw_step(
    mode: StepMode,
    params: &[&Tensor],
    grads: &[&Tensor],
    exp_avgs: &[&Tensor],
    exp_avg_sqs: &[&Tensor],
    steps: &[&Tensor],
    h: AdamHyper,
) -> Result<(), ShimError> {
    let n = params.len();
    assert!(grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n && steps.len() == n);
    let v = |l: &[&Tensor]| l.iter().map(|t| ptr(t)).collect::<Vec<_>>();
    let (p, g, m, s2, st) = (v(params), v(grads), v(exp_avgs), v(exp_avg_sqs), v(steps));
    call(|e| unsafe {
        mp_adamw_step(
            mode as c_int,
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            s2.as_ptr(),
            st.as_ptr(),
            n as c_int,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            e,
        )
    })
}

/// One SGD step: with `bufs` (momentum buffers, already `grad.clone()` on the first step,
/// when `first` is true), `buf.mul_(momentum).add_(grad)` then `param.add_(buf, alpha=-lr)`.
pub fn sgd_step(
    params: &[&Tensor],
    grads: &[&Tensor],
    bufs: Option<&[&Tensor]>,
    lr: f64,
    momentum: f64,
    first: bool,
) -> Result<(), ShimError> {
    let n = params.len();
    let p: Vec<_> = params.iter().map(|t| ptr(t)).collect();
    let g: Vec<_> = grads.iter().map(|t| ptr(t)).collect();
    let b: Vec<_> = match bufs {
        Some(b) => b.iter().map(|t| ptr(t)).collect(),
        None => vec![std::ptr::null_mut(); n],
    };
    assert!(g.len() == n && b.len() == n);
    call(|e| unsafe {
        mp_sgd_step(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            n as c_int,
            lr,
            momentum,
            first as c_int,
            e,
        )
    })
}
