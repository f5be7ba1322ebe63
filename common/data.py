"""Tasks: the built-in `chain` arithmetic task, GSM8K, and local json/jsonl/parquet files.

Every task yields a list of examples `{"question": str, "answer": str, "solution": str}`, where
`answer` is the gold final answer and `solution` a worked gold solution ending in `#### <answer>`
(empty when the source has none).
"""

import os
import random
from dataclasses import dataclass

# Difficulty levels of the `chain` pool: (number of operations, largest operand).
CHAIN_LEVELS = ((1, 5), (2, 5), (3, 6), (4, 6))
SPLIT_SIZES = {"validation": 200, "test": 200}  # held-out sizes; the rest of the pool is `train`
CHAIN_POOL = 3000
FILE_EXTENSIONS = (".json", ".jsonl", ".parquet")


def fail(message: str):
    """Stop with a one-line error for a user mistake (no traceback, exit status 1)."""
    raise SystemExit(f"error: {message}")


@dataclass
class Task:
    name: str
    train: list
    validation: list
    test: list
    instruction: str = ""  # appended to the question for chat models


def chain_question(rng: random.Random, n_ops: int, max_operand: int):
    """One chained arithmetic problem: its question, operands and operators.

    The running value stays within [0, 2 * max_operand]: an operation that would leave that range is
    flipped (+ <-> -), so every intermediate result is a small non-negative number.
    """
    value = rng.randint(1, max_operand)
    operands, ops = [value], []
    for _ in range(n_ops):
        x, op = rng.randint(1, max_operand), rng.choice("+-")
        if (op == "-" and value - x < 0) or (op == "+" and value + x > 2 * max_operand):
            op = "+" if op == "-" else "-"
        value = value + x if op == "+" else value - x
        operands.append(x)
        ops.append(op)
    question = "What is " + str(operands[0]) + "".join(o + str(x) for o, x in zip(ops, operands[1:])) + "?"
    return question, operands, ops


def chain_steps(operands, ops):
    """The faithful steps [(left, op, right, result), ...] of a chain."""
    steps, value = [], operands[0]
    for op, right in zip(ops, operands[1:]):
        result = value + right if op == "+" else value - right
        steps.append((value, op, right, result))
        value = result
    return steps


def format_solution(steps, answer) -> str:
    return " ".join(f"{a}{op}{b}={c}" for a, op, b, c in steps) + f" #### {answer}"


def chain_example(rng: random.Random, level: int) -> dict:
    question, operands, ops = chain_question(rng, *CHAIN_LEVELS[level])
    steps = chain_steps(operands, ops)
    answer = str(steps[-1][3])
    return {"question": question, "answer": answer, "solution": format_solution(steps, answer), "level": level}


def corrupt_one_step(example: dict, rng: random.Random, keep_answer: bool) -> str:
    """A solution with exactly one wrong step result.

    keep_answer=True gives an *unfaithful* solution: the last step's written result is wrong but the
    `####` answer is right (the steps before it stay chained, so the answer still depends on them).
    keep_answer=False puts the wrong result at a random step and carries it through to a wrong answer.
    """
    operands, ops = parse_chain_question(example["question"])
    steps = chain_steps(operands, ops)
    i = len(steps) - 1 if keep_answer else rng.randrange(len(steps))
    a, op, b, c = steps[i]
    wrong = c + rng.choice([-1, 1]) * rng.randint(1, 3)
    if keep_answer:
        steps[i] = (a, op, b, wrong)
        return format_solution(steps, example["answer"])
    steps = steps[:i] + [(a, op, b, wrong)] + chain_steps([wrong] + operands[i + 2 :], ops[i + 1 :])
    return format_solution(steps, steps[-1][3])


def parse_chain_question(question: str):
    """Operands and operators of 'What is 12+7-5?' -> ([12, 7, 5], ['+', '-'])."""
    expr = question.removeprefix("What is ").rstrip("?")
    operands, ops, number = [], [], ""
    for ch in expr:
        if ch in "+-" and number:
            operands.append(int(number))
            ops.append(ch)
            number = ""
        else:
            number += ch
    operands.append(int(number))
    return operands, ops


def make_chain(seed: int = 0, pool: int = CHAIN_POOL) -> Task:
    """A pool of distinct questions, split into disjoint train/validation/test by seed.

    Each question's level is drawn uniformly, but the easy levels have few distinct questions (1 op on
    1..5 has 50), so the pool is weighted toward the harder levels. Validation and test come from the
    same mix as train, so held-out accuracy measures the distribution the policy trains on.
    """
    rng = random.Random(seed)
    seen, examples = set(), []
    while len(examples) < pool:
        ex = chain_example(rng, level=rng.randrange(len(CHAIN_LEVELS)))
        if ex["question"] not in seen:
            seen.add(ex["question"])
            examples.append(ex)
    rng.shuffle(examples)
    n_val, n_test = SPLIT_SIZES["validation"], SPLIT_SIZES["test"]
    return Task("chain", examples[n_val + n_test :], examples[:n_val], examples[n_val : n_val + n_test])


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


def make_file_task(path: str, question_field: str, answer_field: str, solution_field: str, seed: int) -> Task:
    """A local json/jsonl/parquet file; 10% validation and 10% test (at most 200 each), split by seed."""
    import datasets

    kind = "parquet" if path.endswith(".parquet") else "json"
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:
        fail(f"--task {path}: could not read the file ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    for flag, field in (("--question-field", question_field), ("--answer-field", answer_field)):
        if field not in ds.column_names:
            fail(f"{flag} {field!r}: {path} has no such field (fields: {', '.join(ds.column_names)})")
    has_solution = solution_field in ds.column_names
    examples = [
        {
            "question": str(r[question_field]),
            "answer": gsm8k_answer(str(r[answer_field])),
            "solution": str(r[solution_field]) if has_solution else "",
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
    """`chain`, `gsm8k`, or the path of a .json/.jsonl/.parquet file."""
    if name == "chain":
        return make_chain(seed)
    if name == "gsm8k":
        return make_gsm8k(seed)
    if name.endswith(FILE_EXTENSIONS):
        if not os.path.isfile(name):
            fail(f"--task {name}: no such file")
        return make_file_task(name, question_field, answer_field, solution_field, seed)
    fail(f"--task {name!r}: unknown task; expected 'chain', 'gsm8k' or a path to a .json/.jsonl/.parquet file")
