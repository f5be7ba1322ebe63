"""DPPO math on hand-built tensors: divergences, the mask, the loss gradient, aggregations, bad settings."""

import itertools
import math

import pytest
import torch

from dppo import (
    Args,
    aggregate,
    binary_kl,
    binary_tv,
    check_args,
    dppo_token_loss,
    group_advantages,
    ratio_deviation,
    thresholds,
    token_divergence,
    trust_region_mask,
)
from kernels.topk_divergence import topk_divergence_reference


def exact_tv_kl(p_mu, p_pi):
    return 0.5 * (p_mu - p_pi).abs().sum(-1), (p_mu * (p_mu.log() - p_pi.log())).sum(-1)


def test_binary_equals_exact_at_two_tokens():
    g = torch.Generator().manual_seed(0)
    p_mu = torch.softmax(torch.randn(50, 2, generator=g, dtype=torch.float64) * 3, -1)
    p_pi = torch.softmax(torch.randn(50, 2, generator=g, dtype=torch.float64) * 3, -1)
    sampled = torch.randint(2, (50, 1), generator=g)
    lp_mu, lp_pi = p_mu.log().gather(-1, sampled), p_pi.log().gather(-1, sampled)
    tv, kl = exact_tv_kl(p_mu, p_pi)
    torch.testing.assert_close(binary_tv(lp_pi, lp_mu).squeeze(-1), tv)
    torch.testing.assert_close(binary_kl(lp_pi, lp_mu).squeeze(-1), kl)


def behaviour_and_current(V, rows, peaked, seed):
    """mu and pi over V tokens (pi a perturbation of mu), a token sampled from mu, all fp64."""
    g = torch.Generator().manual_seed(seed)
    scale = 8.0 if peaked else 1.0
    logits_mu = torch.randn(rows, V, generator=g, dtype=torch.float64) * scale
    logits_pi = logits_mu + torch.randn(rows, V, generator=g, dtype=torch.float64) * 0.5
    log_mu = logits_mu.log_softmax(-1)
    sampled = torch.multinomial(log_mu.exp(), 1, generator=g).squeeze(-1)
    return logits_pi, log_mu, sampled


def forced_topk(log_mu, sampled, K):
    """mu's K most likely ids with the sampled id overwriting the last slot when missing (as the sampler does)."""
    lp, ids = log_mu.topk(K, -1)
    missing = (ids != sampled[:, None]).all(-1)
    ids[missing, -1] = sampled[missing]
    return ids, log_mu.gather(-1, ids)


@pytest.mark.parametrize("V,peaked", [(100, False), (100, True), (1000, False), (1000, True)])
def test_binary_le_topk_le_exact(V, peaked):
    logits_pi, log_mu, sampled = behaviour_and_current(V, 64, peaked, seed=V + peaked)
    log_pi = logits_pi.log_softmax(-1)
    tv, kl = exact_tv_kl(log_mu.exp(), log_pi.exp())
    lp_pi, lp_mu = log_pi.gather(-1, sampled[:, None])[:, 0], log_mu.gather(-1, sampled[:, None])[:, 0]
    b_tv, b_kl = binary_tv(lp_pi, lp_mu), binary_kl(lp_pi, lp_mu)
    for K in (1, 5, 20):
        ids, lps = forced_topk(log_mu, sampled, K)
        d = topk_divergence_reference(logits_pi, ids, lps, sampled)
        assert (b_tv <= d["tv"] + 1e-12).all() and (d["tv"] <= tv + 1e-12).all()
        assert (b_kl <= d["kl"] + 1e-12).all() and (d["kl"] <= kl + 1e-12).all()
        if K == 1:  # the set is the sampled token alone: Top-1 is Binary
            torch.testing.assert_close(d["tv"], b_tv)
            torch.testing.assert_close(d["kl"], b_kl)


def test_binary_kl_is_accurate_near_one():
    """mu, pi -> 1: the (1-mu) log((1-mu)/(1-pi)) term needs expm1, not 1 - exp()."""
    lp_mu = torch.tensor([-1e-9, -1e-7, -0.5], dtype=torch.float32)
    lp_pi = torch.tensor([-2e-9, -3e-7, -0.7], dtype=torch.float32)
    mu = lp_mu.double().exp()
    a, b = -torch.expm1(lp_mu.double()), -torch.expm1(lp_pi.double())
    want = mu * (lp_mu.double() - lp_pi.double()) + a * (a.log() - b.log())
    got = binary_kl(lp_pi, lp_mu)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-12)
    assert binary_kl(torch.tensor([0.0]), torch.tensor([0.0])).item() == 0.0  # mu = pi = 1: no nan


def brute_force_mask(mu, pi, A, D, low, high):
    if A > 0 and pi > mu and D > high:
        return 0.0
    if A < 0 and pi < mu and D > low:
        return 0.0
    return 1.0


def test_mask_equals_brute_force_rule():
    probs = [0.001, 0.05, 0.2, 0.5, 0.8, 0.95, 0.999]
    for low, high in [(0.05, 0.05), (0.15, 0.15), (0.1, 0.3)]:
        pairs = list(itertools.product(probs, probs))
        mu = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
        pi = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
        for A in (-1.0, 0.0, 1.0):
            for name, divergence in (("tv", binary_tv), ("kl", binary_kl)):
                D = divergence(pi.log(), mu.log())
                got = trust_region_mask(D[None], pi.log()[None], mu.log()[None], torch.tensor([A]), low, high)[0]
                cases = zip(mu.tolist(), pi.tolist(), D.tolist())
                want = [brute_force_mask(m, p, A, d, low, high) for m, p, d in cases]
                assert got.tolist() == want, (name, A, low, high)
                back_toward_mu = (A > 0) & (pi < mu) | (A < 0) & (pi > mu) | (A == 0)
                assert (got[back_toward_mu] == 1).all()
        assert (got == 0).any() and (got == 1).any()  # the grid exercises both outcomes


def test_ratio_deviation_mask_is_ppo_clipping():
    """D = |r - 1| with delta = eps: the kept tokens are exactly those where PPO's clipped surrogate
    min(r A, clip(r, 1-eps_low, 1+eps_high) A) has a non-zero gradient, and the gradients agree."""
    g = torch.Generator().manual_seed(1)
    lp_mu = -torch.rand(8, 40, generator=g, dtype=torch.float64) * 3
    lp = (lp_mu + torch.randn(8, 40, generator=g, dtype=torch.float64) * 0.4).clamp(max=0).requires_grad_()
    A = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0], dtype=torch.float64)
    eps_low, eps_high = 0.2, 0.28
    r = (lp - lp_mu).exp()
    ppo = -torch.min(r * A[:, None], r.clamp(1 - eps_low, 1 + eps_high) * A[:, None]).sum()
    (grad_ppo,) = torch.autograd.grad(ppo, lp)
    M = trust_region_mask(ratio_deviation(lp.detach(), lp_mu), lp, lp_mu, A, eps_low, eps_high)
    assert ((grad_ppo != 0).double() == M).all()
    assert 0 < M.mean() < 1
    (grad_dppo,) = torch.autograd.grad(dppo_token_loss(lp, lp_mu, A, M).sum(), lp)
    torch.testing.assert_close(grad_dppo, grad_ppo)


def test_gradient_is_zero_on_masked_tokens_and_analytic_on_kept_ones():
    g = torch.Generator().manual_seed(2)
    N, L, V, T, C, horizon = 4, 5, 11, 0.7, 1.5, 8
    logits = torch.randn(N, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    sampled = torch.randint(V, (N, L), generator=g)
    lp_mu = (torch.randn(N, L, V, generator=g, dtype=torch.float64) / T).log_softmax(-1).gather(-1, sampled[..., None])
    lp_mu = lp_mu.squeeze(-1).requires_grad_()  # a leaf, to prove that no gradient reaches mu
    A = torch.tensor([1.0, -1.0, 0.5, -0.25], dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    probs = (logits / T).softmax(-1)
    lp = probs.log().gather(-1, sampled[..., None]).squeeze(-1)
    D = token_divergence("binary-tv", lp, lp_mu.detach())
    M = trust_region_mask(D, lp, lp_mu.detach(), A, 0.05, 0.05)
    assert (M * valid == 0).any() and (M * valid == 1).any()
    loss = aggregate(dppo_token_loss(lp, lp_mu, A, M, is_cap=C), valid, "seq-mean-token-sum-norm", horizon, N)
    loss.backward()
    assert lp_mu.grad is None or (lp_mu.grad == 0).all()
    r = (lp.detach() - lp_mu.detach()).exp().clamp(max=C)
    onehot = torch.nn.functional.one_hot(sampled, V).double()
    weight = (-A[:, None] * r * M * valid / horizon / N)[..., None]
    expected = weight * (onehot - probs.detach()) / T
    torch.testing.assert_close(logits.grad, expected)
    assert (logits.grad[(M * valid) == 0] == 0).all()  # masked tokens and padding: exactly zero


def test_aggregations_on_a_ragged_batch():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9e9], [4.0, 9e9, 9e9, 9e9], [5.0, 6.0, 9e9, 9e9]])
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]).float()
    per_token = per_token * valid  # padding must contribute nothing, whatever it held
    horizon = 10
    seq = aggregate(per_token, valid, "seq-mean-token-sum-norm", horizon, normaliser=3)
    assert seq.item() == pytest.approx(((1 + 2 + 3) / 10 + 4 / 10 + (5 + 6) / 10) / 3)
    tok = aggregate(per_token, valid, "token-mean", horizon, normaliser=6)
    assert tok.item() == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 6)


def test_group_advantages_subtract_the_mean_without_std():
    """The paper's advantages (--no-scale-rewards) are mean-centred only (no division by the group's std)."""
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25] * 3 + [-0.75]])
    torch.testing.assert_close(group_advantages(rewards, Args(scale_rewards=False).scale_rewards), expected)


def test_is_cap_truncates_the_weight():
    lp_mu = torch.tensor([[-3.0, -0.1]])
    lp = torch.tensor([[-0.5, -0.1]], requires_grad=True)  # r = e^2.5 (capped to 2) and 1
    loss = dppo_token_loss(lp, lp_mu, torch.tensor([1.0]), torch.ones(1, 2), is_cap=2.0).sum()
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -1.0]]))


def test_thresholds_defaults():
    assert thresholds(Args(trust_region="binary-tv")) == (0.15, 0.15)
    assert thresholds(Args(trust_region="topk-kl")) == (0.05, 0.05)
    assert thresholds(Args(trust_region="ratio")) == (0.2, 0.2)
    assert thresholds(Args(trust_region="ratio", eps_high=0.28)) == (0.2, 0.28)
    assert thresholds(Args(trust_region="binary-tv", delta_low=0.1, delta_high=0.2)) == (0.1, 0.2)
    assert thresholds(Args(trust_region="none")) == (math.inf, math.inf)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(delta_low=0.0), "--delta-low"),
        (dict(delta_high=-0.1), "--delta-high"),
        (dict(eps_high=0.0), "--eps-high"),
        (dict(trust_region="topk-tv", top_k=0), "--top-k"),
        (dict(minibatches=3), "--minibatches"),
        (dict(micro_batch=-1), "--micro-batch"),
        (dict(is_cap=0.0), "--is-cap"),
        (dict(batch_prompts=3), "--batch-prompts"),
    ],
)
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(SystemExit, match=message):
        check_args(Args(**{"batch_prompts": 4, "n": 4, **kw}), world=2 if "batch_prompts" in kw else 1)
