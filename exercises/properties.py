"""The checks of the open exercises: properties any right answer has, on cases computed by hand, and the
reductions to a known case (a ratio of 1, sequences of one token, a group of two). No reference implementation is
needed to run them; the teacher's solution in exercises/solutions/ passes them."""

import math

import torch

from exercises.cases import F64, coin, lengths_mask, logprobs, near, rand
from exercises.checks import Case, Mismatch, as_tuple, same


def expect(case: Case, what: str, expected, got):
    """Raise Mismatch unless `got` equals `expected` within the case's tolerance."""
    expected = torch.as_tensor(expected)
    expected = expected.double() if expected.is_floating_point() else expected
    if not same(expected, got, case):
        raise Mismatch(case, what, expected, got)


def run(fn, case: Case) -> tuple:
    """The function's outputs on a case (inputs copied; those in case.grad require a gradient)."""
    inputs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.inputs.items()}
    for name in case.grad:
        inputs[name].requires_grad_(True)
    try:
        return as_tuple(fn(**inputs)), inputs
    except SystemExit:
        raise
    except Exception as e:
        raise Mismatch(case, f"the function raised {type(e).__name__}: {e}", "a result", "an error") from None


def grad_of(output: torch.Tensor, wrt: torch.Tensor, case: Case) -> torch.Tensor:
    if not output.requires_grad:
        raise Mismatch(case, "no gradient flows back to logprobs (a detached result?)", "a gradient", "none")
    g = torch.autograd.grad(output.sum(), wrt, allow_unused=True)[0]
    return torch.zeros_like(wrt) if g is None else g


# ---- gspo: one clipped ratio per sequence ----------------------------------------------------------------------


def sequence_token_mean(per_token, mask):
    return (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)


def check_gspo(fn):
    # Hand case: three sequences; row 0's padded position holds a wild log-ratio that must not count.
    old = torch.full((3, 3), -1.0, dtype=F64)
    log_ratios = torch.tensor([[math.log(1.44), 0.0, 5.0], [math.log(2.0), math.log(0.5), 0.0],
                               [math.log(0.8)] * 3], dtype=F64)  # fmt: skip
    mask = lengths_mask([2, 2, 3], 3)
    case = Case("hand case: sequence ratios 1.2, 1.0, 0.8 (geometric means), eps 0.1", {
        "logprobs": old + log_ratios, "old_logprobs": old, "advantages": torch.tensor([1.0, 1.0, -1.0], dtype=F64),
        "completion_mask": mask, "eps_low": 0.1, "eps_high": 0.1}, grad=("logprobs",))  # fmt: skip
    (loss, binds), inputs = run(fn, case)
    expect(case, "the loss per sequence (token-mean): -min(s A, clip(s) A)", [-1.1, -1.0, 0.9],
           sequence_token_mean(loss, mask))
    expect(case, "where the clip binds (first token of each sequence)", [True, False, True], binds[:, 0])
    grad = grad_of(sequence_token_mean(loss, mask)[[0, 2]], inputs["logprobs"], case)
    expect(case, "the gradient of the clipped sequences (rows 0 and 2) must be 0", torch.zeros(3, 3, dtype=F64), grad)

    old = logprobs(3, 4, seed=40)
    mask = lengths_mask([4, 1, 2], 4)
    A = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    case = Case("ratio 1 (the first mini-batch): loss -A, gradient -A / |y| on each token", {
        "logprobs": old.clone(), "old_logprobs": old, "advantages": A, "completion_mask": mask, "eps_low": 0.2,
        "eps_high": 0.2}, grad=("logprobs",))  # fmt: skip
    (loss, _), inputs = run(fn, case)
    expect(case, "the loss per sequence (token-mean)", -A, sequence_token_mean(loss, mask))
    expect(case, "the gradient of the sequences' token-means", -A[:, None] / mask.sum(1, keepdim=True) * mask,
           grad_of(sequence_token_mean(loss, mask), inputs["logprobs"], case))

    one = logprobs(5, 1, seed=41)
    case = Case("sequences of one token: the token-level clipped surrogate", {
        "logprobs": near(one, 0.6, 42), "old_logprobs": one, "advantages": torch.tensor([1.0, -1, 0.5, -0.3, 2],
        dtype=F64), "completion_mask": torch.ones(5, 1, dtype=F64), "eps_low": 0.2, "eps_high": 0.28},
        grad=("logprobs",))  # fmt: skip
    (loss, binds), inputs = run(fn, case)
    ratio = (case.inputs["logprobs"] - one).exp()[:, 0]
    A = case.inputs["advantages"]
    want = -torch.min(ratio * A, ratio.clamp(0.8, 1.28) * A)
    expect(case, "the loss", want, loss[:, 0])
    expect(case, "where the clip binds", (ratio.clamp(0.8, 1.28) * A < ratio * A), binds[:, 0])

    base = logprobs(2, 4, seed=43)
    mask = lengths_mask([2, 3], 4)
    shifted = base.clone()
    shifted[0, 2:], shifted[1, 3] = 0.0, -9.0  # only padded positions change
    inputs = {"old_logprobs": base - 0.1, "advantages": torch.tensor([1.0, -1.0], dtype=F64), "completion_mask": mask,
              "eps_low": 0.2, "eps_high": 0.2}  # fmt: skip
    case = Case("padding does not count in the sequence ratio", {"logprobs": shifted, **inputs})
    (loss, _), _ = run(fn, case)
    (want, _), _ = run(fn, Case("", {"logprobs": base, **inputs}))
    expect(case, "the loss per sequence, against the same sequences with other values on padding",
           sequence_token_mean(want, mask).detach(), sequence_token_mean(loss, mask))


# ---- kl-k2: the k2 estimator -------------------------------------------------------------------------------------


def check_k2(fn):
    d = torch.tensor([[0.3, -0.3, 0.0, 2.0]], dtype=F64)
    ref = torch.full((1, 4), -1.5, dtype=F64)
    case = Case("hand case: log pi - log pi_ref = 0.3, -0.3, 0, 2", {"logprobs": ref + d, "ref_logprobs": ref},
                grad=("logprobs",))  # fmt: skip
    (kl,), inputs = run(fn, case)
    expect(case, "1/2 (log pi - log pi_ref)^2", [[0.045, 0.045, 0.0, 2.0]], kl)
    expect(case, "the gradient (log pi - log pi_ref)", d, grad_of(kl, inputs["logprobs"], case))
    a, b = logprobs(3, 5, seed=44), logprobs(3, 5, seed=45)
    case = Case("symmetric in pi and pi_ref, never negative", {"logprobs": a, "ref_logprobs": b})
    (kl,), _ = run(fn, case)
    (swapped,), _ = run(fn, Case("", {"logprobs": b, "ref_logprobs": a}))
    expect(case, "k2 with the two swapped", swapped.detach(), kl)
    expect(case, "k2 >= 0", torch.ones_like(a, dtype=torch.bool), kl >= 0)
    small = near(a, 1e-2, 46)
    case = Case("close to k3 for close policies (both 1/2 d^2 + O(d^3))", {"logprobs": small, "ref_logprobs": a},
                atol=1e-6 / 6 * 1.01)  # |d| <= 1e-2: |k2 - k3| <= |d|^3 / 6
    (kl,), _ = run(fn, case)
    log_r = a - small
    expect(case, "k3 = pi_ref/pi - log(pi_ref/pi) - 1, to within |d|^3 / 6", log_r.exp() - log_r - 1, kl)


# ---- rloo: the leave-one-out baseline ----------------------------------------------------------------------------


def check_rloo(fn):
    case = Case("hand case", {"rewards": torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)})
    (A,), _ = run(fn, case)
    third = 1 / 3
    expect(case, "r_i - mean of the others", [[1, -third, -third, -third], [2 * third, 2 * third, -2 * third,
                                              -2 * third], [0, 0, 0, 0]], A)  # fmt: skip
    case = Case("groups of 2: A = (r_1 - r_2, r_2 - r_1)", {"rewards": torch.tensor([[0.0, 1.0], [3.0, -1.0]],
                                                                                     dtype=F64)})  # fmt: skip
    (A,), _ = run(fn, case)
    expect(case, "the advantages", [[-1.0, 1.0], [4.0, -4.0]], A)
    r = rand(3, 5, low=-1, high=2, seed=47)
    case = Case("random rewards: n / (n - 1) (r - group mean), each row summing to 0", {"rewards": r})
    (A,), _ = run(fn, case)
    expect(case, "n / (n - 1) (r - mean of the group)", 5 / 4 * (r - r.mean(1, keepdim=True)), A)


# ---- dapo-dynamic-sampling: keep the groups whose rewards differ ---------------------------------------------------


def check_dynamic_sampling(fn):
    rewards = torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 0, 1], [0.5, 0.5, 0.5], [0.2, 0.7, 0.2], [1, 1, 0],
                            [2, 2, 2]], dtype=F64)  # fmt: skip
    case = Case("hand case: equal rows are dropped, whatever their value", {"rewards": rewards})
    (keep,), _ = run(fn, case)
    expect(case, "one bool per group", [False, False, True, False, True, True, False], keep)
    r = coin(6, 8, p=0.3, seed=48)
    r[0], r[1] = 0.0, 1.0
    case = Case("0/1 rewards, groups of 8", {"rewards": r})
    (keep,), _ = run(fn, case)
    expect(case, "one bool per group", r.max(1).values > r.min(1).values, keep)
    case = Case("groups of 2", {"rewards": torch.tensor([[0.0, 1.0], [1.0, 1.0], [3.0, -3.0]], dtype=F64)})
    (keep,), _ = run(fn, case)
    expect(case, "one bool per group", [True, False, True], keep)
