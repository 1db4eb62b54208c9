#!/usr/bin/env bash
# The "clflax beside Avalanche" table: every row on both libraries, one after the other, in one session.
#
#   tools/peers/run_all.sh [RESULTS_DIR]          # default RESULTS_DIR: <repo>/runs/peers/<date> (git-ignored)
#
# Per row: clflax's launch.py (RESULTS_DIR/clflax/<row>_seed<S>/) then Avalanche's runner
# (RESULTS_DIR/avalanche/<row>_seed<S>.json), each wrapped by timed.py (<row>_seed<S>.timed.json: the whole
# process's wall time and peak memory); at the end compare.py writes RESULTS_DIR/peers_seed<S>.md.
#
# Environment:
#   PY=/work/venv-avalanche/bin/python   the tool environment's python (README.md: how to make it)
#   CLFLAX_PY=<repo>/.venv/bin/python    clflax's environment
#   DATA_DIR=<repo>/../shared/data       the MNIST folder's parent (clflax's --config.data_dir)
#   SEED=0                               seed of every row
#   WAIT=0.7                             before each run, wait (up to 40 min) for a 1-min load average <= WAIT;
#                                        WAIT= (empty) starts at once. A run's own 2 threads keep the load
#                                        near 2, so the next run typically waits 2-3 min for it to decay.
#   SIDES="clflax avalanche"             which libraries to run
#   EXTRAS=1                             also Avalanche's like-for-like variants (clflax's Fisher, clflax's task-1
#                                        rate, Avalanche's default Replay buffer, Split MNIST naive)
#   SMOKE=1                              every row on a few tasks and examples (seconds; the sizes differ per side)
# Full rows take 30 s (clflax naive) to 15 min (Avalanche A-GEM) each on 2 CPU threads: run them on a quiet machine.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${1:-$ROOT/runs/peers/$(date +%Y-%m-%d)}"
PY="${PY:-/work/venv-avalanche/bin/python}"
CLFLAX_PY="${CLFLAX_PY:-$ROOT/.venv/bin/python}"
DATA_DIR="${DATA_DIR:-$ROOT/../shared/data}"
SIDES="${SIDES:-clflax avalanche}"
SEED="${SEED:-0}"
WAIT="${WAIT-0.7}"
mkdir -p "$OUT/logs" "$OUT/clflax" "$OUT/avalanche"

COMMON=(--seed "$SEED" --check-eval)
TIMED=("$HERE/timed.py")
[[ -n "$WAIT" ]] && TIMED+=(--wait-quiet "$WAIT")
SUFFIX="" CLFLAX_ARG=""
if [[ "${SMOKE:-0}" == 1 ]]; then
  COMMON+=(--train-tasks 2 --n-train 1000 --n-test 1000)
  SUFFIX="_smoke" CLFLAX_ARG=",smoke"
fi

FILES=()
row() {  # row NAME CLFLAX_CONFIG ARGS...: both sides of one row (CLFLAX_CONFIG "-": Avalanche only)
  local name="$1" config="$2"; shift 2
  local tag="${name}${SUFFIX}_seed${SEED}"
  if [[ " $SIDES " == *" clflax "* && "$config" != "-" ]]; then
    echo "=== clflax $name -> $OUT/clflax/$tag"
    (cd "$ROOT" && "$CLFLAX_PY" "${TIMED[@]}" "$OUT/clflax/$tag.timed.json" -- "$CLFLAX_PY" launch.py \
        --config "$config$CLFLAX_ARG" --config.data_dir="$DATA_DIR" --config.seed="$SEED" \
        --workdir "$OUT/clflax/$tag") 2>&1 | tee "$OUT/logs/clflax_$tag.log"
  fi
  if [[ " $SIDES " == *" avalanche "* ]]; then
    local file="$OUT/avalanche/$tag.json"
    FILES+=("$file")
    echo "=== Avalanche $name -> $file"
    "$PY" "${TIMED[@]}" "$OUT/avalanche/$tag.timed.json" -- "$PY" "$HERE/avalanche_runner.py" "$@" "${COMMON[@]}" \
        --out "$file" 2>&1 | tee "$OUT/logs/avalanche_$tag.log"
  fi
}

# The table: Permuted MNIST (A-GEM protocol) x {naive, EWC, ER, A-GEM}; class-incremental Split MNIST x ER.
row permuted_naive  configs/permuted_mnist.py:vanilla --protocol permuted --strategy naive
row permuted_ewc    configs/permuted_mnist.py:ewc     --protocol permuted --strategy ewc
row permuted_replay configs/permuted_mnist.py:replay  --protocol permuted --strategy replay
row permuted_agem   configs/permuted_mnist.py:agem    --protocol permuted --strategy agem
row split_replay    configs/split_mnist.py:replay     --protocol split    --strategy replay

if [[ "${EXTRAS:-0}" == 1 ]]; then
  # EWC with clflax's estimator (per-example Fisher on 1,000 examples) inside Avalanche's EWCPlugin.
  row permuted_ewc_fisher1000 - --protocol permuted --strategy ewc --fisher-batch 1 --fisher-samples 1000
  # ER with clflax's effective rate on task 1 (0.05: its memory is empty there).
  row permuted_replay_lr1st0.05 - --protocol permuted --strategy replay --lr-first-task 0.05
  row split_replay_lr1st0.05 -    --protocol split    --strategy replay --lr-first-task 0.05
  # What avalanche.training.Replay(mem_size=250 * tasks) does: one budget split over the tasks seen so far.
  row permuted_replay_avdefault - --protocol permuted --strategy replay --replay-buffer avalanche_default
  row split_naive - --protocol split --strategy naive
fi

if (( ${#FILES[@]} )); then
  "$PY" "$HERE/table.py" "${FILES[@]}" | tee "$OUT/avalanche/table${SUFFIX}_seed${SEED}.md"
fi
python3 "$HERE/compare.py" "$OUT" --seed "$SEED" ${SUFFIX:+--smoke} | tee "$OUT/peers${SUFFIX}_seed${SEED}.md"
