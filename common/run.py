"""The run's whole life, in the order a script meets it: the command line (and a resumed run's own flags),
start-up (the task, the policy), the run folder (claimed and locked), evaluation, logging, the stop rules,
checkpoints and resume. The one file of `common/` that imports the built-in world (`common/world/`)."""

import contextlib
import errno
import glob
import importlib.util
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, fields, replace
from importlib.metadata import version
from typing import Literal, get_args, get_origin

try:
    import fcntl  # Linux and macOS: a run folder is locked while its run is alive (Windows: not locked)
except ImportError:
    fcntl = None

import numpy as np
import torch
import tyro
from tqdm import tqdm

from common.errors import creation_problem, fail, first_line, flag, warn
from common.lora import add_lora, load_adapter, lora_layers, merged_state_dict, save_adapter
from common.model import load_policy, read_policy
from common.sampling import Scored, prompt_ids, rollout_texts, seeded_generator, unfaithful
from common.torchrun import all_reduce, from_main_rank, gathered, is_main, is_sharded, setup_distributed
from common.verifier import in_form
from common.world import model_folder, task_named  # the one place the built-in world plugs in

# ---- the command line, and a resumed run's own flags ------------------------------------------------------------

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
    wrong = [(name, value) for name, value in saved.items() if name in known and not of_type(value, known[name])]
    if wrong:
        fail(f"--resume {run_dir}: args.json has {wrong[0][0]} = {json.dumps(wrong[0][1])}, not a value of"
             f" {flag(wrong[0][0])}")  # fmt: skip
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
    saved = saved_args(run_dir, type(args), script)
    for name, value in saved.items():
        if name not in CHANGEABLE_ON_RESUME and json.loads(json.dumps(getattr(args, name))) != value:
            changeable = ", ".join(flag(f) for f in CHANGEABLE_ON_RESUME[1:])
            fail(f"{flag(name)} {getattr(args, name)}: the resumed run has {value}; on --resume only {changeable}"
                 " may change")  # fmt: skip


# ---- writing: a full disk is a one-line error -------------------------------------------------------------------


def when_disk_full(method):
    """A Run method that writes, with a full disk or a file-size limit turned into a one-line error that says so
    (torch reports either as an obscure stream error). What was complete stays: the newest checkpoint, the logs."""

    def writing(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (OSError, RuntimeError) as e:
            code = getattr(e, "errno", None)
            if code not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, None) or not re.search(WRITE_ERROR, str(e)):
                raise
            full, limit = "the disk is full", "a file reached the file-size limit (ulimit -f)"
            why = {errno.EFBIG: limit, errno.ENOSPC: full, errno.EDQUOT: "the disk quota is used up"}.get(code)
            if getattr(self, "files", None):  # the run is over: end the progress bar's line, free the folder
                self.bar.close()
                os.close(self.lock)
            fail(f"cannot write in {self.run_dir}: {why or full + ', or ' + limit}; make room, then start again (a run"
                 f" with a checkpoint continues with --resume {shlex.quote(self.run_dir)})")  # fmt: skip

    return writing


WRITE_ERROR = r"No space|quota|too large|iostream|unexpected pos|failed writing|write"  # as OSError and torch say it


# ---- the run ----------------------------------------------------------------------------------------------------

NON_FINITE_STOP = 3  # steps in a row whose gradient was not finite before the run stops
NO_SIGNAL_WARN = 10  # steps in a row where every group had equal rewards before a warning


class Run:
    """What a script's loop calls by name at each of its stops (`Run(...)`, `begin`, `open`, `timer`, `log`,
    `stop_reason`, `evaluate`, `save`, `finish`), so that the loop itself stays in the script (grpo.py's `main`
    is the model). On ranks other than 0 nothing is written or printed: callers need no rank checks."""

    def __init__(self, args, script: str, check_args):
        """Start-up of the script at path `script`: every check, the task, the policy (--resume: its checkpoint).
        Nothing is written: the folder is claimed by `open`, once every check has passed."""
        self.args, self.script = args, os.path.basename(script).removesuffix(".py")
        self.previous_handlers = {sig: signal.signal(sig, lambda number, _: fail(
            f"stopped during start-up by {STOP_SIGNALS[number]}; the run folder was not made")) for sig in STOP_SIGNALS}
        if args.resume:
            args.resume = os.path.expanduser(args.resume)
            check_resumed_args(args, args.resume, self.script)
        else:
            check_run_name(args.output_dir, args.run_name)
        check_shared_flags(args)
        self.rank, self.world, self.device = setup_distributed(args.device)
        try:
            check_args(args, self.world)
        except SystemExit as e:  # a resumed run's flags come from its args.json: a hand-edit is to blame, not a flag
            if args.resume and str(e.code).startswith("error: "):
                fail(f"--resume {args.resume}: args.json holds a value the script refuses ({str(e.code)[7:]})")
            raise
        if getattr(args, "fsdp", False) and self.world == 1:
            warn("--fsdp: one process holds the whole model, nothing is sharded; launch with torchrun to shard")
        for seed in (random.seed, np.random.seed, torch.manual_seed):
            seed(args.seed)
        task = task_named(args)
        if (args.reward == "strict" or args.format_bonus) and not task.answer_form:
            fail(f"{'--reward strict' if args.reward == 'strict' else '--format-bonus'}: the questions of {task.name}"
                 " ask for no answer form (none names `####` or \\boxed); add it to every question, or use --reward"
                 " answer without --format-bonus")  # fmt: skip
        self.form = task.answer_form if args.reward == "strict" else None  # where the reward reads the answer
        task_limit = not args.max_new_tokens  # 0 (the default): the task's own; an error about it says so
        args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
        self.run_dir = args.resume or os.path.join(os.path.expanduser(args.output_dir), args.run_name or
                                                   f"{self.script}__s{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
        if args.run_name and not args.resume and os.path.exists(self.run_dir) and not never_saved(self.run_dir):
            refuse_existing(self.run_dir)  # early; the claim decides (a default name never collides: it is numbered)
        problem = creation_problem(os.path.join(self.run_dir, "checkpoints", "step"))  # probes checkpoints/ on resume
        if problem:
            fail(f"{'--resume' if args.resume else '--output-dir'}: cannot {'write in' if args.resume else 'create'}"
                 f" {self.run_dir} ({problem})")  # fmt: skip
        from_main_rank(lambda: model_folder(args.model))  # converts a GGUF on first use, on rank 0; the others wait
        self.model_path = model_folder(args.model)
        sharded = getattr(args, "fsdp", False) and self.world > 1
        dtype = torch.float32 if sharded else getattr(torch, args.dtype)  # --fsdp: fp32 shards, --dtype computes
        self.checkpoint, self.state = None, {"step": 0, "train_time": 0.0}
        if args.resume:
            self.checkpoint, self.model, self.tokenizer, self.state = last_checkpoint(self.run_dir, dtype, self.device,
                                                                                      args, self.model_path)
        else:
            self.model, self.tokenizer = load_policy(self.model_path, dtype, self.device)
            if args.lora_rank:
                add_lora(self.model, args.lora_rank, args.lora_alpha, args.lora_modules)
        self.model.eval()
        self.task = drop_long_prompts(task, self.tokenizer, self.model, args.max_new_tokens, task_limit)
        if args.eval_prompts > len(self.task.test):
            default = " (the default)" * (args.eval_prompts == type(args)().eval_prompts)
            fail(f"--eval-prompts {args.eval_prompts}{default}: the test split of {task.name} has only"
                 f" {len(task.test)} prompts; pass --eval-prompts {len(task.test)} or fewer")  # fmt: skip

    def describe(self) -> str:
        """The first console line of a run: where it writes, what it trains, on what."""
        return (f"run folder {self.run_dir} | model {self.model_path} | task {self.task.name}"
                f" ({len(self.task.train)} train prompts) | {self.world} process(es) on {self.device}")  # fmt: skip

    def begin(self, optimizer, reward):
        """The optimizer and the script's reward (evaluation reads it too); --resume: the optimizer and random
        states, the step and the training time come back."""
        self.optimizer, self.reward, self.lr = optimizer, reward, self.args.lr
        if self.checkpoint:
            restore_trainer_state(self.state, self.model, optimizer)
        self.start, self.train_time = self.state["step"], self.state["train_time"]
        every, steps = self.args.eval_every, self.args.steps
        self.evaluation_due = not self.checkpoint or ((self.start % every == 0 or self.start == steps) and
                                                      from_main_rank(lambda: not evaluated(self.run_dir, self.start)))
        if self.checkpoint and self.start >= self.args.steps and not self.evaluation_due:
            fail(f"--resume {self.run_dir}: the run has done all {self.args.steps} of its steps, nothing is left;"
                 f" to train further, resume with --steps above {self.start}")  # fmt: skip
        self.phase_seconds, self.files, self.tracker, self.non_finite_run, self.no_signal_run = {}, {}, None, 0, 0
        self.signalled = self.interrupted = None  # a signal this rank received; one every rank has agreed on

    def open(self):
        """Claim the run folder and open its logs, once every start-up check has passed: a run that cannot start
        writes nothing."""
        wanted = self.run_dir
        self.run_dir = from_main_rank(self.claim)
        if self.run_dir != wanted:
            self.print(f"run folder {self.run_dir} ({os.path.basename(wanted)} was taken by a run started that second)")
        for sig in STOP_SIGNALS:  # from now on a signal finishes the step and saves, so nothing is lost
            signal.signal(sig, self.on_interrupt)
        if not is_main():
            return
        from torch.utils.tensorboard import SummaryWriter  # imported only by a run that writes

        self.bar = tqdm(total=self.args.steps, initial=self.start, desc=os.path.basename(self.run_dir),
                        dynamic_ncols=True)  # fmt: skip
        self.files = {name: open(os.path.join(self.run_dir, f"{name}.jsonl"), "a") for name in ("metrics", "samples")}
        self.tb = SummaryWriter(self.run_dir, purge_step=self.start + 1 if self.start else None)
        self.tracker = start_tracking(self.args, self.run_dir) if self.args.track else None

    @when_disk_full
    def claim(self) -> str:
        """The run folder, made and locked; on --resume locked, its logs cut back to the checkpoint's step."""
        versions = {"python": platform.python_version(), **{p: version(p) for p in ("torch", "transformers",
                                                                                    "datasets")}}  # fmt: skip
        record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions, "args": asdict(self.args)}
        if not self.args.resume:
            files = {"args.json": json.dumps({"script": self.script, **asdict(self.args)}, indent=1),
                     "versions.json": json.dumps(versions, indent=1)}  # fmt: skip
            folder, self.lock = claim_run_folder(self.run_dir, files, numbered=not self.args.run_name)
            return folder
        self.lock = lock_folder(self.run_dir)
        if self.lock is None:
            fail(f"--resume {self.run_dir}: another process is running this run right now")
        logs = [os.path.join(self.run_dir, name) for name in ("metrics.jsonl", "samples.jsonl")]
        try:
            kept = [rows_up_to(path, self.start) for path in logs]  # checked before anything is changed
        except SystemExit:
            os.close(self.lock)
            raise
        for path, rows in zip(logs, kept):
            if rows is not None:
                with open(path + ".tmp", "w") as f, removed_on_error(path + ".tmp"):
                    f.writelines(rows)
                os.replace(path + ".tmp", path)
        for partial in glob.glob(os.path.join(self.run_dir, "checkpoints", "*.partial")):  # a kill's, a full disk's
            shutil.rmtree(partial)
        with open(os.path.join(self.run_dir, "resumes.jsonl"), "a") as f:
            f.write(json.dumps({"from_step": self.start, **record}) + "\n")
        return self.run_dir

    def on_interrupt(self, signum, frame):
        """Ctrl-C, or SIGTERM / SIGHUP from a scheduler or a closed terminal: finish the step, save, stop."""
        name = STOP_SIGNALS[signum]
        if self.signalled:  # the second signal
            raise SystemExit(f"error: stopped at once by a second {name}; nothing saved since the last checkpoint")
        self.signalled, self.signal_number = name, signum
        if is_main():  # straight to the file: a print here could interrupt a print of the main program and fail
            with contextlib.suppress(OSError):
                os.write(sys.stderr.fileno(), f"\n{name}: finishing this step, then saving a checkpoint (send it"
                                              " again to stop at once)\n".encode())  # fmt: skip

    def set_learning_rate(self, step: int):
        """The learning rate of the step about to run (`step` counts from 0): --warmup-steps W of linear warm-up
        (--lr/W, 2 --lr/W, ..., so no step is spent at 0), then --lr-schedule: constant, or a linear or cosine decay
        towards 0 at --steps, as transformers' schedules decay. It depends on the step alone: a resume goes on
        exactly."""
        a = self.args
        progress = (step - a.warmup_steps) / max(1, a.steps - a.warmup_steps)
        decay = {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
        self.lr = a.lr * ((step + 1) / a.warmup_steps if step < a.warmup_steps else decay[a.lr_schedule])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def print(self, line: str):
        if is_main():
            tqdm.write(fit(line))  # above the progress bar, once there is one

    def generator(self, stream: str, *keys, device="cpu") -> torch.Generator:
        """This rank's generator for one random stream (e.g. "sample", step); sampling needs it on the device."""
        return seeded_generator(self.args.seed, stream, *keys, self.rank, device=device)

    @contextlib.contextmanager
    def timer(self, phase: str):
        """Seconds of one phase of a step (`with run.timer("generate"):`), logged as `time/<phase>` by `log`."""
        start = time.perf_counter()
        yield
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start

    @when_disk_full
    def record(self, step: int, metrics: dict):
        """One row of metrics.jsonl and TensorBoard (rank 0)."""
        if self.files:
            self.files["metrics"].write(json.dumps({"step": step, **metrics}) + "\n")
            self.files["metrics"].flush()
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            if self.tracker:
                self.tracker.log(metrics, step=step)

    def evaluate(self, step: int, more: dict | None = None):
        """Held-out accuracy under the script's reward, and the figures the script adds (`more`), logged and
        printed. Skipped after a signal, which asks the run to stop soon (the resume makes it up)."""
        if self.interrupted:
            return
        a = self.args
        with gathered(self.model):  # a sharded model's weights, gathered once for the whole evaluation
            metrics = evaluate(self.model, self.tokenizer, self.task, self.reward, self.form, a.eval_prompts,
                               a.max_new_tokens, a.temperature, self.generator("eval", step, device=self.device))
        metrics |= more or {}
        self.record(step, {**metrics, "time/train_elapsed": self.train_time})
        self.print(eval_line(step, metrics))

    @when_disk_full
    def log(self, step: int, metrics: dict, shown: dict, scored: Scored | None = None):
        """Log a step's metrics (averaged over ranks) with its phase times, throughput and training time so far;
        advance the progress bar; every --log-every steps print the `shown` figures and write a few samples."""
        times = {f"time/{phase}": s for phase, s in all_reduce(self.phase_seconds, "mean").items()}
        metrics, self.phase_seconds = metrics | times, {}
        self.train_time += sum(times.values())
        for phase, tokens in (("generate", "train/gen_tokens"), ("update", "train/update_tokens")):
            if f"time/{phase}" in times and tokens in metrics:
                metrics[f"throughput/{phase}_tokens_per_s"] = metrics[tokens] / max(metrics[f"time/{phase}"], 1e-9)
        metrics["time/train_elapsed"], metrics["train/lr"] = self.train_time, self.lr
        self.record(step, metrics)
        if not is_main():
            return
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in list(shown.items())[:2]}, refresh=False)
        self.bar.update(1)
        if step % self.args.log_every == 0:
            figures = " | ".join(f"{k} {shown_value(v)}" for k, v in shown.items())
            phases = " ".join(f"{k[5:8]} {v:.2f}s" for k, v in times.items())
            self.print(f"step {step:4d} | {figures} | {phases}")
            if scored is not None:  # the first prompt's first completions, to read what the policy writes
                question = scored.examples[0]["question"]
                for text, reward in zip(scored.texts[:4], scored.rewards.flatten()[:4].tolist()):
                    row = {"step": step, "question": question, "completion": text, "reward": reward}
                    self.files["samples"].write(json.dumps(row) + "\n")
                self.files["samples"].flush()

    def stop_reason(self, step: int, metrics: dict, own: str | None = None) -> str | None:
        """Why the run should stop after this step, if it should: Ctrl-C (every rank agrees on the step), steps in a
        row whose gradient was not finite (`optimizer_step` skipped them), the script's `own` reason, --max-time.
        Also warns when every group's rewards have been equal for a while."""
        skipped = metrics.get("train/skipped_steps", 0)
        self.non_finite_run = self.non_finite_run + 1 if skipped else 0
        if skipped:
            self.print(f"step {step}: {shown_value(skipped)} optimizer step(s) skipped: the gradient was not finite")
        self.no_signal_run = self.no_signal_run + 1 if metrics.get("reward/zero_std_frac") == 1 else 0
        if self.no_signal_run == NO_SIGNAL_WARN:
            self.print(f"warning: for {NO_SIGNAL_WARN} steps every group's rewards were equal (mean reward"
                       f" {metrics['reward/mean']:.2f}): no completion beat another of its prompt, so the reward"
                       " teaches nothing; usually the task is too hard or too easy for the model, or the policy"
                       " collapsed (--lr too high)")  # fmt: skip
        out_of_time = self.args.max_time and self.train_time >= self.args.max_time
        reason = own or (f"--max-time {self.args.max_time:g}s of training reached" if out_of_time else None)
        if self.non_finite_run >= NON_FINITE_STOP:
            reason = (f"{NON_FINITE_STOP} steps in a row had a non-finite gradient; the checkpoint holds the last good"
                      " parameters (lower --lr, or look at the data)")  # fmt: skip
        if all_reduce(float(bool(self.signalled)), "max"):  # every rank stops, and skips its evaluation, at one step
            self.interrupted = self.signalled or "a signal on another rank"
            reason = f"interrupted ({self.interrupted})"
        if reason and step < self.args.steps:
            self.print(f"stopping at step {step}: {reason}")
        return reason

    @when_disk_full
    def save(self, step: int, state: dict | None = None):
        """A checkpoint: the policy, the optimizer, the random states, the training time and the script's `state`."""
        self.checkpoint = save_checkpoint(self.run_dir, step, self.model, self.tokenizer, self.optimizer,
                                          {"train_time": self.train_time, **(state or {})})  # fmt: skip

    @when_disk_full
    def finish(self):
        """Close the logs; after a signal, print the command that continues the run and exit with status 128 + the
        signal's number, as shells report it (130 after Ctrl-C, 143 after SIGTERM)."""
        if self.files:
            for f in [self.bar, self.tb, *self.files.values()]:
                f.close()
            if self.tracker:
                self.tracker.finish()
            os.close(self.lock)  # the run is over: another process may resume it
            self.files = None
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
        if self.interrupted:
            launcher = f"torchrun --nproc_per_node {self.world} -- " if self.world > 1 else "python "
            self.print(f"saved {self.checkpoint}; continue with: {launcher}{self.script}.py --resume"
                       f" {shlex.quote(self.run_dir)}")  # fmt: skip
            raise SystemExit(128 + getattr(self, "signal_number", signal.SIGTERM))
        if is_main():
            print(f"done: {self.run_dir} (metrics.jsonl, checkpoints/)")


# ---- start-up helpers ---------------------------------------------------------------------------------------


def start_tracking(args, run_dir: str):
    """A Weights & Biases run (--track) that logs what metrics.jsonl logs, with the run's flags as its config. A
    resumed run goes on logging into the W&B run it started (the id is kept in the run folder)."""
    import wandb

    id_file = os.path.join(run_dir, "wandb_id")
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else uuid.uuid4().hex[:12]
    with open(id_file, "w") as f:
        f.write(run_id)
    return wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=os.path.basename(run_dir), id=run_id,
                      resume="allow", config=asdict(args), dir=run_dir, settings=wandb.Settings(console="off"))


# Ctrl-C, and what a scheduler (Slurm, Kubernetes: SIGTERM) or a closed terminal (SIGHUP; not on Windows) sends.
STOP_SIGNALS = {getattr(signal, name): label for name, label in (("SIGINT", "Ctrl-C"), ("SIGTERM", "SIGTERM"),
                                                                 ("SIGHUP", "SIGHUP")) if hasattr(signal, name)}


def evaluated(run_dir: str, step: int) -> bool:
    """Whether metrics.jsonl holds an evaluation of `step` (a signal during that step skips it, to stop soon)."""
    rows = map(json.loads, rows_up_to(os.path.join(run_dir, "metrics.jsonl"), step, warn=lambda line: None) or [])
    return any(row["step"] == step and any(key.startswith("eval/") for key in row) for row in rows)


def drop_long_prompts(task, tokenizer, model, max_new_tokens: int, by_default: bool = False):
    """The task without the prompts that leave the model no room for --max-new-tokens (its positions count prompt
    and completion), with a warning that counts them; an error if a split is left empty."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not positions:
        return task
    if max_new_tokens >= positions:
        fail(f"--max-new-tokens {max_new_tokens}{' (the default for this task)' * by_default}: the model's positions"
             f" end at {positions} (prompt included); pass a smaller --max-new-tokens")  # fmt: skip
    room, kept, dropped, first = positions - max_new_tokens, {}, [], None
    for split in ("train", "validation", "test"):
        examples = getattr(task, split)
        ids = prompt_ids(tokenizer, [e["question"] for e in examples], task.instruction)
        kept[split] = [e for e, p in zip(examples, ids) if len(p) <= room]
        if len(kept[split]) < len(examples):
            dropped.append(f"{len(examples) - len(kept[split])} of {len(examples)} {split}")
            first = first or next(e for e, p in zip(examples, ids) if len(p) > room)["question"]
        if examples and not kept[split]:
            fail(f"--task {task.name}: every {split} prompt is longer than {room} tokens (the model's {positions}"
                 f" positions less --max-new-tokens {max_new_tokens})")  # fmt: skip
    if dropped:
        warn(f"dropping prompts longer than {room} tokens (the model's {positions} positions less --max-new-tokens"
             f" {max_new_tokens}): {', '.join(dropped)}; the first begins {first[:40]!r}")  # fmt: skip
    return replace(task, **kept)


# ---- held-out evaluation -------------------------------------------------------------------------------------


def evaluate(model, tokenizer, task, reward, form, n_prompts, max_new_tokens, temperature, generator,
             samples=1) -> dict:  # fmt: skip
    """`eval/acc_greedy` and `eval/acc_sampled` (`samples` per prompt): the mean of the script's `reward` (under the
    run's `form`) on the first `n_prompts` test prompts, sharded over ranks; the same per skill; the share that
    answers in the task's asked form (`eval/format_frac_*`), whatever the reward; where the task checks steps, the
    unfaithful share of the rewarded answers."""
    skills = sorted({e["skill"] for e in task.test[:n_prompts] if "skill" in e})  # the same on every rank
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    metrics = {}
    for mode in ("greedy", "sampled"):
        repeats = samples if mode == "sampled" else 1  # greedy decoding gives the same answer every time
        examples = [e for e in task.test[:n_prompts] for _ in range(repeats)][rank::world]
        texts = rollout_texts(model, tokenizer, [e["question"] for e in examples], task.instruction, max_new_tokens,
                              temperature, mode == "greedy", generator)  # fmt: skip
        rewards = [reward(e, t, form) for e, t in zip(examples, texts)]  # the script's reward, as in training
        flawed, formed = unfaithful(task, examples, texts, rewards), [in_form(t, task.answer_form) for t in texts]
        sums = []
        for skill in [None, *skills]:
            rows = [i for i, e in enumerate(examples) if skill is None or e.get("skill") == skill]
            sums += [sum(rewards[i] for i in rows), sum(rewards[i] > 0 for i in rows), sum(flawed[i] for i in rows),
                     sum(formed[i] for i in rows), len(rows)]  # fmt: skip
        sums = all_reduce(sums)
        for j, skill in enumerate([None, *skills]):
            total_reward, rewarded, unfaithful_count, in_form_count, total = sums[5 * j : 5 * j + 5]
            metrics[f"eval/acc_{mode}" + (f"/{skill}" if skill else "")] = total_reward / max(1, total)
            if task.answer_form and skill is None:
                metrics[f"eval/format_frac_{mode}"] = in_form_count / max(1, total)
            if task.check_steps and skill is None:
                metrics[f"eval/unfaithful_{mode}"] = unfaithful_count / max(1, rewarded)
    return metrics


def eval_line(step: int, metrics: dict) -> str:
    """The console line of an evaluation: overall figures, the asked form's share, accuracy per skill, a target's."""
    overall = " ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/") and k.count("/") == 1
                       and "format" not in k)  # fmt: skip
    form = " ".join(f"{k[17:]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/format_frac_"))
    skills = " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items() if k.startswith("eval/acc_sampled/"))
    target = " ".join(f"{k[12:]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval_target/"))
    return (f"step {step:4d} | eval {overall}" + (f" | in the asked form: {form}" if form else "")
            + (f" | sampled by skill: {skills}" if skills else "") + (f" | target {target}" if target else ""))


def shown_value(v) -> str:
    """A number for the console: integers as integers, small values in scientific notation."""
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1:
        return str(int(v))
    return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.1e}"


def fit(line: str, width: int = 120) -> str:
    """Break a console line at its ` | ` separators so that no line is wider than `width`."""
    parts, lines = line.split(" | "), []
    for part in parts:
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " | " + part
        else:
            lines.append(part if not lines else "    " + part)
    return "\n".join(lines)


# ---- the run folder: claimed atomically, locked while its run is alive ------------------------------------------


def check_run_name(output_dir: str, run_name: str | None):
    """A run folder is a plain folder inside --output-dir: no empty --output-dir, no --run-name that climbs or nests."""
    if not output_dir.strip():
        fail("--output-dir '': give a folder (e.g. runs, or . for the current folder)")
    if run_name is not None and (not run_name.strip() or run_name in (".", "..") or "/" in run_name
                                 or os.sep in run_name or run_name.startswith(".")):  # fmt: skip
        fail(f"--run-name {run_name!r}: must be a plain folder name (no path separators, not starting with .)")
    if run_name is not None and len(run_name.encode()) > 240:  # file systems allow 255; staging adds a suffix
        fail(f"--run-name: {len(run_name.encode())} bytes long; at most 240")


def refuse_existing(folder: str):
    if not os.path.isdir(folder):
        fail(f"--run-name: {folder} exists and is not a folder; choose another name")
    fail(f"--run-name: {folder} already exists; choose another name, or continue it with"
         f" --resume {shlex.quote(folder)}")  # fmt: skip


def lock_folder(path: str) -> int | None:
    """An open descriptor of `path` holding an exclusive lock on it, or None when another process holds one (the
    system drops a lock when its process ends, however it ends)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def never_saved(run_dir: str) -> bool:
    """A run folder whose run started (args.json) but never completed a checkpoint: it cannot be resumed."""
    return os.path.exists(os.path.join(run_dir, "args.json")) and not complete_checkpoints(run_dir)


def claim_run_folder(run_dir: str, first_files: dict, numbered: bool) -> tuple[str, int]:
    """Create `run_dir` with `first_files` ({name: text}) in it, locked (until the process ends): they are written
    into a hidden folder renamed into place, and a rename never replaces a folder that holds files, so of two runs
    given one name exactly one gets it; the other stops with a one-line error. `numbered` (a default name): take
    <run_dir>_2, _3, ... instead. A folder whose run never saved a checkpoint is replaced, with a warning."""
    parent = os.path.dirname(os.path.abspath(run_dir))
    os.makedirs(parent, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    names = [f"{run_dir}_{i}" if i > 1 else run_dir for i in range(1, 1000)] if numbered else [run_dir, run_dir]
    for folder in names:
        staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.")
        with removed_on_error(staging):
            os.chmod(staging, 0o777 & ~umask)  # as os.mkdir would make it, not mkdtemp's private 0o700
            for name, text in first_files.items():
                with open(os.path.join(staging, name), "w") as f:
                    f.write(text)
            lock = lock_folder(staging)
        try:
            os.rename(staging, folder)
            return folder, lock
        except OSError:  # the folder exists (and is not empty)
            os.close(lock)
            shutil.rmtree(staging)
        if numbered:
            continue
        if not os.path.isdir(folder):
            fail(f"--run-name: {folder} exists and is not a folder; choose another name")
        lock = lock_folder(folder)
        if lock is None:
            fail(f"--run-name: {folder} is in use by another run right now; choose another name")
        if not never_saved(folder):
            os.close(lock)
            refuse_existing(folder)
        warn(f"replacing {folder}: its run stopped before its first checkpoint, so it cannot be resumed")
        shutil.rmtree(folder)  # under its lock; the next pass renames this run's folder into its place
        os.close(lock)
    fail(f"--output-dir: could not claim a run folder near {run_dir}")


@contextlib.contextmanager
def removed_on_error(path: str):
    """`path` (a file or a folder) removed if the block fails: a full disk leaves no half-written copy."""
    try:
        yield
    except BaseException:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        raise


def rows_up_to(path: str, step: int, warn=warn) -> list[str] | None:
    """The rows of a .jsonl log up to `step` (None without the file). A torn last line (a kill during a write) is
    dropped with a warning (`warn`); a damaged line before it is a one-line error."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if number < len(lines):
                fail(f"--resume {os.path.dirname(path)}: line {number} of {os.path.basename(path)} is damaged (not a"
                     " row with a step); repair or delete that line")  # fmt: skip
            warn(f"dropping the torn last line of {path} (line {number}: {line.strip()[:60]!r})")
            break
        if row["step"] <= step:
            rows.append(line if line.endswith("\n") else line + "\n")
    return rows


# ---- checkpoints and resume -------------------------------------------------------------------------------------


def save_checkpoint(run_dir: str, step: int, model, tokenizer, optimizer, state: dict) -> str:
    """`checkpoints/step_<N>/`: the model as transformers saves it (with LoRA: merged, and the adapter alone in
    `adapter/`), and `trainer_state.pt` (optimizer, step, random states) for --resume. Rank 0 writes into a folder
    renamed when complete: a kill never leaves one that looks so."""
    folder = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    weights = optimizer_state = None  # unsharded: the model's and the optimizer's own state_dict(), on rank 0
    if is_sharded(model):  # every rank sends its shards; rank 0 gets the whole of each
        from common.fsdp import whole_state_dicts

        weights, optimizer_state = whole_state_dicts(model, optimizer)
    if not is_main():
        return folder
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    with removed_on_error(partial):  # a full disk leaves no half-written folder behind
        if lora_layers(model):  # the adapter folded in, as an ordinary model; and the adapter alone, for --resume
            weights = merged_state_dict(model)
            save_adapter(model, os.path.join(partial, "adapter"))
        model.save_pretrained(partial, state_dict=weights)
        tokenizer.save_pretrained(partial)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        torch.save({"step": step, "optimizer": optimizer_state or optimizer.state_dict(), "rng": rng, **state},
                   f"{partial}/trainer_state.pt")  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)  # the same step saved by an earlier attempt of this run
    os.replace(partial, folder)
    return folder


def complete_checkpoints(run_dir: str, warn=lambda line: None) -> list[str]:
    """A run's checkpoints that finished saving, newest first; one cut off while saving is passed over (`warn`)."""
    folder = os.path.join(run_dir, "checkpoints")
    found = []
    for name in sorted(os.listdir(folder), reverse=True) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if not name.startswith("step_"):
            continue
        if name.endswith(".partial") or not all(os.path.exists(os.path.join(path, f))
                                                for f in ("config.json", "trainer_state.pt")):  # fmt: skip
            warn(f"warning: skipping the incomplete checkpoint {path}")
            continue
        found.append(path)
    return found


def last_checkpoint(run_dir: str, dtype, device, args, base: str):
    """(checkpoint, model, tokenizer, trainer state) of the newest complete checkpoint that loads; a damaged one
    is passed over with a warning. A LoRA run's adapter goes back on its `base` model."""
    say = lambda line: print(line, flush=True) if is_main() else None  # noqa: E731
    for checkpoint in complete_checkpoints(run_dir, warn=say):
        try:
            model, tokenizer = read_policy(base if args.lora_rank else checkpoint, dtype, device)
            if args.lora_rank:
                load_adapter(model, os.path.join(checkpoint, "adapter"), args)
            state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
            if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= set(state):
                raise ValueError("trainer_state.pt lacks the step, optimizer or random states")
        except Exception as e:  # a damaged file raises one of many exception types, from several libraries
            warn(f"skipping the damaged checkpoint {checkpoint} ({type(e).__name__}: {first_line(e, 100)})")
            continue
        say(f"resuming {run_dir} from {os.path.basename(checkpoint)}, with the run's own settings")
        return checkpoint, model, tokenizer, state
    if never_saved(run_dir):
        fail(f"--resume {run_dir}: the run stopped before its first complete checkpoint, so it cannot be resumed;"
             f" start it again with the same --run-name, which replaces it")  # fmt: skip
    fail(f"--resume {run_dir}: no checkpoint there loads")


def restore_trainer_state(state: dict, model, optimizer):
    """Put a checkpoint's optimizer and random states back (a sharded model's optimizer takes its shard)."""
    if is_sharded(model):
        from common.fsdp import load_optimizer_state

        load_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
