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


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary(x, freqs):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(3).type_as(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(H), RMSNorm(H)
        self.wq = nn.Linear(H, NH * HD, bias=False)
        self.wk = nn.Linear(H, NKV * HD, bias=False)
        self.wv = nn.Linear(H, NKV * HD, bias=False)
        self.wo = nn.Linear(NH * HD, H, bias=False)
        self.w1 = nn.Linear(H, FF, bias=False)
        self.w2 = nn.Linear(FF, H, bias=False)
        self.w3 = nn.Linear(H, FF, bias=False)

    def forward(self, x, freqs):
        b, s, _ = x.shape
        n = self.attention_norm(x)
        q = self.wq(n).view(b, s, NH, HD)
        k = self.wk(n).view(b, s, NKV, HD)
        v = self.wv(n).view(b, s, NKV, HD)
        q, k = rotary(q, freqs), rotary(k, freqs)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = x + self.wo(o.transpose(1, 2).contiguous().view(b, s, -1))
        n2 = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(n2)) * self.w3(n2))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, H)
        self.layers = nn.ModuleList(Block() for _ in range(L))
        self.norm = RMSNorm(H)
        self.output = nn.Linear(H, V, bias=False)
        f = 1.0 / (10000.0 ** (torch.arange(0, HD, 2).float() / HD))
        t = torch.arange(2 * S).float()
        self.register_buffer("freqs", torch.polar(torch.ones(2 * S, HD // 2), torch.outer(t, f))[:S].view(1, S, 1, HD // 2))

    def forward(self, tokens):
        h = self.tok(tokens)
        for blk in self.layers:
            h = blk(h, self.freqs)
        return self.output(self.norm(h))


model = Model()
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
