#!/usr/bin/env bash
# Plugin-free serving check, llama.cpp: merged LoFiT checkpoint -> GGUF (llama.cpp's own convert_hf_to_gguf.py) ->
# llama_cpp.Llama, compared with the unmerged LoFiT model in transformers. See README.md.
#
# Sets up (idempotent; prints every install it makes) a virtual environment with llama-cpp-python built from its
# source distribution, whose vendored llama.cpp also holds the converter, plus the converter's own dependencies
# (torch, sentencepiece, gguf-py; transformers 5.24.0 rather than the 4.57.6 its requirements file pins, which cannot
# read the tokenizer_config.json that transformers 5 writes: "Tokenizer class TokenizersBackend does not exist or is
# not currently imported"). Then runs reference.py in the repository's .venv and
# check_llama_cpp.py in this one. SETUP_ONLY=1 stops after the set-up.
#
# Environment: SERVING_VENVS (where the venv and the source go; default ~/.cache/peft_lofit/serving_venvs),
# SERVING_WORK (models and reference; default ~/.cache/peft_lofit/serving_work), REPO_PYTHON (default .venv/bin/python
# of the repository), LLAMA_CPP_PYTHON_VERSION (default 0.3.36), TORCH_SPEC (default torch==2.13.0+cpu),
# CONVERTER_TRANSFORMERS (default 5.24.0, the version that wrote the checkpoints), PIP_TORCH_ARGS (e.g.
# "--extra-index-url https://download.pytorch.org/whl/cpu" where the +cpu wheel is not found).
set -euo pipefail
NAME=llama_cpp_check VENV_NAME=llama_cpp
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
CONVERTER_TRANSFORMERS="${CONVERTER_TRANSFORMERS:-5.24.0}"
SRC="$VENVS/src/llama_cpp_python-$VERSION"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}" MAKEFLAGS="${MAKEFLAGS:--j1}"
if [ ! -d "$SRC" ]; then
    if [ ! -f "$SRC.tar.gz" ]; then
        run "$PY" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$VENVS/src"
    fi
    run tar -xzf "$SRC.tar.gz" -C "$VENVS/src"
fi
if ! "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    say "building llama-cpp-python $VERSION from source with one job (CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL)"
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" run "$PY" -m pip install --verbose "$SRC"
fi
if ! "$PY" -c "import torch, sentencepiece, transformers, gguf, sys; sys.exit(transformers.__version__ != '$CONVERTER_TRANSFORMERS')" 2>/dev/null; then
    say "installing the converter's dependencies (requirements-convert_hf_to_gguf.txt, torch as available here)"
    # shellcheck disable=SC2086
    run "$PY" -m pip install ${PIP_TORCH_ARGS:-} "$TORCH_SPEC"
    run "$PY" -m pip install "transformers==$CONVERTER_TRANSFORMERS" "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21.0,<5.0.0" \
        "$SRC/vendor/llama.cpp/gguf-py"
fi
say "engine venv: $("$PY" -c 'import llama_cpp, torch, transformers, gguf; print("llama_cpp", llama_cpp.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
if [ "${SETUP_ONLY:-0}" = 1 ]; then exit 0; fi

say "reference (transformers, unmerged LoFiT) in $REPO_PYTHON"
run "$REPO_PYTHON" "$HERE/reference.py" --work "$WORK"
say "llama.cpp check"
run "$PY" "$HERE/check_llama_cpp.py" --work "$WORK" --converter "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" \
    --results "$HERE/results.json" "$@"
