"""What the base model can and cannot do on the `chain` test split, skill by skill.

By default it is the step-0 evaluation of every script: the first 200 test prompts, greedy decoding and one
sample each at temperature 1, drawn from the evaluation stream of seed 1, so its `all` row equals the step-0
line a default run prints. Per skill: greedy accuracy, sampled accuracy, the unfaithful share among correct
sampled answers (right `####` answer, steps not the question's faithful chain), the flawed share (an
arithmetically wrong written step) and P(correct | flawed). Where that last share is high, the outcome reward
cannot see step errors. It also prints cropi.py's step-0 target evaluation: all test prompts of its default
target `times`, greedy and 8 samples each.

    python -m experiments.calibrate                 # the built-in tiny model (built on first use)
    python -m experiments.calibrate --model runs/pods__s1__.../checkpoints/step_000200
    python -m experiments.calibrate --prompts 300 --samples 4     # less noise, not the scripts' protocol
"""

import time
from dataclasses import dataclass, replace

import tyro

from common.data import of_skills
from common.model import load_policy
from common.run import held_out_metrics
from common.sampling import rollout_texts, seeded_generator
from common.verifier import is_correct
from common.world import model_folder
from common.world.chain import SKILLS, has_wrong_step, make_chain
from grpo import reward  # every script's reward: 1 for the gold final answer, else 0 (evaluation logs it)

MAX_NEW_TOKENS = 48  # what the scripts use on `chain`


@dataclass
class Args:
    model: str = "tiny"
    """`tiny` (built-in), or a local folder such as a run's checkpoint"""
    prompts: int = 200
    """the first this many test prompts (the scripts' --eval-prompts)"""
    samples: int = 1
    """sampled responses per prompt; 1 is the scripts' evaluation"""
    temperature: float = 1.0
    """sampling temperature (the scripts' default)"""
    seed: int = 1
    """the run seed whose step-0 evaluation stream draws the samples (the scripts' default is 1)"""


def tally(task, examples, texts) -> dict:
    """Per skill and overall ('all'): counts of responses, correct, correct-but-unfaithful, flawed, flawed-correct."""
    counts = {}
    for e, text in zip(examples, texts):
        correct, faithful = is_correct(text, e["answer"]), task.faithful(e["question"], text)
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
    task = make_chain()
    model, tokenizer = load_policy(model_folder(args.model))
    model.eval()
    examples = task.test[: args.prompts]
    # the scripts' evaluation: one generator per (seed, "eval", step, rank), greedy first (it draws nothing)
    generator = seeded_generator(args.seed, "eval", 0, 0)
    texts = lambda exs, greedy: rollout_texts(model, tokenizer, [e["question"] for e in exs], task.instruction,
                                              MAX_NEW_TOKENS, args.temperature, greedy, generator)  # fmt: skip
    greedy = tally(task, examples, texts(examples, True))
    repeated = [e for e in examples for _ in range(args.samples)]
    sampled = tally(task, repeated, texts(repeated, False))
    ratio = lambda a, b: a / b if b else float("nan")
    print(f"model {args.model} | chain: the first {len(examples)} test prompts | greedy, and {args.samples}"
          f" sample(s) per prompt at T={args.temperature} | seed {args.seed}\n")  # fmt: skip
    header = (f"{'skill':8} {'prompts':>7} {'greedy':>7} {'sampled':>8} {'unfaithful|correct':>19} {'flawed':>7}"
              f" {'P(correct|flawed)':>18}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for key in [*SKILLS, "all"]:
        g, s = greedy[key], sampled[key]
        print(f"{key:8} {g['n']:7d} {ratio(g['correct'], g['n']):7.3f} {ratio(s['correct'], s['n']):8.3f}"
              f" {ratio(s['unfaithful'], s['correct']):19.3f} {ratio(s['flawed'], s['n']):7.3f}"
              f" {ratio(s['flawed_correct'], s['flawed']):18.3f}")  # fmt: skip
    g = greedy["all"]
    print(f"\nunfaithful among correct greedy answers: {ratio(g['unfaithful'], g['correct']):.3f}")
    target = replace(task, test=of_skills(task.test, task.target_skills))
    # samples=8: cropi.py's --target-samples
    t = held_out_metrics(model, tokenizer, target, reward, None, len(target.test), MAX_NEW_TOKENS, args.temperature,
                         seeded_generator(args.seed, "eval-target", 0, 0), samples=8)  # fmt: skip
    figures = f"greedy {t['eval/acc_greedy']:.3f}, sampled (8 each) {t['eval/acc_sampled']:.3f}"
    skills = " ".join(task.target_skills)
    print(f"cropi.py's target evaluation, all {len(target.test)} `{skills}` test prompts: {figures}")
    print(f"done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main(tyro.cli(Args))
