"""Hugging Face Transformers (5.24.0) training steps under accelerate (1.15.0) + DeepSpeed (0.19.8) ZeRO-2 / ZeRO-3,
1 or 2 ranks on CPU (DeepSpeed's CPU accelerator, Gloo), counted per rank by memplan's shim allocator (channel 0 = the
device).

    PATH=/tmp/ds-venv/bin:$PATH DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 /tmp/ds-venv/bin/python -m torch.distributed.run \
        --nproc-per-node 2 src/trainer/deepspeed_reference.py /tmp/shim.so '{"profile":"tiny","zero":2,"mp":"bf16",
        "ac":false,"batch":2,"seq":64,"buckets":"auto","steps":3,"peak_trace":true,"out":"/tmp/ds-out/x"}'

The venv (torch from the repository's .venv through a .pth file; --no-build-isolation keeps pip from fetching another
torch for DeepSpeed's setup.py):

    python3.11 -m venv /tmp/ds-venv
    echo $PWD/.venv/lib/python3.11/site-packages > /tmp/ds-venv/lib/python3.11/site-packages/zz_main_venv.pth
    DS_BUILD_OPS=0 /tmp/ds-venv/bin/pip install --no-cache-dir --no-build-isolation \
        deepspeed==0.19.8 transformers==5.24.0 accelerate==1.15.0

The shim is built with the g++ line of tests/references.rs `fn shim()`. The records of
tests/data/deepspeed_zero_torch_2.11.jsonl came from this script's per-rank output, itemised and checked against the
formulas of docs/research/deepspeed-zero-measured.md.

Each rank prints one line `DSREF {json}` (and writes the whole record to "$out.r<rank>.json" when "out" is given).

What is accelerate's / DeepSpeed's own code (imported, not copied): DeepSpeedPlugin(hf_ds_config=<config dict>),
Accelerator(mixed_precision=MP, deepspeed_plugin=..., kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")]),
Accelerator.prepare(model, optimizer) -> _prepare_deepspeed (fills the "auto" keys, deepspeed.initialize),
accelerator.backward(loss) = DeepSpeedEngineWrapper.backward: engine.backward(loss) then engine.step() (clipping by
the config's gradient_clipping, the optimizer step and the zero-grad), AcceleratedOptimizer.step/zero_grad (no-ops).

Running on CPU (no patch to any installed file):
- Accelerator(cpu=True) drops the DeepSpeed plugin (accelerate/state.py:974 takes DEEPSPEED only `and not cpu`), so
  this script does not pass cpu=True; with no GPU, accelerate's _prepare_backend (state.py:755-815) finds no device, and
  without a backend PartialState sets num_processes=1 on every rank (state.py:288-292). InitProcessGroupKwargs(
  backend="gloo") gives it the backend, so num_processes / process_index are the real ones and accelerate's gather works.
- DS_ACCELERATOR=cpu selects DeepSpeed's CPU accelerator (deepspeed/accelerator/real_accelerator.py), whose
  communication backend is gloo when oneccl_bindings_for_pytorch is absent (cpu_accelerator.py:30-34).
- ninja must be on PATH (the venv's bin/): deepspeed/comm/torch.py builds the deepspeed_shm_comm op at init.
- train_micro_batch_size_per_gpu must be an integer (no dataloader is prepared), train_batch_size = micro x world.

The step is Trainer's inner loop (transformers 5.24 trainer.py training_step/compute_loss, as in accel_reference.py):
optimizer = torch.optim.AdamW(fused=True) over Trainer's two groups when the config has no "optimizer" section
(integrations/deepspeed.py:deepspeed_optim_sched -> trainer.create_optimizer, zero_allow_untested_optimizer); or
DeepSpeed's own optimizer from an "optimizer" section (optim "ds": DummyOptim + {"type":"AdamW"}). batch = input_ids +
labels; num_items = accelerator.gather(labels[...,1:].ne(-100).sum()).sum(); loss = model(**batch,
num_items_in_batch=num_items).loss * num_processes; accelerator.backward(loss). Random weights (from_config).
Activation checkpointing is Trainer's: model.activation_checkpointing_enable() (non-reentrant torch checkpoint per
decoder layer, transformers modeling_utils.py:3151-3196), before prepare.
ZeRO-3: the Accelerator (hence HfDeepSpeedConfig) exists before the model, so from_config builds it under
deepspeed.zero.Init (accelerate's zero3_init_flag defaults to True for stage 3), as Trainer + from_pretrained does.

Phases: "fwd" (batch, gather, forward, loss), "bwd" (engine.backward), "opt" (engine.step), "post" (scheduler,
no-op wrappers). Gloo: threads other than the training thread are uncounted before each step; allocations made inside
c10d ops on the training thread are reported apart ("gloo_free" replays the trace without them).

Tracing ("peak_trace": true): one allocation trace from before the model is built to the end. Each allocating aten op
is named by op, module (forward-hook stack), phase and "site": the innermost frame in deepspeed/, accelerate/ or
transformers/ (file:line function, from site-packages) and, when that is not DeepSpeed's, the innermost DeepSpeed frame
too. Reports: "phase_traces" (what is alive at each phase's peak of the last step, grouped by site/op/module),
"static" (what is alive at the start of the last step, by site), "zero_buffers" (the ZeRO optimizer's own tensors,
by attribute, bytes).

Config keys: profile (profiles/models/<name>.json) or hidden/layers/heads/kv_heads/ffn/vocab; layers/kv_heads override a
profile; zero (2|3); mp ("no"|"bf16"); ac (bool); batch; seq; steps (3); buckets ("auto": the Transformers docs'
configs with "auto" for reduce_bucket_size / stage3_prefetch_bucket_size / stage3_param_persistence_threshold, filled
from hidden_size by accelerate; "default": those keys absent, DeepSpeed's defaults); zo (dict merged into
zero_optimization last, e.g. {"overlap_comm": false}); optim ("torch"|"ds"); zero3_init (bool, default True for stage 3);
clip (1.0); peak_trace; out.
"""
import ctypes, json, os, sys, threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
import torch

torch.set_num_threads(1)
sys.path.insert(0, cfg.get("shim_py", "/work/main/src/trainer"))
from reference_shim import install_counter, uncount_other_threads

counter = install_counter(lib)  # channel 2 until set
lib.mp_set_channel(2)
lib.mp_trace_pending.restype = ctypes.c_int64
lib.mp_trace_take.restype = ctypes.c_int64

import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
import accelerate, transformers, deepspeed
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, DummyOptim
from transformers import AutoConfig, AutoModelForCausalLM

Z, MP, AC = int(cfg["zero"]), cfg.get("mp", "no"), bool(cfg.get("ac", False))
B, S, STEPS = cfg["batch"], cfg["seq"], cfg.get("steps", 3)
CLIP = cfg.get("clip", 1.0)
OPTIM = cfg.get("optim", "torch")
WORLD_ENV = int(os.environ.get("WORLD_SIZE", "1"))
C10D_OPS = {"_allgather_base_", "_reduce_scatter_base_", "allreduce_", "allgather_", "allgather_into_tensor_coalesced_",
            "reduce_scatter_tensor_coalesced_", "broadcast_", "barrier", "reduce_scatter_", "allreduce_coalesced_",
            "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "wait_tensor", "reduce_", "gather_",
            "scatter_", "alltoall_base_", "alltoall_", "allgather_coalesced_"}

# ---- the DeepSpeed config: the Transformers docs' ZeRO-2 / ZeRO-3 configs without offload ----
zo = {"stage": Z, "overlap_comm": True, "contiguous_gradients": True}
if Z == 2:
    zo.update(allgather_partitions=True, allgather_bucket_size=int(2e8), reduce_scatter=True)
else:
    zo.update(sub_group_size=int(1e9), stage3_max_live_parameters=int(1e9), stage3_max_reuse_distance=int(1e9),
              stage3_gather_16bit_weights_on_model_save=True)
if cfg.get("buckets", "auto") == "auto":
    zo["reduce_bucket_size"] = "auto"
    if Z == 3:
        zo.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
else:  # DeepSpeed's defaults for everything (accelerate's DeepSpeedPlugin without a config file)
    zo = {"stage": Z}
zo.update(cfg.get("zo", {}))
ds_config = {"train_micro_batch_size_per_gpu": B, "train_batch_size": B * WORLD_ENV, "gradient_accumulation_steps": 1,
             "gradient_clipping": CLIP, "bf16": {"enabled": "auto"}, "zero_optimization": zo}
if OPTIM == "ds":
    ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                                          "weight_decay": 0.0}}
plugin = DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=cfg.get("zero3_init", Z == 3))
acc = Accelerator(mixed_precision=MP, deepspeed_plugin=plugin,
                  kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
rank, world = dist.get_rank(), dist.get_world_size()
assert acc.num_processes == world, (acc.num_processes, world)


# ---- the tracer: OpTrace (reference_shim.py) plus the Python site of each allocating op ----
PT = bool(cfg.get("peak_trace"))
oplog, phase, modstack, names = [], ["setup"], [], {}
ROOTS = ("deepspeed/", "accelerate/", "transformers/")


def site():
    f = sys._getframe(2)
    first = ds = None
    while f is not None:
        fn = f.f_code.co_filename
        i = fn.find("site-packages/")
        rel = fn[i + 14:] if i >= 0 else os.path.basename(fn)
        if i >= 0 and rel.startswith(ROOTS) and not rel.startswith("deepspeed/utils/nvtx.py"):  # skip the wrapper
            s = f"{rel}:{f.f_lineno} {f.f_code.co_name}"
            if first is None:
                first = s
            if rel.startswith("deepspeed/"):
                ds = s
                break
        elif i < 0 and first is None and not fn.startswith("<"):
            first = f"{rel}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return first if ds is None or ds == first else f"{first} <- {ds}"


class SiteOpLog(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        n0 = lib.mp_trace_pending()
        out = func(*args, **(kwargs or {}))
        n1 = lib.mp_trace_pending()
        if n1 > n0:
            outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(o)]
            oplog.append((n0, n1, str(func.overloadpacket.__name__), modstack[-1] if modstack else None, phase[0],
                          [(str(o.dtype).replace("torch.", ""), list(o.shape)) for o in outs[:1]], site()))
        return out


if PT:
    torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: modstack.append(id(m)))

    def _post(m, a, o):
        if modstack:
            modstack.pop()

    torch.nn.modules.module.register_module_forward_hook(_post)
    lib.mp_trace_start()
    mode = SiteOpLog()
    mode.__enter__()


def take_events():
    n = lib.mp_trace_pending()
    buf = (ctypes.c_int64 * (4 * n))()
    got = lib.mp_trace_take(buf, n)
    return [tuple(buf[4 * i:4 * i + 4]) for i in range(got)]


# ---- the model ----
REPO = cfg.get("repo", "/work/main")
if "profile" in cfg:
    prof = json.load(open(os.path.join(REPO, "profiles", "models", cfg["profile"] + ".json")))
    keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "tie_word_embeddings", "max_position_embeddings", "hidden_act", "rms_norm_eps", "rope_theta"]
    kw = {k: prof[k] for k in keys if k in prof}
    kw.update(attention_bias=False, mlp_bias=False)
else:
    kw = dict(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
              num_key_value_heads=cfg["kv_heads"], intermediate_size=cfg["ffn"], vocab_size=cfg["vocab"],
              tie_word_embeddings=False, max_position_embeddings=512, attention_bias=False, mlp_bias=False)
for k in ("layers", "kv_heads"):
    if k in cfg and "profile" in cfg:
        kw[{"layers": "num_hidden_layers", "kv_heads": "num_key_value_heads"}[k]] = cfg[k]
hf_cfg = AutoConfig.for_model("llama", **kw)
hf_cfg.use_cache = False  # Trainer.__init__
V = hf_cfg.vocab_size

torch.manual_seed(0)
lib.mp_set_channel(0)
lib.mp_reset_peak(0)
base = counter()[0]
ev_model = lib.mp_trace_pending() if PT else 0
model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
model.train()
names.update({id(m): n or "<root>" for n, m in model.named_modules()})
after_load, load_peak = counter()
after_load -= base
if AC:
    model.activation_checkpointing_enable()  # Trainer.__init__ with activation_checkpointing=True
zero3_init = any(hasattr(p, "ds_id") for p in model.parameters())
param_shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
n_params = sum(int(torch.Size(s).numel()) for s in param_shapes.values())


def decay_groups(m):  # Trainer.get_decay_parameter_names: no decay for biases and norms (weight_decay 0 here)
    dec, nodec = [], []
    for n, p in m.named_parameters():
        if p.requires_grad:
            (nodec if ("bias" in n or "norm" in n) else dec).append(p)
    return [{"params": dec, "weight_decay": 0.0}, {"params": nodec, "weight_decay": 0.0}]


if OPTIM == "ds":
    opt = DummyOptim(params=[p for p in model.parameters() if p.requires_grad])
else:
    opt = torch.optim.AdamW(decay_groups(model), lr=5e-5, betas=(0.9, 0.999), eps=1e-8, fused=True)
ev_prepare = lib.mp_trace_pending() if PT else 0
lib.mp_reset_peak(0)
model, opt = acc.prepare(model, opt)
prep_cur, prep_peak = counter()
engine = acc.deepspeed_engine_wrapped.engine
zopt = engine.optimizer
names.update({id(m): n or "<root>" for n, m in engine.module.named_modules()})
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / STEPS))
setup = counter()[0] - base
ev_setup_end = lib.mp_trace_pending() if PT else 0

# ---- phase marks inside accelerate's DeepSpeedEngineWrapper.backward ----
marks = {}
_bw, _st = engine.backward, engine.step


def backward(*a, **k):
    marks["fwd_end"], marks["fwd_peak"] = counter()
    marks["ev_bwd"] = lib.mp_trace_pending() if PT else 0
    phase[0] = "bwd"
    lib.mp_reset_peak(0)
    r = _bw(*a, **k)
    marks["bwd_end"], marks["bwd_peak"] = counter()
    return r


def step(*a, **k):
    marks["ev_opt"] = lib.mp_trace_pending() if PT else 0
    phase[0] = "opt"
    lib.mp_reset_peak(0)
    r = _st(*a, **k)
    marks["opt_end"], marks["opt_peak"] = counter()
    marks["ev_post"] = lib.mp_trace_pending() if PT else 0
    phase[0] = "post"
    lib.mp_reset_peak(0)
    return r


engine.backward, engine.step = backward, step


def ds_config_used():
    c = engine._config.zero_config
    return {"stage": int(c.stage), "reduce_bucket_size": c.reduce_bucket_size,
            "allgather_bucket_size": c.allgather_bucket_size, "overlap_comm": c.overlap_comm,
            "contiguous_gradients": c.contiguous_gradients, "reduce_scatter": c.reduce_scatter,
            "prefetch_bucket_size": c.prefetch_bucket_size, "param_persistence_threshold": c.param_persistence_threshold,
            "max_live_parameters": c.max_live_parameters, "max_reuse_distance": c.max_reuse_distance,
            "use_multi_rank_bucket_allreduce": c.use_multi_rank_bucket_allreduce,
            "bf16": engine.bfloat16_enabled(), "fp16": engine.fp16_enabled(),
            "gradient_clipping": engine.gradient_clipping(), "communication_data_type": str(engine.communication_data_type)}


def tensor_bytes(obj, seen):
    """Bytes of the distinct storages reachable from obj (tensors, lists, tuples, dicts), counting each once."""
    tot = 0
    if torch.is_tensor(obj):
        try:
            st = obj.untyped_storage()
        except Exception:
            return 0
        key = st.data_ptr()
        if key and key not in seen and obj.device.type == "cpu":
            seen.add(key)
            tot += st.nbytes()
        if obj.grad is not None:
            tot += tensor_bytes(obj.grad, seen)
        return tot
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in list(obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def zero_buffers():
    """The ZeRO optimizer's own tensors by attribute (distinct storages; the model's parameter storages first)."""
    seen, res = set(), {}
    res["model.parameters (+.grad)"] = tensor_bytes(list(engine.module.parameters()), seen)
    res["model.buffers"] = tensor_bytes(list(engine.module.buffers()), seen)
    for k, v in sorted(vars(zopt).items()):
        b = tensor_bytes(v, seen)
        if b:
            res[f"zero.{k}"] = b
    inner = getattr(zopt, "optimizer", None)
    if inner is not None:
        res["optimizer.state"] = tensor_bytes(list(inner.state.values()), seen)
        res["optimizer.param_groups"] = tensor_bytes([g["params"] for g in inner.param_groups], seen)
    return res


def param_layout():
    """Per parameter: shape, what this rank holds of it (numel, dtype), ZeRO-3 status/persistence."""
    rows = []
    for n, p in engine.module.named_parameters():
        r = {"name": n, "shape": list(getattr(p, "ds_shape", p.shape)), "local_numel": p.numel(),
             "dtype": str(p.dtype).replace("torch.", "")}
        if hasattr(p, "ds_tensor"):
            r.update(ds_numel=p.ds_numel, partition_numel=p.ds_tensor.numel(), persist=bool(p.ds_persist),
                     status=str(p.ds_status).split(".")[-1], ds_tensor_dtype=str(p.ds_tensor.dtype).replace("torch.", ""))
        rows.append(r)
    return rows


def owners(first_event):
    who = {}
    for n0, n1, op, mod, ph, outs, st in oplog:
        for i in range(n0, n1):
            who[i - first_event] = (ph, names.get(mod, "-") if mod is not None else "-", op, outs, st)
    return who


def replay(events, who, lo=0, hi=None, exclude_c10d=False, group_site=True):
    """Peak of the counted bytes within events [lo, hi) (events from the start of the trace), and what is alive then,
    grouped by (phase, site, op, module, first output)."""
    hi = len(events) if hi is None else hi
    live, cur, best, best_i, snap = {}, 0, -1, -1, {}
    for i, (kind, aid, nb, tag) in enumerate(events):
        if kind == 0:
            w = who.get(i, ("?", "-", "?", [], "?"))
            if exclude_c10d and w[2] in C10D_OPS:
                continue
            live[aid] = (nb, w)
            cur += nb
        elif aid in live:
            cur -= live.pop(aid)[0]
        if lo <= i < hi and cur > best:
            best, best_i, snap = cur, i, dict(live)
        if i >= hi:
            break
    rows = {}
    for aid, (nb, (ph, mod, op, outs, st)) in snap.items():
        k = (ph, st, op, mod, str(outs[:1]))
        r = rows.setdefault(k, [0, 0, set()])
        r[0] += nb
        r[1] += 1
        r[2].add(nb)
    return {"peak": best, "event": best_i,
            "alive": sorted(([v[0], v[1], *k, sorted(v[2])[:6]] for k, v in rows.items()), key=lambda r: -r[0])}


def ds_timeline(events, who, lo, hi):
    """Every allocation in events [lo, hi) that DeepSpeed itself makes (innermost library frame in deepspeed/), or a
    c10d op, or no dispatched op (site "?"), and its free: [event, "A"|"F", bytes, phase, site, op, first output,
    current bytes (all counted), and at a free: the site and op running then]."""
    live, cur, rows, mine = {}, 0, [], {}
    for i, (kind, aid, nb, tag) in enumerate(events[:hi]):
        if kind == 0:
            live[aid] = nb
            cur += nb
            if i >= lo:
                ph, mod, op, outs, st = who.get(i, ("?", "-", "?", [], "?"))
                if st.startswith("deepspeed/") or op in C10D_OPS or op == "?":
                    mine[aid] = (nb, ph, st, op, str(outs[:1]))
                    rows.append([i, "A", *mine[aid], cur])
        elif aid in live:
            cur -= live.pop(aid)
            if aid in mine:
                w = who.get(i)
                rows.append([i, "F", *mine.pop(aid), cur, f"{w[0]}|{w[4]}|{w[2]}" if w else "-"])
    return rows


def alive_at(events, who, idx):
    """What is alive just before event idx, grouped by (phase, site, op, module, first output)."""
    live, cur = {}, 0
    for i, (kind, aid, nb, tag) in enumerate(events[:idx]):
        if kind == 0:
            live[aid] = (nb, who.get(i, ("?", "-", "?", [], "?")))
            cur += nb
        elif aid in live:
            cur -= live.pop(aid)[0]
    rows = {}
    for aid, (nb, (ph, mod, op, outs, st)) in live.items():
        k = (ph, st, op, mod, str(outs[:1]))
        r = rows.setdefault(k, [0, 0, set()])
        r[0] += nb
        r[1] += 1
        r[2].add(nb)
    return {"bytes": cur, "alive": sorted(([v[0], v[1], *k, sorted(v[2])[:6]] for k, v in rows.items()),
                                          key=lambda r: -r[0])}


out = {"rank": rank, "world": world, "cfg": cfg, "ds_config": json.loads(json.dumps(engine.config, default=str)),
       "zero_config": ds_config_used(), "engine": type(engine).__name__, "zero_optimizer": type(zopt).__name__,
       "basic_optimizer": type(engine.basic_optimizer).__name__, "zero3_init": zero3_init,
       "num_processes": acc.num_processes, "after_load": after_load, "load_peak": load_peak - base,
       "prepare_peak": prep_peak - base, "after_prepare": prep_cur - base, "setup": setup, "params": n_params,
       "param_shapes": param_shapes, "steps": [],
       "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                    "accelerate": accelerate.__version__, "transformers": transformers.__version__}}
out["layout"] = param_layout()
out["zero_buffers_setup"] = zero_buffers()
step_ev = []
for it in range(STEPS):
    dist.barrier()
    out["uncounted_threads"] = uncount_other_threads(lib)
    if it == STEPS - 1:
        out["zero_buffers_steady"] = zero_buffers()
    marks.clear()
    lib.mp_reset_peak(0)
    s0 = counter()[0]
    ev0 = lib.mp_trace_pending() if PT else 0
    phase[0] = "fwd"
    lib.mp_set_channel(2)
    toks = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1000 * it + rank))
    lib.mp_set_channel(0)
    batch = {"input_ids": toks.clone(), "labels": toks.clone()}
    num_items = batch["labels"][..., 1:].ne(-100).sum()
    num_items = acc.gather(num_items).sum()  # Trainer._get_num_items_in_batch, average_tokens_across_devices
    outputs = model(**batch, num_items_in_batch=num_items)
    loss = outputs["loss"]
    info = {"logits_dtype": str(outputs.logits.dtype), "loss_dtype": str(loss.dtype)}
    del outputs
    loss = loss * acc.num_processes  # Trainer.compute_loss
    acc.backward(loss)  # engine.backward + engine.step (wrapped above)
    del loss, batch, num_items
    opt.step()  # DeepSpeedOptimizerWrapper.step: no-op
    sched.step()
    opt.zero_grad()  # no-op
    p_end, p_peak = counter()
    ev1 = lib.mp_trace_pending() if PT else 0
    rec = {k: v - base for k, v in dict(start=s0, fwd_peak=marks["fwd_peak"], fwd_end=marks["fwd_end"],
                                         bwd_peak=marks["bwd_peak"], bwd_end=marks["bwd_end"],
                                         opt_peak=marks["opt_peak"], opt_end=marks["opt_end"], post_peak=p_peak,
                                         end=p_end).items()}
    rec["peak"] = max(rec["fwd_peak"], rec["bwd_peak"], rec["opt_peak"], rec["post_peak"])
    rec.update(info)
    out["steps"].append(rec)
    step_ev.append((ev0, marks.get("ev_bwd", 0), marks.get("ev_opt", 0), marks.get("ev_post", 0), ev1))
phase[0] = "end"
if PT:
    mode.__exit__(None, None, None)
    lib.mp_trace_stop()
    ev = take_events()
    who = owners(0)
    e0, eb, eo, ep, e1 = step_ev[-1]
    out["n_events"] = len(ev)
    # the trace starts before the model: replayed bytes are absolute (minus what was alive before the model)
    st = alive_at(ev, who, e0)
    out["static"] = st
    out["setup_trace"] = replay(ev, who, ev_prepare, ev_setup_end)
    out["phase_traces"] = {"fwd": replay(ev, who, e0, eb), "bwd": replay(ev, who, eb, eo), "opt": replay(ev, who, eo, ep)}
    out["phase_traces_ref"] = {k: replay(ev, who, lo, hi, exclude_c10d=True)
                               for k, lo, hi in (("fwd", e0, eb), ("bwd", eb, eo), ("opt", eo, ep))}
    out["ds_timeline"] = ds_timeline(ev, who, e0, e1)
    gf = {k: v["peak"] for k, v in out["phase_traces_ref"].items()}
    out["gloo_free"] = {**gf, "peak": max(gf.values())}
    # step-relative: the trace counts from before the model, the counter from `base`
    out["trace_minus_counter_at_step_start"] = st["bytes"] - out["steps"][-1]["start"]
if Z == 3:  # the coordinator's recorded module trace (forward + backward), for the gathered-parameter model
    coord = zopt.parameter_offload.get_param_coordinator()
    pnames = {id(p): n for n, p in engine.module.named_parameters()}
    order = getattr(coord, "_PartitionedParameterCoordinator__submodule_order", ())
    out["z3_trace"] = [[names.get(id(m), "?"), [pnames.get(id(p), "?") for p in m.parameters(recurse=False)]]
                       for m in order]
out["steady_peak"] = out["steps"][-1]["peak"]
s = json.dumps(out, default=str)
if cfg.get("out"):
    with open(f"{cfg['out']}.r{rank}.json", "w") as f:
        f.write(s)
if PT:  # what is alive at each phase's peak (gloo-free replay): the ten largest (phase, site, op, module) groups
    for k, t in out["phase_traces_ref"].items():
        print(f"PEAK r{rank} {k} {t['peak']}", flush=True)
        for r in t["alive"][:10]:
            print(f"    {r[0]:>10} x{r[1]:<3} {r[2]:5s} {r[5]:28.28s} {r[4]:24.24s} {r[3][:90]}", flush=True)
print("DSREF " + json.dumps({k: out[k] for k in ("rank", "steady_peak", "steps", "zero_optimizer", "basic_optimizer",
                                                  "zero3_init", "setup", "zero_config")}, default=str), flush=True)
dist.barrier()
dist.destroy_process_group()
