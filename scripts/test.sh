#!/usr/bin/env bash
# Runs every test of memplan from nothing: the estimator's unit, integration, CLI, property and
# fuzz tests and doctests; the Python wheel's (scripts/test-python.sh: build, clean install,
# pytest, mypy); then, when the trainer is in the tree, sets up libtorch 2.11.0 in .venv
# (idempotent; about 4.6 GB on first run) and runs the trainer's tests against real libtorch on
# the CPU, single-process and multi-process (2- and 4-rank jobs over loopback Gloo).
set -euo pipefail
cd "$(dirname "$0")/.."

# The free disk first: the libtorch venv alone needs about 5 GB while pip installs it.
echo "test.sh: free disk where the repository is: $(df -h . | awk 'NR==2 {print $4}')" >&2

cargo test --locked

# The timeline's HTML page in headless Chromium (tests/timeline.rs): install it when missing
# (Debian's package; about 20 s with apt-get update).
if ! command -v chromium >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
MEMPLAN_REQUIRE_CHROMIUM=1 cargo test --locked --test timeline

# The Python wheel: build it, install it into a clean venv, pytest and mypy; its answers are
# also compared with the binary the tests above built.
MEMPLAN_RUST_BIN="$PWD/target/debug/memplan" scripts/test-python.sh

if [ -d src/trainer ] && [ -f scripts/libtorch-env.sh ]; then
  # shellcheck source=scripts/libtorch-env.sh
  source scripts/libtorch-env.sh
  cargo test --locked --features trainer --test trainer --test validate -- --test-threads=1 --nocapture
  # The memory_viz snapshot opened by torch's own tools, now that the venv has torch.
  MEMPLAN_REQUIRE_TORCH=1 cargo test --locked --test memory_viz
  # Multi-process runs over loopback Gloo: each test starts its own ranks.
  cargo test --locked --features trainer --test distributed
  # Pipeline parallelism across processes against torch's own pipelining, per stage.
  cargo test --locked --features trainer --test pipeline
  # Tensor parallelism (TP, SP, loss parallelism) across processes against torch's DTensor, per rank.
  cargo test --locked --features trainer --test tensor_parallel
  # torchtitan 0.2.2's MoE (router, grouped-mm experts, load balancing) against its own run.
  cargo test --locked --features trainer --test expert_parallel
  # Context parallelism (ring attention, FSDP over dp_shard x cp) across processes against torch's
  # own context_parallel, per rank.
  cargo test --locked --features trainer --test context_parallel
  # Recorded measurements of PyTorch's own implementations, run again live (tests/references.rs).
  cargo test --locked --features trainer --test references -- --test-threads=1
fi
