"""Errors raise one ``memplan.PlanError`` with the CLI's message and field."""

from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest

import memplan
from conftest import cli_json, flags

CASES: List[Dict[str, Any]] = [
    dict(model="llama3-8b", micro_batch_size=-5),
    dict(model="llama3-8b", num_gpus=0),
    dict(model="no-such-model"),
    dict(model="llama3-8b", gpu="no-such-gpu"),
    dict(model="llama3-8b", num_gpus=8, tp=3),
    dict(model="llama3-8b", ac="sometimes"),
    dict(model="llama3-8b", host_ram="512"),
    dict(model="llama3-8b", seq_len=2**40),
    dict(example="nope"),
    dict(gpu="h100-80g"),
    dict(model="llama3-8b", param_dtype="fp8"),
]


@pytest.mark.parametrize("fields", CASES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_errors_carry_the_cli_message_and_field(fields: Dict[str, Any]) -> None:
    rc, doc, err = cli_json("estimate", *flags(fields))
    assert rc == 2 and doc["schema"] == "memplan.error/1"
    with pytest.raises(memplan.PlanError) as info:
        memplan.estimate(**fields)
    e = info.value
    assert isinstance(e, ValueError)
    assert str(e) == doc["error"]["message"]
    assert err == f"error: {e}\n"
    assert e.field == doc["error"]["field"]
    assert e.kind == doc["error"]["kind"] and e.exit_code == 2


def test_plan_dict_errors_read_as_the_files(write_json) -> None:  # type: ignore[no-untyped-def]
    for plan in (
        {"model": "llama3-8b", "batchh": {}},
        {"model": "llama3-8b", "batch": {"micro_batch_size": "4"}},
        {"model": "llama3-8b", "parallel": {"tp": 3}, "num_gpus": 8},
        {"model": "llama3-8b", "host_ram": 5},
    ):
        path = write_json("p.json", plan)
        rc, doc, _ = cli_json("estimate", "--plan", path)
        assert rc == 2
        with pytest.raises(memplan.PlanError) as info:
            memplan.estimate(plan)
        msg = doc["error"]["message"]
        # The CLI names the file; a dict has none.
        assert str(info.value) == msg.replace(f"plan {path}:", "plan:")
        assert info.value.field == doc["error"]["field"]


def test_search_errors_name_the_cli_flags() -> None:
    rc, doc, _ = cli_json("search", "--model", "llama3-8b", "--headroom", "0.9")
    with pytest.raises(memplan.PlanError) as info:
        memplan.search(model="llama3-8b", headroom=0.9)
    assert str(info.value) == doc["error"]["message"] and info.value.field == "--headroom"
    with pytest.raises(memplan.PlanError, match="--max-micro-batch"):
        memplan.max_batch(model="llama3-8b", max_micro_batch=0)


def test_python_argument_errors_are_plan_errors() -> None:
    with pytest.raises(memplan.PlanError) as info:
        memplan.estimate(model="llama3-8b", micro_batch_size="4")
    assert info.value.field == "micro_batch_size"
    with pytest.raises(memplan.PlanError, match="a plan keyword"):
        memplan.estimate(model="llama3-8b", micro_batch=4)
    with pytest.raises(memplan.PlanError, match="cannot be given together"):
        memplan.estimate({"model": "llama3-8b"}, example="seed-8b-2x48g")
    with pytest.raises(memplan.PlanError, match="finite"):
        memplan.estimate({"model": "llama3-8b", "moe_capacity_factor": float("nan")})
    with pytest.raises(memplan.PlanError):
        memplan.estimate({"model": "llama3-8b", "gpu": object()})
    with pytest.raises(memplan.PlanError, match="cannot read"):
        memplan.estimate("/no/such/plan.json")


def test_plan_error_pickles() -> None:
    import pickle

    e = memplan.PlanError("invalid x: got 1, expected 2", "x", "input")
    f = pickle.loads(pickle.dumps(e))
    assert (str(f), f.field, f.kind) == (str(e), "x", "input")
    assert json.dumps({"m": str(f)})
