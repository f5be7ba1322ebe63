"""The verifier: a response's final answer, extracted, normalised and compared with the gold one. The reward a
script trains on is built from `is_correct`, in the script."""

import re
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
