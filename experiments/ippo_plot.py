"""Mean over seeds, with a band of one standard deviation, of the held-out sampled accuracy and of the
unfaithful share among correct held-out answers, per arm of experiments/ippo_compare5.py.

    python experiments/ippo_plot.py     # docs/ippo_compare.png
"""

import os

import numpy as np
from plots import ROOT, band, legend, plt, save
from run_metrics import finished_runs, load

ARMS = {"ppo": "PPO (--no-influence)", "ippo": "I-PPO", "filter": "I-PPO filter-only (--no-reweight)"}


def curves(arm, key):
    runs = [load(d)[1] for d in finished_runs(os.path.join(ROOT, "runs", "ippo_compare"), arm)]
    return np.array([r["step"] for r in runs[0]]), np.array([[r[key] for r in evals] for evals in runs])


def main():
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("eval/acc_sampled", "eval/unfaithful_sampled"),
                              ("held-out accuracy, sampled", "unfaithful share among correct answers")):  # fmt: skip
        for arm, name in ARMS.items():
            band(ax, *curves(arm, key), name)
        ax.set(xlabel="PPO iteration (one rollout buffer, 4 epochs x 4 mini-batches)", ylabel=label, ylim=(0, 1))
        ax.grid(alpha=0.3)
        legend(ax, loc="lower right" if key == "eval/acc_sampled" else "upper right")
    save(fig, "ippo_compare.png")


if __name__ == "__main__":
    main()
