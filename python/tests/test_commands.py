"""The ``memplan`` console script is the CLI; ``python -m memplan check`` is the pre-flight."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Dict, Optional, Tuple

import pytest

import memplan
from conftest import run_cli


def check(*args: str, env: Optional[Dict[str, str]] = None) -> Tuple[int, str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "MEMPLAN_GPU")}
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "memplan", "check", *args], capture_output=True, text=True, env=e)
    return p.returncode, p.stdout, p.stderr


def test_console_script_exit_codes_are_the_clis() -> None:
    rc, out, err = run_cli("estimate", "--example", "seed-8b-2x48g-offload")
    assert rc == 0 and "per GPU at peak" in out and err == ""
    rc, out, _ = run_cli("estimate", "--example", "seed-8b-2x48g")
    assert rc == 1 and "OUT OF MEMORY" in out
    rc, out, err = run_cli("estimate", "--model", "llama3-8b", "--micro-batch-size", "-5")
    assert rc == 2 and out == ""
    assert err == ("error: invalid --micro-batch-size (plan field batch.micro_batch_size): got -5, "
                   "expected an integer from 1 to 16777216\n")
    rc, out, err = run_cli("estimate", "--no-such-flag", "--format", "json")
    assert rc == 2 and json.loads(out)["schema"] == "memplan.error/1" and err.startswith("error: ")
    rc, out, _ = run_cli("--version")
    assert rc == 0 and out.strip() == f"memplan {memplan.__version__}"
    rc, out, _ = run_cli()
    assert rc == 2 and "Usage" in out


def test_console_script_output_equals_the_rust_binary() -> None:
    exe = os.environ.get("MEMPLAN_RUST_BIN", "")
    if not os.path.exists(exe):
        pytest.skip("set MEMPLAN_RUST_BIN to a memplan binary built from the same tree to compare")
    for args in (["estimate", "--example", "seed-8b-2x48g"], ["profiles"], ["compare", "example:seed-8b-2x48g",
                                                                             "example:seed-8b-2x48g-offload"]):
        ours = run_cli(*args)
        theirs = subprocess.run([exe, *args], capture_output=True, text=True)
        assert ours == (theirs.returncode, theirs.stdout, theirs.stderr)


def test_closed_pipe_is_not_an_error() -> None:
    p = subprocess.run(f"'{sys.executable}' -m memplan profiles | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}",
                       shell=True, capture_output=True, text=True, executable="/bin/bash")
    assert p.stdout.strip() == "0", p.stderr


def test_python_m_memplan_runs_the_cli() -> None:
    p = subprocess.run([sys.executable, "-m", "memplan", "estimate", "--example", "seed-8b-2x48g", "--format", "json"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and json.loads(p.stdout) == memplan.estimate(example="seed-8b-2x48g").to_dict()


def test_check_reads_the_torchrun_environment() -> None:
    env = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MEMPLAN_GPU": "h100-80g"}
    rc, out, err = check("--model", "llama3-8b", "--micro-batch-size", "1", "--seq-len", "8192", "--ac", "full", env=env)
    assert rc == 0, err
    assert "llama3-8b on 16 x h100-80g (fsdp 16)" in err and "fits" in err and out == ""
    rc, out, err = check("--model", "llama3-8b", "--num-gpus", "2", "--gpu", "rtx-a6000-48g",
                         "--format", "json", env=env)
    assert rc == 1 and json.loads(out)["fits"] is False and json.loads(out)["plan"]["gpus_per_node"] == 8


def test_check_exit_codes_and_ranks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    toml = tmp_path / "train.toml"
    toml.write_text('[model]\nname = "llama3"\nflavor = "8B"\n[training]\nlocal_batch_size = 2\nseq_len = 8192\n')
    rc, _, err = check("--torchtitan", str(toml), env={"WORLD_SIZE": "2", "MEMPLAN_GPU": "rtx-a6000-48g"})
    assert rc == 1 and "OUT OF MEMORY" in err
    rc, _, err = check("--torchtitan", str(toml), env={"WORLD_SIZE": "2", "RANK": "1", "MEMPLAN_GPU": "rtx-a6000-48g"})
    assert rc == 1 and err == ""
    rc, _, err = check("--torchtitan", str(toml), "--gpu", "h200-141g", env={"WORLD_SIZE": "8"})
    assert rc == 0 and "fits" in err
    rc, _, err = check("--model", "llama3-8b", "--tp", "3", env={"WORLD_SIZE": "8"})
    assert rc == 2 and err.startswith("error: invalid --num-gpus")
    rc, _, err = check("--model", "llama3-8b", env={"WORLD_SIZE": "eight"})
    assert rc == 2 and "WORLD_SIZE" in err
    rc, out, _ = check("--model", "nope", "--format", "json")
    assert rc == 2 and json.loads(out)["error"]["field"] == "--model"


def test_preflight_raises_when_the_plan_does_not_fit() -> None:
    buf = io.StringIO()
    with pytest.raises(memplan.DoesNotFit) as info:
        memplan.preflight(example="seed-8b-2x48g", env={}, file=buf)
    assert not info.value.estimate.fits and "OUT OF MEMORY" in buf.getvalue()
    est = memplan.preflight(example="seed-8b-2x48g", env={"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, quiet=True)
    assert est.fits and est.plan["num_gpus"] == 8
    est = memplan.preflight(example="seed-8b-2x48g", env={}, raise_on_oom=False, quiet=True)
    assert not est.fits


def test_from_module_reads_a_meta_model() -> None:
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
            super().__init__()
            self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
            hd = dim // n_heads
            self.wq = nn.Linear(dim, n_heads * hd, bias=False)
            self.wk = nn.Linear(dim, n_kv_heads * hd, bias=False)
            self.wv = nn.Linear(dim, n_kv_heads * hd, bias=False)
            self.wo = nn.Linear(n_heads * hd, dim, bias=False)

    class Block(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.attention = Attention(dim, 8, 2)
            self.feed_forward = nn.Module()
            self.feed_forward.w1 = nn.Linear(dim, 4 * dim, bias=False)
            self.feed_forward.w2 = nn.Linear(4 * dim, dim, bias=False)
            self.feed_forward.w3 = nn.Linear(dim, 4 * dim, bias=False)
            self.attention_norm = nn.RMSNorm(dim)
            self.ffn_norm = nn.RMSNorm(dim)

    class Transformer(nn.Module):
        def __init__(self, dim: int = 512, layers: int = 4, vocab: int = 1000) -> None:
            super().__init__()
            self.tok_embeddings = nn.Embedding(vocab, dim)
            self.layers = nn.ModuleDict({str(i): Block(dim) for i in range(layers)})
            self.norm = nn.RMSNorm(dim)
            self.output = nn.Linear(dim, vocab, bias=False)

    with torch.device("meta"):
        m = Transformer()
    cfg = memplan.from_module(m, max_position_embeddings=4096)
    assert cfg["num_hidden_layers"] == 4 and cfg["num_key_value_heads"] == 2
    est = memplan.estimate(model=cfg, gpu="cpu", num_gpus=2, seq_len=128)
    assert est.param_count == sum(p.numel() for p in m.parameters())
