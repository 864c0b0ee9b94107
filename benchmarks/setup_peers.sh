#!/usr/bin/env bash
# Install the optional peers that `leap bench --peers ...` compares against.
#
#   hf, hf-pld              transformers (+ torch), already a dependency of leapdecode
#   llamacpp, llamacpp-pld  llama-cpp-python, which compiles llama.cpp from source
#                           (about 15 minutes on a 2-core machine)
#
#   --speculative           only llama.cpp's own tools (llama-speculative-simple, llama-completion,
#                           llama-server) from the same llama.cpp source, for
#                           benchmarks/llamacpp_speculative.py and serve_bench.py --llamacpp-server
#
# Usage: benchmarks/setup_peers.sh [--speculative] [PYTHON]    (default: .venv/bin/python, else python3)
# Set LEAP_BUILD_NICE=19 to build at the lowest CPU priority beside other work.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
speculative=0
if [[ "${1:-}" == --speculative ]]; then speculative=1; shift; fi
python="${1:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
nice_level="${LEAP_BUILD_NICE:-0}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

# llama.cpp is built for this CPU (GGML_NATIVE) so its kernels use the instructions it has. On CPUs with
# AMX, llama-cpp-python 0.3.36's AMX path repacks the weights and then crashes (segmentation fault) on
# the first decode, for Q4_1 and Q4_K_M files alike: there it is built without AMX (AVX-512 and VNNI
# stay), and the build says so in a marker file that `leap bench` reports. LEAP_LLAMA_AMX=1 keeps AMX.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
flavour="native"
no_amx=""
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && [[ "${LEAP_LLAMA_AMX:-0}" != 1 ]]; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
  flavour="native without AMX (its AMX path crashes on this CPU)"
  echo "peers: this CPU has AMX; building llama.cpp without it ($no_amx)"
fi

# --speculative: llama.cpp's own command-line tools, built from the llama.cpp that the
# llama-cpp-python sdist vendors (the same source as the `llamacpp` peer), with the same flags, into
# $LEAPDECODE_CACHE/peers (default ~/.cache/leapdecode/peers). A finished build is kept and reused.
build_llamacpp_tools() {
  local cache="${LEAPDECODE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/leapdecode}/peers"
  local src="$cache/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
  local build="$src/build-tools"
  local stamp="$build/leap_build.txt"
  local targets=(llama-speculative-simple llama-completion llama-server)
  if [[ -f "$stamp" && "$(head -n1 "$stamp")" == "$flavour" ]] && all_built "$build/bin" "${targets[@]}"; then
    echo "peers: llama.cpp tools already built ($flavour): $build/bin (${targets[*]})"
    return
  fi
  mkdir -p "$cache"
  if [[ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]]; then
    "$python" -m pip download --no-binary :all: --no-deps -d "$cache" \
      "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
    tar -xzf "$cache/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}.tar.gz" -C "$cache"
    mv "$cache/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}" "$src"
  fi
  nice -n "$nice_level" cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF
  nice -n "$nice_level" cmake --build "$build" --config Release --target "${targets[@]}"
  printf '%s\nllama-cpp-python %s, Release, GGML_NATIVE=ON, C/C++ flags "%s"\n' \
    "$flavour" "$LLAMA_CPP_PYTHON_VERSION" "$no_amx" > "$stamp"
  echo "peers: llama.cpp tools ($flavour): $build/bin (${targets[*]})"
}

all_built() {
  local dir="$1"; shift
  for name in "$@"; do [[ -x "$dir/$name" ]] || return 1; done
}

if [[ "$speculative" == 1 ]]; then
  build_llamacpp_tools
  exit 0
fi

echo "peers: installing into $("$python" -c 'import sys; print(sys.prefix)')"
"$python" -m pip install "transformers>=5" "matplotlib" "tqdm"
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
