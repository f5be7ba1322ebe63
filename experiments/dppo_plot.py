"""Mean over seeds, with a band of one standard deviation, per trust region of experiments/dppo_compare.py.

    python experiments/dppo_plot.py     # docs/dppo_mismatch.png (accuracy, |pi - mu|; two lr), docs/dppo_topk.png
"""

import os

import numpy as np
from dppo_summary import MISMATCH, ROOT, TOPK
from plots import band, legend, plt, save
from run_metrics import finished_runs, load


def accuracy(ax, folder, arms):
    for arm in arms:
        evals = [load(d)[1] for d in finished_runs(folder, arm)]
        band(ax, [r["step"] for r in evals[0]], np.array([[r["eval/acc_sampled"] for r in e] for e in evals]), arm,
             alpha=0.15)
    ax.set(xlabel="training step (one rollout batch each)", ylabel="held-out accuracy, sampled", ylim=(0, 1))
    ax.grid(alpha=0.3)
    legend(ax, loc="lower left")


def drift(ax, folder, arms, smooth=10):
    for arm in arms:
        train = [load(d)[0] for d in finished_runs(folder, arm)]
        values = np.array([[r["dppo/abs_pi_mu"] for r in t] for t in train])
        kernel = np.ones(smooth) / smooth  # a running mean over `smooth` steps, per seed
        values = np.array([np.convolve(v, kernel, mode="valid") for v in values])
        band(ax, np.arange(values.shape[1]) + smooth, values, arm, alpha=0.15)
    ax.set(xlabel="training step", ylabel=f"mean |pi - mu| per token ({smooth}-step running mean)")
    ax.grid(alpha=0.3)
    legend(ax, loc="upper left")


def main():
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, (name, lr) in enumerate((("dppo_mismatch", "1e-4"), ("dppo_mismatch_fast", "1.5e-4"))):
        folder = os.path.join(ROOT, "runs", name)
        accuracy(axes[row, 0], folder, MISMATCH)
        drift(axes[row, 1], folder, MISMATCH)
        axes[row, 0].set_title(f"lr {lr}", fontsize=10)
    fig.suptitle("sampler T = 0.6, trainer T = 1, 8 optimizer steps per rollout batch", fontsize=10)
    save(fig, "dppo_mismatch.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    accuracy(ax, os.path.join(ROOT, "runs", "dppo_topk"), TOPK)
    ax.set_title("no mismatch, the defaults (4 optimizer steps per batch, lr 5e-5)", fontsize=10)
    save(fig, "dppo_topk.png")


if __name__ == "__main__":
    main()
