"""What a run shows of the built-in world's structure, from its metrics.jsonl.

For every run folder given: held-out accuracy (sampled and greedy) and the unfaithful share among correct
sampled answers at the first and the last evaluation, sampled accuracy per skill at both, and, for a
cropi run, the target skills' share of each stage's selection against their share of the pool.

    python experiments/world_summary.py runs/ippo__s1__... runs/cropi__s1__...
"""

import json
import os
import sys


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summarize(run_dir):
    metrics = rows(run_dir)
    evals = [r for r in metrics if "eval/acc_sampled" in r]
    first, last = evals[0], evals[-1]
    print(f"{run_dir}: steps {first['step']} -> {last['step']}")
    for key in ("eval/acc_sampled", "eval/acc_greedy", "eval/unfaithful_sampled", "eval_target/acc_sampled"):
        if key in first:
            print(f"  {key:26} {first[key]:.3f} -> {last[key]:.3f}")
    skills = sorted(k.split("/")[-1] for k in first if k.startswith("eval/acc_sampled/"))
    if skills:
        moves = [f"{s} {first[f'eval/acc_sampled/{s}']:.2f}->{last[f'eval/acc_sampled/{s}']:.2f}" for s in skills]
        print("  sampled by skill          " + "  ".join(moves))
    stages = [r for r in metrics if "select/target_share" in r]
    if stages:
        pool = stages[0]["select/target_share_pool"]
        shares = " ".join(f"{r['select/target_share']:.2f}" for r in stages)
        mean = sum(r["select/target_share"] for r in stages) / len(stages)
        ratio = f"mean {mean:.2f}; pool {pool:.2f}, {mean / pool:.1f}x"
        print(f"  target share of the selection by stage: {shares} ({ratio})")


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        summarize(folder)
