"""How well do projected cosines rank prompts? precision@10% against exact full-gradient cosines.

On the tiny model: POPI gradients of pool prompts (those with a non-zero gradient, up to --prompts) and
the validation target (the target skill's validation prompts), exact cosines from the full gradients, then projected
cosines for every p and k. Precision@10% = share of the exact top 10% that the projected top 10% finds.

    python -m experiments.projection_fidelity [--prompts 600]
"""

import sys
import time

import torch

import cropi
from common.data import of_skills
from common.model import load_policy, matching_parameters
from common.world import model_folder
from common.world.chain import RARE_SKILL, make_chain
from kernels.projection import project


def top(scores, n):
    return set(torch.sort(scores, descending=True, stable=True).indices[:n].tolist())


def main(argv):
    n_prompts = int(argv[argv.index("--prompts") + 1]) if "--prompts" in argv else 600
    torch.manual_seed(0)
    args = cropi.Args(max_new_tokens=48)
    task = make_chain()  # one world for every run seed
    model, tokenizer = load_policy(model_folder("tiny"))
    gen = torch.Generator().manual_seed(0)
    pool = cropi.collect_store(model, tokenizer, task, task.train[: 2 * n_prompts], args.pool_responses, args, gen)
    pool = [g for g in pool if g["shaped"].max() > g["shaped"].min()][:n_prompts]
    target = of_skills(task.validation, [RARE_SKILL])
    val = cropi.collect_store(model, tokenizer, task, target, args.val_responses, args, gen)
    params = matching_parameters(model, "")
    G = torch.cat([cropi.popi_gradients(model, pool[s : s + 64], params, args)[0] for s in range(0, len(pool), 64)])
    val_grads = cropi.popi_gradients(model, val, params, args)[0]
    v = val_grads[val_grads.norm(dim=1) > 0][: args.val_prompts].mean(0)
    exact = torch.nn.functional.cosine_similarity(G, v[None], dim=1)
    n = max(1, len(pool) // 10)
    print(f"{len(pool)} pool prompts with a non-zero gradient, d = {G.shape[1]} coordinates, top 10% = {n}")
    print(f"exact cosines: mean {exact.mean():.3f}, spread (std) {exact.std():.3f}")
    print("| mode | p | k | precision@10% | spread x sqrt(k) | projection s |")
    print("|---|---|---|---|---|---|")
    for mode, p, k in [("rademacher", p, k) for k in (256, 1024) for p in (1.0, 0.3, 0.1, 0.01)] + [
        ("sjlt", 0.1, 1024), ("sjlt", 1.0, 1024)]:  # fmt: skip
        start = time.perf_counter()
        Z = torch.cat([project(G[s : s + 64], 0, k, p, seed=0, mode=mode) for s in range(0, len(G), 64)])
        z_v = project(v[None], 0, k, p, seed=0, mode=mode)[0]
        seconds = time.perf_counter() - start
        projected = torch.nn.functional.cosine_similarity(Z, z_v[None], dim=1)
        precision = len(top(exact, n) & top(projected, n)) / n
        print(f"| {mode} | {p} | {k} | {precision:.2f} | {exact.std() * k**0.5:.1f} | {seconds:.1f} |")
    print(f"random selection would give about {n / len(pool):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
