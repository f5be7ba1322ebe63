"""What every script does the same way: start-up, the step's prompt draw, held-out evaluation."""

import os
from dataclasses import dataclass

import torch

from common.data import Task, fail, load_task
from common.model import load_policy, prompt_text, resolve_model
from common.reward import count_correct_unfaithful, score
from common.rollout import sample
from common.run import (
    all_reduce_sum,
    barrier,
    is_main,
    latest_checkpoint,
    run_folder,
    seed_everything,
    setup_distributed,
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
    model: torch.nn.Module
    tokenizer: object


def open_session(args, script: str, check_args) -> Session:
    """torchrun ranks, the script's own checks, seeding, the task, the run folder, and the policy (the
    latest checkpoint with --resume). Resolves `--max-new-tokens 0` to 48 for `chain`, 512 otherwise."""
    rank, world, device = setup_distributed(args.device)
    check_args(args, world)
    seed_everything(args.seed)
    task = load_task(args.task, args.seed, args.question_field, args.answer_field,
                     getattr(args, "solution_field", "solution"))  # fmt: skip
    if args.eval_prompts > len(task.test):
        fail(f"--eval-prompts {args.eval_prompts}: the test split of {task.name} has only {len(task.test)} prompts")
    args.max_new_tokens = args.max_new_tokens or (48 if task.name == "chain" else 512)
    run_dir = args.resume or run_folder(args.output_dir, args.run_name, script, args.seed)
    if not args.resume and os.path.exists(run_dir):
        fail(f"--run-name: {run_dir} already exists; choose another name, or continue it with --resume {run_dir}")
    if is_main():
        resolve_model(args.model)  # builds `tiny` on first use, on rank 0 only; the others wait
    barrier()
    model_path = resolve_model(args.model)
    checkpoint = latest_checkpoint(args.resume) if args.resume else None
    model, tokenizer = load_policy(checkpoint or model_path, getattr(torch, args.dtype), device)
    model.eval()
    return Session(rank, world, device, task, run_dir, model_path, checkpoint, model, tokenizer)


def prompt_ids(tokenizer, questions, instruction: str = "") -> list[list[int]]:
    """Token ids of each question as the model sees it (chat template for instruct models)."""
    return [tokenizer(prompt_text(tokenizer, q, instruction))["input_ids"] for q in questions]


def draw_prompts(task: Task, tokenizer, seed: int, step: int, batch_prompts: int, rank: int, world: int):
    """The step's prompts: the same draw of `batch_prompts` on every rank, each rank taking its slice.
    Returns this rank's examples and their tokenized prompts."""
    generator = torch.Generator().manual_seed(seed * 7919 + step)
    draw = torch.randint(len(task.train), (batch_prompts,), generator=generator)
    B = batch_prompts // world
    examples = [task.train[i] for i in draw[rank * B : (rank + 1) * B].tolist()]
    return examples, prompt_ids(tokenizer, [e["question"] for e in examples], task.instruction)


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


def evaluate(model, tokenizer, task, n_prompts, max_new_tokens, temperature, rank, world, generator) -> dict:
    """`eval/acc_greedy` and `eval/acc_sampled` (one sample at `temperature`) on the first `n_prompts` test
    prompts, sharded over ranks, the same per skill (`eval/acc_sampled/<skill>`) where examples have one, and
    for `chain` the unfaithful share of the correct answers."""
    examples = task.test[:n_prompts][rank::world]
    skills = sorted({e["skill"] for e in task.test[:n_prompts] if "skill" in e})  # the same on every rank
    metrics = {}
    for mode in ("greedy", "sampled"):
        questions = [e["question"] for e in examples]
        texts, _ = rollout_texts(model, tokenizer, questions, task.instruction, max_new_tokens, temperature,
                                 mode == "greedy", generator)  # fmt: skip
        scores = [score(task.name, e, t) for e, t in zip(examples, texts)]
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
    """The console line of an evaluation: overall figures, then sampled accuracy per skill."""
    overall = " ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/") and k.count("/") == 1)
    skills = " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items() if k.startswith("eval/acc_sampled/"))
    return f"step {step:4d} | eval {overall}" + (f" | sampled by skill: {skills}" if skills else "")
