#!/usr/bin/env bash
# PPO (ippo.py --no-influence) against I-PPO (ippo.py), seeds 1 to 3, the same number of iterations, the
# default task and settings, then the summary table. MODES="ppo ippo filter" adds the filter-only ablation.
# Usage: bash experiments/ippo_compare.sh [iterations, default 60]
set -euo pipefail
steps=${1:-60}
modes=${MODES:-ppo ippo}
declare -A flag=([ppo]=--no-influence [ippo]=--influence [filter]=--no-reweight)
declare -A label=([ppo]=PPO [ippo]=I-PPO [filter]="I-PPO filter-only")
for seed in 1 2 3; do
  for mode in $modes; do
    rm -rf "runs/ippo_${mode}_s$seed"  # a run folder that exists is refused
    python ippo.py --seed "$seed" --steps "$steps" "${flag[$mode]}" --run-name "ippo_${mode}_s$seed" > /dev/null
  done
done
groups=()
for mode in $modes; do
  groups+=("${label[$mode]}=runs/ippo_${mode}_s*")
done
python experiments/ippo_summary.py "${groups[@]}"
