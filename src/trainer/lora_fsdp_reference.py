"""peft LoRA under accelerate (1.15.0) FSDP2: Transformers (5.24.0) training steps, 2 ranks on CPU/Gloo,
counted per rank by memplan's shim allocator (channel 0 = the device). A copy of memplan's
src/trainer/accel_reference.py with peft.get_peft_model(model, LoraConfig(...)) applied after loading and before
Accelerator.prepare (as Trainer has it: the model handed to Trainer is already a PeftModel), the optimizer over the
trainable (adapter) parameters only. Trainer does NOT call update_fsdp_plugin_peft for FSDP2 (it only does when it
delays the optimizer's creation, which it never does for FSDP2: trainer.py:_prepare_for_training), so the units are
accelerate's transformer_based_wrap ones and each LoRA A/B lives in its decoder layer's unit.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 /tmp/hf-venv/bin/python -m torch.distributed.run \
        --nproc-per-node 2 src/trainer/lora_fsdp_reference.py /tmp/shim.so '{"profile":"tiny","batch":2,"seq":64,"mp":"bf16",
        "ac":false,"reshard":true,"dtype":"fp32","steps":3,"peak_trace":true,
        "lora":{"r":8,"targets":"qkvo","dropout":0.05},"out":"out/x"}'

Extra keys: "lora": {"r", "alpha" (16), "targets": "qkvo" | "all-linear" | list, "dropout"}. Extra output:
"unit_params" (every FSDP unit's parameters: name, requires_grad, shape, local shard dtype/numel, all-gather dtype),
"static_split" (local shard bytes frozen / trainable), "opt_state" (AdamW states, bytes), "alive_at_peak"
(the step's ref peak, itemised into categories: unsharded params by unit and frozen/adapter, all-gather buffers,
reduce-scatter buffers, sharded grads, activations...).

Each rank prints one line `ACCEL {json}` (and writes it to "$out.r<rank>.json" when "out" is given).

What is accelerate's own code (imported, not copied): FullyShardedDataParallelPlugin(fsdp_version=2,
auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
reshard_after_forward=R, activation_checkpointing=AC), Accelerator(cpu=True, mixed_precision=MP, fsdp_plugin=...),
Accelerator.prepare(model, optimizer) -> _prepare_fsdp2 -> fsdp2_apply_ac (utils/fsdp_utils.py) and
fsdp2_prepare_model, accelerator.backward, accelerator.clip_grad_norm_, AcceleratedOptimizer.step.

The CPU hack (docs/research/frameworks-on-torch-2.11.md section 4): accelerate/state.py switches to
DistributedType.FSDP only for GPU-like distributed types, so on CPU (MULTI_CPU) the plugin is silently dropped. After
Accelerator(...) this script sets acc.state.distributed_type = FSDP and acc.state.fsdp_plugin = plugin, and, as
state.py does on that branch, plugin.set_mixed_precision(MP) when MP != "no".

The step is Trainer's inner loop (transformers 5.24 trainer.py:_run_epoch/training_step/compute_loss), as
src/trainer/hf_reference.py copies it: optimizer = torch.optim.AdamW(fused=True) over Trainer's two groups, created
BEFORE prepare (Trainer.create_optimizer, FSDP2 forbids delaying it); batch input_ids + labels (counted clones);
num_items_in_batch = labels[...,1:].ne(-100).sum(), gathered over ranks (accelerator.gather(...).sum(),
Trainer._get_num_items_in_batch with average_tokens_across_devices); outputs = model(**batch,
num_items_in_batch=...); loss = outputs["loss"]; loss *= num_processes (Trainer.compute_loss); outputs die;
accelerator.backward(loss) (loss / grad_accum then backward); accelerator.clip_grad_norm_(params, 1.0);
optimizer.step(); lr_scheduler.step(); model.zero_grad() (set_to_none). As in hf_reference, batch and loss are freed
after backward. Random weights (from_config), no download.

Gloo: every thread but the training thread is registered uncounted (mp_uncount_thread) before each step, so Gloo's
worker threads' temporaries (which NCCL would not make through the caching allocator) are not counted. What Gloo
allocates on the training thread inside a c10d op is counted, and reported apart: "gloo_free" peaks replay the trace
without allocations made inside c10d ops (op names in reference_shim.C10D_OPS).
torch.set_num_threads(1): 2 processes on 2 cores.

Output beside the per-step phases: "units" (every FSDP unit, its reshard_after_forward and MixedPrecisionPolicy),
"phase_traces" / "phase_traces_ref" (what is alive at each phase's peak, with and without c10d-op allocations),
"gloo_free" (the phase peaks without them), "fsdp_timeline" (every allocation made by FSDP2's foreach_all_gather,
foreach_all_gather_copy_out, foreach_reduce or a c10d op, and its free). Needs "peak_trace": true.

Config keys: profile (profiles/models/<name>.json of the memplan repository, or "hidden","layers","heads","kv_heads",
"ffn","vocab" given directly), batch, seq, mp ("no"|"bf16"), ac (bool), reshard (bool: reshard_after_forward),
dtype ("fp32"|"bf16": the dtype the model is loaded in), steps (3), clip (1.0; 0 = none), peak_trace (bool), out.
"""
import ctypes, contextlib, json, math, os, sys, threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
import torch

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from reference_shim import install_counter, OpTrace, FsdpTrace, uncount_other_threads

counter = install_counter(lib)  # channel 2 until set
lib.mp_set_channel(2)

import torch.distributed as dist
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
import accelerate, transformers
from transformers import AutoConfig, AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
import peft

B, S = cfg["batch"], cfg["seq"]
STEPS = cfg.get("steps", 3)
MP = cfg.get("mp", "no")
AC = bool(cfg.get("ac", False))
RESHARD = bool(cfg.get("reshard", True))
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.get("dtype", "fp32")]
CLIP = cfg.get("clip", 1.0)

plugin = FullyShardedDataParallelPlugin(
    fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
    reshard_after_forward=RESHARD, activation_checkpointing=AC, cpu_ram_efficient_loading=False)
acc = Accelerator(cpu=True, mixed_precision=MP, fsdp_plugin=plugin)
dt_before = str(acc.state.distributed_type)
# The hack: accelerate/state.py drops the plugin for MULTI_CPU.
acc.state.distributed_type = DistributedType.FSDP
acc.state.fsdp_plugin = plugin
if MP != "no":
    plugin.set_mixed_precision(MP)  # state.py: `if self._mixed_precision != "no": fsdp_plugin.set_mixed_precision(...)`
rank, world = dist.get_rank(), dist.get_world_size()


if "profile" in cfg:
    prof = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "profiles", "models", cfg["profile"] + ".json")))
    keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "tie_word_embeddings", "max_position_embeddings", "hidden_act", "rms_norm_eps", "rope_theta"]
    kw = {k: prof[k] for k in keys if k in prof}
    kw.update(attention_bias=False, mlp_bias=False)
else:
    kw = dict(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
              num_key_value_heads=cfg["kv_heads"], intermediate_size=cfg["ffn"], vocab_size=cfg["vocab"],
              tie_word_embeddings=False, max_position_embeddings=512, attention_bias=False, mlp_bias=False)
for k in ("layers", "kv_heads"):  # overrides of a profile
    if k in cfg and "profile" in cfg:
        kw[{"layers": "num_hidden_layers", "kv_heads": "num_key_value_heads"}[k]] = cfg[k]
hf_cfg = AutoConfig.for_model("llama", **kw)
hf_cfg.use_cache = False  # Trainer.__init__
V = hf_cfg.vocab_size

torch.manual_seed(0)
lib.mp_set_channel(0)
lib.mp_reset_peak(0)
base = counter()[0]
model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=DT)
model.train()
after_load = counter()[0] - base
LORA = cfg["lora"]
_tm = LORA.get("targets", "qkvo")
_target = (["q_proj", "k_proj", "v_proj", "o_proj"] if _tm == "qkvo" else "all-linear" if _tm == "all-linear" else _tm)
model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA.get("alpha", 16), target_modules=_target,
                                         lora_dropout=LORA.get("dropout", 0.05), task_type="CAUSAL_LM"))
model.train()
after_lora = counter()[0] - base
n_params = sum(p.numel() for p in model.parameters())
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)


def decay_groups(m):
    dec, nodec = [], []
    for n, p in m.named_parameters():
        if p.requires_grad:
            (nodec if ("bias" in n or "norm" in n) else dec).append(p)
    return [{"params": dec, "weight_decay": 0.0}, {"params": nodec, "weight_decay": 0.0}]


opt = torch.optim.AdamW(decay_groups(model), lr=5e-5, betas=(0.9, 0.999), eps=1e-8, fused=True)
lib.mp_reset_peak(0)
model, opt = acc.prepare(model, opt)
prep_cur, prep_peak = counter()
sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda s: max(0.0, 1 - s / STEPS))
model.zero_grad()
setup = counter()[0] - base


# ---- what accelerate built: FSDP units, their reshard_after_forward and mp policy ----
def describe_units(m):
    from torch.distributed.fsdp import FSDPModule
    units = []
    for name, mod in m.named_modules():
        if isinstance(mod, FSDPModule):
            st = mod._get_fsdp_state()
            pg = st._fsdp_param_group
            if pg is None:
                units.append({"module": name or "<root>", "params": 0, "reshard_after_forward": None})
                continue
            mpp = pg.mp_policy
            units.append({"module": name or "<root>", "modules": [type(x).__name__ for x in pg.modules],
                          "params": sum(fp.sharded_size.numel() if hasattr(fp, "sharded_size") else 0
                                        for fp in pg.fsdp_params),
                          "unsharded_numel": sum(math.prod(fp._orig_size) for fp in pg.fsdp_params),
                          "reshard_after_forward": pg.post_forward_mesh_info is not None,
                          "mp": {"param": str(mpp.param_dtype), "reduce": str(mpp.reduce_dtype),
                                 "output": str(mpp.output_dtype), "cast_forward_inputs": mpp.cast_forward_inputs},
                          "sharded_dtype": str(pg.fsdp_params[0].sharded_param.dtype)})
    # root state (it may own no parameter group)
    root = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
    return units


units = describe_units(model)


def unit_params(m):
    from torch.distributed.fsdp import FSDPModule
    names = {id(p): n for n, p in m.named_parameters()}
    res = []
    for name, mod in m.named_modules():
        if isinstance(mod, FSDPModule):
            pg = mod._get_fsdp_state()._fsdp_param_group
            if pg is None:
                continue
            rows = []
            for fp in pg.fsdp_params:
                sp = fp.sharded_param
                rows.append([names.get(id(sp), "?"), bool(sp.requires_grad), list(fp._orig_size),
                             str(sp._local_tensor.dtype), sp._local_tensor.numel(),
                             str(pg.mp_policy.param_dtype or sp._local_tensor.dtype)])
            res.append({"unit": name or "<root>", "params": rows})
    return res


uparams = unit_params(model)
static_split = {}
for n, p in model.named_parameters():
    loc = p._local_tensor if hasattr(p, "_local_tensor") else p
    k = ("trainable." if p.requires_grad else "frozen.") + str(loc.dtype).replace("torch.", "")
    static_split[k] = static_split.get(k, 0) + loc.untyped_storage().nbytes()
# non-FSDP parameters (none expected) and buffers
static_split["buffers"] = sum(b.untyped_storage().nbytes() for b in model.buffers())
wrappers = sorted({type(x).__name__ for x in model.modules() if "Checkpoint" in type(x).__name__})
static = {}
for n, p in model.named_parameters():
    loc = p._local_tensor if hasattr(p, "_local_tensor") else p
    k = f"param.{str(loc.dtype).replace('torch.', '')}"
    static[k] = static.get(k, 0) + loc.untyped_storage().nbytes()

# ---- op trace (FSDP2's collectives labelled; reference_shim.FsdpTrace) ----
PT = cfg.get("peak_trace")
oplog, phase = [], ["-"]
tracer = OpTrace(lib, model, phase, oplog) if PT else None
ft = FsdpTrace(lib, tracer, phase) if PT else None

out = {"rank": rank, "world": world, "cfg": cfg, "unit_params": uparams, "static_split": static_split,
       "after_lora": after_lora, "trainable": n_train, "distributed_type_before_hack": dt_before,
       "is_fsdp2": acc.is_fsdp2, "units": units, "checkpoint_wrappers": wrappers, "model_class": type(model).__name__,
       "after_load": after_load, "prepare_peak": prep_peak - base, "after_prepare": prep_cur - base, "setup": setup,
       "static_local": static, "params": n_params, "steps": []}
for step in range(STEPS):
    dist.barrier()
    out["uncounted_threads"] = uncount_other_threads(lib)
    lib.mp_reset_peak(0)
    s0 = counter()[0]
    tracing = PT and step == STEPS - 1
    if tracing:
        ft.spans.clear()
        lib.mp_trace_start()
        mode = tracer.mode()
        mode.__enter__()
    phase[0] = "fwd"
    lib.mp_set_channel(2)
    toks = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1000 * step + rank))
    lib.mp_set_channel(0)
    batch = {"input_ids": toks.clone(), "labels": toks.clone()}
    num_items = batch["labels"][..., 1:].ne(-100).sum()
    num_items = acc.gather(num_items).sum()  # Trainer._get_num_items_in_batch, average_tokens_across_devices

    def compute_loss():
        outputs = model(**batch, num_items_in_batch=num_items)
        loss = outputs["loss"]
        info = {"logits_dtype": str(outputs.logits.dtype), "loss_dtype": str(loss.dtype)}
        loss *= acc.num_processes  # Trainer.compute_loss
        return loss, info

    loss, info = compute_loss()
    f_end, f_peak = counter()
    ev_bwd = lib.mp_trace_pending() if tracing else 0
    lib.mp_reset_peak(0)
    phase[0] = "bwd"
    acc.backward(loss)
    del loss, batch, num_items
    b_end, b_peak = counter()
    ev_clip = lib.mp_trace_pending() if tracing else 0
    lib.mp_reset_peak(0)
    phase[0] = "clip"
    gn = acc.clip_grad_norm_(model.parameters(), CLIP) if CLIP else None
    del gn
    c_end, c_peak = counter()
    ev_opt = lib.mp_trace_pending() if tracing else 0
    lib.mp_reset_peak(0)
    phase[0] = "opt"
    opt.step()
    sched.step()
    model.zero_grad()
    o_end, o_peak = counter()
    rec = {k: v - base for k, v in dict(start=s0, fwd_peak=f_peak, fwd_end=f_end, bwd_peak=b_peak, bwd_end=b_end,
                                         clip_peak=c_peak, clip_end=c_end, opt_peak=o_peak, opt_end=o_end).items()}
    rec["peak"] = max(rec["fwd_peak"], rec["bwd_peak"], rec["clip_peak"], rec["opt_peak"])
    rec.update(info)
    if tracing:
        mode.__exit__(None, None, None)
        lib.mp_trace_stop()
        ev = tracer.take_events()
        st = s0 - base
        out["peak_trace"] = ft.peak_report(st, ev)
        out["phase_traces"] = {"fwd": ft.peak_report(st, ev, 0, ev_bwd), "bwd": ft.peak_report(st, ev, ev_bwd, ev_clip),
                               "clip": ft.peak_report(st, ev, ev_clip, ev_opt), "opt": ft.peak_report(st, ev, ev_opt)}
        out["phase_traces_ref"] = {ph: ft.peak_report(st, ev, lo, hi, exclude_c10d=True)
                                   for ph, lo, hi in (("fwd", 0, ev_bwd), ("bwd", ev_bwd, ev_clip),
                                                      ("clip", ev_clip, ev_opt), ("opt", ev_opt, len(ev)))}
        gf = {ph: t["peak"] for ph, t in out["phase_traces_ref"].items()}
        out["gloo_free"] = {**gf, "peak": max(gf.values())}
        out["c10d_allocs"] = ft.c10d_allocs(ev)
        out["fsdp_timeline"] = ft.fsdp_timeline(st, ev)
        out["n_events"] = len(ev)
    out["steps"].append(rec)
last = out["steps"][-1]
out["steady_peak"] = last["peak"]
st_bytes = {}
for pstate in opt.optimizer.state.values():
    for k, v in pstate.items():
        if torch.is_tensor(v):
            vv = v._local_tensor if hasattr(v, "_local_tensor") else v
            kk = k + "." + str(vv.dtype).replace("torch.", "")
            st_bytes[kk] = st_bytes.get(kk, 0) + vv.untyped_storage().nbytes()
out["opt_state"] = st_bytes
out["versions"] = {"peft": peft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                   "accelerate": accelerate.__version__}
s = json.dumps(out)
if cfg.get("out"):
    with open(f"{cfg['out']}.r{rank}.json", "w") as f:
        f.write(s)
print("ACCEL " + json.dumps({k: out[k] for k in ("rank", "steady_peak", "steps", "units", "is_fsdp2")}), flush=True)
dist.barrier()
dist.destroy_process_group()
