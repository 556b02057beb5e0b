"""PyTorch's own context parallelism (ring attention, torch.distributed.tensor.experimental), per rank on
CPU/Gloo, for checking memplan's estimator.

The tiny torchtitan Llama (Transformer and block from reference_llama.py, as fsdp2_reference.py and
tp_reference.py), trained the way torchtitan 0.2.1 (and its Dec 2024 code) applies CP: the step's
forward, loss and backward run inside `context_parallel(cp_mesh, buffers=[inputs, labels,
model.freqs_cis], buffer_seq_dims=[1, 1, 0], no_restore_buffers={inputs, labels})` after
`set_rotate_method(...)` (torchtitan `distributed/utils.py` create_context_parallel_ctx; `train.py`
train_step), with torch's default head-tail load balancer (`_load_balancer.py` _HeadTailLoadBalancer:
rank r keeps chunks r and 2cp-1-r of 2cp). FSDP2 shards over dp_shard x cp ("dp_shard_cp", as
torchtitan folds the CP ranks into the FSDP mesh even when dp_shard is 1): fully_shard per block
(reshard_after_forward for all but the last block) and on the root (reshard_after_forward from
"root_reshard", default null = FSDP2's automatic setting), i.e. fsdp2_reference.py's wrapping, the one
memplan models (torchtitan 0.2.x also makes the embedding and [norm, output] units of their own).
torchtitan 0.2.2 moved to a module-wrapper path (`_context_parallel_shard` of inputs, labels and
`positions`, no in-place resize of freqs_cis); that path is not what this script runs.
torch.optim.AdamW(foreach=True), fp32 throughout. "ac": "full" wraps every block in torch's
checkpoint_wrapper before fully_shard, as torchtitan does.

torch 2.11 cannot run this on CPU as shipped: SDPA on CPU becomes
`aten._scaled_dot_product_flash_attention_for_cpu`, and CP's DTensor handlers
(`_context_parallel/_attention.py` custom_ops / _sdpa_handler) cover only the CUDA flash, efficient and
cudnn ops; the DTensor dispatcher then finds no sharding strategy for the CPU op
(`tensor/_sharding_prop.py` propagate_op_sharding_non_cached: "Operator
aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy
registered."). So this script registers two handlers of its own for the CPU flash op and its backward
in that `custom_ops` table before entering the context. They do what torch's CUDA-flash handlers do
(`_sdpa_handler` -> `_scaled_dot_product_ring_flash_attention[_backward]`): unwrap the Shard(2)
DTensors and call torch's own `_templated_ring_attention` / `_templated_ring_attention_backward` with
the CPU kernels, then wrap the results as Shard(2) DTensors. They skip `_sdpa_handler`'s sharding
propagation (there is no strategy to propagate). The ring algorithm, the rotaters, the merger and the
load balancing are torch's own code, unchanged. numpy must be importable (the CP sharding rules import
torch.distributed.tensor.debug, which imports numpy): put a numpy on PYTHONPATH.

    PYTHONPATH=$NUMPY_DIR:src/trainer torchrun --nproc_per_node=2 src/trainer/cp_reference.py /tmp/shim.so \
        '{"hidden":64,"layers":2,"heads":4,"kv_heads":4,"ffn":176,"vocab":256,"batch":2,"seq":128,
          "cp":2,"dp_shard":1,"ac":"none","rotate":"allgather","steps":3}'

(--nproc_per_node = cp x dp_shard; rank = dp_shard_rank * cp + cp_rank, torchtitan's order). "cp": 1
runs the same FSDP job without CP (a control: FSDP over dp_shard ranks on `seq` tokens). Each rank
prints one line, `MPCP {json}`, with, per step, the peak allocated bytes of the forward (from the step
start: context entry, sharding of the buffers, forward, loss), of the backward (with the context's
exit) and of the optimizer step (the peak reset at the step start, before backward and before the
optimizer), relative to the counter before the model was built; the bytes held at the step start and
end, and "peak" (the step's). The line is printed before teardown. Tokens are made uncounted (channel
2); inputs and labels are counted clones kept with the loss until the next step, as torchtitan keeps
them. "check": true first runs one uncounted whole-sequence forward/backward without CP and reports
its loss and gradient norm beside the first CP step's (the CP loss averaged over the CP ranks); they
agreed to 1e-7 for cp 2 and 4, both rotations, dp_shard 2 and full AC. Other keys: "rotate"
("allgather", torchtitan's default, or "alltoall"), "load_balance" (default true), "steps" (default 3),
"gloo_threads" ("uncounted", the default, or "counted": see reference_shim.uncount_other_threads). With MPCP_OUT set
in the environment each rank also writes its JSON to $MPCP_OUT.<rank> (torchrun interleaves stdout).
A plan's figure is each rank's lowest steady-step (step >= 1) peak over a few runs: a Gloo worker can
still drop its Work's reference to a main-thread buffer late (a free on its own thread), which shows as
an occasional higher step.
"""
import ctypes, json, os, sys
from contextlib import nullcontext

lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
import torch
import torch.nn.functional as F
from reference_llama import Transformer
from reference_shim import install_counter, uncount_other_threads
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

counter = install_counter(lib)
aten = torch.ops.aten

H, L, NH, NKV, FF, V = cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["ffn"], cfg["vocab"]
B, S = cfg["batch"], cfg["seq"]
DP = cfg.get("dp_shard", 1)
CP = cfg.get("cp", 2)


def install_cpu_ring_handlers():
    """Route the CPU flash-attention op (and its backward) through torch's own ring attention.

    Mirrors `_attention.py` _sdpa_handler + _scaled_dot_product_ring_flash_attention and
    _scaled_dot_product_ring_flash_attention_backward, with the CPU kernels in place of
    aten._scaled_dot_product_flash_attention[_backward] (which have no CPU kernel). The CPU op returns
    only (output, logsumexp): no philox seed/offset or cumulative-length tensors ride along."""
    from torch.distributed.tensor.experimental._context_parallel import _attention as cpa

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    def as_seq_sharded(t, mesh):
        return DTensor.from_local(t, mesh, [Shard(2)], run_check=False)

    def forward(op_call, args, kwargs):
        q, k, v = args[:3]
        dropout_p = args[3] if len(args) > 3 else kwargs.get("dropout_p", 0.0)
        is_causal = args[4] if len(args) > 4 else kwargs.get("is_causal", False)
        assert kwargs.get("attn_mask") is None, "ring attention takes no explicit mask"
        mesh = q.device_mesh
        out, lse = cpa._templated_ring_attention(
            mesh.get_group(), 2, aten._scaled_dot_product_flash_attention_for_cpu,
            query=local(q), key=local(k), value=local(v), is_causal=is_causal,
            dropout_p=dropout_p, scale=kwargs.get("scale"))
        return as_seq_sharded(out, mesh), as_seq_sharded(lse, mesh)

    def backward(op_call, args, kwargs):
        names = ["grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal"]
        a = dict(zip(names, args))
        a.update(kwargs)
        assert a.get("attn_mask") is None
        mesh = a["query"].device_mesh
        dq, dk, dv = cpa._templated_ring_attention_backward(
            mesh.get_group(), 2, aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
            grad_out=local(a["grad_out"]), grad_out_name="grad_out", query=local(a["query"]),
            key=local(a["key"]), value=local(a["value"]), out=local(a["out"]),
            logsumexp=local(a["logsumexp"]), is_causal=a["is_causal"], dropout_p=a["dropout_p"],
            scale=a.get("scale"))
        return tuple(as_seq_sharded(t, mesh) for t in (dq, dk, dv))

    cpa.custom_ops[aten._scaled_dot_product_flash_attention_for_cpu.default] = forward
    cpa.custom_ops[aten._scaled_dot_product_flash_attention_for_cpu_backward.default] = backward


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == DP * CP, "--nproc_per_node must be cp x dp_shard"
# torchtitan's mesh order (dp_shard outer, cp inner), FSDP over the flattened dp_shard x cp.
if DP > 1 and CP > 1:
    world_mesh = init_device_mesh("cpu", (DP, CP), mesh_dim_names=("dp_shard", "cp"))
    cp_mesh = world_mesh["cp"]
    fsdp_mesh = world_mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    dp_rank = world_mesh.get_local_rank("dp_shard")
elif CP > 1:
    cp_mesh = fsdp_mesh = init_device_mesh("cpu", (CP,), mesh_dim_names=("cp",))
    dp_rank = 0
else:
    cp_mesh = None
    fsdp_mesh = init_device_mesh("cpu", (DP,), mesh_dim_names=("dp_shard",))
    dp_rank = rank
cp_rank = cp_mesh.get_local_rank() if cp_mesh is not None else 0
if CP > 1:
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.distributed.tensor.experimental._context_parallel._attention import _cp_options
    install_cpu_ring_handlers()
    _cp_options.enable_load_balance = bool(cfg.get("load_balance", True))

torch.manual_seed(0)
lib.mp_set_channel(0)
lib.mp_reset_peak(0)
base = counter()[0]
model = Transformer(V, H, L, NH, NKV, FF, S)
for lid, block in list(model.layers.items()):
    if cfg.get("ac", "none") == "full":
        block = checkpoint_wrapper(block, preserve_rng_state=False)
        model.layers.register_module(lid, block)
    fully_shard(block, mesh=fsdp_mesh, reshard_after_forward=int(lid) < L - 1)
fully_shard(model, mesh=fsdp_mesh, reshard_after_forward=cfg.get("root_reshard"))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
setup = counter()[0] - base
out = {"rank": rank, "cp_rank": cp_rank, "dp_rank": dp_rank, "cp": CP, "dp_shard": DP,
       "ac": cfg.get("ac", "none"), "rotate": cfg.get("rotate", "allgather"),
       "gloo_threads": cfg.get("gloo_threads", "uncounted"), "batch": B, "seq": S,
       "setup": setup, "steps": []}


def batch(step):
    # The same global sequence on every CP rank of a dp_shard group (torchtitan's dataloader is
    # indexed by the "batch" mesh: dp ranks only).
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    lib.mp_set_channel(2)
    toks = torch.randint(0, V, (B, S + 1), generator=g)
    lib.mp_set_channel(0)
    return toks


if cfg.get("check"):
    lib.mp_set_channel(2)
    toks = batch(0)
    lib.mp_set_channel(2)
    ref_loss = F.cross_entropy(model(toks[:, :-1]).flatten(0, 1), toks[:, 1:].flatten())
    ref_loss.backward()
    out["check_loss"] = ref_loss.item()
    out["check_gnorm"] = torch.stack([p.grad.full_tensor().norm() for p in model.parameters()]).norm().item()
    opt.zero_grad()
    del ref_loss, toks
    lib.mp_set_channel(0)

inp = labels = loss = None
for step in range(cfg.get("steps", 3)):
    if cfg.get("gloo_threads", "uncounted") == "uncounted":
        uncount_other_threads(lib)
    opt.zero_grad()
    dist.barrier()
    lib.mp_reset_peak(0)
    s0 = counter()[0]
    toks = batch(step)
    inp, labels = toks[:, :-1].clone(), toks[:, 1:].clone()
    if CP > 1:
        set_rotate_method(cfg.get("rotate", "allgather"))
        ctx = context_parallel(cp_mesh, buffers=[inp, labels, model.freqs_cis], buffer_seq_dims=[1, 1, 0],
                               no_restore_buffers={inp, labels})
    else:
        ctx = nullcontext()
    ctx.__enter__()
    pred = model(inp)
    loss = F.cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1))
    del pred
    f_end, f_peak = counter()
    lib.mp_reset_peak(0)
    loss.backward()
    ctx.__exit__(None, None, None)
    b_end, b_peak = counter()
    lib.mp_reset_peak(0)
    opt.step()
    o_end, o_peak = counter()
    out["steps"].append({k: v - base for k, v in dict(start=s0, fwd_peak=f_peak, fwd_end=f_end, bwd_peak=b_peak,
                         bwd_end=b_end, opt_peak=o_peak, end=o_end, peak=max(f_peak, b_peak, o_peak)).items()})
    lib.mp_set_channel(2)
    lsum = loss.detach().clone()
    if cp_mesh is not None:
        dist.all_reduce(lsum, group=cp_mesh.get_group())
        lsum /= CP
    out["steps"][-1]["loss"] = lsum.item()
    if cfg.get("check") and step == 0:
        out["cp_gnorm"] = torch.stack([p.grad.full_tensor().norm() for p in model.parameters()]).norm().item()
    lib.mp_set_channel(0)
    dist.barrier()
print("MPCP " + json.dumps(out), flush=True)
if os.environ.get("MPCP_OUT"):  # one file per rank (torchrun interleaves the ranks' stdout)
    with open(f"{os.environ['MPCP_OUT']}.{rank}", "w") as f:
        f.write(json.dumps(out))
dist.barrier()
dist.destroy_process_group()
