// memplan trainer shim, distributed part: libtorch's own c10d, without Python.
//
// - a c10d::TCPStore (rank 0 hosts it) and c10d::PrefixStore views of it, one per process
//   group, as torch.distributed.init_process_group and new_group build them;
// - c10d::ProcessGroupGloo over a store: the CPU backend;
// - the collectives the trainer needs, each waited for: all_reduce (sum, max), broadcast,
//   barrier, send, recv (blocking, and isend / irecv returning a Work), and the library's own all_gather_into_tensor / reduce_scatter_tensor
//   (`_allgather_base`, `_reduce_scatter_base`).
//
// ProcessGroupGloo.hpp includes gloo's headers, which the torch wheel does not ship: they are
// vendored in csrc/third_party/gloo at the commit torch 2.11.0 was built with (see the README
// there), and build.rs defines USE_C10D_GLOO, without which the header declares nothing.
//
// Handles are heap c10::intrusive_ptr's owned by the caller (free them with mp_store_free and
// mp_pg_free). Every entry point catches C++ exceptions and returns 0, or -1 with a malloc'd
// message in *err (free it with mp_free_error, defined in shim.cpp).

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef MEMPLAN_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <dirent.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

extern "C" void mp_uncount_thread(int64_t tid);

namespace {

char *dist_error(const std::string &s) {
  char *p = static_cast<char *>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

#define DIST_TRY try {
#define DIST_CATCH                                                         \
  }                                                                        \
  catch (const std::exception &e) {                                        \
    if (err) *err = dist_error(e.what());                                  \
    return -1;                                                             \
  }                                                                        \
  catch (...) {                                                            \
    if (err) *err = dist_error("unknown C++ exception in memplan c10d shim"); \
    return -1;                                                             \
  }                                                                        \
  return 0;

// This process's thread ids (Linux: /proc/self/task).
std::vector<int64_t> task_ids() {
  std::vector<int64_t> ids;
  if (DIR *d = opendir("/proc/self/task")) {
    while (dirent *e = readdir(d)) {
      if (e->d_name[0] != '.') ids.push_back(std::atoll(e->d_name));
    }
    closedir(d);
  }
  return ids;
}

// Runs `make`, then marks every thread it started as uncounted (see shim.cpp): the store's
// and Gloo's threads allocate for the library, not for training.
template <class F>
void uncounted_threads_of(F make) {
  std::vector<int64_t> before = task_ids();
  make();
  for (int64_t t : task_ids()) {
    if (std::find(before.begin(), before.end(), t) == before.end()) mp_uncount_thread(t);
  }
}

using StorePtr = c10::intrusive_ptr<c10d::Store>;
// Every group is held as its c10d::Backend, Gloo's or NCCL's.
using BackendPtr = c10::intrusive_ptr<c10d::Backend>;

BackendPtr &pg_of(void *h) { return *static_cast<BackendPtr *>(h); }

// Waits for a collective of `pg`. Throws with the backend's message (a peer gone, a timeout)
// when it failed.
//
// Gloo: the worker thread that ran the collective still holds the work, and through it the
// tensors, for a moment after wait() returns; were it the last to let go, a buffer the
// trainer frees right after (FSDP2's flat all-gather output) would be freed later, on that
// thread, and a rank's counted peak would depend on thread timing (seen: one block's
// all-gather buffer, 1.5 MB, on one rank in one run). So wait until this reference is the only
// one: the tensors are then released here, in program order. (NCCL's watchdog keeps its works
// for a while by design; there the caching allocator's stream semantics apply, as in PyTorch.)
void wait(const c10::intrusive_ptr<c10d::Backend> &pg, c10::intrusive_ptr<c10d::Work> work) {
  work->wait();
  if (pg->getBackendName() != "gloo") return;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (work.use_count() > 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
}

}  // namespace

extern "C" {

// A TCPStore at host:port; rank 0 (is_server) hosts it and waits for `world` clients.
int mp_store_new(const char *host, int port, int is_server, int world, int64_t timeout_ms,
                 void **out, char **err) {
  DIST_TRY
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(port);
  opts.isServer = is_server != 0;
  opts.numWorkers = world;
  opts.waitWorkers = true;
  opts.timeout = std::chrono::milliseconds(timeout_ms);
  StorePtr store;
  uncounted_threads_of(
      [&] { store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts); });
  *out = new StorePtr(std::move(store));
  DIST_CATCH
}

void mp_store_free(void *store) { delete static_cast<StorePtr *>(store); }

// A Gloo process group of `size` ranks over a prefixed view of `store`. `iface_host`: the
// address Gloo binds to ("" for the machine's hostname, as torch's default device does).
int mp_pg_new(void *store, const char *prefix, int rank, int size, int64_t timeout_ms,
              const char *iface_host, void **out, char **err) {
  DIST_TRY
  auto base = *static_cast<StorePtr *>(store);
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), base);
  BackendPtr pg;
  uncounted_threads_of([&] {
    auto options = c10d::ProcessGroupGloo::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms);
    std::string host(iface_host);
    options->devices.push_back(host.empty()
                                   ? c10d::ProcessGroupGloo::createDefaultDevice()
                                   : c10d::ProcessGroupGloo::createDeviceForHostname(host));
    pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, options);
  });
  *out = new BackendPtr(std::move(pg));
  DIST_CATCH
}

// An NCCL process group of `size` ranks over a prefixed view of `store`, bound to CUDA device
// `device` (this rank's LOCAL_RANK), created eagerly. Fails with a message when this build has
// no NCCL (the CPU wheel of torch).
int mp_pg_new_nccl(void *store, const char *prefix, int rank, int size, int64_t timeout_ms,
                   int device, void **out, char **err) {
  DIST_TRY
#ifdef MEMPLAN_NCCL
  auto base = *static_cast<StorePtr *>(store);
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), base);
  BackendPtr pg;
  uncounted_threads_of([&] {
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms);
    auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, options);
    // Bind the communicator to this rank's device now, as init_process_group(device_id=...)
    // does, so that a failure shows at start, not at the first collective.
    at::Device dev(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    nccl->setBoundDeviceId(dev);
    nccl->eagerConnectSingleDevice(dev);
    pg = nccl;
  });
  *out = new BackendPtr(std::move(pg));
#else
  (void)store; (void)prefix; (void)rank; (void)size; (void)timeout_ms; (void)device; (void)out;
  throw std::runtime_error(
      "this memplan was built without NCCL (torch's CPU wheel has no libtorch_cuda or nccl.h)");
#endif
  DIST_CATCH
}

void mp_pg_free(void *pg) { delete static_cast<BackendPtr *>(pg); }

// op: 0 sum, 1 max.
int mp_pg_all_reduce(void *pg, at::Tensor *t, int op, char **err) {
  DIST_TRY
  std::vector<at::Tensor> ts{*t};
  c10d::AllreduceOptions o;
  o.reduceOp = op == 1 ? c10d::ReduceOp(c10d::ReduceOp::MAX) : c10d::ReduceOp(c10d::ReduceOp::SUM);
  wait(pg_of(pg), pg_of(pg)->allreduce(ts, o));
  DIST_CATCH
}

int mp_pg_broadcast(void *pg, at::Tensor *t, int root, char **err) {
  DIST_TRY
  std::vector<at::Tensor> ts{*t};
  c10d::BroadcastOptions o;
  o.rootRank = root;
  wait(pg_of(pg), pg_of(pg)->broadcast(ts, o));
  DIST_CATCH
}

int mp_pg_barrier(void *pg, char **err) {
  DIST_TRY
  wait(pg_of(pg), pg_of(pg)->barrier());
  DIST_CATCH
}

int mp_pg_send(void *pg, at::Tensor *t, int dst, int tag, char **err) {
  DIST_TRY
  std::vector<at::Tensor> ts{*t};
  wait(pg_of(pg), pg_of(pg)->send(ts, dst, tag));
  DIST_CATCH
}

int mp_pg_recv(void *pg, at::Tensor *t, int src, int tag, char **err) {
  DIST_TRY
  std::vector<at::Tensor> ts{*t};
  wait(pg_of(pg), pg_of(pg)->recv(ts, src, tag));
  DIST_CATCH
}

// Non-blocking point to point, as torch.distributed.isend / irecv (what
// torch.distributed.pipelining's batch_isend_irecv issues): *work gets a heap Work handle
// (wait it with mp_work_wait, free it with mp_work_free). Gloo's SendWork / RecvWork hold the
// tensor until the handle is freed, as the Python Work object does.
using WorkPtr = c10::intrusive_ptr<c10d::Work>;

int mp_pg_isend(void *pg, at::Tensor *t, int dst, int tag, void **work, char **err) {
  DIST_TRY
  std::vector<at::Tensor> ts{*t};
  *work = new WorkPtr(pg_of(pg)->send(ts, dst, tag));
  DIST_CATCH
}

int mp_pg_irecv(void *pg, at::Tensor *t, int src, int tag, void **work, char **err) {
  DIST_TRY
  std::vector<at::Tensor> ts{*t};
  *work = new WorkPtr(pg_of(pg)->recv(ts, src, tag));
  DIST_CATCH
}

int mp_work_wait(void *work, char **err) {
  DIST_TRY
  (*static_cast<WorkPtr *>(work))->wait();
  DIST_CATCH
}

void mp_work_free(void *work) { delete static_cast<WorkPtr *>(work); }

// Gloo's own all_gather_into_tensor (`_allgather_base`): `out` gets every rank's `in`.
int mp_pg_all_gather_base(void *pg, at::Tensor *out, at::Tensor *in, char **err) {
  DIST_TRY
  wait(pg_of(pg), pg_of(pg)->_allgather_base(*out, *in));
  DIST_CATCH
}

// Gloo's own reduce_scatter_tensor (`_reduce_scatter_base`), summing.
int mp_pg_reduce_scatter_base(void *pg, at::Tensor *out, at::Tensor *in, char **err) {
  DIST_TRY
  c10d::ReduceScatterOptions o;
  o.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
  wait(pg_of(pg), pg_of(pg)->_reduce_scatter_base(*out, *in, o));
  DIST_CATCH
}

// c10d's alltoall_base (what `_c10d_functional::all_to_all_single` calls,
// torch/csrc/distributed/c10d/Functional.cpp): `out`'s rows from each rank, `in`'s rows to
// each, split along dim 0 by the counts given (n entries each).
int mp_pg_alltoall_base(void *pg, at::Tensor *out, at::Tensor *in, const int64_t *out_splits,
                        const int64_t *in_splits, int n, char **err) {
  DIST_TRY
  std::vector<int64_t> o(out_splits, out_splits + n), i(in_splits, in_splits + n);
  c10d::AllToAllOptions opts;
  wait(pg_of(pg), pg_of(pg)->alltoall_base(*out, *in, o, i, opts));
  DIST_CATCH
}

}  // extern "C"
