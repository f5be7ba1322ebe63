def groups_with_signal(rewards):
    """DAPO's dynamic-sampling filter: [B] bool, True for a group (a row of rewards [B, n]) whose rewards are not
    all equal. A group of equal rewards has zero advantages: it adds nothing to the policy gradient but still
    counts in the loss's normaliser, shrinking the step of every other group, so DAPO leaves it out.
    Paper: Q. Yu, Z. Zhang, R. Zhu, et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    arXiv 2503.14476."""
    return rewards.max(1).values > rewards.min(1).values
