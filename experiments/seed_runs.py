"""Run every arm of a comparison for every seed, two runs at a time with one core each (so the arms share
the 2 cores evenly), each into <out>/<arm>_s<seed>. A finished run (its final checkpoint exists) is not run
again; an unfinished one starts over."""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    jobs = [(f"{arm}_s{seed}", [*command, *flags, *steps_flag, "--seed", str(seed)])
            for seed in seeds for arm, command in arms.items()]  # seed by seed, so the arms run interleaved
    with ThreadPoolExecutor(max_workers=2) as pool:
        for line in pool.map(lambda job: run(out, job[0], job[1], steps), jobs):
            print(line, flush=True)
