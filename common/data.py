"""Tasks: GSM8K and local json/jsonl/parquet files (the built-in `chain` is the world's, `common/world/chain.py`).
Every task yields examples `{"question": str, "answer": str, "solution": str}`: the gold final `answer`, and a worked
`solution` ending in `#### <answer>` (empty when the source has none); `chain`'s also carry a `skill`."""

import codecs
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import fail, first_line, warn
from common.verifier import is_correct, normalize

FILE_EXTENSIONS = (".json", ".jsonl", ".parquet")
SPLIT_SIZES = {"validation": 300, "test": 300}  # held-out sizes; the rest of the pool is `train`
JSON_KINDS = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}  # else a number


@dataclass
class Task:
    name: str
    train: list
    validation: list
    test: list
    instruction: str = ""  # appended to the question for chat models
    max_new_tokens: int = 512  # the completion length limit when --max-new-tokens is 0
    target_skills: tuple = ()  # the skills a curriculum aims at when none are given (`chain`: its weak skill)
    faithful: Callable | None = None  # (question, response) -> whether the written steps are the question's (`chain`)
    asked_form: str | None = "####"  # where the prompts ask for the final answer: `####`, `\\boxed{}` or unstated


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


def final_answer(text: str) -> str:
    """A gold answer as the verifier compares it: what follows the last `####` of a worked solution (GSM8K's
    answers, a data file's), else the text itself; without thousands commas."""
    return text.split("####")[-1].strip().replace(",", "")


def make_gsm8k(seed: int = 0) -> Task:
    """GSM8K (openai/gsm8k, main) via `datasets`; validation is a fixed slice of the train split."""
    import datasets

    try:
        ds = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as e:  # offline, or the hub is unreachable
        fail(f"--task gsm8k: could not load openai/gsm8k ({type(e).__name__}); it needs the network (or the"
             " datasets cache), or give a local copy: --task gsm8k_train.jsonl with its question and answer fields")
    rows = lambda split: [{"question": r["question"], "answer": final_answer(r["answer"]), "solution": r["answer"]}
                          for r in split]  # noqa: E731
    train, n_val = rows(ds["train"]), SPLIT_SIZES["validation"]
    random.Random(seed).shuffle(train)
    instruction = "\nSolve step by step and give the final answer after '####'."
    return Task("gsm8k", train[n_val:], train[:n_val], rows(ds["test"]), instruction)


def file_text(path: str) -> str:
    """A data file's text: UTF-8, with or without a byte-order mark; anything else is a one-line error."""
    with open(path, "rb") as f:
        data = f.read().removeprefix(codecs.BOM_UTF8)
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
        kind = JSON_KINDS.get(type(json.loads(text)), "number")  # numbers were read as text above: ask again
        fail(f"--task {path}: expected a list of rows or an object of columns, found a JSON {kind}")
    return [(f"row {i}", row) for i, row in enumerate(data, 1)]


def parquet_rows(path: str) -> list[tuple[str, object]]:
    import pyarrow.parquet

    try:
        data = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as e:  # not a parquet file, or a damaged one
        fail(f"--task {path}: could not read the file ({type(e).__name__}: {first_line(e, 120)})")
    return [(f"row {i}", row) for i, row in enumerate(data, 1)]


def refuse_rows(path: str, problem: str, bad: list[tuple[str, object]]):
    """A one-line error, if any row of a data file has `problem`: how many, and the first of them."""
    if bad:
        where, row = bad[0]
        fail(f"--task {path}: {len(bad)} row(s) {problem} (the first: {where}, {json.dumps(row, default=str)})"[:300])


def text_field(value) -> str | None:
    """A question or answer as text: strings as they are, numbers as written (parquet's typed columns)."""
    return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


def file_examples(path: str, rows, question_field: str, answer_field: str, solution_field: str) -> list[dict]:
    """The examples of a data file's rows, checked (one-line errors): every row an object with a non-empty question
    and an answer the verifier can match (a response ending `#### <answer>` must be scored correct); no repeats."""
    if not rows:
        fail(f"--task {path}: the file has no rows")
    refuse_rows(path, "are not JSON objects with fields", [(w, r) for w, r in rows if not isinstance(r, dict)])
    names = sorted({name for _, row in rows for name in row})
    for flag, field in (("--question-field", question_field), ("--answer-field", answer_field)):
        if field not in names:
            fail(f"{flag} {field!r}: {path} has no such field (fields: {', '.join(names)})")
    if question_field == answer_field:
        fail(f"--answer-field {answer_field!r}: the same field as --question-field; every answer would be its question")
    q, a = question_field, answer_field
    refuse_rows(path, f"have no {q!r} or no {a!r}", [(w, r) for w, r in rows if r.get(q) is None or r.get(a) is None])
    refuse_rows(path, f"have a {q!r} or {a!r} that is neither text nor a number",
                [(w, r) for w, r in rows if text_field(r[q]) is None or text_field(r[a]) is None])  # fmt: skip
    examples = [{"question": text_field(r[q]), "answer": final_answer(text_field(r[a])),
                 "solution": text_field(r.get(solution_field)) or "",
                 **({"skill": str(r["skill"])} if r.get("skill") is not None else {})} for _, r in rows]  # fmt: skip
    refuse_rows(path, f"have an empty {q!r}", [row for row, e in zip(rows, examples) if not e["question"].strip()])
    refuse_rows(path, f"have an empty {a!r}, which no response can match",
                [row for row, e in zip(rows, examples) if not e["answer"]])  # fmt: skip
    refuse_rows(path, f"have an {a!r} that the verifier cannot match even when a response ends `#### <that answer>`",
                [row for row, e in zip(rows, examples) if not is_correct(f"#### {e['answer']}", e["answer"])])
    return unique_questions(path, rows, examples)


def unique_questions(path: str, rows, examples: list[dict]) -> list[dict]:
    """Each question once, at its first row, so that no held-out question is also a train one: a repeat (the same
    text but for surrounding whitespace) is dropped with a warning, or is an error when it has another answer."""
    first = {}
    for (where, _), e in zip(rows, examples):
        first_where, seen = first.setdefault(e["question"].strip(), (where, e))
        if normalize(e["answer"]) != normalize(seen["answer"]):
            fail(f"--task {path}: {where} asks the question of {first_where} again, with another answer")
    if len(first) < len(examples):
        warn(f"--task {path}: dropping {len(examples) - len(first)} rows that repeat an earlier row's question")
    return [e for _, e in first.values()]


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
    return Task(os.path.basename(path), examples[2 * n_held :], examples[:n_held], examples[n_held : 2 * n_held],
                asked_form=stated_form([e["question"] for e in examples]))


def stated_form(questions: list[str]) -> str | None:
    """The answer form every question of a file names (`####` or `\\boxed`), or None when they state none."""
    for form, word in (("####", "####"), ("\\boxed{}", "\\boxed")):
        if all(word in q for q in questions):
            return form
    return None


def load_task(name: str, seed: int = 0, question_field="question", answer_field="answer",
              solution_field="solution") -> Task:  # fmt: skip
    """`gsm8k`, or the path of a .json/.jsonl/.parquet file (split by the seed). `chain` is the world's."""
    if name == "gsm8k":
        return make_gsm8k(seed)
    if name.endswith(FILE_EXTENSIONS):
        name = os.path.expanduser(name)
        if not os.path.isfile(name):
            fail(f"--task {name}: no such file")
        return make_file_task(name, question_field, answer_field, solution_field, seed)
    fail(f"--task {name!r}: unknown task; expected 'chain', 'gsm8k' or a path to a .json/.jsonl/.parquet file")
