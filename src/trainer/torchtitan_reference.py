"""torchtitan 0.2.2's own Llama3 training step, per rank on CPU/Gloo, under memplan's counting allocator.

Needs torchtitan 0.2.2 beside torch 2.11.0 (docs/research/frameworks-on-torch-2.11.md, section 2); the measured
configurations are in tests/data/torchtitan_0.2.2_torch_2.11.jsonl and docs/research/torchtitan-0.2.2-measured.md.

    python -m torch.distributed.run --nproc_per_node=2 src/trainer/torchtitan_reference.py \
        /tmp/shim.so '{"dim":64,"layers":2,"heads":4,"kv_heads":4,"vocab":256,"multiple_of":16,
        "batch":2,"seq":64,"ac":"none","dtype":"float32","mp":"bfloat16","reshard":"default",
        "opt":"foreach","steps":3}'

What is torchtitan's own code (imported, not copied), in the order of torchtitan/train.py:Trainer.__init__:
- model: torchtitan.models.llama3.Transformer(TransformerModelArgs(...)) with attn_type "sdpa", built under
  torch.device("meta") and tools/utils.py:set_default_dtype(training.dtype); model_args.update_from_config
  (sets max_seq_len = training.seq_len, so freqs_cis is (seq, head_dim/2) complex64).
- parallelize: models/llama3/infra/parallelize.py:parallelize_llama(model, ParallelDims, JobConfig) -> apply_ac
  (distributed/activation_checkpoint.py) and apply_fsdp (when parallel_dims.fsdp_enabled, i.e. dp_shard > 1).
- model.to_empty(device="cpu"), init_weights(buffer_device=None) under no_grad, model.train().
- optimizer: components/optimizer.py:build_optimizers (AdamW, implementation foreach|fused|for-loop);
  components/lr_scheduler.py:build_lr_schedulers.
- loss: components/loss.py:build_cross_entropy_loss (compile off) -> cross_entropy_loss (pred.flatten(0,1).float(),
  reduction "sum"), divided by global_valid_tokens.
- amp: distributed/utils.py:maybe_enable_amp (nullcontext under FSDP; torch.autocast(cpu, mp) without FSDP).
- step: train.py:Trainer.train_step/forward_backward_step re-enacted as a function (so its locals die at return as
  they do there): optimizers.zero_grad(); valid-token count (dist_sum under DP); inputs/labels "moved to device"
  (counted clones here); pred = model(inputs); loss = loss_fn(pred, labels) / global_valid_tokens inside amp;
  del pred; loss.backward(); distributed/utils.py:clip_grad_norm_(max_norm, foreach=True); optimizers.step();
  lr_schedulers.step().

CPU patches (none changes the bytes a GPU run allocates on the device, beyond what is noted):
 1. torchtitan.distributed.parallel_dims.device_type = "cpu" (tools/utils.py falls back to "cuda").
 2. Gloo has no PREMUL_SUM: set_force_sum_reduction_for_comms(True) on every FSDP module (torchtitan's
    disable_fsdp_gradient_division sets factor 1.0; FSDP2 would use _make_nccl_premul_sum).
 3. activation_checkpoint.preserve_rng_state = False (0.2.2 default True stashes torch.get_rng_state(), a 5,056-B
    CPU uint8 tensor per checkpointed block per forward, which on a GPU is host memory).
Tokens are made uncounted (channel 2); inputs and labels are counted clones (the device copies a GPU run makes).

Each rank prints `MPTT {json}`: per step, relative to the counter before the model was built: start (before
zero_grad), fwd_peak/fwd_end (forward + loss), bwd_peak/bwd_end, clip_peak, opt_peak/opt_end, end (after the
step function returned), and peak. Extra config: "peak_trace": true lists what is alive at the last step's peak
(shim events named by aten op, module and phase through a TorchDispatchMode); "max_norm" (default 1.0).
"""
import contextlib, ctypes, json, os, sys

lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_shim import install_counter

counter = install_counter(lib)  # channel 2 (uncounted) until set otherwise

import torchtitan.distributed.parallel_dims as tt_pd

tt_pd.device_type = "cpu"  # patch 1
from torchtitan.config import JobConfig, TORCH_DTYPE_MAP
from torchtitan.components.loss import build_cross_entropy_loss, IGNORE_INDEX
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils
from torchtitan.models.llama3 import Transformer, TransformerModelArgs, parallelize_llama
from torchtitan.tools import utils as tt_utils

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

B, S = cfg["batch"], cfg["seq"]
STEPS = cfg.get("steps", 3)
AC = cfg.get("ac", "none")

jc = JobConfig()
jc.training.local_batch_size = B
jc.training.seq_len = S
jc.training.dtype = cfg.get("dtype", "float32")
jc.training.mixed_precision_param = cfg.get("mp", "bfloat16")
jc.training.mixed_precision_reduce = "float32"
jc.training.max_norm = cfg.get("max_norm", 1.0)
jc.training.steps = STEPS
jc.parallelism.data_parallel_shard_degree = -1
jc.parallelism.fsdp_reshard_after_forward = cfg.get("reshard", "default")
jc.optimizer.name = "AdamW"
jc.optimizer.implementation = cfg.get("opt", "foreach")
jc.compile.enable = False
if AC == "none":
    jc.activation_checkpoint.mode = "none"
elif AC == "full":
    jc.activation_checkpoint.mode = "full"
else:  # "op" or a layer frequency such as "2"
    jc.activation_checkpoint.mode = "selective"
    jc.activation_checkpoint.selective_ac_option = AC
jc.activation_checkpoint.preserve_rng_state = False  # patch 3

pd = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world)
pd.build_mesh()

args = TransformerModelArgs(dim=cfg["dim"], n_layers=cfg["layers"], n_heads=cfg["heads"],
                            n_kv_heads=cfg.get("kv_heads"), vocab_size=cfg["vocab"],
                            multiple_of=cfg.get("multiple_of", 256), rope_theta=500000, attn_type="sdpa")
args.update_from_config(jc)
V = args.vocab_size

torch.manual_seed(0)
lib.mp_set_channel(0)
lib.mp_reset_peak(0)
base = counter()[0]
with torch.device("meta"), tt_utils.set_default_dtype(TORCH_DTYPE_MAP[jc.training.dtype]):
    model = Transformer(args)
model = parallelize_llama(model, pd, jc)
if pd.fsdp_enabled and cfg.get("force_sum", True):  # patch 2
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
model.to_empty(device="cpu")
with torch.no_grad():
    model.init_weights(buffer_device=None)
model.train()
after_model = counter()[0] - base
optimizers = build_optimizers([model], jc.optimizer, pd)
lr_schedulers = build_lr_schedulers(optimizers, jc.lr_scheduler, jc.training.steps)
loss_fn = build_cross_entropy_loss(jc)
amp = dist_utils.maybe_enable_amp(pd, jc.training.mixed_precision_param, "cpu")
train_context = dist_utils.get_train_context(False)
setup = counter()[0] - base

# ---- optional: what is alive at the last step's peak ----
PT = cfg.get("peak_trace")
oplog, phase = [], ["-"]
if PT:
    from reference_shim import OpTrace

    tracer = OpTrace(lib, model, phase, oplog)
    OpLog, take_events = tracer.mode, tracer.take_events

    def peak_report(start, events):
        best, best_i, snap = tracer.alive_at_peak(start, events)
        # Groups and the full listing name each allocation by its op's first output.
        first = lambda w: (*w[:3], w[3][:1])
        rows = {}
        for aid, (nb, w) in snap.items():
            ph, mod, op, outs = first(w)
            r = rows.setdefault((ph, mod, op, str(outs)), [0, 0])
            r[0] += nb
            r[1] += 1
        seq = None
        if PT == "full":  # every event in order: [alloc/free, id, bytes, phase, module, op, outs, current]
            who = tracer.owners()
            seq, cur2, ids = [], start, {}
            for i, (kind, aid, nb, tag) in enumerate(events):
                if kind == 0:
                    ids[aid] = (nb, first(who.get(i, ("?", "-", "?", []))))
                    cur2 += nb
                    seq.append(["A", aid, nb, *ids[aid][1], cur2])
                elif aid in ids:
                    nb0, w = ids.pop(aid)
                    cur2 -= nb0
                    seq.append(["F", aid, nb0, *w, cur2])
        return {"peak": best, "event": best_i, "alive_before_step": start, "seq": seq,
                "alive_from_step": sorted([v[0], v[1], *k] for k, v in rows.items())}


def train_step(step, rec, tracing=False):
    """train.py:Trainer.train_step + forward_backward_step (one micro-batch, no PP)."""
    rec["start"] = counter()[0]
    optimizers.zero_grad()
    rec["after_zero_grad"] = counter()[0]
    phase[0] = "pre"
    if tracing:  # events from here: zero_grad's frees of older tensors would not be recorded
        lib.mp_trace_start()
        rec["_mode"] = OpLog()
        rec["_mode"].__enter__()
    g = torch.Generator().manual_seed(1000 * step + rank)
    lib.mp_set_channel(2)  # the dataloader's CPU batch: host memory on a GPU
    toks = torch.randint(0, V, (B, S + 1), generator=g)
    local_valid_tokens = torch.tensor(0, dtype=torch.int64)
    local_valid_tokens += (toks[:, 1:] != IGNORE_INDEX).sum()
    lib.mp_set_channel(0)
    if pd.dp_enabled:
        global_valid_tokens = dist_utils.dist_sum(local_valid_tokens, pd.get_mesh("batch"))
    else:
        global_valid_tokens = local_valid_tokens.float()
    inputs, labels = toks[:, :-1].clone(), toks[:, 1:].clone()  # input_dict[k].to(device), labels.to(device)
    phase[0] = "fwd"
    with train_context():
        with amp:
            pred = model(inputs)
            rec["logits_dtype"] = str(pred.dtype).replace("torch.", "")
            loss_sum = loss_fn(pred, labels)
            loss = loss_sum / global_valid_tokens
        del pred
        rec["fwd_end"], rec["fwd_peak"] = counter()
        lib.mp_reset_peak(0)
        phase[0] = "bwd"
        loss.backward()
    rec["bwd_end"], rec["bwd_peak"] = counter()
    lib.mp_reset_peak(0)
    accumulated_losses = [loss.detach()]
    phase[0] = "clip"
    grad_norm = dist_utils.clip_grad_norm_([p for p in model.parameters()], jc.training.max_norm, foreach=True,
                                           pp_mesh=None, ep_enabled=False)
    rec["clip_end"], rec["clip_peak"] = counter()
    lib.mp_reset_peak(0)
    phase[0] = "opt"
    optimizers.step()
    lr_schedulers.step()
    rec["opt_end"], rec["opt_peak"] = counter()
    rec["loss"] = torch.sum(torch.stack(accumulated_losses)).item()


out = {"rank": rank, "world": world, "cfg": cfg, "fsdp": pd.fsdp_enabled, "amp": type(amp).__name__,
       "after_model": after_model, "setup": setup, "steps": []}
peak_all = 0
for step in range(STEPS):
    dist.barrier()
    lib.mp_reset_peak(0)
    rec = {}
    tracing = PT and step == STEPS - 1
    train_step(step, rec, tracing)
    rec["end"] = counter()[0]
    if tracing:
        rec.pop("_mode").__exit__(None, None, None)
        lib.mp_trace_stop()
        out["peak_trace"] = peak_report(rec["after_zero_grad"] - base, take_events())
    for k in list(rec):
        if k not in ("loss", "logits_dtype"):
            rec[k] -= base
    rec["peak"] = max(rec["fwd_peak"], rec["bwd_peak"], rec["clip_peak"], rec["opt_peak"])
    out["steps"].append(rec)
    dist.barrier()
out["params"] = sum(p.numel() for p in model.parameters())
out["ffn"] = max(p.shape[0] for n, p in model.named_parameters() if n.endswith("feed_forward.w1.weight"))   # DTensor: global shape
if cfg.get("out"):
    with open(f"{cfg['out']}.r{rank}.json", "w") as f:
        json.dump(out, f)
print("MPTT " + json.dumps(out), flush=True)
dist.barrier()
dist.destroy_process_group()
