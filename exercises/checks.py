"""How a student's function is checked: case by case, its outputs (and, where it is differentiable, the gradients
of its outputs) against the expected ones within a stated tolerance. The first case that fails is reported with
its inputs, what was expected and what came back."""

from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    name: str
    inputs: dict  # the function's keyword arguments
    grad: tuple = ()  # the inputs whose gradients are compared too
    rtol: float = 1e-6
    atol: float = 1e-9


class Mismatch(Exception):
    """A case that fails: the message says which case, its inputs, what was expected and what came back."""

    def __init__(self, case: Case, what: str, expected, got):
        self.case, self.what = case, what
        lines = [f"case {case.name!r}: {what}", *(f"    {k} = {shown(v)}" for k, v in case.inputs.items()),
                 f"    expected: {shown(expected)}", f"    got:      {shown(got)}"]
        if isinstance(expected, torch.Tensor) and expected.is_floating_point():
            lines.append(f"    (tolerance: rtol {case.rtol:g}, atol {case.atol:g})")
        super().__init__("\n".join(lines))


def shown(x) -> str:
    """A value as a student reads it: tensors as nested lists, floats rounded to 4 significant digits."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        x = x.tolist() if x.dtype == torch.bool else (x.double() if x.is_floating_point() else x).tolist()
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        inner = ", ".join(shown(v) for v in x)
        return f"[{inner}]" if isinstance(x, list) else f"({inner})"
    return repr(x)


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@dataclass
class Call:
    """One call of a function on a case's inputs (fresh copies: the function may not change them in place)."""

    inputs: dict
    outputs: tuple
    leaves: dict = field(default_factory=dict)


def call(fn, case: Case) -> Call:
    inputs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.inputs.items()}
    for name in case.grad:
        inputs[name].requires_grad_(True)
    return Call(inputs, as_tuple(fn(**inputs)), {name: inputs[name] for name in case.grad})


def same(expected: torch.Tensor, got, case: Case) -> bool:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return False
    if expected.dtype == torch.bool or not expected.is_floating_point():
        return bool((got.to(expected.dtype) == expected).all())
    return torch.allclose(got.detach().to(expected.dtype), expected.detach(), rtol=case.rtol, atol=case.atol,
                          equal_nan=True)  # fmt: skip


def gradients(c: Call, like: tuple) -> dict:
    """d/d(input) of sum_k <w_k, output_k> over the differentiable outputs, with fixed random weights w_k: one
    backward pass compares every entry of the Jacobian's image at once."""
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for out, ref in zip(c.outputs, like):
        if isinstance(ref, torch.Tensor) and ref.requires_grad:
            weight = torch.randn(ref.shape, generator=generator, dtype=torch.float64)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                total = total + (out.double() * weight).sum()
    if not isinstance(total, torch.Tensor):
        return {name: torch.zeros_like(leaf) for name, leaf in c.leaves.items()}
    grads = torch.autograd.grad(total, list(c.leaves.values()), allow_unused=True)
    return {name: torch.zeros_like(leaf) if g is None else g for (name, leaf), g in zip(c.leaves.items(), grads)}


def check_case(student, reference, case: Case, compare=None):
    """Raise Mismatch if the student's outputs (or gradients) differ from the reference's on this case."""
    expected = call(reference, case)
    try:
        got = call(student, case)
    except SystemExit:
        raise
    except Exception as e:
        raise Mismatch(case, f"the function raised {type(e).__name__}: {e}", expected.outputs, "an error") from None
    if len(got.outputs) != len(expected.outputs):
        raise Mismatch(case, f"returned {len(got.outputs)} value(s), expected {len(expected.outputs)}",
                       expected.outputs, got.outputs)  # fmt: skip
    for k, (e, g) in enumerate(zip(expected.outputs, got.outputs)):
        what = "the output" if len(got.outputs) == 1 else f"output {k}"
        problem = compare(e, g, case) if compare else (None if same(e, g, case) else f"{what} differs")
        if problem:
            raise Mismatch(case, problem, e, g)
    if case.grad:
        want, have = gradients(expected, expected.outputs), gradients(got, expected.outputs)
        for name in case.grad:
            if not same(want[name], have[name], case):
                raise Mismatch(case, f"the gradient with respect to {name} differs", want[name], have[name])


def check_all(student, reference, cases: list[Case], compare=None) -> list[str]:
    """Every case in order; the names of those that passed (the first failure raises Mismatch)."""
    for case in cases:
        check_case(student, reference, case, compare)
    return [case.name for case in cases]
