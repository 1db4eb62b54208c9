#!/usr/bin/env bash
# The Avalanche side of the "clflax beside Avalanche" table: every row, one seed, one JSON per row.
#
#   tools/peers/run_all.sh [RESULTS_DIR]          # default RESULTS_DIR: <repo>/runs/peers/avalanche (git-ignored)
#
# Environment:
#   PY=/work/venv-avalanche/bin/python   the tool environment's python (README.md: how to make it)
#   SEED=0                               seed of every row
#   WAIT=0.7                             before each row, wait (up to 40 min) for a 1-min load average <= WAIT;
#                                        WAIT= (empty) starts at once. Each row's own 2 threads keep the load
#                                        near 2, so the next row typically waits 2-3 min for it to decay.
#   EXTRAS=1                             also the like-for-like variants (clflax's Fisher, clflax's task-1 rate,
#                                        Avalanche's default Replay buffer, Split MNIST naive)
#   SMOKE=1                              every row on 2 tasks x 1,000 examples, 1,000 test examples (seconds)
# Full rows take about 200 s (naive) to 900 s (A-GEM) each on 2 CPU threads: run them on a quiet machine.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${1:-$ROOT/runs/peers/avalanche}"
PY="${PY:-/work/venv-avalanche/bin/python}"
SEED="${SEED:-0}"
WAIT="${WAIT-0.7}"
mkdir -p "$OUT/logs"

COMMON=(--seed "$SEED" --check-eval)
[[ -n "$WAIT" ]] && COMMON+=(--wait-quiet "$WAIT")
SUFFIX=""
if [[ "${SMOKE:-0}" == 1 ]]; then
  COMMON+=(--train-tasks 2 --n-train 1000 --n-test 1000)
  SUFFIX="_smoke"
fi

FILES=()
row() {  # row NAME ARGS...
  local name="$1"; shift
  local file="$OUT/${name}${SUFFIX}_seed${SEED}.json"
  FILES+=("$file")
  echo "=== $name -> $file"
  "$PY" "$HERE/avalanche_runner.py" "$@" "${COMMON[@]}" --out "$file" 2>&1 | tee "$OUT/logs/${name}${SUFFIX}_seed${SEED}.log"
}

# The table: Permuted MNIST (A-GEM protocol) x {naive, EWC, ER, A-GEM}; class-incremental Split MNIST x ER.
row permuted_naive  --protocol permuted --strategy naive
row permuted_ewc    --protocol permuted --strategy ewc
row permuted_replay --protocol permuted --strategy replay
row permuted_agem   --protocol permuted --strategy agem
row split_replay    --protocol split    --strategy replay

if [[ "${EXTRAS:-0}" == 1 ]]; then
  # EWC with clflax's estimator (per-example Fisher on 1,000 examples) inside Avalanche's EWCPlugin.
  row permuted_ewc_fisher1000 --protocol permuted --strategy ewc --fisher-batch 1 --fisher-samples 1000
  # ER with clflax's effective rate on task 1 (0.05: its memory is empty there).
  row permuted_replay_lr1st0.05 --protocol permuted --strategy replay --lr-first-task 0.05
  row split_replay_lr1st0.05    --protocol split    --strategy replay --lr-first-task 0.05
  # What avalanche.training.Replay(mem_size=250 * tasks) does: one budget split over the tasks seen so far.
  row permuted_replay_avdefault --protocol permuted --strategy replay --replay-buffer avalanche_default
  row split_naive --protocol split --strategy naive
fi

"$PY" "$HERE/table.py" "${FILES[@]}" | tee "$OUT/table${SUFFIX}_seed${SEED}.md"
