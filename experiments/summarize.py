"""The PODS paper's speed-up metric from run folders.

Mean held-out accuracy curve over seeds against training time; threshold = 0.99 x the baseline's peak;
speed-up = time(baseline reaches it) / time(method reaches it).

    python experiments/summarize.py runs/grpo_s* -- runs/pods_s* [--metric eval/acc_sampled]
"""

import json
import sys

import numpy as np


def curve(run_dir, metric):
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    evals = [(r["time/train_elapsed"], r[metric]) for r in rows if metric in r]
    return np.array([t for t, _ in evals]), np.array([a for _, a in evals])


def mean_curve(run_dirs, metric, grid):
    """Accuracy of each run as a step function of time (last evaluation so far), averaged over runs."""
    values = []
    for d in run_dirs:
        t, a = curve(d, metric)
        values.append(a[np.clip(np.searchsorted(t, grid, side="right") - 1, 0, None)])
    return np.mean(values, 0)


def first_time(grid, acc, threshold):
    hit = np.nonzero(acc >= threshold)[0]
    return grid[hit[0]] if len(hit) else float("inf")


def main(argv):
    metric = "eval/acc_sampled"
    if "--metric" in argv:
        metric = argv[argv.index("--metric") + 1]
        argv = argv[: argv.index("--metric")]
    split = argv.index("--")
    base, method = argv[:split], argv[split + 1 :]
    end = min(curve(d, metric)[0][-1] for d in base + method)
    grid = np.linspace(0, end, 2001)
    base_acc, method_acc = mean_curve(base, metric, grid), mean_curve(method, metric, grid)
    finals = lambda runs: [round(float(curve(d, metric)[1][-1]), 3) for d in runs]
    print(f"metric {metric}, common training-time budget {end:.0f}s")
    print(f"baseline: start {base_acc[0]:.3f} peak {base_acc.max():.3f} final per seed {finals(base)}")
    print(f"method:   start {method_acc[0]:.3f} peak {method_acc.max():.3f} final per seed {finals(method)}")
    print(
        "mean curves (time: baseline / method): "
        + ", ".join(f"{grid[i]:.0f}s: {base_acc[i]:.3f} / {method_acc[i]:.3f}" for i in range(0, len(grid), 200))
    )
    for fraction in (0.99, 0.95, 0.9):  # 0.99 is the paper's; the others show how much rests on one noisy peak
        threshold = fraction * base_acc.max()
        t_base, t_method = first_time(grid, base_acc, threshold), first_time(grid, method_acc, threshold)
        print(
            f"threshold {fraction} x baseline peak = {threshold:.3f}: baseline reaches it at {t_base:.0f}s, "
            f"method at {t_method:.0f}s -> speed-up {t_base / t_method:.2f}x"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
