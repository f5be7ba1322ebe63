"""What every script does the same way: start-up, the step's prompts and their scores, held-out evaluation,
and the bookkeeping around the algorithm's steps (timing, logging, evaluation, checkpoints, the stop rule)."""

import json
import os
import shlex
import signal
from collections import namedtuple
from dataclasses import dataclass, fields, replace
from typing import Literal, get_args, get_origin

import torch

from common.data import Task, load_task
from common.model import first_line, load_policy, prompt_text, read_policy, resolve_model
from common.reward import count_correct_unfaithful, verify
from common.rollout import sample
from common.run import (
    PhaseTimer,
    RunLogger,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    check_run_name,
    complete_checkpoints,
    creation_problem,
    fail,
    flag,
    gathered,
    is_main,
    read_trainer_state,
    refuse_existing,
    restore_trainer_state,
    run_folder,
    save_checkpoint,
    seed_everything,
    seeded_generator,
    setup_distributed,
    stopped_before_saving,
    warn,
)


@dataclass
class Session:
    rank: int
    world: int
    device: torch.device
    task: Task
    run_dir: str
    model_path: str  # the initial model (built `tiny`, hub id or folder)
    checkpoint: str | None  # the checkpoint resumed from, if any
    trainer_state: dict  # its trainer_state.pt (step, optimizer, random states, the script's own state)
    model: torch.nn.Module
    tokenizer: object
    script: str  # e.g. "pods", for the command that resumes the run

    def describe(self) -> str:
        """The first console line of a run: where it writes, what it trains, on what."""
        return (f"run folder {self.run_dir} | model {self.model_path} | task {self.task.name}"
                f" ({len(self.task.train)} train prompts) | {self.world} process(es) on {self.device}")  # fmt: skip


# Flags a resumed run may change: they set how long it runs and what it logs, never what it computes.
CHANGEABLE_ON_RESUME = ("resume", "steps", "max_time", "log_every", "eval_every", "eval_prompts", "save_every",
                        "device")  # fmt: skip


def saved_args(run_dir: str, script: str) -> dict:
    """The flags a run was started with (its args.json), checked: readable, an object, made by this script."""
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
    made_by = saved.get("script")
    if made_by is not None and made_by != script:
        fail(f"--resume {run_dir}: the run was made by {made_by}.py, not {script}.py; continue it with"
             f" python {made_by}.py --resume {shlex.quote(run_dir)}")  # fmt: skip
    return saved


def check_saved_value(run_dir: str, field, value, default):
    """A one-line error for a value in args.json that the flag could not have had (a hand-edited file)."""
    if get_origin(field.type) is Literal:
        ok = value in get_args(field.type)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, list)
    else:  # a text flag, possibly None
        ok = value is None or isinstance(value, str)
    if not ok:
        fail(f"--resume {run_dir}: args.json has {field.name} = {json.dumps(value)}, not a value of {flag(field.name)}")


def restore_args(args, run_dir: str, script: str):
    """--resume continues the run as it was: every flag takes the run's saved value (args.json), except those
    of CHANGEABLE_ON_RESUME given anew. Another flag given with a different value is an error. A flag counts as
    given when it differs from its default (so one given at its default value is taken as not given)."""
    saved = saved_args(run_dir, script)
    defaults, known = type(args)(), {field.name for field in fields(args)}
    foreign = [flag(name) for name in saved if name not in known and name != "script"]
    if foreign:  # a run made before args.json named its script
        fail(f"--resume {run_dir}: the run has flags {script}.py does not know ({', '.join(foreign)});"
             " it was made by another script")  # fmt: skip
    for field in fields(args):
        name, value, default = field.name, getattr(args, field.name), getattr(defaults, field.name)
        if name not in saved:  # a flag newer than the run keeps the value it has
            continue
        check_saved_value(run_dir, field, saved[name], default)
        given = value != default
        if given and name in CHANGEABLE_ON_RESUME:
            continue
        if given and json.loads(json.dumps(value)) != saved[name]:
            changeable = ", ".join(flag(f) for f in CHANGEABLE_ON_RESUME[1:])
            fail(f"{flag(name)} {value}: the resumed run has {saved[name]}; on --resume only {changeable} may change")
        setattr(args, name, tuple(saved[name]) if isinstance(default, tuple) else saved[name])


def warn_unusual(args):
    """Warnings for values that are legal but almost surely a mistake."""
    for field in fields(args):
        value = getattr(args, field.name)
        if field.name.endswith("temperature") and value and not 0.1 <= value <= 5:
            warn(f"{flag(field.name)} {value:g}: sampling temperatures are almost always between 0.1 and 5; near 0"
                 " the log-probabilities overflow, far above 1 the samples are noise")  # fmt: skip
        if field.name == "beta" and value > 1:
            warn(f"{flag(field.name)} {value:g}: a KL coefficient this large outweighs the reward of 0 or 1;"
                 " usual values are 0.001 to 0.1")  # fmt: skip


def open_session(args, script: str, check_args) -> Session:
    """torchrun ranks, the script's own checks, seeding, the task, and the policy (the newest checkpoint that
    loads with --resume, whose saved arguments the run takes back). Nothing is written here: the run folder
    is claimed when the run starts (`TrainingLoop.open_run_folder`), after every start-up check."""
    if args.resume:
        args.resume = os.path.expanduser(args.resume)
        restore_args(args, args.resume, script)
    else:
        check_run_name(args.output_dir, args.run_name)
    if not 0 <= args.seed < 2**32:
        fail(f"--seed {args.seed}: must be between 0 and {2**32 - 1}")
    rank, world, device = setup_distributed(args.device)
    check_args(args, world)
    if getattr(args, "fsdp", False) and world == 1:
        warn("--fsdp: one process holds the whole model, nothing is sharded; launch with torchrun to shard")
    warn_unusual(args)
    seed_everything(args.seed)
    task = load_task(args.task, args.seed, args.question_field, args.answer_field,
                     getattr(args, "solution_field", "solution"))  # fmt: skip
    args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    run_dir = args.resume or run_folder(args.output_dir, args.run_name, script, args.seed)
    named = args.run_name and not args.resume  # a default name never collides: the claim numbers it
    if named and os.path.exists(run_dir) and not stopped_before_saving(run_dir):  # early; the claim decides
        refuse_existing(run_dir)
    problem = creation_problem(run_dir)
    if problem:
        fail(f"{'--resume' if args.resume else '--output-dir'}: cannot create {run_dir} ({problem})")
    if is_main():
        resolve_model(args.model)  # builds `tiny` on first use, on rank 0 only; the others wait
    barrier()
    model_path = resolve_model(args.model)
    sharded = getattr(args, "fsdp", False) and world > 1
    dtype = torch.float32 if sharded else getattr(torch, args.dtype)  # --fsdp: fp32 shards, --dtype computes
    if args.resume:
        checkpoint, model, tokenizer, state = newest_loadable_checkpoint(run_dir, dtype, device)
    else:
        (model, tokenizer), checkpoint, state = load_policy(model_path, dtype, device), None, {}
    model.eval()
    task = drop_long_prompts(task, tokenizer, model, args.max_new_tokens)
    if args.eval_prompts > len(task.test):
        fail(f"--eval-prompts {args.eval_prompts}: the test split of {task.name} has only {len(task.test)} prompts")
    return Session(rank, world, device, task, run_dir, model_path, checkpoint, state, model, tokenizer, script)


def newest_loadable_checkpoint(run_dir: str, dtype, device):
    """(checkpoint, model, tokenizer, trainer state) of the newest complete checkpoint that loads; a damaged
    one (a truncated file) is passed over with a warning, so the run goes on from the one before."""
    for checkpoint in complete_checkpoints(run_dir, warn=warn_main):
        try:
            model, tokenizer = read_policy(checkpoint, dtype, device)
            state = read_trainer_state(checkpoint)
        except Exception as e:  # a damaged file raises one of many exception types, from several libraries
            warn(f"skipping the damaged checkpoint {checkpoint} ({type(e).__name__}: {first_line(e, 100)})")
            continue
        warn_main(f"resuming {run_dir} from {os.path.basename(checkpoint)}, with the run's own settings")
        return checkpoint, model, tokenizer, state
    if stopped_before_saving(run_dir):
        fail(f"--resume {run_dir}: the run stopped before its first complete checkpoint, so it cannot be resumed;"
             f" start it again with the same --run-name, which replaces it")  # fmt: skip
    fail(f"--resume {run_dir}: no checkpoint there loads")


def warn_main(line: str):
    if is_main():
        print(line, flush=True)


def drop_long_prompts(task: Task, tokenizer, model, max_new_tokens: int) -> Task:
    """The task without the prompts that leave the model no room for --max-new-tokens (the position limit
    counts the prompt and the completion), with a warning that counts them; an error if a split is left empty."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not positions:
        return task
    if max_new_tokens >= positions:
        fail(f"--max-new-tokens {max_new_tokens}: the model's positions end at {positions} (prompt included)")
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


def prompt_ids(tokenizer, questions, instruction: str = "") -> list[list[int]]:
    """Token ids of each question as the model sees it (chat template for instruct models)."""
    return [tokenizer(prompt_text(tokenizer, q, instruction))["input_ids"] for q in questions]


def draw_prompts(task: Task, tokenizer, seed: int, step: int, batch_prompts: int, rank: int, world: int, pool=None):
    """The step's prompts: the same draw of `batch_prompts` from `pool` (default: the train split) on every
    rank, with replacement, each rank taking its slice. Returns this rank's examples and their token ids."""
    pool = task.train if pool is None else pool
    draw = torch.randint(len(pool), (batch_prompts,), generator=seeded_generator(seed, "prompts", step))
    B = batch_prompts // world
    examples = [pool[i] for i in draw[rank * B : (rank + 1) * B].tolist()]
    return examples, prompt_ids(tokenizer, [e["question"] for e in examples], task.instruction)


Scored = namedtuple("Scored", "examples texts verdicts rewards")  # rewards [prompts, n], one row per prompt


def score_groups(task: Task, tokenizer, examples, rollout, n: int) -> Scored:
    """Decode a rollout of n completions per example (side by side) and score each with the verifier."""
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    scores = [verify(task.name, examples[i // n], text) for i, text in enumerate(texts)]
    return Scored(examples, texts, scores, torch.tensor([s.reward for s in scores]).view(len(examples), n))


def frac_zero_std(rewards: torch.Tensor) -> float:
    """Share of groups (rows) whose rewards are all equal: their group advantages are 0, no learning signal."""
    return (rewards.max(1).values == rewards.min(1).values).float().mean().item()


def rollout_metrics(task: Task, scored: Scored, rollout) -> dict:
    """The metrics of a step's rollouts that mean the same in every script."""
    correct, unfaithful = count_correct_unfaithful(scored.verdicts)
    return {
        "reward/mean": scored.rewards.mean().item(),
        "reward/zero_std_frac": frac_zero_std(scored.rewards),
        "train/completion_len": rollout.completion_mask.sum(1).float().mean().item(),
        "train/gen_tokens": rollout.completion_mask.sum().item(),
        **({"train/unfaithful": unfaithful / max(1, correct)} if task.name == "chain" else {}),
    }


def peak_memory_gb(device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource  # Unix only
    except ImportError:
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def rollout_texts(model, tokenizer, questions, instruction, max_new_tokens, temperature, greedy, generator,
                  chunk=256):  # fmt: skip
    """Completions (text) and generated-token count for a list of questions, sampled in chunks."""
    texts, tokens = [], 0
    for s in range(0, len(questions), chunk):
        prompts = prompt_ids(tokenizer, questions[s : s + chunk], instruction)
        r = sample(model, prompts, max_new_tokens, temperature, tokenizer.eos_token_id, tokenizer.pad_token_id,
                   greedy=greedy, generator=generator)  # fmt: skip
        texts += tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
        tokens += int(r.completion_mask.sum())
    return texts, tokens


def evaluate(model, tokenizer, task, n_prompts, max_new_tokens, temperature, rank, world, generator,
             samples=1) -> dict:
    """`eval/acc_greedy` and `eval/acc_sampled` (`samples` samples per prompt at `temperature`) on the first
    `n_prompts` test prompts, sharded over ranks, the same per skill (`eval/acc_sampled/<skill>`) where examples
    have one, and for `chain` the unfaithful share of the correct answers."""
    skills = sorted({e["skill"] for e in task.test[:n_prompts] if "skill" in e})  # the same on every rank
    metrics = {}
    for mode in ("greedy", "sampled"):
        repeats = samples if mode == "sampled" else 1  # greedy decoding gives the same answer every time
        examples = [e for e in task.test[:n_prompts] for _ in range(repeats)][rank::world]
        questions = [e["question"] for e in examples]
        texts, _ = rollout_texts(model, tokenizer, questions, task.instruction, max_new_tokens, temperature,
                                 mode == "greedy", generator)  # fmt: skip
        scores = [verify(task.name, e, t) for e, t in zip(examples, texts)]
        counts = []
        for skill in [None, *skills]:
            chosen = [s for e, s in zip(examples, scores) if skill is None or e.get("skill") == skill]
            counts += [*count_correct_unfaithful(chosen), len(chosen)]
        counts = all_reduce_sum(counts)
        for j, skill in enumerate([None, *skills]):
            correct, unfaithful, total = counts[3 * j : 3 * j + 3]
            metrics[f"eval/acc_{mode}" + (f"/{skill}" if skill else "")] = correct / max(1, total)
            if task.name == "chain" and skill is None:
                metrics[f"eval/unfaithful_{mode}"] = unfaithful / max(1, correct)
    return metrics


def eval_line(step: int, metrics: dict) -> str:
    """The console line of an evaluation: overall figures, sampled accuracy per skill, and a target's figures."""
    overall = " ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/") and k.count("/") == 1)
    skills = " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items() if k.startswith("eval/acc_sampled/"))
    target = " ".join(f"{k[12:]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval_target/"))
    return (f"step {step:4d} | eval {overall}" + (f" | sampled by skill: {skills}" if skills else "")
            + (f" | target {target}" if target else ""))  # fmt: skip


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


NON_FINITE_STOP = 3  # steps in a row whose gradient was not finite before the run stops
NO_SIGNAL_WARN = 10  # steps in a row where every group had equal rewards before a warning


class Run:
    """What a script's loop calls by name at each of its stops, so that the loop itself stays in the script:

        run = Run(session, args, optimizer, total_steps)  # --resume: the optimizer, step and train time come back
        run.open()                                         # claims the run folder: nothing is written before
        if run.start == 0:
            run.evaluate(0)
        for step in range(run.start, total_steps):
            with run.timer("generate"): ...                # phases are timed; their sum is the training time
            metrics = all_reduce_mean({..., **run.timer.pop()})   # averaged over ranks
            run.log(step + 1, metrics, shown, scored)      # metrics.jsonl, TensorBoard, the console line
            stop = run.stop_reason(step + 1, metrics)      # Ctrl-C, --max-time, non-finite gradients
            if (step + 1) % args.eval_every == 0 or step + 1 == total_steps or stop:
                run.evaluate(step + 1)
            if ... save ...:
                run.save(step + 1)
            if stop:
                break
        run.finish()                                       # after Ctrl-C: the command that resumes, exit 130

    `run.state` holds what the script saved through `run.save(step, its_state)` in the checkpoint resumed from.
    A first Ctrl-C lets the step finish; `stop_reason` then says so on every rank at the same step.
    """

    def __init__(self, session: Session, args, optimizer, total_steps: int):
        self.session, self.args, self.optimizer, self.total = session, args, optimizer, total_steps
        self.state = session.trainer_state or {"step": 0, "train_time": 0.0}
        if session.checkpoint:
            restore_trainer_state(self.state, session.model, optimizer)
        self.start, self.train_time = self.state["step"], self.state["train_time"]
        if session.checkpoint and self.start >= total_steps:
            more = f"; to train further, resume with --steps above {self.start}" if hasattr(args, "steps") else ""
            fail(f"--resume {session.run_dir}: the run has done all {total_steps} of its steps, nothing is left{more}")
        self.logger = RunLogger(session.run_dir, total_steps, self.start)  # writes nothing before open()
        self.timer = PhaseTimer()
        self.interrupted, self.non_finite_run, self.no_signal_run = False, 0, 0
        self.checkpoint = session.checkpoint
        self.previous_handler = signal.signal(signal.SIGINT, self.on_interrupt)

    def open(self):
        """Claim the run folder, once every start-up check has passed: a run that cannot start writes nothing,
        and a folder belongs to one run."""
        s, a = self.session, self.args
        wanted = s.run_dir
        s.run_dir = self.logger.open(a, s.script, numbered=not (a.resume or a.run_name))
        if s.run_dir != wanted:
            self.print(f"run folder {s.run_dir} ({os.path.basename(wanted)} was taken by a run started that second)")

    def on_interrupt(self, signum, frame):
        if self.interrupted:  # the second Ctrl-C
            raise SystemExit("error: stopped at once by a second Ctrl-C; nothing saved since the last checkpoint")
        self.interrupted = True
        self.print("Ctrl-C: finishing this step, then saving a checkpoint (press Ctrl-C again to stop at once)")

    def print(self, line: str):
        self.logger.print(fit(line))

    def generator(self, stream: str, *keys, device="cpu") -> torch.Generator:
        """This rank's generator for one random stream (e.g. "sample", step); sampling needs it on the device."""
        return seeded_generator(self.args.seed, stream, *keys, self.session.rank, device=device)

    def evaluate(self, step: int, more: dict | None = None):
        """Held-out accuracy (`evaluate`) and any figures the script adds (`more`), logged and printed. Skipped
        after a Ctrl-C, which asks the run to stop soon."""
        if self.interrupted:
            return
        s, a = self.session, self.args
        with gathered(s.model):  # a sharded model's weights, gathered once for the whole evaluation
            metrics = evaluate(s.model, s.tokenizer, s.task, a.eval_prompts, a.max_new_tokens, a.temperature, s.rank,
                               s.world, self.generator("eval", step, device=s.device))  # fmt: skip
        metrics |= more or {}
        self.logger.log(step, {**metrics, "time/train_elapsed": self.train_time})
        self.print(eval_line(step, metrics))

    def log(self, step: int, metrics: dict, shown: dict, scored: Scored | None = None):
        """Log a step's metrics (already averaged over ranks) with its throughput and training time so far,
        advance the progress bar, and every --log-every steps print the `shown` figures and a few samples."""
        times = {k: v for k, v in metrics.items() if k.startswith("time/")}
        self.train_time += sum(times.values())
        for phase, tokens in (("generate", "train/gen_tokens"), ("update", "train/update_tokens")):
            if f"time/{phase}" in times and tokens in metrics:
                metrics[f"throughput/{phase}_tokens_per_s"] = metrics[tokens] / max(metrics[f"time/{phase}"], 1e-9)
        metrics["time/train_elapsed"] = self.train_time
        self.logger.log(step, metrics)
        self.logger.progress(**dict(list(shown.items())[:2]))
        if step % self.args.log_every == 0:
            figures = " | ".join(f"{k} {shown_value(v)}" for k, v in shown.items())
            phases = " ".join(f"{k[5:8]} {v:.2f}s" for k, v in times.items())
            self.print(f"step {step:4d} | {figures} | {phases}")
            if scored is not None:  # the first prompt's first completions, to read what the policy writes
                question = scored.examples[0]["question"]
                self.logger.samples(step, [{"question": question, "completion": t, "reward": v.reward}
                                           for t, v in zip(scored.texts[:4], scored.verdicts[:4])])  # fmt: skip

    def stop_reason(self, step: int, metrics: dict, own: str | None = None) -> str | None:
        """Why the run should stop after this step, if it should: Ctrl-C (every rank agrees on the step),
        several steps in a row whose gradient was not finite (those steps were skipped by `optimizer_step`),
        the script's `own` reason (I-PPO's early stop), or --max-time. Also warns when every group's rewards
        have been equal for a while."""
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
        reason = None
        if self.args.max_time and self.train_time >= self.args.max_time:
            reason = f"--max-time {self.args.max_time:g}s of training reached"
        reason = own or reason
        if self.non_finite_run >= NON_FINITE_STOP:
            reason = (f"{NON_FINITE_STOP} steps in a row had a non-finite gradient; the checkpoint holds the last good"
                      " parameters (lower --lr, or look at the data)")  # fmt: skip
        if all_reduce_max(float(self.interrupted)):  # every rank stops at the same step
            self.interrupted, reason = True, "interrupted (Ctrl-C)"
        if reason and step < self.total:
            self.print(f"stopping at step {step}: {reason}")
        return reason

    def save(self, step: int, state: dict | None = None):
        """A checkpoint of the policy (transformers format), the optimizer, the random states, the training
        time and the script's own `state`."""
        s = self.session
        self.checkpoint = save_checkpoint(s.run_dir, step, s.model, s.tokenizer, self.optimizer,
                                          {"train_time": self.train_time, **(state or {})})  # fmt: skip

    def finish(self):
        """Close the logs; after a Ctrl-C, print the command that resumes and exit with status 130."""
        self.logger.close()
        signal.signal(signal.SIGINT, self.previous_handler)
        run_dir = self.session.run_dir
        if self.interrupted:
            self.print(f"saved {self.checkpoint}; continue with: python {self.session.script}.py --resume"
                       f" {shlex.quote(run_dir)}")  # fmt: skip
            raise SystemExit(130)
        if is_main():
            print(f"done: {run_dir} (metrics.jsonl, checkpoints/)")
