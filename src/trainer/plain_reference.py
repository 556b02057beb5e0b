"""A hand-written ("plain PyTorch") Llama training step on torch 2.11, per rank on CPU/Gloo, under memplan's
counting allocator: the loop the PyTorch docs and tutorials write, no framework.

    # 1 process (no FSDP; fp32, or bf16 by torch.autocast over fp32 weights):
    python plain_reference.py /tmp/shim.so '{"hidden":64,"layers":2,"heads":4,"kv_heads":4,"ffn":176,
        "vocab":256,"batch":2,"seq":64,"ac":"none","amp":"bf16","steps":3,"out":"/tmp/plain/runs/x"}'
    # FSDP2 over 2 ranks on Gloo:
    python -m torch.distributed.run --nproc-per-node 2 plain_reference.py /tmp/shim.so '{..., "fsdp":true,
        "mp":"bf16","reshard":null}'

The shim is memplan's csrc/shim.cpp built as a shared library (g++ line in src/trainer/fsdp2_reference.py).
reference_shim.py (install_counter, OpTrace) is imported from beside this file.

What the step is (torch 2.11.0, nothing patched):
- model: nn.Embedding; L blocks of nn.RMSNorm(h, eps=1e-5) -> attention (wq/wk/wv/wo nn.Linear(bias=False),
  torchtitan-style complex rotary: x.float() viewed as complex times freqs_cis, a (seq, hd/2) complex64 buffer
  computed for the run's seq_len, non-persistent), F.scaled_dot_product_attention(q, k, v, is_causal=True,
  enable_gqa=n_kv_heads < n_heads) with no repeat_kv; residual; nn.RMSNorm -> SwiGLU w2(silu(w1 x) * w3 x);
  residual; final nn.RMSNorm; untied output nn.Linear. Logits come out in the compute dtype.
- loss: F.cross_entropy(logits.float().view(-1, V), labels.view(-1)) (mean).
- optimizer: torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=True): the default on CUDA (on CPU tensors the
  default is the per-parameter loop; "foreach": null keeps that).
- AC ("ac": "full"): torch.utils.checkpoint.checkpoint(block, h, freqs_cis, use_reentrant=False) per block in
  the model's forward; preserve_rng_state left at its default True ("preserve_rng": false turns it off).
- FSDP ("fsdp": true): fully_shard(block, mesh, mp_policy, reshard_after_forward=cfg["reshard"]) for every block
  (null = the default: True for a non-root module), then fully_shard(model, ...) with the same reshard setting
  (null: False for the root). "mp": "bf16" gives MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32).
  Gradient reduction is FSDP2's default ReduceOp.AVG, which Gloo accepts in torch 2.11.
- "amp": "bf16" (only without FSDP): forward and loss inside torch.autocast(device_type="cpu", dtype=bf16).
- step, written as a tutorial writes it ("loop": "inline", the default: the loop body at module level, so `x`,
  `y`, `logits` and `loss` stay alive until the next iteration rebinds them), or as a function
  ("loop": "function": they die when it returns):
      x, y = batch (device copies: counted clones)
      optimizer.zero_grad(set_to_none=True)
      logits = model(x); loss = F.cross_entropy(logits.float().view(-1, V), y.view(-1))
      loss.backward(); optimizer.step()

Counting: channel 0 (device) from just before the model is built; the token batch itself is made uncounted (the
dataloader's CPU batch is host memory on a GPU), its clones counted. Allocations on any thread but the main one
(Gloo's worker and transport threads, the c10d store's) are not counted (csrc/shim.cpp mp_uncount_thread, as
src/trainer/cp_reference.py does): NCCL makes no such scratch buffers through the caching allocator. CPU autograd
runs backward on the calling thread, and FSDP2 allocates its all-gather and reduce-scatter buffers on the main
thread, so those are counted. Allocations made inside a c10d op (Gloo's _allgather_base_ makes an output-sized
temporary on the calling thread, freed by its worker when the collective finishes) are not counted either
(GlooScratch; "gloo_scratch": "counted" keeps them): NCCL writes into the buffers it is given.

Output, per rank, a JSON object in {out}.r{rank}.json and printed as `MPPLAIN {json}`: per step (relative to the
counter before the model was built) start (before the batch), after_zero_grad, fwd_peak/fwd_end (forward + loss),
bwd_peak/bwd_end, opt_peak/opt_end, end and peak; for the last step (unless "trace": false) "peak_trace": what is
alive at the step's peak and at each phase's peak, from the shim's event recorder (started after the
second-to-last step's zero_grad, so that everything freed in the last step was recorded), each allocation named
by its phase ("s-1:..." for the previous step), module, aten op and first output (reference_shim.OpTrace).
"""
import contextlib, ctypes, json, os, sys

lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from reference_shim import install_counter, OpTrace, uncount_other_threads

counter = install_counter(lib)  # channel 2 (uncounted) until set otherwise

H, L, NH, NKV, FF, V = cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["ffn"], cfg["vocab"]
B, S = cfg["batch"], cfg["seq"]
STEPS = cfg.get("steps", 3)
AC = cfg.get("ac", "none")
FSDP = cfg.get("fsdp", False)
AMP = cfg.get("amp", "none")
MP = cfg.get("mp", "fp32")
PRESERVE_RNG = cfg.get("preserve_rng", True)
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- the model
def precompute_freqs_cis(dim, end, theta=10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64 (end, dim/2)


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    f = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * f).flatten(3)
    xk_out = torch.view_as_real(xk_ * f).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, freqs_cis):
        bs, seqlen, _ = x.shape
        q = self.wq(x).view(bs, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads < self.n_heads)
        return self.wo(o.transpose(1, 2).contiguous().view(bs, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, ffn):
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim, eps=1e-5)
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-5)
        self.feed_forward = FeedForward(dim, ffn)

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, vocab, dim, n_layers, n_heads, n_kv_heads, ffn, seq_len, ac=False):
        super().__init__()
        self.ac = ac
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads, n_kv_heads, ffn) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(dim // n_heads, seq_len), persistent=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.ac:
                h = checkpoint(layer, h, self.freqs_cis, use_reentrant=False, preserve_rng_state=PRESERVE_RNG)
            else:
                h = layer(h, self.freqs_cis)
        return self.output(self.norm(h))


# ---------------------------------------------------------------------------------------------- setup
if FSDP:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy

    mesh = init_device_mesh("cpu", (world,))
else:
    rank, world = 0, 1


from torch.utils._python_dispatch import TorchDispatchMode

scratch = {"c10d_calls": 0}


class GlooScratch(TorchDispatchMode):
    """Runs every c10d op (FSDP2's _allgather_base_ / _reduce_scatter_base_ and the rest) with the counter off:
    their outputs are the tensors passed in, so whatever they allocate is the backend's scratch. Gloo's
    _allgather_base_ allocates an output-sized temporary on the calling thread and frees it when its worker
    finishes (a matter of timing); NCCL writes into the given buffers and allocates nothing."""

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
model = Llama(V, H, L, NH, NKV, FF, S, ac=AC == "full")
n_params = sum(p.numel() for p in model.parameters())
if FSDP:
    mp = MixedPrecisionPolicy(param_dtype=DT[MP], reduce_dtype=torch.float32) if MP != "fp32" else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.get("reshard"))
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.get("reshard"))
# foreach=True is what AdamW's default (foreach=None) picks on CUDA; on CPU tensors torch 2.11 picks the
# per-parameter loop (torch/optim/optimizer.py:_default_to_fused_or_foreach, which requires
# torch/utils/_foreach_utils.py:_get_foreach_kernels_supported_devices, i.e. cuda/xpu/...). "foreach": null
# keeps the CPU default.
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=cfg.get("foreach", True))
setup = counter()[0] - base
amp = torch.autocast(device_type="cpu", dtype=DT[AMP]) if AMP != "none" else contextlib.nullcontext()

# ---------------------------------------------------------------------------------------------- tracing
TRACE = cfg.get("trace", True)
oplog, phase = [], ["-"]
tracer = OpTrace(lib, model, phase, oplog) if TRACE else None
marks = {}


def group_alive(snap):
    rows = {}
    for aid, (nb, w) in snap.items():
        ph, mod, op, outs = w
        # Allocations outside any aten op (FSDP2's storage resizes, checkpoint's torch.get_rng_state()) by size.
        r = rows.setdefault((ph, mod, op, str(outs[:1]) if op != "?" else f"[size {nb}]"), [0, 0])
        r[0] += nb
        r[1] += 1
    return sorted(([v[0], v[1], *k] for k, v in rows.items()), key=lambda r: (r[2], -r[0]))


def peak_report(start, events, step_start):
    # Frees of what was allocated before the recording began are not recorded (zero_grad's of the grads, the
    # rebinding of the older step's names): the replay runs from the counter at the last step's start instead.
    cur = start
    sizes = {}
    for kind, aid, nb, tag in events[: marks["s:start"]]:
        if kind == 0:
            sizes[aid] = nb
            cur += nb
        elif aid in sizes:
            cur -= sizes.pop(aid)
    start += step_start - cur
    out = {"alive_before_recording": start, "marks": marks}
    spans = {"step": (marks["s:start"], len(events)), "fwd": (marks["s:fwd"], marks["s:bwd"]),
             "bwd": (marks["s:bwd"], marks["s:opt"]), "opt": (marks["s:opt"], len(events))}
    for name, (lo, hi) in spans.items():
        best, best_i, snap = tracer.alive_at_peak(start, events, lo, hi)
        out[name] = {"peak": best, "event": best_i, "alive": group_alive(snap)}
    return out


def mark(rec, name):
    if TRACE and recording:
        marks[("s:" if is_last else "s-1:") + name] = lib.mp_trace_pending()
    phase[0] = ("" if is_last else "s-1:") + name


# ---------------------------------------------------------------------------------------------- the loop
out = {"rank": rank, "world": world, "cfg": cfg, "params": n_params, "setup": setup, "steps": []}
LOOP = cfg.get("loop", "inline")
recording = False
mode = None


def get_batch(step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    lib.mp_set_channel(2)
    toks = torch.randint(0, V, (B, S + 1), generator=g)
    lib.mp_set_channel(0)
    return toks[:, :-1].clone(), toks[:, 1:].clone()  # x.to(device), y.to(device)


def rel(d):
    return {k: v - base for k, v in d.items()}


def train_step(step, rec):
    x, y = get_batch(step)
    optimizer.zero_grad(set_to_none=True)
    rec["after_zero_grad"] = counter()[0]
    mark(rec, "fwd")
    with amp:
        logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, V), y.view(-1))
    rec["fwd_end"], rec["fwd_peak"] = counter()
    lib.mp_reset_peak(0)
    mark(rec, "bwd")
    loss.backward()
    rec["bwd_end"], rec["bwd_peak"] = counter()
    lib.mp_reset_peak(0)
    mark(rec, "opt")
    optimizer.step()
    rec["opt_end"], rec["opt_peak"] = counter()
    return loss.item()


if FSDP and cfg.get("gloo_scratch", "uncounted") == "uncounted":
    GlooScratch().__enter__()
for step in range(STEPS):
    if FSDP:
        dist.barrier()
    uncount_other_threads(lib)
    is_last = step == STEPS - 1
    if TRACE and step == STEPS - 2:  # record from the previous step's batch on (frees in the last step are known)
        lib.mp_trace_start()
        rec_start = counter()[0] - base
        recording = True
        mode = tracer.mode()
        mode.__enter__()
    lib.mp_reset_peak(0)
    rec = {"start": counter()[0]}
    mark(rec, "start")
    if LOOP == "function":
        lval = train_step(step, rec)
    else:  # the tutorial's loop body, its names living on (module globals)
        x, y = get_batch(step)
        optimizer.zero_grad(set_to_none=True)
        rec["after_zero_grad"] = counter()[0]
        mark(rec, "fwd")
        with amp:
            logits = model(x)
            loss = F.cross_entropy(logits.float().view(-1, V), y.view(-1))
        rec["fwd_end"], rec["fwd_peak"] = counter()
        lib.mp_reset_peak(0)
        mark(rec, "bwd")
        loss.backward()
        rec["bwd_end"], rec["bwd_peak"] = counter()
        lib.mp_reset_peak(0)
        mark(rec, "opt")
        optimizer.step()
        rec["opt_end"], rec["opt_peak"] = counter()
        lib.mp_set_channel(2)
        lval = loss.item()
        lib.mp_set_channel(0)
    rec["end"] = counter()[0]
    rec = rel(rec)
    rec["peak"] = max(rec["fwd_peak"], rec["bwd_peak"], rec["opt_peak"])
    rec["loss"] = lval
    if TRACE and is_last:
        mode.__exit__(None, None, None)
        lib.mp_trace_stop()
        out["peak_trace"] = peak_report(rec_start, tracer.take_events(), rec["start"])
        out["logits_dtype"] = None
    out["steps"].append(rec)
if LOOP != "function":
    out["logits_dtype"] = str(logits.dtype).replace("torch.", "")
out["freqs_cis_bytes"] = model.freqs_cis.nbytes
out["c10d_calls"] = scratch["c10d_calls"]
if cfg.get("out"):
    with open(f"{cfg['out']}.r{rank}.json", "w") as f:
        json.dump(out, f)
print("MPPLAIN " + json.dumps({k: v for k, v in out.items() if k != "peak_trace"}), flush=True)
if FSDP:
    dist.barrier()
    dist.destroy_process_group()
