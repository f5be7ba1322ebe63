"""Which skills does CROPI's score rank first, with exact gradients instead of projected ones?

Reads the offline store of a finished `python cropi.py` run (one process), computes the exact POPI
gradient of every pool prompt with a gradient and of the target skill's validation prompts at the
initial policy, and prints by skill: the pool, the prompts with a gradient, and the top 10% of the pool
by exact cosine with the target (what CROPI's first stage would select without projection noise).

    python -m experiments.cropi_target_probe runs/cropi__s1__...
"""

import collections
import json
import os
import sys

import torch

import cropi
from common.model import load_policy, matching_parameters
from common.world import model_folder
from common.world.chain import make_chain


def main(run_dir: str):
    with open(os.path.join(run_dir, "args.json")) as f:  # the behaviour temperature the store was made at
        saved = json.load(f)
    task, args = make_chain(), cropi.Args(max_new_tokens=48, store_temperature=saved["store_temperature"])
    (skill,) = saved["target_skills"] or task.target_skills  # the run's one target
    model, _ = load_policy(model_folder("tiny"))
    pool_store, (target_store, *_) = torch.load(os.path.join(run_dir, "store_rank0_of_1.pt"), weights_only=False)
    usable = [i for i, g in enumerate(pool_store) if g["shaped"].max() > g["shaped"].min()]
    params = matching_parameters(model, "")
    grads = lambda groups: torch.cat([cropi.popi_gradients(model, groups[s : s + 64], params, args)[0]
                                      for s in range(0, len(groups), 64)])  # fmt: skip
    G = grads([pool_store[i] for i in usable])
    target = grads([g for g in target_store if g["shaped"].max() > g["shaped"].min()]).mean(0)
    cosine = torch.nn.functional.cosine_similarity(G, target[None], dim=1)
    n_select = int(args.select_ratio * len(task.train))
    top = [usable[i] for i in cosine.argsort(descending=True)[:n_select].tolist()]
    for name, indices in (("pool", range(len(task.train))), ("with a gradient", usable), ("top 10%", top)):
        counts = collections.Counter(task.train[i]["skill"] for i in indices)
        shares = " ".join(f"{s} {c / len(indices):.2f}" for s, c in sorted(counts.items()))
        print(f"{name:16} {len(indices):5d} prompts | {shares}")
    share = sum(task.train[i]["skill"] == skill for i in top) / n_select
    pool_share = sum(e["skill"] == skill for e in task.train) / len(task.train)
    print(f"target skill {skill}: {share:.2f} of the top 10% against {pool_share:.2f} of the pool"
          f" ({share / pool_share:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
