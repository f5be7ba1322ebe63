"""Triton Top-K divergence kernel against the PyTorch reference.

On a CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest) with small shapes; on a GPU the
same cases run natively, plus the real vocabulary size V = 151936.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from kernels.topk_divergence import OUTPUTS, topk_divergence, topk_divergence_reference, topk_divergence_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or TRITON_INTERPRET=1"
)


def case(N, V, K, dtype, temperature, kind="smooth", seed=0):
    """Current logits (pi) and the behaviour record (mu's top-K after temperature, sampled token forced
    into the last slot); `kind` picks smooth, near-one-hot or large-magnitude rows."""
    g = torch.Generator().manual_seed(seed)
    mu_logits = torch.randn(N, V, generator=g)
    if kind == "one-hot":
        mu_logits[torch.arange(N), torch.randint(V, (N,), generator=g)] += 40.0
    if kind == "large":
        mu_logits = mu_logits * 300.0
    pi_logits = mu_logits + 0.3 * torch.randn(N, V, generator=g) * (100.0 if kind == "large" else 1.0)
    log_mu = F.log_softmax(mu_logits / temperature, -1)
    sampled = torch.multinomial(F.softmax(mu_logits / temperature * 0.3, -1), 1, generator=g).squeeze(-1)
    sampled[::2] = mu_logits[::2].argmax(-1)  # inside the top-K on even rows, mostly outside on odd ones
    lp, ids = log_mu.topk(K, -1)
    missing = (ids != sampled[:, None]).all(-1)
    ids[missing, -1] = sampled[missing]
    lp[missing, -1] = log_mu.gather(-1, sampled[:, None]).squeeze(-1)[missing]
    valid = torch.ones(N, dtype=torch.bool)
    valid[1::4] = False  # padded rows
    to = lambda t: t.to(DEVICE)
    return to(pi_logits.to(dtype)), to(ids), to(lp), to(sampled), to(valid), missing


def check(N, V, K, dtype, temperature, kind="smooth", block_v=128, seed=0):
    """The kernel against the reference in fp64 on the same input values, within what fp32 arithmetic allows:
    rounding x / T to fp32 moves a log-probability by up to one ulp of the row's largest |x| / T, and the
    shifted sums add a few more, so each output may differ by 8 such ulps (measured: at most 2, for the kernel
    and for the fp32 reference alike, over 8 seeds of every kind of row) plus 1e-4 relative. A tolerance
    fixed in absolute terms would pass or fail with the draw on rows of logits in the hundreds."""
    logits, ids, lp, sampled, valid, missing = case(N, V, K, dtype, temperature, kind, seed)
    got = topk_divergence_triton(logits, ids, lp, sampled, temperature, valid, block_v=block_v)
    want = topk_divergence_reference(logits.double(), ids, lp, sampled, temperature, valid)
    ulp = torch.finfo(torch.float32).eps * (logits.double().abs().amax(-1) / temperature).clamp(min=1.0)
    for name in OUTPUTS:
        assert got[name].dtype == torch.float32
        error = (got[name].double() - want[name]).abs()
        bound = 1e-4 * want[name].abs() + 8 * ulp
        assert (error <= bound).all(), f"{name}: error {(error / bound).max():.2f} x the bound"
        assert (got[name][~valid] == 0).all(), f"{name}: padded rows must be 0"
    return missing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 20, 64])
@pytest.mark.parametrize("V", [1000, 4099])
def test_kernel_matches_reference(V, K, dtype):
    """V not a power of two and several blocks long; the sampled token both inside and outside the top-K."""
    for temperature in (0.7, 1.0):
        missing = check(8, V, K, dtype, temperature)
    if K < 64:
        assert missing.any() and (~missing).any()


@pytest.mark.parametrize("kind", ["one-hot", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_extreme_rows(kind, dtype):
    for seed in range(4):  # several draws: on rows this extreme the rounding differs from draw to draw
        check(8, 777, 20, dtype, 0.7, kind, seed=seed)


def test_kernel_reads_strided_rows():
    logits, ids, lp, sampled, valid, _ = case(6, 500, 20, torch.float32, 1.0)
    wide = torch.zeros(6, 640, device=DEVICE)
    wide[:, :500] = logits
    view = wide[:, :500]  # row stride 640, not 500
    got = topk_divergence_triton(view, ids, lp, sampled, 1.0, valid, block_v=128)
    want = topk_divergence_reference(logits, ids, lp, sampled, 1.0, valid)
    for name in OUTPUTS:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_dispatch():
    logits, ids, lp, sampled, valid, _ = case(4, 300, 5, torch.float32, 1.0)
    ref = topk_divergence(logits, ids, lp, sampled, 1.0, valid, backend="torch")
    tri = topk_divergence(logits, ids, lp, sampled, 1.0, valid, backend="triton")
    torch.testing.assert_close(ref["tv"], tri["tv"], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        topk_divergence(logits, ids, lp, sampled, 1.0, valid, backend="cuda")


@pytest.mark.skipif(not CUDA, reason="real vocabulary size needs a GPU (too slow in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 20, 64])
def test_kernel_at_real_vocabulary_on_gpu(K, dtype):
    for kind in ("smooth", "one-hot", "large"):
        check(64, 151936, K, dtype, 0.7, kind, block_v=4096)


COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.topk_divergence import _topk_divergence_kernel as kernel
for dtype in ("bf16", "fp16", "fp32"):
    types = [f"*{dtype}", "i32", "*i64", "*fp32", "*i64", "*i8"] + ["*fp32"] * 5 + ["i32", "i32", "fp32"]
    signature = dict(zip(kernel.arg_names, types + ["constexpr", "constexpr"]))
    source = ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK_V": 4096, "BLOCK_K": 64})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert "cubin" in compiled.asm
print("ok")
"""


def test_kernel_compiles_for_h100_without_a_gpu():
    """The interpreter accepts Python that the GPU compiler refuses (e.g. reading a global): compile the
    kernel to an sm_90 cubin ahead of time, which needs no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=ROOT, TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_kernel_kl_uses_log_pi_of_nearly_ruled_out_tokens():
    """Rows where pi_k of stored tokens goes down to 1e-30: the kernel's KL equals the exact fp64 value
    (so it takes log pi_k as logits_k / T - log Z, unfloored), well above the floored formula's."""
    from test_topk_divergence import first_principles_kl, ruled_out_rows

    ids, lp, logits, T = ruled_out_rows(N=6, V=64, K=8)
    valid = torch.ones(len(ids), dtype=torch.bool, device=DEVICE)
    got = topk_divergence_triton(logits.float().to(DEVICE), ids.to(DEVICE), lp.float().to(DEVICE),
                                 ids[:, 0].to(DEVICE), T, valid, block_v=16)  # fmt: skip
    want = first_principles_kl(ids, lp, logits, T)
    torch.testing.assert_close(got["kl"].double().cpu(), want, rtol=1e-5, atol=0)
    floored = first_principles_kl(ids, lp, logits, T, pi_floor=1e-12)
    assert (got["kl"].double().cpu() - floored > 0.01 * 2.3).all()


def test_kernel_stored_token_of_zero_mass_adds_nothing():
    """A stored log-prob of -inf (mu_k = 0) adds 0 log 0 = 0 to the kernel's KL, as in the reference."""
    logits, ids, lp, sampled, valid, _ = case(4, 300, 5, torch.float32, 1.0)
    lp = lp.clone()
    lp[:, 1] = float("-inf")
    got = topk_divergence_triton(logits, ids, lp, sampled, 1.0, valid, block_v=128)
    want = topk_divergence_reference(logits, ids, lp, sampled, 1.0, valid)
    assert torch.isfinite(got["kl"]).all()
    torch.testing.assert_close(got["kl"], want["kl"], rtol=1e-4, atol=1e-6)
