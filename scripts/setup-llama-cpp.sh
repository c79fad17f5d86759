#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (CPU, Release, native flags) from the llama.cpp sources vendored in the
# llama-cpp-python sdist on PyPI (the one source of llama.cpp reachable through a package registry), and installs
# it with llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their `conversion` package
# and the bundled gguf-py) into a cache dir OUTSIDE the clone: ~/.cache/oppu/llama-cpp-<version>-<key>, where the
# key hashes `uname -m` and the CPU's flags (the build is -march=native, so another CPU must rebuild). The
# converters run with the project's .venv python (torch, transformers, safetensors, numpy; PYTHON must be that
# python) and PYTHONPATH set to the cache dir's gguf-py and pydeps/ (bench/llamacpp.py does that): pydeps/ holds
# what they need beyond the project's dependencies (sentencepiece: convert_hf_to_gguf.py imports it before it
# looks for a tokenizer.model, even for a BPE tokenizer), never installed into the project's venv. Idempotent: a cache dir with its .installed stamp is
# reused as is; one without (an interrupted build) is rebuilt. Prints the cache dir on stdout (last line).
#
# usage: scripts/setup-llama-cpp.sh [--check] [CACHE_ROOT]    (env: LLAMA_CPP_PYTHON_VERSION, PYTHON, JOBS)
#   --check: print the cache dir and exit 0 if it is built, exit 3 otherwise (builds nothing)
set -euo pipefail
check=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="${1:-$HOME/.cache/oppu}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"

key="$( { uname -m; grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true; } | sha256sum | cut -c1-12)"
DEST="$ROOT/llama-cpp-$VERSION-$key"
if [ -f "$DEST/.installed" ]; then
  echo "$DEST"
  exit 0
fi
if [ "$check" = 1 ]; then
  echo "llama.cpp is not built at $DEST: run \`make setup-llama-cpp\`" >&2
  exit 3
fi
mkdir -p "$ROOT"
# One build at a time (two make targets started together would both compile for ~30 min on 2 cores).
exec 9>"$ROOT/.llama-cpp-$VERSION.lock"
flock 9
if [ -f "$DEST/.installed" ]; then
  echo "$DEST"
  exit 0
fi
rm -rf "$DEST"
tmp="$(mktemp -d "$ROOT/.llama-cpp-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "llama.cpp: downloading the llama-cpp-python==$VERSION sdist" >&2
"$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp" >&2
tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
src="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { echo "no vendor/llama.cpp in the sdist" >&2; exit 1; }

echo "llama.cpp: building llama-server (-j$JOBS; ~10-20 min on 2 cores)" >&2
# Static and self-contained: no shared ggml libs next to the binary, no HTTPS/UI downloads (nothing but PyPI is
# reachable from the machines this runs on), no tests/examples.
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$src" -B "$tmp/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$tmp/build" --target llama-server -j "$JOBS" >&2

stage="$tmp/stage"
mkdir -p "$stage/bin"
cp "$tmp/build/bin/llama-server" "$stage/bin/"
cp "$src/convert_hf_to_gguf.py" "$src/convert_lora_to_gguf.py" "$stage/"
cp -r "$src/conversion" "$src/gguf-py" "$stage/"
cp "$src/LICENSE" "$stage/LICENSE-llama.cpp"
"$PYTHON" -m pip install -q --target "$stage/pydeps" sentencepiece >&2
"$stage/bin/llama-server" --version >"$stage/version.txt" 2>&1 || true
echo "llama-cpp-python==$VERSION; uname -m=$(uname -m); key=$key" >>"$stage/version.txt"
touch "$stage/.installed"
mv "$stage" "$DEST"
echo "$DEST"
