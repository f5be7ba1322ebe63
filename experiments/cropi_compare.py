"""CROPI against its baselines on the built-in world: the same GRPO (6 stages x 16 steps, B = 16, n = 8) on the
whole pool (`full`), on a random 10% per stage (`random`), on the 10% with the highest stored p(1 - p)
(`pass-rate`), and on the 10% CROPI's influence scores pick for the weak target skill `words` (`cropi`),
5 seeds each, held-out evaluation every 8 steps.

    python experiments/cropi_compare.py           # about 40 minutes on 2 CPU cores: two runs at a time, one core each
    python experiments/cropi_summary.py           # the tables
    python experiments/cropi_plot.py              # docs/cropi_compare.png

Runs go to runs/cropi_compare/<selection>_s<seed>; a finished run is not run again.
"""

import os

from seed_runs import ROOT, run_all

SELECTIONS = ("full", "random", "pass-rate", "cropi")
ARMS = {selection: ["cropi.py", "--selection", selection] for selection in SELECTIONS}

if __name__ == "__main__":
    run_all(os.path.join(ROOT, "runs", "cropi_compare"), ARMS, seeds=range(1, 6), steps=96,
            flags=["--eval-every", "8", "--log-every", "48"])  # fmt: skip
