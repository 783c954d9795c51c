#!/usr/bin/env bash
# Issue 24: the paper's headline on Fashion-MNIST. A transformers ViT trained from random initialisation on
# all 10 classes; children at spawn steps 0, 1, 10, 100 and 1000 of 1800, perturbed by one weight (x1 its init
# std) or by Gaussian noise of sigma 1e-4 ... 1 (two children each), beside an unperturbed control, two children
# of another init seed and two of another data order (the reference bands). One command, one run directory:
#
#   bash docs/results/from_scratch/run.sh [ROOT] [flags added to the command]
#
# deterministic=true: the control trains alone and ends bitwise equal to the parent; the perturbed and
# init-seed children of a spawn step train together as one stacked model (parallel_children).
set -euo pipefail
ROOT=${1:-runs/results}
shift || true
LAUNCH=${LAUNCH:-accelerate launch --config_file recipes/accelerate/single_gpu.yaml}
mkdir -p "$ROOT/logs"
$LAUNCH recipes/butterfly_image_classification.py recipes/configs/vit_fmnist_from_scratch.json \
  --output_dir "$ROOT/vit-fmnist-from-scratch" "$@" 2>&1 | tee "$ROOT/logs/vit-fmnist-from-scratch.log"
