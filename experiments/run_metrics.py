"""Reading a run's metrics.jsonl, shared by the summary scripts."""

import json

import numpy as np


def load(run_dir):
    """(training rows, evaluation rows) of one run, in step order."""
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return [r for r in rows if "reward/mean" in r], [r for r in rows if "eval/acc_sampled" in r]


def window_mean(rows, key, part):
    """Mean of `key` over the first or last fifth of the rows that log it (nan when none do)."""
    values = [r[key] for r in rows if key in r]
    if not values:
        return float("nan")
    k = max(1, len(values) // 5)
    return float(np.mean(values[:k] if part == "first" else values[-k:]))
