#!/usr/bin/env bash
# Builds memplan's Python wheel and tests it from nothing (needs only python3 >= 3.9 and
# cargo): a venv in .venv-py with maturin, pytest and mypy; the wheel built in release mode
# into python/dist (the crate in python/ has its own Cargo.lock and target/); the wheel, not
# an editable install, installed into that venv; then pytest (the API against the installed
# `memplan` command's JSON, errors, the pre-flight, the console script) and mypy --strict on
# the package and on an example that uses it. Prints the wheel's size.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv="$root/.venv-py"
start=$SECONDS

cargo fmt --manifest-path python/Cargo.toml --check

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "maturin>=1.5,<2" pytest mypy

rm -rf python/dist
"$venv/bin/maturin" build --release --locked -m python/Cargo.toml -o python/dist
wheel=$(ls python/dist/memplan-*.whl)

# A clean install of the wheel: whatever an earlier run installed goes first.
"$venv/bin/python" -m pip uninstall --quiet --yes memplan >/dev/null 2>&1 || true
"$venv/bin/python" -m pip install --quiet --no-deps "$wheel"

# Run from outside python/ so that the installed package is the one imported.
cd "$(mktemp -d)"
status=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$root/python/tests" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
elif [ "$status" -ne 0 ]; then
  exit "$status"
fi
"$venv/bin/python" -m mypy --strict --no-incremental "$root/python/tests/typing_example.py"
if "$venv/bin/python" -m mypy --strict --no-incremental "$root/python/tests/typing_bad.py" >/dev/null; then
  echo "mypy accepted python/tests/typing_bad.py: the type stub is not in effect" >&2
  exit 1
fi
(cd "$root/python" && "$venv/bin/python" -m mypy --strict --no-incremental memplan)

size=$(wc -c <"$root/$wheel")
echo "wheel: $wheel, $((size / 1024)) KiB; total $((SECONDS - start)) s"
