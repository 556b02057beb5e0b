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
# Writes $OUT/validate.json (every run's full report) and $OUT/validate.md (the table), and
# prints the table last (a two-step smoke run with --trace comes first): peak allocated
# predicted vs measured, and measured reserved against the caching-allocator simulation of the
# trainer's one stream (validate's own), the estimator's fitted reserved and its simulation with
# FSDP2's three streams (`memplan estimate` on each matrix plan). Took 5 minutes on an H200
# (2026-11-29), the smoke run 30 s of it.
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
# CUDA path shows up on its own, before the matrix (its report and trace come back in $OUT).
# MEMPLAN_GPU_SMOKE=0 skips it.
if [ "${MEMPLAN_GPU_SMOKE:-1}" != 0 ]; then
python3 -c 'import json,sys; json.dump(json.load(open("scripts/gpu-matrix.json"))[0]["plan"], sys.stdout)' \
    > "$OUT/smoke-plan.json"
timeout 120 "$BIN" train --plan "$OUT/smoke-plan.json" --device cuda --steps 2 --quiet \
    --trace "$OUT/smoke-trace.json" > "$OUT/smoke.txt" 2>&1
echo "smoke exit code: $?"; cat "$OUT/smoke.txt"
fi
timeout "${MEMPLAN_GPU_TIMEOUT:-450}" "$BIN" validate --matrix scripts/gpu-matrix.json \
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
