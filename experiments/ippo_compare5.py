"""I-PPO against PPO on the built-in world: PPO (ippo.py --no-influence), I-PPO (ippo.py) and filter-only
(ippo.py --no-reweight), 5 seeds each, the default 60 iterations, held-out evaluation every 10.

    python experiments/ippo_compare5.py           # about 25 minutes on 2 CPU cores: two runs at a time, one core each
    python experiments/ippo_summary.py 'PPO=runs/ippo_compare/ppo_s*' 'I-PPO=runs/ippo_compare/ippo_s*' \
        'filter-only=runs/ippo_compare/filter_s*'
    python experiments/ippo_plot.py               # docs/ippo_compare.png

Runs go to runs/ippo_compare/<arm>_s<seed>; a finished run (its final checkpoint exists) is not run again.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs", "ippo_compare")
SEEDS = (1, 2, 3, 4, 5)
STEPS = 60
COMMON = ["--steps", str(STEPS), "--eval-every", "10", "--log-every", "30"]
ARMS = {
    "ppo": ["ippo.py", "--no-influence"],
    "ippo": ["ippo.py"],
    "filter": ["ippo.py", "--no-reweight"],
}


def run(arm: str, seed: int) -> str:
    name = f"{arm}_s{seed}"
    if os.path.exists(os.path.join(OUT, name, "checkpoints", f"step_{STEPS:06d}")):
        return f"{name}: already done"
    subprocess.run(["rm", "-rf", os.path.join(OUT, name)], check=True)  # an unfinished run starts over
    script, *flags = ARMS[arm]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs at a time share the 2 cores evenly
    result = subprocess.run([sys.executable, script, *flags, *COMMON, "--seed", str(seed), "--output-dir", OUT,
                             "--run-name", name], cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    return f"{name}: " + ("done" if result.returncode == 0 else f"failed\n{result.stderr[-2000:]}")


def main():
    jobs = [(arm, seed) for seed in SEEDS for arm in ARMS]  # seed by seed, so the arms run interleaved
    with ThreadPoolExecutor(max_workers=2) as pool:
        for line in pool.map(lambda job: run(*job), jobs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
