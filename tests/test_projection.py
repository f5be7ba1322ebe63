"""Sparse random projection (kernels/projection.py) against its mathematical promises: error spread,
linearity, one map whatever the chunking, seeds, 64-bit offsets, unbiased."""

import math

import pytest
import torch

from kernels.projection import MASK32, SIGN_STREAM, SUBSET_STREAM, mix32, project


def pair_with_cosine(d, c, g):
    a = torch.randn(d, generator=g, dtype=torch.float64)
    a /= a.norm()
    b = torch.randn(d, generator=g, dtype=torch.float64)
    b -= (b @ a) * a
    b /= b.norm()
    return a, c * a + math.sqrt(1 - c * c) * b  # unit vectors with <a, b> = c


@pytest.mark.parametrize("mode", ["rademacher", "gaussian", "sjlt"])
def test_inner_product_error_spread(mode):
    """Unit vectors with inner product c: <Pa, Pb> - c has std close to sqrt((1 + c^2) / k) (exactly, for
    Gaussian entries; up to O(1/d) for the others, so a short d is enough and keeps the test fast)."""
    d, k, c = 600, 256, 0.5
    a, b = pair_with_cosine(d, c, torch.Generator().manual_seed(0))
    x = torch.stack([a, b]).float()
    errors = torch.tensor([(lambda z: z[0] @ z[1])(project(x, 0, k, p=1.0, seed=s, mode=mode)) - c for s in range(200)])
    expected = math.sqrt((1 + c * c) / k)
    assert abs(errors.mean()) < 3 * expected / math.sqrt(200)
    assert 0.75 * expected < errors.std() < 1.25 * expected


def test_linear():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5000, generator=g), torch.randn(3, 5000, generator=g)
    for mode in ("rademacher", "gaussian", "sjlt"):
        pa, pb = project(a, 7, 128, 0.3, 5, mode), project(b, 7, 128, 0.3, 5, mode)
        torch.testing.assert_close(project(a + b, 7, 128, 0.3, 5, mode), pa + pb, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(project(2.5 * a, 7, 128, 0.3, 5, mode), 2.5 * pa, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["rademacher", "gaussian", "sjlt"])
def test_same_map_across_chunkings_and_batches(mode):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 10_000, generator=g)
    whole = project(x, 0, 64, 0.2, 3, mode)
    pieces = None
    for start, end in ((0, 1), (1, 4097), (4097, 7000), (7000, 10_000)):  # uneven "parameter tensors"
        pieces = project(x[:, start:end], start, 64, 0.2, 3, mode, out=pieces)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-4)
    one_by_one = torch.cat([project(x[i : i + 1], 0, 64, 0.2, 3, mode) for i in range(5)])
    torch.testing.assert_close(one_by_one, whole, rtol=1e-5, atol=1e-4)
    from kernels.projection import projection_reference

    torch.testing.assert_close(projection_reference(x, 0, 64, 0.2, 3, mode, block=333), whole, rtol=1e-5, atol=1e-4)


def test_different_seeds_give_different_maps():
    x = torch.randn(2, 2000, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(project(x, 0, 64, 0.5, seed=0), project(x, 0, 64, 0.5, seed=1))


def slow_entry(seed, i, j, p):
    """R'[i, j] of the map, from the definition, in Python integers: 0 if coordinate i is not kept."""

    def coordinate(stream):
        key = mix32((seed * 0x9E3779B1 + stream) & MASK32)
        return mix32((i & MASK32) ^ mix32((i >> 32) ^ key))

    if p < 1 and coordinate(SUBSET_STREAM) / 2**32 >= p:
        return 0.0
    bit = mix32(coordinate(SIGN_STREAM) ^ mix32((j * 0x9E3779B1) & MASK32)) & 1
    return (1.0 - 2.0 * bit) / math.sqrt(p * 16)


def test_offsets_beyond_two_to_the_32():
    """Coordinates past 2^32 (and a batch x d product past 2^32) match the slow integer definition,
    and the high half of the index matters (no 32-bit wrap-around aliasing)."""
    offset, n, k, p = 2**33 + 12345, 40, 16, 0.5
    x = torch.eye(n)  # row r picks coordinate offset + r: the output is that coordinate's row of R'
    got = project(x, offset, k, p, seed=9)
    want = torch.tensor([[slow_entry(9, offset + r, j, p) for j in range(k)] for r in range(n)])
    torch.testing.assert_close(got, want.float())
    assert (want != 0).any(dim=1).sum() not in (0, n)  # some coordinates kept, some dropped
    aliased = project(x, offset - 2**32 * 2, k, p, seed=9)  # the same low 32 bits, another high half
    assert not torch.equal(got, aliased)


@pytest.mark.parametrize("mode", ["rademacher", "gaussian"])
def test_subset_inner_product_is_unbiased(mode):
    g = torch.Generator().manual_seed(4)
    a, b = pair_with_cosine(2000, 0.3, g)
    x = torch.stack([a, b]).float()
    values = torch.tensor([(lambda z: z[0] @ z[1])(project(x, 0, 64, p=0.1, seed=s, mode=mode)) for s in range(200)])
    assert abs(values.mean() - 0.3) < 3 * values.std() / math.sqrt(200)


def test_kept_share_is_p():
    x = torch.ones(1, 100_000)
    from kernels.projection import kept_coordinates

    assert abs(kept_coordinates(0, 0, 100_000, 0.1, "cpu").numel() / 100_000 - 0.1) < 0.005
    with pytest.raises(ValueError, match="mode"):
        project(x, 0, 8, mode="dense")


def test_gaussian_entries_are_standard_normal():
    """Box-Muller entries of R: mean 0, variance 1, normal tails and fourth moment, no NaN or inf (u1 > 0)."""
    from kernels.projection import gaussian_block

    z = gaussian_block(11, torch.arange(2**32 - 1000, 2**32 + 1000), 256).double().flatten()  # 512k entries
    assert torch.isfinite(z).all()
    assert abs(z.mean()) < 0.006 and abs(z.var() - 1) < 0.01
    assert abs((z.abs() > 1.959964).double().mean() - 0.05) < 0.002
    assert abs(z.pow(4).mean() - 3) < 0.05


def test_gaussian_entries_match_the_definition_past_two_to_the_32():
    """Gaussian entries from the documented Box-Muller formula, in Python integers and doubles."""
    from kernels.projection import ANGLE_STREAM

    offset, n, k, p = 2**33 + 777, 24, 12, 0.5

    def word(stream, i, j):
        key = mix32((9 * 0x9E3779B1 + stream) & MASK32)
        return mix32(mix32((i & MASK32) ^ mix32((i >> 32) ^ key)) ^ mix32((j * 0x9E3779B1) & MASK32))

    def entry(i, j):
        if slow_entry(9, i, 0, p) == 0:  # not kept
            return 0.0
        u1, u2 = ((word(SIGN_STREAM, i, j) >> 9) + 0.5) / 2**23, (word(ANGLE_STREAM, i, j) >> 8) / 2**24
        return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2) / math.sqrt(p * k)

    got = project(torch.eye(n), offset, k, p, seed=9, mode="gaussian")
    want = torch.tensor([[entry(offset + r, j) for j in range(k)] for r in range(n)])
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    assert (want != 0).any(dim=1).sum() not in (0, n)
