#!/usr/bin/env bash
# Set up (scripts/bootstrap.sh) and run the whole pipeline with DVC on the data params.yaml names
# (the embedded synthetic data set by default). Extra arguments go to `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
dvc repro "$@"
# The hospital side: the test images predicted by @champion, with Grad-CAM figures.
pneumo predict data/raw/test -o reports/test_predictions.csv --explain reports/heatmaps
pneumo show
echo "data version (DVC): $(pneumo data-version)"
