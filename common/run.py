"""The run's life and evaluation, the one handle a script's loop talks to: start-up (the task, the settled flags, the
policy), the run folder opened, the console and the logs, signals, the stop rules, held-out evaluation (accuracy as
the verifier judges it), checkpoints called by name. The one file of `common/` that imports the built-in world."""

import contextlib
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import time
import uuid
from dataclasses import asdict, replace
from importlib.metadata import version

import numpy as np
import torch
from tqdm import tqdm

import common.folder as folder  # the run folder and its checkpoints
from common.errors import fail, warn
from common.flags import check_resumed_args, check_shared_flags
from common.lora import add_lora
from common.model import load_policy
from common.sampling import Scored, prompt_ids, rollout_texts, seeded_generator, unfaithful
from common.torchrun import all_reduce, from_main_rank, gathered, is_main, setup_distributed
from common.verifier import in_form, is_correct
from common.world import model_folder, task_named  # the one place the built-in world plugs in

NON_FINITE_STOP = 3  # steps in a row whose gradient was not finite before the run stops
NO_SIGNAL_WARN = 10  # steps in a row where every group had equal rewards before a warning
# Ctrl-C, and what a scheduler (Slurm, Kubernetes: SIGTERM) or a closed terminal (SIGHUP; not on Windows) sends.
STOP_SIGNALS = {getattr(signal, name): label for name, label in (("SIGINT", "Ctrl-C"), ("SIGTERM", "SIGTERM"),
                                                                 ("SIGHUP", "SIGHUP")) if hasattr(signal, name)}


class Run:
    """What a script's loop calls by name at each of its stops (`Run(...)`, `open`, `timer`, `log`, `stop_reason`,
    `evaluate`, `save`, `finish`), so that the loop itself stays in the script (grpo.py's `main` is the model).
    On ranks other than 0 nothing is written or printed: callers need no rank checks."""

    def __init__(self, args, script: str, check_args):
        """Start-up of the script at path `script`, in this order: the flags every script shares, the task, the
        flags settled into `self.args` (--max-new-tokens 0 becomes the task's own, --resume's folder a full path;
        the caller's `args` stays as given), the script's `check_args` on those, the policy (--resume: its
        checkpoint, step and training time). Nothing is written: `open` claims the run folder."""
        self.script = os.path.basename(script).removesuffix(".py")
        self.previous_handlers = {sig: signal.signal(sig, lambda number, _: fail(
            f"stopped during start-up by {STOP_SIGNALS[number]}; the run folder was not made")) for sig in STOP_SIGNALS}
        resume = os.path.expanduser(args.resume) if args.resume else None
        if resume:
            check_resumed_args(args, resume, self.script)
        self.run_dir = folder.run_folder_of(args, self.script, resume)  # checked: a plain name, a place to write
        check_shared_flags(args)
        self.rank, self.world, self.device = setup_distributed(args.device)
        for seed in (random.seed, np.random.seed, torch.manual_seed):
            seed(args.seed)
        task = task_named(args)
        if (args.reward == "strict" or args.format_bonus) and not task.asked_form:
            fail(f"{'--reward strict' if args.reward == 'strict' else '--format-bonus'}: the questions of {task.name}"
                 " ask for no answer form (none names `####` or \\boxed); add it to every question, or use --reward"
                 " answer without --format-bonus")  # fmt: skip
        task_limit = not args.max_new_tokens  # 0 (the default): the task's own; an error about it says so
        self.args = args = replace(args, resume=resume, max_new_tokens=args.max_new_tokens or task.max_new_tokens)
        try:
            check_args(args, self.world)
        except SystemExit as e:  # a resumed run's flags come from its args.json: a hand-edit is to blame, not a flag
            if resume and str(e.code).startswith("error: "):
                fail(f"--resume {resume}: args.json holds a value the script refuses ({str(e.code)[7:]})")
            raise
        if getattr(args, "fsdp", False) and self.world == 1:
            warn("--fsdp: one process holds the whole model, nothing is sharded; launch with torchrun to shard")
        self.reward_form = task.asked_form if args.reward == "strict" else None  # where reward and verifier look
        from_main_rank(lambda: model_folder(args.model))  # converts a GGUF on first use, on rank 0; the others wait
        self.model_path = model_folder(args.model)
        sharded = getattr(args, "fsdp", False) and self.world > 1
        dtype = torch.float32 if sharded else getattr(torch, args.dtype)  # --fsdp: fp32 shards, --dtype computes
        self.checkpoint, self.state = None, {"step": 0, "train_time": 0.0}
        if resume:
            found = folder.last_checkpoint(self.run_dir, dtype, self.device, args, self.model_path)
            self.checkpoint, self.model, self.tokenizer, self.state = found
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
        self.start, self.train_time = self.state["step"], self.state["train_time"]
        self.evaluation_due = not resume or ((self.start % args.eval_every == 0 or self.start == args.steps) and
                                             from_main_rank(lambda: not folder.evaluated(self.run_dir, self.start)))
        if resume and self.start >= args.steps and not self.evaluation_due:
            fail(f"--resume {self.run_dir}: the run has done all {args.steps} of its steps, nothing is left; to train"
                 f" further, resume with --steps above {self.start}")  # fmt: skip
        self.phase_seconds, self.files, self.tracker, self.non_finite_run, self.no_signal_run = {}, {}, None, 0, 0
        self.signalled = self.interrupted = self.signal_number = None  # this rank's signal; one all ranks agreed on

    def describe(self) -> str:
        """The first console line of a run: where it writes, what it trains, on what."""
        return (f"run folder {self.run_dir} | model {self.model_path} | task {self.task.name}"
                f" ({len(self.task.train)} train prompts) | {self.world} process(es) on {self.device}")  # fmt: skip

    def open(self, optimizer, reward):
        """The one step between start-up and the loop, once every start-up check has passed (a run that cannot start
        writes nothing): the optimizer (--resume: its state and the random states come back) and the script's reward
        (evaluation logs it beside the accuracy) taken in, the run folder claimed, its logs opened."""
        self.optimizer, self.reward, self.lr = optimizer, reward, self.args.lr
        if self.checkpoint:
            folder.restore_trainer_state(self.state, self.model, optimizer)
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

    @folder.when_disk_full
    def claim(self) -> str:
        """The run folder, made and locked, with args.json and versions.json; on --resume locked and cut back to
        the checkpoint's step, the resume recorded in resumes.jsonl."""
        versions = {"python": platform.python_version(), **{p: version(p) for p in ("torch", "transformers",
                                                                                    "datasets")}}  # fmt: skip
        if self.args.resume:
            record = {"from_step": self.start, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions,
                      "args": asdict(self.args)}  # fmt: skip
            self.lock = folder.reopen_run_folder(self.run_dir, self.start, record)
            return self.run_dir
        files = {"args.json": json.dumps({"script": self.script, **asdict(self.args)}, indent=1),
                 "versions.json": json.dumps(versions, indent=1)}  # fmt: skip
        claimed, self.lock = folder.claim_run_folder(self.run_dir, files, numbered=not self.args.run_name)
        return claimed

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

    def set_learning_rate(self, done: int):
        """The learning rate of step `done` (counted from 1, as the logs count), the step about to run: --warmup-steps W
        of linear warm-up (--lr/W, 2 --lr/W, ..., no step at 0), then --lr-schedule: constant, or a linear or cosine
        decay to 0 at --steps, as transformers' schedules do. It depends on the step alone: a resume goes on exactly."""
        a = self.args
        progress = (done - 1 - a.warmup_steps) / max(1, a.steps - a.warmup_steps)
        decay = {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
        self.lr = a.lr * (done / a.warmup_steps if done <= a.warmup_steps else decay[a.lr_schedule])
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

    @folder.when_disk_full
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
        """Held-out accuracy as the verifier judges it, the script's reward beside it, and the script's own figures
        (`more`), logged and printed. Skipped after a signal, which asks the run to stop soon (a resume makes it up)."""
        if self.interrupted:
            return
        a = self.args
        with gathered(self.model):  # a sharded model's weights, gathered once for the whole evaluation
            metrics = held_out_metrics(self.model, self.tokenizer, self.task, self.reward, self.reward_form,
                                       a.eval_prompts, a.max_new_tokens, a.temperature,
                                       self.generator("eval", step, device=self.device), self.rank, self.world)
        metrics |= more or {}
        self.record(step, {**metrics, "time/train_elapsed": self.train_time})
        self.print(eval_line(step, metrics))

    @folder.when_disk_full
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
                for i, text in enumerate(scored.texts[:4]):
                    row = {"step": step, "question": scored.examples[0]["question"], "completion": text,
                           "reward": scored.rewards.flatten()[i].item(), "shaped": scored.shaped.flatten()[i].item(),
                           "correct": bool(scored.correct.flatten()[i])}  # fmt: skip
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

    @folder.when_disk_full
    def save(self, step: int, state: dict | None = None):
        """A checkpoint: the policy, the optimizer, the random states, the training time and the script's `state`."""
        self.checkpoint = folder.save_checkpoint(self.run_dir, step, self.model, self.tokenizer, self.optimizer,
                                          {"train_time": self.train_time, **(state or {})})  # fmt: skip

    @folder.when_disk_full
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
            raise SystemExit(128 + (self.signal_number or signal.SIGTERM))
        if is_main():
            print(f"done: {self.run_dir} (metrics.jsonl, checkpoints/)")


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


def held_out_metrics(model, tokenizer, task, reward, form, n_prompts, max_new_tokens, temperature, generator,
                     rank=0, world=1, samples=1) -> dict:  # fmt: skip
    """`eval/acc_greedy` and `eval/acc_sampled` (`samples` per prompt): the share of the first `n_prompts` test prompts
    the verifier judges right (in the run's reward `form`), sharded over ranks; the same per skill. Beside them what the
    reward pays: the script's mean `reward` (`eval/reward_*`), the share in the task's asked form (`eval/format_frac_*`)
    and, where the task checks steps, the unfaithful share of right answers (`eval/unfaithful_*`)."""
    skills = sorted({e["skill"] for e in task.test[:n_prompts] if "skill" in e})  # the same on every rank
    metrics = {}
    for mode in ("greedy", "sampled"):
        repeats = samples if mode == "sampled" else 1  # greedy decoding gives the same answer every time
        examples = [e for e in task.test[:n_prompts] for _ in range(repeats)][rank::world]
        texts = rollout_texts(model, tokenizer, [e["question"] for e in examples], task.instruction, max_new_tokens,
                              temperature, mode == "greedy", generator)  # fmt: skip
        correct = [is_correct(t, e["answer"], form) for e, t in zip(examples, texts)]  # the verifier's verdict
        rewards = [reward(e, t, form) for e, t in zip(examples, texts)]  # the script's reward, as in training
        is_unfaithful, formed = unfaithful(task, examples, texts, correct), [in_form(t, task.asked_form) for t in texts]
        sums = []
        for skill in [None, *skills]:
            rows = [i for i, e in enumerate(examples) if skill is None or e.get("skill") == skill]
            sums += [sum(values[i] for i in rows) for values in (correct, rewards, is_unfaithful, formed)] + [len(rows)]
        sums = all_reduce(sums)
        for j, skill in enumerate([None, *skills]):
            right, total_reward, unfaithful_count, in_form_count, total = sums[5 * j : 5 * j + 5]
            metrics[f"eval/acc_{mode}" + (f"/{skill}" if skill else "")] = right / max(1, total)
            if skill is None:
                metrics[f"eval/reward_{mode}"] = total_reward / max(1, total)
            if task.asked_form and skill is None:
                metrics[f"eval/format_frac_{mode}"] = in_form_count / max(1, total)
            if task.faithful and skill is None:
                metrics[f"eval/unfaithful_{mode}"] = unfaithful_count / max(1, right)
    return metrics


def eval_line(step: int, metrics: dict) -> str:
    """The console line of an evaluation: overall figures (the reward only where it differs from the accuracy), the
    asked form's share, accuracy per skill, a target's."""

    def figures(prefix: str) -> str:
        own = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix) and "/" not in k[len(prefix) :]}
        return " ".join(f"{k} {v:.3f}" for k, v in own.items() if "format" not in k
                        and not (k.startswith("reward_") and v == own.get("acc_" + k[7:])))  # fmt: skip

    form = " ".join(f"{k[17:]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/format_frac_"))
    skills = " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items() if k.startswith("eval/acc_sampled/"))
    target = figures("eval_target/")
    return (f"step {step:4d} | eval {figures('eval/')}" + (f" | in the asked form: {form}" if form else "")
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
