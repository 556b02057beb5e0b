"""memplan's counting CPU allocator (csrc/shim.cpp built as a shared library, loaded with ctypes)
for the PyTorch reference scripts beside this file."""
import ctypes


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
