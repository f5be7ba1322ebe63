"""The strict-form recipe of docs/real-models.md over seeds: grpo.py trains SmolLM2-135M-Instruct with LoRA on the
sums task, `--reward strict`, `--answer-credit 0.5` and a `--format-bonus 0.2`, each run stopped after 1500 s of
training (about 30 minutes of wall clock, evaluations included), one thread each, two runs side by side.

Arms, two by two: where the format bonus is paid, and whether each group's rewards are divided by their std:
- `bonus`: the format bonus paid to every completion in the asked form (R1's format reward);
- `gated`: the same, with `--bonus-needs-right`: the bonus paid only in a group where some completion's answer is
  right, in whatever form, so that in a group of wrong answers the form alone earns no advantage;
- `bonus_noscale`, `gated_noscale`: the same two with `--no-scale-rewards` (advantages = rewards less their group's
  mean, Dr. GRPO's): a group whose rewards differ only by the 0.2 bonus then gets advantages of 0.2, not of 1;
- `gated_nocredit`: `gated` without the answer credit: a right answer outside the form earns nothing, so within a
  group holding a right answer the form is what pays.

The pass rule, fixed before any run: a run learns when its last held-out evaluation has sampled strict accuracy
>= 0.40 and sampled form >= 0.80 (on the 61 test prompts). The recipe is what learns at >= 4 of seeds 1-5.

    python -m experiments.sums_task runs/sums.jsonl
    python -m experiments.real_recipe --arms bonus gated --seeds 1     # 2 runs side by side: about 30 minutes
    python -m experiments.real_recipe --arms bonus_noscale gated_noscale --seeds 1
    python -m experiments.real_recipe --report                         # the table and docs/real_models_recipe.png

Each run goes into runs/real/recipe/<arm>_s<seed>, with its wall-clock seconds in wall.json; a run with a complete
checkpoint (saved only at its end, or when a signal stops it) is not run again. To stop a comparison early, send
SIGTERM to the training runs (each finishes its step and saves), not to this command: its end of their output
pipes would kill them unsaved. The report gives, per run, the last evaluation, the steps done,
the minutes, and what the training steps held: the share of groups whose shaped rewards were all equal, and the
step's reward parts (the strict reward, the share in the form, the share right in any form).
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from experiments.helpers import ROOT, finished_runs, load, save, subplots

OUT = os.path.join("runs", "real", "recipe")
RECIPE = ["grpo.py", "--model", "smollm2", "--task", "runs/sums.jsonl", "--batch-prompts", "4", "--n", "8",
          "--max-new-tokens", "24", "--lora-rank", "16", "--lr", "5e-4", "--warmup-steps", "3", "--reward", "strict",
          "--format-bonus", "0.2", "--answer-credit", "0.5", "--eval-prompts", "61", "--eval-every", "10",
          "--log-every", "1", "--steps", "200", "--max-time", "1500", "--save-every", "0"]  # fmt: skip
ARMS = {"bonus": [], "gated": ["--bonus-needs-right"], "bonus_noscale": ["--no-scale-rewards"],
        "gated_noscale": ["--bonus-needs-right", "--no-scale-rewards"],
        "gated_nocredit": ["--bonus-needs-right", "--answer-credit", "0"]}
PASS = {"eval/acc_sampled": 0.40, "eval/format_frac_sampled": 0.80}


def train(arm: str, seed: int) -> str:
    name = f"{arm}_s{seed}"
    if os.path.join(OUT, name) in finished_runs(OUT, arm):
        return f"{name}: already done"
    start = time.time()
    command = [sys.executable, *RECIPE, *ARMS[arm], "--seed", str(seed), "--output-dir", OUT, "--run-name", name]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True)  # fmt: skip
    stopped = result.returncode in (130, 143)  # Ctrl-C or SIGTERM: the step finished, a checkpoint saved
    if result.returncode and not stopped:
        return f"{name}: failed\n{result.stderr[-2000:]}"
    with open(os.path.join(OUT, name, "wall.json"), "w") as f:
        json.dump({"seconds": time.time() - start, "stopped": stopped}, f)
    return f"{name}: {'stopped' if stopped else 'done'} in {(time.time() - start) / 60:.1f} min"


def summary(run_dir: str) -> dict:
    train_rows, evals = load(run_dir)
    last = evals[-1]
    with open(os.path.join(run_dir, "wall.json")) as f:
        wall = json.load(f)
    minutes = wall["seconds"] / 60
    late = [r for r in train_rows if r["step"] > 10]  # after the warm-up and the first evaluation
    steps = f"{train_rows[-1]['step']}" + " (stopped)" * wall.get("stopped", False)
    return {"steps": steps, "minutes": minutes, **{k: last[k] for k in PASS},
            "greedy": last["eval/acc_greedy"], "learns": all(last[k] >= v for k, v in PASS.items()),
            "zero_std": np.mean([r["reward/zero_std_frac"] for r in late]),
            "form_10": next(r["eval/format_frac_sampled"] for r in evals if r["step"] >= 10),
            "acc_10": next(r["eval/acc_sampled"] for r in evals if r["step"] >= 10)}  # fmt: skip


def recorded_runs(arm: str) -> list[str]:
    """The runs of an arm that ended, at their time limit or stopped by hand (wall.json), in seed order."""
    runs = [os.path.dirname(p) for p in glob.glob(os.path.join(OUT, f"{arm}_s*", "wall.json"))]
    return sorted(runs, key=lambda d: int(d.rsplit("_s", 1)[1]))


def report():
    print("| arm | seed | steps | minutes | sampled strict acc | sampled form | greedy strict acc | at step 10: acc /"
          " form | equal-reward groups after step 10 | learns |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fig, (acc, form) = subplots(1, 2, figsize=(11, 4), sharex=True)
    for colour, arm in zip(("C0", "C1", "C2", "C3", "C4"), ARMS):
        for run_dir, style in zip(recorded_runs(arm), ("-", "--", ":", "-.", "-")):
            s, seed = summary(run_dir), run_dir.rsplit("_s", 1)[1]
            print(f"| {arm} | {seed} | {s['steps']} | {s['minutes']:.1f} | {s['eval/acc_sampled']:.3f} |"
                  f" {s['eval/format_frac_sampled']:.2f} | {s['greedy']:.3f} | {s['acc_10']:.3f} / {s['form_10']:.2f}"
                  f" | {s['zero_std']:.2f} | {'yes' if s['learns'] else 'no'} |")
            _, evals = load(run_dir)
            for ax, key in ((acc, "eval/acc_sampled"), (form, "eval/format_frac_sampled")):
                ax.plot([r["step"] for r in evals], [r[key] for r in evals], style, color=colour,
                        label=f"{arm}, seed {seed}")  # fmt: skip
    for ax, key, title in ((acc, "eval/acc_sampled", "held-out sampled accuracy, strict"),
                           (form, "eval/format_frac_sampled", "held-out sampled completions in the form")):  # fmt: skip
        ax.axhline(PASS[key], color="grey", lw=0.8, ls=":")
        ax.set(title=title, xlabel="training step", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    form.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    save(fig, "real_models_recipe.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--report", action="store_true", help="only the report, from the finished runs")
    args = parser.parse_args()
    if not args.report:
        jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
        with ThreadPoolExecutor(max_workers=2) as pool:
            for line in pool.map(lambda job: train(*job), jobs):
                print(line, flush=True)
    report()


if __name__ == "__main__":
    main()
