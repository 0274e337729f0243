#!/usr/bin/env bash
# Set up (scripts/bootstrap.sh) and run the whole pipeline with DVC on the data params.yaml names
# (the embedded synthetic data set by default). Extra arguments go to `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
dvc repro "$@"
pneumo show
echo "data version (DVC): $(pneumo data-version)"
# The hospital side: the test images predicted by @champion, with Grad-CAM figures. A candidate under
# the clinical floor (registry.sensitivity_floor) is registered but never becomes @champion.
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
status=0
pneumo predict data/raw/test -o reports/test_predictions.csv --explain reports/heatmaps 2>"$errors" || status=$?
cat "$errors" >&2
if [ "$status" -eq 0 ]; then
  echo "predictions: reports/test_predictions.csv, Grad-CAM figures: reports/heatmaps/"
elif grep -q 'no @champion in the registry' "$errors"; then  # not any failure: only a registry without one
  echo "no @champion to predict with: $(grep -m1 '"reason"' reports/champion.json | sed 's/^ *//')"
else
  exit "$status"
fi
