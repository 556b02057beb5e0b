"""Trainer throughput against PyTorch eager, side by side, same machine, same threads.

Runs `memplan train` (release build, given as argv[1]) on a plan, then the same model in
PyTorch eager (torchtitan's Llama of late 2024: eager RMSNorm, complex rotary, repeat_kv,
SDPA, SwiGLU), same shapes, same dtype, same optimizer, same number of steps, same thread
count, each timed over all its steps, and prints tokens/s of both and their ratio.

    source scripts/libtorch-env.sh
    cargo build --release --features trainer
    python3 scripts/bench_trainer.py target/release/memplan [steps] [threads]

The eager side trains a plain module (no FSDP, the plan is dp_shard 1); memplan's trainer
also runs its FSDP rank-0 machinery and its counting allocator, which are part of its cost.
"""
import json, math, subprocess, sys, time

import torch
import torch.nn as nn
import torch.nn.functional as F

binary = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
MODEL, B, S = "small", 8, 256
H, L, NH, NKV, FF, V = 256, 4, 8, 8, 688, 2048
HD = H // NH

plan = [
    "--model", MODEL, "--gpu", "cpu", "--num-gpus", "1", "--micro-batch-size", str(B),
    "--seq-len", str(S), "--param-dtype", "fp32", "--optimizer-impl", "foreach",
]
env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
import os
env = {**os.environ, **env}
out = subprocess.run(
    [binary, "train", "--quiet", "--steps", str(steps), "--format", "json", *plan],
    capture_output=True, text=True, env=env, check=True,
).stdout
ours = json.loads(out)["runs"][0]["report"]["tokens_per_second"]

torch.set_num_threads(threads)
torch.manual_seed(0)


from bench_model import Model, H, L, NH, NKV, FF, V, HD  # noqa: E402


model = Model(S)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)
data = (torch.arange(B * (S + 1)).view(B, S + 1) * 5 + 3) % V
start = time.perf_counter()
for step in range(steps):
    opt.zero_grad(set_to_none=True)
    pred = model(data[:, :-1])
    loss = F.cross_entropy(pred.flatten(0, 1).float(), data[:, 1:].flatten(0, 1))
    del pred
    loss.backward()
    opt.step()
eager = B * S * steps / (time.perf_counter() - start)
print(f"memplan trainer: {ours:,.0f} tokens/s")
print(f"PyTorch eager:   {eager:,.0f} tokens/s")
print(f"ratio (memplan / eager): {ours / eager:.3f}  ({MODEL}, batch {B} x seq {S}, fp32, {steps} steps, {threads} threads)")
