"""The inputs each core exercise is checked on: random ones and the edge cases where a slip shows (a group whose
rewards are all equal, padding, a ratio of exactly 1, a threshold that binds on one side only, ...). Small shapes,
so that a failing case prints in a few lines; float64, so that any correct way of writing a formula agrees with
the project's to far below the tolerance."""

import math

import torch

from exercises.checks import Case

F64 = torch.float64


def rand(*shape, low=0.0, high=1.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=g, dtype=F64)


def coin(*shape, p=0.5, seed=0) -> torch.Tensor:
    """0/1 rewards."""
    return (rand(*shape, seed=seed) < p).to(F64)


def lengths_mask(lengths: list[int], width: int) -> torch.Tensor:
    """A completion mask: row i has lengths[i] ones, then padding."""
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(F64)


def near(base: torch.Tensor, spread: float, seed: int) -> torch.Tensor:
    """log-probs a little away from `base`: ratios exp(+-spread)."""
    return base + rand(*base.shape, low=-spread, high=spread, seed=seed)


def logprobs(*shape, seed=0) -> torch.Tensor:
    return rand(*shape, low=-3.0, high=-0.05, seed=seed)


# ---- grpo.py ---------------------------------------------------------------------------------------------------


def group_advantages():
    return [
        Case("0/1 rewards, 3 groups of 4", {"rewards": torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 0]],
                                                                    dtype=F64)}),  # fmt: skip
        Case("random rewards, 2 groups of 5", {"rewards": rand(2, 5, seed=1)}),
        Case("a group whose rewards are all equal (std 0)", {"rewards": torch.tensor([[1.0, 1, 1, 1], [0, 1, 0, 0]],
                                                                                     dtype=F64)}),  # fmt: skip
        Case("groups of 2", {"rewards": torch.tensor([[0.0, 1], [3, -1]], dtype=F64)}),
        Case("scale=False (Dr. GRPO: centring only)", {"rewards": rand(2, 4, seed=2), "scale": False}),
        Case("eps=0.5", {"rewards": coin(2, 6, seed=3), "scale": True, "eps": 0.5}),
    ]


def clipped_surrogate():
    old = logprobs(3, 4, seed=4)
    return [
        Case("ratios within 0.5..2, mixed advantages", {"logprobs": near(old, 0.7, 5), "old_logprobs": old,
             "advantages": torch.tensor([1.0, -0.5, 2.0], dtype=F64), "eps_low": 0.2, "eps_high": 0.2},
             grad=("logprobs",)),  # fmt: skip
        Case("asymmetric clip (eps_low 0.1, eps_high 0.28)", {"logprobs": near(old, 0.5, 6), "old_logprobs": old,
             "advantages": torch.tensor([-1.0, 1.0, 0.7], dtype=F64), "eps_low": 0.1, "eps_high": 0.28},
             grad=("logprobs",)),  # fmt: skip
        Case("ratio exactly 1 (the first mini-batch)", {"logprobs": old.clone(), "old_logprobs": old,
             "advantages": torch.tensor([1.0, -1.0, 0.5], dtype=F64), "eps_low": 0.2, "eps_high": 0.2},
             grad=("logprobs",)),  # fmt: skip
        Case("a zero advantage", {"logprobs": near(old, 0.7, 7), "old_logprobs": old,
             "advantages": torch.tensor([0.0, 1.0, -1.0], dtype=F64), "eps_low": 0.2, "eps_high": 0.2},
             grad=("logprobs",)),  # fmt: skip
    ]


def aggregate():
    mask = lengths_mask([3, 5, 1, 0], 5)  # the last completion is empty (cut before its first token)
    per_token = rand(4, 5, low=-1, high=1, seed=8)  # padding holds values too: they must not count
    cases = []
    for mode in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"):
        cases.append(Case(f"{mode}, lengths 3, 5, 1, 0", {"per_token": per_token, "completion_mask": mask,
                          "aggregation": mode, "horizon": 8, "normaliser": 4.0}, grad=("per_token",)))  # fmt: skip
        cases.append(Case(f"{mode}, normaliser 2.5 (a micro-batch of a larger mini-batch)", {
            "per_token": rand(2, 3, low=-1, high=1, seed=9), "completion_mask": lengths_mask([2, 3], 3),
            "aggregation": mode, "horizon": 6, "normaliser": 2.5}, grad=("per_token",)))  # fmt: skip
    return cases


def kl_k3():
    ref = logprobs(2, 4, seed=10)
    return [
        Case("pi close to pi_ref", {"logprobs": near(ref, 0.3, 11), "ref_logprobs": ref}, grad=("logprobs",)),
        Case("pi far from pi_ref", {"logprobs": near(ref, 2.0, 12), "ref_logprobs": ref}, grad=("logprobs",)),
        Case("pi equal to pi_ref (0)", {"logprobs": ref.clone(), "ref_logprobs": ref}, grad=("logprobs",)),
    ]


# ---- pods.py ---------------------------------------------------------------------------------------------------


def select_max_variance():
    return [
        Case("0/1 rewards, n 8, m 4", {"rewards": coin(5, 8, seed=13), "m": 4}),
        Case("random rewards, n 7, m 3", {"rewards": rand(6, 7, low=-2, high=3, seed=14), "m": 3}),
        Case("skewed rewards: one outlier per row", {"rewards": torch.tensor(
            [[10.0, 0.0, 0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 0.6, 0.7, 9.0, 9.5]], dtype=F64), "m": 3}),  # fmt: skip
        Case("m 2", {"rewards": rand(3, 5, seed=15), "m": 2}),
        Case("m equal to n: every index", {"rewards": rand(2, 4, seed=16), "m": 4}),
        Case("a group whose rewards are all equal", {"rewards": torch.ones(1, 6, dtype=F64), "m": 3}),
    ]


def kept_variance(rewards: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return rewards.gather(1, kept.long()).var(1, unbiased=False)


def same_variance(expected: torch.Tensor, got, case) -> str | None:
    """PODS' compare: any m distinct indices whose rewards have the largest variance are right (ties may be broken
    either way), so the kept variance is compared, after checking the indices."""
    rewards, m = case.inputs["rewards"], case.inputs["m"]
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return f"expected indices of shape {list(expected.shape)}"
    got = got.long()
    if ((got < 0) | (got >= rewards.shape[1])).any() or any(len(set(row)) < m for row in got.tolist()):
        return "each row needs m distinct indices in 0..n-1"
    want, have = kept_variance(rewards, expected), kept_variance(rewards, got)
    if not torch.allclose(have, want, rtol=1e-9, atol=1e-12):
        return f"the kept rewards' variances are {shown_list(have)}; the largest possible are {shown_list(want)}"
    return None


def shown_list(x: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in x.tolist()) + "]"


# ---- dppo.py ---------------------------------------------------------------------------------------------------


def binary_kl():
    mu = logprobs(3, 4, seed=17)
    return [
        Case("pi close to mu", {"logprobs": near(mu, 0.3, 18), "old_logprobs": mu}),
        Case("pi far from mu", {"logprobs": near(mu, 2.0, 19).clamp(max=-1e-3), "old_logprobs": mu}),
        Case("pi equal to mu (0)", {"logprobs": mu.clone(), "old_logprobs": mu}),
        Case("mu near 1 (log mu = -1e-6)", {"logprobs": torch.tensor([[-0.1, -2.0, -1e-6]], dtype=F64),
             "old_logprobs": torch.full((1, 3), -1e-6, dtype=F64)}),  # fmt: skip
    ]


def trust_region_mask():
    mu = logprobs(4, 5, seed=20)
    pi = near(mu, 0.5, 21)
    divergence = (pi.exp() - mu.exp()).abs()
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.5], dtype=F64)
    return [
        Case("binary TV, thresholds 0.15 / 0.15", {"divergence": divergence, "logprobs": pi, "old_logprobs": mu,
             "advantages": advantages, "delta_low": 0.15, "delta_high": 0.15}),  # fmt: skip
        Case("thresholds 0.02 (low) / 0.3 (high)", {"divergence": divergence, "logprobs": pi, "old_logprobs": mu,
             "advantages": advantages, "delta_low": 0.02, "delta_high": 0.3}),  # fmt: skip
        Case("thresholds 0.3 (low) / 0.02 (high)", {"divergence": divergence, "logprobs": pi, "old_logprobs": mu,
             "advantages": -advantages, "delta_low": 0.3, "delta_high": 0.02}),  # fmt: skip
        Case("pi equal to mu: nothing masked", {"divergence": torch.ones(4, 5, dtype=F64), "logprobs": mu.clone(),
             "old_logprobs": mu, "advantages": advantages, "delta_low": 0.1, "delta_high": 0.1}),  # fmt: skip
    ]


def dppo_token_loss():
    mu = logprobs(3, 4, seed=22)
    mask = (rand(3, 4, seed=23) > 0.3).to(F64)
    advantages = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    return [
        Case("ratios within 0.5..2, a mask", {"logprobs": near(mu, 0.7, 24), "old_logprobs": mu,
             "advantages": advantages, "mask": mask}, grad=("logprobs",)),  # fmt: skip
        Case("nothing masked, ratio 1", {"logprobs": mu.clone(), "old_logprobs": mu, "advantages": advantages,
             "mask": torch.ones(3, 4, dtype=F64)}, grad=("logprobs",)),  # fmt: skip
        Case("importance weight capped at 1.1", {"logprobs": near(mu, 0.7, 25), "old_logprobs": mu,
             "advantages": advantages, "mask": mask, "is_cap": 1.1}, grad=("logprobs",)),  # fmt: skip
        Case("is_cap infinite (the default)", {"logprobs": near(mu, 1.5, 26), "old_logprobs": mu,
             "advantages": advantages, "mask": torch.ones(3, 4, dtype=F64), "is_cap": math.inf},
             grad=("logprobs",)),  # fmt: skip
    ]


# ---- cropi.py --------------------------------------------------------------------------------------------------


def popi_objective():
    mu = logprobs(4, 5, seed=27)
    mask = lengths_mask([5, 2, 4, 1], 5)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64)
    return [
        Case("4 stored responses, lengths 5, 2, 4, 1", {"logprobs": near(mu, 0.5, 28), "old_logprobs": mu,
             "rewards": rewards, "completion_mask": mask}, grad=("logprobs",)),  # fmt: skip
        Case("pi equal to mu (on-policy)", {"logprobs": mu.clone(), "old_logprobs": mu, "rewards": rewards,
             "completion_mask": mask}, grad=("logprobs",)),  # fmt: skip
        Case("clip 0.2 (PPO-clipped POPI)", {"logprobs": near(mu, 0.8, 29), "old_logprobs": mu, "rewards": rewards,
             "completion_mask": mask, "clip": 0.2}, grad=("logprobs",)),  # fmt: skip
        Case("rewards all equal: no signal", {"logprobs": near(mu, 0.5, 30), "old_logprobs": mu,
             "rewards": torch.ones(4, dtype=F64), "completion_mask": mask}, grad=("logprobs",)),  # fmt: skip
    ]


def reciprocal_rank_fusion():
    scores = rand(3, 12, low=-1, high=1, seed=31)
    with_zero = scores.clone()
    with_zero[:, [2, 7]] = -math.inf  # zero-gradient prompts
    return [
        Case("3 validation sets, 12 prompts, select 4", {"score_tables": scores, "n": 4}),
        Case("one validation set: its top n", {"score_tables": scores[:1], "n": 5}),
        Case("zero-gradient prompts (-inf) are never selected", {"score_tables": with_zero, "n": 4}),
        Case("ties go to the lower index", {"score_tables": torch.tensor([[0.5, 0.5, 0.1, 0.5], [0.2, 0.9, 0.9, 0.2]],
                                                                         dtype=F64), "n": 2}),  # fmt: skip
        Case("fewer usable prompts than n", {"score_tables": torch.tensor([[0.3, -math.inf, -math.inf, 0.1]],
                                                                          dtype=F64), "n": 3}),  # fmt: skip
    ]


# ---- ippo.py ---------------------------------------------------------------------------------------------------


def gae():
    mask = lengths_mask([4, 2, 3], 4)
    rewards = rand(3, 4, low=-0.1, high=0.1, seed=32) * mask
    rewards[0, 3] += 1.0  # the outcome on each last token
    rewards[2, 2] += 1.0
    values = rand(3, 4, seed=33)  # padding holds values too: after the last token V must be 0
    return [
        Case("lambda 1, gamma 1 (the defaults)", {"rewards": rewards, "values": values, "mask": mask, "lam": 1.0}),
        Case("lambda 0.95", {"rewards": rewards, "values": values, "mask": mask, "lam": 0.95}),
        Case("lambda 0.9, gamma 0.8", {"rewards": rewards, "values": values, "mask": mask, "lam": 0.9, "gamma": 0.8}),
        Case("lambda 0: one-step TD errors", {"rewards": rewards, "values": values, "mask": mask, "lam": 0.0}),
    ]


def influence_weights():
    return [
        Case("mixed scores", {"scores": torch.tensor([0.5, -0.2, 1.5, 0.0, 3.0, -4.0], dtype=F64)}),
        Case("random scores", {"scores": rand(10, low=-1, high=2, seed=34)}),
        Case("reweight off: kept episodes weigh 1", {"scores": rand(8, low=-1, high=1, seed=35), "reweight": False}),
        Case("every score <= 0: nothing kept", {"scores": torch.tensor([-1.0, 0.0, -0.5], dtype=F64)}),
    ]
