#!/usr/bin/env bash
# Issue 23: the butterfly of LLM fine-tuning. A small Llama (8 layers, width 512, grouped-query
# attention 8/4, 38.8M parameters) pretrained on the packaged tweets and drug reviews, then
# fine-tuned on tweet -> sentiment completions with a LoRA adapter (and fully), children spawned at
# steps 0, 10, 50 and 150 of 300 (2 children of sigma 0.01 and a control each, deterministic kernels).
#
#   bash docs/results/run_llama_tweets.sh [ROOT]          # both studies
#   KINDS=lora bash docs/results/run_llama_tweets.sh      # what made docs/results/llama-tweets-lora
#
# The studies are independent: they run side by side on the one GPU.
set -euo pipefail
ROOT=${1:-runs/results/llama-tweets}
mkdir -p "$ROOT/logs"
python recipes/pretrain_causal_lm.py recipes/configs/llama_pretrain_text.json \
  --output_dir "$ROOT/llama-text-small" >"$ROOT/logs/pretrain.log" 2>&1
pids=()
for kind in ${KINDS:-lora full}; do
  python recipes/butterfly_causal_lm.py recipes/configs/llama_tweets_$kind.json \
    --model_name_or_path "$ROOT/llama-text-small" --output_dir "$ROOT/llama-tweets-$kind" \
    >"$ROOT/logs/$kind.log" 2>&1 &
  pids+=($!)
done
failed=0; for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
exit $failed
