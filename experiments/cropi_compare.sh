#!/usr/bin/env bash
# CROPI against GRPO on the full pool and on a random 10% per stage: the defaults (6 stages x 16 steps,
# validation target = the weak target skill `words`), seeds 1 to 3, the same GRPO steps; then the summary.
# SELECTIONS="cropi" bash experiments/cropi_compare.sh re-runs only some selections.
set -euo pipefail
for seed in 1 2 3; do
  for selection in ${SELECTIONS:-cropi full random}; do
    rm -rf "runs/cropi_${selection}_s$seed"  # a run folder that exists is refused
    python cropi.py --seed "$seed" --selection "$selection" --run-name "cropi_${selection}_s$seed" > /dev/null
  done
done
python experiments/cropi_summary.py
