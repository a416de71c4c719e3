# Shared set-up of the serving checks (sourced by vllm_check.sh and llama_cpp_check.sh, which set NAME and VENV_NAME):
# the repository, the folders for venvs and models, offline mode, logging helpers, and the engine's venv.
HERE="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENVS="${SERVING_VENVS:-$HOME/.cache/peft_lofit/serving_venvs}"
WORK="${SERVING_WORK:-$HOME/.cache/peft_lofit/serving_work}"
REPO_PYTHON="${REPO_PYTHON:-$REPO/.venv/bin/python}"
VENV="$VENVS/$VENV_NAME"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

say() { echo "[$NAME] $*"; }
run() { echo "+ $*"; "$@"; }

mkdir -p "$VENVS/src" "$WORK"
if [ ! -x "$VENV/bin/python" ]; then
    run python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
