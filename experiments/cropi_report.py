"""The tables and figure of one part of experiments/cropi_compare.py from its run folders
(<folder>/<selection>_s<seed>).

    python -m experiments.cropi_report times [--metric eval_target/acc_sampled]    # or words

The paper's metric: the first evaluation step at which a selection's mean curve over seeds reaches full GRPO's
mean final value of the metric (the target skill's held-out accuracy), and the training seconds to that step
(the stage scoring included; the offline store, collected once before training, listed apart). It is read on
the mean curve as measured and on its trailing mean over 3 evaluations (a target skill has 42-60 test prompts).
The figure (docs/cropi_times.png; words: docs/cropi_compare.png): the mean over seeds, with a band of one
standard deviation, per selection, of the target skill's held-out accuracy, the overall held-out accuracy, and
the target skill's share of each stage's selection.
"""

import os
import sys

import numpy as np

from experiments.cropi_compare import PARTS, SELECTIONS
from experiments.helpers import ROOT, band, finished_runs, legend, load, mean_sd, rows, save, subplots

SKILLS = ("short", "long", "times", "words")
PART = next((a for a in sys.argv[1:] if a in PARTS), "times")  # the part read, from the command line
FOLDER = os.path.join(ROOT, "runs", PARTS[PART][0])


def curves(selection, key):
    """(evaluation steps, [seeds x evals] values of `key`, [seeds x evals] training seconds)."""
    runs = [load(d)[1] for d in finished_runs(FOLDER, selection)]
    values = np.array([[r[key] for r in evals] for evals in runs])
    seconds = np.array([[r["time/train_elapsed"] for r in evals] for evals in runs])
    return np.array([r["step"] for r in runs[0]]), values, seconds


def rows_of(selection):
    """Every metrics.jsonl row (training, evaluation and store rows) of each finished run of a selection."""
    return [rows(d) for d in finished_runs(FOLDER, selection)]


def total(selection, key):
    """Mean over seeds of the sum of `key` over a run's rows (e.g. seconds of scoring)."""
    return float(np.mean([sum(r.get(key, 0) for r in rows) for rows in rows_of(selection)]))


def trailing_mean(values, window):
    """Each evaluation replaced by the mean of it and the window - 1 before it (fewer at the start)."""
    return np.array([values[..., max(0, i - window + 1) : i + 1].mean(-1) for i in range(values.shape[-1])]).T


def first_reach(steps, seconds, curve, target):
    hit = np.nonzero(curve >= target - 1e-9)[0]
    return (int(steps[hit[0]]), float(seconds[hit[0]])) if len(hit) else None


def reach_table(metric, window=3):
    """The paper's metric twice: on the mean curve as measured, and on its trailing mean over `window`
    evaluations (the target skill has few test prompts, so one evaluation is noisy)."""
    steps, full, _ = curves("full", metric)
    targets = full[:, -1].mean(), trailing_mean(full, window)[:, -1].mean()
    half = steps > steps[-1] / 2
    print(f"metric {metric}; target = full GRPO's mean final value {targets[0]:.3f}; on the trailing mean over"
          f" {window} evaluations {targets[1]:.3f}\n")  # fmt: skip
    print(f"| selection | seeds | final (mean +- sd over seeds) | mean of the evaluations after step {steps[-1] // 2}"
          f" | mean curve | first step at target: as measured (train s) | on the {window}-evaluation mean (train s)"
          " | scoring s in all | store s (once, before training) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    reached = {}
    for selection in SELECTIONS:
        steps, values, seconds = curves(selection, metric)
        curves_ = (values.mean(0), trailing_mean(values, window).mean(0))
        reached[selection] = [first_reach(steps, seconds.mean(0), c, t) for c, t in zip(curves_, targets)]
        at = " | ".join(f"{r[0]} ({r[1]:.0f})" if r else "not reached" for r in reached[selection])
        print(f"| {selection} | {len(values)} | {mean_sd(values[:, -1])} | {mean_sd(values[:, half].mean(1))}"
              f" | {' '.join(f'{v:.2f}' for v in curves_[0])} | {at} | {total(selection, 'time/score'):.0f}"
              f" | {total(selection, 'time/store'):.0f} |")  # fmt: skip
    for selection in SELECTIONS[1:]:
        for reading, mine, full_ in zip(("as measured", f"{window}-evaluation mean"), reached[selection],
                                        reached["full"]):  # fmt: skip
            if mine and full_:
                print(f"{selection}, {reading}: {full_[0] / mine[0]:.2f}x fewer steps than full,"
                      f" {full_[1] / mine[1]:.2f}x fewer training seconds")  # fmt: skip
            else:
                print(f"{selection}, {reading}: does not reach the target")


def overall_table():
    print("\nheld-out accuracy on the first --eval-prompts test prompts at the end (mean +- sd over seeds):\n")
    print("| selection | sampled | greedy | unfaithful among correct | " + " | ".join(SKILLS) + " |")
    print("|---|---|---|---|" + "---|" * len(SKILLS))
    for selection in SELECTIONS:
        final = lambda key, s=selection: curves(s, key)[1][:, -1]
        skills = " | ".join(f"{final(f'eval/acc_sampled/{s}').mean():.2f}" for s in SKILLS)
        print(f"| {selection} | {mean_sd(final('eval/acc_sampled'))} | {mean_sd(final('eval/acc_greedy'))}"
              f" | {final('eval/unfaithful_sampled').mean():.3f} | {skills} |")  # fmt: skip


def share_table():
    pool = [r["select/target_share_pool"] for rows in rows_of("cropi") for r in rows if "select/target_share_pool" in r]
    print(f"\nthe target skill's share of each stage's selection (mean over seeds; pool: {np.mean(pool):.3f}):\n")
    print("| selection | " + " | ".join(f"stage {s}" for s in range(6)) + " |\n|---|" + "---|" * 6)
    for selection in SELECTIONS:
        shares = np.array([[r["select/target_share"] for r in rows if "select/target_share" in r]
                           for rows in rows_of(selection)])  # fmt: skip
        print(f"| {selection} | " + " | ".join(f"{v:.3f}" for v in shares.mean(0)) + " |")


def plot():
    fig, axes = subplots(1, 3, figsize=(15, 4))
    panels = (("eval_target/acc_sampled", f"target skill `{PARTS[PART][1]}`: held-out accuracy, sampled"),
              ("eval/acc_sampled", "all skills: held-out accuracy, sampled"))  # fmt: skip
    for ax, (key, label) in zip(axes, panels):
        for selection in SELECTIONS:
            steps, values, _ = curves(selection, key)
            band(ax, steps, values, selection, alpha=0.15)
        ax.set(xlabel="GRPO step (6 stages x 16)", ylabel=label)
        ax.grid(alpha=0.3)
        legend(ax, loc="upper left" if key.startswith("eval_target") else "lower right")
    for selection in SELECTIONS:
        shares = np.array([[r["select/target_share"] for r in rows if "select/target_share" in r]
                           for rows in rows_of(selection)])  # fmt: skip
        axes[2].plot(range(shares.shape[1]), shares.mean(0), "o-", lw=2, label=selection)
    pool = np.mean([r["select/target_share_pool"] for rows in rows_of("cropi") for r in rows
                    if "select/target_share_pool" in r])  # fmt: skip
    axes[2].axhline(pool, color="gray", ls="--", label="share of the pool")
    axes[2].set(xlabel="stage", ylabel="target skill's share of the stage's selection", ylim=(0, None))
    axes[2].grid(alpha=0.3)
    axes[2].legend(title="mean over seeds", title_fontsize=7, fontsize=7, loc="lower right")
    save(fig, "cropi_compare.png" if PART == "words" else f"cropi_{PART}.png")


if __name__ == "__main__":
    argv = sys.argv[1:]
    metric = argv[argv.index("--metric") + 1] if "--metric" in argv else "eval_target/acc_sampled"
    if not all(finished_runs(FOLDER, s) for s in SELECTIONS):
        sys.exit(f"not every selection has a finished run yet: python -m experiments.cropi_compare {PART}")
    reach_table(metric)
    overall_table()
    share_table()
    plot()
