"""Multi-process throughput against PyTorch's own FSDP2 on Gloo, side by side, same machine.

Runs `memplan train --nproc-per-node 2` (release build, argv[1]) on the `small` profile, then
the same model under PyTorch's `fully_shard` (each block, then the root) in two processes
over Gloo on loopback: same shapes, fp32, foreach AdamW, same steps, one thread per rank.
Each side's job throughput is the sum of its ranks' tokens/s, every step timed (the first
included, on both sides). Prints both and their ratio.

    source scripts/libtorch-env.sh
    cargo build --release --features trainer
    python3 scripts/bench_distributed.py target/release/memplan [steps]
"""
import json
import os
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench_model import Model, V

WORLD, B, S = 2, 4, 256


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, port, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = Model(S)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    data = (torch.arange(B * (S + 1)).view(B, S + 1) * 5 + 3 + rank) % V
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        pred = model(data[:, :-1])
        loss = F.cross_entropy(pred.flatten(0, 1).float(), data[:, 1:].flatten(0, 1))
        del pred
        loss.backward()
        opt.step()
    out[rank] = B * S * steps / (time.perf_counter() - start)
    dist.destroy_process_group()


def main():
    binary = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    plan = [
        "--model", "small", "--gpu", "cpu", "--num-gpus", str(WORLD),
        "--micro-batch-size", str(B), "--seq-len", str(S), "--param-dtype", "fp32",
        "--optimizer-impl", "foreach",
    ]
    res = subprocess.run(
        [binary, "train", "--nproc-per-node", str(WORLD), "--steps", str(steps),
         "--format", "json", *plan],
        capture_output=True, text=True, env=env, check=True,
    )
    ranks = json.loads(res.stdout)["ranks"]
    ours = sum(r["report"]["tokens_per_second"] for r in ranks)

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(rank_main, args=(free_port(), steps, out), nprocs=WORLD, join=True)
    theirs = sum(out.values())
    print(f"memplan, {WORLD} processes over c10d Gloo: {ours:,.0f} tokens/s")
    print(f"PyTorch FSDP2, {WORLD} processes on Gloo:  {theirs:,.0f} tokens/s")
    print(f"ratio (memplan / PyTorch FSDP2): {ours / theirs:.3f}  "
          f"(small, batch {B} x seq {S} per rank, fp32, {steps} steps, 1 thread per rank)")


if __name__ == "__main__":
    main()
