"""Top-K divergence between the stored behaviour policy mu and the current policy pi, from logits.

The behaviour top-K (ids and log-probs, recorded at sampling time after temperature, the sampled
token forced into the set) splits the vocabulary into K buckets plus one "other" bucket holding the
rest of the mass. Over those K+1 buckets:

    TV = 1/2 * sum_b |mu_b - pi_b|          KL(mu || pi) = sum_b mu_b * log(mu_b / pi_b)

with bucket masses clamped to >= 1e-12 inside the logs. This file holds the PyTorch reference; the
Triton kernel (one streaming pass over the logits, O(N*K) extra memory) comes beside it later, behind
the same `topk_divergence` function.
"""

import torch

EPS = 1e-12


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
    kl_k = (mu_k * (mu_k.clamp(min=EPS).log() - pi_k.clamp(min=EPS).log())).sum(-1)
    kl_other = mu_other * (mu_other.clamp(min=EPS).log() - pi_other.clamp(min=EPS).log())
    sampled_logprob = log_pi.gather(-1, sampled_ids[:, None]).squeeze(-1)
    return tv, kl_k + kl_other, log_z, sampled_logprob


@torch.no_grad()
def topk_divergence_reference(logits, topk_ids, topk_logprobs, sampled_ids, temperature=1.0, valid=None,
                              chunk_rows=1024):  # fmt: skip
    """Per row: Top-K TV, Top-K KL(mu || pi), the log-normaliser log sum exp(logits / T), and log pi of
    the sampled token, all fp32 [N] (fp64 for fp64 logits). Rows where `valid` is False (padding) get 0.

    logits [N, V] in any float dtype and row stride; topk_ids / topk_logprobs [N, K]; sampled_ids [N].
    Rows are processed `chunk_rows` at a time, so the fp32 working copy is [chunk_rows, V], never
    [N, V].
    """
    N = logits.shape[0]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    out = [torch.zeros(N, dtype=dtype, device=logits.device) for _ in range(4)]
    rows = torch.arange(N, device=logits.device) if valid is None else valid.nonzero().squeeze(-1)
    for s in range(0, rows.numel(), chunk_rows):
        r = rows[s : s + chunk_rows]
        results = _rows_reference(logits[r], topk_ids[r], topk_logprobs[r], sampled_ids[r], temperature)
        for o, value in zip(out, results):
            o[r] = value
    tv, kl, log_z, sampled_logprob = out
    return {"tv": tv, "kl": kl, "log_z": log_z, "sampled_logprob": sampled_logprob}


def topk_divergence(logits, topk_ids, topk_logprobs, sampled_ids, temperature=1.0, valid=None):
    """The one entry point callers use; the Triton kernel will be dispatched from here on CUDA."""
    return topk_divergence_reference(logits, topk_ids, topk_logprobs, sampled_ids, temperature, valid)
