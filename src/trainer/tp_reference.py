"""PyTorch's own tensor parallelism (DTensor parallelize_module), per rank on CPU/Gloo, for checking memplan's estimator.

The tiny torchtitan Llama (its block from reference_llama.py, as fsdp2_reference.py; the attention takes its
local head count from the shapes, n_heads // tp, as torchtitan's does), parallelized exactly as
torchtitan's `apply_tp` for Llama: tok_embeddings RowwiseParallel(Replicate -> Shard(1)), norm
SequenceParallel, output ColwiseParallel(Shard(1) -> Shard(-1), use_local_output=False) with loss
parallel (Replicate and a local tensor without); per block attention_norm/ffn_norm SequenceParallel,
attention/feed_forward PrepareModuleInput(Shard(1) -> Replicate), wq/wk/wv/w1/w3 ColwiseParallel,
wo/w2 RowwiseParallel(output Shard(1)). With "sp": false every Shard(1) activation layout is
Replicate() (wo/w2/embedding all-reduce) and the norms get torchtitan's NoParallel (weights Replicate
DTensors, activations replicated, local output), as torchtitan's `enable_sequence_parallel=False`
does (models/llama3/sharding.py; plain norm weights would also break foreach AdamW, which refuses a
mix of DTensor and plain tensors). With "loss_parallel" the forward,
loss and backward run inside `torch.distributed.tensor.parallel.loss_parallel()`, as torchtitan's
train context does. torch.optim.AdamW(foreach=True), fp32 throughout. With "dp_shard": 2 a
("dp_shard", "tp") mesh and fully_shard per block (reshard_after_forward for all but the last block)
and on the root (reshard_after_forward=True, torchtitan's `not pp_enabled`; "root_reshard" in the
config overrides it, null = FSDP2's default) after TP, as torchtitan does. Every rank counts its
allocations with memplan's counting CPU allocator (csrc/shim.cpp built as a shared library, see
fsdp2_reference.py for the g++ line; channel 0 counts as device):

    torchrun --nproc_per_node=2 src/trainer/tp_reference.py /tmp/shim.so \
        '{"hidden":64,"layers":2,"heads":4,"kv_heads":4,"ffn":176,"vocab":256,"batch":2,"seq":64,
          "sp":true,"loss_parallel":true,"ac":"none","dp_shard":1,"steps":2}'

(--nproc_per_node = tp x dp_shard). Each rank prints one line, `MPTP {json}`, with, per step, the
peak allocated bytes of the forward+loss, the backward and the optimizer step (the peak reset at the
step start and before backward and the optimizer) relative to the counter before the model was
built, the bytes held at the step start and end, and "peak" (the step's). The line is printed before
teardown. Tokens are made uncounted (channel 2); the inputs and labels are counted clones, kept with
the loss until the next step as torchtitan keeps them. "ac": "full" wraps every block (after TP) in
torch's checkpoint_wrapper.
"""
import ctypes, json, os, sys
from contextlib import nullcontext

lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
import torch
import torch.nn.functional as F
from reference_llama import Transformer
from reference_shim import install_counter
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

counter = install_counter(lib)


H, L, NH, NKV, FF, V = cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["ffn"], cfg["vocab"]
B, S = cfg["batch"], cfg["seq"]
SP, LP = bool(cfg.get("sp", True)), bool(cfg.get("loss_parallel", True))
DP = cfg.get("dp_shard", 1)


class NoParallel(ParallelStyle):
    """torchtitan's NoParallel (torchtitan/distributed/tensor_parallel.py): parameters become Replicate
    DTensors on the TP mesh (so AdamW's foreach sees one kind of tensor); the input is wrapped as a
    Replicate DTensor and the output returned as a local tensor. The norms' plan without SP."""

    def _apply(self, module, device_mesh):
        def inp(mod, inputs, mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
            return (x, *inputs[1:])

        def outp(mod, outputs, mesh):
            if outputs.placements != (Replicate(),):
                outputs = outputs.redistribute(placements=(Replicate(),))
            return outputs.to_local()

        return distribute_module(module, device_mesh, None, input_fn=inp, output_fn=outp)


def apply_tp(model, tp_mesh):
    """torchtitan's apply_tp for Llama (models/llama3/infra/parallelize.py); sp=False as its
    enable_sequence_parallel=False: Replicate activations, plain norms."""
    act = Shard(1) if SP else Replicate()
    root_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=act),
        "output": ColwiseParallel(input_layouts=act, output_layouts=Shard(-1) if LP else Replicate(),
                                  use_local_output=not LP),
    }
    root_plan["norm"] = SequenceParallel() if SP else NoParallel()
    parallelize_module(model, tp_mesh, root_plan)
    for block in model.layers.values():
        plan = {
            "attention": PrepareModuleInput(input_layouts=(act, None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=act),
            "feed_forward": PrepareModuleInput(input_layouts=(act,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=act),
            "feed_forward.w3": ColwiseParallel(),
        }
        plan["attention_norm"] = SequenceParallel() if SP else NoParallel()
        plan["ffn_norm"] = SequenceParallel() if SP else NoParallel()
        parallelize_module(block, tp_mesh, plan)


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
TP = world // DP
if DP > 1:
    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp_shard", "tp"))
    tp_mesh, dp_rank = mesh["tp"], mesh.get_local_rank("dp_shard")
else:
    mesh = tp_mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    dp_rank = 0
assert NH % TP == 0 and NKV % TP == 0, "heads and kv_heads must divide by tp"
torch.manual_seed(0)
lib.mp_set_channel(0)
lib.mp_reset_peak(0)
base = counter()[0]
model = Transformer(V, H, L, NH, NKV, FF, S)
apply_tp(model, tp_mesh)
if cfg.get("ac", "none") == "full":
    for lid, block in list(model.layers.items()):
        model.layers.register_module(lid, checkpoint_wrapper(block, preserve_rng_state=False))
if DP > 1:
    for lid, block in model.layers.items():
        fully_shard(block, mesh=mesh["dp_shard"], reshard_after_forward=int(lid) < L - 1)
    fully_shard(model, mesh=mesh["dp_shard"], reshard_after_forward=cfg.get("root_reshard", True))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
setup = counter()[0] - base
out = {"rank": rank, "tp_rank": tp_mesh.get_local_rank(), "dp_rank": dp_rank, "tp": TP, "dp_shard": DP,
       "sp": SP, "loss_parallel": LP, "ac": cfg.get("ac", "none"), "setup": setup, "steps": []}
inp = labels = loss = None
for step in range(cfg.get("steps", 2)):
    opt.zero_grad()
    dist.barrier()
    lib.mp_reset_peak(0)
    s0 = counter()[0]
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    lib.mp_set_channel(2)
    toks = torch.randint(0, V, (B, S + 1), generator=g)
    lib.mp_set_channel(0)
    inp, labels = toks[:, :-1].clone(), toks[:, 1:].clone()
    with loss_parallel() if LP else nullcontext():
        pred = model(inp)
        loss = F.cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1))
        del pred
        f_end, f_peak = counter()
        lib.mp_reset_peak(0)
        loss.backward()
    b_end, b_peak = counter()
    lib.mp_reset_peak(0)
    opt.step()
    o_end, o_peak = counter()
    out["steps"].append({k: v - base for k, v in dict(start=s0, fwd_peak=f_peak, fwd_end=f_end, bwd_peak=b_peak,
                         bwd_end=b_end, opt_peak=o_peak, end=o_end, peak=max(f_peak, b_peak, o_peak)).items()})
    out["steps"][-1]["loss"] = loss.full_tensor().item() if hasattr(loss, "full_tensor") else loss.item()
    dist.barrier()
print("MPTP " + json.dumps(out), flush=True)
dist.barrier()
dist.destroy_process_group()
