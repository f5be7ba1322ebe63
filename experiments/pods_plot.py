"""Mean held-out accuracy over seeds, with a band of one standard deviation, per arm of
experiments/pods_compare.py: against optimizer steps and against training seconds.

    python experiments/pods_plot.py     # docs/pods_compare_steps.png, _seconds.png and _skills.png (per skill)
"""

from plots import band, legend, plt, save
from pods_summary import ARMS, SKILLS, curves

LABELS = {"grpo": "GRPO, n = m = 8", "pods": "PODS, n = 32, m = 8, max-variance", "random": "n = 32, m = 8, random"}


def plot(x_of, xlabel, name):
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in ARMS:
        steps, acc, seconds = curves(arm)
        band(ax, steps if x_of == "steps" else seconds.mean(0), acc, LABELS[arm])
    ax.set(xlabel=xlabel, ylabel="held-out accuracy, sampled", ylim=(0.4, 0.85))
    ax.grid(alpha=0.3)
    legend(ax, loc="lower right")
    save(fig, name)


def plot_skills(name):
    fig, axes = plt.subplots(1, len(SKILLS), figsize=(16, 4.2), sharey=True)
    for ax, skill in zip(axes, SKILLS):
        for arm in ARMS:
            steps, acc, _ = curves(arm, f"eval/acc_sampled/{skill}")
            band(ax, steps, acc, LABELS[arm], seeds=False)
        ax.set(title=f"skill `{skill}`", xlabel="optimizer step", ylim=(0, 1))
        ax.grid(alpha=0.3)
        legend(ax, loc="upper left" if skill == "words" else "lower right")
    axes[0].set_ylabel("held-out accuracy, sampled")
    save(fig, name)


if __name__ == "__main__":
    plot("steps", "optimizer step (one rollout batch each)", "pods_compare_steps.png")
    plot("seconds", "training seconds (2 CPU cores, two runs at a time)", "pods_compare_seconds.png")
    plot_skills("pods_compare_skills.png")
