"""Shared fixtures: the installed ``memplan`` command, run as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import pytest

BIN = os.path.dirname(sys.executable)


def memplan_command() -> str:
    exe = os.path.join(BIN, "memplan")
    if os.path.exists(exe):
        return exe
    found = shutil.which("memplan")
    assert found, "the memplan console script is not installed"
    return found


def run_cli(*args: str, env: Optional[Dict[str, str]] = None) -> Tuple[int, str, str]:
    p = subprocess.run([memplan_command(), *args], capture_output=True, text=True, env=env)
    return p.returncode, p.stdout, p.stderr


def cli_json(*args: str) -> Tuple[int, Dict[str, Any], str]:
    """Runs ``memplan ARGS --format json``: exit code, the one JSON document, stderr."""
    rc, out, err = run_cli(*args, "--format", "json")
    return rc, json.loads(out), err


@pytest.fixture
def write_json(tmp_path):  # type: ignore[no-untyped-def]
    def write(name: str, doc: Any) -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
        return str(path)

    return write


def flags(fields: Dict[str, Any]) -> List[str]:
    """Keyword fields as the CLI's flags."""
    out: List[str] = []
    for k, v in fields.items():
        flag = "--" + k.replace("_", "-")
        if v is True and k in ("ignore_max_position", "float8", "compile", "no_reshard_after_forward"):
            out.append(flag)
        else:
            out += [flag, str(v).lower() if isinstance(v, bool) else str(v)]
    return out
