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


def first_principles_kl(ids, mu_logprobs, pi_logits, temperature, pi_floor=0.0):
    """KL(mu || pi) over the K stored tokens plus the rest bucket, in fp64 from probabilities:
    mu_k = exp(stored log-prob), pi = softmax(logits / T), rest = 1 - (mass of the set), and
    sum_b mu_b * log(mu_b / pi_b). `pi_floor` > 0 clamps pi_k first, as the formula did before the
    log-probs of the set were used as they are."""
    mu_k = mu_logprobs.double().exp()
    pi_k = F.softmax(pi_logits.double() / temperature, -1).gather(-1, ids).clamp(min=pi_floor)
    mu_rest, pi_rest = 1 - mu_k.sum(-1), 1 - pi_k.sum(-1)
    return torch.xlogy(mu_k, mu_k / pi_k).sum(-1) + torch.xlogy(mu_rest, mu_rest / pi_rest)  # 0 log 0 = 0


def ruled_out_rows(N=12, V=64, K=8, temperature=0.7, seed=5):
    """Rows where pi has nearly ruled out 1 to 3 of mu's stored top-K tokens (pi_k from 1e-13 down to
    1e-30, mu_k >= 1%), the rest of both distributions close; both rest buckets keep >= 5% of the mass,
    so no floor is involved. Returns (ids, stored log-probs, fp64 logits, T)."""
    g = torch.Generator().manual_seed(seed)
    log_mu = F.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 1.5, -1)
    lp, ids = log_mu.topk(K, -1)
    log_pi = log_mu + 0.3 * torch.randn(N, V, generator=g, dtype=torch.float64)
    for row in range(N):
        slots = torch.randperm(K, generator=g)[: 1 + row % 3]
        exponents = 13 + 17 * torch.rand(slots.numel(), generator=g, dtype=torch.float64)
        exponents[0] = 30.0 if row % 2 == 0 else exponents[0]
        log_pi[row, ids[row, slots]] = -exponents * torch.log(torch.tensor(10.0, dtype=torch.float64))
    log_pi = F.log_softmax(log_pi, -1)
    shift = 5 * torch.randn(N, 1, generator=g, dtype=torch.float64)  # so that log Z is not 0
    logits = temperature * log_pi + shift
    pi_k = log_pi.gather(-1, ids).exp()
    assert pi_k.min() < 1.1e-30 and (lp.exp()[pi_k < 1e-12] >= 0.01).all()
    assert (1 - lp.exp().sum(-1)).min() > 0.05 and (1 - pi_k.sum(-1)).min() > 0.05
    return ids, lp, logits, temperature


def test_kl_uses_log_pi_of_nearly_ruled_out_tokens():
    """Where pi_k of a stored token is far below 1e-12 the KL still equals the exact fp64 value, in fp64
    and in fp32: log pi_k is logits_k / T - log Z, not a floored log(pi_k)."""
    ids, lp, logits, T = ruled_out_rows()
    sampled = ids[:, 0]
    want = first_principles_kl(ids, lp, logits, T)
    d64 = topk_divergence_reference(logits, ids, lp, sampled, T)
    torch.testing.assert_close(d64["kl"], want, rtol=1e-12, atol=0)
    d32 = topk_divergence_reference(logits.float(), ids, lp.float(), sampled, T)
    torch.testing.assert_close(d32["kl"].double(), want, rtol=1e-5, atol=0)
    # the floored formula is far off on every row: each nearly ruled-out token lost >= 1% * log(10) of KL
    floored = first_principles_kl(ids, lp, logits, T, pi_floor=1e-12)
    assert (want - floored > 0.01 * 2.3).all()


def test_floored_log_pi_would_under_estimate_and_flip_the_mask():
    """One row where pi moved mu's 0.2% on a stored token (mu_k = 0.002) to pi_k = 1e-30: the exact KL is
    ~0.124, while flooring pi_k at 1e-12 gives ~0.041. At the KL threshold 0.05 (dppo.py's default) the
    floored value would keep a token the exact one masks; the reference returns the exact value."""
    T = 0.7
    mu = torch.tensor([0.5, 0.2, 0.1, 0.002] + [0.198 / 12] * 12, dtype=torch.float64)
    pi = mu.clone()
    pi[3], pi[4] = 1e-30, pi[4] + 0.002  # the mass moves into the rest bucket
    ids = torch.arange(4)[None]
    lp, logits = mu.log()[None, :4], T * pi.log()[None]
    exact_kl = first_principles_kl(ids, lp, logits, T)
    floored = first_principles_kl(ids, lp, logits, T, pi_floor=1e-12)
    assert floored.item() < 0.05 < exact_kl.item()
    for dtype in (torch.float64, torch.float32):
        d = topk_divergence_reference(logits.to(dtype), ids, lp.to(dtype), ids[:, 0], T)
        assert d["kl"].item() > floored.item() + 0.08
        torch.testing.assert_close(d["kl"].double(), exact_kl, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_stored_token_of_zero_mass_adds_nothing():
    """A stored log-prob of -inf (mu_k = 0) contributes 0 log 0 = 0 to the KL, not NaN."""
    mu_logits, pi_logits, sampled = pair(4, 40, peaked=False, seed=6)
    ids, lp = behaviour_topk(mu_logits, 5, sampled)
    with_zero = lp.clone()
    with_zero[:, 1] = float("-inf")
    d = topk_divergence_reference(pi_logits, ids, with_zero, sampled)
    want = first_principles_kl(ids, with_zero, pi_logits, 1.0)
    assert torch.isfinite(d["kl"]).all()
    torch.testing.assert_close(d["kl"].double(), want, rtol=1e-5, atol=1e-6)
