#!/usr/bin/env bash
# GPU validation: the estimator against the trainer on one NVIDIA GPU (H100/H200), the
# matrix of scripts/gpu-matrix.json (llama3.2-1b shape at seq 2048: every checkpointing mode
# the trainer runs, every offload mode, FSDP rank-0 emulation of 1, 2 and 8 ranks; and the
# first plan again as a real one-rank job whose process group is NCCL: the machine has one
# GPU, so a world of 1 proves the NCCL path and the emulation covers larger worlds).
#
# Build here, run there (shared/GPU.md): the binary carried from this machine, pointed at the
# device's own torch 2.11.0:
#   source scripts/libtorch-env.sh && cargo build --release --features trainer
#   mkdir -p .gpu && strip -o .gpu/memplan target/release/memplan   # (ignored) 4 MB; 96 MB with
#                                                       debuginfo, over the 64 MiB that travels
#   device run: MEMPLAN_BIN=.gpu/memplan bash scripts/gpu-validate.sh   carry: [".gpu/memplan"]
# Writes $OUT/validate.json (every run's full report) and $OUT/validate.md (the table),
# $OUT/fsdp2.json and fsdp2.md (PyTorch's own FSDP2, below), and prints the table last: peak
# allocated predicted vs measured, and measured reserved against the caching-allocator
# simulation of the trainer's one stream (validate's own), the estimator's fitted reserved and
# its simulation with FSDP2's three streams (`memplan estimate` on each matrix plan). Order: a
# two-step --trace smoke run, the FSDP2 runs, the matrix. The matrix took 5 minutes on an H200
# (2026-11-29); the FSDP2 runs are new (about a minute expected). Timeouts (60 + 150 + 360 s)
# keep the whole script inside one 600 s device call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/memplan-gpu}
mkdir -p "$OUT"
BIN=${MEMPLAN_BIN:-target/release/memplan}
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$TL:${LD_LIBRARY_PATH:-}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u +%F; } \
    | tee "$OUT/device.txt"
# Smoke first: one short CUDA run with the allocator history recorded, so that a crash in the
# CUDA path shows up on its own, before the matrix (its trace comes back in $OUT).
# MEMPLAN_GPU_SMOKE=0 skips it.
if [ "${MEMPLAN_GPU_SMOKE:-1}" != 0 ]; then
python3 -c 'import json,sys; json.dump(json.load(open("scripts/gpu-matrix.json"))[0]["plan"], sys.stdout)' \
    > /tmp/memplan-smoke-plan.json
timeout 60 "$BIN" train --plan /tmp/memplan-smoke-plan.json --device cuda --steps 2 --quiet \
    --trace "$OUT/smoke-trace.json" 2>&1
echo "smoke exit code: $?"
fi
# PyTorch's own FSDP2 on the GPU, with its three streams (src/trainer/fsdp2_reference.py in
# its cuda mode: rank 0 of a fake process group), on llama3-8b's layer and vocabulary shapes
# with 4 blocks (scripts/gpu-fsdp2): measured peak allocated and reserved against the
# estimator (allocated; fitted reserved; reserved simulated on FSDP2's streams), and the
# allocator model replaying the run's own history (`memplan replay`). MEMPLAN_GPU_FSDP2=0
# skips it. Writes $OUT/fsdp2.json and $OUT/fsdp2.md, and the first run's trace.
if [ "${MEMPLAN_GPU_FSDP2:-1}" != 0 ]; then
timeout "${MEMPLAN_GPU_FSDP2_TIMEOUT:-150}" python3 - "$OUT" "$BIN" <<'PY'
import gzip, json, subprocess, sys
out, binary = sys.argv[1], sys.argv[2]
model = "scripts/gpu-fsdp2/llama3-8b-4layers.json"
dims = dict(hidden=4096, layers=4, heads=32, kv_heads=8, ffn=14336, vocab=128256)
rows = []
def pct(x, m):
    return f"{100 * (x - m) / m:+.2f}%" if x and m else "n/a"
for k, (world, ac, seq) in enumerate([(8, "none", 4096), (8, "full", 4096), (2, "full", 4096)]):
    trace = f"/tmp/memplan-fsdp2-{k}.json"
    cfg = dict(dims, batch=1, seq=seq, world=world, param="bf16", reduce="fp32", ac=ac,
               logits="float-in-loss", steps=2, trace=trace)
    p = None
    try:
        p = subprocess.run([sys.executable, "src/trainer/fsdp2_reference.py", "cuda", json.dumps(cfg)],
                           capture_output=True, text=True, timeout=45)
        ref = json.loads(p.stdout.strip().splitlines()[-1])
    except Exception as e:
        print(f"fsdp2 world {world} ac {ac}: no result ({e})\n{(p.stderr if p else '')[-3000:]}")
        continue
    alloc = max(v for s in ref["steps"] for key, v in s.items() if key.endswith("_peak"))
    est = json.loads(subprocess.run(
        [binary, "estimate", "--model", model, "--gpu", "h200-141g", "--num-gpus", str(world),
         "--micro-batch-size", "1", "--seq-len", str(seq), "--param-dtype", "bf16",
         "--reduce-dtype", "fp32", "--master-dtype", "fp32", "--ac", ac,
         "--optimizer-impl", "foreach", "--format", "json"],
        capture_output=True, text=True).stdout)["per_gpu"]
    rep = json.loads(subprocess.run([binary, "replay", trace, "--format", "json"],
                                    capture_output=True, text=True).stdout or "{}")
    replayed = (rep.get("runs") or [{}])[0].get("peak_reserved_bytes")
    rows.append(dict(world=world, ac=ac, seq=seq, reference=ref, measured_allocated=alloc,
                     measured_reserved=ref.get("peak_reserved"), replayed_reserved=replayed,
                     trace_peak_allocated=rep.get("peak_allocated_bytes"),
                     predicted_allocated=est["peak_allocated_bytes"],
                     fitted_reserved=est["peak_reserved_bytes"],
                     simulated_reserved=(est.get("simulation") or {}).get("peak_reserved_bytes")))
    if k == 0:
        with open(trace, "rb") as f, gzip.open(f"{out}/fsdp2-trace.json.gz", "wb") as g:
            g.write(f.read())
json.dump(rows, open(f"{out}/fsdp2.json", "w"), indent=1)
mib = lambda x: f"{x / 2**20:.1f}" if x else "n/a"
lines = ["| FSDP2 (PyTorch, 3 streams) | measured peak allocated (MiB) | predicted | error "
         "| measured reserved | replayed history | error | simulated, FSDP2 streams | error | fitted | error |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for r in rows:
    m, res = r["measured_allocated"], r["measured_reserved"]
    lines.append(f"| llama3-8b shapes, 4 blocks, fsdp {r['world']}, ac {r['ac']}, 1 x {r['seq']} "
                 f"| {mib(m)} | {mib(r['predicted_allocated'])} | {pct(r['predicted_allocated'], m)} "
                 f"| {mib(res)} | {mib(r['replayed_reserved'])} | {pct(r['replayed_reserved'], res)} "
                 f"| {mib(r['simulated_reserved'])} | {pct(r['simulated_reserved'], res)} "
                 f"| {mib(r['fitted_reserved'])} | {pct(r['fitted_reserved'], res)} |")
open(f"{out}/fsdp2.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "fsdp2 exit code: $?"
fi
timeout "${MEMPLAN_GPU_TIMEOUT:-360}" "$BIN" validate --matrix scripts/gpu-matrix.json \
    --device cuda --steps 3 --quiet --format json > "$OUT/validate.json"
echo "validate exit code: $?"
python3 - "$OUT" "$BIN" <<'PY'
import json, subprocess, sys, tempfile
out, binary = sys.argv[1], sys.argv[2]
try:
    runs = json.load(open(f"{out}/validate.json"))["runs"]
except Exception as e:
    print(f"no results: {e}"); sys.exit(0)
# Reserved: the estimator's fitted figure and its caching-allocator simulation, against the
# caching allocator's own peak on the device (`memplan estimate` on each matrix plan).
plans = {e["label"]: e["plan"] for e in json.load(open("scripts/gpu-matrix.json"))}
def reserved(label):
    plan = plans.get(label.split(" rank ")[0])
    if plan is None:
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(plan, f)
    p = subprocess.run([binary, "estimate", "--plan", f.name, "--format", "json"],
                       capture_output=True, text=True)
    try:
        g = json.loads(p.stdout)["per_gpu"]
        return g["peak_reserved_bytes"], (g.get("simulation") or {}).get("peak_reserved_bytes")
    except Exception:
        return None, None
def pct(x, m):
    return f"{100 * (x - m) / m:+.2f}%" if x and m else "n/a"
lines = ["| plan | predicted peak allocated (MiB) | measured (MiB) | error | measured reserved (MiB) "
         "| simulated, one stream | error | fitted | error | simulated, FSDP2 streams | error |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
mib = lambda x: f"{x / 2**20:.1f}" if x else "n/a"
for r in runs:
    p, m = r["peak"]["predicted_bytes"], r["peak"]["measured_bytes"]
    res = r["report"].get("peak_reserved_bytes") or 0
    err = 100 * (p - m) / m if m else float("nan")
    oom = " (OOM)" if r["report"].get("oom") else ""
    # The trainer runs one stream: validate's own prediction replays the estimator's step so.
    one = (r.get("reserved") or {}).get("predicted_bytes")
    fit, sim = reserved(r["label"])
    lines.append(f"| {r['label']}{oom} | {p/2**20:.1f} | {m/2**20:.1f} | {err:+.2f}% | {res/2**20:.1f} "
                 f"| {mib(one)} | {pct(one, res)} | {mib(fit)} | {pct(fit, res)} | {mib(sim)} | {pct(sim, res)} |")
open(f"{out}/validate.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
