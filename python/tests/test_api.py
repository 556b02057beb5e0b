"""The Python API gives the CLI's answers: each test runs the installed ``memplan`` command
with ``--format json`` on the same plan and compares the documents."""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import pytest

import memplan
from conftest import cli_json, flags

HF_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
}

TOML = """[model]
name = "llama3"
flavor = "8B"
[training]
local_batch_size = 2
seq_len = 4096
[parallelism]
data_parallel_shard_degree = -1
"""

KEYWORD_CASES = [
    dict(example="seed-8b-2x48g"),
    dict(example="seed-8b-2x48g-offload"),
    dict(example="seed-8b-2x48g-offload", micro_batch_size=8, seq_len=4096),
    dict(model="llama3-8b", gpu="h100-80g", num_gpus=8, micro_batch_size=2, seq_len=8192, ac="selective-op"),
    dict(model="llama3-70b", gpu="h100-80g", num_gpus=64, tp=8, micro_batch_size=1, seq_len=8192, ac="full"),
    dict(model="llama3-8b", gpu="h100-80g", num_gpus=16, pp=2, pp_schedule="interleaved-1f1b", pp_virtual_stages=2,
         micro_batch_size=1, seq_len=4096, float8=True, compile=True),
    dict(model="mixtral-8x7b", gpu="h100-80g", num_gpus=16, ep=8, micro_batch_size=1, seq_len=4096, ac="full"),
    dict(model="llama3-8b", gpu="rtx-a6000-48g", num_gpus=2, tp=1, sp=True, param_dtype="fp32",
         reduce_dtype="bf16", no_reshard_after_forward=True, host_ram="64GB", offload="optimizer"),
    dict(model="tiny", gpu="cpu", num_gpus=2, seq_len=128, attention="math", rmsnorm="fused", gqa="native",
         logits="float-output-kept", optimizer_impl="fused", optimizer="sgd-momentum"),
    dict(model="llama3-8b", gpu="h100-80g", num_gpus=8, preset="torchtitan-0.2", micro_batch_size=2, seq_len=8192,
         ac="full", fsdp_units="split-always", rotary="complex"),
    dict(model="llama3-8b", gpu="rtx4090-24g", num_gpus=2, preset="plain-pytorch", micro_batch_size=1, seq_len=2048,
         ac="full", offload="full"),
]


def same(est: memplan.Estimate, rc: int, doc: Dict[str, Any]) -> None:
    assert est.to_dict() == doc
    assert rc == (0 if est.fits else 1)
    g = doc["per_gpu"]
    assert est.peak_allocated == g["peak_allocated_bytes"]
    assert est.peak_reserved == g["peak_reserved_bytes"]
    assert est.device_total == g["device_total_bytes"]
    assert est.breakdown == g["breakdown"]
    assert est.peak_phase == g["peak_phase"]
    assert (est.fits, est.fits_gpu, est.fits_host) == (doc["fits"], doc["fits_gpu"], doc["fits_host"])
    assert est.host_per_node == doc["host"]["per_node_bytes"]
    assert est.param_count == doc["param_count"]
    assert est.warnings == doc["warnings"]
    assert est.plan == doc["plan"]


@pytest.mark.parametrize("fields", KEYWORD_CASES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_keywords_estimate_as_the_cli_flags_do(fields: Dict[str, Any]) -> None:
    rc, doc, _ = cli_json("estimate", *flags(fields))
    same(memplan.estimate(**fields), rc, doc)


def test_a_plan_dict_estimates_as_the_same_plan_file(write_json) -> None:  # type: ignore[no-untyped-def]
    plan = json.load(open(os.path.join(os.path.dirname(__file__), "seed_offload.json")))
    path = write_json("plan.json", plan)
    rc, doc, _ = cli_json("estimate", "--plan", path)
    same(memplan.estimate(plan), rc, doc)
    same(memplan.estimate(path), rc, doc)
    rc, doc, _ = cli_json("estimate", "--plan", path, "--micro-batch-size", "9", "--num-gpus", "4", "--ac", "none")
    same(memplan.estimate(plan, micro_batch_size=9, num_gpus=4, ac="none"), rc, doc)
    same(memplan.estimate(plan=path, micro_batch_size=9, num_gpus=4, ac="none"), rc, doc)


def test_host_ram_as_an_integer_is_a_plan_files_integer(write_json) -> None:  # type: ignore[no-untyped-def]
    plan = {"model": "llama3-8b", "gpu": "rtx-a6000-48g", "num_gpus": 2, "offload": "full", "host_ram": 100 * 2**30}
    rc, doc, _ = cli_json("estimate", "--plan", write_json("p.json", plan))
    same(memplan.estimate(model="llama3-8b", gpu="rtx-a6000-48g", num_gpus=2, offload="full", host_ram=100 * 2**30),
         rc, doc)


def test_hf_config_dict_and_path_estimate_as_the_cli_config_path(write_json) -> None:  # type: ignore[no-untyped-def]
    path = write_json("my-1b/config.json", HF_CONFIG)
    args = dict(gpu="a100-40g", num_gpus=4, micro_batch_size=4, seq_len=4096)
    rc, doc, _ = cli_json("estimate", "--model", path, *flags(args))
    same(memplan.estimate(model=path, **args), rc, doc)
    same(memplan.estimate(model={**HF_CONFIG, "_name_or_path": "org/my-1b"}, **args), rc, doc)
    assert doc["plan"]["model"]["name"] == "my-1b"


def test_torchtitan_toml_estimates_as_the_cli(tmp_path) -> None:  # type: ignore[no-untyped-def]
    toml = tmp_path / "train.toml"
    toml.write_text(TOML + '[activation_checkpoint]\nmode = "full"\n[optimizer]\nnme = "AdamW"\n')
    rc, doc, err = cli_json("estimate", "--torchtitan", str(toml), "--num-gpus", "8", "--gpu", "h100-80g")
    est = memplan.estimate(torchtitan=toml, num_gpus=8, gpu="h100-80g")
    same(est, rc, doc)
    assert est.warnings and "optimizer.nme" in est.warnings[0]


def test_search_and_max_batch_give_the_cli_documents() -> None:
    args = dict(model="llama3-8b", gpu="rtx-a6000-48g", num_gpus=2, seq_len=2048, host_ram="256GB")
    rc, doc, _ = cli_json("search", *flags(args), "--top", "5")
    r = memplan.search(top=5, **args)
    assert r.to_dict() == doc and rc == 0 and r.fits
    assert r.best is not None and r.best["plan"]["offload"] == "full"
    rc, doc, _ = cli_json("search", *flags(args), "--offload", "none")
    r = memplan.search(offload="none", **args)
    assert r.to_dict() == doc and rc == 1 and not r.fits and r.best is None
    rc, doc, _ = cli_json("search", "--max-batch", "--example", "seed-8b-2x48g-offload", "--headroom", "0.1")
    m = memplan.max_batch(example="seed-8b-2x48g-offload", headroom=0.1)
    assert m.to_dict() == doc and rc == 0
    assert m.estimate is not None and m.estimate.to_dict() == {"schema": "memplan.estimate/1", **doc["estimate"]}
    rc, doc, _ = cli_json("search", "--max-batch", "--example", "seed-8b-2x48g")
    m = memplan.max_batch(example="seed-8b-2x48g")
    assert m.to_dict() == doc and rc == 1 and m.micro_batch_size is None and m.estimate is None


def test_search_from_a_plan_dict_equals_the_cli_on_the_file(write_json) -> None:  # type: ignore[no-untyped-def]
    plan = {"model": "llama3-8b", "gpu": "h100-80g", "num_gpus": 8, "batch": {"seq_len": 8192}}
    path = write_json("p.json", plan)
    rc, doc, _ = cli_json("search", "--plan", path, "--tp", "2", "--rank-by", "time")
    assert memplan.search(plan, tp=2, rank_by="time").to_dict() == doc


def test_profiles_are_the_cli_document() -> None:
    rc, doc, _ = cli_json("profiles")
    assert memplan.profiles() == doc and rc == 0
    assert memplan.examples() == ["seed-8b-2x48g", "seed-8b-2x48g-offload"]


def test_repr_str_and_render() -> None:
    est = memplan.estimate(example="seed-8b-2x48g")
    r = repr(est)
    assert r.startswith("<memplan.Estimate llama3-8b on 2 x rtx-a6000-48g")
    assert "OUT OF MEMORY (GPU)" in r and "optimizer (first step)" in r and "optimizer states 29.92" in r
    assert "per GPU at peak" in str(est)
    assert json.loads(est.render("json")) == est.to_dict()
    assert est == memplan.estimate(example="seed-8b-2x48g")
    assert est != memplan.estimate(example="seed-8b-2x48g-offload")
    assert "OUT OF MEMORY" in est.verdict and "llama3-8b" in est.summary


def test_estimate_is_safe_from_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        peaks = set(pool.map(lambda b: memplan.estimate(example="seed-8b-2x48g-offload", micro_batch_size=b).peak_allocated,
                             [4] * 64))
    assert len(peaks) == 1
