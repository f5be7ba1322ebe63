"""Triton projection kernels (kernels/projection.py) against the PyTorch reference (issue 6).

On a CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) with small shapes and small tiles
(the interpreter costs ~15 ms per tile step); on a GPU the same cases run natively, plus full-size ones
(k = 8192, a million coordinates).
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from kernels.projection import MODES, project, projection_reference, projection_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or TRITON_INTERPRET=1"
)
TILES = dict(block_n=64, block_k=32)  # small tiles: several blocks along n and k even at n = 600, k = 40


def chunked(x, offset, k, p, seed, mode, cuts, **tiles):
    """Project x one uneven chunk at a time (like one parameter tensor at a time) into a single `out`."""
    out = None
    for start, end in zip(cuts[:-1], cuts[1:]):
        out = projection_triton(x[:, start:end], offset + start, k, p, seed, mode, out=out, **tiles)
    return out


def assert_matches(got, want):
    """Equal within fp32 summation-order rounding: the kernel adds the same terms in another order."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("mode", MODES)
def test_kernel_matches_reference(mode, B):
    """n not a multiple of the tile, k not a multiple of the column tile, three chunks accumulated into one
    out (one of length 1), the whole set kept and a p = 0.3 subset, two seeds, an offset past 2^31."""
    n, k = 600, 40
    x = torch.randn(B, n, generator=torch.Generator().manual_seed(B)).to(DEVICE)
    for p, seed, offset in ((1.0, 0, 0), (0.3, 5, 2**31 - 300)):
        got = chunked(x, offset, k, p, seed, mode, (0, 1, 333, n), **TILES)
        assert_matches(got, projection_reference(x, offset, k, p, seed, mode))


@pytest.mark.parametrize("mode", MODES)
def test_entries_exact_near_two_to_the_31_and_32(mode):
    """x = identity, so row r of the output is the map's row for coordinate offset + r. Offsets straddle
    2^31, 2^32 and beyond; the signs (rademacher, sjlt) and the subset are bit-exact, Gaussian entries
    equal to fp32 rounding of log and cos. B = 80 also spans two row tiles (sjlt: three)."""
    n, k, p = 80, 40, 0.5
    x = torch.eye(n, device=DEVICE)
    for offset in (2**31 - 40, 2**32 - 40, 2**33 + 2**31 - 40, 2**40 + 7):
        got = projection_triton(x, offset, k, p, seed=9, mode=mode, **TILES)
        want = projection_reference(x, offset, k, p, seed=9, mode=mode)
        if mode == "gaussian":
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, want), offset
        kept = (want != 0).any(dim=1)
        assert 0 < kept.sum() < n and torch.equal((got != 0).any(dim=1), kept)  # the same subset


def test_strided_and_low_precision_input():
    """A row-strided view and a bf16 input: the kernel reads each element as stored, in fp32."""
    wide = torch.randn(3, 700, device=DEVICE)
    view = wide[:, :500]  # row stride 700
    for x in (view, view.bfloat16()):
        for mode in ("rademacher", "sjlt"):
            want = projection_reference(x, 0, 40, 0.5, 1, mode)
            assert_matches(projection_triton(x, 0, 40, 0.5, 1, mode, **TILES), want)


def test_dispatch(monkeypatch):
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    reference = projection_reference(x, 0, 32, 0.5, 3)
    assert torch.equal(project(x, 0, 32, 0.5, 3), reference)  # auto: a CPU tensor gets the reference
    assert torch.equal(project(x, 0, 32, 0.5, 3, backend="torch"), reference)
    assert_matches(project(x, 0, 32, 0.5, 3, backend="triton"), reference)
    if CUDA:  # auto: a CUDA tensor gets the (deterministic) dense kernel
        assert torch.equal(project(x.cuda(), 0, 32, 0.5, 3), projection_triton(x.cuda(), 0, 32, 0.5, 3))
    with pytest.raises(ValueError, match="backend"):
        project(x, 0, 32, backend="cuda")
    with pytest.raises(ValueError, match="mode"):
        project(x, 0, 32, mode="dense")
    with pytest.raises(ValueError, match="p=0"):
        project(x, 0, 32, p=0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA device"):
        project(x, 0, 32, backend="triton")  # a CPU tensor without the interpreter: a clear error


@pytest.mark.skipif(not CUDA, reason="full size (k = 8192, n = 1e6) needs a GPU: too slow in the interpreter")
@pytest.mark.parametrize("B", [1, 3, 8, 16])
@pytest.mark.parametrize("mode", MODES)
def test_kernel_at_full_size_on_gpu(mode, B):
    n, k = 1_000_003, 8192
    x = torch.randn(B, n, device="cuda", generator=torch.Generator("cuda").manual_seed(B))
    for p, seed, offset in ((1.0, 0, 0), (0.1, 5, 2**32 - n // 2)):
        got = chunked(x, offset, k, p, seed, mode, (0, 1, 400_000, n))
        assert_matches(got, projection_reference(x, offset, k, p, seed, mode))


COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.projection import _dense_kernel, _sjlt_kernel

def compile_for_h100(kernel, types, constexprs):
    signature = dict(zip(kernel.arg_names, types + ["constexpr"] * len(constexprs)))
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert "cubin" in compiled.asm

# x, row_stride, partial, B, n, k, offset, scale, subset_key, keep_below, sign_key, angle_key, blocks_per_program
for dtype, gaussian, subset, block_b in (("fp32", False, True, 8), ("bf16", True, False, 16), ("fp16", True, True, 64)):
    types = [f"*{dtype}", "i64", "*fp32", "i32", "i32", "i32", "i64", "fp32", "i64", "i64", "i32", "i64", "i32"]
    compile_for_h100(_dense_kernel, types, {"GAUSSIAN": gaussian, "SUBSET": subset, "BLOCK_B": block_b,
                                            "BLOCK_N": 32, "BLOCK_K": 128})
# x, row_stride, acc, B, n, k, s, offset, scale, subset_key, keep_below, sign_key
for dtype, subset in (("fp32", True), ("bf16", False)):
    types = [f"*{dtype}", "i64", "*fp32", "i32", "i32", "i32", "i32", "i64", "fp32", "i64", "i64", "i32"]
    compile_for_h100(_sjlt_kernel, types, {"SUBSET": subset, "BLOCK_B": 8, "BLOCK_N": 512})
print("ok")
"""


def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter accepts Python that the GPU compiler refuses (a global read, an int loop variable
    used as a tensor): compile both kernels to sm_90 cubins ahead of time, which needs no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=ROOT, TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
