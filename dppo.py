"""DPPO: Divergence Proximal Policy Optimization.

PPO keeps each update in a trust region by clipping the sampled token's ratio pi/mu, a one-sample and
badly scaled estimate of how far the next-token distribution moved. DPPO masks a token's update by an
estimate of the divergence itself (total variation or KL, Binary or Top-K approximation) between the
sampling policy mu, recorded at sampling time, and the current policy pi.
Paper: P. Qi, X. Zhou, Z. Liu, T. Pang, C. Du, M. Lin, W. S. Lee, "Rethinking the Trust Region in LLM
Reinforcement Learning", arXiv 2602.04879.

    python dppo.py                                    # built-in tiny model and chain task, CPU, minutes
    python dppo.py --trust-region ratio               # GRPO/PPO clipping (clip-higher 0.2 / 0.28)
    python dppo.py --trust-region none                # plain importance-weighted policy gradient
    python dppo.py --sampler-temperature 1.2          # inject a sampling/training mismatch
    python dppo.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k --lr 1e-6
    torchrun --nproc_per_node 2 -- dppo.py
"""

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

from common.data import fail
from common.reward import count_correct_unfaithful, score
from common.rollout import Rollout, sample, token_logprobs
from common.run import (
    RunLogger,
    Timer,
    all_reduce_max,
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
from kernels.topk_divergence import topk_divergence, triton_usable

TRUST_REGIONS = ("binary-tv", "binary-kl", "topk-tv", "topk-kl", "ratio", "none")
EPS = 1e-12  # floor of a probability inside a log


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
    """run folder name (default: dppo__s<seed>__<time>)"""
    resume: str | None = None
    """a run folder to continue from its latest checkpoint"""
    steps: int = 150
    """training steps (one rollout batch and --minibatches optimizer steps each)"""
    max_time: float = 0.0
    """stop after this many seconds of training time (evaluation excluded); 0 for no limit"""
    log_every: int = 5
    """steps between console summary lines and sample dumps (metrics.jsonl gets every step)"""
    eval_every: int = 15
    """steps between held-out evaluations (also before the first step and after the last)"""
    eval_prompts: int = 200
    """held-out test prompts per evaluation"""
    save_every: int = 0
    """steps between checkpoints; 0 saves only at the end"""
    # ---- the algorithm ----
    trust_region: Literal["binary-tv", "binary-kl", "topk-tv", "topk-kl", "ratio", "none"] = "binary-tv"
    """what masks an update: a divergence (tv/kl, binary/topk), PPO ratio clipping (`ratio`), or nothing (`none`)"""
    delta_low: float | None = None
    """divergence threshold for tokens with A < 0 (default 0.15 for TV, 0.05 for KL)"""
    delta_high: float | None = None
    """divergence threshold for tokens with A > 0 (default 0.15 for TV, 0.05 for KL)"""
    eps_low: float = 0.2
    """`ratio` only: clip when r < 1 - eps_low and A < 0"""
    eps_high: float = 0.28
    """`ratio` only: clip when r > 1 + eps_high and A > 0 (0.28 is DAPO's clip-higher)"""
    top_k: int = 20
    """K: behaviour top-K recorded at sampling time for the topk-* trust regions"""
    is_cap: float = math.inf
    """C: the importance weight min(pi/mu, C) in the loss; infinity (default) means no truncation"""
    aggregation: Literal["seq-mean-token-sum-norm", "token-mean"] = "seq-mean-token-sum-norm"
    """per sequence sum of token losses / max-new-tokens, mean over sequences (paper); or mean over all tokens"""
    batch_prompts: int = 16
    """B: prompts per step (over all ranks); each prompt's n rollouts stay on one rank"""
    n: int = 8
    """rollouts per prompt (a group)"""
    minibatches: int = 4
    """optimizer steps per rollout batch: the batch is shuffled and split into this many mini-batches"""
    micro_batch: int = 0
    """sequences per forward/backward inside a mini-batch (gradient accumulation); 0 = the whole mini-batch"""
    temperature: float = 1.0
    """the trainer's temperature: pi = softmax(logits / temperature); also the sampler's unless overridden"""
    sampler_temperature: float = 0.0
    """mismatch injection: the sampler draws (and records mu) at this temperature while the trainer keeps
    --temperature, so pi != mu before any update, as with an inference engine whose numerics differ from the
    trainer's; 0 (default) = --temperature, no mismatch"""
    max_new_tokens: int = 0
    """completion length limit, also the fixed horizon of the aggregation; 0 picks 48 for `chain`, 512 otherwise"""
    lr: float = 5e-5
    """AdamW learning rate (constant; tuned for `tiny`, which collapses at 2e-4); use about 1e-6 for a 0.5B model"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping"""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """Top-K divergence implementation: `auto` = the Triton kernel on CUDA and the PyTorch reference elsewhere"""


def thresholds(args: Args) -> tuple[float, float]:
    """(delta_low, delta_high) of the chosen trust region: the flags, or the paper's defaults."""
    if args.trust_region == "none":
        return math.inf, math.inf
    if args.trust_region == "ratio":
        return args.eps_low, args.eps_high
    default = 0.15 if args.trust_region.endswith("tv") else 0.05
    low, high = args.delta_low, args.delta_high
    return (default if low is None else low), (default if high is None else high)


def check_args(args: Args, world: int):
    """Reject bad settings with a one-line error naming the flag."""
    if args.trust_region not in TRUST_REGIONS:
        fail(f"--trust-region {args.trust_region!r}: expected one of {', '.join(TRUST_REGIONS)}")
    positive = ("temperature", "batch_prompts", "n", "minibatches", "steps", "eval_every", "log_every",
                "eval_prompts", "lr", "max_grad_norm", "eps_low", "eps_high", "is_cap")  # fmt: skip
    non_negative = ("max_time", "save_every", "micro_batch", "max_new_tokens", "sampler_temperature")
    check_flags(args, positive, non_negative)
    for flag in ("delta_low", "delta_high"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            fail(f"--{flag.replace('_', '-')} {value}: must be positive")
    if args.trust_region.startswith("topk") and args.top_k < 1:
        fail(f"--top-k {args.top_k}: a top-K trust region needs K >= 1")
    if args.n < 2:
        fail(f"--n {args.n}: need at least 2 rollouts per prompt for a group-relative advantage")
    if args.batch_prompts % world:
        fail(f"--batch-prompts {args.batch_prompts} does not divide by the {world} processes (ranks)")
    rows = args.batch_prompts // world * args.n
    if rows % args.minibatches:
        fail(f"--minibatches {args.minibatches} does not divide the {rows} sequences per rank (batch-prompts x n)")
    if args.micro_batch and (rows // args.minibatches) % args.micro_batch:
        fail(f"--micro-batch {args.micro_batch} does not divide the {rows // args.minibatches}-sequence mini-batch")


# ---- divergences between mu (sampler, recorded) and pi (current policy), per token ----------------------


def binary_tv(logp: torch.Tensor, logp_mu: torch.Tensor) -> torch.Tensor:
    """TV over {sampled token, everything else}: 1/2 (|pi - mu| + |(1-pi) - (1-mu)|) = |pi(a) - mu(a)|."""
    return (logp.exp() - logp_mu.exp()).abs()


def log1m_exp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from log p, accurate as p -> 1 (expm1) and floored at log(EPS)."""
    return (-torch.expm1(logp.clamp(max=0))).clamp(min=EPS).log()


def binary_kl(logp: torch.Tensor, logp_mu: torch.Tensor) -> torch.Tensor:
    """KL(mu || pi) over {sampled token, everything else}: mu log(mu/pi) + (1-mu) log((1-mu)/(1-pi))."""
    one_minus_mu = -torch.expm1(logp_mu.clamp(max=0))  # not 1 - exp(): that is 0 in fp32 once mu > 1 - 6e-8
    kl = logp_mu.exp() * (logp_mu - logp) + one_minus_mu * (log1m_exp(logp_mu) - log1m_exp(logp))
    return kl.clamp(min=0)  # rounding can leave -1e-9 where pi = mu


def ratio_deviation(logp: torch.Tensor, logp_mu: torch.Tensor) -> torch.Tensor:
    """D = |r - 1| with r = pi(a)/mu(a): with it the mask below is exactly PPO's clipping."""
    return ((logp - logp_mu).exp() - 1).abs()


def token_divergence(trust_region: str, logp, logp_mu, topk: dict | None = None) -> torch.Tensor:
    """D_t of the chosen trust region [N, L] (no gradient). `none` reports the binary TV, masking nothing."""
    logp = logp.detach()
    if trust_region in ("binary-tv", "none"):
        return binary_tv(logp, logp_mu)
    if trust_region == "binary-kl":
        return binary_kl(logp, logp_mu)
    if trust_region == "ratio":
        return ratio_deviation(logp, logp_mu)
    return topk["tv" if trust_region == "topk-tv" else "kl"]


# ---- the mask and the loss -------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A = r - mean of the prompt's group (no division by the std: Dr. GRPO), rewards [B, n] -> [B, n]."""
    return rewards - rewards.mean(1, keepdim=True)


def trust_region_mask(divergence, logp, logp_mu, advantages, delta_low, delta_high) -> torch.Tensor:
    """M_t in {0, 1} [N, L]: 0 only for an update that would push the sampled token further the way it
    already moved once the distribution has drifted past the threshold:
        (A > 0 and pi > mu and D > delta_high)  or  (A < 0 and pi < mu and D > delta_low).
    Updates that move pi back toward mu are never masked. advantages [N] (one per sequence)."""
    logp, A = logp.detach(), advantages[:, None]
    blocked = ((A > 0) & (logp > logp_mu) & (divergence > delta_high)) | (
        (A < 0) & (logp < logp_mu) & (divergence > delta_low)
    )
    return (~blocked).float()


def dppo_token_loss(logp, logp_mu, advantages, mask, is_cap=math.inf) -> torch.Tensor:
    """loss_t = -A * sg(min(r_t, C)) * sg(M_t) * log pi(y_t): its gradient is the importance-weighted
    policy gradient on kept tokens and exactly zero on masked ones. Its value is not the surrogate."""
    with torch.no_grad():  # the ratio, its cap and the mask carry no gradient; only log pi does
        weight = (logp - logp_mu).exp().clamp(max=is_cap) * mask
    return -advantages[:, None] * weight * logp


def aggregate(per_token, completion_mask, aggregation: str, horizon: int, normaliser: float) -> torch.Tensor:
    """Reduce token losses [N, L] to a scalar. `seq-mean-token-sum-norm`: each sequence's sum / horizon
    (the fixed maximum response length), summed and divided by `normaliser` = sequences in the mini-batch;
    `token-mean`: sum over tokens / `normaliser` = tokens in the mini-batch. Padding contributes nothing."""
    total = (per_token * completion_mask).sum()
    return total / horizon / normaliser if aggregation == "seq-mean-token-sum-norm" else total / normaliser


# ---- one rollout batch: several optimizer steps, all measured against the recorded mu --------------------


def current_policy(model, rollout: Rollout, args: Args) -> tuple[torch.Tensor, dict]:
    """log pi of the sampled tokens [N, L] (differentiable) and, from the same logits chunks without
    gradient: the entropy of pi and, for the topk-* trust regions, the Top-K TV and KL to the recorded mu."""
    topk = args.trust_region.startswith("topk")
    if topk and rollout.topk_ids is None:
        fail(f"--trust-region {args.trust_region} needs the behaviour top-K recorded at sampling time "
             "(sample(..., top_k=K))")  # fmt: skip
    N, L = rollout.completion_mask.shape
    extra = {k: torch.zeros(N * L, device=rollout.input_ids.device) for k in ("entropy", "tv", "kl")}
    valid = rollout.completion_mask.flatten().bool()

    def on_logits(start, logits):
        rows = slice(start, start + logits.shape[0])
        if topk:  # the kernel (or its reference) also returns the entropy, without an fp32 copy of the logits
            ids, logprobs = rollout.topk_ids.flatten(0, 1)[rows], rollout.topk_logprobs.flatten(0, 1)[rows]
            sampled = rollout.completion_ids.flatten()[rows]
            div = topk_divergence(logits, ids, logprobs, sampled, args.temperature, valid[rows], args.kernels)
            extra["tv"][rows], extra["kl"][rows], extra["entropy"][rows] = div["tv"], div["kl"], div["entropy"]
        else:
            logp_all = F.log_softmax(logits.float() / args.temperature, dim=-1)
            extra["entropy"][rows] = -(logp_all.exp() * logp_all).sum(-1)

    logp = token_logprobs(model, rollout, args.temperature, on_logits=on_logits)
    return logp, {k: v.view(N, L) for k, v in extra.items()}


def dppo_update(model, optimizer, rollout: Rollout, advantages, args: Args, generator) -> dict:
    """Shuffle the batch, split it into --minibatches, one optimizer step each. Every step measures pi
    against the mu recorded at sampling time (rollout.logprobs / topk), never a recomputed copy."""
    model.train()
    delta_low, delta_high = thresholds(args)
    rows = rollout.input_ids.shape[0]
    order = torch.randperm(rows, generator=generator).to(rollout.input_ids.device)
    keys = ("tokens", "masked", "pos", "pos_masked", "neg", "neg_masked", "D", "abs_pi_mu", "entropy")
    sums = dict.fromkeys(keys, 0.0)
    max_d, grad_norms = 0.0, []
    for minibatch in order.chunk(args.minibatches):
        mask_all = rollout.completion_mask[minibatch].float()
        if args.aggregation == "seq-mean-token-sum-norm":
            normaliser = len(minibatch)  # every rank holds the same number; averaging gradients = global mean
        else:  # global token count / world size, so that averaging gradients over ranks gives the global mean
            normaliser = all_reduce_sum([mask_all.sum().item()])[0] / world_size()
        optimizer.zero_grad()
        for part_rows in minibatch.split(args.micro_batch or len(minibatch)):
            part, A = rollout.select(part_rows), advantages[part_rows]
            valid = part.completion_mask.float()
            logp, extra = current_policy(model, part, args)
            logp_mu = part.logprobs
            D = token_divergence(args.trust_region, logp, logp_mu, extra)
            keep = trust_region_mask(D, logp, logp_mu, A, delta_low, delta_high)
            loss = aggregate(dppo_token_loss(logp, logp_mu, A, keep, args.is_cap), valid, args.aggregation,
                             args.max_new_tokens, normaliser)  # fmt: skip
            loss.backward()
            masked, pos, neg = (1 - keep) * valid, (A > 0)[:, None] * valid, (A < 0)[:, None] * valid
            for key, value in (("tokens", valid), ("masked", masked), ("pos", pos), ("pos_masked", masked * pos),
                               ("neg", neg), ("neg_masked", masked * neg), ("D", D * valid),
                               ("abs_pi_mu", binary_tv(logp.detach(), logp_mu) * valid),
                               ("entropy", extra["entropy"] * valid)):  # fmt: skip
                sums[key] += value.sum().item()
            max_d = max(max_d, (D * valid).max().item())
        average_gradients(model)
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item())
        optimizer.step()
    model.eval()
    s = dict(zip(sums, all_reduce_sum(list(sums.values()))))
    per = lambda num, den: s[num] / max(1.0, s[den])
    return {
        "dppo/masked_frac": per("masked", "tokens"),
        "dppo/masked_frac_pos": per("pos_masked", "pos"),
        "dppo/masked_frac_neg": per("neg_masked", "neg"),
        "dppo/D_mean": per("D", "tokens"),
        "dppo/D_max": all_reduce_max(max_d),
        "dppo/abs_pi_mu": per("abs_pi_mu", "tokens"),
        "dppo/entropy": per("entropy", "tokens"),
        "grad_norm": sum(grad_norms) / len(grad_norms),
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


# ---- training loop ---------------------------------------------------------------------------------------


def main(args: Args):
    session = open_session(args, "dppo", check_args)
    rank, world, device, task = session.rank, session.world, session.device, session.task
    run_dir, model_path, checkpoint = session.run_dir, session.model_path, session.checkpoint
    model, tokenizer = session.model, session.tokenizer
    sampler_temperature = args.sampler_temperature or args.temperature
    top_k = args.top_k if args.trust_region.startswith("topk") else 0  # record top-K only when it is used
    if args.kernels == "triton" and not triton_usable(device):
        fail("--kernels triton: the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1) and triton installed")
    if top_k > model.config.vocab_size:
        fail(f"--top-k {top_k}: larger than the vocabulary ({model.config.vocab_size} tokens)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state = load_trainer_state(checkpoint, optimizer) if checkpoint else {"step": 0, "train_time": 0.0}
    start, train_time = state["step"], state["train_time"]
    B, n = args.batch_prompts // world, args.n
    delta_low, delta_high = thresholds(args)
    logger = RunLogger(run_dir, args, args.steps, start)
    logger.print(
        f"run folder {run_dir} | model {model_path} | task {task.name} ({len(task.train)} train prompts)"
        f" | trust region {args.trust_region} (low {delta_low}, high {delta_high}) | B={args.batch_prompts} n={n}"
        f" x {args.minibatches} mini-batches | sampler T {sampler_temperature}, trainer T {args.temperature}"
        f" | {world} process(es) on {device}"
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
        # 1. B prompts (the same draw on every rank; each rank takes its slice), n rollouts each; the sampler
        #    records log mu of every sampled token (and mu's top-K for the topk-* trust regions).
        examples, prompt_ids = draw_prompts(task, tokenizer, args.seed, step, args.batch_prompts, rank, world)
        with timer("generate"):
            group_prompts = [p for p in prompt_ids for _ in range(n)]  # each prompt's n rollouts side by side
            rollout = sample(model, group_prompts, args.max_new_tokens, sampler_temperature, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, top_k=top_k, generator=step_gen(step, 1 + rank))  # fmt: skip
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        scores = [score(task.name, examples[i // n], t) for i, t in enumerate(texts)]
        rewards = torch.tensor([s[0] for s in scores]).view(B, n)
        advantages = group_advantages(rewards).flatten().to(device)
        # 2. Several optimizer steps on shuffled mini-batches, each token's update masked by the trust region.
        with timer("update"):
            shuffle = torch.Generator().manual_seed(args.seed * 31 + step * 7 + rank)
            stats = dppo_update(model, optimizer, rollout, advantages, args, shuffle)
        times = timer.pop()
        train_time += sum(times.values())
        correct, unfaithful = count_correct_unfaithful(scores)
        metrics = all_reduce_mean({
            "reward/mean": rewards.mean().item(),
            "train/completion_len": rollout.completion_mask.sum(1).float().mean().item(),
            **({"train/unfaithful": unfaithful / max(1, correct)} if task.name == "chain" else {}),
            **stats,
            **{f"time/{k}": v for k, v in times.items()},
            "throughput/gen_tokens_per_s": rollout.completion_mask.sum().item() / times["generate"],
            "throughput/update_tokens_per_s": rollout.completion_mask.sum().item() / times["update"],
            "memory/peak_gb": peak_memory_gb(device),
            "memory/topk_mb": sum(t.numel() * t.element_size() for t in (rollout.topk_ids, rollout.topk_logprobs)
                                  if t is not None) / 2**20,
        })  # fmt: skip
        train_time = all_reduce_mean({"t": train_time})["t"]  # every rank agrees on when to stop
        metrics["time/train_elapsed"] = train_time
        logger.log(step + 1, metrics)
        logger.progress(reward=metrics["reward/mean"], masked=metrics["dppo/masked_frac"])
        if (step + 1) % args.log_every == 0:
            logger.print(
                f"step {step + 1:4d} | reward {metrics['reward/mean']:.3f} | masked {metrics['dppo/masked_frac']:.4f}"
                f" (A>0 {metrics['dppo/masked_frac_pos']:.4f}, A<0 {metrics['dppo/masked_frac_neg']:.4f})"
                f" | D mean {metrics['dppo/D_mean']:.4f} max {metrics['dppo/D_max']:.3f}"
                f" | |pi-mu| {metrics['dppo/abs_pi_mu']:.4f} | entropy {metrics['dppo/entropy']:.3f}"
                f" | gen {metrics['time/generate']:.2f}s upd {metrics['time/update']:.2f}s"
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
