"""Summarise experiments/cropi_compare.sh: accuracy, steps-to-target and wall clock, CROPI against baselines.

    python experiments/cropi_summary.py [--metric eval_target/acc_sampled]

Target = the mean over seeds of `full` GRPO's final value of the metric. Steps (and training seconds,
scoring included) to reach it are read off each method's mean curve over seeds.
"""

import glob
import json
import sys

import numpy as np


def curves(selection, metric):
    runs, done = sorted(glob.glob(f"runs/cropi_{selection}_s*")), []
    steps, values, seconds, extra = None, [], [], []
    for d in runs:
        rows = [json.loads(line) for line in open(f"{d}/metrics.jsonl")]
        evals = [r for r in rows if metric in r]
        if steps is not None and len(evals) != len(steps):
            continue  # an unfinished run
        steps = [r["step"] for r in evals]
        values.append([r[metric] for r in evals])
        seconds.append([r["time/train_elapsed"] for r in evals])
        extra.append((sum(r.get("time/score", 0) for r in rows), sum(r.get("time/store", 0) for r in rows)))
        done.append(d)
    return done, np.array(steps), np.array(values), np.array(seconds).mean(0), np.array(extra).mean(0)


def first_reach(steps, curve, target):
    hit = np.nonzero(curve >= target)[0]
    return (steps[hit[0]], hit[0]) if len(hit) else (None, None)


def main(argv):
    metric = argv[argv.index("--metric") + 1] if "--metric" in argv else "eval_target/acc_sampled"
    data = {s: curves(s, metric) for s in ("full", "random", "cropi")}
    target = data["full"][2][:, -1].mean()
    print(f"metric {metric}; target = full GRPO's mean final value {target:.3f}")
    print("| selection | seeds | final (per seed) | mean curve | step reaching target | train s at target | "
          "scoring s (store s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    reach = {}
    for name, (runs, steps, values, seconds, (score_s, store_s)) in data.items():
        mean = values.mean(0)
        step, i = first_reach(steps, mean, target)
        reach[name] = (step, seconds[i] if i is not None else None)
        finals = ", ".join(f"{v:.3f}" for v in values[:, -1])
        print(f"| {name} | {len(runs)} | {values[:, -1].mean():.3f} ({finals}) | {' '.join(f'{v:.2f}' for v in mean)}"
              f" | {step if step is not None else 'not reached'} | {reach[name][1] or float('nan'):.0f}"
              f" | {score_s:.0f} ({store_s:.0f}) |")  # fmt: skip
    if reach["cropi"][0] and reach["full"][0]:
        print(
            f"steps-to-target, full / cropi: {reach['full'][0] / reach['cropi'][0]:.2f}x; "
            f"wall clock (scoring included): {reach['full'][1] / reach['cropi'][1]:.2f}x"
        )
    else:
        print("steps-to-target ratio: not measured (a method never reaches the target on its mean curve)")


if __name__ == "__main__":
    main(sys.argv[1:])
