"""grpo.py: advantages, the clipped surrogate, the KL term and the aggregations by hand; the update's
mini-batches; the script end to end (--help, a smoke run, bad input)."""

import sys

import pytest
import torch
from conftest import check_help, check_per_skill_eval, metric_rows, run_command

import grpo
from common.model import load_policy
from common.sampling import sample

SMALL = ["--steps", "2", "--batch-prompts", "2", "--n", "4", "--eval-prompts", "6", "--eval-every", "1",
         "--log-every", "1", "--max-new-tokens", "12"]  # fmt: skip


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    std0, std1 = torch.tensor([1.0, 0, 0, 1]).std().item(), torch.tensor([1.0, 1, 1, 0]).std().item()  # unbiased
    scaled = grpo.group_advantages(rewards, scale=True, eps=0.0)
    torch.testing.assert_close(scaled[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std0)
    torch.testing.assert_close(scaled[1], torch.tensor([0.25, 0.25, 0.25, -0.75]) / std1)
    centred = grpo.group_advantages(rewards, scale=False)
    torch.testing.assert_close(centred, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]))
    assert grpo.group_advantages(torch.ones(1, 4)).abs().max() == 0  # equal rewards: no signal, no NaN


def test_clipped_surrogate_by_hand():
    # one token per row: ratio 1.5 with A > 0 (clipped at 1.2), 0.5 with A < 0 (clipped at 0.8), 1.1 inside, and
    # 0.5 with A > 0 or 1.5 with A < 0, where min() picks the unclipped term (the clip only stops improvement)
    ratio = torch.tensor([[1.5], [0.5], [1.1], [0.5], [1.5]])
    A = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0])
    logp = ratio.log().requires_grad_()
    loss, clipped = grpo.clipped_surrogate(logp, torch.zeros(5, 1), A, 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2], [0.8], [-1.1], [-0.5], [1.5]]))  # -min(rA, clip(r)A)
    assert clipped.flatten().tolist() == [True, True, False, False, False]
    loss.sum().backward()
    # where the clip binds the gradient is 0; elsewhere d(-rA)/dlogp = -rA
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [0.0], [-1.1], [-0.5], [1.5]]))


def test_clip_higher_is_asymmetric():
    logp = torch.tensor([[0.25]]).log1p()  # ratio 1.25
    loss, clipped = grpo.clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.28)
    assert loss.item() == pytest.approx(-1.25) and not clipped.item()  # inside 1 + 0.28
    loss, clipped = grpo.clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.2)
    assert loss.item() == pytest.approx(-1.2) and clipped.item()


def test_ratio_one_gives_the_plain_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = grpo.clipped_surrogate(logp, logp.detach(), torch.tensor([3.0]), 0.2, 0.2)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-3.0, -3.0]]))


def test_kl_k3_by_hand():
    logp, ref = torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -1.5])
    torch.testing.assert_close(grpo.kl_k3(logp, ref), torch.tensor([0.0, torch.tensor(-0.5).exp().item() + 0.5 - 1]))
    assert (grpo.kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert grpo.aggregate(per_token, mask, "seq-mean-token-mean", 48, 2).item() == pytest.approx((1.5 + 4.0) / 2)
    assert grpo.aggregate(per_token, mask, "token-mean", 48, 3).item() == pytest.approx(7.0 / 3)
    assert grpo.aggregate(per_token, mask, "seq-mean-token-sum-norm", 10, 2).item() == pytest.approx(7.0 / 10 / 2)
    assert grpo.loss_normaliser(mask, "seq-mean-token-mean") == 2
    assert grpo.loss_normaliser(mask, "token-mean") == 3


def batch(model_dir, prompts=4, n=4):
    model, tokenizer = load_policy(model_dir)
    ids = [tokenizer(f"What is {i}+{i + 1}?")["input_ids"] for i in range(prompts) for _ in range(n)]
    rollout = sample(model, ids, 8, 1.0, -1, tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    rewards = (torch.arange(prompts * n) % 3 == 0).float().view(prompts, n)
    return model, rollout, grpo.group_advantages(rewards).flatten()


def test_one_minibatch_is_one_optimizer_step_with_no_clipping(random_model_dir):
    model, rollout, advantages = batch(random_model_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    real_step = optimizer.step
    optimizer.step = lambda *a, **k: (calls.append(1), real_step(*a, **k))
    args = grpo.Args(minibatches=1, max_new_tokens=8)
    stats = grpo.policy_update(model, None, optimizer, rollout, advantages, args, torch.Generator().manual_seed(0))
    assert len(calls) == 1
    assert stats["policy/clip_frac"] == 0.0  # pi_old is the sampler's record of the same policy: ratio ~ 1
    assert stats["train/update_tokens"] == rollout.completion_mask.sum().item()


def test_several_minibatches_move_the_ratio_and_clip(random_model_dir):
    model, rollout, advantages = batch(random_model_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)  # large steps, so later mini-batches leave the region
    args = grpo.Args(minibatches=4, max_new_tokens=8, max_grad_norm=1e9)
    stats = grpo.policy_update(model, None, optimizer, rollout, advantages, args, torch.Generator().manual_seed(0))
    assert stats["policy/clip_frac"] > 0


def test_kl_penalty_adds_the_k3_gradient(random_model_dir):
    """With a reference that differs from the policy, --beta changes the update by exactly beta times the
    gradient of the k3 KL (aggregated like the loss), written here from the logits by hand. One mini-batch,
    plain SGD at lr 1 and no norm clipping, so the parameter change is minus the gradient."""
    model, rollout, advantages = batch(random_model_dir)
    reference = load_policy(random_model_dir)[0].eval()
    with torch.no_grad():
        for p in reference.parameters():  # a reference away from the policy: the k3 gradient is 0 where they agree
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    beta, start = 0.5, {k: v.clone() for k, v in model.state_dict().items()}

    def change(beta_):
        model.load_state_dict(start)
        args = grpo.Args(beta=beta_, max_new_tokens=8, max_grad_norm=1e9)
        grpo.policy_update(model, reference, torch.optim.SGD(model.parameters(), lr=1.0), rollout, advantages, args,
                         torch.Generator().manual_seed(0))  # fmt: skip
        return {n: p.detach() - start[n] for n, p in model.named_parameters()}

    with_kl, without = change(beta), change(0.0)

    def completion_logprobs(m):  # log pi(y_t | y_<t) at temperature 1, from the full logits
        out = m(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=(rollout.attention_mask.cumsum(-1) - 1).clamp(min=0))  # fmt: skip
        logits = out.logits[:, rollout.prompt_len - 1 : -1].float()
        return logits.log_softmax(-1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)

    model.load_state_dict(start)
    with torch.no_grad():
        ref_logp = completion_logprobs(reference)
    log_r = ref_logp - completion_logprobs(model)
    k3 = log_r.exp() - log_r - 1  # per token
    mask = rollout.completion_mask.float()
    kl = ((k3 * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()  # token mean per sequence, mean over sequences
    assert kl.item() > 1e-3
    names, params = zip(*model.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(beta * kl, params)))
    for name in names:
        torch.testing.assert_close(with_kl[name] - without[name], -grads[name], rtol=1e-3, atol=1e-6)


def test_help_documents_every_flag():
    check_help("grpo.py", grpo.Args)


def test_smoke_run(random_model_dir, tmp_path):
    out = run_command([sys.executable, "grpo.py", "--model", random_model_dir, "--output-dir", str(tmp_path),
                       "--run-name", "smoke", "--minibatches", "2", *SMALL])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = metric_rows(tmp_path / "smoke")
    train = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward/zero_std_frac", "loss/clipped_surrogate", "policy/clip_frac", "policy/entropy", "grad_norm",
                "train/completion_len", "train/unfaithful", "time/generate", "time/update",
                "throughput/generate_tokens_per_s"):  # fmt: skip
        assert key in train[0], key
    check_per_skill_eval(rows[0], 6)
    load_policy(str(tmp_path / "smoke" / "checkpoints" / "step_000002"))  # loadable with transformers
    assert "step    2 | reward" in out.stdout + out.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n=1), "--n 1: need at least 2 rollouts"),
        (dict(batch_prompts=0), "--batch-prompts 0: must be positive"),
        (dict(minibatches=0), "--minibatches 0: must be positive"),
        (dict(lr=0.0), "--lr 0.0: must be positive"),
        (dict(eps_low=-0.1), "--eps-low -0.1: must be positive"),
        (dict(temperature=0.0), "--temperature 0.0: must be positive"),
        (dict(beta=-1.0), "--beta -1.0: must be non-negative"),
        (dict(micro_batch=-1), "--micro-batch -1: must be non-negative"),
        (dict(minibatches=3), "--minibatches 3 does not divide the 16 sequences per rank"),
        (dict(batch_prompts=3, n=2, minibatches=4), "--minibatches 4 does not divide the 6 sequences per rank"),
    ],
)
def test_bad_input(overrides, message):
    with pytest.raises(SystemExit, match=message.replace(".", r"\.")):
        grpo.check_args(grpo.Args(**{"batch_prompts": 2, **overrides}), world=1)


def test_batch_must_divide_by_world_size():
    with pytest.raises(SystemExit, match="--batch-prompts 3 does not divide by the 2 processes"):
        grpo.check_args(grpo.Args(batch_prompts=3), world=2)


def test_bad_input_is_one_line_and_nonzero_exit(random_model_dir):
    out = run_command([sys.executable, "grpo.py", "--model", random_model_dir, "--n", "1"])
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: --n 1:")
