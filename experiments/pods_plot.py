"""Mean held-out accuracy over seeds, with a band of one standard deviation, per arm of
experiments/pods_compare.py: against optimizer steps and against training seconds.

    python experiments/pods_plot.py     # docs/pods_compare_steps.png and docs/pods_compare_seconds.png
"""

import os

import matplotlib
from pods_summary import ARMS, ROOT, curves

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"grpo": "GRPO, n = m = 8", "pods": "PODS, n = 32, m = 8, max-variance", "random": "n = 32, m = 8, random"}


def plot(x_of, xlabel, out):
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in ARMS:
        steps, acc, seconds = curves(arm)
        x = steps if x_of == "steps" else seconds.mean(0)
        mean, sd = acc.mean(0), acc.std(0)
        ax.plot(x, mean, lw=2, label=f"{LABELS[arm]} ({len(acc)} seeds)")
        ax.fill_between(x, mean - sd, mean + sd, alpha=0.2)
    ax.set(xlabel=xlabel, ylabel="held-out accuracy, sampled", ylim=(0.4, 0.85))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    plot("steps", "optimizer step (one rollout batch each)", os.path.join(ROOT, "docs", "pods_compare_steps.png"))
    plot("seconds", "training seconds (2 CPU cores, two runs at a time)",
         os.path.join(ROOT, "docs", "pods_compare_seconds.png"))
