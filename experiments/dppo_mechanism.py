"""What each trust region blocks when the sampler computes differently from the trainer, as a weight-quantized
rollout engine does (`dppo.py --sampler-bits`): no update has been taken, so every difference between pi and mu
is the sampler's numerics.

The base `tiny` policy samples 64 train prompts x 4 completions (48 tokens, T = 1) with its weights rounded per
output channel to 8, 6, 4 and 3 bits, recording mu (and mu's top-20); the fp32 trainer recomputes pi on the same
tokens. For each trust region at its default threshold (the ratio clip at 0.2, Binary TV 0.15, Binary KL 0.05,
Top-K TV 0.15), and for each bin of mu (the sampled token's probability under the sampler): the share of tokens
past the region's threshold, the share whose update it blocks (its mask is 0: past the threshold, and moved the
way the token's advantage pushes), and the mean |pi - mu| of the blocked tokens. Then, over all tokens with
A != 0, the share of the updates each region keeps that move pi towards mu (A > 0 on a token pi gives less
than mu, or A < 0 on one it gives more), by count and weighted by |pi - mu|: a mask blocks only updates away
from mu, so what it keeps leans towards the sampler.

    python -m experiments.dppo_mechanism        # about a minute on one CPU core; prints the tables
                                                # and draws docs/dppo_mechanism.png (6, 4 and 3 bits)
"""

import copy
import os

import torch

import dppo
from common.model import load_policy
from common.sampling import prompt_ids, sample
from common.world import model_folder
from common.world.chain import make_chain
from experiments.helpers import ROOT

REGIONS = {"ratio clip 0.2": "ratio", "binary TV 0.15": "binary-tv", "binary KL 0.05": "binary-kl",
           "top-K TV 0.15": "topk-tv"}  # fmt: skip
BITS = (8, 6, 4, 3)
PROMPTS, SAMPLES, TOKENS, K = 64, 4, 48, 20


BINS = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0001)  # of mu; deciles would not resolve the rare tokens: most are near 1


def by_mu_bin(bits: int, model, tokenizer, task) -> dict:
    """Per bin of mu: the token count, and per region the share past its threshold, the share blocked and the
    mean |pi - mu| of the blocked tokens; also the largest |pi - mu|."""
    sampler = copy.deepcopy(model)
    dppo.refresh_sampler(sampler, model, bits)
    examples = task.train[:PROMPTS]
    prompts = [p for p in prompt_ids(tokenizer, [e["question"] for e in examples]) for _ in range(SAMPLES)]
    record = dppo.TopKRecord(K)
    rollout = sample(sampler, prompts, TOKENS, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(0), on_token=record)  # fmt: skip
    rollout.topk_ids, rollout.topk_logprobs = record.tensors()
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    rewards = torch.tensor([dppo.reward(examples[i // SAMPLES], t) for i, t in enumerate(texts)]).view(-1, SAMPLES)
    advantages = dppo.group_advantages(rewards).flatten()
    with torch.no_grad():
        logprobs, extra = dppo.current_policy(model, rollout, dppo.Args(trust_region="topk-tv", top_k=K))
    valid = rollout.completion_mask.bool()
    mu, pi = rollout.sampler_logprobs.exp()[valid], logprobs.exp()[valid]
    bins = [(mu >= low) & (mu < high) for low, high in zip(BINS, BINS[1:])]
    result = {"tokens": [int(b.sum()) for b in bins], "largest": (pi - mu).abs().max().item(), "towards": {}}
    A = advantages[:, None].expand_as(valid)[valid]
    towards = ((A > 0) & (pi < mu)) | ((A < 0) & (pi > mu))  # the update moves pi(token) towards mu(token)
    gap = (pi - mu).abs()  # weighting by |pi - mu|: how far each kept update pulls

    def towards_share(kept):  # (share of kept tokens, share of their |pi - mu|) moved towards mu
        return towards[kept].float().mean().item(), (gap * towards)[kept].sum().item() / gap[kept].sum().item()

    result["towards"]["none (kept: all)"] = towards_share(A != 0)
    for name, region in REGIONS.items():
        D = dppo.token_divergence(region, logprobs, rollout.sampler_logprobs, extra)
        low, high = dppo.thresholds(dppo.Args(trust_region=region))
        past = (D > min(low, high))[valid]
        blocked = (dppo.trust_region_mask(D, logprobs, rollout.sampler_logprobs, advantages, low, high) == 0)[valid]
        kept = ~blocked & (A != 0)
        result["towards"][name] = towards_share(kept)
        result[name] = [(past[b].float().mean().item(), blocked[b].float().mean().item(),
                         (pi - mu).abs()[b & blocked].mean().item() if (b & blocked).any() else float("nan"))
                        for b in bins]  # fmt: skip
    return result


def table(bits: int, result: dict) -> str:
    """One markdown table: per bin of mu, per region `past / blocked (mean |pi - mu| of the blocked)`."""
    lines = [f"\nsampler weights rounded to {bits} bits: {sum(result['tokens'])} tokens, largest |pi - mu|"
             f" {result['largest']:.3f}; per region: past the threshold / blocked (mean |pi - mu| of the blocked)",
             "| mu | tokens | " + " | ".join(REGIONS) + " |", "|---" * (2 + len(REGIONS)) + "|"]  # fmt: skip
    for k, (low, high) in enumerate(zip(BINS, BINS[1:])):
        cells = [f"{past:.1%} / {blocked:.1%} ({change:.3f})" for past, blocked, change in
                 (result[name][k] for name in REGIONS)]  # fmt: skip
        lines.append(f"| {low:g}-{min(high, 1):g} | {result['tokens'][k]} | " + " | ".join(cells) + " |")
    lines.append("kept updates that move pi towards mu, by tokens / by |pi - mu|: "
                 + ", ".join(f"{name} {n:.1%} / {w:.1%}" for name, (n, w) in result["towards"].items()))  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{low:g}-{min(high, 1):g}" for low, high in zip(BINS, BINS[1:])]
    fig, axes = plt.subplots(2, len(results), figsize=(4.4 * len(results), 6.5), sharex=True)
    for column, (bits, result) in enumerate(results.items()):
        for name in REGIONS:
            axes[0, column].plot(labels, [r[1] for r in result[name]], marker="o", label=name)
            axes[1, column].plot(labels, [r[2] for r in result[name]], marker="o", label=name)
        axes[0, column].set(title=f"sampler weights at {bits} bits", ylabel="share of tokens blocked")
        axes[1, column].set(xlabel="mu of the sampled token", ylabel="mean |pi - mu| of the blocked", yscale="log")
        for ax in axes[:, column]:
            ax.legend(fontsize=7, title="one rollout batch, no band", title_fontsize=7)
            ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    torch.manual_seed(0)
    model, tokenizer = load_policy(model_folder("tiny"))
    task = make_chain()
    results = {bits: by_mu_bin(bits, model, tokenizer, task) for bits in BITS}
    for bits, result in results.items():
        print(table(bits, result))
    plot({bits: results[bits] for bits in BITS if bits < 8}, os.path.join(ROOT, "docs", "dppo_mechanism.png"))
