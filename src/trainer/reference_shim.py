"""memplan's counting CPU allocator (csrc/shim.cpp built as a shared library, loaded with ctypes)
for the PyTorch reference scripts beside this file."""
import ctypes
import os
import threading


def install_counter(lib):
    """Installs the counting allocator of `lib`, counts from here on in channel 2 (uncounted as
    device bytes), and returns counter(): (current, peak) bytes of channel 0, the device's."""
    err = ctypes.c_char_p()
    assert lib.mp_install_counting_allocator(ctypes.byref(err)) == 0
    lib.mp_set_channel(2)

    def counter():
        c, p = ctypes.c_int64(), ctypes.c_int64()
        lib.mp_counter(0, ctypes.byref(c), ctypes.byref(p))
        return c.value, p.value

    return counter


def uncount_other_threads(lib):
    """Registers every thread of this process but the calling (main) one with the shim as
    uncounted (csrc/shim.cpp mp_uncount_thread), as memplan's trainer does: Gloo's worker and
    transport threads and the c10d store's allocate scratch buffers that NCCL does not, and
    whether one is still alive at the main thread's peak is a matter of timing. Frees are counted
    on whatever thread they happen; autograd runs CPU backward on the calling thread. Call it
    again after threads may have started (a new process group, the first collective). Returns
    how many threads it registered."""
    main = threading.get_native_id()
    n = 0
    for t in os.listdir("/proc/self/task"):
        if int(t) != main:
            lib.mp_uncount_thread(ctypes.c_int64(int(t)))
            n += 1
    return n


class OpTrace:
    """Names the shim's recorded allocation events (mp_trace_start/take) by the aten op, the
    module and the phase that made them, to list what is alive at a peak. `phase` is a
    one-element list the caller updates ("fwd", "bwd", ...); `oplog` receives, per op that
    allocated, (first event, last event + 1, op, module, phase, [(dtype, shape) of outputs])."""

    def __init__(self, lib, model, phase, oplog):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        lib.mp_trace_pending.restype = ctypes.c_int64
        lib.mp_trace_take.restype = ctypes.c_int64
        self.lib, self.oplog = lib, oplog
        names = {id(m): n for n, m in model.named_modules()}
        stack = []
        torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: stack.append(names.get(id(m), "?")))

        def post(m, a, o):  # must return None (a forward hook's return value replaces the output)
            if stack:
                stack.pop()

        torch.nn.modules.module.register_module_forward_hook(post)

        class OpLog(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                n0 = lib.mp_trace_pending()
                out = func(*args, **(kwargs or {}))
                n1 = lib.mp_trace_pending()
                if n1 > n0:
                    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(o)]
                    oplog.append((n0, n1, str(func.overloadpacket.__name__), stack[-1] if stack else "-", phase[0],
                                  [(str(o.dtype).replace("torch.", ""), list(o.shape)) for o in outs]))
                return out

        self.mode = OpLog

    def take_events(self):
        """The recorded events since mp_trace_start: (kind 0 alloc / 1 free, id, bytes, tag)."""
        n = self.lib.mp_trace_pending()
        buf = (ctypes.c_int64 * (4 * n))()
        got = self.lib.mp_trace_take(buf, n)
        return [tuple(buf[4 * i:4 * i + 4]) for i in range(got)]

    def owners(self):
        """Event index -> (phase, module, op, outputs) of the op during which it happened."""
        who = {}
        for n0, n1, op, mod, ph, outs in self.oplog:
            for i in range(n0, n1):
                who[i] = (ph, mod, op, outs)
        return who

    def alive_at_peak(self, start, events, lo=0, hi=None):
        """Replays `events` from `start` bytes; at the highest point among events [lo, hi):
        (bytes, event index, {id: (bytes, owner)} of what was allocated since and is alive)."""
        who = self.owners()
        hi = len(events) if hi is None else hi
        live, cur, best, best_i, snap = {}, start, -1, -1, {}
        for i, (kind, aid, nb, tag) in enumerate(events):
            if kind == 0:
                live[aid] = (nb, who.get(i, ("?", "-", "?", [])))
                cur += nb
            elif aid in live:
                cur -= live.pop(aid)[0]
            if lo <= i < hi and cur > best:
                best, best_i, snap = cur, i, dict(live)
        return best, best_i, snap


# The c10d ops whose allocations are Gloo's (or c10d's) own, not the model's.
C10D_OPS = {"_allgather_base_", "_reduce_scatter_base_", "allreduce_", "allgather_", "allgather_into_tensor_coalesced_",
            "reduce_scatter_tensor_coalesced_", "broadcast_", "barrier", "reduce_scatter_", "allreduce_coalesced_",
            "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "wait_tensor"}


class FsdpTrace:
    """An OpTrace's events with FSDP2's collectives labelled: while foreach_all_gather (AG), its copy-out
    (AGcopyout), foreach_reduce (RS) or init_unsharded_param (init_unsharded) runs, the phase reads
    "<phase>:<label>", and events that no dispatched op owns (FSDP2 allocates unsharded parameters with
    storage.resize_, which is not dispatched) are named by the span. Patches torch's FSDP2 modules once."""

    def __init__(self, lib, tracer, phase):
        import torch.distributed.fsdp._fully_shard._fsdp_param_group as _pg
        import torch.distributed.fsdp._fully_shard._fsdp_param as _fp

        self.tracer = tracer
        self.spans = []  # (first event, last event + 1, label)
        spans = self.spans

        def span(fn, label):
            def wrapped(*a, **k):
                n0 = lib.mp_trace_pending()
                old = phase[0]
                phase[0] = old.split(":")[0] + ":" + label
                try:
                    return fn(*a, **k)
                finally:
                    phase[0] = old
                    spans.append((n0, lib.mp_trace_pending(), label))
            return wrapped

        _pg.foreach_all_gather = span(_pg.foreach_all_gather, "AG")
        _pg.foreach_all_gather_copy_out = span(_pg.foreach_all_gather_copy_out, "AGcopyout")
        _pg.foreach_reduce = span(_pg.foreach_reduce, "RS")
        _fp.FSDPParam.init_unsharded_param = span(_fp.FSDPParam.init_unsharded_param, "init_unsharded")

    def owners(self):
        """The tracer's owners, with events inside a span that no op owns named by the span."""
        who = self.tracer.owners()
        for n0, n1, label in self.spans:
            for i in range(n0, n1):
                if i not in who:
                    who[i] = ("span", "-", label, [])
        return who

    def peak_report(self, start, events, lo=0, hi=None, exclude_c10d=False):
        """Peak within events [lo, hi) and what is alive then that was allocated in the step, grouped by
        (phase, module, op, first output). exclude_c10d: replay without allocations made inside c10d ops."""
        who = self.owners()
        hi = len(events) if hi is None else hi
        live, cur, best, best_i, snap = {}, start, -1, -1, {}
        for i, (kind, aid, nb, tag) in enumerate(events):
            if kind == 0:
                w = who.get(i, ("?", "-", "?", []))
                if exclude_c10d and w[2] in C10D_OPS:
                    continue
                live[aid] = (nb, w)
                cur += nb
            elif aid in live:
                cur -= live.pop(aid)[0]
            if lo <= i < hi and cur > best:
                best, best_i, snap = cur, i, dict(live)
        rows = {}
        for aid, (nb, (ph, mod, op, outs)) in snap.items():
            k = (ph, mod, op, str(outs[:1]))
            r = rows.setdefault(k, [0, 0, set()])
            r[0] += nb
            r[1] += 1
            r[2].add(nb)
        return {"peak": best, "event": best_i, "alive_before_step": start,
                "alive_from_step": sorted(([v[0], v[1], *k, sorted(v[2])] for k, v in rows.items()),
                                          key=lambda r: (r[2], r[3]))}

    def fsdp_timeline(self, start, events):
        """Every allocation made in an FSDP2 span (AG, AGcopyout, RS) or a c10d op, and its free: [event, "A"|"F",
        bytes, phase, label or op, module at the allocation, current bytes (all counted), op running at a free]."""
        who = self.tracer.owners()
        lab = {}
        for n0, n1, label in self.spans:
            for i in range(n0, n1):
                lab.setdefault(i, label)
        rows, mine, cur, sizes = [], {}, start, {}
        for i, (kind, aid, nb, tag) in enumerate(events):
            if kind == 0:
                sizes[aid] = nb
                cur += nb
                w = who.get(i, ("?", "-", "?", []))
                if i in lab or w[2] in C10D_OPS:
                    mine[aid] = (nb, w[0], lab.get(i, w[2]) if w[2] == "?" or w[2] == "empty" or i in lab else w[2], w[1])
                    if w[2] in C10D_OPS:
                        mine[aid] = (nb, w[0], "c10d:" + w[2], w[1])
                    rows.append([i, "A", *mine[aid], cur, ""])
            else:
                cur -= sizes.pop(aid, 0)
                if aid in mine:
                    w = who.get(i)
                    rows.append([i, "F", *mine.pop(aid), cur, f"{w[0]}:{w[1]}:{w[2]}" if w else "-"])
        return rows

    def c10d_allocs(self, events):
        """Allocations made inside c10d ops, counted by "phase:op:bytes"."""
        who = self.tracer.owners()
        rows = {}
        for i, (kind, aid, nb, tag) in enumerate(events):
            if kind == 0:
                w = who.get(i)
                if w and w[2] in C10D_OPS:
                    k = f"{w[0]}:{w[2]}:{nb}"
                    rows[k] = rows.get(k, 0) + 1
        return rows
