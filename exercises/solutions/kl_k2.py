def kl_k2(logprobs, ref_logprobs):
    """KL(pi || pi_ref) per token, the k2 estimator 1/2 (log pi - log pi_ref)^2 [N, L]: >= 0, biased, of low
    variance; its gradient (log pi - log pi_ref) grad log pi is, on tokens sampled from pi, an unbiased estimate
    of the gradient of KL(pi || pi_ref). logprobs, ref_logprobs [N, L]."""
    return 0.5 * (logprobs - ref_logprobs) ** 2
