"""The figures of experiments/dppo_compare.py: under the 3-bit sampler every seed's curve per trust region (a
collapse is one seed's fall, which a band over seeds would hide); elsewhere the mean over seeds with a band of
one standard deviation.

    python experiments/dppo_plot.py     # docs/dppo_quantized.png, docs/dppo_mismatch.png, docs/dppo_topk.png
"""

import os

import numpy as np
from dppo_summary import COLLAPSE_BELOW, MISMATCH, QUANTIZED, ROOT, TOPK
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
        values = np.array([[r["trust_region/abs_pi_mu"] for r in t] for t in train])
        kernel = np.ones(smooth) / smooth  # a running mean over `smooth` steps, per seed
        values = np.array([np.convolve(v, kernel, mode="valid") for v in values])
        band(ax, np.arange(values.shape[1]) + smooth, values, arm, alpha=0.15)
    ax.set(xlabel="training step", ylabel=f"mean |pi - mu| per token ({smooth}-step running mean)")
    ax.grid(alpha=0.3)
    legend(ax, loc="upper left")


def every_seed(ax, folder, arm):
    """Each seed's held-out sampled accuracy, the collapse line, and how many seeds end below it."""
    evals = [load(d)[1] for d in finished_runs(folder, arm)]
    finals = [e[-1]["eval/acc_sampled"] for e in evals]
    for e in evals:
        ax.plot([r["step"] for r in e], [r["eval/acc_sampled"] for r in e], lw=1, alpha=0.7)
    ax.axhline(COLLAPSE_BELOW, color="gray", ls="--", label=f"collapse: final < {COLLAPSE_BELOW}")
    ax.set(title=f"{arm}: {sum(f < COLLAPSE_BELOW for f in finals)} of {len(evals)} collapsed", ylim=(0, 1),
           xlabel="training step", ylabel="held-out accuracy, sampled")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(title="one line per seed", title_fontsize=7, fontsize=7, loc="lower left")


def quantized():
    folder = os.path.join(ROOT, "runs", "dppo_quantized")
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for ax, arm in zip(axes.flat, QUANTIZED):
        every_seed(ax, folder, arm)
    drift(axes.flat[-1], folder, QUANTIZED)
    fig.suptitle("sampler: the policy with its weights rounded to 3 bits; 4 optimizer steps per rollout batch,"
                 " lr 4e-5", fontsize=10)  # fmt: skip
    save(fig, "dppo_quantized.png")


def main():
    made = lambda name: finished_runs(os.path.join(ROOT, "runs", name), "binary-tv")  # noqa: E731  (a figure per part that ran)
    if made("dppo_quantized"):
        quantized()
    if made("dppo_mismatch") and made("dppo_mismatch_fast"):
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for row, (name, lr) in enumerate((("dppo_mismatch", "1e-4"), ("dppo_mismatch_fast", "1.5e-4"))):
            folder = os.path.join(ROOT, "runs", name)
            accuracy(axes[row, 0], folder, MISMATCH)
            drift(axes[row, 1], folder, MISMATCH)
            axes[row, 0].set_title(f"lr {lr}", fontsize=10)
        fig.suptitle("sampler T = 0.6, trainer T = 1, 8 optimizer steps per rollout batch", fontsize=10)
        save(fig, "dppo_mismatch.png")
    if made("dppo_topk"):
        fig, ax = plt.subplots(figsize=(6, 4))
        accuracy(ax, os.path.join(ROOT, "runs", "dppo_topk"), TOPK)
        ax.set_title("no mismatch, the defaults (4 optimizer steps per batch, lr 5e-5)", fontsize=10)
        save(fig, "dppo_topk.png")


if __name__ == "__main__":
    main()
