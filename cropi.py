"""CROPI: Curriculum RL with Off-Policy Influence guidance, on top of GRPO.

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
import re
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

from common.data import TARGET_SKILL, check_skills, fail, of_skills
from common.model import load_policy, matching_parameters
from common.reward import count_correct_unfaithful, score
from common.rollout import Rollout, sample, token_logprobs
from common.run import (
    RunLogger,
    Timer,
    all_reduce_mean,
    all_reduce_sum,
    check_flags,
    gather_strided,
    is_main,
    load_trainer_state,
    save_checkpoint,
)
from common.session import eval_line, evaluate, open_session, prompt_ids
from kernels.projection import project, triton_usable
from pods import group_advantages, grpo_update  # the GRPO step itself is the same as PODS's with m = n

MIN_TARGET_PROMPTS = 8  # fewest validation prompts a target skill may have (its gradient is their mean)


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
    """run folder name (default: cropi__s<seed>__<time>)"""
    resume: str | None = None
    """a run folder to continue from its latest checkpoint (the offline store is reused)"""
    max_time: float = 0.0
    """stop after this many seconds of training time (scoring included, evaluation excluded); 0 for no limit"""
    log_every: int = 4
    """steps between console summary lines and sample dumps (metrics.jsonl gets every step)"""
    eval_every: int = 8
    """steps between held-out evaluations (also before the first step and after the last)"""
    eval_prompts: int = 200
    """held-out test prompts per evaluation"""
    save_every: int = 0
    """steps between checkpoints; 0 saves only at the end"""
    # ---- the curriculum and the selection ----
    selection: Literal["cropi", "full", "random", "pass-rate"] = "cropi"
    """how each stage's prompts are chosen: influence (CROPI), all of the pool, random, or learnability p(1-p)"""
    stages: int = 6
    """curriculum stages; every stage re-scores the whole pool with the current policy"""
    steps_per_stage: int = 16
    """GRPO steps per stage (16 x 16 prompts is one pass over 10% of the chain pool)"""
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
    task's weak target skill (`words` for chain), or the whole validation split for a task without skills"""
    store_temperature: float = 0.5
    """temperature of the behaviour policy beta that produced the store (POPI's log-probs use it too)"""
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
    # ---- GRPO on the selected prompts ----
    batch_prompts: int = 16
    """B: prompts per step (over all ranks); each prompt's n rollouts stay on one rank"""
    n: int = 8
    """rollouts per prompt (a group)"""
    temperature: float = 1.0
    """sampling temperature of GRPO training (training log-probs use the same temperature)"""
    max_new_tokens: int = 0
    """completion length limit; 0 picks 48 for `chain` and 512 otherwise"""
    lr: float = 2e-4
    """AdamW learning rate (constant); use about 1e-6 for a 0.5B model"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping"""
    beta: float = 0.0
    """KL penalty coefficient (k3) against the initial policy in the GRPO loss; 0 turns it off"""
    aggregation: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean"
    """GRPO loss aggregation"""
    micro_batch: int = 0
    """sequences per forward/backward in the GRPO update; 0 = all at once"""


def check_args(args: Args, world: int):
    """Reject bad settings with a one-line error naming the flag."""
    if not 0 < args.select_ratio <= 1:
        fail(f"--select-ratio {args.select_ratio}: must be in (0, 1]")
    if not 0 < args.proj_ratio <= 1:
        fail(f"--proj-ratio {args.proj_ratio}: must be in (0, 1]")
    positive = ("stages", "steps_per_stage", "proj_dim", "batch_prompts", "eval_every", "log_every", "eval_prompts",
                "lr", "max_grad_norm", "temperature", "store_temperature", "val_prompts", "score_batch")  # fmt: skip
    check_flags(args, positive, ("max_time", "save_every", "micro_batch", "max_new_tokens", "beta", "popi_clip"))
    for flag in ("n", "pool_responses", "val_responses"):
        if getattr(args, flag) < 2:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: need at least 2 responses for a group advantage")
    if args.batch_prompts % world:
        fail(f"--batch-prompts {args.batch_prompts} does not divide by the {world} processes (ranks)")
    try:
        re.compile(args.grad_params)
    except re.error as e:
        fail(f"--grad-params {args.grad_params!r}: not a regular expression ({e})")


# ---- the offline store: K responses per prompt from the initial policy, collected once --------------------


def collect_store(model, tokenizer, task, examples, K, args, generator) -> list[dict]:
    """Per example: the K responses as a Rollout (with the behaviour log-probs recorded while sampling at
    --store-temperature) and their rewards."""
    store = []
    for s in range(0, len(examples), 32):
        chunk = examples[s : s + 32]
        prompts = prompt_ids(tokenizer, [e["question"] for e in chunk], task.instruction)
        rollout = sample(model, [p for p in prompts for _ in range(K)], args.max_new_tokens, args.store_temperature,
                         tokenizer.eos_token_id, tokenizer.pad_token_id, generator=generator)  # fmt: skip
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        for i, example in enumerate(chunk):
            rows = torch.arange(i * K, (i + 1) * K, device=rollout.input_ids.device)
            rewards = torch.tensor([score(task.name, example, t)[0] for t in texts[i * K : (i + 1) * K]])
            store.append({"rollout": trim(rollout.select(rows)), "rewards": rewards})
    return store


def trim(rollout: Rollout) -> Rollout:
    """Drop the padding columns a group does not need (groups were sampled in larger batches)."""
    used = rollout.attention_mask.bool().any(0)
    first, last = int(used.long().argmax()), int(used.nonzero().max()) + 1  # first and last used column
    L = last - rollout.prompt_len
    return Rollout(rollout.input_ids[:, first:last], rollout.attention_mask[:, first:last],
                   rollout.completion_mask[:, :L], rollout.logprobs[:, :L], rollout.prompt_len - first)  # fmt: skip


# ---- POPI: the off-policy policy gradient of one prompt, projected ---------------------------------------


def popi_objective(logp, logp_beta, rewards, completion_mask, clip=0.0) -> torch.Tensor:
    """J_x = (1/K) sum_j (1/|y_j|) sum_t rho_jt A_j, rho = pi_theta / beta per token, A = group-normalised
    stored rewards. With clip > 0 the PPO-clipped surrogate min(rho A, clip(rho, 1 +- clip) A) instead."""
    A = group_advantages(rewards[None])[0].to(logp.device)[:, None]
    rho = torch.exp(logp - logp_beta)
    surrogate = rho * A
    if clip > 0:
        surrogate = torch.min(surrogate, rho.clamp(1 - clip, 1 + clip) * A)
    per_response = (surrogate * completion_mask).sum(1) / completion_mask.sum(1).clamp(min=1)
    return per_response.mean()


def popi_gradients(model, groups, params, args) -> tuple[torch.Tensor, int, float, float]:
    """grad J_x at the current policy for each stored group, [len(groups), d] fp32 over `params`; groups
    whose rewards are all equal get a zero row without a backward pass. Also the number of those, and
    the sum of |log pi_theta - log beta| over the stored tokens with the token count."""
    d = sum(p.numel() for _, p in params)
    grads = torch.zeros(len(groups), d, device=next(model.parameters()).device)
    zero, abs_log_ratio, tokens = 0, 0.0, 0.0
    for row, group in enumerate(groups):
        rollout, rewards = group["rollout"], group["rewards"]
        if rewards.max() == rewards.min():
            zero += 1
            continue
        logp = token_logprobs(model, rollout, args.store_temperature)
        mask = rollout.completion_mask.float()
        abs_log_ratio += ((logp.detach() - rollout.logprobs).abs() * mask).sum().item()
        tokens += mask.sum().item()
        J = popi_objective(logp, rollout.logprobs, rewards, mask, args.popi_clip)
        grads[row] = torch.cat([g.flatten() for g in torch.autograd.grad(J, [p for _, p in params])])
    return grads, zero, abs_log_ratio, tokens


def projected_gradients(model, store, params, args) -> tuple[torch.Tensor, int, float]:
    """z(x) = P grad J_x for every stored group, [len(store), k]: the gradients of --score-batch prompts at
    a time sit in one [batch, d] buffer and are projected; the (prompts x d) matrix never exists. Also
    the zero-gradient count and the mean |log pi_theta - log beta| over the stored tokens."""
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


def pass_rate_selection(pool_rewards: torch.Tensor, n: int) -> torch.Tensor:
    """The n prompts with the highest learnability p(1 - p) under the behaviour policy (ties: lower index)."""
    p = pool_rewards.float().mean(1)
    return torch.sort(p * (1 - p), descending=True, stable=True).indices[:n]


def pass_rate_histogram(pool_rewards: torch.Tensor, selected: torch.Tensor) -> dict:
    """Counts of the selected prompts by stored pass rate: 0, (0, 1/4], (1/4, 1/2], (1/2, 3/4], (3/4, 1), 1."""
    p = pool_rewards[selected].float().mean(1)
    edges = [("0", p == 0), ("0-25", (p > 0) & (p <= 0.25)), ("25-50", (p > 0.25) & (p <= 0.5)),
             ("50-75", (p > 0.5) & (p <= 0.75)), ("75-99", (p > 0.75) & (p < 1)), ("100", p == 1)]  # fmt: skip
    return {f"select/pass_rate_{name}": int(mask.sum()) for name, mask in edges}


def target_skills(task, args) -> list[str]:
    """The skills CROPI targets: --target-skills, else the built-in target skill for `chain`; [] = no skills
    (the whole validation split is the one target)."""
    if args.target_skills:
        return check_skills(task, args.target_skills, "--target-skills")
    return [TARGET_SKILL] if task.name == "chain" else []


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


def shard(items, rank, world):
    return items[rank::world]


def validation_targets(model, val_stores, params, args, world) -> torch.Tensor:
    """v_b = mean projected gradient of the first --val-prompts validation prompts with a non-zero gradient,
    per validation set, [S, k]. Each rank holds a strided shard of every set's store."""
    targets = []
    for b, local in enumerate(val_stores):
        usable = [g for g in local if g["rewards"].max() > g["rewards"].min()][: -(-args.val_prompts // world)]
        z, _, _ = projected_gradients(model, usable, params, args)
        count = all_reduce_sum([len(usable)])[0]
        total = torch.tensor(all_reduce_sum(z.sum(0).tolist()), device=z.device)
        if count == 0:
            fail(
                f"validation set {b}: every prompt's {args.val_responses} stored responses have equal rewards, so no"
                " validation gradient exists; raise --val-responses or --store-temperature, or choose --target-skills"
            )
        targets.append(total / count)
    return torch.stack(targets)


def select_prompts(model, pool_store, val_stores, pool_rewards, params, args, stage, rank, world) -> tuple:
    """This stage's selected pool indices (every rank gets the same) and the stage's scoring metrics."""
    N = len(pool_rewards)
    n_select = int(args.select_ratio * N)
    if args.selection == "full":
        return torch.arange(N), {}
    if args.selection == "random":
        generator = torch.Generator().manual_seed(args.seed * 9973 + stage)
        return torch.randperm(N, generator=generator)[:n_select].sort().values, {}
    if args.selection == "pass-rate":
        return pass_rate_selection(pool_rewards, n_select), {}
    targets = validation_targets(model, val_stores, params, args, world)
    z_local, zero, abs_log_ratio = projected_gradients(model, pool_store, params, args)
    z = gather_strided(z_local, N)  # projected vectors only; full gradients never leave a rank
    scores = torch.stack([cosine_scores(z, v) for v in targets]).cpu()
    selected = reciprocal_rank_fusion(scores, n_select)
    zero_total, abs_total = all_reduce_sum([zero, abs_log_ratio])
    metrics = {"score/zero_gradient_prompts": zero_total, "score/abs_log_ratio": abs_total / world,
               "score/mean_cosine_selected": scores[:, selected].mean().item()}  # fmt: skip
    return selected, metrics


# ---- training loop ---------------------------------------------------------------------------------------


def main(args: Args):
    session = open_session(args, "cropi", check_args)
    rank, world, device, task = session.rank, session.world, session.device, session.task
    run_dir, model_path, checkpoint = session.run_dir, session.model_path, session.checkpoint
    model, tokenizer = session.model, session.tokenizer
    pool, steps = task.train, args.stages * args.steps_per_stage
    if int(args.select_ratio * len(pool)) < 1:
        fail(f"--select-ratio {args.select_ratio}: selects no prompt of the {len(pool)}-prompt pool")
    skills = target_skills(task, args)
    val_sets = validation_sets(task, skills, world)
    if args.kernels == "triton" and not triton_usable(device):
        fail("--kernels triton: the Triton projection needs a CUDA device (or TRITON_INTERPRET=1) and triton installed")
    params = matching_parameters(model, args.grad_params)
    ref_model = load_policy(model_path, model.dtype, device)[0].eval() if args.beta > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state = load_trainer_state(checkpoint, optimizer) if checkpoint else {"step": 0, "train_time": 0.0}
    start, train_time, selected = state["step"], state["train_time"], state.get("selected")
    logger = RunLogger(run_dir, args, steps, start)
    logger.print(
        f"run folder {run_dir} | model {model_path} | task {task.name} (pool {len(pool)} prompts)"
        f" | selection {args.selection}, {args.stages} stages x {args.steps_per_stage} steps"
        f" | {len(val_sets)} validation set(s) | {world} process(es) on {device}"
    )
    step_gen = lambda step, stream: torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 101 + stream)
    timer = Timer()

    # The offline store: each rank's strided shard of the pool and of every validation set, once per run.
    store_file = os.path.join(run_dir, f"store_rank{rank}_of_{world}.pt")
    if os.path.exists(store_file):
        pool_store, val_stores = torch.load(store_file, weights_only=False)
    else:
        with timer("store"):
            gen = step_gen(10**6, rank)
            pool_store = collect_store(model, tokenizer, task, shard(pool, rank, world), args.pool_responses, args, gen)
            val_stores = [collect_store(model, tokenizer, task, shard(v, rank, world), args.val_responses, args, gen)
                          for v in val_sets]  # fmt: skip
        os.makedirs(run_dir, exist_ok=True)  # every rank writes its shard; rank 0 may not have made the folder yet
        torch.save((pool_store, val_stores), store_file)
        seconds = timer.pop()["store"]
        logger.log(0, {"time/store": seconds})
        logger.print(f"offline store: pool x {args.pool_responses}, validation x {args.val_responses} responses"
                     f" at T={args.store_temperature} in {seconds:.0f}s -> {store_file}")  # fmt: skip
    local_rewards = torch.stack([g["rewards"] for g in pool_store])
    pool_rewards = gather_strided(local_rewards.to(device), len(pool)).cpu()
    target_task = type(task)(**{**task.__dict__, "test": of_skills(task.test, skills)})

    def log_eval(step):
        metrics = evaluate(model, tokenizer, task, args.eval_prompts, args.max_new_tokens, args.temperature, rank,
                           world, step_gen(step, 50 + rank))  # fmt: skip
        if skills:  # accuracy on the test prompts of the target skills
            target = evaluate(model, tokenizer, target_task, len(target_task.test), args.max_new_tokens,
                              args.temperature, rank, world, step_gen(step, 60 + rank))  # fmt: skip
            metrics |= {k.replace("eval/", "eval_target/"): v for k, v in target.items() if k.count("/") == 1}
        logger.log(step, {**metrics, "time/train_elapsed": train_time})
        target = " ".join(f"{k[12:]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval_target/"))
        logger.print(eval_line(step, metrics) + (f" | target {target}" if target else ""))

    if start == 0:
        log_eval(0)
    B, n = args.batch_prompts // world, args.n
    seen = set(state.get("seen", []))  # pool prompts selected at some stage so far
    for step in range(start, steps):
        stage = step // args.steps_per_stage
        # 1. At a stage start: score the whole pool with the current policy and select (the curriculum).
        if step % args.steps_per_stage == 0 or selected is None:
            with timer("score"):
                selected, stage_metrics = select_prompts(model, pool_store, val_stores, pool_rewards, params, args,
                                                         stage, rank, world)  # fmt: skip
            seconds = timer.pop()["score"]
            train_time += all_reduce_mean({"t": seconds})["t"]
            seen_before = len(seen & set(selected.tolist())) / max(1, len(selected))  # curriculum or repetition?
            seen |= set(selected.tolist())
            stage_metrics |= {"time/score": seconds, "select/count": len(selected), "stage": stage,
                              "select/seen_before": seen_before, "select/distinct_so_far": len(seen),
                              **pass_rate_histogram(pool_rewards, selected)}  # fmt: skip
            if skills:  # does the selection find the target skills? (their share of the pool is the chance level)
                picked = of_skills([pool[i] for i in selected.tolist()], skills)
                stage_metrics |= {"select/target_share": len(picked) / max(1, len(selected)),
                                  "select/target_share_pool": len(of_skills(pool, skills)) / len(pool)}  # fmt: skip
            logger.log(step, stage_metrics)
            shown = " ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in stage_metrics.items() if "/" in k)
            logger.print(f"stage {stage} | selected {len(selected)} prompts in {seconds:.1f}s | {shown}")
            selected = selected.tolist() if torch.is_tensor(selected) else selected
        # 2. A GRPO step on B prompts drawn from the selected set (the same draw on every rank).
        draw_gen = torch.Generator().manual_seed(args.seed * 7919 + step)
        order = torch.randperm(len(selected), generator=draw_gen)
        picks = order[torch.arange(args.batch_prompts) % len(selected)]  # wraps when fewer than B are selected
        examples = [pool[selected[i]] for i in picks[rank * B : (rank + 1) * B].tolist()]
        prompts = prompt_ids(tokenizer, [e["question"] for e in examples], task.instruction)
        with timer("generate"):
            group_prompts = [p for p in prompts for _ in range(n)]
            rollout = sample(model, group_prompts, args.max_new_tokens, args.temperature, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, generator=step_gen(step, 1 + rank))  # fmt: skip
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        scores = [score(task.name, examples[i // n], t) for i, t in enumerate(texts)]
        rewards = torch.tensor([s[0] for s in scores]).view(B, n)
        with timer("update"):
            advantages = group_advantages(rewards).flatten().to(device)
            stats = grpo_update(model, ref_model, optimizer, rollout, advantages, args)
        times = timer.pop()
        train_time += sum(times.values())
        correct, unfaithful = count_correct_unfaithful(scores)
        metrics = all_reduce_mean({
            "reward/mean": rewards.mean().item(),
            "frac_zero_std": (rewards.max(1).values == rewards.min(1).values).float().mean().item(),
            **({"train/unfaithful": unfaithful / max(1, correct)} if task.name == "chain" else {}),
            **stats,
            **{f"time/{k}": v for k, v in times.items()},
        })  # fmt: skip
        train_time = all_reduce_mean({"t": train_time})["t"]
        metrics |= {"time/train_elapsed": train_time, "stage": stage}
        logger.log(step + 1, metrics)
        logger.progress(stage=stage, reward=metrics["reward/mean"])
        if (step + 1) % args.log_every == 0:
            logger.print(f"step {step + 1:4d} | stage {stage} | reward {metrics['reward/mean']:.3f}"
                         f" | gen {metrics['time/generate']:.2f}s upd {metrics['time/update']:.2f}s")  # fmt: skip
            logger.samples(step + 1, [{"question": examples[0]["question"], "completion": t, "reward": s[0]}
                                      for t, s in zip(texts[:4], scores[:4])])  # fmt: skip
        out_of_time = args.max_time and train_time >= args.max_time
        last = step + 1 == steps or out_of_time
        if (step + 1) % args.eval_every == 0 or last:
            log_eval(step + 1)
        if (args.save_every and (step + 1) % args.save_every == 0) or last:
            trainer_state = {"train_time": train_time, "selected": selected, "seen": sorted(seen)}
            save_checkpoint(run_dir, step + 1, model, tokenizer, optimizer, trainer_state)
        if out_of_time:
            logger.print(f"stopping: --max-time {args.max_time:.0f}s of training reached at step {step + 1}")
            break
    logger.close()
    if is_main():
        print(f"done: metrics in {os.path.join(run_dir, 'metrics.jsonl')}, checkpoints in {run_dir}/checkpoints")


if __name__ == "__main__":
    main(tyro.cli(Args))
