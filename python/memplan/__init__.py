"""memplan: how much GPU and host memory an LLM training plan needs, and whether it fits.

A Python API over memplan's Rust estimator. Every function takes a plan the way the
``memplan`` command does: a plan dict (the plan-file schema) or the path of a plan JSON as the
first argument, ``example=`` a shipped example, ``torchtitan=`` a torchtitan TOML, ``model=``
a shipped profile name, a Hugging Face ``config.json`` path or a config dict, and keyword
fields named as the CLI's flags (``micro_batch_size=4`` is ``--micro-batch-size 4``), which
override the plan. Errors raise :class:`PlanError` with the CLI's one-line message.

>>> import memplan
>>> est = memplan.estimate(example="seed-8b-2x48g")
>>> est.fits, est.peak_phase
(False, 'optimizer (first step)')
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Mapping, Optional, TextIO, Tuple

from memplan import _memplan
from memplan._errors import DoesNotFit, PlanError
from memplan._memplan import Estimate, estimate
from memplan._module import from_module

__version__: str = _memplan.__version__

__all__ = [
    "Estimate",
    "PlanError",
    "DoesNotFit",
    "SearchResult",
    "MaxBatch",
    "estimate",
    "search",
    "max_batch",
    "profiles",
    "examples",
    "preflight",
    "from_module",
    "__version__",
]

#: The keyword arguments that are plan fields (the flags of ``memplan estimate``).
FIELDS: Tuple[str, ...] = tuple(_memplan._fields())


class _Document:
    """A JSON document of the command, held as parsed."""

    def __init__(self, doc: Dict[str, Any]) -> None:
        self._doc = doc

    @property
    def estimates(self) -> int:
        """Estimates the search made."""
        return int(self._doc["estimates"])

    def to_dict(self) -> Dict[str, Any]:
        """The document, as the command prints it with ``--format json``."""
        import copy

        return copy.deepcopy(self._doc)


class SearchResult(_Document):
    """The plans that fit, best first: the ``memplan search --format json`` document.

    >>> r = memplan.search(model="llama3-8b", gpu="rtx-a6000-48g", num_gpus=2, seq_len=2048)
    >>> r.fits
    True
    """

    def __init__(self, doc: Dict[str, Any], warnings: List[str]) -> None:
        super().__init__(doc)
        #: Settings accepted but probably not meant.
        self.warnings: List[str] = warnings

    @property
    def candidates(self) -> List[Dict[str, Any]]:
        """The best ``top`` candidates, each with its resolved plan and figures."""
        return list(self._doc["candidates"])

    @property
    def best(self) -> Optional[Dict[str, Any]]:
        """The best candidate, or None when nothing fits."""
        c = self._doc["candidates"]
        return c[0] if c else None

    @property
    def feasible(self) -> int:
        """How many candidates fit (before cutting to ``top``)."""
        return int(self._doc["feasible"])

    @property
    def fits(self) -> bool:
        """Whether any plan fits (the CLI exits 0)."""
        return self.feasible > 0

    @property
    def layouts(self) -> int:
        return int(self._doc["layouts"])



    def __repr__(self) -> str:
        best = self.best
        if best is None:
            return f"<memplan.SearchResult: nothing fits ({self.layouts} layouts, {self.estimates} estimates)>"
        p = best["plan"]
        par = p["parallel"]
        return (
            f"<memplan.SearchResult: {self.feasible} plans fit; best: micro-batch "
            f"{p['batch']['micro_batch_size']}, fsdp {par['dp_shard']}, tp {par['tp']}, pp {par['pp']}, "
            f"cp {par['cp']}, ac {p['activation_checkpointing']}, offload {p['offload']}, "
            f"{best['device_total_bytes'] / 2**30:.2f} GiB per GPU>"
        )


class MaxBatch(_Document):
    """The largest micro-batch a plan allows: the ``memplan search --max-batch --format json``
    document.

    >>> m = memplan.max_batch(example="seed-8b-2x48g-offload")
    >>> m.micro_batch_size
    10
    """

    def __init__(self, doc: Dict[str, Any], estimate: Optional[Estimate]) -> None:
        super().__init__(doc)
        #: The estimate at the largest micro-batch, or None when not even 1 fits.
        self.estimate: Optional[Estimate] = estimate

    @property
    def micro_batch_size(self) -> Optional[int]:
        """The largest micro-batch that fits, or None."""
        v = self._doc["micro_batch_size"]
        return None if v is None else int(v)

    @property
    def fits(self) -> bool:
        return self.micro_batch_size is not None



    def __repr__(self) -> str:
        if self.micro_batch_size is None:
            return "<memplan.MaxBatch: no micro-batch fits>"
        return f"<memplan.MaxBatch: micro-batch {self.micro_batch_size} ({self.estimates} estimates)>"


def search(
    plan: Any = None,
    *,
    max_micro_batch: int = 64,
    headroom: float = 0.05,
    rank_by: str = "tokens",
    top: int = 10,
    **fields: Any,
) -> SearchResult:
    """Find the plans that fit, best first (``memplan search``). Parallel degrees, ``ac`` and
    ``offload`` given as fields constrain the search; the model, GPU, world size, sequence,
    precision and optimizer are kept.

    >>> r = memplan.search(model="llama3-8b", gpu="rtx-a6000-48g", num_gpus=2, seq_len=2048,
    ...                    host_ram="256GB")
    >>> r.best["plan"]["offload"]
    'full'
    """
    import json

    text, warnings = _memplan._search(plan, max_micro_batch, headroom, rank_by, top, fields)
    return SearchResult(json.loads(text), warnings)


def max_batch(
    plan: Any = None,
    *,
    max_micro_batch: int = 64,
    headroom: float = 0.05,
    **fields: Any,
) -> MaxBatch:
    """The largest micro-batch that fits the plan as given, by binary search
    (``memplan search --max-batch``).

    >>> memplan.max_batch(example="seed-8b-2x48g-offload").micro_batch_size
    10
    """
    import json

    text, est = _memplan._max_batch(plan, max_micro_batch, headroom, fields)
    return MaxBatch(json.loads(text), est)


def profiles() -> Dict[str, Any]:
    """The shipped model and GPU profiles: the ``memplan profiles --format json`` document.

    >>> [g["name"] for g in memplan.profiles()["gpus"]][:2]
    ['rtx4090-24g', 'rtx-a6000-48g']
    """
    import json

    doc: Dict[str, Any] = json.loads(_memplan._profiles())
    return doc


def examples() -> List[str]:
    """The names of the shipped example plans (``example=NAME``).

    >>> memplan.examples()
    ['seed-8b-2x48g', 'seed-8b-2x48g-offload']
    """
    return list(_memplan._examples())


def _env_int(env: Mapping[str, str], key: str) -> Optional[int]:
    v = env.get(key)
    if v is None or v == "":
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise PlanError(
            f"invalid environment {key}: got {v!r}, expected a positive integer (torchrun sets it)",
            f"environment {key}",
        )
    return n


def preflight(
    plan: Any = None,
    *,
    env: Optional[Mapping[str, str]] = None,
    file: Optional[TextIO] = None,
    quiet: bool = False,
    raise_on_oom: bool = True,
    **fields: Any,
) -> Estimate:
    """Check before a job launches that its plan fits, reading the torchrun environment:
    ``WORLD_SIZE`` is the number of GPUs and ``LOCAL_WORLD_SIZE`` the GPUs per node (unless
    ``num_gpus`` / ``gpus_per_node`` are given), ``MEMPLAN_GPU`` the GPU profile (unless
    ``gpu`` is). Rank 0 (``RANK`` unset or 0) prints the plan and the verdict on ``file``
    (stderr by default); when the plan does not fit, raises :class:`DoesNotFit` (or, with
    ``raise_on_oom=False``, returns the estimate).

    >>> est = memplan.preflight(torchtitan="train.toml", gpu="h100-80g")  # doctest: +SKIP
    memplan: llama3-8b on 8 x h100-80g (fsdp 8), batch 2 x seq 8192, ...
    memplan: fits: 61.4 GiB of 79.6 GiB per GPU, ...
    """
    env = os.environ if env is None else env
    if fields.get("num_gpus") is None:
        n = _env_int(env, "WORLD_SIZE")
        if n is not None:
            fields["num_gpus"] = n
    if fields.get("gpus_per_node") is None:
        n = _env_int(env, "LOCAL_WORLD_SIZE")
        if n is not None:
            fields["gpus_per_node"] = n
    if fields.get("gpu") is None and env.get("MEMPLAN_GPU"):
        fields["gpu"] = env["MEMPLAN_GPU"]
    est = estimate(plan, **fields)
    if not quiet and env.get("RANK", "0") in ("0", ""):
        out = sys.stderr if file is None else file
        for w in est.warnings:
            print(f"memplan: warning: {w}", file=out)
        print(f"memplan: {est.summary}", file=out)
        print(f"memplan: {est.verdict}", file=out)
        out.flush()
    if not est.fits and raise_on_oom:
        raise DoesNotFit(f"the plan does not fit: {est.verdict}", est)
    return est
