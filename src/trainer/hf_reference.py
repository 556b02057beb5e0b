"""Hugging Face Transformers (5.24.0) training steps on CPU under memplan's counting allocator: full fine-tunes,
peft LoRA, QLoRA (bitsandbytes 4-bit base + peft LoRA) and other optimizers.

    HF_HUB_OFFLINE=1 python src/trainer/hf_reference.py /tmp/shim.so '{"profile":"small","batch":2,"seq":64,
        "qlora":{"dq":true},"lora":{"r":16,"targets":"all-linear","dropout":0},"optim":"paged_adamw_8bit",
        "gc":false,"steps":3,"peak_trace":true}'

Versions: torch 2.11.0, transformers 5.24.0, accelerate 1.15.0, peft 0.21.2, bitsandbytes 0.50.2 (CPU backend).
Profiles are read from $MEMPLAN_PROFILES (default the repository's profiles/models). The measured
configurations are in tests/data/qlora_torch_2.11.jsonl, checked by tests/estimator.rs.

Keys beside those of the plain steps (documented below, after the QLoRA ones):
- "qlora": {"dq": bool (bnb_4bit_use_double_quant), "quant_type": "nf4", "compute": "bf16" (bnb_4bit_compute_dtype),
  "load_dtype": "bf16" (the checkpoint's and from_pretrained's dtype), "prepare": true}. A checkpoint with random
  weights is built from the profile (uncounted) and saved once under $TMPDIR/memplan-hf-models/; it is then loaded,
  counted, with
  from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...), device_map="cpu"): transformers'
  bnb quantizer (quantizers/quantizer_bnb_4bit.py) swaps every nn.Linear but lm_head for bnb.nn.Linear4bit and
  quantises each weight as it is loaded (nn/modules.py:Params4bit._quantize -> functional.py:quantize_4bit).
  Tensors left as views of the checkpoint's mmap (uncounted on CPU; copied to the device on a GPU) are copied into
  counted memory (static.mmap_materialised). Then, unless "prepare" is false,
  peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(gc), gradient_checkpointing_kwargs=
  {"use_reentrant": False} if gc is true else None): "gc": "reentrant" gives peft's default, which reaches
  torch.utils.checkpoint without use_reentrant (torch 2.11: reentrant, with a warning).
- "lora": {"targets": "all-linear"} as well as "qkvo" or a list.
- "optim": adamw_torch_fused | adamw_torch (+ "foreach") | adamw_8bit | paged_adamw_8bit | adamw_bnb_32bit (bnb
  AdamW as Trainer builds it, trainer_optimizer.py:_get_bitsandbytes_optimizer, with Trainer.create_optimizer's
  32-bit override for nn.Embedding weights; "embed_32bit": false drops it) | adafactor (torch.optim.Adafactor,
  + "foreach") | sgd (+ "momentum", "foreach") | muon (torch.optim.Muon on 2-D parameters, "muon_scope": "hidden"
  = the decoder blocks' matrices or "all2d", fused AdamW for the rest).
- "gc": "reentrant" (see above); for a plain model it asks activation_checkpointing_enable for use_reentrant=True.

Output (one JSON line): the plain steps' (below), plus "static" (bytes after load / prepare / LoRA, each itemised by
kind: packed 4-bit weights, absmax, quant maps, double-quant state, parameters by dtype, buffers), "opt_state"
(optimizer state by key and dtype, distinct storages, and per parameter), "opt_state_after_step1", per step a
"step_peak" (the optimizer.step() alone, after clipping). With "peak_trace": "peak_trace" (the step's peak),
"phase_traces" (the peaks within fwd, bwd and optimizer.step(), each itemised by phase, module, op and block sizes)
and "lifetimes" (every allocation made inside bitsandbytes' gemm_4bit / dequantize_4bit / dequantize_blockwise:
its size and the op that freed it).

The plain steps. What the manual loop mirrors (transformers 5.24.0, accelerate 1.15.0, peft 0.21.2, torch 2.11.0):
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
events and lists what is alive at the step's peak ("peak_trace" in the output).
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

PROFILES = os.environ.get("MEMPLAN_PROFILES", os.path.join(HERE, "..", "..", "profiles", "models"))
prof = json.load(open(os.path.join(PROFILES, f"{cfg.get('profile', 'tiny')}.json")))
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

def _dt(t):
    return str(t.dtype).replace("torch.", "")


def static_items(m):
    """Every distinct storage the model holds (parameters, buffers, bitsandbytes quant states), by kind."""
    seen, rows = set(), {}

    def add(kind, t):
        if t is None or not torch.is_tensor(t):
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0 or key in seen:
            return
        seen.add(key)
        r = rows.setdefault(kind, [0, 0, 0])
        r[0] += st.nbytes()
        r[1] += 1
        r[2] += t.numel()

    for n, p in m.named_parameters():
        if type(p).__name__ == "Params4bit":
            add("4bit.packed_weight." + _dt(p), p)
            qs = p.quant_state
            if qs is None:
                continue
            add("4bit.absmax." + _dt(qs.absmax), qs.absmax)
            add("4bit.code", qs.code)
            add("4bit.offset", qs.offset)
            if qs.state2 is not None:
                add("4bit.state2.absmax." + _dt(qs.state2.absmax), qs.state2.absmax)
                add("4bit.state2.code", qs.state2.code)
        else:
            kind = "lora" if "lora_" in n else "base"
            add(f"param.{kind}.{_dt(p)}.{'trainable' if p.requires_grad else 'frozen'}", p)
    for n, b in m.named_buffers():
        add("buffer." + _dt(b), b)
    out = {k: {"bytes": v[0], "tensors": v[1], "numel": v[2]} for k, v in sorted(rows.items())}
    out["_total"] = sum(v[0] for v in rows.values())
    return out



def _mmap_ranges(path_part):
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if path_part in line:
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def materialise_mmapped(m, ckpt_dir):
    """Replaces every parameter or buffer whose storage lies in a mapping of ckpt_dir's files by a counted copy."""
    ranges = _mmap_ranges(ckpt_dir)
    moved = {"bytes": 0, "tensors": 0, "names": []}
    if not ranges:
        return moved
    with torch.no_grad():
        for mod_name, mod in m.named_modules():
            for coll in (mod._parameters, mod._buffers):
                for k, t in list(coll.items()):
                    if t is None:
                        continue
                    ptr = t.untyped_storage().data_ptr()
                    if any(lo <= ptr < hi for lo, hi in ranges):
                        t.data = t.data.clone()
                        moved["bytes"] += t.untyped_storage().nbytes()
                        moved["tensors"] += 1
                        moved["names"].append(f"{mod_name}.{k}")
    return moved



# Everything from here is counted (channel 0) unless switched off around non-training work.
QL = cfg.get("qlora")  # {"dq": bool, "quant_type": "nf4", "compute": "bf16", "load_dtype": "bf16", "prepare": true}
static = {}
if QL:
    # A checkpoint on disk to quantise at load, as a QLoRA recipe does (from_pretrained of a bf16 checkpoint with
    # a BitsAndBytesConfig): built with random weights, uncounted (channel 2), saved once under
    # $TMPDIR/memplan-hf-models/.
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    LDT = {"fp32": torch.float32, "bf16": torch.bfloat16}[QL.get("load_dtype", "bf16")]
    CDT = {"fp32": torch.float32, "bf16": torch.bfloat16}[QL.get("compute", "bf16")]
    ckpt = os.path.join(os.environ.get("TMPDIR", "/tmp"), "memplan-hf-models",
                        f"{cfg.get('profile', 'tiny')}-{QL.get('load_dtype', 'bf16')}")
    chan(2)
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        m0 = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=LDT)
        m0.save_pretrained(ckpt)
        del m0
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QL.get("quant_type", "nf4"),
                              bnb_4bit_compute_dtype=CDT, bnb_4bit_use_double_quant=QL.get("dq", True))
    chan(0)
    reset_peak()
    base = counter()[0]
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=qcfg, device_map="cpu", dtype=LDT,
                                                 attn_implementation="sdpa", use_cache=False)
    c, p = counter()
    static["after_load_counted"], static["load_peak"] = c - base, p - base
    static["load_items"] = static_items(model)
    # On CPU, tensors that from_pretrained leaves as they are in the checkpoint (here the bf16 embedding, norms and
    # lm_head) are views of the safetensors file's mmap, which no allocator counts; on a GPU they are copied to the
    # device. Copy them into counted memory so the counter holds what a GPU would.
    static["mmap_materialised"] = materialise_mmapped(model, ckpt)
    static["after_load"] = counter()[0] - base
else:
    chan(0)
    reset_peak()
    base = counter()[0]
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=DT)
    static["after_load"] = counter()[0] - base
    static["load_items"] = static_items(model)
model.train()
n_params = sum(p.numel() for p in model.parameters())
n_params_logical = sum((math.prod(p.quant_state.shape) if hasattr(p, "quant_state") and p.quant_state is not None
                        else p.numel()) for p in model.parameters())
if QL and QL.get("prepare", True):
    # peft/utils/other.py:prepare_model_for_kbit_training: freezes every parameter, casts fp16/bf16 parameters that
    # are not Params4bit to fp32 (embedding, norms, lm_head), and with use_gradient_checkpointing (its default True)
    # hooks the embedding output to require grad (only when the kwargs lack use_reentrant or set it True) and calls
    # gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or {}): an empty dict reaches
    # torch.utils.checkpoint without use_reentrant, which torch 2.11 still treats as use_reentrant=True (warning).
    from peft import prepare_model_for_kbit_training
    gck = {"use_reentrant": False} if GC is True else None
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(GC),
                                            gradient_checkpointing_kwargs=gck)
    static["after_prepare"] = counter()[0] - base
    static["prepare_items"] = static_items(model)
if LORA:
    from peft import LoraConfig, get_peft_model
    tm = LORA.get("targets", "qkvo")
    target = (["q_proj", "k_proj", "v_proj", "o_proj"] if tm == "qkvo" else
              "all-linear" if tm == "all-linear" else tm)
    lcfg = LoraConfig(r=LORA["r"], lora_alpha=LORA.get("alpha", 16), target_modules=target,
                      lora_dropout=LORA.get("dropout", 0.05), task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
if GC and MODE == "manual" and not QL:
    model.activation_checkpointing_enable({"use_reentrant": True} if GC == "reentrant" else None)
if QL and GC and not QL.get("prepare", True):
    model.activation_checkpointing_enable()
after_model = counter()[0] - base
static["after_model"] = after_model
static["model_items"] = static_items(model)


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
if PT:
    from reference_shim import OpTrace

    tracer = OpTrace(lib, model, phase, oplog)
    OpLog, take_events = tracer.mode, tracer.take_events

    def peak_report(start_current, events, lo=0, hi=None):
        """At the highest point within events [lo, hi), what is alive that was allocated during the step,
        grouped by (phase, module, op, first output), with each group's distinct block sizes."""
        best, best_i, snaps = tracer.alive_at_peak(start_current, events, lo, hi)
        rows = {}
        for aid, (nb, (ph, mod, op, outs)) in snaps.items():
            k = (ph, mod, op, str(outs[:1]))
            r = rows.setdefault(k, [0, 0, set()])
            r[0] += nb
            r[1] += 1
            r[2].add(nb)
        return {"peak": best, "event": best_i, "alive_before_step": start_current,
                "alive_from_step": sorted(([v[0], v[1], *k, sorted(v[2])] for k, v in rows.items()),
                                          key=lambda r: (r[2], r[3]))}


def lifetimes(events, ops=("gemm_4bit", "dequantize_4bit", "dequantize_blockwise")):
    """For every allocation made inside one of `ops` (by the op log's event ranges): its size, and the op during
    which (or after which) it was freed, grouped by (phase, op, module, size, freed by)."""
    idx_op = {}
    for (n0, n1, op, mod, ph, outs) in oplog:
        for i in range(n0, n1):
            idx_op[i] = (ph, op, mod)
    alloc_at, freed_by = {}, {}
    for i, (kind, aid, nb, tag) in enumerate(events):
        if kind == 0:
            alloc_at[aid] = (i, nb)
        else:
            freed_by[aid] = i
    rows = {}
    for aid, (i, nb) in alloc_at.items():
        o = idx_op.get(i)
        if not o or o[1] not in ops:
            continue
        j = freed_by.get(aid)
        if j is None:
            fb = "alive at step end"
        else:
            # the op whose range holds the free, else the last op that ran before it
            fo = idx_op.get(j)
            if fo is None:
                prev = max((n1, op, ph) for (n0, n1, op, mod, ph, outs) in oplog if n1 <= j) if j > 0 else (0, "-", "-")
                fb = f"after {prev[2]}:{prev[1]}"
            else:
                fb = f"in {fo[0]}:{fo[1]}" + (" (same op)" if (j >= i and all(idx_op.get(k) == o for k in (i, j))) else "")
            fb += f" +{j - i} events"
        k = (o[0], o[1], o[2].split(".")[-1] if o[2] != "-" else "-", nb, fb.split(" +")[0])
        rows[k] = rows.get(k, 0) + 1
    return sorted([list(k) + [v] for k, v in rows.items()])


def make_optimizers():
    """The optimizer(s) for OPTIM, built over the trainable parameters as Trainer.create_optimizer groups them.
    Returns a list (Muon needs a second optimizer for what it cannot take)."""
    groups = decay_groups(model)
    if OPTIM == "adamw_torch_fused":
        return [torch.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, fused=True)]
    if OPTIM == "adamw_torch":
        # foreach None (Trainer's adamw_torch) means the for-loop implementation on CPU (torch/optim/optimizer.py:
        # _default_to_fused_or_foreach picks foreach only for CUDA-like devices); "foreach": true forces it.
        return [torch.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, foreach=cfg.get("foreach"))]
    if OPTIM in ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_32bit"):
        # trainer_optimizer.py:_get_bitsandbytes_optimizer: bnb.optim.AdamW(optim_bits=8 for "8bit" names,
        # is_paged for "paged" names) with Trainer's Adam kwargs; then trainer.py:Trainer.create_optimizer registers
        # every nn.Embedding weight for 32-bit states (GlobalOptimManager.register_module_override).
        import bitsandbytes as bnb
        bits = 32 if OPTIM == "adamw_bnb_32bit" else 8
        o = bnb.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, optim_bits=bits,
                            is_paged=OPTIM.startswith("paged"))
        if bits == 8 and cfg.get("embed_32bit", True):
            mng = bnb.optim.GlobalOptimManager.get_instance()
            for mod in model.modules():
                if isinstance(mod, torch.nn.Embedding):
                    mng.register_module_override(mod, "weight", {"optim_bits": 32})
        return [o]
    if OPTIM == "adafactor":
        return [torch.optim.Adafactor(groups, lr=1e-2, foreach=cfg.get("foreach", False))]
    if OPTIM == "sgd":
        return [torch.optim.SGD(groups, lr=1e-3, momentum=cfg.get("momentum", 0.9),
                                foreach=cfg.get("foreach", False))]
    if OPTIM == "muon":
        # torch.optim.Muon takes 2-D parameters only. scope "hidden": the decoder blocks' matrices (Keller Jordan's
        # and torchtitan's split: embeddings, lm_head, norms to AdamW); scope "all2d": every 2-D parameter.
        scope = cfg.get("muon_scope", "hidden")
        mu, rest = [], []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            is_mu = p.ndim == 2 and (scope == "all2d" or ("layers." in n))
            (mu if is_mu else rest).append(p)
        return [torch.optim.Muon(mu, lr=2e-2, weight_decay=0.0, momentum=0.95, nesterov=True),
                torch.optim.AdamW(rest, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, fused=True)]
    raise ValueError(OPTIM)


def optimizer_state_items(opts):
    """Optimizer state by key and dtype (distinct storages: bnb's qmaps are shared), and per parameter."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen, rows, per = set(), {}, []
    for o in opts:
        for p, st in o.state.items():
            ent = {"name": names.get(id(p), "?"), "numel": p.numel(), "dtype": _dt(p), "state": {}}
            for k, v in st.items():
                if not torch.is_tensor(v):
                    continue
                s = v.untyped_storage()
                shared = s.data_ptr() in seen
                seen.add(s.data_ptr())
                ent["state"][k] = [_dt(v), list(v.shape), s.nbytes(), "shared" if shared else ""]
                if not shared:
                    r = rows.setdefault(f"{k}.{_dt(v)}", [0, 0])
                    r[0] += s.nbytes()
                    r[1] += 1
            per.append(ent)
    by = {k: {"bytes": v[0], "tensors": v[1]} for k, v in sorted(rows.items())}
    by["_total"] = sum(v[0] for v in rows.values())
    return {"by_key": by, "per_param": per}


def run_manual():
    global opts
    opts = make_optimizers()
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: max(0.0, 1 - s / STEPS)) for o in opts]
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
        ev_bwd = lib.mp_trace_pending() if tracing else 0
        loss.backward()
        tr = loss.detach()
        del loss, batch, num_items
        b_end, b_peak = counter()
        reset_peak()
        o0 = counter()[0]
        phase[0] = "opt"
        ev_opt = lib.mp_trace_pending() if tracing else 0
        if CLIP and CLIP > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
        c_end, c_peak = counter()
        ev_step = lib.mp_trace_pending() if tracing else 0
        reset_peak()
        for o in opts:
            o.step()
        s_end, s_peak = counter()
        for s in scheds:
            s.step()
        model.zero_grad()
        o_end, o_peak = counter()
        o_peak = max(o_peak, s_peak, c_peak)
        if tracing:
            mode.__exit__(None, None, None)
            lib.mp_trace_stop()
            ev = take_events()
            out["peak_trace"] = peak_report(s0 - base, ev)
            out["phase_traces"] = {"fwd": peak_report(s0 - base, ev, 0, ev_bwd),
                                   "bwd": peak_report(s0 - base, ev, ev_bwd, ev_opt),
                                   "opt_step": peak_report(s0 - base, ev, ev_step, len(ev))}
            out["lifetimes"] = lifetimes(ev)
        out["steps"].append({k: v - base for k, v in dict(
            fwd_start=s0, fwd_peak=f_peak, fwd_end=f_end, bwd_peak=b_peak, bwd_end=b_end, opt_start=o0,
            clip_peak=c_peak, step_peak=s_peak, opt_peak=o_peak, opt_end=o_end).items()})
        if step == 0:
            out["opt_state_after_step1"] = optimizer_state_items(opts)
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
res["static"] = static
res["params_logical"] = n_params_logical
if MODE == "manual":
    res["opt_state"] = optimizer_state_items(opts)
    res["optimizers"] = [type(o).__name__ for o in opts]
res["params"] = n_params
res["trainable"] = n_train
last = res["steps"][-1]
res["steady_peak"] = max(last.get("fwd_peak", 0), last.get("bwd_peak", 0), last.get("opt_peak", 0),
                         last.get("clip_peak", 0), last.get("step_peak", 0))
res["torch"] = torch.__version__
res["transformers"] = transformers.__version__
import peft as _peft
res["peft"] = _peft.__version__
try:
    import bitsandbytes as _bnb
    res["bitsandbytes"] = _bnb.__version__
except Exception:
    pass
print(json.dumps(res))
