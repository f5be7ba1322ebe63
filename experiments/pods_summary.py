"""The table of experiments/pods_compare.py from its run folders (runs/pods_compare/<arm>_s<seed>).

    python experiments/pods_summary.py

Held-out accuracy (`eval/acc_sampled`, first 200 test prompts) is averaged over seeds at each evaluation step;
the paper's metric is the first step (and the mean training seconds at that step) where an arm's mean curve
reaches 99% of GRPO's peak mean accuracy.
"""

import os

import numpy as np
from run_metrics import finished_runs, load, mean_sd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("grpo", "pods", "random")
SKILLS = ("short", "long", "times", "words")


def arm_runs(arm):
    return finished_runs(os.path.join(ROOT, "runs", "pods_compare"), arm)


def curves(arm, key="eval/acc_sampled"):
    """(steps, [seeds x evals] values of `key`, [seeds x evals] training seconds) of an arm."""
    runs = [load(d) for d in arm_runs(arm)]
    steps = [r["step"] for r in runs[0][1]]
    values = np.array([[r[key] for r in evals] for _, evals in runs])
    seconds = np.array([[r["time/train_elapsed"] for r in evals] for _, evals in runs])
    return np.array(steps), values, seconds


def main():
    steps, grpo, _ = curves("grpo")
    threshold = 0.99 * grpo.mean(0).max()
    print(f"{len(arm_runs('grpo'))} seeds per arm; threshold = 0.99 x GRPO's peak mean sampled accuracy"
          f" {grpo.mean(0).max():.3f} = {threshold:.3f}\n")
    print("| arm | final sampled acc | final greedy acc | peak of mean curve | steps to threshold | seconds to"
          " threshold | zero-std groups (all n) | zero-std (kept m) | generate s/step | update s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        steps, acc, seconds = curves(arm)
        greedy = curves(arm, "eval/acc_greedy")[1]
        mean = acc.mean(0)
        reached = np.nonzero(mean >= threshold)[0]
        at = (f"{steps[reached[0]]}", f"{seconds.mean(0)[reached[0]]:.0f}") if len(reached) else ("not reached",) * 2
        train = [row for d in arm_runs(arm) for row in load(d)[0]]
        average = lambda key, rows=train: f"{np.mean([r[key] for r in rows]):.3f}" if key in rows[0] else ""  # noqa: E731
        print(f"| {arm} | {mean_sd(acc[:, -1])} | {mean_sd(greedy[:, -1])} | {mean.max():.3f} (step"
              f" {steps[mean.argmax()]}) | {at[0]} | {at[1]} | {average('reward/zero_std_frac')}"
              f" | {average('reward/zero_std_frac_kept')} | {average('time/generate')} | {average('time/update')} |")
    print("\nfinal sampled accuracy per skill (mean over seeds):\n")
    print("| arm | " + " | ".join(SKILLS) + " |\n|---|" + "---|" * len(SKILLS))
    for arm in ARMS:
        per_skill = [curves(arm, f"eval/acc_sampled/{s}")[1][:, -1].mean() for s in SKILLS]
        print(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in per_skill) + " |")


if __name__ == "__main__":
    main()
