"""Sparse random projection of gradient vectors: z = P g with P = R^T E_S / sqrt(p k).

E_S keeps each of the d coordinates with probability p; R is a (kept coordinates x k) matrix of
independent signs (+-1, "rademacher") or standard normals ("gaussian"), or, in the "sjlt" mode, a
sparse Johnson-Lindenstrauss map where each kept coordinate adds +-g_i into s of the k outputs (scaled
by 1 / sqrt(p s)). Either way E<Pa, Pb> = <a, b>.

Every random choice (is coordinate i kept? the entry R[i, j]? the s columns of coordinate i?) is a
hash of (seed, i, j) by a counter-based generator: the map depends on nothing else, not on the
device, the chunking or the batch. So a gradient can be projected one parameter tensor at a time
(`offset` = index of its first coordinate in the flattened parameter vector, 64-bit) and the partial
projections added up. R is generated block by block and never stored; the work is done in fp32.

Two implementations of the same map behind one entry point, `project`:
- `projection_reference`: PyTorch, one [block, k] piece of R at a time in memory.
- `projection_triton`: Triton kernels that hash the subset and R's entries in registers, so the input
  is read once and R never touches memory. Dense modes: a tensor-core product per tile; sjlt: atomic adds.
"""

import math

import torch

from kernels import triton_usable

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference alone is enough to run everything
    triton = None

MASK32 = 0xFFFFFFFF
SUBSET_STREAM, SIGN_STREAM = 0x5EED5, 0xC0105  # separate streams: subset choice and matrix entries
ANGLE_STREAM = 0xA4615  # the second hash a Gaussian entry needs (its Box-Muller angle)
MODES = ("rademacher", "gaussian", "sjlt")


def mix32(x):
    """A 32-bit integer hash (lowbias32) of a Python int or an int64 tensor holding values in [0, 2^32).
    In a tensor the products may pass 2^63 and wrap; their low 32 bits, all we keep, are still exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of one random stream of one seed (computed once, on the host, for the kernels too)."""
    return mix32((seed * 0x9E3779B1 + stream) & MASK32)


def coordinate_hash(seed: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """32-bit hash of (seed, stream, 64-bit coordinate index): both halves of the index enter."""
    high = mix32((index >> 32) ^ stream_key(seed, stream))
    return mix32((index & MASK32) ^ high)


def keep_threshold(p: float) -> int:
    """A coordinate is kept when its subset hash h < this: the integer form of h / 2^32 < p (exact, as
    p * 2^32 only shifts the exponent), which the kernels can test without floating point."""
    return min(2**32, math.ceil(p * 2**32))


def kept_coordinates(seed: int, offset: int, n: int, p: float, device) -> torch.Tensor:
    """Positions (0..n-1) of the coordinates offset..offset+n-1 that the subset E_S keeps."""
    index = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    if p >= 1:
        return index - offset
    return (coordinate_hash(seed, SUBSET_STREAM, index) < keep_threshold(p)).nonzero().squeeze(-1)


def column_hash(k: int, device) -> torch.Tensor:
    """A 32-bit hash of each output column j < k; R[i, j] hashes it together with coordinate i's hash."""
    return mix32(torch.arange(k, dtype=torch.int64, device=device) * 0x9E3779B1 & MASK32)


def rademacher_block(seed: int, index: torch.Tensor, k: int) -> torch.Tensor:
    """R[i, j] in {-1, +1} (fp32) for the given coordinates i and every column j < k: the low bit of
    mix32(sign hash of i ^ hash of j)."""
    bits = mix32(coordinate_hash(seed, SIGN_STREAM, index)[:, None] ^ column_hash(k, index.device)) & 1
    return 1.0 - 2.0 * bits.float()


def gaussian_block(seed: int, index: torch.Tensor, k: int) -> torch.Tensor:
    """R[i, j] ~ N(0, 1) (fp32) by Box-Muller from two independent 32-bit words: h1 = the Rademacher
    word (sign stream), h2 = the same construction on the angle stream. Their top bits give
    u1 = (h1 >> 9 + 1/2) / 2^23 in (0, 1) and u2 = (h2 >> 8) / 2^24 in [0, 1), both exact in fp32 (so
    log never sees 0 and kernel and reference start from the same numbers); R = sqrt(-2 ln u1) cos(2 pi u2).
    The tail is cut at sqrt(2 ln 2^24) = 5.8 standard deviations, which changes nothing here."""
    column = column_hash(k, index.device)
    h1 = mix32(coordinate_hash(seed, SIGN_STREAM, index)[:, None] ^ column)
    h2 = mix32(coordinate_hash(seed, ANGLE_STREAM, index)[:, None] ^ column)
    u1 = ((h1 >> 9).float() + 0.5) * 2.0**-23
    u2 = (h2 >> 8).float() * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def sjlt_columns(seed: int, index: torch.Tensor, k: int, s: int):
    """For each coordinate, s output columns and signs: [n, s] int64 and [n, s] fp32."""
    row = coordinate_hash(seed, SIGN_STREAM, index)[:, None]
    h = mix32(row ^ mix32(torch.arange(1, s + 1, dtype=torch.int64, device=index.device) * 0x85EBCA6B & MASK32))
    return (h >> 1) % k, 1.0 - 2.0 * (h & 1).float()


def output_scale(p: float, k: int, mode: str, s: int) -> float:
    """1 / sqrt(p k) (dense) or 1 / sqrt(p s) (sjlt): what makes E<Pa, Pb> = <a, b>."""
    return 1.0 / math.sqrt(p * (s if mode == "sjlt" else k))


@torch.no_grad()
def projection_reference(vectors, offset, k, p=0.1, seed=0, mode="rademacher", s=4, out=None, block=2048):
    """Add P restricted to coordinates offset..offset+n-1 applied to `vectors` [B, n] into `out` [B, k]
    (fp32; created when None) and return it. Call once per parameter tensor with its global offset.

    Memory: one [block, k] piece of R at a time (dense modes); never R, never a d-sized permutation.
    """
    B, n = vectors.shape
    if out is None:
        out = torch.zeros(B, k, dtype=torch.float32, device=vectors.device)
    for start in range(0, n, block):
        width = min(block, n - start)
        kept = kept_coordinates(seed, offset + start, width, p, vectors.device)
        if kept.numel() == 0:
            continue
        x = vectors[:, start + kept].float() * output_scale(p, k, mode, s)
        index = kept + (offset + start)
        if mode == "sjlt":
            columns, signs = sjlt_columns(seed, index, k, s)
            for c in range(s):
                out.index_add_(1, columns[:, c], x * signs[:, c])
        else:
            out += x @ (gaussian_block if mode == "gaussian" else rademacher_block)(seed, index, k)
    return out


if triton is not None:
    # The jit functions read no Python globals (the GPU compiler refuses them): constants are literals.

    @triton.jit
    def _mix32(x):
        """mix32 on uint32: the products wrap modulo 2^32, which is the reference's `& MASK32`."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _coordinate_hash(key, index):
        """coordinate_hash of int64 indices, with key = stream_key(seed, stream) from the host."""
        high = _mix32((index >> 32).to(tl.uint32) ^ key.to(tl.uint32))
        return _mix32(index.to(tl.uint32) ^ high)  # int64 -> uint32 keeps the low 32 bits

    @triton.jit
    def _load_kept(x_ptr, row_stride, B, n, pos, row, index, subset_key, keep_below, SUBSET: tl.constexpr):
        """x^T tile [len(pos), len(row)] in fp32; rows past B, positions past n and coordinates outside the
        subset E_S load as 0, so they add nothing (no index tensor needed)."""
        mask = (pos < n)[:, None] & (row < B)[None, :]
        if SUBSET:
            mask &= (_coordinate_hash(subset_key, index).to(tl.int64) < keep_below)[:, None]
        ptrs = x_ptr + row.to(tl.int64)[None, :] * row_stride + pos[:, None]
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), mask

    @triton.jit
    def _dense_kernel(
        x_ptr, row_stride, partial_ptr, B, n, k, offset, scale, subset_key, keep_below, sign_key, angle_key,
        blocks_per_program,
        GAUSSIAN: tl.constexpr, SUBSET: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One program: BLOCK_K output columns x BLOCK_B rows over a run of coordinate blocks. It builds
        the R^T tile [BLOCK_K, BLOCK_N] from hashes and accumulates R^T x^T: the long side k is the MMA's
        M, so a batch as small as 8 wastes no tensor-core work. Writes its own slice of `partial`."""
        col = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        row = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
        column = _mix32(col.to(tl.uint32) * 0x9E3779B1)[:, None]  # column_hash
        acc = tl.zeros((BLOCK_K, BLOCK_B), tl.float32)
        start = tl.program_id(1).to(tl.int64) * blocks_per_program * BLOCK_N  # int64: n may pass 2^31
        for _ in range(blocks_per_program):
            pos = start + tl.arange(0, BLOCK_N)
            index = offset + pos  # the global 64-bit coordinate index
            x, _kept = _load_kept(x_ptr, row_stride, B, n, pos, row, index, subset_key, keep_below, SUBSET)
            h = _mix32(_coordinate_hash(sign_key, index)[None, :] ^ column)
            if GAUSSIAN:  # gaussian_block: Box-Muller, 2^-23 and 2^-24 written out
                h2 = _mix32(_coordinate_hash(angle_key, index)[None, :] ^ column)
                u1 = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
                u2 = (h2 >> 8).to(tl.float32) * 5.9604644775390625e-08
                r = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
            else:  # rademacher_block
                r = tl.where((h & 1) == 0, 1.0, -1.0)
            # tf32x3: tensor cores at about fp32 accuracy (plain tf32 would round x to 11 bits)
            acc = tl.dot(r, x, acc, input_precision="tf32x3")
            start += BLOCK_N
        ptrs = partial_ptr + (tl.program_id(1) * B + row).to(tl.int64)[None, :] * k + col[:, None]
        tl.store(ptrs, acc * scale, mask=(col < k)[:, None] & (row < B)[None, :])

    @triton.jit
    def _sjlt_kernel(
        x_ptr, row_stride, acc_ptr, B, n, k, s, offset, scale, subset_key, keep_below, sign_key,
        SUBSET: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One program: BLOCK_N coordinates x BLOCK_B rows, read once; each kept coordinate adds +-x into
        s columns of acc [k, B], transposed so that one column's B sums share a memory sector."""
        pos = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        index = offset + pos
        x, mask = _load_kept(x_ptr, row_stride, B, n, pos, row, index, subset_key, keep_below, SUBSET)
        x = x * scale
        word = _coordinate_hash(sign_key, index)
        for c in range(1, s + 1):  # sjlt_columns
            h = _mix32(word ^ _mix32(tl.cast(c, tl.uint32) * 0x85EBCA6B))
            column = ((h >> 1) % k.to(tl.uint32)).to(tl.int64)
            sign = tl.where((h & 1) == 0, 1.0, -1.0)
            # relaxed: nothing reads these sums until the kernel ends, so no memory fences are needed
            tl.atomic_add(acc_ptr + column[:, None] * B + row[None, :], x * sign[:, None], mask=mask, sem="relaxed")


@torch.no_grad()
def projection_triton(vectors, offset, k, p=0.1, seed=0, mode="rademacher", s=4, out=None, block_n=None,
                      block_k=128):  # fmt: skip
    """The same map as `projection_reference`, by the Triton kernels. Dense modes: each program writes its
    partial sum and they are added in a fixed order (deterministic); sjlt: fp32 atomic adds, whose order
    (so the last bits) may vary from run to run. block_n / block_k: tile sizes (small ones in tests)."""
    B, n = vectors.shape
    if out is None:
        out = torch.zeros(B, k, dtype=torch.float32, device=vectors.device)
    if B == 0 or n == 0:
        return out
    if vectors.stride(1) != 1:
        vectors = vectors.contiguous()  # rows may be strided; within a row the kernels need unit stride
    common = dict(offset=offset, scale=output_scale(p, k, mode, s), subset_key=stream_key(seed, SUBSET_STREAM),
                  keep_below=keep_threshold(p), sign_key=stream_key(seed, SIGN_STREAM), SUBSET=p < 1)  # fmt: skip
    if mode == "sjlt":
        block_b = min(32, triton.next_power_of_2(B))
        block_n = block_n or max(64, 4096 // block_b)
        acc = torch.zeros(k, B, dtype=torch.float32, device=vectors.device)
        grid = (triton.cdiv(n, block_n), triton.cdiv(B, block_b))
        _sjlt_kernel[grid](vectors, vectors.stride(0), acc, B, n, k, s, **common, BLOCK_B=block_b, BLOCK_N=block_n)
        return out.add_(acc.T)
    block_b, block_n = min(64, max(8, triton.next_power_of_2(B))), block_n or 32
    n_blocks, k_blocks, b_blocks = triton.cdiv(n, block_n), triton.cdiv(k, block_k), triton.cdiv(B, block_b)
    # Split the coordinates into enough runs to fill the device (4 programs per SM), no more: fewer partials
    # (the interpreter pretends 2 SMs, which still splits). Rows past a tile of 64 get their own programs.
    sms = torch.cuda.get_device_properties(vectors.device).multi_processor_count if vectors.is_cuda else 2
    per_program = triton.cdiv(n_blocks, min(n_blocks, triton.cdiv(4 * sms, k_blocks * b_blocks)))
    splits = triton.cdiv(n_blocks, per_program)
    partial = torch.empty(splits, B, k, dtype=torch.float32, device=vectors.device)
    _dense_kernel[(k_blocks, splits, b_blocks)](
        vectors, vectors.stride(0), partial, B, n, k, **common, angle_key=stream_key(seed, ANGLE_STREAM),
        blocks_per_program=per_program, GAUSSIAN=mode == "gaussian", BLOCK_B=block_b, BLOCK_N=block_n,
        BLOCK_K=block_k,
    )  # fmt: skip
    return out.add_(partial.sum(0))


def project(vectors, offset, k, p=0.1, seed=0, mode="rademacher", s=4, out=None, backend="auto"):
    """The one entry point callers use: add the projection of `vectors` [B, n] (coordinates offset..
    offset+n-1 of the flattened parameters) into `out` [B, k] fp32 and return it. backend: `auto` (the
    Triton kernels on CUDA tensors, the reference elsewhere), `triton` or `torch` to force one."""
    if mode not in MODES:
        raise ValueError(f"projection mode {mode!r}: expected one of {', '.join(MODES)}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend {backend!r}: expected auto, triton or torch")
    if not 0 < p <= 1 or k < 1 or s < 1 or offset < 0 or vectors.dim() != 2:
        raise ValueError(f"projection: need 0 < p <= 1, k >= 1, s >= 1, offset >= 0 and vectors [B, n]; got "
                         f"p={p}, k={k}, s={s}, offset={offset}, shape {tuple(vectors.shape)}")  # fmt: skip
    if backend == "triton" or (backend == "auto" and vectors.is_cuda and triton_usable(vectors.device)):
        if not triton_usable(vectors.device):
            raise ValueError("the Triton projection needs a CUDA device (or TRITON_INTERPRET=1) and triton installed")
        return projection_triton(vectors, offset, k, p, seed, mode, s, out)
    return projection_reference(vectors, offset, k, p, seed, mode, s, out)
