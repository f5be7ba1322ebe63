"""I-PPO's claim is fewer unfaithful chains of thought at equal accuracy. A comparison at equal step count does
not test it, since the influence arms end less accurate; this one sets the unfaithful share among correct
answers against held-out accuracy, every evaluation of every seed, one curve per arm.

    python -m experiments.ippo_compare             # the runs (PPO, I-PPO, filter-only; 5 seeds, 60 iterations)
    python -m experiments.ippo_equal_accuracy      # the table below and docs/ippo_equal_accuracy.png

Prints, per band of held-out sampled accuracy, the mean unfaithful share of each arm's evaluations that fall in
it (with their count), and each arm's best and final accuracy against PPO's final one.
"""

import glob
import json
import os

from experiments.helpers import ROOT

RUNS = os.path.join(ROOT, "runs", "ippo_compare")
ARMS = {"PPO": "ppo", "I-PPO": "ippo", "filter-only": "filter"}
BANDS = [(0.50, 0.60), (0.60, 0.65), (0.65, 0.70), (0.70, 0.80)]


def evaluations(prefix: str) -> list[list[dict]]:
    """Every seed's evaluation rows (step 0 included), in step order."""
    runs = []
    for folder in sorted(glob.glob(os.path.join(RUNS, f"{prefix}_s*"))):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            runs.append([r for r in map(json.loads, f) if "eval/acc_sampled" in r])
    return runs


def main():
    arms = {name: evaluations(prefix) for name, prefix in ARMS.items()}
    print("| held-out sampled accuracy | " + " | ".join(f"{a}: unfaithful among correct (evaluations)" for a in arms)
          + " |\n|---" + "|---" * len(arms) + "|")  # fmt: skip
    for low, high in BANDS:
        cells = []
        for runs in arms.values():
            inside = [r["eval/unfaithful_sampled"] for run in runs for r in run[1:]
                      if low <= r["eval/acc_sampled"] < high]  # fmt: skip
            cells.append(f"{sum(inside) / len(inside):.3f} ({len(inside)})" if inside else "- (0)")
        print(f"| {low:.2f}-{high:.2f} | " + " | ".join(cells) + " |")
    ppo_final = sum(run[-1]["eval/acc_sampled"] for run in arms["PPO"]) / len(arms["PPO"])
    for name, runs in arms.items():
        final = sum(run[-1]["eval/acc_sampled"] for run in runs) / len(runs)
        best = [max(r["eval/acc_sampled"] for r in run[1:]) for run in runs]
        reached = sum(b >= ppo_final for b in best)
        print(f"{name}: final {final:.3f}, best per seed {' '.join(f'{b:.3f}' for b in best)};"
              f" {reached} of {len(runs)} seeds reach PPO's final mean {ppo_final:.3f} at some evaluation"
              f" within {runs[0][-1]['step']} iterations")  # fmt: skip
    plot(arms, os.path.join(ROOT, "docs", "ippo_equal_accuracy.png"))


def plot(arms: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    for (name, runs), color in zip(arms.items(), ("tab:blue", "tab:orange", "tab:green")):
        points = [(r["eval/acc_sampled"], r["eval/unfaithful_sampled"]) for run in runs for r in run[1:]]
        ax.scatter(*zip(*points), s=12, alpha=0.5, color=color, label=f"{name}: every evaluation, every seed")
        means = []
        for low, high in BANDS:
            inside = [u for a, u in points if low <= a < high]
            if inside:
                means.append(((low + high) / 2, sum(inside) / len(inside)))
        ax.plot(*zip(*means), color=color, marker="s", label=f"{name}: mean per accuracy band")
    ax.set(xlabel="held-out accuracy, sampled (first 200 test prompts)", ylabel="unfaithful share among correct",
           title="I-PPO's claim at equal accuracy")  # fmt: skip
    ax.legend(fontsize=7, title="5 seeds; no band: points are single evaluations", title_fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes, clear of the points  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
