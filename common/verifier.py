"""The verifier: a response's final answer, extracted, normalised and compared with the gold one. The reward a
script trains on is built from `is_correct`, in the script. What it accepts and refuses: docs/verifier.md."""

import re
from fractions import Fraction

# One number as written: a sign (`−` too), `$`, digits (commas only in groups of three), decimals, an exponent (of at
# most 3 digits: no answer costs a huge integer) or a fraction of integers (not over 0), `%`; never glued to a letter.
NUMBER = re.compile(r"(?<![\w.])[-+−]?\$?(?:\d+/0*[1-9]\d*|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d{1,3})?"
                    r"|\.\d+)%?(?!\w)")  # fmt: skip
PUNCTUATION = " \t.,;:?()[]\"'$="  # what may stand around the one number besides words: nothing that changes its value


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


def plain(text: str) -> str:
    """LaTeX and Markdown as plain text: \\frac{a}{b} as a/b, \\text{kg} as a word, `\\$` as `$`, no braces or `**`."""
    text = re.sub(r"\\text\{([^{}]*)\}", r" \1 ", re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", text))
    return re.sub(r"\\([$%])", r"\1", text).replace("{", "").replace("}", "").replace("**", " ")


def one_number(text: str):
    """The number in `text` when it is the only one, with only words and punctuation around it; else None: a hedge
    (`4 or 5`) or an expression (`2^10`, `1+1=2`) is no answer, so it is never paid for one of its parts."""
    numbers, rest = NUMBER.findall(plain(text)), re.sub(r"\b[^\W\d_]+\b", "", NUMBER.sub(" ", plain(text)))
    return numbers[0] if len(numbers) == 1 and not rest.strip(PUNCTUATION) else None


def written_in(text: str, form: str):
    """What is written in `form`: the rest of the line after the last `####`, or the last \\boxed{...}, or None."""
    if form == "####":
        return text.rsplit("####", 1)[1].strip().split("\n")[0] if "####" in text else None
    return last_boxed(text)


def in_form(text: str, form: str | None) -> bool:
    """The response writes one number in the asked form (`####` or `\\boxed{}`), right or wrong: not an expression
    (`#### 4 + 6 = 10`), a hedge or a word, which no reward reads as a numeric answer."""
    return bool(form) and extract_answer(text, True, form) is not None


def extract_answer(text: str, numeric: bool = True, form: str | None = None):
    """The final answer: the rest of the line after the last `####`, else the last \\boxed{}, else (if `numeric`) the
    last number; with a `form`, only what is written in it. A numeric answer is its one number, or None."""
    found = written_in(text, form or ("####" if "####" in text else "\\boxed{}"))
    if found is None:
        return (NUMBER.findall(plain(text)) or [None])[-1] if numeric and not form else None
    return one_number(found) if numeric else found


def normalize(answer) -> str:
    """Canonical form: a number as a reduced fraction ('3.0' -> '3', '6/8' -> '3/4', '$1,000' -> '1000', '−5' ->
    '-5'); text without spaces, commas, `$` or \\frac, so that `\\frac{1}{2}` and `1/2` compare equal."""
    if answer is None:
        return ""
    s = plain(answer).replace(" ", "").rstrip(".")
    try:
        return str(Fraction(re.sub("[,$%]", "", s).replace("−", "-"))) if NUMBER.fullmatch(s) else re.sub("[,$]", "", s)
    except ValueError:  # an integer over Python's 4300 digits: compared as written
        return s


def is_correct(response: str, gold: str, form: str | None = None) -> bool:
    """The response's final answer equals the gold one, after `normalize`; with a `form` (`####` or `\\boxed{}`),
    only an answer written in that form counts. A gold answer that is not a number (`Paris`) is read as text."""
    gold = normalize(gold)
    return gold != "" and normalize(extract_answer(response, NUMBER.fullmatch(gold) is not None, form)) == gold
