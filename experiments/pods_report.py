"""The tables and figures of experiments/pods_compare.py from its run folders (runs/pods_compare/<arm>_s<seed>).

    python -m experiments.pods_report     # the tables; docs/pods_compare_steps.png, _seconds.png and _skills.png

Held-out accuracy (`eval/acc_sampled`, first 200 test prompts) is averaged over seeds at each evaluation step;
the paper's metric is the first step (and the mean training seconds at that step) where an arm's mean curve
reaches 99% of GRPO's peak mean accuracy. The figures: the mean over seeds, with a band of one standard
deviation, per arm, against optimizer steps and against training seconds, and per skill against steps.
"""

import os
import sys

import numpy as np

from experiments.helpers import ROOT, band, finished_runs, legend, load, mean_sd, save, subplots

ARMS = ("grpo", "pods", "random")
SKILLS = ("short", "long", "times", "words")
LABELS = {"grpo": "GRPO, n = m = 8", "pods": "PODS, n = 32, m = 8, max-variance", "random": "n = 32, m = 8, random"}


def arm_runs(arm):
    return finished_runs(os.path.join(ROOT, "runs", "pods_compare"), arm)


def curves(arm, key="eval/acc_sampled"):
    """(steps, [seeds x evals] values of `key`, [seeds x evals] training seconds) of an arm."""
    runs = [load(d) for d in arm_runs(arm)]
    steps = [r["step"] for r in runs[0][1]]
    values = np.array([[r[key] for r in evals] for _, evals in runs])
    seconds = np.array([[r["time/train_elapsed"] for r in evals] for _, evals in runs])
    return np.array(steps), values, seconds


def tables():
    steps, grpo, _ = curves("grpo")
    threshold = 0.99 * grpo.mean(0).max()
    print(f"{len(arm_runs('grpo'))} seeds per arm; threshold = 0.99 x GRPO's peak mean sampled accuracy"
          f" {grpo.mean(0).max():.3f} = {threshold:.3f}\n")  # fmt: skip
    print("| arm | final sampled acc | final greedy acc | peak of mean curve | steps to threshold | seconds to"
          " threshold | zero-std groups (all n) | zero-std (kept m) | generate s/step | update s/step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        steps, acc, seconds = curves(arm)
        greedy = curves(arm, "eval/acc_greedy")[1]
        mean = acc.mean(0)
        reached = np.nonzero(mean >= threshold)[0]
        at = (f"{steps[reached[0]]}", f"{seconds.mean(0)[reached[0]]:.0f}") if len(reached) else ("not reached",) * 2
        train = [row for d in arm_runs(arm) for row in load(d)[0]]
        average = lambda key, rows=train: f"{np.mean([r[key] for r in rows]):.3f}" if key in rows[0] else ""
        print(f"| {arm} | {mean_sd(acc[:, -1])} | {mean_sd(greedy[:, -1])} | {mean.max():.3f} (step"
              f" {steps[mean.argmax()]}) | {at[0]} | {at[1]} | {average('reward/zero_std_frac')}"
              f" | {average('reward/zero_std_frac_kept')} | {average('time/generate')}"
              f" | {average('time/update')} |")  # fmt: skip
    print("\nfinal sampled accuracy per skill (mean over seeds):\n")
    print("| arm | " + " | ".join(SKILLS) + " |\n|---|" + "---|" * len(SKILLS))
    for arm in ARMS:
        per_skill = [curves(arm, f"eval/acc_sampled/{s}")[1][:, -1].mean() for s in SKILLS]
        print(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in per_skill) + " |")


def plot(x_of, xlabel, name):
    fig, ax = subplots(figsize=(7, 4))
    for arm in ARMS:
        steps, acc, seconds = curves(arm)
        band(ax, steps if x_of == "steps" else seconds.mean(0), acc, LABELS[arm])
    ax.set(xlabel=xlabel, ylabel="held-out accuracy, sampled", ylim=(0.4, 0.85))
    ax.grid(alpha=0.3)
    legend(ax, loc="lower right")
    save(fig, name)


def plot_skills(name):
    fig, axes = subplots(1, len(SKILLS), figsize=(16, 4.2), sharey=True)
    for ax, skill in zip(axes, SKILLS):
        for arm in ARMS:
            steps, acc, _ = curves(arm, f"eval/acc_sampled/{skill}")
            band(ax, steps, acc, LABELS[arm], seeds=False)
        ax.set(title=f"skill `{skill}`", xlabel="optimizer step", ylim=(0, 1))
        ax.grid(alpha=0.3)
        legend(ax, loc="upper left" if skill == "words" else "lower right")
    axes[0].set_ylabel("held-out accuracy, sampled")
    save(fig, name)


if __name__ == "__main__":
    if not all(arm_runs(arm) for arm in ARMS):
        sys.exit("not every arm has a finished run yet: python -m experiments.pods_compare")
    tables()
    plot("steps", "optimizer step (one rollout batch each)", "pods_compare_steps.png")
    plot("seconds", "training seconds (2 CPU cores, two runs at a time)", "pods_compare_seconds.png")
    plot_skills("pods_compare_skills.png")
