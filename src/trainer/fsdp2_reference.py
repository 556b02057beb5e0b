"""PyTorch's own FSDP2 as rank 0 of N ranks, for checking memplan's trainer byte for byte.

torchtitan's Llama (late 2024) under `fully_shard` per block and on the root, in one process
as rank 0 of a fake process group (collectives do nothing, allocations are real), with
torch.optim.AdamW(foreach=True), counted by memplan's own counting CPU allocator: csrc/shim.cpp
built as a shared library and loaded with ctypes (no ninja or cpp_extension needed):

    T=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')
    g++ -O1 -shared -fPIC -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1 -DGLOG_USE_GLOG_EXPORT \
        -I$T/include -I$T/include/torch/csrc/api/include csrc/shim.cpp \
        -L$T/lib -ltorch_cpu -lc10 -ltorch -Wl,-rpath,$T/lib -o /tmp/shim.so
    python3 src/trainer/fsdp2_reference.py /tmp/shim.so '{"hidden":64,"layers":2,"heads":4,
        "kv_heads":4,"ffn":176,"vocab":256,"batch":2,"seq":32,"world":2,"param":"bf16",
        "reduce":"fp32","ac":"none","logits":"float-output","steps":2}'

prints, per step, the device bytes at each phase's start, peak and end (relative to before
the model was built), to compare with `memplan::trainer::train` on the same plan. The root
is sharded with reshard_after_forward=None ("root_reshard" in the config overrides it): FSDP2
then keeps the root unsharded between forward and backward, as every torch of 2024 did.
Differences to expect: torch.optim's CPU `step` scalars (4 bytes per parameter tensor) count
here as device bytes; the trainer counts them as host bytes. This script frees `inp`, `labels`
and `loss` before the optimizer step; torchtitan (and the trainer) keep them until the next
batch. ac: "none", "full" or "sel:K" (torchtitan's selective layer rule).

On a GPU, give `cuda` in place of the shim: the same job runs on cuda:0 (FSDP2's own
all-gather and reduce-scatter streams, the fake process group's collectives doing nothing)
and the figures are the caching allocator's (`torch.cuda.memory_allocated` and its peaks),
with "peak_reserved" (`max_memory_reserved` over the run). With "trace": PATH in the config
it also records the allocator's history and writes it as a memplan.trace/1 document (alloc
and free_completed entries, requested sizes, streams numbered by first appearance), for
`memplan replay PATH`: the allocator model against PyTorch's real three-stream FSDP2.
"""
import ctypes, json, math, sys

CUDA = sys.argv[1] == "cuda"
lib = None if CUDA else ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
import torch
import torch.nn.functional as F
from reference_llama import Transformer
from reference_shim import install_counter
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

DEV = "cuda" if CUDA else "cpu"
reserved_peak = 0
if CUDA:
    torch.cuda.set_device(0)
    if cfg.get("trace"):
        torch.cuda.memory._record_memory_history(context=None, stacks="python", max_entries=4_000_000)

    def set_channel(_):
        pass

    def reset_peak():
        global reserved_peak
        reserved_peak = max(reserved_peak, torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()

    def counter():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
else:
    counter = install_counter(lib)

    def set_channel(ch):
        lib.mp_set_channel(ch)

    def reset_peak():
        lib.mp_reset_peak(0)
set_channel(2)


H, L, NH, NKV, FF, V = cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["ffn"], cfg["vocab"]
B, S, N = cfg["batch"], cfg["seq"], cfg["world"]
dt = {"fp32": torch.float32, "bf16": torch.bfloat16}


dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=N)
mesh = init_device_mesh(DEV, (N,))
set_channel(0)
reset_peak()
base = counter()[0]
with torch.device(DEV):
    model = Transformer(V, H, L, NH, NKV, FF, S, float_logits=cfg.get("logits", "float-output") == "float-output")
mp = MixedPrecisionPolicy(param_dtype=dt[cfg["param"]], reduce_dtype=dt[cfg["reduce"]])
for lid, block in list(model.layers.items()):
    ac = cfg["ac"]
    if ac == "full" or (ac.startswith("sel:") and (int(lid) + 1) % int(ac[4:]) == 0):
        block = checkpoint_wrapper(block, preserve_rng_state=False)
        model.layers.register_module(lid, block)
    fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=int(lid) < L - 1)
fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.get("root_reshard"))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
setup = counter()[0] - base
out = {"setup": setup, "steps": []}
for step in range(cfg["steps"]):
    opt.zero_grad()
    reset_peak()
    s0 = counter()[0]
    set_channel(2)
    toks = torch.randint(0, V, (B, S + 1))
    set_channel(0)
    inp, labels = toks[:, :-1].to(DEV), toks[:, 1:].to(DEV)
    if not CUDA:
        inp, labels = inp.clone(), labels.clone()
    pred = model(inp)
    flat = pred.flatten(0, 1)
    if cfg.get("logits") == "float-in-loss":
        flat = flat.float()
    loss = F.cross_entropy(flat, labels.flatten(0, 1))
    del flat
    del pred
    f_end, f_peak = counter()
    reset_peak()
    loss.backward()
    b_end, b_peak = counter()
    del loss, inp, labels
    reset_peak()
    o0 = counter()[0]
    opt.step()
    o_end, o_peak = counter()
    out["steps"].append({k: v - base for k, v in dict(fwd_start=s0, fwd_peak=f_peak, fwd_end=f_end, bwd_peak=b_peak,
                         bwd_end=b_end, opt_start=o0, opt_peak=o_peak, opt_end=o_end).items()})
if CUDA:
    reset_peak()
    out["peak_reserved"] = reserved_peak
    if cfg.get("trace"):
        # The allocator's history as a memplan.trace/1 document: every allocation numbered by
        # address (a block is freed when its free completes, after the streams that used it).
        snap = torch.cuda.memory._snapshot()
        events, live, streams = [], {}, {}
        unknown = {"module": "unknown", "part": "whole"}
        for e in snap["device_traces"][0]:
            if e["action"] not in ("alloc", "free_completed"):
                continue
            stream = streams.setdefault(e["stream"], len(streams))
            if e["action"] == "alloc":
                live[e["addr"]] = (len(events) + 1, e["size"])
                events.append({"op": "alloc", "id": len(events) + 1, "bytes": e["size"],
                               "category": "other", "owner": unknown, "stream": stream})
            elif e["addr"] in live:
                i, size = live.pop(e["addr"])
                events.append({"op": "free", "id": i, "bytes": size, "category": "other",
                               "owner": unknown, "stream": stream})
        json.dump({"schema": "memplan.trace/1", "source": "measured", "stage": 0, "rank": 0,
                   "capacity_bytes": torch.cuda.get_device_properties(0).total_memory,
                   "events": events, "marks": []}, open(cfg["trace"], "w"))
print(json.dumps(out))
