"""``python -m memplan``: the ``memplan`` command, plus ``check``, a pre-flight for launch
scripts.

``python -m memplan check [--torchtitan TOML | --plan JSON | --model CFG ...] [plan flags]``
reads the torchrun environment (``WORLD_SIZE`` GPUs, ``LOCAL_WORLD_SIZE`` per node,
``MEMPLAN_GPU``), prints the plan and the verdict (rank 0 only) and exits 0 when the plan fits,
1 when it does not, 2 on bad input::

    python -m memplan check --torchtitan train.toml --gpu h100-80g && \\
        torchrun --nproc-per-node 8 -m torchtitan.train --job.config_file train.toml

Any other arguments run the ``memplan`` command itself (``python -m memplan estimate ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

_INT = {
    "num_gpus", "gpus_per_node", "dp_shard", "dp_replicate", "tp", "pp", "cp", "ep", "etp",
    "pp_virtual_stages", "micro_batch_size", "seq_len", "grad_accum_steps",
}
_FLAG = {"ignore_max_position", "float8", "compile", "no_reshard_after_forward"}
_BOOL_VALUE = {"sp"}


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    from memplan import FIELDS

    p = argparse.ArgumentParser(
        prog="python -m memplan check",
        description="Pre-flight: does this job's plan fit? Reads WORLD_SIZE, LOCAL_WORLD_SIZE "
        "and MEMPLAN_GPU from the environment (torchrun sets the first two). Exit 0 fits, "
        "1 does not fit, 2 bad input.",
    )
    for f in FIELDS:
        flag = "--" + f.replace("_", "-")
        if f in _INT:
            p.add_argument(flag, dest=f, type=int, metavar="N")
        elif f in _FLAG:
            p.add_argument(flag, dest=f, action="store_true", default=None)
        elif f in _BOOL_VALUE:
            p.add_argument(flag, dest=f, type=_bool, metavar="BOOL")
        else:
            p.add_argument(flag, dest=f, metavar=f.upper())
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text: the verdict on stderr (default); json: the estimate document on stdout")
    p.add_argument("--quiet", action="store_true", help="print nothing; the exit code says it")
    return p


def check(argv: List[str]) -> int:
    """Runs ``check`` over ``argv`` (without the program name) and returns the exit code."""
    import memplan

    args = _parser().parse_args(argv)
    fields: Dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("format", "quiet") and v is not None}
    plan: Optional[str] = fields.pop("plan", None)
    try:
        est = memplan.preflight(plan, quiet=args.quiet or args.format == "json", raise_on_oom=False, **fields)
    except memplan.PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        if args.format == "json":
            doc = {"schema": "memplan.error/1",
                   "error": {"kind": e.kind, "field": e.field, "message": str(e)},
                   "exit_code": e.exit_code}
            print(json.dumps(doc, indent=2))
        return e.exit_code
    if args.format == "json":
        print(json.dumps(est.to_dict(), indent=2))
    return 0 if est.fits else 1


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        sys.exit(check(args[1:]))
    from memplan._cli import main as cli

    cli(["memplan", *args])


if __name__ == "__main__":
    main()
