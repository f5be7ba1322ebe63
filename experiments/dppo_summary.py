"""The tables of experiments/dppo_compare.py from its run folders (runs/dppo_quantized, runs/dppo_mismatch,
runs/dppo_mismatch_fast, runs/dppo_topk).

    python experiments/dppo_summary.py

A run counts as collapsed when its final held-out sampled accuracy is below 0.4: far below where it started
(0.51-0.60; the evaluation's samples depend on the seed). Every other value is a mean over seeds; |pi - mu| and
the masked shares are means over all training steps, the masked share of A > 0 (A < 0) tokens among the A > 0
(A < 0) tokens.
"""

import os

import dppo_compare
import numpy as np
from run_metrics import finished_runs, load, window_mean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLAPSE_BELOW = 0.4
# the arms' names, from the commands that ran them
MISMATCH, QUANTIZED, TOPK = map(tuple, (dppo_compare.MISMATCH, dppo_compare.QUANTIZED, dppo_compare.TOPK))


def per_run(run_dir):
    train, evals = load(run_dir)
    mean = lambda key: float(np.mean([r[key] for r in train]))  # noqa: E731
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
          " | reward, last 20% | update s/step | top-K MB/step |")
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
