#!/usr/bin/env bash
# The stability test at tiny scale: the sampler runs colder (T = 0.6) than the trainer (T = 1), and each
# rollout batch gets 8 optimizer steps at lr 1e-4, so the policy can move far from mu within a batch.
# none (PG-IS) against DPPO binary-tv against GRPO clip-higher (ratio 0.2 / 0.28), seeds 1 to 3.
set -euo pipefail
steps=${1:-120}
for seed in 1 2 3; do
  for tr in none binary-tv ratio; do
    rm -rf "runs/mismatch_${tr}_s$seed"  # a run folder that exists is refused
    python dppo.py --seed "$seed" --trust-region "$tr" --sampler-temperature 0.6 --lr 1e-4 --minibatches 8 \
      --steps "$steps" --run-name "mismatch_${tr}_s$seed" > /dev/null
  done
done
python experiments/dppo_summary.py "none=runs/mismatch_none_s*" "binary-tv=runs/mismatch_binary-tv_s*" \
  "ratio (clip-higher)=runs/mismatch_ratio_s*"
