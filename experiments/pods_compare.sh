#!/usr/bin/env bash
# PODS (n=32, m=8) against GRPO (n=m=8), 3 seeds each, the same training-time budget, then the summary.
# Usage: bash experiments/pods_compare.sh [seconds of training per run, default 90]
set -euo pipefail
budget=${1:-90}
rm -rf runs/cmp_grpo_s* runs/cmp_pods_s*  # a run folder that exists is refused
for seed in 1 2 3; do
  python pods.py --seed "$seed" --n 8 --m 8 --max-time "$budget" --steps 100000 --eval-every 5 \
    --run-name "cmp_grpo_s$seed" > /dev/null
  python pods.py --seed "$seed" --n 32 --m 8 --max-time "$budget" --steps 100000 --eval-every 5 \
    --run-name "cmp_pods_s$seed" > /dev/null
done
python experiments/summarize.py runs/cmp_grpo_s* -- runs/cmp_pods_s*
