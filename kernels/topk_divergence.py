"""Top-K divergence between the stored behaviour policy mu and the current policy pi, from logits.

The behaviour top-K (ids and log-probs, recorded at sampling time after temperature, the sampled
token forced into the set) splits the vocabulary into K buckets plus one "other" bucket holding the
rest of the mass. Over those K+1 buckets:

    TV = 1/2 * sum_b |mu_b - pi_b|          KL(mu || pi) = sum_b mu_b * log(mu_b / pi_b)

For the K stored tokens the logs are the log-probs themselves: log mu_k as stored, log pi_k =
logits_k / T - log Z, never log(exp(.)) and never floored, so a token that pi has nearly ruled out
(pi_k far below 1e-12) adds its full mu_k * log(mu_k / pi_k). Only the two "other" masses, 1 - (mass of
the set), are clamped to >= 1e-12 inside the logs: they are differences that can round to 0. A token
with mu_k = 0 adds 0 (0 log 0 = 0). Per row we also return the log-normaliser log Z =
logsumexp(logits / T), the sampled token's log pi, and the entropy of pi.

Two implementations behind one entry point, `topk_divergence`:
- `topk_divergence_reference`: PyTorch, an fp32 [rows, V] working copy per chunk of rows.
- `topk_divergence_triton`: one program per row streams the logits once (online max and sum-exp, in
  fp32 registers), then gathers the K stored ids: O(N*K) extra memory, no softmax materialised.
"""


import torch

from kernels import triton_usable

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference alone is enough to run everything
    triton = None

EPS = 1e-12


def _kl_set_reference(mu_k, log_mu_k, log_pi_k):
    """sum_k mu_k * (log mu_k - log pi_k) over the K stored tokens, from the log-probs themselves.

    No floor on pi_k: clamping it at EPS would cap -log pi_k at -log EPS ~ 27.6 and under-estimate the KL
    exactly where pi has nearly ruled out a token mu gave mass to. A term with mu_k = 0 is 0, not 0 * inf.
    """
    return torch.where(mu_k > 0, mu_k * (log_mu_k - log_pi_k), 0.0).sum(-1)


def _rows_reference(logits, topk_ids, topk_logprobs, sampled_ids, temperature):
    """All outputs for one chunk of rows, in fp32 (fp64 inputs stay fp64, which the tests use to check
    the exact facts); this is where the [rows, V] working copy exists."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype) / temperature
    log_z = logits.logsumexp(-1)
    log_pi = logits - log_z[:, None]
    log_pi_k, log_mu_k = log_pi.gather(-1, topk_ids), topk_logprobs.to(dtype)
    pi_k, mu_k = log_pi_k.exp(), log_mu_k.exp()
    # "other" = 1 - (mass of the set), as -expm1(log mass): accurate when the set holds nearly all of it
    mu_other = (-torch.expm1(log_mu_k.logsumexp(-1))).clamp(min=0)
    pi_other = (-torch.expm1(log_pi_k.logsumexp(-1))).clamp(min=0)
    tv = 0.5 * ((mu_k - pi_k).abs().sum(-1) + (mu_other - pi_other).abs())
    kl_k = _kl_set_reference(mu_k, log_mu_k, log_pi_k)
    kl_other = mu_other * (mu_other.clamp(min=EPS).log() - pi_other.clamp(min=EPS).log())
    sampled_logprob = log_pi.gather(-1, sampled_ids[:, None]).squeeze(-1)
    entropy = -(log_pi.exp() * log_pi).sum(-1)
    return tv, kl_k + kl_other, log_z, sampled_logprob, entropy


OUTPUTS = ("tv", "kl", "log_z", "sampled_logprob", "entropy")


@torch.no_grad()
def topk_divergence_reference(logits, topk_ids, topk_logprobs, sampled_ids, temperature=1.0, valid=None,
                              chunk_rows=1024):  # fmt: skip
    """Per row: Top-K TV, Top-K KL(mu || pi), the log-normaliser log sum exp(logits / T), log pi of
    the sampled token and the entropy of pi, all fp32 [N] (fp64 for fp64 logits). Rows where `valid`
    is False (padding) get 0.

    logits [N, V] in any float dtype and row stride; topk_ids / topk_logprobs [N, K]; sampled_ids [N].
    Rows are processed `chunk_rows` at a time, so the fp32 working copy is [chunk_rows, V], never
    [N, V].
    """
    N = logits.shape[0]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    out = [torch.zeros(N, dtype=dtype, device=logits.device) for _ in OUTPUTS]
    rows = torch.arange(N, device=logits.device) if valid is None else valid.nonzero().squeeze(-1)
    for s in range(0, rows.numel(), chunk_rows):
        r = rows[s : s + chunk_rows]
        results = _rows_reference(logits[r], topk_ids[r], topk_logprobs[r], sampled_ids[r], temperature)
        for o, value in zip(out, results):
            o[r] = value
    return dict(zip(OUTPUTS, out))


if triton is not None:

    @triton.jit
    def _expm1(y):
        """exp(y) - 1 without cancellation near 0 (Taylor series there; error < 1e-10 relative)."""
        series = y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0))))
        return tl.where(tl.abs(y) < 1e-2, series, tl.exp(y) - 1.0)

    @triton.jit
    def _topk_divergence_kernel(
        logits_ptr, row_stride, ids_ptr, mu_logprobs_ptr, sampled_ptr, valid_ptr,
        tv_ptr, kl_ptr, log_z_ptr, sampled_logprob_ptr, entropy_ptr,
        V, K, inv_temperature,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        if tl.load(valid_ptr + row) == 0:  # padding: write zeros, read nothing
            tl.store(tv_ptr + row, 0.0)
            tl.store(kl_ptr + row, 0.0)
            tl.store(log_z_ptr + row, 0.0)
            tl.store(sampled_logprob_ptr + row, 0.0)
            tl.store(entropy_ptr + row, 0.0)
            return
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        # 1. One pass over the vocabulary: running max m, s = sum exp(x - m), sx = sum exp(x - m) (x - m),
        #    rescaled whenever m grows. log Z = m + log s; entropy = log s - sx / s.
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        sx = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inside = offs < V
            x = tl.load(row_ptr + offs, mask=inside, other=float("-inf")).to(tl.float32) * inv_temperature
            m_new = tl.maximum(m, tl.max(x, 0))
            scale = tl.exp(m - m_new)
            x_shifted = tl.where(inside, x - m_new, 0.0)
            e = tl.where(inside, tl.exp(x_shifted), 0.0)
            m_old = tl.where(s > 0, m, m_new)  # avoids -inf * 0 on the first block
            shift = (m_old - m_new) * s  # the old terms, measured from the new max
            sx = scale * (sx + shift) + tl.sum(e * x_shifted, 0)
            s = s * scale + tl.sum(e, 0)
            m = m_new
        log_z = m + tl.log(s)
        entropy = tl.log(s) - sx / s
        # 2. Gather the K stored ids and the sampled token: O(K) reads.
        k = tl.arange(0, BLOCK_K)
        in_set = k < K
        ids = tl.load(ids_ptr + row.to(tl.int64) * K + k, mask=in_set, other=0)
        log_mu = tl.load(mu_logprobs_ptr + row.to(tl.int64) * K + k, mask=in_set, other=float("-inf"))
        log_mu = log_mu.to(tl.float32)
        x_k = tl.load(row_ptr + ids, mask=in_set, other=float("-inf")).to(tl.float32)
        log_pi = x_k * inv_temperature - log_z
        mu = tl.where(in_set, tl.exp(log_mu), 0.0)
        pi = tl.where(in_set, tl.exp(log_pi), 0.0)
        # 3. The "other" bucket as -expm1(log mass of the set), then TV and KL over the K + 1 buckets.
        max_mu = tl.max(log_mu, 0)
        max_pi = tl.max(log_pi, 0)
        mu_set = max_mu + tl.log(tl.sum(tl.where(in_set, tl.exp(log_mu - max_mu), 0.0), 0))  # log mass of the set
        pi_set = max_pi + tl.log(tl.sum(tl.where(in_set, tl.exp(log_pi - max_pi), 0.0), 0))
        mu_other = tl.maximum(-_expm1(mu_set), 0.0)
        pi_other = tl.maximum(-_expm1(pi_set), 0.0)
        tv = 0.5 * (tl.sum(tl.abs(mu - pi), 0) + tl.abs(mu_other - pi_other))
        # The K stored tokens use their log-probs as they are (no floor on pi: it would cap -log pi at ~27.6 and
        # under-estimate the KL). Lanes of zero mass (past K, or mu = 0) read 0 for both logs and add 0 log 0 = 0,
        # never forming -inf - (-inf). Only the "other" masses are floored at 1e-12 inside the logs, as EPS in
        # the reference (a jit function cannot read a global).
        live = in_set & (mu > 0)
        kl_k = mu * (tl.where(live, log_mu, 0.0) - tl.where(live, log_pi, 0.0))
        kl_other = mu_other * (tl.log(tl.maximum(mu_other, 1e-12)) - tl.log(tl.maximum(pi_other, 1e-12)))
        sampled = tl.load(sampled_ptr + row)
        tl.store(tv_ptr + row, tv)
        tl.store(kl_ptr + row, tl.sum(kl_k, 0) + kl_other)
        tl.store(log_z_ptr + row, log_z)
        tl.store(sampled_logprob_ptr + row, tl.load(row_ptr + sampled).to(tl.float32) * inv_temperature - log_z)
        tl.store(entropy_ptr + row, entropy)


@torch.no_grad()
def topk_divergence_triton(logits, topk_ids, topk_logprobs, sampled_ids, temperature=1.0, valid=None,
                           block_v=4096):  # fmt: skip
    """The same outputs as the reference (fp32), from one streaming pass per row over the logits."""
    N, V = logits.shape
    K = topk_ids.shape[1]
    if logits.stride(1) != 1:
        logits = logits.contiguous()  # rows may be strided; within a row the kernel needs unit stride
    valid = torch.ones(N, dtype=torch.int8, device=logits.device) if valid is None else valid.to(torch.int8)
    out = [torch.empty(N, dtype=torch.float32, device=logits.device) for _ in OUTPUTS]
    if N:
        _topk_divergence_kernel[(N,)](
            logits, logits.stride(0), topk_ids.contiguous(), topk_logprobs.float().contiguous(),
            sampled_ids.contiguous(), valid.contiguous(), *out, V, K, 1.0 / temperature,
            BLOCK_V=min(block_v, triton.next_power_of_2(V)), BLOCK_K=max(16, triton.next_power_of_2(K)),
            num_warps=8 if block_v >= 4096 else 4,
        )  # fmt: skip
    return dict(zip(OUTPUTS, out))


def topk_divergence(logits, topk_ids, topk_logprobs, sampled_ids, temperature=1.0, valid=None, backend="auto"):
    """The one entry point callers use. backend: `auto` (the Triton kernel on CUDA, the reference
    elsewhere), `triton` or `torch` to force one."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend {backend!r}: expected auto, triton or torch")
    if backend == "triton" or (backend == "auto" and logits.is_cuda and triton_usable(logits.device)):
        if not triton_usable(logits.device):
            raise ValueError("the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1) and triton installed")
        return topk_divergence_triton(logits, topk_ids, topk_logprobs, sampled_ids, temperature, valid)
    return topk_divergence_reference(logits, topk_ids, topk_logprobs, sampled_ids, temperature, valid)
