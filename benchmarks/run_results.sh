#!/usr/bin/env bash
# The commands that produced benchmarks/RESULTS.md: every method on the four benchmarks of
# ../shared/data, with VGG16 (vgg16-caffe) pool5 maps at a longest side of 1024 px, and learning
# sets always disjoint from the evaluated images (selret refuses an overlap).
#
#   DATA=../shared/data CACHE=/work/selret-cache OUT=runs/results benchmarks/run_results.sh
#
# MAX_SIDE=512 gives the same tables on 512-px maps (cheaper to extract).
#
# Maps come from (and missing ones go to) $CACHE, so a second run only fits, encodes and searches.
# Each step writes <OUT>/<benchmark>/<experiment>.{md,json,png}; RESULTS.md copies the tables.
set -euo pipefail

DATA=${DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
CACHE=${CACHE:-${SELRET_CACHE:-$HOME/.cache/selret/features}}
MAX_SIDE=${MAX_SIDE:-1024}
OUT=${OUT:-runs/results-$MAX_SIDE}
SELRET=${SELRET:-selret}
# One BLAS thread: on a busy 2-core machine OpenBLAS's spinning threads made eigh 20x slower.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}

PARIS=$DATA/paris6k-250
SMVS=$DATA/smvs-dvd-covers
UKB=$DATA/ukbench-56

# benchmark name | selret dataset arguments | learning set (disjoint from that benchmark)
run_all() {
  local name=$1; shift
  local -a dataset=() learn=()
  while [ "$1" != "--" ]; do dataset+=("$1"); shift; done; shift
  for l in "$@"; do learn+=(--learn "$l"); done
  local common=(--cache "$CACHE" --max-side "$MAX_SIDE" --no-progress)
  # Table 6: the baselines (with and without PCA-whitening) and the four masks at 512-D and 1024-D.
  "$SELRET" experiment baselines "${dataset[@]}" "${learn[@]}" "${common[@]}" \
    --masks sift,sum,max,none --presets temb-demo-512,temb-demo-1024 --whiten both \
    --out "$OUT/$name"
  # 4096-D (MAX-mask only): the learning sets here have far fewer images than the 4224-D
  # embedding, so the rotation is mostly a completed basis (reported as "learned comps").
  "$SELRET" experiment dims "${dataset[@]}" "${learn[@]}" "${common[@]}" \
    --presets temb-demo-4096 --masks max --out "$OUT/$name"
  # One full report with per-query AP and a contact sheet of the top results.
  "$SELRET" eval "${dataset[@]}" "${learn[@]}" "${common[@]}" --preset temb-demo-1024 --mask max \
    --out "$OUT/$name/eval-temb-demo-1024-max"
}

run_all paris6k-250-official-12 "$PARIS" --protocol official-12 -- "$SMVS" "$UKB/jpg"
run_all paris6k-250-loo "$PARIS" --protocol loo -- "$SMVS" "$UKB/jpg"
run_all smvs-dvd-covers "$SMVS" -- "$PARIS/jpg" "$UKB/jpg"
run_all ukbench-56 "$UKB/jpg" -- "$PARIS/jpg" "$SMVS/Reference"

# The issue-3 check at 512 px (also a slow test: tests/test_real_retrieval.py).
SELRET_TEST_CACHE=${SELRET_TEST_CACHE:-$CACHE} python -m pytest tests/test_real_retrieval.py -q -s -m slow
