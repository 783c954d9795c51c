#!/usr/bin/env bash
# Issue 11: the noise floor on a GPU, with and without deterministic kernels, for the pretrained
# MiniLM fine-tuned at a usual learning rate (5e-5) and for the same architecture trained from
# random initialisation at a high one (1e-3). fp32 with TF32 off, batch 64, 1000 steps, the same
# data order and dropout masks for parent and children; spawn steps 0 and 500, each with a
# control child and two children perturbed with sigma 0.001; children one at a time.
#
#   bash docs/results/noise_floor/run.sh [ROOT] [flags added to every run]
#
# The four runs are independent and run side by side on the one GPU. DETERMINISTIC (default
# "false true") picks the settings.
set -euo pipefail
ROOT=${1:-runs/results/noise-floor}
shift || true
LAUNCH=${LAUNCH:-accelerate launch --config_file recipes/accelerate/single_gpu.yaml}
mkdir -p "$ROOT/logs"
COMMON=(--max_steps 1000 --per_device_train_batch_size 64 --per_device_eval_batch_size 256 --max_eval_samples 2000
        --tf32 false --warmup_steps 100 --weight_decay 0.01 --seed 0 --spawn_steps 0 500 --num_children 2
        --perturbation_scale 0.001 --parallel_children 1 --divergence_every 100 --alphas 6
        --analysis_train_subset 256 --save_strategy no --logging_steps 100 --report_to none --disable_tqdm true)

pids=()
for deterministic in ${DETERMINISTIC:-false true}; do
  $LAUNCH recipes/butterfly_text_classification.py --output_dir "$ROOT/pretrained-lr5e-5-deterministic-$deterministic" \
    --learning_rate 5e-5 --deterministic $deterministic "${COMMON[@]}" "$@" \
    >"$ROOT/logs/pretrained-deterministic-$deterministic.log" 2>&1 &
  pids+=($!)
  $LAUNCH recipes/butterfly_text_classification.py --output_dir "$ROOT/random-init-lr1e-3-deterministic-$deterministic" \
    --random_init true --learning_rate 1e-3 --deterministic $deterministic "${COMMON[@]}" "$@" \
    >"$ROOT/logs/random-init-deterministic-$deterministic.log" 2>&1 &
  pids+=($!)
done
failed=0; for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
exit $failed
