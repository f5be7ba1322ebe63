"""dppo.py's anchor choice and its noisy sampler: the trust regions measured against pi_old by hand, the recomputed
anchor equal to the mu anchor without a mismatch, the importance weight and the mechanism metrics by brute force,
and the noise drawn from the run's seeded generator into what is sampled and recorded as mu."""

import copy
import math

import pytest
import torch
from conftest import metric_rows

import dppo
from common.flags import parse_args
from common.model import load_policy
from common.sampling import positions, sample
from kernels.topk_divergence import topk_divergence_reference

SMALL = ["--steps", "2", "--batch-prompts", "2", "--n", "4", "--minibatches", "2", "--eval-prompts", "2",
         "--eval-every", "2", "--log-every", "1", "--max-new-tokens", "6"]  # fmt: skip


def full_logits(model, rollout):
    """The trainer's logits at every completion position [N, L, V], from one plain forward pass."""
    with torch.no_grad():
        out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                    position_ids=positions(rollout.attention_mask))  # fmt: skip
    return out.logits[:, rollout.prompt_len - 1 : -1].float()


def rollout_of(model_dir, sampler_temperature, top_k=0, rows=8):
    model, tok = load_policy(model_dir)
    record = dppo.TopKRecord(top_k) if top_k else None
    r = sample(model, [tok("What is 1+2?\n")["input_ids"]] * rows, 8, sampler_temperature, tok.eos_token_id,
               tok.pad_token_id, generator=torch.Generator().manual_seed(0), on_token=record)  # fmt: skip
    if record:
        r.topk_ids, r.topk_logprobs = record.tensors()
    return model, r


# ---- the trust regions around pi_old, by hand --------------------------------------------------------------


def test_every_trust_region_measured_against_pi_old_by_hand():
    """Token a (A > 0): pi 0.4, pi_old 0.3, mu 0.7. Token b (A < 0): pi 0.35, pi_old 0.5, mu 0.2. Around pi_old both
    moved further the way their advantage pushes, past every threshold below, and are masked; around mu both move
    back towards mu and are kept."""
    lp = torch.tensor([[0.4], [0.35]], dtype=torch.float64).log()
    lp_old = torch.tensor([[0.3], [0.5]], dtype=torch.float64).log()
    lp_mu = torch.tensor([[0.7], [0.2]], dtype=torch.float64).log()
    A = torch.tensor([1.0, -1.0], dtype=torch.float64)
    kl = lambda p, q: p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))  # KL(p || q), two buckets
    by_hand = {"binary-tv": ([0.1, 0.15], 0.05), "binary-kl": ([kl(0.3, 0.4), kl(0.5, 0.35)], 0.02),
               "ratio": ([0.4 / 0.3 - 1, 1 - 0.35 / 0.5], 0.28)}  # fmt: skip
    for trust_region, (D_by_hand, delta) in by_hand.items():
        D = dppo.token_divergence(trust_region, lp, lp_old)
        torch.testing.assert_close(D[:, 0], torch.tensor(D_by_hand, dtype=torch.float64))
        assert dppo.trust_region_mask(D, lp, lp_old, A, delta, delta).tolist() == [[0.0], [0.0]], trust_region
        D_mu = dppo.token_divergence(trust_region, lp, lp_mu)
        assert dppo.trust_region_mask(D_mu, lp, lp_mu, A, delta, delta).tolist() == [[1.0], [1.0]], trust_region


def test_topk_divergence_around_pi_old_by_hand():
    """V = 4, pi = (0.4, 0.4, 0.1, 0.1), pi_old = (0.5, 0.3, 0.15, 0.05), the set S = {0, 1} (mu's top-2, sampled 1):
    TV = 1/2 (0.1 + 0.1 + |0.2 - 0.2|) = 0.1, KL = 0.5 log(0.5/0.4) + 0.3 log(0.3/0.4) + 0.2 log(0.2/0.2)."""
    pi = torch.tensor([[0.4, 0.4, 0.1, 0.1]], dtype=torch.float64)
    pi_old = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    ids, sampled = torch.tensor([[0, 1]]), torch.tensor([1])
    d = topk_divergence_reference(pi.log(), ids, pi_old.log().gather(-1, ids), sampled)
    torch.testing.assert_close(d["tv"], torch.tensor([0.1], dtype=torch.float64))
    kl = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    torch.testing.assert_close(d["kl"], torch.tensor([kl], dtype=torch.float64))


# ---- the recomputed anchor in the update ----------------------------------------------------------------------


def test_recomputed_anchor_is_the_trainers_own_logprobs_on_mus_set(random_model_dir, monkeypatch):
    """Every mini-batch's mask and Top-K divergence see log pi_old (the policy before the first step) of the sampled
    tokens and of mu's recorded top-K set, never mu's; the set's ids stay mu's."""
    model, rollout = rollout_of(random_model_dir, sampler_temperature=1.5, top_k=3)
    logits = full_logits(model, rollout)  # brute force: the full log-softmax of pi_old
    log_pi_old = logits.log_softmax(-1)
    want = log_pi_old.gather(-1, rollout.completion_ids[..., None]).squeeze(-1) * rollout.completion_mask
    want_set = log_pi_old.gather(-1, rollout.topk_ids)
    seen_mask, seen_topk = [], []
    real_mask, real_topk = dppo.trust_region_mask, dppo.topk_divergence
    spy_mask = lambda D, lp, old, *a: seen_mask.append(old) or real_mask(D, lp, old, *a)
    spy_topk = lambda logits, ids, lps, *a: seen_topk.append((ids, lps)) or real_topk(logits, ids, lps, *a)
    monkeypatch.setattr(dppo, "trust_region_mask", spy_mask)
    monkeypatch.setattr(dppo, "topk_divergence", spy_topk)
    args = dppo.Args(trust_region="topk-tv", top_k=3, anchor="recomputed", minibatches=2, max_new_tokens=8, lr=1e-2)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    A = torch.tensor([1.0, -1.0] * 4)
    dppo.policy_update(model, None, optimizer, rollout, A, args, torch.Generator().manual_seed(5))
    assert len(seen_mask) == 2 and len(seen_topk) == 3  # the anchor's pass, then one per mini-batch
    valid = rollout.completion_mask.bool()
    for rows, old, (ids, lps) in zip(order.chunk(2), seen_mask, seen_topk[1:]):
        torch.testing.assert_close(old, want[rows], atol=1e-5, rtol=0)
        assert not torch.allclose(old[valid[rows]], rollout.sampler_logprobs[rows][valid[rows]], atol=1e-3)  # not mu
        assert torch.equal(ids, rollout.topk_ids[rows].flatten(0, 1))
        torch.testing.assert_close(lps[valid[rows].flatten()], want_set[rows][valid[rows]], atol=1e-5, rtol=0)


def update(model, rollout, advantages, **kw):
    """One policy_update with plain SGD at lr 1 (so the parameter change is minus the gradient): (stats, change)."""
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    args = dppo.Args(max_new_tokens=8, lr=1.0, max_grad_norm=1e9, **kw)
    stats = dppo.policy_update(model, None, torch.optim.SGD(model.parameters(), lr=1.0), rollout, advantages, args,
                               torch.Generator().manual_seed(0))  # fmt: skip
    return stats, torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])


@pytest.mark.parametrize("trust_region", ["binary-tv", "ratio", "topk-kl"])
def test_recomputed_anchor_equals_mu_without_mismatch(trust_region, random_model_dir):
    """No mismatch, one mini-batch: pi_old = mu (up to rounding), so the recomputed-anchor update is the mu-anchored
    one: the same loss, the same gradients."""
    model, rollout = rollout_of(random_model_dir, sampler_temperature=1.0, top_k=3)
    A = torch.tensor([1.0, -0.5, 0.25, -1.0, 2.0, 0.0, -0.75, 0.5])
    kw = dict(trust_region=trust_region, top_k=3, minibatches=1, is_cap=2.0)
    stats_mu, step_mu = update(model, rollout, A, anchor="mu", **kw)
    stats_old, step_old = update(model, rollout, A, anchor="recomputed", **kw)
    assert stats_old["loss/masked_surrogate"] == pytest.approx(stats_mu["loss/masked_surrogate"], rel=1e-4, abs=1e-7)
    torch.testing.assert_close(step_old, step_mu, atol=1e-6 * step_mu.abs().max().item(), rtol=1e-4)
    assert step_mu.abs().max() > 0


def test_recomputed_anchor_weight_and_mechanism_metrics_by_brute_force(random_model_dir):
    """Sampler at T = 1.5, trainer at T = 1, one mini-batch, no trust region: each token's gradient is
    -A * (pi / pi_old) * min(pi_old / mu, C) * grad log pi, and the metrics are the brute-force means."""
    model, rollout = rollout_of(random_model_dir, sampler_temperature=1.5)
    A, C = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.0, 1.0]), 1.02  # pi_old/mu: 0.9-1.1
    stats, step = update(model, rollout, A, trust_region="none", anchor="recomputed", minibatches=1, is_cap=C,
                         aggregation="token-mean")  # fmt: skip
    brute = copy.deepcopy(model)
    valid = rollout.completion_mask.float()
    out = brute(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=positions(rollout.attention_mask))  # fmt: skip
    logp = out.logits[:, rollout.prompt_len - 1 : -1].float().log_softmax(-1)
    lp = logp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    weight = (lp.detach() - rollout.sampler_logprobs).exp().clamp(max=C)  # pi = pi_old here: min(pi_old / mu, C)
    assert ((weight > C - 1e-6) & valid.bool()).any() and ((weight < C - 1e-3) & valid.bool()).any()  # C binds: some
    loss = (-A[:, None] * weight * lp * valid).sum() / valid.sum()
    grads = torch.autograd.grad(loss, list(brute.parameters()), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(step, -torch.cat([g.flatten() for g in grads]), atol=1e-6, rtol=1e-4)
    pi, mu = lp.detach().exp(), rollout.sampler_logprobs.exp()
    n = valid.sum()
    assert stats["trust_region/abs_pi_mu"] == pytest.approx(((pi - mu).abs() * valid).sum().item() / n, rel=1e-4)
    assert stats["trust_region/abs_pi_old"] < 1e-5
    kept = [(a, p, m) for i, a in enumerate(A.tolist()) for p, m, v in zip(pi[i], mu[i], valid[i]) if v and a != 0]
    towards = sum((a > 0 and p < m) or (a < 0 and p > m) for a, p, m in kept) / len(kept)
    assert stats["trust_region/towards_mu_frac"] == pytest.approx(towards)


# ---- the noisy sampler ------------------------------------------------------------------------------------------


def test_noisy_sampler_samples_and_records_the_noisy_distribution(random_model_dir):
    """mu = softmax(z + sigma * eps), eps drawn from the given generator, one [N, 1, V] draw per forward pass (the
    prefill's, then each step's): the recorded log mu and top-K are of it; the hook is gone afterwards."""
    model, tok = load_policy(random_model_dir)
    sigma, record = 2.0, dppo.TopKRecord(3)
    args = dppo.Args(sampler_noise=sigma)
    with dppo.mismatched(model, model, args, torch.Generator().manual_seed(7)):
        rollout = sample(model, [tok("What is 1+2?\n")["input_ids"]] * 6, 8, 1.0, tok.eos_token_id, tok.pad_token_id,
                         generator=torch.Generator().manual_seed(0), on_token=record)  # fmt: skip
    assert not model._forward_hooks, "evaluation and the trainer see the policy itself"
    N, L = rollout.completion_mask.shape
    g = torch.Generator().manual_seed(7)
    logits = full_logits(model, rollout)
    noise = torch.cat([torch.randn((N, 1, logits.shape[-1]), generator=g) for _ in range(L)], 1)
    log_mu = (logits + sigma * noise).log_softmax(-1)
    want = log_mu.gather(-1, rollout.completion_ids[..., None]).squeeze(-1) * rollout.completion_mask
    torch.testing.assert_close(rollout.sampler_logprobs, want, atol=1e-4, rtol=0)
    valid = rollout.completion_mask.bool()
    ids, lps = record.tensors()
    torch.testing.assert_close(lps[valid], log_mu.gather(-1, ids)[valid], atol=1e-4, rtol=0)
    log_pi = logits.log_softmax(-1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    assert (log_pi - want)[valid].abs().max() > 0.1, "sigma = 2 moves mu away from pi"


def test_run_with_noise_and_recomputed_anchor_reproduces(random_model_dir, tmp_path):
    """In-process end to end: the new metrics are logged; the same seed gives the same noise, rollouts and metrics."""
    rows = []
    for name in ("a", "b"):
        dppo.main(parse_args(dppo.Args, ["--model", random_model_dir, "--output-dir", str(tmp_path), "--run-name", name,
                                         *SMALL, "--anchor", "recomputed", "--sampler-noise", "1.5",
                                         "--trust-region", "topk-tv", "--top-k", "3"]))  # fmt: skip
        rows.append([{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/", "memory/"))}
                     for r in metric_rows(tmp_path / name, "reward/mean")])  # fmt: skip
    assert rows[0] == rows[1] and len(rows[0]) == 2
    assert all(r["trust_region/abs_pi_mu"] > 0 and 0 <= r["trust_region/towards_mu_frac"] <= 1 for r in rows[0])
    assert all("trust_region/abs_pi_old" in r for r in rows[0])
