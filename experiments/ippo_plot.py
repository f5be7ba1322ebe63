"""Mean over seeds, with a band of one standard deviation, of the held-out sampled accuracy and of the
unfaithful share among correct held-out answers, per arm of experiments/ippo_compare5.py.

    python experiments/ippo_plot.py     # docs/ippo_compare.png
"""

import glob
import os

import matplotlib
import numpy as np
from run_metrics import load

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {"ppo": "PPO (--no-influence)", "ippo": "I-PPO", "filter": "I-PPO filter-only (--no-reweight)"}


def curves(arm, key):
    runs = [load(d)[1] for d in sorted(glob.glob(os.path.join(ROOT, "runs", "ippo_compare", f"{arm}_s*")))]
    return np.array([r["step"] for r in runs[0]]), np.array([[r[key] for r in evals] for evals in runs])


def main():
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("eval/acc_sampled", "eval/unfaithful_sampled"),
                              ("held-out accuracy, sampled", "unfaithful share among correct answers")):  # fmt: skip
        for arm, name in ARMS.items():
            steps, values = curves(arm, key)
            mean, sd = values.mean(0), values.std(0)
            ax.plot(steps, mean, lw=2, label=f"{name} ({len(values)} seeds)")
            ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
        ax.set(xlabel="PPO iteration (one rollout buffer, 4 epochs x 4 mini-batches)", ylabel=label, ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = os.path.join(ROOT, "docs", "ippo_compare.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
