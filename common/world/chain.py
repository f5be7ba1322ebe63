"""The `chain` task: chained integer arithmetic with a worked solution, checkable step by step.

A question `What is 12+7-5?` has the solution `12+7=19 19-5=14 #### 14`. The pool mixes skills of different
difficulty, one of them rare and weak; the flawed-solution kinds below are what the tiny model's teacher
writes; `faithful` and `has_wrong_step` check a response's written steps, which the outcome reward
does not see.
"""

import random
import re
from dataclasses import dataclass

from common.data import SPLIT_SIZES, Task
from common.verifier import extract_answer, normalize


@dataclass(frozen=True)
class Skill:
    """One kind of `chain` question: how many operations, how large the operands, how it is written."""

    name: str
    ops: tuple[int, int]  # fewest and most operations
    max_operand: int
    pool_share: float  # its share of the pool, and of every split
    times_first: bool = False  # the chain opens with a multiplication (a*b), the only place `*` appears
    in_words: bool = False  # the question spells numbers and operators in words; solutions stay in digits


# The skills of the `chain` pool. `words` is the rare skill: rare in the pool and rarer still in the tiny
# model's warm-up, so the base model has barely met it (see `TinySpec.warmup_shares`). `times` opens with a
# product the warm-up taught wrongly: a misconception the base model holds and RL corrects.
CHAIN_SKILLS = (
    Skill("short", (2, 3), 6, 0.30),
    Skill("long", (4, 5), 6, 0.36),
    Skill("times", (2, 3), 6, 0.20, times_first=True),
    Skill("words", (1, 3), 5, 0.14, in_words=True),
)
SKILLS = {s.name: s for s in CHAIN_SKILLS}
RARE_SKILL = "words"
# The default target of a curriculum (cropi.py): a skill the base model is weak at and RL can teach. `words`
# would be the harder test, but RL cannot teach what the model has barely met, whichever prompts it is shown.
DEFAULT_TARGET = "times"
CHAIN_POOL = 4000
# How a chat model is asked a `chain` question: what to compute and the form the verifier reads (the text after
# the last `####`; without one, the last \boxed{}, else the last number). The tiny model sees the bare question.
CHAIN_INSTRUCTION = "\nCompute it step by step, then give the final answer after ####."
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
STEP = re.compile(r"(-?\d+)([+*-])(\d+)=(-?\d+)")  # one written step `a op b = c`


def apply(value: int, op: str, x: int) -> int:
    return value + x if op == "+" else value - x if op == "-" else value * x


def chain_operations(rng: random.Random, skill: Skill):
    """Operands and operators of one chain of the skill. The running value stays within [0, 2 * max_operand]
    after any +/- (an operation that would leave that range is flipped), so every result is small and
    non-negative; a chain that opens with a*b starts from at most max_operand^2."""
    n_ops = rng.randint(*skill.ops)
    operands, ops = [rng.randint(1, skill.max_operand)], []
    if skill.times_first:
        operands.append(rng.randint(2, skill.max_operand))
        ops.append("*")
    value = operands[0] * operands[1] if skill.times_first else operands[0]
    for _ in range(n_ops - len(ops)):
        x, op = rng.randint(1, skill.max_operand), rng.choice("+-")
        high = max(2 * skill.max_operand, value)
        if (op == "-" and value - x < 0) or (op == "+" and value + x > high):
            op = "+" if op == "-" else "-"
        value = apply(value, op, x)
        operands.append(x)
        ops.append(op)
    return operands, ops


def chain_question(operands, ops, in_words: bool = False) -> str:
    """'What is 4+2-1?' or, in words, 'What is four plus two minus one?'."""
    if in_words:
        parts = [NUMBER_WORDS[operands[0]]] + [f" {OP_WORDS[o]} {NUMBER_WORDS[x]}" for o, x in zip(ops, operands[1:])]
        return "What is " + "".join(parts) + "?"
    return "What is " + str(operands[0]) + "".join(o + str(x) for o, x in zip(ops, operands[1:])) + "?"


def parse_chain_question(question: str):
    """Operands and operators of 'What is 12+7-5?' -> ([12, 7, 5], ['+', '-']), also when written in words."""
    expr = question.removeprefix("What is ").rstrip("?")
    if " " in expr:  # in words: 'four plus two minus one'
        words = expr.split()
        symbols = {w: o for o, w in OP_WORDS.items()}
        return [NUMBER_WORDS.index(w) for w in words[::2]], [symbols[w] for w in words[1::2]]
    operands, ops, number = [], [], ""
    for ch in expr:
        if ch in "+-*" and number:
            operands.append(int(number))
            ops.append(ch)
            number = ""
        else:
            number += ch
    operands.append(int(number))
    return operands, ops


def chain_steps(operands, ops):
    """The faithful steps [(left, op, right, result), ...] of a chain."""
    steps, value = [], operands[0]
    for op, right in zip(ops, operands[1:]):
        result = apply(value, op, right)
        steps.append((value, op, right, result))
        value = result
    return steps


def format_solution(steps, answer) -> str:
    return " ".join(f"{a}{op}{b}={c}" for a, op, b, c in steps) + f" #### {answer}"


def chain_example(rng: random.Random, skill: Skill) -> dict:
    operands, ops = chain_operations(rng, skill)
    steps = chain_steps(operands, ops)
    answer = str(steps[-1][3])
    question = chain_question(operands, ops, skill.in_words)
    return {"question": question, "answer": answer, "solution": format_solution(steps, answer), "skill": skill.name}


def wrong_result(c: int, rng: random.Random) -> int:
    """A nearby wrong value (never negative, never c)."""
    wrong = c + rng.choice([-1, 1]) * rng.randint(1, 3)
    return wrong if wrong >= 0 and wrong != c else c + rng.randint(1, 3)


def slipped_solution(example: dict, rng: random.Random) -> str:
    """An *unfaithful* solution from a habit: one step's result is written one too high (the first two-digit
    result if there is one, else a random step), but the chain goes on from the true value, so every other
    step and the `####` answer are right. The outcome reward cannot see the slip."""
    steps = chain_steps(*parse_chain_question(example["question"]))
    two_digit = [k for k, step in enumerate(steps) if step[3] >= 10]
    i = two_digit[0] if two_digit else rng.randrange(len(steps))
    a, op, b, c = steps[i]
    steps[i] = (a, op, b, c + 1)
    return format_solution(steps, example["answer"])


def carried_solution(example: dict, rng: random.Random) -> str:
    """A wrong solution: one step's result is wrong and carried through the rest, to a wrong answer."""
    operands, ops = parse_chain_question(example["question"])
    steps = chain_steps(operands, ops)
    i = rng.randrange(len(steps))
    a, op, b, c = steps[i]
    wrong = wrong_result(c, rng)
    steps = steps[:i] + [(a, op, b, wrong)] + chain_steps([wrong] + operands[i + 2 :], ops[i + 1 :])
    return format_solution(steps, steps[-1][3])


def misread_solution(example: dict, rng: random.Random) -> str:
    """A wrong solution from a misread question: one step's right operand is not the question's, and every
    step is computed correctly from what was written, so the chain is consistent but ends in a wrong answer."""
    operands, ops = parse_chain_question(example["question"])
    j = rng.randrange(1, len(operands))
    low = 2 if ops[j - 1] == "*" else 1
    misread = rng.choice([x for x in range(low, operands[j] + 3) if x != operands[j]])
    operands = operands[:j] + [misread] + operands[j + 1 :]
    steps = chain_steps(operands, ops)
    return format_solution(steps, steps[-1][3])


def plus_for_times_solution(example: dict) -> str:
    """A wrong solution from a misconception: the opening a*b is read as a+b, the rest computed correctly."""
    operands, ops = parse_chain_question(example["question"])
    steps = chain_steps(operands, ["+", *ops[1:]])
    return format_solution(steps, steps[-1][3])


def make_chain(seed: int = 0, pool: int = CHAIN_POOL) -> Task:
    """A pool of distinct questions, each skill its `pool_share` of it, split into disjoint train, validation
    and test by seed. Every split carries the same skill mix (stratified), so held-out accuracy measures
    the distribution the policy trains on and every skill has held-out prompts."""
    rng = random.Random(seed)
    n_val, n_test = SPLIT_SIZES["validation"], SPLIT_SIZES["test"]
    train, validation, test = [], [], []
    for skill in CHAIN_SKILLS:
        seen, examples = set(), []
        while len(examples) < round(skill.pool_share * pool):
            ex = chain_example(rng, skill)
            if ex["question"] not in seen:
                seen.add(ex["question"])
                examples.append(ex)
        v, t = round(skill.pool_share * n_val), round(skill.pool_share * n_test)
        validation += examples[:v]
        test += examples[v : v + t]
        train += examples[v + t :]
    for split in (train, validation, test):
        rng.shuffle(split)
    return Task("chain", train, validation, test, CHAIN_INSTRUCTION,
                max_new_tokens=48, target_skills=(DEFAULT_TARGET,), faithful=faithful)  # fmt: skip


def faithful(question: str, response: str) -> bool:
    """True iff the response's steps are exactly the question's chain, each arithmetically valid, each
    starting from the previous result, and the final answer is the last step's result."""
    operands, ops = parse_chain_question(question)
    written = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(response.split("####")[0])]
    if written != chain_steps(operands, ops):
        return False
    return normalize(extract_answer(response)) == normalize(str(written[-1][3]))


def has_wrong_step(response: str) -> bool:
    """True iff some written step `a op b = c` is arithmetically wrong (a slip, whatever the answer)."""
    return any(apply(int(a), op, int(b)) != int(c) for a, op, b, c in STEP.findall(response.split("####")[0]))
