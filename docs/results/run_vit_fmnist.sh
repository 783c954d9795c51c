#!/usr/bin/env bash
# Issue 8 (b) and (c): a transformers ViT and a timm ViT, each pretrained on Fashion-MNIST classes 5-9
# and then fine-tuned on classes 0-4, against the same architecture fine-tuned from random init.
#
#   bash docs/results/run_vit_fmnist.sh [ROOT] [flags added to every command]
#
# ROOT defaults to runs/results. The four studies are independent and run side by side on the one GPU.
# TYPES (default "vit timm") picks the model types.
# LAUNCH overrides the launcher (CPU smoke run: LAUNCH=python ... --bf16 false plus tiny sizes).
set -euo pipefail
ROOT=${1:-runs/results}
shift || true
LAUNCH=${LAUNCH:-accelerate launch --config_file recipes/accelerate/single_gpu.yaml}
TYPES=${TYPES:-vit timm}
mkdir -p "$ROOT/logs"

wait_all() { local failed=0; for pid in "$@"; do wait "$pid" || failed=1; done; return $failed; }

pids=()
for type in $TYPES; do
  $LAUNCH recipes/pretrain_vit.py recipes/configs/vit_fmnist_pretrain.json --model_type $type \
    --output_dir "$ROOT/$type-pretrained-fmnist-5-9" "$@" >"$ROOT/logs/pretrain-$type.log" 2>&1 &
  pids+=($!)
done
wait_all "${pids[@]}"

pids=()
for type in $TYPES; do
  $LAUNCH recipes/butterfly_image_classification.py recipes/configs/vit_fmnist_finetune.json --model_type $type \
    --model_name_or_path "$ROOT/$type-pretrained-fmnist-5-9" --output_dir "$ROOT/$type-fmnist-pretrained" "$@" \
    >"$ROOT/logs/$type-fmnist-pretrained.log" 2>&1 &
  pids+=($!)
  $LAUNCH recipes/butterfly_image_classification.py recipes/configs/vit_fmnist_finetune.json --model_type $type \
    --model_name_or_path "" --output_dir "$ROOT/$type-fmnist-random" "$@" \
    >"$ROOT/logs/$type-fmnist-random.log" 2>&1 &
  pids+=($!)
done
wait_all "${pids[@]}"
