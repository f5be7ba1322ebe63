"""The command line: flags parsed into a script's Args (a resumed run's own flags as the defaults), the one-line
checks every script's flags share, and which flags a resumed run may change."""

import importlib.util
import json
import math
import os
import re
import shlex
import sys
from dataclasses import fields, replace
from typing import Literal, get_args, get_origin

import tyro

from common.errors import fail, first_line, warn


def flag(name: str) -> str:
    """The command-line flag of an Args field: `max_new_tokens` -> `--max-new-tokens`."""
    return "--" + name.replace("_", "-")


# Flags a resumed run may change: they set how long it runs and what it logs, never what it computes.
CHANGEABLE_ON_RESUME = ("resume", "steps", "max_time", "log_every", "eval_every", "eval_prompts", "save_every",
                        "device", "track", "wandb_project", "wandb_entity")  # fmt: skip


def parse_args(Args, argv=None):
    """The command line as Args. With --resume RUN it is parsed again with the run's saved flags as the
    defaults, so a flag left out keeps the run's value and a flag given at the run's own value changes nothing."""
    check_choices(Args, sys.argv[1:] if argv is None else argv)
    args = tyro.cli(Args, args=argv)
    if args.resume:
        known = {f.name: f.default for f in fields(Args)}
        saved = saved_args(os.path.expanduser(args.resume), Args).items()
        own = {k: tuple(v) if isinstance(known[k], tuple) else v for k, v in saved if k in known}
        args = tyro.cli(Args, args=argv, default=replace(Args(), **own))
    return args


def check_choices(Args, argv):
    """A flag that takes one of a few names (`--lr-schedule step`): an unknown one is a one-line error."""
    for field in (f for f in fields(Args) if get_origin(f.type) is Literal):
        names = [str(c) for c in get_args(field.type)]
        for i, word in enumerate(argv):
            name, equals, value = word.partition("=")
            value = value if equals else argv[i + 1] if i + 1 < len(argv) else ""
            if name == flag(field.name) and value not in names:
                fail(f"{name} {value}".strip() + f": expected {', '.join(names[:-1])} or {names[-1]}")


def saved_args(run_dir: str, Args, script: str | None = None) -> dict:
    """The flags a run was started with (its args.json), checked: readable, an object, made by `script`, every
    value one its flag could have had (not a hand-edited mistake)."""
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path):
        fail(f"--resume {run_dir}: no args.json there; is it a run folder?")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        fail(f"--resume {run_dir}: args.json is damaged ({first_line(e)}); the run's flags cannot be restored")
    if not isinstance(saved, dict):
        fail(f"--resume {run_dir}: args.json holds a JSON {type(saved).__name__}, not the run's flags")
    made_by, known = saved.pop("script", None), {f.name: f for f in fields(Args)}
    foreign = [flag(name) for name in saved if name not in known]
    if script and made_by not in (None, script):
        fail(f"--resume {run_dir}: the run was made by {made_by}.py, not {script}.py; continue it with"
             f" python {made_by}.py --resume {shlex.quote(run_dir)}")  # fmt: skip
    if script and foreign:  # a run made before args.json named its script
        fail(f"--resume {run_dir}: the run has flags {script}.py does not know ({', '.join(foreign)});"
             " it was made by another script")  # fmt: skip
    for name, value in saved.items():
        if name in known and not of_type(value, known[name]):
            fail(f"--resume {run_dir}: args.json has {name} = {json.dumps(value)}, not a value of {flag(name)}")
    return saved


def of_type(value, field) -> bool:
    if get_origin(field.type) is Literal:
        return value in get_args(field.type)
    kind = type(field.default)
    if kind in (bool, int):
        return type(value) is kind
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, list) if kind is tuple else value is None or isinstance(value, str)


def check_shared_flags(args):
    """The flags every script has, checked before anything loads."""
    if not 0 <= args.seed < 2**32:
        fail(f"--seed {args.seed}: must be between 0 and {2**32 - 1}")
    if not 0 <= args.warmup_steps < args.steps:
        fail(f"--warmup-steps {args.warmup_steps}: must be at least 0 and below --steps {args.steps}")
    for name in ("format_bonus", "answer_credit", "lora_rank", "lora_alpha"):
        if getattr(args, name) < 0 or name == "lora_alpha" and args.lora_alpha == 0:
            fail(f"{flag(name)} {getattr(args, name)}: must be {'positive' if name == 'lora_alpha' else 'at least 0'}")
    if args.bonus_needs_right and not args.format_bonus:
        fail("--bonus-needs-right: only with --format-bonus (it says where the bonus is paid)")
    if args.answer_credit and args.reward != "strict":
        fail(f"--answer-credit {args.answer_credit}: only with --reward strict (--reward answer pays every right"
             " answer already)")  # fmt: skip
    if args.track and importlib.util.find_spec("wandb") is None:
        fail("--track: Weights & Biases is not installed; install it with: pip install -r requirements-real.txt")
    if args.lora_rank and getattr(args, "train_params", ""):
        fail(f"--train-params {args.train_params!r} with --lora-rank: LoRA trains its adapter and freezes every"
             " weight; give one of the two")  # fmt: skip
    if args.lora_rank and getattr(args, "fsdp", False):
        fail("--fsdp with --lora-rank: not supported; a LoRA run trains few parameters, so launch torchrun without"
             " --fsdp (each rank holds the whole model)")  # fmt: skip


def check_resumed_args(args, run_dir: str, script: str):
    """--resume continues the run as it was: every flag but those of CHANGEABLE_ON_RESUME must have the run's
    value (`parse_args` gives every flag left out the run's value), or it is a one-line error."""
    for name, value in saved_args(run_dir, type(args), script).items():
        if name not in CHANGEABLE_ON_RESUME and json.loads(json.dumps(getattr(args, name))) != value:
            changeable = ", ".join(flag(f) for f in CHANGEABLE_ON_RESUME[1:])
            fail(f"{flag(name)} {getattr(args, name)}: the resumed run has {value}; on --resume only {changeable}"
                 " may change")  # fmt: skip


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
