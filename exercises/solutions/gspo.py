import torch


def sequence_clipped_surrogate(logprobs, old_logprobs, advantages, completion_mask, eps_low, eps_high):
    """GSPO's clipped objective, as a loss per token [N, L], with one importance ratio per sequence instead of one
    per token: s_i = (pi(y_i) / pi_old(y_i)) ^ (1 / |y_i|) = exp(mean over y_i's tokens of log pi - log pi_old), the
    geometric mean of its token ratios (padding left out). Every token of sequence i gets the loss
    -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), so that the token-mean of a sequence is its loss.
    Also where the clip binds, [N, L] bool, the same for every token of a sequence (there its gradient is 0).
    logprobs, old_logprobs, completion_mask [N, L] (mask: 1 on completion tokens, 0 on padding); advantages [N].
    Paper: C. Zheng, S. Liu, M. Li, et al., "Group Sequence Policy Optimization", arXiv 2507.18071."""
    lengths = completion_mask.sum(1).clamp(min=1)
    ratio = torch.exp(((logprobs - old_logprobs) * completion_mask).sum(1) / lengths)  # [N]
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    loss, binds = -torch.min(unclipped, clipped), (clipped < unclipped).detach()
    return loss[:, None].expand_as(logprobs), binds[:, None].expand_as(logprobs)
