"""The tables of experiments/cropi_compare.py from its run folders (runs/cropi_compare/<selection>_s<seed>).

    python experiments/cropi_summary.py [--metric eval_target/acc_sampled]

The paper's metric: the first evaluation step at which a selection's mean curve over seeds reaches full GRPO's
mean final value of the metric (the target skill's held-out accuracy), and the training seconds to that step
(the stage scoring included; the offline store, collected once before training, listed apart).
"""

import json
import os
import sys

import numpy as np
from run_metrics import finished_runs, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, "runs", "cropi_compare")
SELECTIONS = ("full", "random", "pass-rate", "cropi")
SKILLS = ("short", "long", "times", "words")


def curves(selection, key):
    """(evaluation steps, [seeds x evals] values of `key`, [seeds x evals] training seconds)."""
    runs = [load(d)[1] for d in finished_runs(FOLDER, selection)]
    values = np.array([[r[key] for r in evals] for evals in runs])
    seconds = np.array([[r["time/train_elapsed"] for r in evals] for evals in runs])
    return np.array([r["step"] for r in runs[0]]), values, seconds


def rows_of(selection):
    """Every metrics.jsonl row (training, evaluation and store rows) of each finished run of a selection."""
    runs = finished_runs(FOLDER, selection)
    return [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for d in runs]


def total(selection, key):
    """Mean over seeds of the sum of `key` over a run's rows (e.g. seconds of scoring)."""
    return float(np.mean([sum(r.get(key, 0) for r in rows) for rows in rows_of(selection)]))


def mean_sd(x):
    return f"{np.mean(x):.3f} +- {np.std(x):.3f}"


def reach_table(metric):
    steps, full, _ = curves("full", metric)
    target = full[:, -1].mean()
    print(f"metric {metric}; target = full GRPO's mean final value {target:.3f}\n")
    print("| selection | seeds | final (mean +- sd over seeds) | mean curve | first step at target | train s to it"
          " (scoring included) | scoring s in all | store s (once, before training) |")
    print("|---|---|---|---|---|---|---|---|")
    reached = {}
    for selection in SELECTIONS:
        steps, values, seconds = curves(selection, metric)
        mean = values.mean(0)
        hit = np.nonzero(mean >= target)[0]
        reached[selection] = (steps[hit[0]], seconds.mean(0)[hit[0]]) if len(hit) else None
        at = f"{reached[selection][0]} | {reached[selection][1]:.0f}" if len(hit) else "not reached | "
        print(f"| {selection} | {len(values)} | {mean_sd(values[:, -1])} | {' '.join(f'{v:.2f}' for v in mean)}"
              f" | {at} | {total(selection, 'time/score'):.0f} | {total(selection, 'time/store'):.0f} |")  # fmt: skip
    for selection in SELECTIONS[1:]:
        if reached[selection] and reached["full"]:
            print(f"{selection}: {reached['full'][0] / reached[selection][0]:.2f}x fewer steps than full,"
                  f" {reached['full'][1] / reached[selection][1]:.2f}x fewer training seconds")  # fmt: skip
        else:
            print(f"{selection}: its mean curve does not reach the target")


def overall_table():
    print("\nheld-out accuracy on the first 200 test prompts at the end (mean +- sd over seeds):\n")
    print("| selection | sampled | greedy | unfaithful among correct | " + " | ".join(SKILLS) + " |")
    print("|---|---|---|---|" + "---|" * len(SKILLS))
    for selection in SELECTIONS:
        final = lambda key, s=selection: curves(s, key)[1][:, -1]  # noqa: E731
        skills = " | ".join(f"{final(f'eval/acc_sampled/{s}').mean():.2f}" for s in SKILLS)
        print(f"| {selection} | {mean_sd(final('eval/acc_sampled'))} | {mean_sd(final('eval/acc_greedy'))}"
              f" | {final('eval/unfaithful_sampled').mean():.3f} | {skills} |")


def share_table():
    pool = [r["select/target_share_pool"] for rows in rows_of("cropi") for r in rows if "select/target_share_pool" in r]
    print(f"\nthe target skill's share of each stage's selection (mean over seeds; pool: {np.mean(pool):.3f}):\n")
    print("| selection | " + " | ".join(f"stage {s}" for s in range(6)) + " |\n|---|" + "---|" * 6)
    for selection in SELECTIONS:
        shares = np.array([[r["select/target_share"] for r in rows if "select/target_share" in r]
                           for rows in rows_of(selection)])  # fmt: skip
        print(f"| {selection} | " + " | ".join(f"{v:.3f}" for v in shares.mean(0)) + " |")


if __name__ == "__main__":
    argv = sys.argv[1:]
    metric = argv[argv.index("--metric") + 1] if "--metric" in argv else "eval_target/acc_sampled"
    if not all(finished_runs(FOLDER, s) for s in SELECTIONS):
        sys.exit("not every selection has a finished run yet: python experiments/cropi_compare.py")
    reach_table(metric)
    overall_table()
    share_table()
