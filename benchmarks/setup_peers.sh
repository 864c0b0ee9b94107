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

# llama.cpp is built for this CPU (GGML_NATIVE) so its kernels use the instructions it has. On CPUs with
# AMX, llama-cpp-python 0.3.36's AMX path repacks the weights and then crashes (segmentation fault) on
# the first decode, for Q4_1 and Q4_K_M files alike: there it is built without AMX (AVX-512 and VNNI
# stay), and the build says so in a marker file that `leap bench` reports. LEAP_LLAMA_AMX=1 keeps AMX.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
flavour="native"
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && [[ "${LEAP_LLAMA_AMX:-0}" != 1 ]]; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
  flavour="native without AMX (its AMX path crashes on this CPU)"
  echo "peers: this CPU has AMX; building llama.cpp without it ($no_amx)"
fi
nice -n "$nice_level" "$python" -m pip install --no-cache-dir --force-reinstall --no-deps \
  "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
"$python" -m pip install "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"  # its dependencies, if missing
"$python" - "$flavour" <<'PY'
import pathlib, sys
import llama_cpp
marker = pathlib.Path(llama_cpp.__file__).with_name("leap_build.txt")
marker.write_text(sys.argv[1] + "\n")
print(f"peers: llama.cpp build: {sys.argv[1]} (recorded in {marker})")
PY

"$python" - <<'PY'
import importlib.metadata as md
for name in ("transformers", "torch", "llama_cpp_python", "matplotlib"):
    try:
        print(f"peers: {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"peers: {name} MISSING")
PY
