"""Answer extraction, normalisation and checking: the reward of a response, and for `chain` whether its steps
are faithful (checked by the world, `common/world/chain.py`)."""

import re
from collections import namedtuple
from fractions import Fraction

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str):
    """Content of the last \\boxed{...}, matching nested braces; None if there is none (or it is unclosed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_answer(text: str, numeric: bool = True):
    """The final answer of a response: after the last `####` (the first number there; for a text answer the
    rest of that line), else the last \\boxed{}, else (for a numeric answer) the last number."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].replace("$", "")
        if not numeric:
            return tail.strip().split("\n")[0]
        match = NUMBER.search(tail)
        return match.group() if match else None
    boxed = last_boxed(text)
    if boxed is not None or not numeric:
        return boxed
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize(answer) -> str:
    """Canonical form: no commas, `$`, spaces or \\frac; numbers as reduced fractions ('3.0' -> '3', '6/8' -> '3/4')."""
    if answer is None:
        return ""
    s = answer.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    s = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", s)
    s = re.sub(r"\\text\{[^{}]*\}", "", s).replace("{", "").replace("}", "")
    try:
        return str(Fraction(s))
    except (ValueError, ZeroDivisionError):
        return s


def is_correct(response: str, gold: str) -> bool:
    """The response's final answer equals the gold one, after `normalize`. A gold answer that is not a number
    (`Paris`) is read from the response as text."""
    gold = normalize(gold)
    pred = normalize(extract_answer(response, numeric=NUMBER.fullmatch(gold) is not None))
    return pred != "" and pred == gold


Verdict = namedtuple("Verdict", "reward correct faithful")  # faithful is None where the task cannot check steps


def verify(task_name: str, example: dict, response: str) -> Verdict:
    """The verifiable reward of one response (1 if its final answer is right, else 0), and whether its
    written steps are faithful to the question (`chain` only)."""
    correct = is_correct(response, example["answer"])
    faithful = None
    if task_name == "chain":
        from common.world.chain import chain_faithful  # here: the world is built on this module (normalize)

        faithful = chain_faithful(example["question"], response)
    return Verdict(float(correct), correct, faithful)


def count_correct_unfaithful(scores) -> tuple[int, int]:
    """(number correct, number correct but unfaithful) of a list of `score` results."""
    return sum(s.correct for s in scores), sum(s.correct and s.faithful is False for s in scores)
