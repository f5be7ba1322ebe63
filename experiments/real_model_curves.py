"""The curves of real-model runs: held-out accuracy and the share of completions in the asked form, sampled and
greedy, against the step, one colour per run (e.g. one per seed).

    python -m experiments.real_model_curves docs/real_models_lora.png runs/real/final/lora_s1 runs/real/final/lora_s2
"""

import os
import sys

from experiments.helpers import load, subplots


def main(out: str, *run_dirs: str):
    fig, (acc, form) = subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for run_dir, colour in zip(run_dirs, ("C0", "C1", "C2", "C3")):
        _, evals = load(run_dir)
        steps, name = [r["step"] for r in evals], os.path.basename(run_dir)
        for ax, key in ((acc, "eval/acc"), (form, "eval/format_frac")):
            ax.plot(steps, [r[f"{key}_sampled"] for r in evals], "-", color=colour, lw=2, label=f"{name}, sampled")
            ax.plot(steps, [r[f"{key}_greedy"] for r in evals], "--", color=colour, lw=1, label=f"{name}, greedy")
    acc.set(title="held-out accuracy (--reward strict)", xlabel="training step", ylim=(0, 1.02))
    form.set(title="held-out completions in the asked form (#### n)", xlabel="training step", ylim=(0, 1.02))
    for ax in (acc, form):
        ax.grid(alpha=0.3)
        ax.legend(title="one curve per run", title_fontsize=7, fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
