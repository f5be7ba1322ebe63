"""The short training run that ends a passed check: the student's copy, on the built-in tiny model and chain
task, with few steps and a small evaluation, then the one number that shows the idea at work, read from the run's
metrics.jsonl."""

import json
import os
import shutil
import subprocess
import sys

from common.errors import fail
from exercises.copies import ROOT

SMALL = ("--steps", "30", "--eval-every", "30", "--eval-prompts", "100", "--log-every", "10")


def train(exercise, copy_path: str, runs_dir: str) -> list[dict]:
    """Run the copy as a student would (`python work/grpo.py ...`, from the repository's root); its metrics rows."""
    name = f"check-{exercise.id}"
    run_dir = os.path.join(runs_dir, name)
    shutil.rmtree(run_dir, ignore_errors=True)  # the previous check's run of this exercise: the check's own output
    flags = [*exercise.train, "--output-dir", runs_dir, "--run-name", name]
    print(f"training: python {copy_path} {' '.join(flags)}", flush=True)
    command = [sys.executable, os.path.abspath(copy_path), *flags[:-4], "--output-dir", os.path.abspath(runs_dir),
               "--run-name", name]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print("\n".join(done.stderr.strip().splitlines()[-6:]))
        fail(f"exercise {exercise.id}: the training run of {copy_path} stopped (exit status {done.returncode});"
             " its last lines are above")  # fmt: skip
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---- the one number of each run ----------------------------------------------------------------------------------


def values(rows: list[dict], key: str) -> list[float]:
    return [row[key] for row in rows if key in row]


def mean(rows: list[dict], key: str) -> float:
    found = values(rows, key)
    return sum(found) / max(1, len(found))


def accuracy(rows: list[dict], key: str = "eval/acc_greedy") -> str:
    found = values(rows, key)
    return f"held-out accuracy ({key.split('_')[-1]}, 100 prompts): {found[0]:.3f} -> {found[-1]:.3f}"


def clip_fraction(rows):
    return f"tokens whose clip binds: {mean(rows, 'policy/clip_frac'):.4f} of the tokens, mean over the steps"


def kl_to_reference(rows):
    kl = values(rows, "policy/kl_ref")
    return f"KL to the initial policy (policy/kl_ref): step 1 {kl[0]:.2e} -> step {len(kl)} {kl[-1]:.2e}"


def kept_groups(rows):
    return (f"groups with equal rewards: {mean(rows, 'reward/zero_std_frac'):.3f} of those generated,"
            f" {mean(rows, 'reward/zero_std_frac_kept'):.3f} of those kept (mean over the steps); "
            + accuracy(rows))  # fmt: skip


def masked_fraction(rows):
    return (f"tokens masked by the trust region: {mean(rows, 'trust_region/masked_frac'):.4f}"
            f" (A > 0: {mean(rows, 'trust_region/masked_frac_pos'):.4f}, A < 0:"
            f" {mean(rows, 'trust_region/masked_frac_neg'):.4f}), mean over the steps")  # fmt: skip


def target_share(rows):
    share = values(rows, "select/target_share")
    target = values(rows, "eval_target/acc_greedy")
    return (f"target skill's share of the selection {share[0]:.3f} (of the pool"
            f" {values(rows, 'select/target_share_pool')[0]:.3f}); target accuracy (greedy)"
            f" {target[0]:.3f} -> {target[-1]:.3f}")  # fmt: skip


def influence_kept(rows):
    return f"episodes kept by the influence filter: {mean(rows, 'influence/kept_frac'):.3f}; " + accuracy(rows)


def signal_groups(rows):
    return (f"groups trained on: {1 - mean(rows, 'reward/zero_std_frac'):.3f} of the batch (mean over the steps); "
            + accuracy(rows))  # fmt: skip
