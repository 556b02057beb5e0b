// memplan trainer shim: the few libtorch entry points tch does not expose.
//
// - a counting CPU allocator (exact live and peak bytes of CPU tensors, in two channels:
//   "device" and "host", plus an "off" mode whose allocations are never counted);
// - an opt-in recorder of the device channel's allocations and frees, in order, each with a
//   number and the attribution tag the trainer set (src/trainer/recorder.rs reads it);
// - on CUDA builds, the caching allocator's own allocation history (torch::cuda's
//   _record_memory_history / _memory_snapshot_pickled), read back as the same events;
// - the accelerator's caching-allocator counters (at::accelerator);
// - autograd: backward with incoming gradients, identity nodes whose backward calls back into
//   Rust (FSDP2's pre-/post-backward hooks), a checkpoint link node, storage resize (FSDP2's
//   free/re-allocate of unsharded parameters) and copies that do not bump version counters;
// - torch's fused AdamW kernel.
//
// Every entry point is extern "C", catches C++ exceptions and returns 0 on success or -1 with
// a malloc'd message in *err (free it with mp_free_error).
//
// A tensor handle is tch's `*mut C_tensor`, which is a heap `at::Tensor*` (torch-sys
// libtch/torch_api.h: `typedef at::Tensor *tensor;`). Handles returned through `out`
// parameters are new heap tensors owned by the caller (tch frees them with `delete`).

#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/StorageImpl.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>
// The CUDA allocation history (torch::cuda::_record_memory_history, _memory_snapshot_pickled)
// lives in libtorch_cuda, so it is compiled only where build.rs links that: it defines
// MEMPLAN_NCCL when libtorch_cuda.so and CUDA's headers are there, and may define
// MEMPLAN_CUDA_TRACE when libtorch_cuda.so alone is (these headers need no CUDA header).
#if defined(MEMPLAN_NCCL) || defined(MEMPLAN_CUDA_TRACE)
#define MP_CUDA_HISTORY 1
#endif
#ifdef MP_CUDA_HISTORY
#include <torch/csrc/cuda/memory_snapshot.h>
#include <torch/csrc/jit/serialization/pickle.h>
// Declared in ATen/cuda/CUDAContextLight.h, which needs cuBLAS's headers; exported by
// libtorch_cuda.so.
namespace at::cuda {
void clearCublasWorkspaces();
}
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <unistd.h>

namespace {

char *dup_error(const std::string &s) {
  char *p = static_cast<char *>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

#define MP_TRY try {
#define MP_CATCH                                                   \
  }                                                                \
  catch (const std::exception &e) {                                \
    if (err) *err = dup_error(e.what());                           \
    return -1;                                                     \
  }                                                                \
  catch (...) {                                                    \
    if (err) *err = dup_error("unknown C++ exception in memplan shim"); \
    return -1;                                                     \
  }                                                                \
  return 0;

// ---------------------------------------------------------------------------------------------
// Counting CPU allocator.

constexpr int kChannels = 2;  // 0: device, 1: host; 2 (kOff) means "do not count"
constexpr int kOff = 2;

struct Counter {
  int64_t current = 0;
  int64_t peak = 0;
};

struct Live {
  size_t size;
  int channel;
  // The allocation's number: unique over the process, increasing (pointers are reused, so
  // they cannot name an allocation in a trace).
  int64_t id;
};

std::mutex g_mu;
std::unordered_map<void *, Live> g_live;
Counter g_counters[kChannels];
std::atomic<int> g_channel{kOff};
// Capacity of the device channel in bytes (-1: none): a CPU run can stand for a GPU of that
// size, failing allocations beyond it with an out-of-memory error as the GPU would.
std::atomic<int64_t> g_device_limit{-1};

// MEMPLAN_ALLOC_TRACE=N (bytes): print every counted device-channel allocation and free of at
// least N bytes, with the running total, to stderr. A debugging aid for calibrating the
// estimator (which tensor is alive at a peak); off unless set.
int64_t trace_threshold() {
  static const int64_t t = [] {
    const char *v = std::getenv("MEMPLAN_ALLOC_TRACE");
    return v ? std::atoll(v) : int64_t{-1};
  }();
  return t;
}

void counted_delete(void *ptr);

// The event recorder (mp_trace_*): while on, every counted device-channel allocation, and every
// free of one allocated since the recording began, is appended to g_trace, under g_mu like
// the counters, so the events are in exactly the order the counter moved. g_tag is the
// trainer's attribution context at the moment of the allocation; reading it is one relaxed
// load, and with recording off nothing is appended (one relaxed load of g_recording).
struct TraceEvent {
  int64_t op;  // 0: alloc, 1: free
  int64_t id;
  int64_t bytes;
  int64_t tag;  // alloc: g_tag then; free: 0
};
std::atomic<bool> g_recording{false};
std::atomic<int64_t> g_tag{0};
int64_t g_next_id = 1;                 // under g_mu
int64_t g_trace_first_id = INT64_MAX;  // under g_mu: the first id of the recording
std::vector<TraceEvent> g_trace;       // under g_mu

// Threads whose allocations are never counted: the communication library's own (the c10d
// store's and Gloo's worker and transport threads, registered by dist.cpp when it creates
// them). Their allocations are the library's, not training state, and a GPU rank's NCCL
// would not make them through the caching allocator; counted, they would land in whatever
// channel the training thread had set at that moment. A thread caches its verdict until the
// set changes (the generation).
constexpr int kMaxUncounted = 256;
std::atomic<int64_t> g_uncounted[kMaxUncounted];
std::atomic<int> g_n_uncounted{0};
std::atomic<int> g_uncounted_gen{0};

bool thread_uncounted() {
  thread_local int64_t tid = static_cast<int64_t>(::gettid());
  thread_local int gen = -1;
  thread_local bool verdict = false;
  int now = g_uncounted_gen.load(std::memory_order_acquire);
  if (gen != now) {
    verdict = false;
    int n = g_n_uncounted.load(std::memory_order_acquire);
    for (int i = 0; i < n && i < kMaxUncounted; ++i)
      if (g_uncounted[i].load(std::memory_order_relaxed) == tid) verdict = true;
    gen = now;
  }
  return verdict;
}

struct CountingAllocator final : public c10::Allocator {
  c10::Allocator *inner = nullptr;

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr d = inner->allocate(n);
    void *data = d.get();
    // The default CPU allocator's context is its data pointer; take ownership of the raw
    // pointer and hand back a DataPtr whose context is the data (raw_allocate asserts it).
    void *ctx = d.release_context();
    if (data == nullptr) {
      if (ctx != nullptr) inner->raw_deleter()(ctx);
      return c10::DataPtr(nullptr, nullptr, &counted_delete, c10::Device(c10::DeviceType::CPU));
    }
    int ch = g_channel.load(std::memory_order_relaxed);
    if (ch < kChannels && !thread_uncounted()) {
      std::unique_lock<std::mutex> lock(g_mu);
      int64_t limit = g_device_limit.load(std::memory_order_relaxed);
      if (ch == 0 && limit >= 0 && g_counters[0].current + static_cast<int64_t>(n) > limit) {
        int64_t current = g_counters[0].current;
        lock.unlock();
        inner->raw_deleter()(ctx);
        TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU device emulation out of memory: tried to allocate ",
                         n, " bytes with ", current, " of ", limit, " bytes in use");
      }
      int64_t id = g_next_id++;
      g_live[data] = Live{n, ch, id};
      if (ch == 0 && g_recording.load(std::memory_order_relaxed))
        g_trace.push_back(TraceEvent{0, id, static_cast<int64_t>(n),
                                     g_tag.load(std::memory_order_relaxed)});
      Counter &c = g_counters[ch];
      c.current += static_cast<int64_t>(n);
      if (c.current > c.peak) c.peak = c.current;
      int64_t t = trace_threshold();
      if (ch == 0 && t >= 0 && static_cast<int64_t>(n) >= t)
        std::fprintf(stderr, "alloc + %zu = %lld\n", n, static_cast<long long>(c.current));
    }
    return c10::DataPtr(data, data, &counted_delete, c10::Device(c10::DeviceType::CPU));
  }

  c10::DeleterFnPtr raw_deleter() const override { return &counted_delete; }

  void copy_data(void *dest, const void *src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CountingAllocator g_allocator;
std::once_flag g_install_once;

void counted_delete(void *ptr) {
  if (ptr == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_live.find(ptr);
    if (it != g_live.end()) {
      g_counters[it->second.channel].current -= static_cast<int64_t>(it->second.size);
      if (it->second.channel == 0 && g_recording.load(std::memory_order_relaxed) &&
          it->second.id >= g_trace_first_id)
        g_trace.push_back(
            TraceEvent{1, it->second.id, static_cast<int64_t>(it->second.size), 0});
      int64_t t = trace_threshold();
      if (it->second.channel == 0 && t >= 0 && static_cast<int64_t>(it->second.size) >= t)
        std::fprintf(stderr, "alloc - %zu = %lld\n", it->second.size,
                     static_cast<long long>(g_counters[0].current));
      g_live.erase(it);
    }
  }
  g_allocator.inner->raw_deleter()(ptr);
}

// ---------------------------------------------------------------------------------------------
// Autograd nodes.

using mp_callback = int (*)(void *ctx, int64_t tag, at::Tensor *grad_in,
                            at::Tensor **grad_out);

// Identity in forward; its backward calls back into Rust with the incoming gradient, then
// passes the gradient on unchanged. Placed on a block's input it runs after the block's whole
// backward (FSDP2's RegisterPostBackwardFunction); on a block's output, before it (FSDP2's
// pre-backward hook).
struct Boundary : public torch::autograd::Function<Boundary> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, at::Tensor x,
                               int64_t tag, int64_t cb, int64_t user) {
    ctx->saved_data["tag"] = tag;
    ctx->saved_data["cb"] = cb;
    ctx->saved_data["user"] = user;
    return x;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    auto cb = reinterpret_cast<mp_callback>(ctx->saved_data["cb"].toInt());
    auto user = reinterpret_cast<void *>(ctx->saved_data["user"].toInt());
    auto tag = ctx->saved_data["tag"].toInt();
    auto *g = new at::Tensor(grads[0]);
    at::Tensor *unused = nullptr;
    int rc = cb(user, tag, g, &unused);  // the callback takes ownership of g
    if (unused) delete unused;
    if (rc != 0) throw std::runtime_error("memplan: backward hook failed (see the trainer's error)");
    return {grads[0], at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Links a block output computed without autograd (y) to the block input (x): forward returns
// y; backward calls Rust, which recomputes the block from x with autograd, runs its backward
// with the incoming gradient and returns the gradient for x. This is reentrant activation
// checkpointing (torch.utils.checkpoint with use_reentrant=True).
struct CheckpointLink : public torch::autograd::Function<CheckpointLink> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, at::Tensor x,
                               at::Tensor y, int64_t tag, int64_t cb, int64_t user) {
    ctx->saved_data["tag"] = tag;
    ctx->saved_data["cb"] = cb;
    ctx->saved_data["user"] = user;
    return y;
  }
  // `grads` by reference: it is the node's own list (CppNode_apply_functional's
  // backward_inputs), which would otherwise hold the gradient until the callback returns.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list &grads) {
    auto cb = reinterpret_cast<mp_callback>(ctx->saved_data["cb"].toInt());
    auto user = reinterpret_cast<void *>(ctx->saved_data["user"].toInt());
    auto tag = ctx->saved_data["tag"].toInt();
    auto *g = new at::Tensor(grads[0]);
    grads.clear();  // the callback holds the only reference to the incoming gradient
    at::Tensor *gx = nullptr;
    int rc = cb(user, tag, g, &gx);
    at::Tensor grad_x;
    if (gx) {
      grad_x = *gx;
      delete gx;
    }
    if (rc != 0) throw std::runtime_error("memplan: checkpoint recompute failed (see the trainer's error)");
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Links an output computed without autograd (y) to three inputs (context parallelism's ring
// attention: y from q, k and v): forward returns y; backward calls Rust with the incoming
// gradient, which returns one gradient per input (an undefined one where a pointer stays null).
using mp_callback3 = int (*)(void *ctx, int64_t tag, at::Tensor *grad_in,
                             at::Tensor **grads_out);

struct Link3 : public torch::autograd::Function<Link3> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, at::Tensor a, at::Tensor b,
                               at::Tensor c, at::Tensor y, int64_t tag, int64_t cb,
                               int64_t user) {
    ctx->saved_data["tag"] = tag;
    ctx->saved_data["cb"] = cb;
    ctx->saved_data["user"] = user;
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    auto cb = reinterpret_cast<mp_callback3>(ctx->saved_data["cb"].toInt());
    auto user = reinterpret_cast<void *>(ctx->saved_data["user"].toInt());
    auto tag = ctx->saved_data["tag"].toInt();
    // `grads` is a copy: the node's own list (CppNode_apply_functional's backward_inputs)
    // keeps the incoming gradient until the callback returns, as torch's autograd keeps an
    // op's incoming gradient through its backward (measured: ring attention's backward under
    // CP equals torch's to the byte so).
    auto *g = new at::Tensor(grads[0]);
    grads.clear();
    at::Tensor *out[3] = {nullptr, nullptr, nullptr};
    int rc = cb(user, tag, g, out);
    torch::autograd::variable_list result(7);
    for (int i = 0; i < 3; ++i) {
      if (out[i]) {
        result[i] = *out[i];
        delete out[i];
      }
    }
    if (rc != 0) throw std::runtime_error("memplan: ring attention backward failed (see the trainer's error)");
    return result;
  }
};

}  // namespace

extern "C" {

void mp_free_error(char *e) { std::free(e); }

// Marks thread `tid` (a Linux thread id) as one whose allocations are never counted.
void mp_uncount_thread(int64_t tid) {
  int i = g_n_uncounted.load();
  if (i >= kMaxUncounted) return;
  g_uncounted[i].store(tid);
  g_n_uncounted.store(i + 1, std::memory_order_release);
  g_uncounted_gen.fetch_add(1, std::memory_order_acq_rel);
}

// ---- counting allocator ----

int mp_install_counting_allocator(char **err) {
  MP_TRY
  std::call_once(g_install_once, [] {
    g_allocator.inner = c10::GetDefaultCPUAllocator();
    c10::SetCPUAllocator(&g_allocator, /*priority=*/100);
  });
  if (c10::GetCPUAllocator() != &g_allocator)
    throw std::runtime_error("another CPU allocator with a higher priority is installed");
  MP_CATCH
}

// 0: count CPU allocations as device memory, 1: as host memory, 2: do not count.
void mp_set_device_limit(int64_t bytes) { g_device_limit.store(bytes < 0 ? -1 : bytes); }

void mp_set_channel(int ch) { g_channel.store(ch < 0 || ch > kOff ? kOff : ch); }
int mp_get_channel() { return g_channel.load(); }

void mp_counter(int ch, int64_t *current, int64_t *peak) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (ch < 0 || ch >= kChannels) {
    *current = 0;
    *peak = 0;
    return;
  }
  *current = g_counters[ch].current;
  *peak = g_counters[ch].peak;
}

void mp_reset_peak(int ch) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (ch >= 0 && ch < kChannels) g_counters[ch].peak = g_counters[ch].current;
}

// ---- allocation event recorder (device channel) ----

// Starts recording device-channel events from now on, dropping any recorded before. Frees of
// tensors allocated before this call are not recorded (they are not part of the recording).
void mp_trace_start() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_trace.clear();
  g_trace_first_id = g_next_id;
  g_recording.store(true, std::memory_order_relaxed);
}

// Stops recording; events not yet taken stay until taken or the next start.
void mp_trace_stop() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_recording.store(false, std::memory_order_relaxed);
}

// Events recorded and not yet taken.
int64_t mp_trace_pending() {
  std::lock_guard<std::mutex> lock(g_mu);
  return static_cast<int64_t>(g_trace.size());
}

// Moves up to `cap` of the oldest events out, as (op, id, bytes, tag) quadruples of int64 in
// `out` (4 x cap values); returns how many.
int64_t mp_trace_take(int64_t *out, int64_t cap) {
  std::lock_guard<std::mutex> lock(g_mu);
  size_t n = std::min(g_trace.size(), static_cast<size_t>(cap < 0 ? 0 : cap));
  for (size_t i = 0; i < n; ++i) {
    const TraceEvent &e = g_trace[i];
    out[4 * i] = e.op;
    out[4 * i + 1] = e.id;
    out[4 * i + 2] = e.bytes;
    out[4 * i + 3] = e.tag;
  }
  g_trace.erase(g_trace.begin(), g_trace.begin() + static_cast<std::ptrdiff_t>(n));
  return static_cast<int64_t>(n);
}

// The attribution tag of allocations from now on (opaque here; see recorder.rs).
void mp_trace_set_tag(int64_t tag) { g_tag.store(tag, std::memory_order_relaxed); }
int64_t mp_trace_get_tag() { return g_tag.load(std::memory_order_relaxed); }

// The number of the counted device-channel allocation that holds `t`'s storage, or -1 (not
// counted, another channel, no storage).
int64_t mp_trace_storage_id(at::Tensor *t) {
  try {
    if (!t->defined() || !t->has_storage()) return -1;
    void *data = const_cast<void *>(t->storage().data());
    if (data == nullptr) return -1;
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_live.find(data);
    if (it == g_live.end() || it->second.channel != 0) return -1;
    return it->second.id;
  } catch (...) {
    return -1;
  }
}

void mp_free_buffer(void *p) { std::free(p); }

// ---- CUDA allocation history ----
//
// The caching allocator records every allocation and free when its history is on
// (torch.cuda.memory._record_memory_history(max_entries=N) in Python); a snapshot hands it
// back with the address, requested size and stream of each. Entries are read here as
// (op, address, bytes, stream) quadruples: op 0 for "alloc", 1 for "free_requested" (when the
// allocator's allocated counters drop; "free_completed", which can come later for a block
// used on another stream, and segment events are skipped). Without a CUDA build these report
// that they are unavailable.

// 1 when this build can record CUDA allocation history.
int mp_cuda_trace_available() {
#ifdef MP_CUDA_HISTORY
  return 1;
#else
  return 0;
#endif
}

// Turns the history on (clearing it), keeping at most `max_entries` entries, without stack
// traces.
int mp_cuda_trace_start(int64_t max_entries, char **err) {
  MP_TRY
#ifdef MP_CUDA_HISTORY
  torch::cuda::_record_memory_history(std::optional<std::string>("all"),
                                      std::optional<std::string>(), "python",
                                      static_cast<size_t>(max_entries < 1 ? 1 : max_entries),
                                      /*clearHistory=*/true);
#else
  throw std::runtime_error("this memplan was built without CUDA: no allocation history");
#endif
  MP_CATCH
}

// Turns the history off (which clears it).
int mp_cuda_trace_stop(char **err) {
  MP_TRY
#ifdef MP_CUDA_HISTORY
  torch::cuda::_record_memory_history(std::optional<std::string>(),
                                      std::optional<std::string>(), "python");
#else
  throw std::runtime_error("this memplan was built without CUDA: no allocation history");
#endif
  MP_CATCH
}

// The history of `device`'s allocator so far: *out (malloc'd, free with mp_free_buffer) gets
// *n quadruples (op, address, bytes, stream) in order.
int mp_cuda_trace_take(int64_t device, int64_t **out, int64_t *n, char **err) {
  MP_TRY
  *out = nullptr;
  *n = 0;
#ifdef MP_CUDA_HISTORY
  std::string pickled = torch::cuda::_memory_snapshot_pickled();
  c10::IValue v = torch::jit::unpickle(pickled.data(), pickled.size());
  auto snapshot = v.toGenericDict();
  auto traces = snapshot.at(c10::IValue("device_traces")).toList();
  if (device < 0 || static_cast<size_t>(device) >= traces.size()) return 0;
  auto trace = traces.get(static_cast<size_t>(device)).toList();
  std::vector<int64_t> buf;
  buf.reserve(4 * trace.size());
  const c10::IValue action_k("action"), addr_k("addr"), size_k("size"), stream_k("stream");
  for (size_t i = 0; i < trace.size(); ++i) {
    auto e = trace.get(i).toGenericDict();
    const std::string &action = e.at(action_k).toStringRef();
    int64_t op;
    if (action == "alloc")
      op = 0;
    else if (action == "free_requested")
      op = 1;
    else
      continue;
    buf.push_back(op);
    buf.push_back(e.at(addr_k).toInt());
    buf.push_back(e.at(size_k).toInt());
    buf.push_back(e.contains(stream_k) ? e.at(stream_k).toInt() : 0);
  }
  auto *p = static_cast<int64_t *>(std::malloc(sizeof(int64_t) * (buf.empty() ? 1 : buf.size())));
  if (p == nullptr) throw std::runtime_error("out of host memory copying the CUDA history");
  if (!buf.empty()) std::memcpy(p, buf.data(), sizeof(int64_t) * buf.size());
  *out = p;
  *n = static_cast<int64_t>(buf.size() / 4);
#else
  (void)device;
  throw std::runtime_error("this memplan was built without CUDA: no allocation history");
#endif
  MP_CATCH
}

// The caching allocator answers "Invalid device argument" until the device's hooks have run:
// CUDA initialises lazily, on the first CUDA tensor (or on recordHistory). Seen on an H200
// with torch 2.11.0+cu130 when a run read the counters before making any tensor; so every
// accelerator call below initialises the device first (a call_once, cheap after the first).
static void mp_accel_init() {
  if (auto acc = at::accelerator::getAccelerator(false))
    at::globalContext().lazyInitDevice(*acc);
}

// Allocations and frees the caching allocator of `device` has made since the process began
// (its cumulative allocation counters): where a CUDA history entry falls relative to a moment.
int mp_accel_alloc_calls(int64_t device, int64_t *calls, char **err) {
  MP_TRY
  mp_accel_init();
  auto s = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  *calls = s.allocation[agg].allocated + s.allocation[agg].freed;
  MP_CATCH
}

// ---- accelerator ----

int mp_accel_count(int64_t *n, char **err) {
  MP_TRY
  *n = 0;
  if (at::accelerator::getAccelerator(false).has_value())
    *n = static_cast<int64_t>(at::accelerator::deviceCount());
  MP_CATCH
}

// out: allocated current, allocated peak, reserved current, reserved peak, num_ooms.
int mp_accel_stats(int64_t device, int64_t *out, char **err) {
  MP_TRY
  mp_accel_init();
  auto s = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  out[0] = s.allocated_bytes[agg].current;
  out[1] = s.allocated_bytes[agg].peak;
  out[2] = s.reserved_bytes[agg].current;
  out[3] = s.reserved_bytes[agg].peak;
  out[4] = s.num_ooms;
  MP_CATCH
}

int mp_accel_reset_peak(int64_t device, char **err) {
  MP_TRY
  mp_accel_init();
  at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  MP_CATCH
}

// Starts a CUDA run as a fresh process would: frees the cuBLAS workspaces an earlier run
// left (one per cuBLAS handle and stream: 32 MiB each on sm90, two per training step since
// the autograd engine runs backward on its own thread with its own handle; seen on an H200,
// where the first of 14 validate plans counted them and the 13 after it did not), then
// returns the caching allocator's unused cached blocks to the driver, so that a run's peak
// reserved starts from what is live, not from an earlier run in the same process.
int mp_accel_empty_cache(int64_t device, char **err) {
  MP_TRY
  mp_accel_init();
  at::accelerator::synchronizeDevice(static_cast<c10::DeviceIndex>(device));
#ifdef MP_CUDA_HISTORY
  at::cuda::clearCublasWorkspaces();
#endif
  at::accelerator::emptyCache();
  MP_CATCH
}

int mp_accel_synchronize(int64_t device, char **err) {
  MP_TRY
  mp_accel_init();
  at::accelerator::synchronizeDevice(static_cast<c10::DeviceIndex>(device));
  MP_CATCH
}

int mp_accel_mem_info(int64_t device, int64_t *free_bytes, int64_t *total_bytes, char **err) {
  MP_TRY
  mp_accel_init();
  auto p = at::accelerator::getMemoryInfo(static_cast<c10::DeviceIndex>(device));
  *free_bytes = static_cast<int64_t>(p.first);
  *total_bytes = static_cast<int64_t>(p.second);
  MP_CATCH
}

// ---- autograd ----

// torch::autograd::backward(tensors, grad_tensors): grads may hold null entries (implicit
// ones for scalars).
int mp_backward(at::Tensor **tensors, at::Tensor **grads, int n, char **err) {
  MP_TRY
  torch::autograd::variable_list ts, gs;
  for (int i = 0; i < n; ++i) {
    ts.push_back(*tensors[i]);
    gs.push_back(grads[i] ? *grads[i] : at::Tensor());
  }
  torch::autograd::backward(ts, gs, /*retain_graph=*/false, /*create_graph=*/false);
  MP_CATCH
}

// Backward from `t` with the gradient `g`, which the call takes over (it deletes `g`): the
// gradient's last outside reference goes when `t`'s node takes it, so that it is freed once the
// graph is done with it, as in a backward that reaches the node from its own graph (torch's
// non-reentrant checkpoint), not held by the caller to the end (torch::autograd::backward).
namespace {
struct DropOnCall : public torch::autograd::FunctionPreHook {
  std::shared_ptr<torch::autograd::variable_list> held;
  explicit DropOnCall(std::shared_ptr<torch::autograd::variable_list> h) : held(std::move(h)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list &grads) override {
    for (auto &t : *held) t = at::Tensor();
    return grads;
  }
};
}  // namespace

int mp_backward_owned(at::Tensor *t, at::Tensor *g, char **err) {
  auto held = std::make_shared<torch::autograd::variable_list>();
  held->push_back(std::move(*g));
  delete g;
  MP_TRY
  auto edge = torch::autograd::impl::gradient_edge(*t);
  if (!edge.function) throw std::runtime_error("backward from a tensor without a grad_fn");
  edge.function->add_pre_hook(std::make_unique<DropOnCall>(held));
  torch::autograd::Engine::get_default_engine().execute({edge}, *held, /*keep_graph=*/false,
                                                        /*create_graph=*/false,
                                                        /*accumulate_grad=*/true);
  MP_CATCH
}

int mp_boundary(at::Tensor *x, int64_t tag, mp_callback cb, void *user, at::Tensor **out,
                char **err) {
  MP_TRY
  auto y = Boundary::apply(*x, tag, reinterpret_cast<int64_t>(cb),
                           reinterpret_cast<int64_t>(user));
  *out = new at::Tensor(y);
  MP_CATCH
}

int mp_checkpoint_link(at::Tensor *x, at::Tensor *y, int64_t tag, mp_callback cb,
                       void *user, at::Tensor **out, char **err) {
  MP_TRY
  auto z = CheckpointLink::apply(*x, *y, tag, reinterpret_cast<int64_t>(cb),
                                 reinterpret_cast<int64_t>(user));
  *out = new at::Tensor(z);
  MP_CATCH
}

int mp_link3(at::Tensor *a, at::Tensor *b, at::Tensor *c, at::Tensor *y, int64_t tag,
             mp_callback3 cb, void *user, at::Tensor **out, char **err) {
  MP_TRY
  auto z = Link3::apply(*a, *b, *c, *y, tag, reinterpret_cast<int64_t>(cb),
                        reinterpret_cast<int64_t>(user));
  *out = new at::Tensor(z);
  MP_CATCH
}

// Gives the tensor's storage `nbytes` bytes from the storage's own allocator (0 frees it),
// without copying, as FSDP2 does with `untyped_storage().resize_()` on unsharded parameters.
// Every tensor sharing the storage (views, autograd's saved references) sees the change.
int mp_storage_resize(at::Tensor *t, int64_t nbytes, char **err) {
  MP_TRY
  c10::StorageImpl *s = t->storage().unsafeGetStorageImpl();
  if (!s->resizable()) throw std::runtime_error("storage is not resizable");
  auto n = static_cast<size_t>(nbytes);
  if (s->nbytes() == n) return 0;
  c10::DataPtr d;
  if (n > 0) {
    c10::DeviceGuard guard(t->device());
    d = s->allocator()->allocate(n);
  } else {
    d = c10::DataPtr(nullptr, t->device());
  }
  s->set_data_ptr_noswap(std::move(d));
  s->set_nbytes(n);
  MP_CATCH
}

int64_t mp_storage_nbytes(at::Tensor *t) {
  try {
    return static_cast<int64_t>(t->storage().nbytes());
  } catch (...) {
    return -1;
  }
}

// dst.copy_(src) below autograd and without bumping version counters (FSDP2's
// `_unsafe_preserve_version_counter` around the all-gather copy-out).
int mp_copy_unversioned(at::Tensor *dst, at::Tensor *src, char **err) {
  MP_TRY
  at::AutoDispatchBelowADInplaceOrView guard;
  dst->copy_(*src);
  MP_CATCH
}

// Takes a leaf's .grad out (null if none) and sets .grad to None.
int mp_take_grad(at::Tensor *t, at::Tensor **out, char **err) {
  MP_TRY
  *out = nullptr;
  at::Tensor g = t->grad();
  if (g.defined()) *out = new at::Tensor(g);
  t->mutable_grad() = at::Tensor();
  MP_CATCH
}

// AdamW as torch.optim.AdamW runs it (torch/optim/adam.py, decoupled weight decay), over n
// parameters. mode 0: single-tensor (foreach=False): one parameter at a time, whose
// `denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)` makes two parameter-sized temporaries
// for a moment; mode 1: foreach (the CUDA default): `_foreach_sqrt` over every parameter at
// once, one temporary as large as all of them; mode 2: fused (`_fused_adamw_`), none.
// `steps` are float32 scalar tensors, incremented here as torch.optim does.
int mp_adamw_step(int mode, at::Tensor **params, at::Tensor **grads,
                  at::Tensor **exp_avgs, at::Tensor **exp_avg_sqs, at::Tensor **steps,
                  int n, double lr, double beta1, double beta2, double weight_decay, double eps,
                  char **err) {
  MP_TRY
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> p, g, m, v, s;
  for (int i = 0; i < n; ++i) {
    p.push_back(*params[i]);
    g.push_back(*grads[i]);
    m.push_back(*exp_avgs[i]);
    v.push_back(*exp_avg_sqs[i]);
    s.push_back(*steps[i]);
  }
  if (n == 0) return 0;
  if (mode == 2) {
    at::_foreach_add_(s, 1);
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps, false, false);
  } else if (mode == 1) {
    at::_foreach_add_(s, 1);
    if (weight_decay != 0) at::_foreach_mul_(p, 1 - lr * weight_decay);
    at::_foreach_lerp_(m, g, 1 - beta1);
    at::_foreach_mul_(v, beta2);
    at::_foreach_addcmul_(v, g, g, 1 - beta2);
    std::vector<c10::Scalar> step_size, bc2_sqrt;
    for (int i = 0; i < n; ++i) {
      double step = s[i].item<double>();
      double bc1 = 1 - std::pow(beta1, step);
      double bc2 = 1 - std::pow(beta2, step);
      step_size.push_back(-(lr / bc1));
      bc2_sqrt.push_back(std::sqrt(bc2));
    }
    {
      auto sq = at::_foreach_sqrt(v);
      at::_foreach_div_(sq, bc2_sqrt);
      at::_foreach_add_(sq, eps);
      at::_foreach_addcdiv_(p, m, sq, step_size);
    }
  } else {
    for (int i = 0; i < n; ++i) {
      s[i].add_(1);
      if (weight_decay != 0) p[i].mul_(1 - lr * weight_decay);
      m[i].lerp_(g[i], 1 - beta1);
      v[i].mul_(beta2).addcmul_(g[i], g[i], 1 - beta2);
      double step = s[i].item<double>();
      double bc1 = 1 - std::pow(beta1, step);
      double bc2 = 1 - std::pow(beta2, step);
      double step_size = lr / bc1;
      double bc2_sqrt = std::sqrt(bc2);
      auto denom = (v[i].sqrt() / bc2_sqrt).add_(eps);
      p[i].addcdiv_(m[i], denom, -step_size);
    }
  }
  MP_CATCH
}

// SGD as torch.optim.SGD runs it (dampening 0, no weight decay, no Nesterov): with momentum,
// `buf.mul_(momentum).add_(grad)` then `param.add_(buf, alpha=-lr)`; without, `param.add_(grad,
// alpha=-lr)`. bufs[i] null means no momentum. The first step's `buf = grad.clone()` is done
// by the caller.
int mp_sgd_step(at::Tensor **params, at::Tensor **grads, at::Tensor **bufs, int n,
                double lr, double momentum, int first, char **err) {
  MP_TRY
  at::NoGradGuard no_grad;
  for (int i = 0; i < n; ++i) {
    at::Tensor d = *grads[i];
    if (bufs[i]) {
      if (!first) bufs[i]->mul_(momentum).add_(d);
      d = *bufs[i];
    }
    params[i]->add_(d, -lr);
  }
  MP_CATCH
}

}  // extern "C"
