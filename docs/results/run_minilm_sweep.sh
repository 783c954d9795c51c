#!/usr/bin/env bash
# Issue 8 (a): the pretrained MiniLM fine-tuned on the tweets, spawn steps 0..450 of 600 x scales
# 0.001, 0.01, 0.1 x 3 children (+ control), collected into one sweep report.
#
# These are the commands that made minilm-tweets-sweep/ at commit 9fe3faa, with that commit's
# recipes/butterfly_sweep.py (one run directory per scale). That recipe is gone: a sweep is now one
# run with one parent, and the same study is
#   accelerate launch --config_file recipes/accelerate/single_gpu.yaml \
#       recipes/butterfly_text_classification.py recipes/configs/minilm_tweets_sweep.json
# (check out 9fe3faa to run the script below as it was).
#
#   bash docs/results/run_minilm_sweep.sh [ROOT] [flags added to every command]
#
# The sweep recipe runs its scales one after another. To use the one GPU fully, the three scales run
# here as three processes of the same recipe side by side; the last command (all scales) then finds
# every run trained and analysed, reuses them, and writes ROOT/sweep_report.json and its plot.
set -euo pipefail
ROOT=${1:-runs/results/minilm-tweets-sweep}
shift || true
LAUNCH=${LAUNCH:-accelerate launch --config_file recipes/accelerate/single_gpu.yaml}
CONFIG=recipes/configs/minilm_tweets_sweep.json
mkdir -p "$ROOT/logs"

pids=()
for scale in 0.001 0.01 0.1; do
  $LAUNCH recipes/butterfly_sweep.py $CONFIG --perturbation_scales $scale --output_dir "$ROOT" "$@" \
    >"$ROOT/logs/sigma-$scale.log" 2>&1 &
  pids+=($!)
done
failed=0; for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ $failed = 0 ]
$LAUNCH recipes/butterfly_sweep.py $CONFIG --output_dir "$ROOT" "$@" >"$ROOT/logs/sweep.log" 2>&1
