"""Per-call time of ``memplan.estimate`` from Python (timeit, best of 5 repeats).

    python python/bench.py
"""

from __future__ import annotations

import os
import sys
import timeit

# The installed package, not the source folder beside this script.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import memplan  # noqa: E402

PLAN = {
    "model": "llama3-8b",
    "gpu": "rtx-a6000-48g",
    "num_gpus": 2,
    "host_ram": "256GiB",
    "batch": {"micro_batch_size": 4, "seq_len": 2048},
    "activation_checkpointing": "full",
    "offload": "full",
}

CASES = {
    "keywords (model=, gpu=, num_gpus=, ...)": lambda: memplan.estimate(
        model="llama3-8b", gpu="h100-80g", num_gpus=8, micro_batch_size=2, seq_len=8192, ac="selective-op"
    ),
    "plan dict": lambda: memplan.estimate(PLAN),
    "plan dict + override": lambda: memplan.estimate(PLAN, micro_batch_size=8),
    "example=": lambda: memplan.estimate(example="seed-8b-2x48g-offload"),
    "keywords + .peak_reserved + .fits": lambda: (lambda e: (e.peak_reserved, e.fits))(
        memplan.estimate(model="llama3-8b", num_gpus=8, micro_batch_size=2, seq_len=8192)
    ),
}


def main() -> None:
    n = 20000
    for name, fn in CASES.items():
        fn()
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n
        print(f"{best * 1e6:8.2f} us per call  {name}")


if __name__ == "__main__":
    main()
