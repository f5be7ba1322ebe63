"""Sparse random projection of gradient vectors: z = P g with P = R^T E_S / sqrt(p k).

E_S keeps each of the d coordinates with probability p; R is a (kept coordinates x k) matrix of
independent signs (+-1, "rademacher") or, in the "sjlt" mode, a sparse Johnson-Lindenstrauss map
where each kept coordinate adds +-g_i into s of the k outputs. Either way E<Pa, Pb> = <a, b>.

Every random choice (is coordinate i kept? the sign R[i, j]? the s columns of coordinate i?) is a
hash of (seed, i, j) by a counter-based generator: the map depends on nothing else, not on the
device, the chunking or the batch. So a gradient can be projected one parameter tensor at a time
(`offset` = index of its first coordinate in the flattened parameter vector, 64-bit) and the partial
projections added up. R is generated block by block and never stored; the work is done in fp32.

This file holds the PyTorch reference; a Triton kernel comes later, behind `project`.
"""

import math

import torch

MASK32 = 0xFFFFFFFF
SUBSET_STREAM, SIGN_STREAM = 0x5EED5, 0xC0105  # separate streams: subset choice and matrix entries


def mix32(x):
    """A 32-bit integer hash (lowbias32) of a Python int or an int64 tensor holding values in [0, 2^32).
    In a tensor the products may pass 2^63 and wrap; their low 32 bits, all we keep, are still exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def coordinate_hash(seed: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """32-bit hash of (seed, stream, 64-bit coordinate index): both halves of the index enter."""
    key = mix32((seed * 0x9E3779B1 + stream) & MASK32)
    high = mix32((index >> 32) ^ key)
    return mix32((index & MASK32) ^ high)


def kept_coordinates(seed: int, offset: int, n: int, p: float, device) -> torch.Tensor:
    """Positions (0..n-1) of the coordinates offset..offset+n-1 that the subset E_S keeps."""
    index = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    if p >= 1:
        return index - offset
    uniform = coordinate_hash(seed, SUBSET_STREAM, index).double() / 2**32
    return (uniform < p).nonzero().squeeze(-1)


def rademacher_block(seed: int, index: torch.Tensor, k: int) -> torch.Tensor:
    """R[i, j] in {-1, +1} (fp32) for the given coordinates i and every column j < k."""
    row = coordinate_hash(seed, SIGN_STREAM, index)[:, None]
    column = mix32(torch.arange(k, dtype=torch.int64, device=index.device) * 0x9E3779B1 & MASK32)
    bits = mix32(row ^ column[None, :]) & 1
    return 1.0 - 2.0 * bits.float()


def sjlt_columns(seed: int, index: torch.Tensor, k: int, s: int):
    """For each coordinate, s output columns and signs: [n, s] int64 and [n, s] fp32."""
    row = coordinate_hash(seed, SIGN_STREAM, index)[:, None]
    h = mix32(row ^ mix32(torch.arange(1, s + 1, dtype=torch.int64, device=index.device) * 0x85EBCA6B & MASK32))
    return (h >> 1) % k, 1.0 - 2.0 * (h & 1).float()


@torch.no_grad()
def projection_reference(vectors, offset, k, p=0.1, seed=0, mode="rademacher", s=4, out=None, block=2048):
    """Add P restricted to coordinates offset..offset+n-1 applied to `vectors` [B, n] into `out` [B, k]
    (fp32; created when None) and return it. Call once per parameter tensor with its global offset.

    Memory: one [block, k] piece of R at a time (rademacher); never R, never a d-sized permutation.
    """
    B, n = vectors.shape
    if out is None:
        out = torch.zeros(B, k, dtype=torch.float32, device=vectors.device)
    scale = 1.0 / math.sqrt(p * (k if mode == "rademacher" else s))
    for start in range(0, n, block):
        width = min(block, n - start)
        kept = kept_coordinates(seed, offset + start, width, p, vectors.device)
        if kept.numel() == 0:
            continue
        x = vectors[:, start + kept].float() * scale
        index = kept + (offset + start)
        if mode == "rademacher":
            out += x @ rademacher_block(seed, index, k)
        else:
            columns, signs = sjlt_columns(seed, index, k, s)
            for c in range(s):
                out.index_add_(1, columns[:, c], x * signs[:, c])
    return out


def project(vectors, offset, k, p=0.1, seed=0, mode="rademacher", s=4, out=None):
    """The one entry point callers use (the Triton kernel will be dispatched from here on CUDA)."""
    if mode not in ("rademacher", "sjlt"):
        raise ValueError(f"projection mode {mode!r}: expected rademacher or sjlt")
    return projection_reference(vectors, offset, k, p, seed, mode, s, out)
