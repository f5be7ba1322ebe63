"""Does CROPI's influence score predict what a GRPO step on the scored prompts does to the target? The assumption
under CROPI, tested directly: from the base `tiny` policy, score the whole pool as cropi.py's first stage does
(POPI gradients on the offline store, projected, cosine to the target skill's validation gradient), cut the
prompts with a gradient into ten deciles by score, and from each decile (and from a random 10% of the pool) take
one GRPO step as grpo.py takes it (16 prompts drawn from the decile, 8 rollouts each, AdamW at lr 2e-4, one
mini-batch), over several seeds of the step. Measured on the target skill's held-out test prompts: the change of
the mean log-likelihood per token of their gold solutions, and of sampled accuracy (8 samples per prompt).

    python -m experiments.cropi_influence_check                  # target `times`; a few minutes on one CPU core
    python -m experiments.cropi_influence_check --target words --seeds 4

Prints a table per decile and the rank correlation (Spearman) of the decile's mean score with the measured
change, over the decile means and over every (decile, seed) step; draws docs/cropi_influence_check.png.
"""

import argparse
import copy
import os
import time

import torch

import cropi
import ippo
from common.data import of_skills
from common.model import load_policy, matching_parameters
from common.sampling import prompt_ids, rollout_texts, sample, seeded_generator, token_logprobs
from common.verifier import is_correct
from common.world import model_folder
from common.world.chain import make_chain
from experiments.helpers import ROOT

SAMPLES_PER_TEST_PROMPT = 8


@torch.no_grad()
def target_figures(model, tokenizer, task, gold, test) -> tuple[float, float]:
    """(mean log-likelihood per gold-solution token, sampled accuracy) on the target's test prompts."""
    loglik = (token_logprobs(model, gold).sum() / gold.completion_mask.sum()).item()
    examples = [e for e in test for _ in range(SAMPLES_PER_TEST_PROMPT)]
    texts = rollout_texts(model, tokenizer, [e["question"] for e in examples], task.instruction, 48, 1.0, False,
                          torch.Generator().manual_seed(12345))  # the same draw before and after the step  # fmt: skip
    correct = [is_correct(t, e["answer"]) for e, t in zip(examples, texts)]  # the verifier's verdict
    return loglik, sum(correct) / len(correct)


def grpo_step(base, tokenizer, task, examples, seed: int):
    """One GRPO step of grpo.py's defaults on 16 prompts drawn (with replacement) from `examples`."""
    model = copy.deepcopy(base)
    args = cropi.Args(max_new_tokens=48)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    draw = torch.randint(len(examples), (args.batch_prompts,), generator=seeded_generator(seed, "check-prompts"))
    chosen = [examples[i] for i in draw.tolist()]
    prompts = [p for p in prompt_ids(tokenizer, [e["question"] for e in chosen]) for _ in range(args.n)]
    rollout = sample(model, prompts, 48, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id,
                     generator=seeded_generator(seed, "check-sample"))  # fmt: skip
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    rewards = torch.tensor([cropi.reward(chosen[i // args.n], t) for i, t in enumerate(texts)]).view(-1, args.n)
    advantages = cropi.group_advantages(rewards).flatten()
    cropi.policy_update(model, None, optimizer, rollout, advantages, args, seeded_generator(seed, "check-shuffle"))
    return model


def ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def spearman(x, y) -> float:
    rx, ry = ranks(torch.tensor(x, dtype=torch.float64)), ranks(torch.tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx @ ry / (rx.norm() * ry.norm())).item()


def main(target: str, seeds: int):
    start = time.time()
    torch.manual_seed(0)
    model, tokenizer = load_policy(model_folder("tiny"))
    task = make_chain()
    args = cropi.Args(target_skills=(target,), max_new_tokens=48)
    (val_set,) = cropi.validation_sets(task, [target], 1)
    generator = seeded_generator(0, "store")
    pool_store = cropi.collect_store(model, tokenizer, task, task.train, args.pool_responses, args, generator)
    val_store = cropi.collect_store(model, tokenizer, task, val_set, args.val_responses, args, generator)
    params = matching_parameters(model, args.grad_params)
    (target_gradient,) = cropi.validation_targets(model, [val_store], params, args, 1)
    z, _, _ = cropi.projected_gradients(model, pool_store, params, args)
    scores = cropi.cosine_scores(z, target_gradient)
    scored = torch.nonzero(scores > -torch.inf).squeeze(-1)  # prompts whose stored rewards differ
    order = scored[scores[scored].argsort()]
    deciles = list(order.tensor_split(10))
    print(f"scored the pool in {time.time() - start:.0f}s: {len(scored)} of {len(task.train)} prompts have a"
          f" gradient; target `{target}`")  # fmt: skip
    test = of_skills(task.test, [target])
    gold = ippo.gold_rollout(tokenizer, test, task.instruction, "cpu")  # questions with their gold solutions
    base_loglik, base_acc = target_figures(model, tokenizer, task, gold, test)
    arms = {f"decile {d + 1}": decile for d, decile in enumerate(deciles)}
    shuffled = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(0))
    arms["random 10%"] = shuffled[: len(task.train) // 10]
    rows = {}
    for name, indices in arms.items():
        examples = [task.train[i] for i in indices.tolist()]
        changes = []
        for seed in range(seeds):
            loglik, acc = target_figures(grpo_step(model, tokenizer, task, examples, seed), tokenizer, task, gold, test)
            changes.append((loglik - base_loglik, acc - base_acc))
        finite = scores[indices][scores[indices] > -torch.inf]
        rows[name] = (finite.mean().item(), torch.tensor(changes, dtype=torch.float64))
    print(f"base: log-likelihood per gold token {base_loglik:.4f}, sampled accuracy {base_acc:.3f}"
          f" ({len(test)} test prompts x {SAMPLES_PER_TEST_PROMPT}); {seeds} seeds of the step per arm\n")  # fmt: skip
    print("| prompts | mean score | change of log-likelihood (mean +- sd) | change of accuracy (mean +- sd) |")
    print("|---|---|---|---|")
    for name, (score, changes) in rows.items():
        m, s = changes.mean(0), changes.std(0)
        print(f"| {name} | {score:.3f} | {m[0]:+.4f} +- {s[0]:.4f} | {m[1]:+.3f} +- {s[1]:.3f} |")
    decile_rows = [rows[f"decile {d + 1}"] for d in range(10)]
    means = [r[0] for r in decile_rows]
    for k, what in ((0, "log-likelihood"), (1, "accuracy")):
        over_means = spearman(means, [r[1][:, k].mean().item() for r in decile_rows])
        over_steps = spearman([m for m, r in zip(means, decile_rows) for _ in r[1]],
                              [c for r in decile_rows for c in r[1][:, k].tolist()])  # fmt: skip
        print(f"\nSpearman, decile score against the change of {what}: {over_means:+.2f} over the 10 decile means,"
              f" {over_steps:+.2f} over all {10 * seeds} steps")  # fmt: skip
    print(f"\n{time.time() - start:.0f}s in all")
    plot(rows, target, seeds, os.path.join(ROOT, "docs", "cropi_influence_check.png"))


def plot(rows, target, seeds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    deciles = [rows[f"decile {d + 1}"][1] for d in range(10)]
    for ax, k, label in ((axes[0], 0, "change of log-likelihood per gold token"), (axes[1], 1, "change of accuracy")):
        means = [c[:, k].mean().item() for c in deciles]
        sds = [c[:, k].std().item() for c in deciles]
        ax.errorbar(range(1, 11), means, yerr=sds, marker="o", capsize=3, label="one GRPO step on the decile")
        random = rows["random 10%"][1][:, k]
        ax.axhline(random.mean().item(), color="gray", linestyle="--", label="one GRPO step on a random 10%")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set(xlabel="decile of the pool by CROPI's score (10: the highest)", ylabel=label,
               title=f"target `{target}`")  # fmt: skip
        ax.legend(fontsize=7, title=f"mean over {seeds} seeds of the step, bars: one sd", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="times", help="the target skill")
    parser.add_argument("--seeds", type=int, default=4, help="seeds of the step per decile")
    main(**vars(parser.parse_args()))
