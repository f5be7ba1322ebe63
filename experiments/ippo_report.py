"""The tables of ippo.py runs, one row per group of seeds, and the figure of experiments/ippo_compare.py.

    python -m experiments.ippo_report     # the three arms of ippo_compare: the tables and docs/ippo_compare.png
    python -m experiments.ippo_report 'PPO=runs/ippo_ppo_s*' 'I-PPO=runs/ippo_ippo_s*'     # other groups: LABEL=GLOB

"first" and "last" are the first and last 20% of each run's training iterations. Values are means over the
group's runs (seeds); final accuracy and the early stop are also listed per seed. The figure, drawn when every
arm of ippo_compare has a finished run: the mean over seeds, with a band of one standard deviation, of the
held-out sampled accuracy and of the unfaithful share among correct held-out answers, per arm.
"""

import glob
import os
import sys

import numpy as np

from experiments.helpers import ROOT, band, finished_runs, legend, load, save, subplots, window_mean

COMPARE = os.path.join(ROOT, "runs", "ippo_compare")
GROUPS = {"PPO": "ppo", "I-PPO": "ippo", "filter-only": "filter"}  # the tables' groups when none are given
LABELS = {"ppo": "PPO (--no-influence)", "ippo": "I-PPO", "filter": "I-PPO filter-only (--no-reweight)"}


def run_summary(run_dir):
    train, evals = load(run_dir)
    mean = lambda key: float(np.mean([r[key] for r in train if key in r])) if any(key in r for r in train) else 0.0
    stop = [r["step"] for r in train if r.get("influence/early_stop")]
    weights = [r["influence/max_weight"] for r in train if "influence/max_weight" in r]
    return {
        "iterations": len(train),
        "final": evals[-1]["eval/acc_sampled"],
        "greedy_start": evals[0]["eval/acc_greedy"],
        "greedy": evals[-1]["eval/acc_greedy"],
        "max_weight": max(weights, default=1.0),
        "median_weight": float(np.median(weights or [1.0])),
        "best": max(e["eval/acc_sampled"] for e in evals),
        "eval_unf_start": evals[0]["eval/unfaithful_sampled"],
        "eval_unf_final": evals[-1]["eval/unfaithful_sampled"],
        "eval_unf_mean": float(np.mean([e["eval/unfaithful_sampled"] for e in evals[1:]])),
        "train_unf_first": window_mean(train, "train/unfaithful", "first"),
        "train_unf_last": window_mean(train, "train/unfaithful", "last"),
        "kept_first": window_mean(train, "influence/kept_frac", "first") if "influence/kept_frac" in train[0] else 1.0,
        "kept_last": window_mean(train, "influence/kept_frac", "last") if "influence/kept_frac" in train[0] else 1.0,
        "dropped_correct": mean("influence/dropped_correct"),
        "dropped_unfaithful": mean("influence/dropped_correct_unfaithful"),
        "dropped_faithful": mean("influence/dropped_correct_faithful"),
        "dropped_wrong": mean("influence/dropped_wrong"),
        "generate": mean("time/generate"),
        "advantage": mean("time/advantage"),
        "influence": mean("time/influence"),
        "update": mean("time/update"),
        "update_first": window_mean(train, "time/update", "first"),
        "update_last": window_mean(train, "time/update", "last"),
        "stop": stop[0] if stop else None,
        "curve": [(e["step"], e["eval/acc_sampled"]) for e in evals],
    }


def tables(argv):
    groups = []
    for group in argv:
        label, pattern = group.split("=", 1)
        runs = sorted(glob.glob(pattern))
        if not runs:
            sys.exit(f"error: no run folder matches {pattern}")
        groups.append((label, [run_summary(d) for d in runs]))
    m = lambda rs, k: float(np.mean([r[k] for r in rs]))
    print(
        "| run | seeds | iterations | final held-out acc (per seed) | best | held-out unfaithful among correct:"
        " start -> final (mean over evals) | training unfaithful: first 20% -> last 20% | kept fraction:"
        " first -> last | early stop (per seed) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, rs in groups:
        finals = ", ".join(f"{r['final']:.3f}" for r in rs)
        stops = ", ".join("none" if r["stop"] is None else f"iteration {r['stop']}" for r in rs)
        print(f"| {label} | {len(rs)} | {', '.join(str(r['iterations']) for r in rs)} | {m(rs, 'final'):.3f}"
              f" ({finals}) | {m(rs, 'best'):.3f} | {m(rs, 'eval_unf_start'):.3f} -> {m(rs, 'eval_unf_final'):.3f}"
              f" ({m(rs, 'eval_unf_mean'):.3f}) | {m(rs, 'train_unf_first'):.3f} -> {m(rs, 'train_unf_last'):.3f}"
              f" | {m(rs, 'kept_first'):.3f} -> {m(rs, 'kept_last'):.3f} | {stops} |")  # fmt: skip
    print()
    print("| run | greedy acc: start -> final | largest weight per iteration: median, largest |\n|---|---|---|")
    for label, rs in groups:
        print(f"| {label} | {m(rs, 'greedy_start'):.3f} -> {m(rs, 'greedy'):.3f} | {m(rs, 'median_weight'):.1f},"
              f" {max(r['max_weight'] for r in rs):.1f} |")  # fmt: skip
    print()
    print(
        "| run | s/iteration: generate / advantage / influence / update | update s: first 20% -> last 20%"
        " | influence / update | dropped share of correct episodes (faithful / unfaithful) | dropped share of"
        " wrong episodes |"
    )
    print("|---|---|---|---|---|---|")
    for label, rs in groups:
        ratio = m(rs, "influence") / max(m(rs, "update"), 1e-9)
        print(f"| {label} | {m(rs, 'generate'):.3f} / {m(rs, 'advantage'):.3f} / {m(rs, 'influence'):.3f} /"
              f" {m(rs, 'update'):.3f} | {m(rs, 'update_first'):.3f} -> {m(rs, 'update_last'):.3f} | {ratio:.2f}"
              f" | {m(rs, 'dropped_correct'):.3f} ({m(rs, 'dropped_faithful'):.3f} / {m(rs, 'dropped_unfaithful'):.3f})"
              f" | {m(rs, 'dropped_wrong'):.3f} |")  # fmt: skip
    print()
    print("Mean held-out accuracy (eval/acc_sampled) over seeds, by iteration:")
    for label, rs in groups:
        steps = sorted({s for r in rs for s, _ in r["curve"]})
        means = [np.mean([dict(r["curve"]).get(s, r["curve"][-1][1]) for r in rs]) for s in steps]
        print(f"- {label}: " + ", ".join(f"{s}: {a:.3f}" for s, a in zip(steps, means)))


def curves(arm, key):
    runs = [load(d)[1] for d in finished_runs(COMPARE, arm)]
    return np.array([r["step"] for r in runs[0]]), np.array([[r[key] for r in evals] for evals in runs])


def plot():
    fig, axes = subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("eval/acc_sampled", "eval/unfaithful_sampled"),
                              ("held-out accuracy, sampled", "unfaithful share among correct answers")):  # fmt: skip
        for arm, name in LABELS.items():
            band(ax, *curves(arm, key), name)
        ax.set(xlabel="PPO iteration (one rollout buffer, 4 epochs x 4 mini-batches)", ylabel=label, ylim=(0, 1))
        ax.grid(alpha=0.3)
        legend(ax, loc="lower right" if key == "eval/acc_sampled" else "upper right")
    save(fig, "ippo_compare.png")


if __name__ == "__main__":
    tables(sys.argv[1:] or [f"{label}={os.path.join(COMPARE, arm)}_s*" for label, arm in GROUPS.items()])
    if all(finished_runs(COMPARE, arm) for arm in LABELS):
        plot()
    else:
        print("\nno docs/ippo_compare.png: not every arm of runs/ippo_compare has a finished run")
