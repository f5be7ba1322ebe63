"""Summarise DPPO comparison runs as a markdown table, one row per group of seeds.

    python experiments/dppo_summary.py 'none=runs/dppo_none_s*' 'binary-tv=runs/dppo_tv_s*' ...

Every value is the mean over the group's runs (seeds); final accuracy also lists each seed.
"""

import glob
import sys

import numpy as np
from run_metrics import load, window_mean


def summarise(runs):
    per_run = []
    for d in runs:
        train, evals = load(d)
        per_run.append({
            "final": evals[-1]["eval/acc_sampled"],
            "best": max(e["eval/acc_sampled"] for e in evals),
            "pi_mu_first": window_mean(train, "dppo/abs_pi_mu", "first"),
            "pi_mu_last": window_mean(train, "dppo/abs_pi_mu", "last"),
            "pi_mu_all": np.mean([r["dppo/abs_pi_mu"] for r in train]),
            "masked": np.mean([r["dppo/masked_frac"] for r in train]),
            "masked_pos": np.mean([r["dppo/masked_frac_pos"] for r in train]),
            "masked_neg": np.mean([r["dppo/masked_frac_neg"] for r in train]),
            "reward_last": window_mean(train, "reward/mean", "last"),
            "reward_min": min(r["reward/mean"] for r in train),
            "update_s": np.mean([r["time/update"] for r in train]),
            "peak_gb": max(r["memory/peak_gb"] for r in train),
            "topk_mb": np.mean([r["memory/topk_mb"] for r in train]),
        })  # fmt: skip
    return {k: np.mean([r[k] for r in per_run]) for k in per_run[0]}, [r["final"] for r in per_run]


def main(argv):
    print(
        "| run | seeds | final acc (per seed) | best acc | mean abs(pi-mu): all (first 20% -> last 20%) "
        "| masked: all / A>0 / A<0 | reward last 20% (min) | update s/step | peak GB | top-K MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for group in argv:
        label, pattern = group.split("=", 1)
        runs = sorted(glob.glob(pattern))
        m, finals = summarise(runs)
        print(f"| {label} | {len(runs)} | {m['final']:.3f} ({', '.join(f'{f:.3f}' for f in finals)}) | {m['best']:.3f}"
              f" | {m['pi_mu_all']:.4f} ({m['pi_mu_first']:.4f} -> {m['pi_mu_last']:.4f})"
              f" | {m['masked']:.4f} / {m['masked_pos']:.4f} / {m['masked_neg']:.4f}"
              f" | {m['reward_last']:.3f} ({m['reward_min']:.3f}) | {m['update_s']:.3f} | {m['peak_gb']:.2f}"
              f" | {m['topk_mb']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
