"""I-PPO against PPO on the built-in world: PPO (ippo.py --no-influence), I-PPO (ippo.py) and filter-only
(ippo.py --no-reweight), 5 seeds each, the default 60 iterations, held-out evaluation every 10.

    python -m experiments.ippo_compare    # about 30 minutes on 2 CPU cores: two runs at a time, one core each
    python -m experiments.ippo_report     # the tables and docs/ippo_compare.png

Runs go to runs/ippo_compare/<arm>_s<seed>; a finished run is not run again.
"""

import os

from experiments.helpers import ROOT, run_all

ARMS = {"ppo": ["ippo.py", "--no-influence"], "ippo": ["ippo.py"], "filter": ["ippo.py", "--no-reweight"]}

if __name__ == "__main__":
    run_all(os.path.join(ROOT, "runs", "ippo_compare"), ARMS, seeds=range(1, 6), steps=60,
            flags=["--eval-every", "10", "--log-every", "30"])  # fmt: skip
