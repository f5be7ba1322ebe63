"""One update of grpo, pods or ippo on a fixed global batch, on as many ranks as this runs on (plain python: 1,
torchrun: several). Rank r trains on its share of the batch's prompts; rank 0 saves what the step changed.

    python tests/one_step.py grpo MODEL_DIR OUT.pt [aggregation]
    python -m torch.distributed.run --nproc_per_node 2 tests/one_step.py grpo MODEL_DIR OUT.pt
    python -m torch.distributed.run --nproc_per_node 2 tests/one_step.py grpo MODEL_DIR OUT.pt seq-mean-token-mean fsdp

Plain SGD with lr 1 and no gradient clipping, so the parameter change is the gradient itself (Adam's first
step, about lr * sign(gradient), would hide a wrongly scaled gradient).
"""

import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from common.model import load_policy  # noqa: E402
from common.sampling import prompt_ids, sample, token_logprobs  # noqa: E402
from common.torchrun import setup_distributed, shard  # noqa: E402
from common.world.chain import make_chain  # noqa: E402

PROMPTS, N, M, TOKENS = 4, 4, 2, 10
REWARDS = torch.tensor([[1.0, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]])  # varied within every group


def grpo_like_step(script, model, optimizer, rollout, rewards, aggregation):
    args = script.Args(max_new_tokens=TOKENS, max_grad_norm=1e9, aggregation=aggregation, n=N)
    if script.__name__ == "pods":  # the selection is per prompt, so each rank selects among its own groups
        args.m = M
        keep = script.DOWN_SAMPLE["max-variance"](rewards, M)
        rows = (torch.arange(len(rewards))[:, None] * N + keep).flatten()
        rollout, rewards = rollout.select(rows), rewards.gather(1, keep)
    advantages = script.group_advantages(rewards, args.scale_rewards).flatten()
    script.policy_update(model, None, optimizer, rollout, advantages, args, torch.Generator().manual_seed(0))


def ippo_step(model_dir, model, tokenizer, optimizer, rollout, rewards, rank, world):
    import ippo

    args = ippo.Args(epochs=1, minibatches=1, max_new_tokens=TOKENS, max_grad_norm=1e9, beta=0.0)
    critic = ippo.Critic(load_policy(model_dir)[0])
    critic_optimizer = torch.optim.SGD(critic.parameters(), lr=1.0)
    mask = rollout.completion_mask.float()
    with torch.no_grad():
        logp_old, values = token_logprobs(model, rollout), critic(rollout)
        token_rewards = ippo.token_rewards(rewards.flatten(), logp_old, logp_old, mask, 0.0)
        advantages, returns = ippo.gae(token_rewards, values, mask, args.gae_lambda)
        advantages = ippo.whiten(advantages, mask)  # over the whole buffer, all ranks
    gold = ippo.gold_rollout(tokenizer, make_chain().validation[:8][rank::world], "", "cpu")
    names = [name for name, _ in model.named_parameters()]
    g_val, _ = ippo.validation_gradient(model, names, gold)
    influence = ippo.influence_scores(model, names, rollout, advantages, logp_old, g_val, args)
    keep, weights = ippo.influence_weights(influence)  # weights divide by the mean kept score over all ranks
    rows = keep.nonzero().squeeze(-1)
    batch = {"rollout": rollout.select(rows), "advantages": advantages[rows], "old_logprobs": logp_old[rows],
             "values": values[rows], "returns": returns[rows], "weights": weights[rows]}  # fmt: skip
    ippo.ppo_update(model, critic, optimizer, critic_optimizer, batch, args, torch.Generator().manual_seed(0))
    return critic


def main(mode, model_dir, out, aggregation="seq-mean-token-mean", sharding=""):
    rank, world, _ = setup_distributed("cpu")
    model, tokenizer = load_policy(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shard(model, SimpleNamespace(fsdp=sharding == "fsdp", dtype="float32"))
    questions = [e["question"] for e in make_chain().train[:PROMPTS]]
    ids = [p for p in prompt_ids(tokenizer, questions) for _ in range(N)]
    rollout = sample(model, ids, TOKENS, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(0))  # the same global batch on every rank
    share = PROMPTS // world
    local = rollout.select(torch.arange(rank * share * N, (rank + 1) * share * N))
    rewards = REWARDS[rank * share : (rank + 1) * share]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    if mode == "ippo":
        ippo_step(model_dir, model, tokenizer, optimizer, local, rewards, rank, world)
    else:
        grpo_like_step(__import__(mode), model, optimizer, local, rewards, aggregation)
    after = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({k: v - before[k] for k, v in after.items()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
