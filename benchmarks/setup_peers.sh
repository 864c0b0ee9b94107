#!/usr/bin/env bash
# Install the optional peers that `leap bench --peers ...` compares against.
#
#   hf, hf-pld              transformers (+ torch), already a dependency of leapdecode
#   llamacpp, llamacpp-pld  llama-cpp-python, which compiles llama.cpp from source
#                           (about 15 minutes on a 2-core machine)
#
# Usage: benchmarks/setup_peers.sh [PYTHON]    (default: .venv/bin/python, else python3)
# Set LEAP_BUILD_NICE=19 to build at the lowest CPU priority beside other work.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
nice_level="${LEAP_BUILD_NICE:-0}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

echo "peers: installing into $("$python" -c 'import sys; print(sys.prefix)')"
"$python" -m pip install "transformers>=5" "matplotlib" "tqdm"

# llama.cpp is built for this CPU (GGML_NATIVE) so its kernels use the instructions it has.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
nice -n "$nice_level" "$python" -m pip install --no-cache-dir \
  "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"

"$python" - <<'PY'
import importlib.metadata as md
for name in ("transformers", "torch", "llama_cpp_python", "matplotlib"):
    try:
        print(f"peers: {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"peers: {name} MISSING")
PY
