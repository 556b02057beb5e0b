"""Checked by mypy --strict against the installed stub (scripts/test-python.sh)."""

from __future__ import annotations

from typing import Dict, List, Optional

import memplan


def peak_gib(model: str, batch: int) -> float:
    est: memplan.Estimate = memplan.estimate(model=model, gpu="h100-80g", num_gpus=8, micro_batch_size=batch)
    breakdown: Dict[str, int] = est.breakdown
    assert sum(breakdown.values()) >= 0
    return est.peak_reserved / 2**30


def largest_batch() -> Optional[int]:
    m: memplan.MaxBatch = memplan.max_batch(example="seed-8b-2x48g-offload", headroom=0.1)
    return m.micro_batch_size


def warnings_of(plan: Dict[str, object]) -> List[str]:
    try:
        return memplan.estimate(plan, seq_len=4096).warnings
    except memplan.PlanError as e:
        field: Optional[str] = e.field
        return [str(e), field or ""]


def best_offload() -> str:
    r = memplan.search(model="llama3-8b", gpu="rtx-a6000-48g", num_gpus=2, seq_len=2048)
    best = r.best
    return "none fits" if best is None else str(best["plan"]["offload"])


if __name__ == "__main__":
    print(peak_gib("llama3-8b", 2), largest_batch(), warnings_of({"model": "llama3-8b"}), best_offload())
    print(memplan.profiles()["schema"], memplan.preflight(example="seed-8b-2x48g-offload", quiet=True).fits)
