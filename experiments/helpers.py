"""What the experiment commands share: running the seeds of a comparison, reading a run's metrics.jsonl, and
drawing figures into docs/ (files only, no screen)."""

import functools
import glob
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

# Running a comparison: every arm for every seed, two runs at a time with one core each (so the arms share the
# 2 cores evenly), each into <out>/<arm>_s<seed>. A finished run (its final checkpoint exists) is not run again;
# an unfinished one starts over.


def run(out: str, name: str, command: list[str], steps: int) -> str:
    if os.path.exists(os.path.join(out, name, "checkpoints", f"step_{steps:06d}")):
        return f"{name}: already done"
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *command, "--output-dir", out, "--run-name", name], cwd=ROOT, env=env,
                            capture_output=True, text=True)  # fmt: skip
    return f"{name}: " + ("done" if result.returncode == 0 else f"failed\n{result.stderr[-2000:]}")


def run_all(out: str, arms: dict, seeds, steps: int, flags: list[str]):
    """`arms` maps a name to its command (script and flags); `flags` are added to every run. `steps` is the last
    step of a finished run, passed as --steps."""
    steps_flag = ["--steps", str(steps)]
    # seed by seed, so the arms run interleaved
    jobs = [(f"{arm}_s{seed}", [*command, *flags, *steps_flag, "--seed", str(seed)])
            for seed in seeds for arm, command in arms.items()]  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        for line in pool.map(lambda job: run(out, job[0], job[1], steps), jobs):
            print(line, flush=True)


# Reading a run's metrics.jsonl.


@functools.cache  # a report reads each run many times, once per figure
def rows(run_dir):
    """Every row of a run's metrics.jsonl (training, evaluation and other rows), in the order written."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return tuple(json.loads(line) for line in f)


def load(run_dir):
    """(training rows, evaluation rows) of one run, in step order."""
    every = rows(run_dir)
    return [r for r in every if "reward/mean" in r], [r for r in every if "eval/acc_sampled" in r]


def mean_sd(x):
    return f"{np.mean(x):.3f} +- {np.std(x):.3f}"


def window_mean(rows, key, part):
    """Mean of `key` over the first or last fifth of the rows that log it (nan when none do)."""
    values = [r[key] for r in rows if key in r]
    if not values:
        return float("nan")
    k = max(1, len(values) // 5)
    return float(np.mean(values[:k] if part == "first" else values[-k:]))


def finished_runs(folder, arm):
    """The run folders <folder>/<arm>_s<seed> that reached their end (a complete checkpoint), in seed order."""
    runs = glob.glob(os.path.join(folder, f"{arm}_s*"))
    complete = lambda d: any(not c.endswith(".partial") for c in glob.glob(os.path.join(d, "checkpoints", "step_*")))
    done = [d for d in runs if complete(d)]
    return sorted(done, key=lambda d: int(d.rsplit("_s", 1)[1]))


# Figures: a mean curve over seeds with a band of one standard deviation, a legend on every panel that says so.


def subplots(*args, **kwargs):
    """plt.subplots, matplotlib imported only here: the commands that run training do not need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def band(ax, x, values, label, alpha=0.2, seeds=True):
    """Plot the mean over seeds of `values` [seeds x points] against x, shaded +- one standard deviation."""
    mean, sd = values.mean(0), values.std(0)
    ax.plot(x, mean, lw=2, label=f"{label} ({len(values)} seeds)" if seeds else label)
    ax.fill_between(x, mean - sd, mean + sd, alpha=alpha)


def legend(ax, **kwargs):
    """The panel's legend, titled with what its curves and bands are."""
    ax.legend(title="mean over seeds, band: one standard deviation", title_fontsize=7, fontsize=7, **kwargs)


def save(fig, name):
    """docs/<name>, laid out tight."""
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", name), dpi=110)
    print(f"wrote docs/{name}")


def plot_run(run_dir: str, out: str, title: str = ""):
    """Held-out accuracy of one run against its steps: overall (sampled and greedy) and sampled per skill. One
    run, so no band; the legend sits right of the axes, clear of the curves."""
    _, evals = load(run_dir)
    steps = [row["step"] for row in evals]
    fig, ax = subplots(figsize=(8.5, 4))
    ax.plot(steps, [r["eval/acc_sampled"] for r in evals], "k-", lw=2.5, label="all skills, sampled")
    ax.plot(steps, [r["eval/acc_greedy"] for r in evals], "k--", lw=1.5, label="all skills, greedy")
    for key in sorted(k for k in evals[0] if k.startswith("eval/acc_sampled/")):
        ax.plot(steps, [r[key] for r in evals], lw=1, marker=".", label=key.split("/")[-1] + ", sampled")
    ax.set(xlabel="training step (one rollout batch each)", ylabel="held-out accuracy", ylim=(0, 1.02))
    ax.set_title(title or os.path.basename(run_dir))
    ax.grid(alpha=0.3)
    ax.legend(title="one run, no band", title_fontsize=8, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
