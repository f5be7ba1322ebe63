#!/usr/bin/env bash
# Binary TV against Top-K TV (K = 20), no mismatch, default settings, seeds 1 to 3: accuracy, and the
# time and memory Top-K costs per step. Run it alone on the machine: the update times are compared.
set -euo pipefail
steps=${1:-150}
for seed in 1 2 3; do
  for tr in binary-tv topk-tv; do
    rm -rf "runs/dppo_${tr}_s$seed"  # a run folder that exists is refused
    python dppo.py --seed "$seed" --trust-region "$tr" --top-k 20 --steps "$steps" --run-name "dppo_${tr}_s$seed" > /dev/null
  done
done
python experiments/dppo_summary.py "binary-tv=runs/dppo_binary-tv_s*" "topk-tv (K 20)=runs/dppo_topk-tv_s*"
