def leave_one_out_advantages(rewards):
    """RLOO's advantage: A_i = r_i - (mean of the other n - 1 rewards of its group), for every row of rewards [B, n]
    (n >= 2): a baseline that does not contain r_i itself. It equals n / (n - 1) (r_i - mean of the group).
    Paper: A. Ahmadian, C. Cremer, M. Galle, et al., "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs", arXiv 2402.14740."""
    n = rewards.shape[1]
    others = (rewards.sum(1, keepdim=True) - rewards) / (n - 1)
    return rewards - others
