"""Reading a run's metrics.jsonl, shared by the summary scripts."""

import functools
import glob
import json
import os

import numpy as np


@functools.cache  # a summary reads each run many times, once per figure
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
    complete = lambda d: any(not c.endswith(".partial") for c in glob.glob(os.path.join(d, "checkpoints", "step_*")))  # noqa: E731
    done = [d for d in runs if complete(d)]
    return sorted(done, key=lambda d: int(d.rsplit("_s", 1)[1]))
