#!/usr/bin/env bash
# make install's llama.cpp step: the llama.cpp runtime (llama-cpp-python, built from its sdist:
# the registry has no wheel) and, from the same sdist, the converters (convert_hf_to_gguf.py,
# convert_lora_to_gguf.py, their conversion/ package and the vendored gguf-py), so converter and
# runtime are one llama.cpp version.
#
# Never fails the install: on a machine without cmake or a C++ compiler, or where the build
# fails, it writes the reason to $SHARE/UNAVAILABLE and the llama_cpp backend reports that
# reason (its targets are skipped, never crash). pip's wheel cache makes later installs instant.
#
#   scripts/install_llama_cpp.sh VENV
set -uo pipefail

VENV=${1:?usage: install_llama_cpp.sh VENV}
VERSION=0.3.36
SHARE="$VENV/share/ftd-llama.cpp"
LOG="$VENV/llama-cpp-install.log"
PIP=("$VENV/bin/python" -m pip)

mkdir -p "$SHARE"
rm -f "$SHARE/UNAVAILABLE" "$SHARE/VERSION"
: > "$LOG"

unavailable() {
    echo "$1 (install log: $LOG)" > "$SHARE/UNAVAILABLE"
    echo "llama.cpp backend unavailable: $1 (see $LOG)" >&2
    exit 0
}

command -v cmake > /dev/null || unavailable "cmake is not installed; llama-cpp-python is built from source"
command -v c++ > /dev/null || command -v g++ > /dev/null || unavailable "no C++ compiler (c++/g++) is installed"

SDIST_DIR=$(mktemp -d)
trap 'rm -rf "$SDIST_DIR"' EXIT
"${PIP[@]}" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR" >> "$LOG" 2>&1 \
    || unavailable "pip could not download the llama-cpp-python==$VERSION sdist"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"

echo "building llama-cpp-python==$VERSION (first install on a machine: minutes; then pip's wheel cache)" >&2
# By name, not from the file: pip caches the built wheel under the index URL, the same for every clone.
# No multimodal library (LLAVA_BUILD): ftd serves text models; it halves the build.
CMAKE_ARGS="-DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "${PIP[@]}" install --quiet "llama-cpp-python==$VERSION" sentencepiece >> "$LOG" 2>&1 \
    || unavailable "building llama-cpp-python==$VERSION failed (cmake/compiler error)"

TOP="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar -xzf "$SDIST" -C "$SDIST_DIR" "$TOP/convert_hf_to_gguf.py" "$TOP/convert_lora_to_gguf.py" \
    "$TOP/conversion" "$TOP/gguf-py" "$TOP/LICENSE" >> "$LOG" 2>&1 \
    || unavailable "the llama-cpp-python==$VERSION sdist lacks the converter scripts"
rm -rf "$SHARE/llama.cpp"
mv "$SDIST_DIR/$TOP" "$SHARE/llama.cpp"
"$VENV/bin/python" -c "import llama_cpp; assert llama_cpp.__version__ == '$VERSION', llama_cpp.__version__" >> "$LOG" 2>&1 \
    || unavailable "llama_cpp does not import after the build"
echo "$VERSION" > "$SHARE/VERSION"
echo "llama.cpp $VERSION ready: runtime in $VENV, converters in $SHARE/llama.cpp" >&2
