"""torchtitan 0.3.0's own Llama3 training step, per rank on CPU/Gloo, under memplan's counting allocator.

Needs torchtitan 0.3.0 with the torch it pulls in (2.15.0): `pip install torchtitan==0.3.0` into an empty venv
(docs/research/frameworks-on-torch-2.11.md, section 3.2b); the shim built against that torch with -std=c++20. The
measured configurations are in tests/data/torchtitan_0.3.0_torch_2.15.jsonl and
docs/research/torchtitan-0.3.0-measured.md.

    python -m torch.distributed.run --nproc_per_node=2 src/trainer/torchtitan03_reference.py \
        /tmp/tt03-shim.so '{"dim":64,"layers":2,"heads":4,"kv_heads":4,"vocab":256,"multiple_of":16,
        "batch":2,"seq":64,"ac":"none","dtype":"float32","mp":"bfloat16","reshard":"default",
        "opt":"fused","steps":4}'

What is torchtitan's own code (imported, not copied), in the order of torchtitan/trainer.py:Trainer.__init__:
- config: models/llama3/config_registry.py:llama3_debugmodel() (a Trainer.Config: ChunkedLossWrapper over
  CrossEntropyLoss, default_adamw, SelectiveAC), with training / parallelism / optimizer / activation_checkpoint
  fields set from the JSON; its model_spec's model replaced by a Llama3Model.Config of the JSON's dimensions built
  from torchtitan's own pieces (models/llama3/__init__.py: _build_llama3_layers with fused QKV and ComplexRoPE
  "llama" scaling, attn_backend "flex"; Embedding, RMSNorm and Linear configs and their inits).
- ParallelDims.from_config + dist_utils.set_spmd_backend; model_config.update_from_config(config=...) (RoPE caches
  for seq_len positions, per attention layer).
- model: model_config.build() under torch.device("meta") and set_default_dtype(training.dtype);
  model_spec.parallelize_fn = models/llama3/parallelize.py:parallelize_llama (AC, then apply_fsdp_to_decoder, which
  calls fully_shard even at one rank); to_empty("cpu"), init_weights(buffer_device=None), train().
- loss: config.loss.build() (components/loss.py:ChunkedLossWrapper, 8 chunks), set_lm_head(model.lm_head) and
  model._skip_lm_head = True as Trainer.__init__ does.
- optimizer: config.optimizer.build(model_parts=[model]) (components/optimizer/optimizer.py:OptimizersContainer);
  config.lr_scheduler.build(...).
- step: trainer.py:Trainer.train_step itself, called on a Trainer made with Trainer.__new__ and given the
  attributes train_step, forward_backward_step, post_dataloading_process and _forward_backward_body read
  (config, parallel_dims, model_parts, model_config, loss_fn, optimizers, lr_schedulers, train_context from
  dist_utils.get_spmd_context, fwd_bwd_fn = its own _forward_backward_body, gradient_accumulation_steps 1, ...).
  Its zero_grad is `set_to_none=training.disable_cuda_graphs` (default False: gradients are zeroed, not freed, so
  they live from the first backward on); the CUDA-graph wrapper it would add on a GPU falls back to eager
  off CUDA (distributed/cudagraph.py:wrap_with_cuda_graph), as the CPU run is.

CPU patches (none changes what a GPU run allocates on the device, beyond what is noted):
 1. torchtitan.tools.utils.device_type = "cpu", device_module = torch.cpu, before anything imports them
    (tools/utils.py:55 falls back to "cuda").
 2. The attention kernel. FlexAttention.compiled_flex_attn (models/common/attention.py) is replaced by a call of
    torch's CPU flash kernel, aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True), which
    saves for backward what GPU flex (and flash) attention saves: q, k, v, the output (in the query's
    layout: BLNH in memory, as flex's output, torch _inductor/kernel/flex/flex_attention.py:400) and an fp32
    log-sum-exp [B, H, S]. The block mask is still built (Decoder.get_attention_masks, torchtitan's
    torch.compile'd create_block_mask) and passed; the causal kernel ignores it (one document per sequence here, so the mask
    is causal). Flex itself cannot train on CPU: no CPU backward (torch nn/attention/flex_attention.py
    _validate_device), and its eager fallback materialises dense S x S scores no GPU holds.
 3. RMSNorm (torch nn.RMSNorm, models/common/nn_modules.py): on CUDA F.rms_norm runs aten._fused_rms_norm,
    which saves input, weight and an fp32 rstd (torch tools/autograd/derivatives.yaml) and allocates only its
    outputs; on CPU torch 2.15 decomposes it (fp32 copies, the normalised tensor kept in fp32; its backward
    makes several fp32 temporaries at the final norm, where the backward's peak is). Replaced by an autograd
    Function that allocates and saves what the CUDA kernel does, its arithmetic uncounted (channel 2) as
    inside one kernel.
 4. Under selective AC the substitute op is added to the save list (a GPU saves the flex_attention HOP's
    output, distributed/activation_checkpoint.py:_get_default_save_ops; the CPU op is on no list).
 5. Gloo has no PREMUL_SUM: set_force_sum_reduction_for_comms(True) on every FSDP module with more than one
    rank (torchtitan's disable_fsdp_gradient_division sets the factor 1.0; FSDP2 would use
    _make_nccl_premul_sum).
 6. activation_checkpoint.preserve_rng_state = False (default True stashes torch.get_rng_state(), a 5,056-B CPU
    uint8 tensor per checkpointed block per forward, which on a GPU is host memory).
 7. The data iterator yields the batch as counted tensors ("input", "positions" 0..S-1, labels): the device
    copies a GPU run makes with `.to(device)` (a no-op on CPU). Their uncounted CPU originals are not made.
 8. metrics_processor.should_log returns False and the checkpointer is a stub (no logging step; its loss
    clone and scalar reductions are a few bytes).

Counting: channel 0 (device) from just before the model is built. Allocations on any thread but the main one
(Gloo's worker and transport threads, the c10d store's) are not counted, and every c10d op runs with the counter
off (GlooScratch: Gloo's _allgather_base_ makes an output-sized temporary; NCCL writes into the buffers it is
given). As torchtitan's Trainer does, a tools/utils.py:GarbageCollection takes control of Python's collector
(gc.disable(), a collection every training.gc_freq steps, run before each step).

Each rank prints `MPTT3 {json}` (and writes {out}.r{rank}.json): per step, relative to the counter before the
model was built: start (before train_step), fwd_peak/fwd_end (mask + model forward), loss_peak/loss_end (the
chunked loss with its per-chunk lm_head backward), bwd_peak/bwd_end (the decoder's backward),
clip_peak/clip_end, opt_peak/opt_end, end, peak. The shim's event recorder runs throughout; every steady step
(the second on) is replayed from its events, each allocation named by the aten op (TorchDispatchMode), module and
phase that made it: "replay_steps" holds per phase [peak as counted, peak without op-internal scratch] (scratch:
allocated and freed inside one aten op, i.e. CPU kernels' workspaces such as oneDNN's bf16 GEMM reorders; a GPU
kernel uses cuBLAS's workspace, which memplan counts on its own), "replay" per phase the lowest of the steady
steps (FSDP2 on Gloo sometimes keeps [norm, lm_head]'s all-gather output through the loss loop, a matter of
timing; docs/research/torchtitan-0.3.0-measured.md), "alive_at_phase_peaks" what the step allocated that is alive
at that peak, "scratch_ops" which ops made scratch. "peak_trace": true (or "full", every event) lists what is
alive at the last step's counted peak.
"""
import ctypes, dataclasses, json, os, sys, types

lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_shim import install_counter, uncount_other_threads

counter = install_counter(lib)  # channel 2 (uncounted) until set otherwise

import torchtitan.tools.utils as tt_utils

tt_utils.device_type, tt_utils.device_module = "cpu", torch.cpu  # patch 1

from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss, IGNORE_INDEX
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils
import torchtitan.distributed.activation_checkpoint as tt_ac
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from torchtitan.models import llama3 as tt_llama3
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
from torchtitan.models.common.attention import FlexAttention
from torchtitan.models.llama3.config_registry import llama3_debugmodel
from torchtitan.trainer import Trainer

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

B, S = cfg["batch"], cfg["seq"]
STEPS = cfg.get("steps", 3)
AC = cfg.get("ac", "none")


# ---- patch 2: the attention kernel ----
def cpu_flash_attn(q, k, v, *, score_mod, block_mask, scale, enable_gqa, return_aux, kernel_options):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, types.SimpleNamespace(lse=lse)


FlexAttention.compiled_flex_attn = staticmethod(cpu_flash_attn)


# ---- patch 3: the RMSNorm kernel ----
class FusedRMSNorm(torch.autograd.Function):
    """What CUDA's aten._fused_rms_norm allocates and saves (torch derivatives.yaml: _fused_rms_norm saves input,
    weight and rstd = result1; its backward makes grad_input and grad_weight): the output (input dtype) and an
    fp32 rstd [..., 1] in forward, grad_input and grad_weight in backward. The arithmetic runs uncounted
    (channel 2), as inside one kernel; on CPU torch 2.15 decomposes F.rms_norm into ops whose fp32 copies would
    otherwise be counted (docs/research/torchtitan-0.2.2-measured.md, finding 5)."""

    @staticmethod
    def forward(ctx, x, w, eps):
        ch = lib.mp_get_channel()
        lib.mp_set_channel(2)
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = xf * r * w.float()
        lib.mp_set_channel(ch)
        out, rstd = torch.empty_like(x), torch.empty_like(r)
        out.copy_(y)
        rstd.copy_(r)
        del xf, r, y
        ctx.save_for_backward(x, w, rstd)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w, rstd = ctx.saved_tensors
        ch = lib.mp_get_channel()
        lib.mp_set_channel(2)
        xf, gf, wf = x.float(), g.float(), w.float()
        xhat = xf * rstd
        gw = (gf * xhat).reshape(-1, xf.shape[-1]).sum(0)
        gx = gf * wf
        gi = rstd * (gx - xhat * (gx * xhat).mean(-1, keepdim=True))
        lib.mp_set_channel(ch)
        grad_input, grad_weight = torch.empty_like(x), torch.empty_like(w)
        grad_input.copy_(gi)
        grad_weight.copy_(gw)
        del xf, gf, wf, xhat, gw, gx, gi
        return grad_input, grad_weight, None


RMSNorm.forward = lambda self, x: FusedRMSNorm.apply(x, self.weight, self.eps)
_save_ops = tt_ac._get_default_save_ops
tt_ac._get_default_save_ops = lambda: _save_ops() | {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}  # patch 4

# ---- the config ----
config = llama3_debugmodel()
dim, heads = cfg["dim"], cfg["heads"]
spec = config.model_spec
model_config = tt_llama3.Llama3Model.Config(
    dim=dim,
    vocab_size=cfg["vocab"],
    tok_embeddings=Embedding.Config(num_embeddings=cfg["vocab"], embedding_dim=dim,
                                    param_init=tt_llama3._EMBEDDING_INIT),
    norm=RMSNorm.Config(normalized_shape=dim, param_init=tt_llama3._NORM_INIT),
    lm_head=Linear.Config(in_features=dim, out_features=cfg["vocab"],
                          param_init=tt_llama3._output_linear_init(dim)),
    layers=tt_llama3._build_llama3_layers(
        fuse_qkv=True, n_layers=cfg["layers"], dim=dim, n_heads=heads, n_kv_heads=cfg.get("kv_heads"),
        hidden_dim=compute_ffn_hidden_dim(dim, multiple_of=cfg.get("multiple_of", 256)),
        rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=131072, theta=500000, scaling="llama"),
        attn_backend="flex"),
)
config.model_spec = dataclasses.replace(spec, model=model_config)
config.loss = ChunkedLossWrapper.Config(num_chunks=cfg.get("loss_chunks", 8),
                                       loss_fn=CrossEntropyLoss.Config(global_vocab_size=cfg["vocab"]))
config.training.local_batch_size = B
config.training.seq_len = S
config.training.steps = STEPS
config.training.dtype = cfg.get("dtype", "float32")
config.training.mixed_precision_param = cfg.get("mp", "bfloat16")
config.training.max_norm = cfg.get("max_norm", 1.0)
if cfg.get("disable_cuda_graphs") is not None:
    config.training.disable_cuda_graphs = cfg["disable_cuda_graphs"]
config.parallelism.fsdp_reshard_after_forward = cfg.get("reshard", "default")
config.optimizer.implementation = cfg.get("opt", "fused")
config.compile.enable = False
if AC == "none":
    config.activation_checkpoint = None
elif AC == "full":
    config.activation_checkpoint = FullAC.Config(preserve_rng_state=False)  # patch 6
elif AC == "op":
    config.activation_checkpoint = SelectiveAC.Config(preserve_rng_state=False)
else:
    raise SystemExit(f"ac {AC}: torchtitan 0.3 has none, full and selective (op)")

parallel_dims = ParallelDims.from_config(config.parallelism, world)
# Trainer.__init__ takes control of garbage collection (tools/utils.py:GarbageCollection: gc.disable(), a
# generation-1 collection every gc_freq steps, run by Trainer.train before each train_step).
gc_handler = tt_utils.GarbageCollection(gc_freq=config.training.gc_freq)
dist_utils.set_spmd_backend(config.parallelism.spmd_backend)
model_config.update_from_config(config=config)

torch.manual_seed(0)
lib.mp_set_channel(0)
lib.mp_reset_peak(0)
base = counter()[0]
# The shim's event recorder runs from here to the end, so that a step's replay also sees frees of what
# earlier steps (or the setup) allocated (zero_grad(set_to_none=True) frees the previous gradients).
lib.mp_trace_pending.restype = ctypes.c_int64
lib.mp_trace_take.restype = ctypes.c_int64
lib.mp_trace_start()
alive_before = {}  # allocation id -> bytes, of what the steps so far and the setup left alive


def flush():
    """Applies the recorded events so far to `alive_before` (the buffer is then empty)."""
    n = lib.mp_trace_pending()
    buf = (ctypes.c_int64 * (4 * n))()
    got = lib.mp_trace_take(buf, n)
    for i in range(got):
        kind, aid, nb = buf[4 * i], buf[4 * i + 1], buf[4 * i + 2]
        if kind == 0:
            alive_before[aid] = nb
        else:
            alive_before.pop(aid, None)


with torch.device("meta"), tt_utils.set_default_dtype(TORCH_DTYPE_MAP[config.training.dtype]):
    model = model_config.build()
model = spec.parallelize_fn(model, parallel_dims=parallel_dims, training=config.training,
                            parallelism=config.parallelism, compile_config=config.compile,
                            ac_config=config.activation_checkpoint, dump_folder="/tmp")
from torch.distributed.fsdp import FSDPModule

n_fsdp = sum(isinstance(m, FSDPModule) for m in model.modules())
if world > 1:  # patch 5
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
model.to_empty(device="cpu")
with torch.no_grad():
    model.init_weights(buffer_device=None)
model.train()
after_model = counter()[0] - base
loss_fn = config.loss.build(compile_config=config.compile)
assert isinstance(loss_fn, ChunkedLossWrapper)
loss_fn.set_lm_head(model.lm_head)
model._skip_lm_head = True
optimizers = config.optimizer.build(model_parts=[model])
lr_schedulers = config.lr_scheduler.build(optimizers=optimizers, training_steps=STEPS)

# ---- a Trainer holding what train_step reads ----
rec = {}
phase = ["-"]


def mark(name):
    rec[name + "_end"], rec[name + "_peak"] = counter()
    lib.mp_reset_peak(0)


trainer = Trainer.__new__(Trainer)
trainer.config = config
trainer.parallel_dims = parallel_dims
trainer.model_parts = [model]
trainer.model_config = model_config
trainer.device = torch.device("cpu")
trainer.gradient_accumulation_steps = 1
trainer.num_pipeline_parallel_microbatches = 1
trainer.optimizers = optimizers
trainer.lr_schedulers = lr_schedulers
trainer.step = 0
trainer.ntokens_seen = 0
trainer.train_context = dist_utils.get_spmd_context(parallel_dims=parallel_dims, spmd_typechecking=False)
trainer.metrics_processor = types.SimpleNamespace(should_log=lambda step: False, ntokens_since_last_log=0,
                                                  data_loading_times=[])  # patch 8


class LossPhase:
    """The trainer's loss_fn, marking where the chunked loss (with its lm_head backward) ends."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *a, **k):
        mark("fwd")  # the model's forward (and the mask) is done: the loss is called with its output
        phase[0] = "loss"
        out = self.inner(*a, **k)
        mark("loss")
        phase[0] = "bwd"
        return out


trainer.loss_fn = LossPhase(loss_fn)
_body = Trainer._forward_backward_body


def fwd_bwd(*a):
    out = _body(trainer, *a)
    mark("bwd")
    phase[0] = "clip"
    return out


trainer.fwd_bwd_fn = fwd_bwd
trainer.checkpointer = types.SimpleNamespace(maybe_wait_for_staging=lambda: (mark("clip"), phase.__setitem__(0, "opt")))
V = cfg["vocab"]


def data(step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    toks = torch.randint(0, V, (B, S + 1), generator=g)
    lib.mp_set_channel(0)  # patch 7: the device copies
    batch = ({"input": toks[:, :-1].clone(), "positions": torch.arange(S).repeat(B, 1)}, toks[:, 1:].clone())
    lib.mp_set_channel(2)
    return batch


uncount_other_threads(lib)
from torch.utils._python_dispatch import TorchDispatchMode

c10d_calls = [0]


class GlooScratch(TorchDispatchMode):
    """Runs every c10d op with the counter off (channel 2): their outputs are the tensors passed in, so what
    they allocate is the backend's scratch (Gloo's _allgather_base_ makes an output-sized temporary on the
    calling thread and frees it on its worker); NCCL writes into the given buffers."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "c10d":
            return func(*args, **(kwargs or {}))
        c10d_calls[0] += 1
        ch = lib.mp_get_channel()
        lib.mp_set_channel(2)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            lib.mp_set_channel(ch)


from reference_shim import OpTrace

oplog = []
tracer = OpTrace(lib, model, phase, oplog)
PT = cfg.get("peak_trace")


def replay(start, events, marks, before):
    """The traced step replayed from `start` bytes: per phase, the peak as counted and the peak without
    op-internal scratch (allocated and freed inside one aten op: CPU kernels' workspaces, e.g. oneDNN's bf16
    GEMM reorders, which a GPU's kernels take from cuBLAS's workspace or not at all); the ops that made that
    scratch; and what was allocated in the step and is alive at each phase's scratch-free peak, grouped by
    (phase, module, op, first output) of the op that made it. `before`: what was alive when the step began
    (id -> bytes), whose frees in the step count too; updated to what is alive at its end."""
    windows = sorted((n0, n1, op, mod, ph, outs) for n0, n1, op, mod, ph, outs in oplog)
    owner = {}
    for n0, n1, op, mod, ph, outs in windows:
        for i in range(n0, n1):
            owner[i] = (n0, op, mod, ph, str(outs[:1]))
    alloc_at, scratch = {}, set()
    for i, (kind, aid, nb, tag) in enumerate(events):
        if kind == 0:
            alloc_at[aid] = i
        elif aid in alloc_at and i in owner and owner.get(alloc_at[aid], (None,))[0] == owner[i][0]:
            scratch.add(aid)
    bounds = sorted(marks.items(), key=lambda kv: kv[1])
    res, alive = {}, {}
    live, cur, cur_ns, lo = {}, start, start, 0
    for name, hi in bounds:
        best, best_ns, snap = cur, cur_ns, {a: b for a, b in live.items() if b > 0}
        for i in range(lo, hi):
            kind, aid, nb, tag = events[i]
            if kind == 0:
                cur += nb
                if aid not in scratch:
                    live[aid] = nb
                    cur_ns += nb
                else:
                    live[aid] = -nb
            elif aid in live:
                nb = live.pop(aid)
                cur -= abs(nb)
                if nb > 0:
                    cur_ns -= nb
            elif aid in before:
                nb = before.pop(aid)
                cur -= nb
                cur_ns -= nb
            best = max(best, cur)
            if cur_ns > best_ns:
                best_ns, snap = cur_ns, {a: b for a, b in live.items() if b > 0}
        res[name] = (best, best_ns)
        rows = {}
        for aid, nb in snap.items():
            w = owner.get(alloc_at[aid], (0, "?", "-", "?", "[]"))[1:]
            r = rows.setdefault((w[2], w[1], w[0], w[3]), [0, 0])
            r[0] += nb
            r[1] += 1
        alive[name] = sorted([v[0], v[1], *k] for k, v in rows.items())
        lo = hi
    for kind, aid, nb, tag in events[lo:]:
        if kind == 0:
            live[aid] = nb
        elif aid in live:
            live.pop(aid)
        else:
            before.pop(aid, None)
    before.update({a: abs(b) for a, b in live.items()})
    ops = {}
    for aid in scratch:
        op = owner[alloc_at[aid]][1]
        ops[op] = ops.get(op, 0) + 1
    return res, ops, alive


out = {"rank": rank, "world": world, "cfg": cfg, "n_fsdp_modules": n_fsdp, "after_model": after_model,
       "setup": counter()[0] - base, "steps": []}
trace_marks = {}
_mark = mark


def mark(name):  # noqa: F811  (the phase marks also note where the traced step's events stand)
    _mark(name)
    trace_marks[name] = lib.mp_trace_pending()


for step in range(STEPS):
    dist.barrier()
    lib.mp_set_channel(2)
    batch = data(step)
    lib.mp_set_channel(0)
    tracing = step >= 1  # every steady step (the first makes the optimizer states)
    oplog.clear()
    lib.mp_reset_peak(0)
    rec = {"start": counter()[0]}
    modes = [GlooScratch()] + ([tracer.mode()] if tracing else [])
    gc_handler.run(step + 1)
    flush()
    trace_marks.clear()
    rec["start"] = counter()[0]
    for m in modes:
        m.__enter__()
    phase[0] = "fwd"
    trainer.train_step(iter([batch]))
    mark("opt")
    for m in reversed(modes):
        m.__exit__(None, None, None)
    del batch
    rec["end"] = counter()[0]
    if not tracing:
        flush()
    else:
        events = tracer.take_events()
        res, ops, alive = replay(rec["start"], events, dict(trace_marks), alive_before)
        res = {k: [v[0] - base, v[1] - base] for k, v in res.items()}
        out.setdefault("replay_steps", []).append(res)
        # Per phase, the lowest of the steady steps (Gloo's timing: FSDP2 sometimes keeps the
        # [norm, lm_head] all-gather output through the loss loop, see the measured doc), and
        # what is alive at that step's phase peak.
        best = out.setdefault("replay", {})
        for k, v in res.items():
            if k not in best or v[1] < best[k][1]:
                best[k] = v
                out.setdefault("alive_at_phase_peaks", {})[k] = alive[k]
        out["scratch_ops"] = ops
        out["trace_marks"] = dict(trace_marks)
        if PT and step == STEPS - 1:
            best, best_i, snap = tracer.alive_at_peak(rec["start"], events)  # (frees of older tensors not seen)
            rows = {}
            for aid, (nb, w) in snap.items():
                key = (w[0], w[1], w[2], str(w[3][:1]))
                r = rows.setdefault(key, [0, 0])
                r[0] += nb
                r[1] += 1
            seq = None
            if PT == "full":  # every event: [A/F, event index, bytes, phase, module, op, first output, current]
                who = tracer.owners()
                seq, cur2, ids = [], rec["start"], {}
                for i, (kind, aid, nb, tag) in enumerate(events):
                    if kind == 0:
                        w = who.get(i, ("?", "-", "?", []))
                        ids[aid] = (nb, (w[0], w[1], w[2], str(w[3][:1])))
                        cur2 += nb
                        seq.append(["A", i, nb, *ids[aid][1], cur2 - base])
                    elif aid in ids:
                        nb0, w = ids.pop(aid)
                        cur2 -= nb0
                        seq.append(["F", i, nb0, *w, cur2 - base])
            out["peak_trace"] = {"peak": best - base, "event": best_i, "seq": seq,
                                 "alive_from_step": sorted([v[0], v[1], *k] for k, v in rows.items())}
    for k in list(rec):
        rec[k] -= base
    rec["peak"] = max(rec[k] for k in rec if k.endswith("_peak"))
    out["steps"].append(rec)
    dist.barrier()
out["c10d_calls"] = c10d_calls[0]
out["params"] = sum(p.numel() for p in model.parameters())
out["param_tensors"] = sum(1 for _ in model.parameters())
out["ffn"] = max(p.shape[0] for n, p in model.named_parameters() if n.endswith("feed_forward.w1.weight"))
if cfg.get("out"):
    with open(f"{cfg['out']}.r{rank}.json", "w") as f:
        json.dump(out, f)
print("MPTT3 " + json.dumps(out), flush=True)
dist.barrier()
dist.destroy_process_group()
