"""PyTorch's own torch.distributed.pipelining, per stage on CPU/Gloo, for checking memplan's estimator.

The tiny torchtitan Llama (its block from reference_llama.py, as fsdp2_reference.py), cut into pp=2 stages
(stage 0: embedding + first half of the layers; stage 1: the rest + norm + output), one
PipelineStage per rank (input_args/output_args given as meta tensors, so no shape inference and no
numpy), ScheduleGPipe or Schedule1F1B with a cross-entropy loss_fn, torch.optim.AdamW(foreach=True),
fp32 throughout. With 4 ranks: a ("pp", "dp_shard") = (2, 2) mesh and fully_shard per block and on
the stage root with reshard_after_forward=False, as torchtitan does under PP. Every rank counts its
allocations with memplan's counting CPU allocator (csrc/shim.cpp built as a shared library, see
fsdp2_reference.py for the g++ line; channel 0 counts as device):

    torchrun --nproc_per_node=2 src/trainer/pipelining_reference.py /tmp/shim.so \
        '{"hidden":64,"layers":2,"heads":4,"kv_heads":4,"ffn":176,"vocab":256,"mbs":2,
          "n_microbatches":4,"seq":32,"schedule":"1f1b","steps":2}'

(--nproc_per_node=4 for pp=2 x dp_shard=2). Each rank prints one line per run,
`MPPP {json}`, with, per step, the peak allocated bytes from the step start (peak reset there)
relative to the counter before the model was built, plus the schedule and optimizer peaks and the
bytes held at the step start and end. The line is printed before teardown. Config keys besides the
model: "return_outputs" (default false: the last stage does not keep merged logits, as torchtitan
passes), "steps" (default 2), "pp" (stages, default 2; --nproc_per_node = pp x dp_shard),
"ac" ("full" wraps every block in torch's checkpoint_wrapper; default none), "param" ("bf16": see
below; default fp32), "v" (stages per rank, default 1; rank r holds global stages r, r + pp, ... as
torchtitan assigns them, for the schedules "interleaved-1f1b" and "interleaved-zb"; "interleaved-zb" with
"v": 1 is torch's ScheduleInterleavedZeroBubble with one stage per rank, which torchtitan and memplan's plans
call zb-h1: tests/data/pipelining_zb_torch_2.11.jsonl). Each rank's tokens/labels for the whole step (mbs * n_microbatches
rows) are made inside the counted region on the stage that consumes them.
"""
import ctypes, json, math, os, sys


def print_lowered_lists():
    """`pipelining_reference.py --ir`: every rank's action list as torch lowers it (with UNSHARD,
    REDUCE_GRAD and the sends and receives), for the multi-stage schedules over a few shapes; no
    process group is needed (stages are stand-ins with the attributes the schedules read).
    Its output is tests/data/pipelining_ir_torch_2.11.txt."""
    from torch.distributed.pipelining import ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble

    class Stand:
        def __init__(self, index, stages, pp, rank):
            self.stage_index, self.num_stages, self.group_size, self.group_rank = index, stages, pp, rank
            self.submod, self.stage_index_to_group_rank = None, {}

    shapes = [(2, 2, 4), (2, 2, 2), (2, 2, 8), (2, 2, 6), (2, 4, 4), (2, 3, 6), (4, 2, 2), (4, 2, 4), (4, 2, 6),
              (4, 2, 8), (4, 2, 12), (2, 1, 4), (4, 1, 8)]
    for name, cls in [("interleaved-1f1b", ScheduleInterleaved1F1B), ("interleaved-zb", ScheduleInterleavedZeroBubble)]:
        for pp, v, n in shapes:
            for rank in range(pp):
                stages = [Stand(rank + k * pp, pp * v, pp, rank) for k in range(v)]
                sched = cls(stages, n_microbatches=n, loss_fn=lambda out, target: None)
                print(name, pp, v, n, rank, " ".join(str(a) for a in sched.pipeline_order_with_comms[rank]))


if sys.argv[1] == "--ir":
    print_lowered_lists()
    sys.exit(0)

lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference_llama import RMSNorm, TransformerBlock, precompute_freqs_cis
from reference_shim import install_counter
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import (PipelineStage, ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

counter = install_counter(lib)


H, L, NH, NKV, FF, V = cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["ffn"], cfg["vocab"]
MB, NMB, S = cfg["mbs"], cfg["n_microbatches"], cfg["seq"]
B = MB * NMB
HD = H // NH
PP = cfg.get("pp", 2)
# "v": stages per rank (interleaved schedules); rank r holds global stages r, r + pp, ... as
# torchtitan's "loop" stage assignment (distributed/pipeline_parallel.py, stage_ids_this_rank).
VS = cfg.get("v", 1)
NS = PP * VS


class StageModel(nn.Module):
    """torchtitan's pipeline split: every stage keeps freqs_cis; absent parts are None."""

    def __init__(self, stage):
        super().__init__()
        first, last = stage == 0, stage == NS - 1
        per = L // NS
        self.tok_embeddings = nn.Embedding(V, H) if first else None
        self.register_buffer("freqs_cis", precompute_freqs_cis(HD, S * 2), persistent=True)
        # "ac": "full" wraps every block in torch's checkpoint_wrapper, as torchtitan does.
        wrap = (lambda b: checkpoint_wrapper(b, preserve_rng_state=False)) if cfg.get("ac") == "full" else (lambda b: b)
        self.layers = nn.ModuleDict({str(i): wrap(TransformerBlock(H, NH, NKV, FF)) for i in range(stage * per, (stage + 1) * per)})
        self.norm = RMSNorm(H) if last else None
        self.output = nn.Linear(H, V, bias=False) if last else None

    def forward(self, tokens):
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        freqs = self.freqs_cis[0 : h.shape[1]]
        for layer in self.layers.values():
            h = layer(h, freqs)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h).float() if self.output is not None else h


def loss_fn(pred, labels):
    return F.cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1))


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
dp = world // PP
mesh = init_device_mesh("cpu", (PP, dp), mesh_dim_names=("pp", "dp_shard"))
stage_idx = mesh.get_local_rank("pp")
torch.manual_seed(0)
lib.mp_set_channel(0)
lib.mp_reset_peak(0)
base = counter()[0]
stage_ids = [stage_idx + k * PP for k in range(VS)]
parts = [StageModel(s) for s in stage_ids]
# "param": "bf16" computes in bf16: without FSDP the whole stage is cast (bf16 weights, gradients
# and AdamW states), with FSDP a MixedPrecisionPolicy(bf16, reduce fp32) over fp32 shards.
bf16 = cfg.get("param", "fp32") == "bf16"
act = torch.bfloat16 if bf16 else torch.float32
for model in parts:
    if bf16 and dp == 1:
        model.to(torch.bfloat16)
    if dp > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in model.layers.values():
            fully_shard(block, mesh=mesh["dp_shard"], reshard_after_forward=False, mp_policy=mp)
        fully_shard(model, mesh=mesh["dp_shard"], reshard_after_forward=False, mp_policy=mp)
meta = torch.device("meta")
stages = []
for s, model in zip(stage_ids, parts):
    in_meta = (torch.empty(MB, S, dtype=torch.long, device=meta) if s == 0
               else torch.empty(MB, S, H, device=meta, dtype=act))
    out_meta = (torch.empty(MB, S, H, device=meta, dtype=act) if s < NS - 1 else torch.empty(MB, S, V, device=meta))
    stages.append(PipelineStage(model, s, NS, torch.device("cpu"), input_args=(in_meta,), output_args=(out_meta,),
                                group=mesh.get_group("pp")))
Sched = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
         "interleaved-zb": ScheduleInterleavedZeroBubble}[cfg["schedule"]]
multi = Sched in (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble)
assert multi or VS == 1, "gpipe and 1f1b run one stage per rank"
sched = Sched(stages if multi else stages[0], n_microbatches=NMB, loss_fn=loss_fn)
opt = torch.optim.AdamW([p for m in parts for p in m.parameters()], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                        foreach=True)
setup = counter()[0] - base
out = {"rank": rank, "stage": stage_idx, "stages": stage_ids, "dp": dp, "schedule": cfg["schedule"], "setup": setup, "steps": []}
ret = bool(cfg.get("return_outputs", False))
for step in range(cfg.get("steps", 2)):
    opt.zero_grad()
    dist.barrier()
    lib.mp_reset_peak(0)
    s0 = counter()[0]
    g = torch.Generator().manual_seed(step)
    lib.mp_set_channel(2)
    toks = torch.randint(0, V, (B, S + 1), generator=g)
    lib.mp_set_channel(0)
    if stage_idx == 0:
        inp = toks[:, :-1].clone()
        sched.step(inp, return_outputs=ret)
    elif stage_idx == PP - 1:  # holds the last global stage (interleaved too)
        labels = toks[:, 1:].clone()
        losses = []
        sched.step(target=labels, losses=losses, return_outputs=ret)
    else:
        sched.step(return_outputs=ret)
    sched_end, sched_peak = counter()
    lib.mp_reset_peak(0)
    opt.step()
    o_end, o_peak = counter()
    out["steps"].append({k: v - base for k, v in dict(start=s0, sched_peak=sched_peak, sched_end=sched_end,
                         opt_peak=o_peak, end=o_end, peak=max(sched_peak, o_peak)).items()})
    dist.barrier()
print("MPPP " + json.dumps(out), flush=True)
dist.barrier()
dist.destroy_process_group()
