"""CROPI against its baselines on the built-in world: the same GRPO (6 stages x 16 steps, B = 16, n = 8) on the
whole pool (`full`), on a random 10% per stage (`random`), on the 10% with the highest stored p(1 - p)
(`pass-rate`), and on the 10% CROPI's influence scores pick for a target skill (`cropi`), 5 seeds each,
held-out evaluation every 8 steps. Two parts, each into its own folder:

- times (runs/cropi_times): target `times`, weak but learnable (a misconception RL corrects); seeds 101-105,
  fixed before any run of this part; every target test prompt sampled 8 times per evaluation.
- words (runs/cropi_compare): target `words`, weak and barely learnable; seeds 1-5, one sample per target
  test prompt (as these runs were made).

    python -m experiments.cropi_compare times     # about 50 minutes on 2 CPU cores: two runs at a time, one core each
    python -m experiments.cropi_compare words     # about 40 minutes
    python -m experiments.cropi_report times      # the tables and docs/cropi_times.png (words: docs/cropi_compare.png)

A finished run is not run again.
"""

import os
import sys

from experiments.helpers import ROOT, run_all

SELECTIONS = ("full", "random", "pass-rate", "cropi")
PARTS = {  # folder, target skill, seeds, flags of the part
    "times": ("cropi_times", "times", range(101, 106), ["--eval-prompts", "100", "--target-samples", "8"]),
    "words": ("cropi_compare", "words", range(1, 6), ["--target-samples", "1"]),
}

if __name__ == "__main__":
    for part in sys.argv[1:] or ["times"]:
        folder, skill, seeds, flags = PARTS[part]
        arms = {selection: ["cropi.py", "--selection", selection, "--target-skills", skill] for selection in SELECTIONS}
        run_all(os.path.join(ROOT, "runs", folder), arms, seeds=seeds, steps=96,
                flags=[*flags, "--eval-every", "8", "--log-every", "48"])  # fmt: skip
