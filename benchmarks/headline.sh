#!/usr/bin/env bash
# The headline comparison (benchmarks/README.md, "Headline"): every task and TruthfulQA fold, then the tables and plot
# in the READMEs. Resumable: run it again after a stop and it goes on where it stopped.
# OUTPUT (default benchmarks/results) holds headline.json and headline_tuning.json; WORK (default lofit_runs/headline)
# the adapters and trial folders. JOBS (default 1) runs that many tasks at once, each with THREADS CPU threads
# (default: the cores shared out) and its log in WORK/logs; on 2 cores, JOBS=2 trains about 1.2x faster in total.
set -euo pipefail
cd "$(dirname "$0")/.."
export HEADLINE_OUTPUT="${OUTPUT:-benchmarks/results}" HEADLINE_WORK="${WORK:-lofit_runs/headline}"
export HEADLINE_JOBS="${JOBS:-1}"
cores="$(nproc)"
export HEADLINE_THREADS="${THREADS:-$(( cores > HEADLINE_JOBS ? cores / HEADLINE_JOBS : 1 ))}"
mkdir -p "$HEADLINE_WORK/logs"
# shellcheck disable=SC2016  # expanded by the bash that xargs starts, with one task's words as "$@"
one_run='
    if (( HEADLINE_JOBS > 1 )); then
        log="$HEADLINE_WORK/logs/$(echo "$*" | tr -cs "[:alnum:]\n" _).log"
        echo "headline $*: log in $log"
        exec > "$log" 2>&1
    fi
    python -m benchmarks.lofit_bench headline --task "$@" --threads "$HEADLINE_THREADS" \
        --output "$HEADLINE_OUTPUT" --work-dir "$HEADLINE_WORK"'
printf '%s\n' "truthfulqa --fold 0" "truthfulqa --fold 1" "mquake" "clutrr" |
    xargs -P "$HEADLINE_JOBS" -L 1 bash -c "$one_run" headline
python -m benchmarks.lofit_bench headline-report --output "$HEADLINE_OUTPUT"
