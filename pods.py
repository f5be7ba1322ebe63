"""PODS: Policy Optimization with Down-Sampling, on top of GRPO.

Generate n rollouts per prompt, keep only the m (< n) whose rewards are most spread out (maximal
variance), and run the GRPO update on those B*m sequences alone. Generation is cheap and parallel;
the update is the expensive part, so it should see only the most informative rollouts.
Paper: Y. E. Xu, Y. Savani, F. Fang, J. Z. Kolter, "Not All Rollouts are Useful: Down-Sampling
Rollouts in LLM Reinforcement Learning", arXiv 2504.13818.

    python pods.py                                   # built-in tiny model and chain task, CPU, minutes
    python pods.py --n 8 --m 8                       # plain GRPO (no down-sampling)
    python pods.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k
    torchrun --nproc_per_node 2 -- pods.py --n 16 --m 4   # `--`: torchrun would read --n/--m as its own
"""

import os
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

from common.data import fail
from common.model import load_policy
from common.reward import count_correct_unfaithful, score
from common.rollout import sample, token_logprobs
from common.run import (
    RunLogger,
    Timer,
    all_reduce_mean,
    all_reduce_sum,
    average_gradients,
    check_flags,
    is_main,
    load_trainer_state,
    save_checkpoint,
    world_size,
)
from common.session import draw_prompts, eval_line, evaluate, open_session


@dataclass
class Args:
    # ---- plumbing ----
    model: str = "tiny"
    """hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct), local folder, or `tiny` (built-in, built once and cached)"""
    task: str = "chain"
    """`chain` (built-in arithmetic), `gsm8k`, or a .json/.jsonl/.parquet file"""
    question_field: str = "question"
    """field holding the question, for a data file"""
    answer_field: str = "answer"
    """field holding the gold answer (a number, or text ending in `#### <answer>`), for a data file"""
    seed: int = 1
    """seeds python, numpy and torch; the same seed on the same machine gives the same metrics"""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """parameter dtype of the policy"""
    output_dir: str = "runs"
    """run folders go here"""
    run_name: str | None = None
    """run folder name (default: pods__s<seed>__<time>)"""
    resume: str | None = None
    """a run folder to continue from its latest checkpoint"""
    steps: int = 200
    """training steps (one rollout batch and one optimizer step each)"""
    max_time: float = 0.0
    """stop after this many seconds of training time (evaluation excluded); 0 for no limit"""
    log_every: int = 5
    """steps between console summary lines and sample dumps (metrics.jsonl gets every step)"""
    eval_every: int = 20
    """steps between held-out evaluations (also before the first step and after the last)"""
    eval_prompts: int = 200
    """held-out test prompts per evaluation"""
    save_every: int = 0
    """steps between checkpoints; 0 saves only at the end"""
    # ---- the algorithm ----
    batch_prompts: int = 16
    """B: prompts per step (over all ranks); each prompt's n rollouts stay on one rank"""
    n: int = 16
    """rollouts generated per prompt"""
    m: int = 4
    """rollouts kept per prompt for the update (m = n is plain GRPO)"""
    rule: Literal["max-variance", "random", "max-reward"] = "max-variance"
    """down-sampling rule"""
    temperature: float = 1.0
    """sampling temperature (training log-probs use the same temperature)"""
    max_new_tokens: int = 0
    """completion length limit; 0 picks 48 for `chain` and 512 otherwise"""
    lr: float = 2e-4
    """AdamW learning rate (constant); use about 1e-6 for a 0.5B model"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping"""
    beta: float = 0.0
    """KL penalty coefficient (k3 estimator) against the initial policy; 0 turns it off"""
    aggregation: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean"
    """loss aggregation: token-mean per sequence then mean over sequences (paper), or token-mean over the batch"""
    micro_batch: int = 0
    """sequences per forward/backward in the update (gradient accumulation); 0 = all kept sequences at once"""


def check_args(args: Args, world: int):
    """Reject bad settings with a one-line error naming the flag."""
    if args.n < 2:
        fail(f"--n {args.n}: need at least 2 rollouts per prompt")
    if args.m < 2:
        fail(f"--m {args.m}: need at least 2 kept rollouts per prompt (the std of one reward is undefined)")
    if args.m > args.n:
        fail(f"--m {args.m} is larger than --n {args.n}: cannot keep more rollouts than are generated")
    check_flags(args, positive=("temperature", "batch_prompts", "steps", "eval_every", "log_every", "eval_prompts",
                                "lr", "max_grad_norm"),
                non_negative=("beta", "max_time", "save_every", "micro_batch", "max_new_tokens"))  # fmt: skip
    if args.batch_prompts % world:
        fail(f"--batch-prompts {args.batch_prompts} does not divide by the {world} processes (ranks)")


# ---- down-sampling rules: rewards [B, n] -> kept indices [B, m], one row per prompt ------------------------


def select_max_variance(rewards: torch.Tensor, m: int) -> torch.Tensor:
    """argmax over |S| = m of Var(r_S), per row.

    Theorem (paper): after sorting descending, an optimal S is the k largest plus the m-k smallest for
    some k in 0..m. So evaluate those m+1 candidates with prefix sums and keep the best; ties go to the
    smallest k (a deterministic rule; the variance depends only on the kept multiset).
    """
    B, n = rewards.shape
    if m >= n:
        return torch.arange(n).expand(B, n)
    r = rewards.double()
    r = r - r.mean(1, keepdim=True)  # centring avoids cancellation in E[r^2] - E[r]^2
    sorted_r, order = r.sort(dim=1, descending=True, stable=True)
    zero = r.new_zeros(B, 1)
    s1 = torch.cat([zero, sorted_r.cumsum(1)], 1)  # s1[:, j] = sum of the j largest
    s2 = torch.cat([zero, (sorted_r**2).cumsum(1)], 1)
    k = torch.arange(m + 1)
    top = lambda s: s[:, k]  # sum of the k largest
    bottom = lambda s: s[:, n : n + 1] - s[:, n - (m - k)]  # sum of the m-k smallest
    total, total_sq = top(s1) + bottom(s1), top(s2) + bottom(s2)
    var = total_sq / m - (total / m) ** 2  # [B, m+1] population variance of each candidate
    best_var = var.max(1, keepdim=True).values
    best_k = (var >= best_var - 1e-9 * (1 + best_var.abs())).double().argmax(1, keepdim=True)
    j = torch.arange(m).expand(B, m)
    sorted_pos = torch.where(j < best_k, j, n - m + j)  # first k sorted slots, then the last m-k
    return order.gather(1, sorted_pos)


def select_random(rewards: torch.Tensor, m: int, generator=None) -> torch.Tensor:
    """m indices per row uniformly without replacement."""
    return torch.rand(rewards.shape, generator=generator).argsort(1)[:, :m]


def select_max_reward(rewards: torch.Tensor, m: int) -> torch.Tensor:
    """The m highest rewards per row (the paper's negative example: collapses to zero variance)."""
    return rewards.sort(dim=1, descending=True, stable=True).indices[:, :m]


def select(rule: str, rewards: torch.Tensor, m: int, generator=None) -> torch.Tensor:
    if rule == "max-variance":
        return select_max_variance(rewards, m)
    if rule == "random":
        return select_random(rewards, m, generator)
    if rule == "max-reward":
        return select_max_reward(rewards, m)
    fail(f"--rule {rule!r}: expected max-variance, random or max-reward")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages within each kept group: A_i = (r_i - mean_S r) / (std_S r + eps), unbiased std."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)


def frac_zero_std(rewards: torch.Tensor) -> float:
    """Share of groups whose rewards are all equal (zero advantage: no learning signal)."""
    return (rewards.max(1).values == rewards.min(1).values).float().mean().item()


# ---- the GRPO update on the kept sequences ---------------------------------------------------------------


def grpo_loss(logp, advantages, mask, aggregation, normaliser, ref_logp=None, beta=0.0):
    """GRPO loss of one micro-batch, divided by the whole batch's normaliser so micro-batches add up.

    One optimizer step per rollout batch means pi_old = pi: the ratio exp(logp - sg(logp)) is 1 (no
    clipping can trigger) and its gradient is grad log pi, so the loss is the policy gradient
    -A * grad log pi, plus beta * KL_k3(pi || pi_ref) per token when beta > 0.
    """
    ratio = torch.exp(logp - logp.detach())
    per_token = -ratio * advantages[:, None]
    if beta > 0:
        log_r = ref_logp - logp
        per_token = per_token + beta * (torch.exp(log_r) - log_r - 1)
    per_token = per_token * mask
    if aggregation == "seq-mean-token-mean":
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / normaliser
    return per_token.sum() / normaliser


def grpo_update(model, ref_model, optimizer, kept, advantages, args: Args) -> dict:
    """One optimizer step on the kept rollouts (and only those): forward, backward, all-reduce, step."""
    model.train()
    mask = kept.completion_mask.float()
    rows = mask.shape[0]
    if args.aggregation == "seq-mean-token-mean":
        normaliser = rows  # every rank holds the same number of sequences
    else:  # global token count / world size, so that averaging gradients over ranks gives the global mean
        normaliser = all_reduce_sum([mask.sum().item()])[0] / world_size()
    step = args.micro_batch or rows
    optimizer.zero_grad()
    total = 0.0
    for s in range(0, rows, step):
        part = kept.select(torch.arange(s, min(s + step, rows)))
        logp = token_logprobs(model, part, args.temperature)
        ref_logp = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(ref_model, part, args.temperature)
        loss = grpo_loss(logp, advantages[s : s + step], mask[s : s + step], args.aggregation, normaliser,
                         ref_logp, args.beta)  # fmt: skip
        loss.backward()
        total += loss.item()
    average_gradients(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    model.eval()
    return {"loss": total, "grad_norm": grad_norm.item()}


# ---- training loop ---------------------------------------------------------------------------------------


def main(args: Args):
    session = open_session(args, "pods", check_args)
    rank, world, device, task = session.rank, session.world, session.device, session.task
    run_dir, model_path, checkpoint = session.run_dir, session.model_path, session.checkpoint
    model, tokenizer = session.model, session.tokenizer
    ref_model = load_policy(model_path, model.dtype, device)[0].eval() if args.beta > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state = load_trainer_state(checkpoint, optimizer) if checkpoint else {"step": 0, "train_time": 0.0}
    start, train_time = state["step"], state["train_time"]
    B, n, m = args.batch_prompts // world, args.n, args.m
    logger = RunLogger(run_dir, args, args.steps, start)
    logger.print(
        f"run folder {run_dir} | model {model_path} | task {task.name} ({len(task.train)} train prompts)"
        f" | B={args.batch_prompts} n={n} m={m} rule={args.rule} | {world} process(es) on {device}"
    )
    # Per-step generators keyed by (seed, step, rank): the run is reproducible and resumes exactly.
    step_gen = lambda step, stream: torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 101 + stream)
    timer = Timer()

    def log_eval(step):
        metrics = evaluate(model, tokenizer, task, args.eval_prompts, args.max_new_tokens, args.temperature, rank,
                           world, step_gen(step, 50 + rank))  # fmt: skip
        logger.log(step, {**metrics, "time/train_elapsed": train_time})
        logger.print(eval_line(step, metrics))

    if start == 0:
        log_eval(0)
    for step in range(start, args.steps):
        # 1. B prompts (the same draw on every rank; each rank takes its slice), n rollouts each.
        examples, prompt_ids = draw_prompts(task, tokenizer, args.seed, step, args.batch_prompts, rank, world)
        with timer("generate"):
            group_prompts = [p for p in prompt_ids for _ in range(n)]  # each prompt's n rollouts side by side
            rollout = sample(model, group_prompts, args.max_new_tokens, args.temperature, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, generator=step_gen(step, 1 + rank))  # fmt: skip
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        scores = [score(task.name, examples[i // n], t) for i, t in enumerate(texts)]
        rewards = torch.tensor([s[0] for s in scores]).view(B, n)
        # 2. Down-sample per prompt, then advantages over the kept subset only.
        with timer("select"):
            keep = select(args.rule, rewards, m, torch.Generator().manual_seed(args.seed * 31 + step * 7 + rank))
            kept_rewards = rewards.gather(1, keep)
            advantages = group_advantages(kept_rewards).flatten().to(device)
            kept = rollout.select((torch.arange(B)[:, None] * n + keep).flatten().to(device))
        # 3. GRPO update on the B*m kept sequences; the other B*(n-m) never reach a training forward pass.
        with timer("update"):
            stats = grpo_update(model, ref_model, optimizer, kept, advantages, args)
        times = timer.pop()
        train_time += sum(times.values())
        correct, unfaithful = count_correct_unfaithful(scores)
        metrics = all_reduce_mean({
            "reward/all": rewards.mean().item(),
            "reward/kept": kept_rewards.mean().item(),
            "frac_zero_std/before": frac_zero_std(rewards),
            "frac_zero_std/after": frac_zero_std(kept_rewards),
            "train/completion_len": rollout.completion_mask.sum(1).float().mean().item(),
            **({"train/unfaithful": unfaithful / max(1, correct)} if task.name == "chain" else {}),
            **stats,
            **{f"time/{k}": v for k, v in times.items()},
            "throughput/gen_tokens_per_s": rollout.completion_mask.sum().item() / times["generate"],
            "throughput/update_tokens_per_s": kept.completion_mask.sum().item() / times["update"],
        })  # fmt: skip
        train_time = all_reduce_mean({"t": train_time})["t"]  # every rank agrees on when to stop
        metrics["time/train_elapsed"] = train_time
        logger.log(step + 1, metrics)
        logger.progress(reward=metrics["reward/all"], upd_s=metrics["time/update"])
        if (step + 1) % args.log_every == 0:
            logger.print(
                f"step {step + 1:4d} | reward {metrics['reward/all']:.3f} kept {metrics['reward/kept']:.3f}"
                f" | zero-std {metrics['frac_zero_std/before']:.2f}->{metrics['frac_zero_std/after']:.2f}"
                f" | gen {metrics['time/generate']:.2f}s sel {metrics['time/select']:.3f}s"
                f" upd {metrics['time/update']:.2f}s | {metrics['throughput/gen_tokens_per_s']:.0f} gen tok/s"
            )
            logger.samples(step + 1, [{"question": examples[0]["question"], "completion": t, "reward": s[0]}
                                      for t, s in zip(texts[:4], scores[:4])])  # fmt: skip
        out_of_time = args.max_time and train_time >= args.max_time
        last = step + 1 == args.steps or out_of_time
        if (step + 1) % args.eval_every == 0 or last:
            log_eval(step + 1)
        if (args.save_every and (step + 1) % args.save_every == 0) or last:
            save_checkpoint(run_dir, step + 1, model, tokenizer, optimizer, {"train_time": train_time})
        if out_of_time:
            logger.print(f"stopping: --max-time {args.max_time:.0f}s of training reached at step {step + 1}")
            break
    logger.close()
    if is_main():
        print(f"done: metrics in {os.path.join(run_dir, 'metrics.jsonl')}, checkpoints in {run_dir}/checkpoints")


if __name__ == "__main__":
    main(tyro.cli(Args))
