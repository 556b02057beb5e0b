"""PyTorch's own HSDP (FSDP2 `fully_shard` on a 2-D (dp_replicate, dp_shard) DeviceMesh), per rank on
CPU/Gloo in real processes, for checking memplan's estimator and its multi-process trainer.

The tiny torchtitan Llama of late 2024 (reference_llama.py) wrapped as fsdp2_reference.py wraps it, the layout
memplan models by default: fully_shard per block (reshard_after_forward for all but the last block) and on the
root (reshard_after_forward=None: the root stays unsharded from forward to backward), torch's
checkpoint_wrapper per block for "ac": "full", MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce),
torch.optim.AdamW(foreach=True). The mesh is `init_device_mesh("cpu", (dp_replicate, dp_shard),
mesh_dim_names=("dp_replicate", "dp_shard"))`, torchtitan's order (rank = replica x dp_shard + shard); with
dp_replicate 1 it is the 1-D mesh of plain FSDP2 (the control). What HSDP adds, in torch 2.11's
torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py `foreach_reduce` (l.448-665): the reduce-scatter
over the shard group writes `reduce_output` (l.536), then `dist.all_reduce(reduce_output,
group=all_reduce_group)` runs in place on that same tensor over the replicate group (l.581-588), whose
views become the sharded gradients (l.607-613); `_fsdp_param_group.py` l.596-603 keeps it as
`all_reduce_input` only until the next post-backward waits on it (l.626-632). With dp_shard 1 there is no
reduce-scatter, `reduce_output.copy_(reduce_scatter_input)` (l.557) instead. So on a GPU HSDP allocates
nothing beyond FSDP2 over the shard group; this script measures that.

    T=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')   # then the g++ line of
    # fsdp2_reference.py, -o /tmp/shim.so
    OMP_NUM_THREADS=1 python3 -m torch.distributed.run --standalone --nproc-per-node 4 \
        src/trainer/hsdp_reference.py /tmp/shim.so '{"model":"tiny","dp_replicate":2,"dp_shard":2,
        "batch":2,"seq":64,"param":"bf16","reduce":"fp32","ac":"none","steps":4}'

(--nproc-per-node = dp_replicate x dp_shard; "model" is a profile of profiles/models, or give "hidden",
"layers", "heads", "kv_heads", "ffn", "vocab"). Each rank prints one line, `MPHSDP {json}` (and writes it to
"$out.r<rank>.json" when "out" is given), with, per step, relative to the counter before the model was built:
the bytes held at the step start, the peaks of forward+loss, backward and the optimizer step (the peak reset
at the step start, before backward and before the optimizer), the bytes at each phase's end and at the step's
end, and "peak" (the step's); "steady" is the lowest peak of the steps after the first.
tests/data/hsdp_torch_2.11.jsonl holds one line per plan: the config, "measured" (each rank's "steady", in
rank order) and "ranks" (each rank's whole line); 24 plans, tiny (batch 2 x seq 64) and small (batch 2 x seq
128), "param" fp32 and bf16 with "reduce" fp32, "ac" none and full, on 2 x 2, 1 x 2 and 2 x 1, 4 steps each
(run 2026-11-30, torch 2.11.0+cu130, OMP_NUM_THREADS=1).

The loop is torchtitan's (and memplan's trainer's): tokens made uncounted (the data loader's CPU batch is host
memory on a GPU), the inputs and labels counted clones, kept with the loss until the next step rebinds them;
the logits die after the loss.

With "segments": true the backward is cut at each block's output gradient (a tensor hook): per step,
"bwd_segments" lists each segment's peak and the bytes held where it ends (the loss's backward, then block
L-1's, ..., block 0's with the root's post-backward), to itemise a backward peak by block. At dp_shard 1 (2 x
1) FSDP2 neither all-gathers nor reduce-scatters, but its world-size-1 unshard (_fsdp_param_group.py
l.324-335, l.368-392) still copies every parameter of a unit into an unsharded buffer of its own when the unit
runs (a prefetch allocates nothing) and frees it at reshard.

What is counted, and what is not (as plain_reference.py and cp_reference.py): allocations on any thread but
the training thread (Gloo's worker and transport threads, the store's) are not counted (csrc/shim.cpp
mp_uncount_thread): NCCL makes no such buffers through the caching allocator. Every c10d op
(`_allgather_base_`, `_reduce_scatter_base_`, `allreduce_`, and `barrier`) runs with the counter off (channel
2, GlooScratch below): their outputs are tensors FSDP2 allocated beforehand, so what they allocate is the
backend's scratch. On Gloo that is an output-sized temporary in `_allgather_base_` and a clone of the whole
input in `_reduce_scatter_base_` (torch 2.11 ProcessGroupGloo.cpp); NCCL writes into the buffers given.
"gloo_scratch": "counted" keeps them, to see them: on tiny fp32 2 x 2 the lowest steady peak stays 3,050,972
B, single steps rise by up to 177,152 B when Gloo's worker frees its temporary late. Such late frees (a Work
still holding a training-thread buffer) raise single steps even uncounted, hence "steady". The
`dist.barrier()` that lines the ranks up before each step is outside the step and uncounted too (c10d keeps
its 1-byte tensor in a static). What stays counted here and is host memory on a GPU: torch.optim's
`state["step"]` scalars, a 4-byte float32 CPU tensor per parameter tensor (9 per block, 3 in the root), made
in the first optimizer step and alive from then on.
"""
import ctypes, json, os, sys, threading

lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch

torch.set_num_threads(1)
import torch.nn.functional as F
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils._python_dispatch import TorchDispatchMode
from reference_llama import Transformer
from reference_shim import install_counter, uncount_other_threads

counter = install_counter(lib)  # channel 2 (uncounted) until set otherwise

if "model" in cfg:
    prof = json.load(open(os.path.join(HERE, "..", "..", "profiles", "models", cfg["model"] + ".json")))
    H, L, NH = prof["hidden_size"], prof["num_hidden_layers"], prof["num_attention_heads"]
    NKV, FF, V = prof["num_key_value_heads"], prof["intermediate_size"], prof["vocab_size"]
else:
    H, L, NH, NKV, FF, V = cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["ffn"], cfg["vocab"]
B, S = cfg["batch"], cfg["seq"]
R, SH = cfg.get("dp_replicate", 2), cfg.get("dp_shard", 2)
STEPS = cfg.get("steps", 4)
AC = cfg.get("ac", "none")
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == R * SH, f"world {world} != dp_replicate x dp_shard = {R} x {SH}"
if R > 1:
    mesh = init_device_mesh("cpu", (R, SH), mesh_dim_names=("dp_replicate", "dp_shard"))
    shard_rank, replica = mesh.get_local_rank("dp_shard"), mesh.get_local_rank("dp_replicate")
else:
    mesh = init_device_mesh("cpu", (SH,), mesh_dim_names=("dp_shard",))
    shard_rank, replica = mesh.get_local_rank("dp_shard"), 0


scratch = {"c10d_calls": 0}


class GlooScratch(TorchDispatchMode):
    """Runs every c10d op with the counter off (see the docstring): what it allocates is Gloo's scratch."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "c10d":
            return func(*args, **(kwargs or {}))
        scratch["c10d_calls"] += 1
        ch = lib.mp_get_channel()
        lib.mp_set_channel(2)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            lib.mp_set_channel(ch)


torch.manual_seed(0)
uncount_other_threads(lib)
lib.mp_set_channel(0)
lib.mp_reset_peak(0)
base = counter()[0]
model = Transformer(V, H, L, NH, NKV, FF, S, float_logits=True)
mp = MixedPrecisionPolicy(param_dtype=DT[cfg.get("param", "fp32")], reduce_dtype=DT[cfg.get("reduce", "fp32")])
for lid, block in list(model.layers.items()):
    if AC == "full":
        block = checkpoint_wrapper(block, preserve_rng_state=False)
        model.layers.register_module(lid, block)
    fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=int(lid) < L - 1)
fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.get("root_reshard"))
segments = []


def mark_segment(name):
    """A hook on a block output's gradient: closes the backward segment before it (its peak and the bytes
    held when the gradient arrives) and starts the next."""

    def hook(grad):
        cur, peak = counter()
        segments.append({"until": name, "peak": peak - base, "held": cur - base})
        lib.mp_reset_peak(0)

    return hook


if cfg.get("segments"):
    for lid, block in model.layers.items():

        def on_output(module, args, output, lid=lid):
            if output.requires_grad:
                output.register_hook(mark_segment(f"layers.{lid} output gradient"))

        block.register_forward_hook(on_output)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
setup = counter()[0] - base
n_tensors = sum(1 for _ in model.parameters())
out = {"rank": rank, "replica": replica, "shard_rank": shard_rank, "dp_replicate": R, "dp_shard": SH,
       "mesh_ndim": mesh.ndim, "param_tensors": n_tensors, "setup": setup, "steps": []}
if cfg.get("gloo_scratch", "uncounted") == "uncounted":
    GlooScratch().__enter__()
inp = labels = loss = None
for step in range(STEPS):
    opt.zero_grad()
    lib.mp_set_channel(2)
    dist.barrier()
    lib.mp_set_channel(0)
    uncount_other_threads(lib)
    lib.mp_reset_peak(0)
    s0 = counter()[0]
    g = torch.Generator().manual_seed(1000 * step + replica * SH + shard_rank)
    lib.mp_set_channel(2)
    toks = torch.randint(0, V, (B, S + 1), generator=g)
    lib.mp_set_channel(0)
    inp, labels = toks[:, :-1].clone(), toks[:, 1:].clone()
    pred = model(inp)
    loss = F.cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1))
    del pred
    f_end, f_peak = counter()
    lib.mp_reset_peak(0)
    segments.clear()
    loss.backward()
    b_end, b_peak = counter()
    if cfg.get("segments"):
        segments.append({"until": "backward end", "peak": b_peak - base, "held": b_end - base})
        b_peak = max([b_peak] + [g["peak"] + base for g in segments])
    lib.mp_reset_peak(0)
    opt.step()
    o_end, o_peak = counter()
    rec = {k: v - base for k, v in dict(start=s0, fwd_peak=f_peak, fwd_end=f_end, bwd_peak=b_peak, bwd_end=b_end,
                                          opt_peak=o_peak, end=o_end).items()}
    rec["peak"] = max(rec["fwd_peak"], rec["bwd_peak"], rec["opt_peak"])
    if cfg.get("segments"):
        rec["bwd_segments"] = list(segments)
    lib.mp_set_channel(2)
    rec["loss"] = loss.item()
    lib.mp_set_channel(0)
    out["steps"].append(rec)
out["steady"] = min(s["peak"] for s in out["steps"][1:])
out["c10d_calls"] = scratch["c10d_calls"]
if cfg.get("out"):
    with open(f"{cfg['out']}.r{rank}.json", "w") as f:
        json.dump(out, f)
print("MPHSDP " + json.dumps(out), flush=True)
lib.mp_set_channel(2)
dist.barrier()
dist.destroy_process_group()
