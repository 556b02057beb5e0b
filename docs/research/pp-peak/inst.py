"""PyTorch's own torch.distributed.pipelining, per stage on CPU/Gloo, for checking memplan's estimator.

The tiny torchtitan Llama of src/trainer/fsdp2_reference.py (same model code), cut into pp=2 stages
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
passes), "steps" (default 2). Each rank's tokens/labels for the whole step (mbs * n_microbatches
rows) are made inside the counted region on the stage that consumes them.
"""
import ctypes, json, math, os, sys

lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe, Schedule1F1B

err = ctypes.c_char_p()
assert lib.mp_install_counting_allocator(ctypes.byref(err)) == 0
lib.mp_set_channel(2)


def counter():
    c, p = ctypes.c_int64(), ctypes.c_int64()
    lib.mp_counter(0, ctypes.byref(c), ctypes.byref(p))
    return c.value, p.value


H, L, NH, NKV, FF, V = cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["ffn"], cfg["vocab"]
MB, NMB, S = cfg["mbs"], cfg["n_microbatches"], cfg["seq"]
B = MB * NMB
HD = H // NH
PP = cfg.get("pp", 2)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def precompute_freqs_cis(dim, end, theta=10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    f = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * f).flatten(3)
    xk_out = torch.view_as_real(xk_ * f).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x, n_rep):
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, n_kv_heads * n_rep, head_dim)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(H, NH * HD, bias=False)
        self.wk = nn.Linear(H, NKV * HD, bias=False)
        self.wv = nn.Linear(H, NKV * HD, bias=False)
        self.wo = nn.Linear(NH * HD, H, bias=False)

    def forward(self, x, freqs_cis):
        bs, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bs, seqlen, -1, HD)
        xk = xk.view(bs, seqlen, -1, HD)
        xv = xv.view(bs, seqlen, -1, HD)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        keys = repeat_kv(xk, NH // NKV)
        values = repeat_kv(xv, NH // NKV)
        xq, xk, xv = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        output = F.scaled_dot_product_attention(xq, xk, xv, is_causal=True)
        output = output.transpose(1, 2).contiguous().view(bs, seqlen, -1)
        return self.wo(output)


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(H, FF, bias=False)
        self.w2 = nn.Linear(FF, H, bias=False)
        self.w3 = nn.Linear(H, FF, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.feed_forward = FeedForward()
        self.attention_norm = RMSNorm(H)
        self.ffn_norm = RMSNorm(H)

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class StageModel(nn.Module):
    """torchtitan's pipeline split: every stage keeps freqs_cis; absent parts are None."""

    def __init__(self, stage):
        super().__init__()
        first, last = stage == 0, stage == PP - 1
        per = L // PP
        self.tok_embeddings = nn.Embedding(V, H) if first else None
        self.register_buffer("freqs_cis", precompute_freqs_cis(HD, S * 2), persistent=True)
        self.layers = nn.ModuleDict({str(i): TransformerBlock() for i in range(stage * per, (stage + 1) * per)})
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



from torch.utils._python_dispatch import TorchDispatchMode
from torch.distributed.tensor import DTensor
import torch.distributed.pipelining.stage as _stg
import torch.distributed.pipelining.schedules as _sch
OPS = []          # tag-1 -> (opname, action)
ACT = ["setup"]   # current action label stack
ACTIONS = []      # (label, first_op_idx)
lib.mp_trace_set_tag.argtypes = [ctypes.c_int64]
lib.mp_live_dump.restype = ctypes.c_int64
lib.mp_trace_take.restype = ctypes.c_int64
ACTTAG0 = 10**9
def cur_act_tag():
    return ACTTAG0 + len(ACTIONS)
class Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        OPS.append((str(func), ACT[-1]))
        prev = lib.mp_trace_get_tag()
        lib.mp_trace_set_tag(len(OPS))
        try:
            return func(*args, **(kwargs or {}))
        finally:
            lib.mp_trace_set_tag(prev)
def push(label):
    ACT.append(label); ACTIONS.append((label, len(OPS))); lib.mp_trace_set_tag(cur_act_tag())
def pop():
    ACT.pop(); ACTIONS.append(("/" , len(OPS))); lib.mp_trace_set_tag(cur_act_tag())
SNAP_HOOK = [None]
def wrap(cls, name, lab):
    orig = getattr(cls, name)
    def w(self, *a, **k):
        push(lab(a, k))
        try:
            return orig(self, *a, **k)
        finally:
            if SNAP_HOOK[0]: SNAP_HOOK[0]("end " + ACT[-1])
            pop()
    setattr(cls, name, w)
wrap(_stg._PipelineStageBase, "forward_one_chunk", lambda a, k: f"F{a[0]}")
wrap(_stg._PipelineStageBase, "backward_one_chunk", lambda a, k: f"B{a[0]}")
wrap(_stg._PipelineStageBase, "perform_reduce_grad", lambda a, k: "REDUCE_GRAD")
wrap(_sch._PipelineSchedule, "_maybe_compute_loss", lambda a, k: f"LOSS{a[3]}")
from torch.distributed.fsdp._fully_shard import _fsdp_param_group as _fpg
for nm in ["unshard", "wait_for_unshard", "pre_forward", "post_forward", "pre_backward", "post_backward", "reshard"]:
    if hasattr(_fpg.FSDPParamGroup, nm):
        wrap(_fpg.FSDPParamGroup, nm, (lambda nm: (lambda a, k: "fsdp." + nm))(nm))

def live_dump():
    n = lib.mp_live_dump(None, 0)
    buf = (ctypes.c_int64 * (4 * (n + 1000)))()
    n = lib.mp_live_dump(buf, n + 1000)
    return {buf[4*i]: (buf[4*i+1], buf[4*i+2], buf[4*i+3]) for i in range(n)}

def tdesc(t):
    return f"{tuple(t.shape)}:{str(t.dtype).replace('torch.','')}"
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
dp = world // PP
mesh = init_device_mesh("cpu", (PP, dp), mesh_dim_names=("pp", "dp_shard"))
stage_idx = mesh.get_local_rank("pp")
torch.manual_seed(0)
lib.mp_set_channel(0)
lib.mp_reset_peak(0)
base = counter()[0]
model = StageModel(stage_idx)
if dp > 1:
    for block in model.layers.values():
        fully_shard(block, mesh=mesh["dp_shard"], reshard_after_forward=False)
    fully_shard(model, mesh=mesh["dp_shard"], reshard_after_forward=False)
meta = torch.device("meta")
in_meta = (torch.empty(MB, S, dtype=torch.long, device=meta) if stage_idx == 0
           else torch.empty(MB, S, H, device=meta))
out_meta = (torch.empty(MB, S, H, device=meta) if stage_idx < PP - 1 else torch.empty(MB, S, V, device=meta))
stage = PipelineStage(model, stage_idx, PP, torch.device("cpu"), input_args=(in_meta,), output_args=(out_meta,),
                      group=mesh.get_group("pp"))
Sched = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[cfg["schedule"]]
sched = Sched(stage, n_microbatches=NMB, loss_fn=loss_fn)
OPT=None
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
setup = counter()[0] - base
out = {"rank": rank, "stage": stage_idx, "dp": dp, "schedule": cfg["schedule"], "setup": setup, "steps": []}
ret = bool(cfg.get("return_outputs", False))
ID_LABEL = {}
def snapshot(where):
    m = {}
    def add(t, lab):
        if isinstance(t, DTensor): t = t._local_tensor
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu": return
        try: p = t.untyped_storage().data_ptr()
        except Exception: return
        if p and p not in m: m[p] = lab + " " + tdesc(t)
    for n, p in model.named_parameters():
        sh = isinstance(p, DTensor)
        add(p, "param_shard" if sh else ("param_unsharded" if dp > 1 else "param"))
        if p.grad is not None: add(p.grad, "grad_shard" if sh else ("grad_unsharded" if dp > 1 else "grad"))
    if dp > 1:
        for mod in model.modules():
            for n, p in mod.named_parameters(recurse=False): pass
    for n, b in model.named_buffers(): add(b, "buffer")
    if dp > 1:
        from torch.distributed.fsdp._fully_shard._fully_shard import FSDPModule
        for mod in model.modules():
            if isinstance(mod, FSDPModule):
                st = mod._get_fsdp_state(); pg = st._fsdp_param_group
                if pg is None: continue
                for fp in pg.fsdp_params:
                    add(fp.sharded_param, "param_shard")
                    if fp.sharded_param.grad is not None: add(fp.sharded_param.grad, "grad_shard")
                    if hasattr(fp, "_unsharded_param"):
                        up = fp._unsharded_param
                        if up.untyped_storage().size() > 0: add(up, "unsharded_param")
                        if up.grad is not None: add(up.grad, "unsharded_grad")
                    for t in fp.all_gather_outputs:
                        if t.untyped_storage().size() > 0: add(t, "all_gather_out")
                    if fp.unsharded_accumulated_grad is not None: add(fp.unsharded_accumulated_grad, "unsharded_acc_grad")
    for st in opt.state.values():
        for k, v in st.items(): add(v, "opt_" + k)
    for mb, infos in stage.args_recv_info.items():
        for ri in infos:
            if hasattr(ri, "buffer"): add(ri.buffer, f"act_recv_buf mb{mb}")
    for mb, infos in stage.grad_recv_info.items():
        for ri in infos:
            if hasattr(ri, "buffer"): add(ri.buffer, f"grad_recv_buf mb{mb}")
    seen = set(); keep = []
    def walk(fn, lab):
        stack = [fn]
        while stack:
            f = stack.pop()
            if f is None or id(f) in seen: continue
            seen.add(id(f)); keep.append(f)
            for a in dir(f):
                if a.startswith("_saved_"):
                    try: v = getattr(f, a)
                    except Exception: continue
                    vs = v if isinstance(v, (tuple, list)) else [v]
                    for x in vs:
                        if isinstance(x, torch.Tensor): add(x, f"saved {lab} {type(f).__name__}.{a}")
            for nf, _ in f.next_functions: stack.append(nf)
    for i, l in enumerate(sched._internal_losses):
        add(l, f"loss mb{i}")
    for mb, (outs, ins) in stage.fwd_cache.items():
        for o in outs: add(o, f"fwd_cache_out mb{mb}")
        for x in ins: add(x, f"fwd_cache_in mb{mb}")
    for i, l in enumerate(sched._internal_losses):
        if l.grad_fn is not None: walk(l.grad_fn, f"mb{i}")
    for mb, (outs, ins) in stage.fwd_cache.items():
        for o in outs:
            if o.grad_fn is not None: walk(o.grad_fn, f"mb{mb}")
    for mb, g in stage.bwd_cache.items():
        for x in g: add(x, f"bwd_cache mb{mb}")
    for i, o in enumerate(stage.output_chunks): add(o, f"output_chunk mb{i}")
    for idn, (sz, tag, ptr) in live_dump().items():
        if ptr in m and idn not in ID_LABEL: ID_LABEL[idn] = m[ptr]
SNAP_HOOK[0] = snapshot
mode = Mode(); mode.__enter__()
TRACE = int(cfg.get("trace_step", 1))

for step in range(cfg.get("steps", 2)):
    opt.zero_grad()
    dist.barrier()
    lib.mp_reset_peak(0)
    s0 = counter()[0]
    if step == TRACE:
        snapshot("start"); start_live = live_dump(); lib.mp_trace_start(); op0 = len(OPS); act0 = len(ACTIONS)
    g = torch.Generator().manual_seed(step)
    lib.mp_set_channel(2)
    toks = torch.randint(0, V, (B, S + 1), generator=g)
    lib.mp_set_channel(0)
    if stage_idx == 0:
        inp = toks[:, :-1].clone()
        sched.step(inp, return_outputs=ret)
    elif stage_idx == PP - 1:
        labels = toks[:, 1:].clone()
        losses = []
        sched.step(target=labels, losses=losses, return_outputs=ret)
    else:
        sched.step(return_outputs=ret)
    sched_end, sched_peak = counter()
    if step == TRACE:
        snapshot("sched_end")
        lib.mp_trace_stop()
        n = lib.mp_trace_pending(); ev = (ctypes.c_int64 * (4 * n))(); n = lib.mp_trace_take(ev, n)
        cur = sum(v[0] for v in start_live.values()); live = {k: (v[0], v[1]) for k, v in start_live.items()}
        best = cur; best_i = -1; best_live = dict(live)
        for i in range(n):
            op, idn, by, tg = ev[4*i:4*i+4]
            if op == 0: live[idn] = (by, tg); cur += by
            else:
                if idn in live: del live[idn]
                cur -= by
            if cur > best: best, best_i, best_live = cur, i, dict(live)
        # where
        def tagname(tg):
            if tg == 0: return "pre"
            if tg >= ACTTAG0:
                a = tg - ACTTAG0 - 1
                return "act:" + (ACTIONS[a][0] if 0 <= a < len(ACTIONS) else "?")
            o = OPS[tg-1]; return f"{o[1]}|{o[0]}"
        pk_tag = ev[4*best_i+3] if best_i >= 0 else 0
        rep = {"rank": rank, "stage": stage_idx, "peak_rel": best - base, "peak_event": best_i, "n_events": n,
               "peak_alloc_tag": tagname(pk_tag), "items": [],
               "actions": [a for a, _ in ACTIONS[act0:] if a != "/" and not a.startswith("fsdp.")]}
        for idn, (by, tg) in sorted(best_live.items()):
            rep["items"].append([idn, by, ID_LABEL.get(idn, "?"), tagname(tg)])
        # actions list around peak
        json.dump(rep, open(f"/tmp/pp-gap/out/peak_{cfg['tagname']}_r{rank}.json", "w"), indent=0)
    lib.mp_reset_peak(0)
    opt.step()
    o_end, o_peak = counter()
    out["steps"].append({k: v - base for k, v in dict(start=s0, sched_peak=sched_peak, sched_end=sched_end,
                         opt_peak=o_peak, end=o_end, peak=max(sched_peak, o_peak)).items()})
    dist.barrier()
print("MPPP " + json.dumps(out), flush=True)
dist.barrier()
dist.destroy_process_group()
