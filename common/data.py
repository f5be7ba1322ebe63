"""Tasks: the built-in `chain` arithmetic task, GSM8K, and local json/jsonl/parquet files.

Every task yields a list of examples `{"question": str, "answer": str, "solution": str}`, where
`answer` is the gold final answer and `solution` a worked gold solution ending in `#### <answer>`
(empty when the source has none). `chain` examples also carry their `skill`.
"""

import os
import random
from dataclasses import dataclass

from common.run import fail

FILE_EXTENSIONS = (".json", ".jsonl", ".parquet")
SPLIT_SIZES = {"validation": 300, "test": 300}  # held-out sizes; the rest of the pool is `train`


@dataclass(frozen=True)
class Skill:
    """One kind of `chain` question: how many operations, how large the operands, how it is written."""

    name: str
    ops: tuple[int, int]  # fewest and most operations
    max_operand: int
    pool_share: float  # its share of the pool, and of every split
    times_first: bool = False  # the chain opens with a multiplication (a*b), the only place `*` appears
    in_words: bool = False  # the question spells numbers and operators in words; solutions stay in digits


# The skills of the `chain` pool. `words` is the weak target skill: rare in the pool and rarer still in
# the tiny model's warm-up, so the base model has barely met it (see `TinySpec.warmup_shares`).
CHAIN_SKILLS = (
    Skill("short", (2, 3), 6, 0.30),
    Skill("long", (4, 5), 6, 0.36),
    Skill("times", (2, 3), 6, 0.20, times_first=True),
    Skill("words", (1, 3), 5, 0.14, in_words=True),
)
SKILLS = {s.name: s for s in CHAIN_SKILLS}
TARGET_SKILL = "words"
CHAIN_POOL = 4000
# How a chat model is asked a `chain` question: what to compute and the form the verifier reads (the text after
# the last `####`; without one, the last \boxed{}, else the last number). The tiny model sees the bare question.
CHAIN_INSTRUCTION = "\nCompute it step by step, then give the final answer after ####."
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


@dataclass
class Task:
    name: str
    train: list
    validation: list
    test: list
    instruction: str = ""  # appended to the question for chat models


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
    return Task("chain", train, validation, test, CHAIN_INSTRUCTION)


def of_skills(examples: list, skills) -> list:
    """The examples of the given skills (e.g. the validation prompts of the target skill)."""
    return [e for e in examples if e.get("skill") in skills]


def check_skills(task: Task, skills, flag: str) -> list:
    """The skill names of a flag, checked: known to the task, one-line errors otherwise."""
    known = sorted({e["skill"] for e in task.validation if "skill" in e})
    if not known:
        fail(f"{flag}: the examples of {task.name} have no `skill` field (only `chain` and files with one do)")
    for name in skills:
        if name not in known:
            fail(f"{flag} {name!r}: unknown skill; the skills of {task.name} are {', '.join(known)}")
    return list(skills)


def gsm8k_answer(solution: str) -> str:
    return solution.split("####")[-1].strip().replace(",", "")


def make_gsm8k(seed: int = 0) -> Task:
    """GSM8K (openai/gsm8k, main) via `datasets`; validation is a fixed slice of the train split."""
    import datasets

    try:
        ds = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as e:  # offline, or the hub is unreachable
        fail(f"--task gsm8k: could not load openai/gsm8k ({type(e).__name__}); needs network or a local copy")
    rows = lambda split: [
        {"question": r["question"], "answer": gsm8k_answer(r["answer"]), "solution": r["answer"]} for r in split
    ]
    train = rows(ds["train"])
    random.Random(seed).shuffle(train)
    n_val = SPLIT_SIZES["validation"]
    instruction = "\nSolve step by step and give the final answer after '####'."
    return Task("gsm8k", train[n_val:], train[:n_val], rows(ds["test"]), instruction)


def check_jsonl(path: str):
    """One-line errors for a .jsonl file that is empty or has a line that is not a JSON object."""
    import json

    rows = 0
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"--task {path}: line {number} is not valid JSON ({e.msg}, column {e.colno})")
            if not isinstance(row, dict):
                fail(f"--task {path}: line {number} is not a JSON object with fields")
            rows += 1
    if rows == 0:
        fail(f"--task {path}: the file has no rows")


def make_file_task(path: str, question_field: str, answer_field: str, solution_field: str, seed: int) -> Task:
    """A local json/jsonl/parquet file; 10% validation and 10% test (at most 200 each), split by seed."""
    import datasets

    datasets.disable_progress_bars()
    kind = "parquet" if path.endswith(".parquet") else "json"
    if path.endswith(".jsonl"):
        check_jsonl(path)
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        fail(f"--task {path}: could not read the file ({type(e).__name__}{': ' + reason if reason else ''})")
    for flag, field in (("--question-field", question_field), ("--answer-field", answer_field)):
        if field not in ds.column_names:
            fail(f"{flag} {field!r}: {path} has no such field (fields: {', '.join(ds.column_names)})")
    missing = [i for i, r in enumerate(ds) if r[question_field] is None or r[answer_field] is None]
    if missing:
        fail(f"--task {path}: {len(missing)} rows have no {question_field!r} or no {answer_field!r}"
             f" (the first: row {missing[0] + 1}, {dict(ds[missing[0]])})"[:300])  # fmt: skip
    has_solution = solution_field in ds.column_names
    has_skill = "skill" in ds.column_names  # optional: lets --target-skills and per-skill metrics use it
    examples = [
        {
            "question": str(r[question_field]),
            "answer": gsm8k_answer(str(r[answer_field])),
            "solution": str(r[solution_field]) if has_solution else "",
            **({"skill": str(r["skill"])} if has_skill else {}),
        }
        for r in ds
    ]
    if len(examples) < 3:
        fail(f"--task {path}: needs at least 3 examples to split, found {len(examples)}")
    random.Random(seed).shuffle(examples)
    n_held = max(1, min(200, len(examples) // 10))
    return Task(os.path.basename(path), examples[2 * n_held :], examples[:n_held], examples[n_held : 2 * n_held])


def load_task(
    name: str, seed: int = 0, question_field="question", answer_field="answer", solution_field="solution"
) -> Task:
    """`chain` (one fixed split, whatever the seed), `gsm8k`, or the path of a .json/.jsonl/.parquet file (split
    by the seed)."""
    if name == "chain":  # one fixed world for every run seed: the tiny model's warm-up used this train split
        return make_chain()
    if name == "gsm8k":
        return make_gsm8k(seed)
    if name.endswith(FILE_EXTENSIONS):
        if not os.path.isfile(name):
            fail(f"--task {name}: no such file")
        return make_file_task(name, question_field, answer_field, solution_field, seed)
    fail(f"--task {name!r}: unknown task; expected 'chain', 'gsm8k' or a path to a .json/.jsonl/.parquet file")
