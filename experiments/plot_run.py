"""Held-out accuracy of one run against its steps: overall (sampled and greedy) and sampled per skill. One
run, so no band; the legend sits right of the axes, clear of the curves.

    python experiments/plot_run.py runs/pods__s1__... docs/pods_default.png ["python pods.py, seed 1"]
"""

import os
import sys

from plots import plt
from run_metrics import load


def main(run_dir: str, out: str, title: str = ""):
    _, evals = load(run_dir)
    steps = [row["step"] for row in evals]
    fig, ax = plt.subplots(figsize=(8.5, 4))
    ax.plot(steps, [r["eval/acc_sampled"] for r in evals], "k-", lw=2.5, label="all skills, sampled")
    ax.plot(steps, [r["eval/acc_greedy"] for r in evals], "k--", lw=1.5, label="all skills, greedy")
    for key in sorted(k for k in evals[0] if k.startswith("eval/acc_sampled/")):
        ax.plot(steps, [r[key] for r in evals], lw=1, marker=".", label=key.split("/")[-1] + ", sampled")
    ax.set(xlabel="training step (one rollout batch each)", ylabel="held-out accuracy", ylim=(0, 1.02))
    ax.set_title(title or os.path.basename(run_dir))
    ax.grid(alpha=0.3)
    ax.legend(title="one run, no band", title_fontsize=8, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
