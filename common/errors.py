"""The one-line messages every file uses: `fail` for a user's mistake, `warn` for a legal but suspicious value."""

import math
import os
import re
import tempfile
from dataclasses import fields


def fail(message: str):
    """Stop with a one-line error for a user mistake (no traceback, exit status 1). Under torchrun rank 0 prints
    it; every rank stops (the mistakes are the same on every rank, and rank 0 reports for them all)."""
    raise SystemExit(f"error: {message}" if os.environ.get("RANK", "0") == "0" else 1)


def warn(message: str):
    """A one-line warning, printed once (by rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", flush=True)


def flag(name: str) -> str:
    """The command-line flag of an Args field: `max_new_tokens` -> `--max-new-tokens`."""
    return "--" + name.replace("_", "-")


def first_line(error: Exception, width: int = 160) -> str:
    return (str(error).strip().splitlines() or [""])[0][:width]


def check_flags(args, positive=(), non_negative=(), below_one=(), may_be_infinite=()):
    """One-line errors for a flag that must be > 0, >= 0 or < 1, for any float flag that is not finite (NaN, or
    infinite unless listed in `may_be_infinite`), and for a `*_params` pattern that is not a regular expression:
    `--lr -1.0: must be positive`, `--lr inf: must be finite`. Warnings for values legal but almost surely wrong."""
    for field in fields(args):
        value = getattr(args, field.name)
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value) and field.name not in may_be_infinite):
            fail(f"{flag(field.name)} {value}: must be finite")
        if field.name.endswith("temperature") and value and not 0.1 <= value <= 5:
            warn(f"{flag(field.name)} {value:g}: sampling temperatures are almost always between 0.1 and 5; near 0"
                 " the log-probabilities overflow, far above 1 the samples are noise")  # fmt: skip
        if field.name == "beta" and value > 1:
            warn(f"{flag(field.name)} {value:g}: a KL coefficient this large outweighs the reward of 0 or 1;"
                 " usual values are 0.001 to 0.1")  # fmt: skip
        if field.name.endswith("_params") and isinstance(value, str):  # --grad-params, --train-params: patterns
            try:
                re.compile(value)
            except re.error as e:
                fail(f"{flag(field.name)} {value!r}: not a regular expression ({e})")
    rules = ((positive, lambda v: v > 0, "positive"), (non_negative, lambda v: v >= 0, "non-negative"),
             (below_one, lambda v: v < 1, "below 1"))  # fmt: skip
    for names, ok, word in rules:
        for name in names:
            if not ok(getattr(args, name)):
                fail(f"{flag(name)} {getattr(args, name)}: must be {word}")


def creation_problem(folder: str) -> str | None:
    """Why `folder` could not be created, or None: a probe folder is made (and removed) in its nearest existing
    parent, so nothing is left behind when a run stops at a later error."""
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent))
    except OSError as e:
        return e.strerror
    return None
