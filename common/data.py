"""Tasks: the built-in `chain` arithmetic task, GSM8K, and local json/jsonl/parquet files.

Every task yields a list of examples `{"question": str, "answer": str, "solution": str}`, where
`answer` is the gold final answer and `solution` a worked gold solution ending in `#### <answer>`
(empty when the source has none). `chain` examples also carry their `skill`.
"""

import codecs
import json
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
    max_new_tokens: int = 512  # the completion length limit when --max-new-tokens is 0


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
    return Task("chain", train, validation, test, CHAIN_INSTRUCTION, max_new_tokens=48)  # chains are short


def of_skills(examples: list, skills) -> list:
    """The examples of the given skills (e.g. the validation prompts of the target skill)."""
    return [e for e in examples if e.get("skill") in skills]


def check_skills(task: Task, skills, flag: str) -> list:
    """The skill names of a flag, checked: known to the task, one-line errors otherwise."""
    known = sorted({e["skill"] for split in (task.train, task.validation, task.test) for e in split if "skill" in e})
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


def file_text(path: str) -> str:
    """A data file's text: UTF-8, with or without a byte-order mark; anything else is a one-line error."""
    with open(path, "rb") as f:
        data = f.read()
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        fail(f"--task {path}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8")


def parsed(text: str):
    """JSON with every number kept as the text it was written as (Python floats would round big integers)."""
    return json.loads(text, parse_int=str, parse_float=str)


def jsonl_rows(path: str, text: str) -> list[tuple[str, object]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((f"line {number}", parsed(line)))
            except json.JSONDecodeError as e:
                fail(f"--task {path}: line {number} is not valid JSON ({e.msg}, column {e.colno})")
    return rows


def json_rows(path: str, text: str) -> list[tuple[str, object]]:
    """A .json file: a list of rows, an object of equal-length columns, or JSON Lines."""
    try:
        data = parsed(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line, in a file named .json
            return jsonl_rows(path, text)
        fail(f"--task {path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})")
    if isinstance(data, dict) and data and all(isinstance(column, list) for column in data.values()):
        if len({len(column) for column in data.values()}) > 1:
            lengths = ", ".join(f"{name} {len(column)}" for name, column in data.items())
            fail(f"--task {path}: its columns have different lengths ({lengths})")
        data = [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        fail(f"--task {path}: expected a list of rows or an object of columns, found a JSON {type(data).__name__}")
    return [(f"row {i}", row) for i, row in enumerate(data, 1)]


def parquet_rows(path: str) -> list[tuple[str, object]]:
    import pyarrow.parquet

    try:
        data = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as e:  # not a parquet file, or a damaged one
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        fail(f"--task {path}: could not read the file ({type(e).__name__}: {reason})")
    return [(f"row {i}", row) for i, row in enumerate(data, 1)]


def first_of(path: str, problem: str, bad: list[tuple[str, object]]):
    """A one-line error for the rows of a data file that have `problem`: their count and the first of them."""
    where, row = bad[0]
    fail(f"--task {path}: {len(bad)} row(s) {problem} (the first: {where}, {json.dumps(row, default=str)})"[:300])


def text_field(value) -> str | None:
    """A question or answer as text: strings as they are, numbers as written; None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # parquet's typed columns
        return str(value)
    return None


def file_examples(path: str, rows, question_field: str, answer_field: str, solution_field: str) -> list[dict]:
    """The examples of a data file's rows, checked: every row an object with a question and an answer that the
    verifier can match (a response that ends `#### <answer>` must be scored correct), each a one-line error."""
    from common.reward import is_correct  # common.reward imports this module

    if not rows:
        fail(f"--task {path}: the file has no rows")
    not_objects = [(where, row) for where, row in rows if not isinstance(row, dict)]
    if not_objects:
        first_of(path, "are not JSON objects with fields", not_objects)
    names = sorted({name for _, row in rows for name in row})
    for flag, field in (("--question-field", question_field), ("--answer-field", answer_field)):
        if field not in names:
            fail(f"{flag} {field!r}: {path} has no such field (fields: {', '.join(names)})")
    if question_field == answer_field:
        fail(f"--answer-field {answer_field!r}: the same field as --question-field; every answer would be its question")
    missing = [(w, r) for w, r in rows if r.get(question_field) is None or r.get(answer_field) is None]
    if missing:
        first_of(path, f"have no {question_field!r} or no {answer_field!r}", missing)
    not_text = [(w, r) for w, r in rows if text_field(r[question_field]) is None or text_field(r[answer_field]) is None]
    if not_text:
        first_of(path, f"have a {question_field!r} or {answer_field!r} that is neither text nor a number", not_text)
    examples = []
    for _, r in rows:
        answer = gsm8k_answer(text_field(r[answer_field]))
        examples.append({"question": text_field(r[question_field]), "answer": answer,
                         "solution": text_field(r.get(solution_field)) or "",
                         **({"skill": str(r["skill"])} if r.get("skill") is not None else {})})  # fmt: skip
    empty = [(w, r) for (w, r), e in zip(rows, examples) if not e["answer"]]
    if empty:
        first_of(path, f"have an empty {answer_field!r}, which no response can match", empty)
    unmatchable = [(w, r) for (w, r), e in zip(rows, examples) if not is_correct(f"#### {e['answer']}", e["answer"])]
    if unmatchable:
        first_of(path, f"have an {answer_field!r} that the verifier cannot match even when a response ends"
                       " `#### <that answer>`", unmatchable)  # fmt: skip
    return examples


def make_file_task(path: str, question_field: str, answer_field: str, solution_field: str, seed: int) -> Task:
    """A local json/jsonl/parquet file; 10% validation and 10% test (at most 200 each), split by seed. Answers
    are kept exactly as written (`0.50`, or an integer of any length)."""
    if path.endswith(".parquet"):
        rows = parquet_rows(path)
    else:
        text = file_text(path)
        rows = jsonl_rows(path, text) if path.endswith(".jsonl") else json_rows(path, text)
    examples = file_examples(path, rows, question_field, answer_field, solution_field)
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
        name = os.path.expanduser(name)
        if not os.path.isfile(name):
            fail(f"--task {name}: no such file")
        return make_file_task(name, question_field, answer_field, solution_field, seed)
    fail(f"--task {name!r}: unknown task; expected 'chain', 'gsm8k' or a path to a .json/.jsonl/.parquet file")
