"""Top-K divergence reference against exact divergences and hand facts."""

import pytest
import torch
import torch.nn.functional as F

from kernels.topk_divergence import topk_divergence_reference


def exact(mu_logits, pi_logits):
    mu, pi = F.softmax(mu_logits.double(), -1), F.softmax(pi_logits.double(), -1)
    tv = 0.5 * (mu - pi).abs().sum(-1)
    kl = (mu * (mu.clamp(min=1e-300).log() - pi.clamp(min=1e-300).log())).sum(-1)
    return tv, kl


def behaviour_topk(mu_logits, K, sampled):
    """mu's top-K with the sampled token forced into the last slot, as the sampler records it."""
    logp = F.log_softmax(mu_logits, -1)
    lp, ids = logp.topk(K, -1)
    missing = (ids != sampled[:, None]).all(-1)
    ids[missing, -1] = sampled[missing]
    lp[missing, -1] = logp.gather(-1, sampled[:, None]).squeeze(-1)[missing]
    return ids, lp


def pair(N, V, peaked, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scale = 6.0 if peaked else 1.0
    mu_logits = torch.randn(N, V, generator=g, dtype=dtype) * scale
    pi_logits = mu_logits + 0.5 * torch.randn(N, V, generator=g, dtype=dtype)
    sampled = torch.multinomial(F.softmax(mu_logits, -1), 1, generator=g).squeeze(-1)
    return mu_logits, pi_logits, sampled


@pytest.mark.parametrize("peaked", [False, True])
@pytest.mark.parametrize("V", [100, 997])
def test_topk_below_exact_monotone_in_k_and_exact_at_v_minus_1(peaked, V):
    """Exact-arithmetic facts, checked in fp64 (in fp32, rounding of tiny KLs exceeds their gaps)."""
    mu_logits, pi_logits, sampled = pair(16, V, peaked, dtype=torch.float64)
    exact_tv, exact_kl = exact(mu_logits, pi_logits)
    # nested sets: the true top-K of mu for growing K (the sampled token is then not forced)
    logp = F.log_softmax(mu_logits, -1)
    previous = None
    for K in (1, 5, 20, 64, V - 1):
        lp, ids = logp.topk(K, -1)
        d = topk_divergence_reference(pi_logits, ids, lp, sampled)
        assert (d["tv"] <= exact_tv + 1e-10).all() and (d["kl"] <= exact_kl + 1e-10).all()
        if previous is not None:
            assert (d["tv"] >= previous["tv"] - 1e-10).all() and (d["kl"] >= previous["kl"] - 1e-10).all()
        previous = d
    assert torch.allclose(previous["tv"], exact_tv, atol=1e-10)
    assert torch.allclose(previous["kl"], exact_kl, atol=1e-10)


def test_tv_gap_bounded_by_tail_mass():
    mu_logits, pi_logits, sampled = pair(32, 300, peaked=False, seed=1, dtype=torch.float64)
    ids, lp = behaviour_topk(mu_logits, 10, sampled)
    d = topk_divergence_reference(pi_logits, ids, lp, sampled)
    exact_tv, _ = exact(mu_logits, pi_logits)
    mu_tail = 1 - lp.exp().sum(-1)
    pi_tail = 1 - F.softmax(pi_logits.double(), -1).gather(-1, ids).sum(-1)
    assert (exact_tv - d["tv"] <= torch.minimum(mu_tail, pi_tail) + 1e-10).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_normaliser_sampled_logprob_chunking_and_padding(dtype, temperature):
    mu_logits, pi_logits, sampled = pair(37, 257, peaked=True, seed=2)
    logits = (pi_logits * 3).to(dtype)  # large-magnitude logits, stored in a low precision
    ids, lp = behaviour_topk(mu_logits / temperature, 20, sampled)
    valid = torch.ones(37, dtype=torch.bool)
    valid[[0, 5, 36]] = False
    d = topk_divergence_reference(logits, ids, lp, sampled, temperature, valid, chunk_rows=8)
    full = topk_divergence_reference(logits, ids, lp, sampled, temperature)
    scaled = logits.float() / temperature
    assert torch.allclose(full["log_z"], scaled.logsumexp(-1), atol=1e-5)
    expected = F.log_softmax(scaled, -1).gather(-1, sampled[:, None]).squeeze(-1)
    assert torch.allclose(full["sampled_logprob"], expected, atol=1e-5)
    for key in d:  # chunked = unchunked on valid rows, padded rows are 0
        assert torch.equal(d[key][valid], full[key][valid])
        assert (d[key][~valid] == 0).all()


def test_identical_policies_have_zero_divergence():
    mu_logits, _, sampled = pair(8, 50, peaked=False, seed=3)
    ids, lp = behaviour_topk(mu_logits, 5, sampled)
    d = topk_divergence_reference(mu_logits, ids, lp, sampled)
    assert d["tv"].abs().max() < 1e-6 and d["kl"].abs().max() < 1e-6


def test_fp32_agrees_with_fp64():
    mu_logits, pi_logits, sampled = pair(16, 997, peaked=True, seed=4, dtype=torch.float64)
    ids, lp = behaviour_topk(mu_logits, 20, sampled)
    d64 = topk_divergence_reference(pi_logits, ids, lp, sampled)
    d32 = topk_divergence_reference(pi_logits.float(), ids, lp.float(), sampled)
    assert all(d32[k].dtype == torch.float32 for k in d32)
    for key, atol in (("tv", 1e-5), ("kl", 1e-4), ("log_z", 1e-4), ("sampled_logprob", 1e-4)):
        assert torch.allclose(d32[key].double(), d64[key], atol=atol), key
