"""PODS against GRPO on the built-in world: GRPO n = m = 8 (grpo.py), PODS n = 32, m = 8 max-variance, and
n = 32, m = 8 random (pods.py), 5 seeds each, 100 steps, held-out evaluation every 10 steps.

    python -m experiments.pods_compare    # about 23 minutes on 2 CPU cores: two runs at a time, one core each
    python -m experiments.pods_report     # the tables; docs/pods_compare_steps.png, _seconds.png and _skills.png

Runs go to runs/pods_compare/<arm>_s<seed>; a finished run is not run again.
"""

import os

from experiments.helpers import ROOT, run_all

ARMS = {
    "grpo": ["grpo.py", "--n", "8"],
    "pods": ["pods.py", "--n", "32", "--m", "8", "--rule", "max-variance"],
    "random": ["pods.py", "--n", "32", "--m", "8", "--rule", "random"],
}

if __name__ == "__main__":
    run_all(os.path.join(ROOT, "runs", "pods_compare"), ARMS, seeds=range(1, 6), steps=100,
            flags=["--eval-every", "10", "--log-every", "50"])  # fmt: skip
