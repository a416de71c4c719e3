#!/usr/bin/env bash
# The paper's Llama-2-7B TruthfulQA setting (fold 0) on one GPU; compare with the authors' fold-0 result
# MC1 0.567 / MC2 0.760. Needs access to meta-llama/Llama-2-7b-hf (or pass a local folder as $MODEL).
#
#   bash benchmarks/llama2_7b_truthfulqa.sh            # LoFiT alone (lofit run), then the side-by-side benchmark
#   STEP=run bash benchmarks/llama2_7b_truthfulqa.sh   # LoFiT alone
#
# Settings: K = 32 heads (3% of 1,024), localization lr 5e-3 and lambda 5e-4, offsets lr 1e-2, DPO beta 0.5,
# 5 + 5 epochs, batch 8. On a GPU the model loads in bfloat16 (LoFiT's vectors stay float32).
set -euo pipefail
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
OUT=${OUT:-lofit_runs/llama2-7b}
PAPER=(--localize-lr 5e-3 --l1 5e-4 --localize-epochs 5 --epochs 5 --batch-size 8)

if [[ ${STEP:-all} != bench ]]; then
  lofit run --model "$MODEL" --task truthfulqa --fold 0 --k 32 --lr 1e-2 --beta 0.5 "${PAPER[@]}" --output "$OUT/run"
fi
if [[ ${STEP:-all} != run ]]; then
  python -m benchmarks.lofit_bench grid --model "$MODEL" --task truthfulqa --fold 0 --fraction 0.03125 --lofit-lr 1e-2 \
    "${PAPER[@]}" --methods base lofit lofit_random lofit_iti_heads iti repe lora_r8 --seeds 42 \
    --extra-seeds 1 2 --extra-seed-methods lofit lofit_random lofit_iti_heads lora_r8 --iti-alpha 15 --head-selection "$OUT/run/head_selection.json" --output "$OUT/benchmark"
fi
