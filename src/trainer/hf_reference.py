"""Hugging Face Transformers (5.24.0) training steps on CPU under memplan's counting allocator.

    python src/trainer/hf_reference.py /tmp/shim.so '{"arch":"llama","profile":"tiny","batch":2,"seq":64,
        "dtype":"fp32","amp":"none","gc":false,"lora":null,"mode":"manual","steps":3}'

(the shim built as fsdp2_reference.py's docstring says; transformers 5.24.0, accelerate 1.15.0 and
peft 0.21.2 installed beside torch 2.11.0; "profile" names a file of profiles/models/). The measured
configurations are in tests/data/hf_transformers_torch_2.11.jsonl, checked by tests/estimator.rs.

Builds LlamaForCausalLM / Qwen2ForCausalLM from a memplan model profile (HF config format) with random
weights (no download), attn_implementation "sdpa", and runs `steps` optimizer steps the way
transformers' Trainer does, printing one JSON line: per step the device bytes at each phase's start, peak
and end, relative to the counter before the model was built.

What the manual loop mirrors (transformers 5.24.0, accelerate 1.15.0, peft 0.21.2, torch 2.11.0):
- use_cache False (Trainer.__init__ sets model.config.use_cache = args.use_cache, default False).
- batch: `input_ids` and `labels` (= input_ids, the model shifts) as the default collator would hand them,
  no attention_mask; `num_items_in_batch` = count of labels[..., 1:] != -100, a device tensor
  (trainer.py:Trainer._get_num_items_in_batch), passed to the model as a loss kwarg
  (trainer.py:Trainer.compute_loss, `model_accepts_loss_kwargs`).
- forward + loss inside compute_loss: `outputs = model(**inputs)`; `loss = outputs["loss"]`; outputs (and the
  logits in it) die when compute_loss returns (trainer.py:Trainer.compute_loss). The loss is
  loss/loss_utils.py:ForCausalLMLoss: logits.float(), labels padded by one -100 then [..., 1:].contiguous(),
  view(-1, V), fixed_cross_entropy with reduction "sum" / num_items_in_batch.
- Trainer bf16=True (amp "bf16"): accelerate wraps model.forward in torch.autocast("cpu", bfloat16) and
  converts bf16 outputs to fp32 afterwards (accelerator.py:Accelerator.prepare_model, native_amp is True
  on CPU; utils/modeling.py:get_mixed_precision_context_manager; utils/operations.py:convert_outputs_to_fp32).
- `loss *= 1` (average_tokens_across_devices, one process), `accelerator.backward(loss)` = loss.backward().
- clip: accelerator.clip_grad_norm_(params, max_grad_norm=1.0) -> torch.nn.utils.clip_grad_norm_
  (trainer.py:Trainer._clip_grad_norm), then optimizer.step(), lr_scheduler.step() (linear), model.zero_grad()
  (set_to_none) (trainer.py:Trainer._run_epoch).
- optimizer: default `optim` is "adamw_torch_fused" for torch >= 2.8 (training_args.py:TrainingArguments.optim)
  -> torch.optim.AdamW(fused=True) (trainer_optimizer.py:_get_adamw_torch), two groups: decay / no decay
  (bias and norm weights) (trainer.py:Trainer.create_optimizer, get_decay_parameter_names); only params with
  requires_grad.
- gradient checkpointing: model.activation_checkpointing_enable() with default {"use_reentrant": False}
  (modeling_utils.py:PreTrainedModel._activation_checkpointing_enable, which also calls
  enable_input_require_grads), as trainer.py:Trainer.train does for args.activation_checkpointing.
- LoRA: peft.get_peft_model(model, LoraConfig(...)) (peft autocasts bf16 adapters to fp32:
  peft/peft_model.py autocast_adapter_dtype=True).

mode "trainer" runs the real transformers.Trainer (use_cpu=True, max_steps=steps, no eval/save/report) and
reads the counter from a Trainer subclass that only wraps compute_loss / training_step (to split the phases)
and from a callback at step begin / end.

Extra config keys: "attn_mask": true passes an all-ones attention_mask (as a tokenizer's collator would);
"clip": 0 disables clipping; "optim": "adamw_torch" (foreach) instead of fused; "itemise": true records the
tensors autograd saves (saved_tensors_hooks) per module and op, and lists them at the end of the forward;
"peak_trace": true records every counted allocation of the last step with the shim's event recorder
(mp_trace_start/take), names each by the aten op and module that made it (a TorchDispatchMode), replays the
events and lists what is alive at the step's peak ("peak_trace" in the output; show_peak.py prints it).
With MEMPLAN_ALLOC_TRACE=N set, phase markers are printed into the shim's allocation trace on stderr.
"""
import ctypes, json, math, os, sys, contextlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from reference_shim import install_counter

counter = install_counter(lib)


def chan(c):
    lib.mp_set_channel(c)


def reset_peak():
    lib.mp_reset_peak(0)
    if os.environ.get("MEMPLAN_ALLOC_TRACE"):  # phase markers in the allocator's trace (stderr)
        print(f"MARK reset current={counter()[0]}", file=sys.stderr, flush=True)


import transformers
from transformers import AutoConfig, AutoModelForCausalLM

torch.manual_seed(0)
ARCH = cfg.get("arch", "llama")
B, S = cfg["batch"], cfg["seq"]
STEPS = cfg.get("steps", 3)
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.get("dtype", "fp32")]
AMP = cfg.get("amp", "none")
GC = cfg.get("gc", False)
LORA = cfg.get("lora")
MODE = cfg.get("mode", "manual")
CLIP = cfg.get("clip", 1.0)
OPTIM = cfg.get("optim", "adamw_torch_fused")

prof = json.load(open(os.path.join(HERE, "..", "..", "profiles", "models", f"{cfg.get('profile', 'tiny')}.json")))
keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "vocab_size", "tie_word_embeddings", "max_position_embeddings", "hidden_act", "rms_norm_eps", "rope_theta"]
kw = {k: prof[k] for k in keys if k in prof}
if ARCH == "llama":
    kw.update(attention_bias=prof.get("attention_bias", False), mlp_bias=prof.get("mlp_bias", False))
hf_cfg = AutoConfig.for_model("llama" if ARCH == "llama" else "qwen2", **kw)
# Trainer sets model.config.use_cache = args.use_cache (default False) (trainer.py:Trainer.__init__, "Finalize").
# With the config default (True) a plain loop builds a DynamicCache in training: torch.cat copies of k and v
# (cache_utils.py:DynamicLayer.update) that SDPA saves anyway in fp32, but that stay alive beside SDPA's bf16
# casts under autocast.
hf_cfg.use_cache = cfg.get("use_cache", False)
V = hf_cfg.vocab_size

# Everything from here is counted (channel 0) unless switched off around non-training work.
chan(0)
reset_peak()
base = counter()[0]
model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=DT)
model.train()
n_params = sum(p.numel() for p in model.parameters())
if LORA:
    from peft import LoraConfig, get_peft_model
    tm = LORA.get("targets", "qkvo")
    target = ["q_proj", "k_proj", "v_proj", "o_proj"] if tm == "qkvo" else tm
    lcfg = LoraConfig(r=LORA["r"], lora_alpha=LORA.get("alpha", 16), target_modules=target,
                      lora_dropout=LORA.get("dropout", 0.05), task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
if GC and MODE == "manual":
    model.activation_checkpointing_enable()
after_model = counter()[0] - base


def make_batch():
    """input_ids and labels (the collator's tensors), counted as the device holds them."""
    chan(2)
    toks = torch.randint(0, V, (B, S))
    chan(0)
    b = {"input_ids": toks.clone(), "labels": toks.clone()}
    if cfg.get("attn_mask"):
        b["attention_mask"] = torch.ones(B, S, dtype=torch.long)
    return b


def decay_groups(m):
    """Trainer.create_optimizer's two groups: weight decay except biases and norm weights."""
    dec, nodec = [], []
    for n, p in m.named_parameters():
        if not p.requires_grad:
            continue
        (nodec if ("bias" in n or "norm" in n) else dec).append(p)
    return [{"params": dec, "weight_decay": 0.0}, {"params": nodec, "weight_decay": 0.0}]


# ---- itemisation: what autograd saves, per module and aten op ------------------------------------
saved = {}  # storage ptr -> dict
mod_stack = []
last_op = [None]
if cfg.get("itemise"):
    from torch.utils._python_dispatch import TorchDispatchMode

    class LastOp(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            last_op[0] = str(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    names = {id(m): n for n, m in model.named_modules()}
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pre(m, a):
        mod_stack.append(names.get(id(m), type(m).__name__))

    def post(m, a, o):
        if mod_stack:
            mod_stack.pop()

    torch.nn.modules.module.register_module_forward_pre_hook(pre)
    torch.nn.modules.module.register_module_forward_hook(post)

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in param_ptrs:
            kind = "param"
        else:
            kind = "act"
        ent = saved.setdefault(ptr, {"bytes": st.nbytes(), "dtype": str(t.dtype).replace("torch.", ""),
                                     "shape": list(t.shape), "kind": kind,
                                     "by": []})
        ent["by"].append(f"{mod_stack[-1] if mod_stack else '-'}:{last_op[0]}")
        return t

    def unpack(t):
        return t


def forward_loss(batch, num_items):
    """Trainer.compute_loss under compute_loss_context_manager (accelerate's autocast wrapper when bf16)."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if AMP == "bf16" else contextlib.nullcontext()
    item = contextlib.ExitStack()
    if cfg.get("itemise"):
        item.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
        item.enter_context(LastOp())
    with item:
        with ctx:
            outputs = model(**batch, num_items_in_batch=num_items)
        if AMP == "bf16":  # accelerate's convert_outputs_to_fp32, outside the autocast region
            for k in list(outputs.keys()):
                v = outputs[k]
                if torch.is_tensor(v) and v.dtype in (torch.float16, torch.bfloat16):
                    outputs[k] = v.float()
    out_info = {"logits_dtype": str(outputs.logits.dtype), "cache": type(getattr(outputs, "cache", None)).__name__}
    loss = outputs["loss"]
    return loss, out_info


# ---- peak itemisation: every counted allocation of the last step, named by the aten op that made it -------
PT = cfg.get("peak_trace")
oplog = []  # (first event index, last event index, op, module, phase, outputs)
phase = ["-"]
n_events = [0]
if PT:
    from torch.utils._python_dispatch import TorchDispatchMode
    lib.mp_trace_pending.restype = ctypes.c_int64
    lib.mp_trace_take.restype = ctypes.c_int64
    _names = {id(m): n for n, m in model.named_modules()}
    _stack = []
    torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: _stack.append(_names.get(id(m), "?")))

    def _post(m, a, o):
        if _stack:
            _stack.pop()

    torch.nn.modules.module.register_module_forward_hook(_post)

    class OpLog(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            n0 = lib.mp_trace_pending()
            out = func(*args, **(kwargs or {}))
            n1 = lib.mp_trace_pending()
            if n1 > n0:
                outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(o)]
                oplog.append((n0, n1, str(func.overloadpacket.__name__), _stack[-1] if _stack else "-", phase[0],
                              [(str(o.dtype).replace("torch.", ""), list(o.shape)) for o in outs]))
            return out

    def take_events():
        n = lib.mp_trace_pending()
        buf = (ctypes.c_int64 * (4 * n))()
        got = lib.mp_trace_take(buf, n)
        return [tuple(buf[4 * i:4 * i + 4]) for i in range(got)]

    def peak_report(start_current, events, top=60):
        """Replays the events; at the peak lists what is alive that was allocated during the step."""
        # which op made each allocation: events are numbered in order; oplog ranges index them
        who = {}
        for (n0, n1, op, mod, ph, outs) in oplog:
            for i in range(n0, n1):
                who[i] = (ph, mod, op, outs)
        live, cur, best, best_i = {}, start_current, -1, -1
        snaps = {}
        for i, (kind, aid, nb, tag) in enumerate(events):
            if kind == 0:
                live[aid] = (nb, who.get(i, ("?", "-", "?", [])))
                cur += nb
            else:
                if aid in live:
                    cur -= live.pop(aid)[0]
            if cur > best:
                best, best_i, snaps = cur, i, dict(live)
        rows = {}
        for aid, (nb, (ph, mod, op, outs)) in snaps.items():
            k = (ph, mod, op, str(outs[:1])) if not os.environ.get("PT_RAW") else (ph, mod, op, str(outs) + f"#{aid}")
            r = rows.setdefault(k, [0, 0])
            r[0] += nb
            r[1] += 1
        return {"peak": best, "event": best_i, "alive_before_step": start_current,
                "alive_from_step": sorted(([v[0], v[1], *k] for k, v in rows.items()), key=lambda r: (r[2], r[3]))}


def run_manual():
    global opt
    if OPTIM == "adamw_torch_fused":
        opt = torch.optim.AdamW(decay_groups(model), lr=5e-5, betas=(0.9, 0.999), eps=1e-8, fused=True)
    elif OPTIM == "adamw_torch":
        opt = torch.optim.AdamW(decay_groups(model), lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / STEPS))
    model.zero_grad()
    setup = counter()[0] - base
    out = {"setup": setup, "after_model": after_model, "steps": []}
    for step in range(STEPS):
        reset_peak()
        s0 = counter()[0]
        tracing = PT and step == STEPS - 1
        if tracing:
            lib.mp_trace_start()
            mode = OpLog()
            mode.__enter__()
            phase[0] = "fwd"
        batch = make_batch()
        num_items = batch["labels"][..., 1:].ne(-100).sum()  # Trainer._get_num_items_in_batch
        loss, info = forward_loss(batch, num_items)
        f_end, f_peak = counter()
        if cfg.get("itemise") and step == STEPS - 1:
            out["saved"] = summarise_saved()
            out["fwd_end_detail"] = f_end - base
        saved.clear()
        reset_peak()
        loss = loss * 1  # Trainer: loss *= num_processes // tp (in place on the graph's output)
        phase[0] = "bwd"
        loss.backward()
        tr = loss.detach()
        del loss, batch, num_items
        b_end, b_peak = counter()
        reset_peak()
        o0 = counter()[0]
        phase[0] = "opt"
        if CLIP and CLIP > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
        c_end, c_peak = counter()
        opt.step()
        sched.step()
        model.zero_grad()
        o_end, o_peak = counter()
        if tracing:
            mode.__exit__(None, None, None)
            lib.mp_trace_stop()
            out["peak_trace"] = peak_report(s0 - base, take_events())
        out["steps"].append({k: v - base for k, v in dict(
            fwd_start=s0, fwd_peak=f_peak, fwd_end=f_end, bwd_peak=b_peak, bwd_end=b_end, opt_start=o0,
            clip_peak=c_peak, opt_peak=o_peak, opt_end=o_end).items()})
        out["info"] = info
    return out


def summarise_saved():
    per = {}
    total = 0
    rows = []
    for ptr, e in saved.items():
        if e["kind"] == "param":
            continue
        total += e["bytes"]
        rows.append((e["bytes"], e["dtype"], e["shape"], sorted(set(e["by"]))))
    rows.sort(key=lambda r: r[3])
    return {"total_act_bytes": total, "rows": rows}


def run_trainer():
    from transformers import Trainer, TrainingArguments, TrainerCallback

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return B * STEPS

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            t = torch.randint(0, V, (S,), generator=g)
            return {"input_ids": t, "labels": t.clone()}

    rec = {"steps": []}
    cur = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **k):
            reset_peak()
            cur.clear()
            cur["fwd_start"] = counter()[0] - base

        def on_step_end(self, args, state, control, **k):
            c, p = counter()
            cur["opt_peak"], cur["opt_end"] = p - base, c - base
            rec["steps"].append(dict(cur))

    class T(Trainer):
        def compute_loss(self, model, inputs, **k):
            r = super().compute_loss(model, inputs, **k)
            c, p = counter()
            cur["fwd_peak"], cur["fwd_end"] = p - base, c - base
            reset_peak()
            return r

        def training_step(self, *a, **k):
            r = super().training_step(*a, **k)
            c, p = counter()
            cur["bwd_peak"], cur["bwd_end"] = p - base, c - base
            reset_peak()
            cur["opt_start"] = c - base
            return r

    args = TrainingArguments(output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "memplan-hf-trainer"), use_cpu=True, max_steps=STEPS,
                             per_device_train_batch_size=B, bf16=(AMP == "bf16"), report_to="none",
                             save_strategy="no", eval_strategy="no", logging_strategy="no",
                             activation_checkpointing=GC, dataloader_num_workers=0, optim=OPTIM,
                             max_grad_norm=CLIP, learning_rate=5e-5, seed=0, disable_tqdm=True)
    tr = T(model=model, args=args, train_dataset=DS(), callbacks=[Probe()])
    rec["setup"] = counter()[0] - base
    rec["after_model"] = after_model
    tr.train()
    rec["optimizer"] = type(tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer).__name__
    o = tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer
    rec["optim_defaults"] = {k: v for k, v in o.defaults.items() if k in ("fused", "foreach", "lr", "weight_decay")}
    rec["optim_groups"] = [len(g["params"]) for g in o.param_groups]
    rec["autocast_wrapped"] = hasattr(tr.model, "_original_forward") or hasattr(
        getattr(tr.model, "base_model", None), "_original_forward")
    return rec


res = run_manual() if MODE == "manual" else run_trainer()
res["cfg"] = cfg
res["params"] = n_params
res["trainable"] = n_train
last = res["steps"][-1]
res["steady_peak"] = max(last.get("fwd_peak", 0), last.get("bwd_peak", 0), last.get("opt_peak", 0),
                         last.get("clip_peak", 0))
res["torch"] = torch.__version__
res["transformers"] = transformers.__version__
print(json.dumps(res))
