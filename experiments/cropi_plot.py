"""Mean over seeds, with a band of one standard deviation, per selection of one part of
experiments/cropi_compare.py: the target skill's held-out accuracy, the overall held-out accuracy, and the
target skill's share of each stage's selection.

    python experiments/cropi_plot.py times     # docs/cropi_times.png
    python experiments/cropi_plot.py words     # docs/cropi_compare.png
"""

import numpy as np
from cropi_compare import PARTS
from cropi_summary import PART, SELECTIONS, curves, rows_of
from plots import band, legend, plt, save


def main():
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("eval_target/acc_sampled", f"target skill `{PARTS[PART][1]}`: held-out accuracy, sampled"),
              ("eval/acc_sampled", "all skills: held-out accuracy, sampled"))  # fmt: skip
    for ax, (key, label) in zip(axes, panels):
        for selection in SELECTIONS:
            steps, values, _ = curves(selection, key)
            band(ax, steps, values, selection, alpha=0.15)
        ax.set(xlabel="GRPO step (6 stages x 16)", ylabel=label)
        ax.grid(alpha=0.3)
        legend(ax, loc="upper left" if key.startswith("eval_target") else "lower right")
    for selection in SELECTIONS:
        shares = np.array([[r["select/target_share"] for r in rows if "select/target_share" in r]
                           for rows in rows_of(selection)])  # fmt: skip
        axes[2].plot(range(shares.shape[1]), shares.mean(0), "o-", lw=2, label=selection)
    pool = np.mean([r["select/target_share_pool"] for rows in rows_of("cropi") for r in rows
                    if "select/target_share_pool" in r])  # fmt: skip
    axes[2].axhline(pool, color="gray", ls="--", label="share of the pool")
    axes[2].set(xlabel="stage", ylabel="target skill's share of the stage's selection", ylim=(0, None))
    axes[2].grid(alpha=0.3)
    axes[2].legend(title="mean over seeds", title_fontsize=7, fontsize=7, loc="lower right")
    save(fig, "cropi_compare.png" if PART == "words" else f"cropi_{PART}.png")


if __name__ == "__main__":
    main()
