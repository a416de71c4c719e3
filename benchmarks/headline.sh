#!/usr/bin/env bash
# The headline comparison (benchmarks/README.md, "Headline"): every task and TruthfulQA fold in turn, then the tables
# and plot in the READMEs. Resumable: run it again after a stop and it goes on where it stopped.
# OUTPUT (default benchmarks/results) holds headline.json and headline_tuning.json; WORK (default lofit_runs/headline)
# the adapters and trial folders; THREADS (default 2) the CPU threads.
set -euo pipefail
cd "$(dirname "$0")/.."
output="${OUTPUT:-benchmarks/results}"
work="${WORK:-lofit_runs/headline}"
for run in "truthfulqa --fold 0" "truthfulqa --fold 1" "mquake" "clutrr"; do
    # shellcheck disable=SC2086
    python -m benchmarks.lofit_bench headline --task $run --threads "${THREADS:-2}" --output "$output" --work-dir "$work"
done
python -m benchmarks.lofit_bench headline-report --output "$output"
