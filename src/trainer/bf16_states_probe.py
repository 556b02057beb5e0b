"""torchtitan 0.3.0's `optimizer.implementation = "fused_opt_states_bf16"` on torch 2.11 (CPU), counted by memplan's
shim allocator: the device bytes its optimizer states take, against plain `fused`.

    OMP_NUM_THREADS=1 /tmp/fw-venv/bin/python src/trainer/bf16_states_probe.py /tmp/shim.so tiny small

For each model profile (profiles/models/<name>.json) the Llama of reference_llama.py is built in fp32 and given
gradients; torchtitan 0.3.0's own OptimizersContainer (imported, not copied; `default_adamw()`, the catch-all AdamW
group) is built with the implementation named, and stepped once. Under "fused_opt_states_bf16" the container's step
pre-hook (`_register_bf16_optimizer_state_hook`) makes `step` (a 0-d fp32 tensor on the parameter's device, as the
group is fused), `exp_avg` and `exp_avg_sq` (bf16, as the parameter) for every parameter with a gradient; then torch
2.11's CPU fused AdamW refuses the mixed dtypes ("Tensors of the same index must be on the same device and the same
dtype except `step` tensors..."): the mixed-precision kernel (FusedAdamMathFunctorMP) is CUDA's. So what is counted
is the states' creation, up to that refusal; the step's kernel allocates nothing on a GPU (fused).
Prints one JSON line per (profile, implementation): the bytes the first step left allocated ("states"), the number
of parameter tensors, and the states' dtypes.
"""
import ctypes, json, os, sys

lib = ctypes.CDLL(sys.argv[1])
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_shim import install_counter
from reference_llama import Transformer
from torchtitan.components.optimizer.optimizer import OptimizersContainer, default_adamw

torch.set_num_threads(1)
counter = install_counter(lib)
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
for name in sys.argv[2:]:
    prof = json.load(open(os.path.join(root, "profiles", "models", name + ".json")))
    for impl in ["fused", "fused_opt_states_bf16"]:
        torch.manual_seed(0)
        model = Transformer(prof["vocab_size"], prof["hidden_size"], prof["num_hidden_layers"],
                            prof["num_attention_heads"], prof["num_key_value_heads"],
                            prof["intermediate_size"], 16)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        config = default_adamw()
        config.implementation = impl
        opt = OptimizersContainer(config, model_parts=[model])
        lib.mp_set_channel(0)
        before = counter()[0]
        refused = None
        try:
            opt.step()
        except RuntimeError as e:
            refused = str(e).splitlines()[0][:120]
        states = counter()[0] - before
        lib.mp_set_channel(2)
        dtypes = sorted({str(v.dtype) for o in opt.optimizers for s in o.state.values() for k, v in s.items() if k != "step"})
        print(json.dumps({"model": name, "implementation": impl, "param_tensors": len(list(model.parameters())),
                          "params": sum(p.numel() for p in model.parameters()), "states": states,
                          "state_dtypes": dtypes, "cpu_refused": refused}))
        del opt, model
