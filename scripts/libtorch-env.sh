# Sets up libtorch 2.11.0 (what tch 0.24.0 expects) for `cargo ... --features trainer`.
#
# Source it, from any directory:   source scripts/libtorch-env.sh
# It creates .venv at the repository root with `pip install torch==2.11.0` unless torch 2.11.0
# is already importable there (idempotent; a fresh CI machine needs only python3 with venv),
# then exports LIBTORCH_USE_PYTORCH=1 (torch-sys finds libtorch through that Python), PATH
# (so `python3` is the venv's) and LD_LIBRARY_PATH (libtorch's lib folder; the binaries also
# carry an rpath to it).
#
# MEMPLAN_TORCH_INDEX_URL, if set, is passed to pip as --index-url, e.g.
# https://download.pytorch.org/whl/cpu for the much smaller CPU-only wheel on CI.

_mp_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
_mp_venv="$_mp_root/.venv"
_mp_has_torch() {
    "$_mp_venv/bin/python" -c 'import sys, torch
sys.exit(0 if torch.__version__.split("+")[0] == "2.11.0" else 1)' >/dev/null 2>&1
}

if ! _mp_has_torch; then
    echo "libtorch-env: installing torch 2.11.0 into $_mp_venv" >&2
    if [ ! -x "$_mp_venv/bin/pip" ]; then
        python3 -m venv "$_mp_venv" || { echo "libtorch-env: python3 -m venv failed" >&2; return 1 2>/dev/null || exit 1; }
    fi
    "$_mp_venv/bin/pip" install --quiet --upgrade pip >/dev/null 2>&1 || true
    if [ -n "${MEMPLAN_TORCH_INDEX_URL:-}" ]; then
        "$_mp_venv/bin/pip" install --quiet --no-cache-dir --index-url "$MEMPLAN_TORCH_INDEX_URL" torch==2.11.0
    else
        "$_mp_venv/bin/pip" install --quiet --no-cache-dir torch==2.11.0
    fi || { echo "libtorch-env: pip install torch==2.11.0 failed" >&2; return 1 2>/dev/null || exit 1; }
    _mp_has_torch || { echo "libtorch-env: torch 2.11.0 still not importable from $_mp_venv" >&2; return 1 2>/dev/null || exit 1; }
fi

# The CUDA wheel of torch: the headers that NCCL process groups need to compile (csrc/dist.cpp),
# CUDA's host runtime (crt/) and CCCL (nv/target), at torch's CUDA version; a few MB.
_mp_cuda="$("$_mp_venv/bin/python" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)"
if [ -n "$_mp_cuda" ] && ! "$_mp_venv/bin/python" - "$_mp_cuda" >/dev/null 2>&1 <<'PY'
import os, sys
import nvidia
include = os.path.join(list(nvidia.__path__)[0], "cu" + sys.argv[1].split(".")[0], "include")
sys.exit(0 if all(os.path.exists(os.path.join(include, h)) for h in ("crt/host_config.h", "nv/target")) else 1)
PY
then
    "$_mp_venv/bin/pip" install --quiet --no-cache-dir "nvidia-cuda-crt==${_mp_cuda}.*" "nvidia-cuda-cccl==${_mp_cuda}.*" \
        || echo "libtorch-env: CUDA headers for NCCL not installed; building without NCCL" >&2
fi

_mp_lib="$("$_mp_venv/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)"
export LIBTORCH_USE_PYTORCH=1
case ":$PATH:" in
    *":$_mp_venv/bin:"*) ;;
    *) export PATH="$_mp_venv/bin:$PATH" ;;
esac
case ":${LD_LIBRARY_PATH:-}:" in
    *":$_mp_lib:"*) ;;
    *) export LD_LIBRARY_PATH="$_mp_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac
unset -f _mp_has_torch
unset _mp_root _mp_venv _mp_lib _mp_cuda
