"""PODS selection and GRPO math against brute force and hand computation."""

import itertools

import pytest
import torch

from common.sampling import frac_zero_std
from pods import (
    DOWN_SAMPLE,
    group_advantages,
    select_max_reward,
    select_max_variance,
    select_random,
)


def pop_var(values) -> float:
    return torch.tensor(values, dtype=torch.float64).var(unbiased=False).item()


def kept(rewards, m):
    idx = select_max_variance(torch.tensor([rewards], dtype=torch.float64), m)[0]
    return sorted(torch.tensor(rewards)[idx].tolist(), reverse=True)


def brute_force_best(rewards, m) -> float:
    return max(pop_var(c) for c in itertools.combinations(rewards, m))


@pytest.mark.parametrize("kind", ["binary", "multilevel", "continuous"])
def test_max_variance_equals_brute_force(kind):
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = 2 + trial % 9  # n in 2..10
        if kind == "binary":
            r = torch.randint(0, 2, (n,), generator=g).double()
        elif kind == "multilevel":
            r = torch.randint(0, 4, (n,), generator=g).double()
        else:
            r = torch.randn(n, generator=g, dtype=torch.float64)
        for m in range(2, n + 1):
            idx = select_max_variance(r[None], m)[0]
            assert len(set(idx.tolist())) == m, "indices must be distinct"
            assert pop_var(r[idx].tolist()) == pytest.approx(brute_force_best(r.tolist(), m), abs=1e-12)


def test_binary_closed_form():
    """Keep a successes with a the feasible value closest to m/2."""
    for n in range(2, 13):
        for successes in range(n + 1):
            r = [1.0] * successes + [0.0] * (n - successes)
            for m in range(2, n + 1):
                lo, hi = max(0, m - (n - successes)), min(m, successes)
                best = min(range(lo, hi + 1), key=lambda a: abs(a - m / 2))
                assert abs(sum(kept(r, m)) - m / 2) == abs(best - m / 2)


@pytest.mark.parametrize(
    "rewards, m, expected, variance",
    [
        ([1, 0, 1, 1, 0, 1, 1, 1], 4, [1, 1, 0, 0], 0.25),
        ([0, 0, 0, 0, 9, 9, 10, 1], 4, [10, 9, 0, 0], 22.6875),
        ([3, 1, 4, 1, 5, 9, 2, 6], 3, [9, 1, 1], 14.2222222),
        ([10, 1, 1, 1, 0, 0, 0, 0], 4, [10, 0, 0, 0], 18.75),  # k=1 beats "2 best + 2 worst" (17.6875)
        ([1, 1, 1, 1, 1, 1, 1, 0], 4, [1, 1, 1, 0], 0.1875),
    ],
)
def test_worked_cases(rewards, m, expected, variance):
    assert kept([float(r) for r in rewards], m) == expected
    assert pop_var(expected) == pytest.approx(variance, abs=1e-6)


def test_worked_case_advantages():
    r = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(r.gather(1, select_max_variance(r, 4)))
    assert sorted(adv[0].tolist()) == pytest.approx([-0.866, -0.866, 0.866, 0.866], abs=1e-3)


def test_two_best_two_worst_is_not_optimal():
    assert pop_var([10, 1, 0, 0]) == pytest.approx(17.6875)
    assert pop_var(kept([10.0, 1, 1, 1, 0, 0, 0, 0], 4)) > 17.6875


def test_invariance_to_shift_and_scale():
    g = torch.Generator().manual_seed(1)
    r = torch.randint(0, 5, (32, 12), generator=g).double()
    base = torch.sort(r.gather(1, select_max_variance(r, 5)), 1).values
    for a, b in [(3.0, 1.0), (-7.5, 2.5), (0.0, 0.01)]:
        moved = a + b * r
        got = torch.sort(moved.gather(1, select_max_variance(moved, 5)), 1).values
        assert torch.allclose((got - a) / b, base)


def test_all_equal_rewards_give_zero_advantages():
    r = torch.full((3, 8), 0.7)
    adv = group_advantages(r.gather(1, select_max_variance(r, 4)))
    assert torch.isfinite(adv).all() and (adv == 0).all()
    assert frac_zero_std(r) == 1.0


def test_m_at_least_n_is_identity():
    r = torch.rand(4, 6)
    assert torch.equal(select_max_variance(r, 6), torch.arange(6).expand(4, 6))
    assert torch.equal(select_max_variance(r, 9), torch.arange(6).expand(4, 6))


def test_m_below_two_is_rejected():
    from pods import Args, check_args

    with pytest.raises(SystemExit, match="--m 1"):
        check_args(Args(m=1), world=1)


def test_batched_equals_per_row_loop():
    g = torch.Generator().manual_seed(2)
    r = torch.randint(0, 3, (64, 16), generator=g).double()
    batched = select_max_variance(r, 6)
    for i in range(64):
        row = select_max_variance(r[i : i + 1], 6)[0]
        assert torch.equal(batched[i], row)
        assert (batched[i] < 16).all()  # indices are within the row: no cross-prompt mixing


def test_no_cross_prompt_mixing():
    """Row 0 all successes, row 1 all failures: a flat sort over the batch would mix them."""
    r = torch.tensor([[1.0] * 8, [0.0] * 8, [1, 0, 1, 0, 1, 0, 1, 0]])
    idx = select_max_variance(r, 4)
    assert r[0, idx[0]].tolist() == [1.0] * 4 and r[1, idx[1]].tolist() == [0.0] * 4
    assert sorted(r[2, idx[2]].tolist()) == [0, 0, 1, 1]


def test_kept_advantages_have_zero_mean_unit_std():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(50, 16, generator=g)
    adv = group_advantages(r.gather(1, select_max_variance(r, 8)))
    assert adv.mean(1).abs().max() < 1e-5
    assert torch.allclose(adv.std(1), torch.ones(50), atol=1e-3)


def kept_var(r, idx):
    return r.gather(1, idx).var(1, unbiased=False)


def test_max_variance_dominates_other_rules():
    g = torch.Generator().manual_seed(4)
    for dist in ("binary", "continuous"):
        binary = torch.randint(0, 2, (200, 16), generator=g).float()
        r = binary if dist == "binary" else torch.rand(200, 16, generator=g)
        best = kept_var(r, select_max_variance(r, 4))
        assert (best >= kept_var(r, select_random(r, 4, g)) - 1e-6).all()
        assert (best >= kept_var(r, select_max_reward(r, 4)) - 1e-6).all()


def test_rules_shapes_and_distinct_indices():
    r = torch.rand(5, 10)
    for rule in ("max-variance", "random", "max-reward"):
        idx = DOWN_SAMPLE[rule](r, 3, torch.Generator().manual_seed(0))
        assert idx.shape == (5, 3)
        assert all(len(set(row.tolist())) == 3 for row in idx)
    assert torch.equal(r.gather(1, select_max_reward(r, 3)), r.sort(1, descending=True).values[:, :3])
