"""The tables and figures of experiments/dppo_compare.py from its run folders (runs/dppo_quantized,
runs/dppo_mismatch, runs/dppo_mismatch_fast, runs/dppo_topk); a part without finished runs is left out.

    python -m experiments.dppo_report     # the tables; docs/dppo_quantized.png, dppo_mismatch.png, dppo_topk.png

A run counts as collapsed when its final held-out sampled accuracy is below 0.4: far below where it started
(0.51-0.60; the evaluation's samples depend on the seed). Every other value is a mean over seeds; |pi - mu| and
the masked shares are means over all training steps, the masked share of A > 0 (A < 0) tokens among the A > 0
(A < 0) tokens. The figures: under the 3-bit sampler every seed's curve per trust region (a collapse is one
seed's fall, which a band over seeds would hide); elsewhere the mean over seeds with a band of one standard
deviation.
"""

import os

import numpy as np

from experiments import dppo_compare
from experiments.helpers import ROOT, band, finished_runs, legend, load, save, subplots, window_mean

COLLAPSE_BELOW = 0.4
# the arms' names, from the commands that ran them
MISMATCH, QUANTIZED, TOPK = map(tuple, (dppo_compare.MISMATCH, dppo_compare.QUANTIZED, dppo_compare.TOPK))


def per_run(run_dir):
    train, evals = load(run_dir)
    mean = lambda key: float(np.mean([r[key] for r in train]))
    return {
        "start": evals[0]["eval/acc_sampled"], "final": evals[-1]["eval/acc_sampled"],
        "best": max(e["eval/acc_sampled"] for e in evals), "greedy": evals[-1]["eval/acc_greedy"],
        "unfaithful": evals[-1]["eval/unfaithful_sampled"],
        "first_below": next((e["step"] for e in evals if e["eval/acc_sampled"] < COLLAPSE_BELOW), None),
        "pi_mu": mean("trust_region/abs_pi_mu"),
        "pi_mu_first": window_mean(train, "trust_region/abs_pi_mu", "first"),
        "pi_mu_last": window_mean(train, "trust_region/abs_pi_mu", "last"),
        "masked": mean("trust_region/masked_frac"), "masked_pos": mean("trust_region/masked_frac_pos"),
        "masked_neg": mean("trust_region/masked_frac_neg"), "reward_last": window_mean(train, "reward/mean", "last"),
        "update_s": mean("time/update"), "peak_gb": max(r["memory/peak_gb"] for r in train),
        "topk_mb": mean("memory/topk_mb"),
    }  # fmt: skip


def table(folder, arms):
    print("| trust region | seeds | collapsed (final < 0.4) | first step below 0.4 (per seed) | ended below its start"
          " | final acc, sampled, mean +- sd (per seed) | best acc | final greedy"
          " | unfaithful among correct | mean abs(pi-mu): all (first 20% -> last 20%) | masked: all / A>0 / A<0"
          " | reward, last 20% | update s/step | top-K MB/step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arm in arms:
        runs = [per_run(d) for d in finished_runs(folder, arm)]
        if not runs:
            print(f"| {arm} | 0 |" + " |" * 12)
            continue
        m = {k: np.mean([r[k] for r in runs]) for k in runs[0] if k != "first_below"}
        first_below = ", ".join(str(r["first_below"]) if r["first_below"] is not None else "-" for r in runs)
        collapsed = sum(r["final"] < COLLAPSE_BELOW for r in runs)
        sd = np.std([r["final"] for r in runs])
        finals = ", ".join(f"{r['final']:.2f}" for r in runs)
        below = sum(r["final"] < r["start"] for r in runs)
        print(f"| {arm} | {len(runs)} | {collapsed} of {len(runs)} | {first_below} | {below}"
              f" | {m['final']:.3f} +- {sd:.3f} ({finals}) | {m['best']:.3f}"
              f" | {m['greedy']:.3f} | {m['unfaithful']:.3f} | {m['pi_mu']:.4f} ({m['pi_mu_first']:.4f} ->"
              f" {m['pi_mu_last']:.4f}) | {m['masked']:.4f} / {m['masked_pos']:.4f} / {m['masked_neg']:.4f}"
              f" | {m['reward_last']:.3f} | {m['update_s']:.3f} | {m['topk_mb']:.2f} |")  # fmt: skip


def mean_curves(folder, arms):
    print("\nmean held-out sampled accuracy over seeds, by evaluation step:\n")
    steps = [r["step"] for r in load(finished_runs(folder, arms[0])[0])[1]]
    print("| trust region | " + " | ".join(str(s) for s in steps) + " |\n|---|" + "---|" * len(steps))
    for arm in arms:
        values = np.array([[r["eval/acc_sampled"] for r in load(d)[1]] for d in finished_runs(folder, arm)])
        if len(values):
            print(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in values.mean(0)) + " |")


def accuracy(ax, folder, arms):
    for arm in arms:
        evals = [load(d)[1] for d in finished_runs(folder, arm)]
        band(ax, [r["step"] for r in evals[0]], np.array([[r["eval/acc_sampled"] for r in e] for e in evals]), arm,
             alpha=0.15)  # fmt: skip
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
    fig, axes = subplots(2, 3, figsize=(14, 8))
    for ax, arm in zip(axes.flat, QUANTIZED):
        every_seed(ax, folder, arm)
    drift(axes.flat[-1], folder, QUANTIZED)
    fig.suptitle("sampler: the policy with its weights rounded to 3 bits; 4 optimizer steps per rollout batch,"
                 " lr 4e-5", fontsize=10)  # fmt: skip
    save(fig, "dppo_quantized.png")


def figures():
    made = lambda name: finished_runs(os.path.join(ROOT, "runs", name), "binary-tv")  # a figure per part that ran
    if made("dppo_quantized"):
        quantized()
    if made("dppo_mismatch") and made("dppo_mismatch_fast"):
        fig, axes = subplots(2, 2, figsize=(11, 8))
        for row, (name, lr) in enumerate((("dppo_mismatch", "1e-4"), ("dppo_mismatch_fast", "1.5e-4"))):
            folder = os.path.join(ROOT, "runs", name)
            accuracy(axes[row, 0], folder, MISMATCH)
            drift(axes[row, 1], folder, MISMATCH)
            axes[row, 0].set_title(f"lr {lr}", fontsize=10)
        fig.suptitle("sampler T = 0.6, trainer T = 1, 8 optimizer steps per rollout batch", fontsize=10)
        save(fig, "dppo_mismatch.png")
    if made("dppo_topk"):
        fig, ax = subplots(figsize=(6, 4))
        accuracy(ax, os.path.join(ROOT, "runs", "dppo_topk"), TOPK)
        ax.set_title("no mismatch, the defaults (4 optimizer steps per batch, lr 5e-5)", fontsize=10)
        save(fig, "dppo_topk.png")


if __name__ == "__main__":
    parts = (("dppo_quantized", QUANTIZED), ("dppo_mismatch", MISMATCH), ("dppo_mismatch_fast", MISMATCH),
             ("dppo_topk", TOPK))  # fmt: skip
    for name, arms in parts:
        folder = os.path.join(ROOT, "runs", name)
        if not any(finished_runs(folder, arm) for arm in arms):
            print(f"{name}: no finished runs yet\n")
            continue
        print(f"## {name}\n")
        table(folder, arms)
        mean_curves(folder, arms)
        print()
    figures()
