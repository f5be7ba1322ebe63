"""What the base model can and cannot do on the `chain` test split, skill by skill.

Greedy accuracy, sampled accuracy (`--samples` draws per prompt at `--temperature`), the unfaithful share
among correct sampled answers (right `####` answer, steps not the question's faithful chain), and
P(correct | flawed chain): of the sampled responses with an arithmetically wrong written step, the share
that still ends in the right answer. Where that share is high, the outcome reward cannot see step errors.

    python -m experiments.calibrate                 # the built-in tiny model (built on first use)
    python -m experiments.calibrate --model runs/pods__s1__.../checkpoints/step_000200
"""

import time
from dataclasses import dataclass

import torch
import tyro

from common.data import load_task
from common.model import load_policy, resolve_model
from common.reward import score
from common.session import rollout_texts
from common.world.chain import SKILLS, has_wrong_step


@dataclass
class Args:
    model: str = "tiny"
    """`tiny` (built-in), or a local folder such as a run's checkpoint"""
    samples: int = 4
    """sampled responses per test prompt"""
    temperature: float = 1.0
    """sampling temperature (the scripts' default)"""
    seed: int = 0
    """seeds the sampler; the test split is fixed"""


def tally(examples, texts) -> dict:
    """Per skill and overall ('all'): counts of responses, correct, correct-but-unfaithful, flawed, flawed-correct."""
    counts = {}
    for e, text in zip(examples, texts):
        _, correct, faithful = score("chain", e, text)
        flawed = has_wrong_step(text)
        for key in ("all", e["skill"]):
            c = counts.setdefault(key, dict(n=0, correct=0, unfaithful=0, flawed=0, flawed_correct=0))
            c["n"] += 1
            c["correct"] += correct
            c["unfaithful"] += correct and not faithful
            c["flawed"] += flawed
            c["flawed_correct"] += correct and flawed
    return counts


def main(args: Args):
    start = time.time()
    task = load_task("chain")
    model, tokenizer = load_policy(resolve_model(args.model))
    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    examples = task.test
    questions = [e["question"] for e in examples]
    greedy = tally(examples, rollout_texts(model, tokenizer, questions, "", 48, 1.0, True, generator)[0])
    repeated = [e for e in examples for _ in range(args.samples)]
    texts = rollout_texts(model, tokenizer, [e["question"] for e in repeated], "", 48, args.temperature, False,
                          generator)[0]  # fmt: skip
    sampled = tally(repeated, texts)
    ratio = lambda a, b: a / b if b else float("nan")
    print(f"model {args.model} | chain test split, {len(examples)} prompts | {args.samples} samples per prompt"
          f" at T={args.temperature}\n")  # fmt: skip
    header = (f"{'skill':8} {'prompts':>7} {'greedy':>7} {'sampled':>8} {'unfaithful|correct':>19} {'flawed':>7}"
              f" {'P(correct|flawed)':>18}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for key in [*SKILLS, "all"]:
        g, s = greedy[key], sampled[key]
        print(f"{key:8} {g['n']:7d} {ratio(g['correct'], g['n']):7.3f} {ratio(s['correct'], s['n']):8.3f}"
              f" {ratio(s['unfaithful'], s['correct']):19.3f} {ratio(s['flawed'], s['n']):7.3f}"
              f" {ratio(s['flawed_correct'], s['flawed']):18.3f}")  # fmt: skip
    s = sampled["all"]
    print(f"\nflawed chains: {s['flawed']} of {s['n']} sampled responses ({ratio(s['flawed'], s['n']):.3f});"
          f" done in {time.time() - start:.0f}s")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
