"""Chunked, checkpointed `token_logprobs` against a plain full-logits computation.

`token_logprobs` runs the backbone once, then forms the logits for a chunk of completion positions at a
time and recomputes them in the backward pass. Neither may change the result: the values and the
gradient of every parameter must equal those of model(...).logits over the whole sequence, log_softmax
at temperature T, gathered at the completion tokens and masked.
"""

import pytest
import torch
import torch.nn.functional as F

from common.model import load_policy
from common.sampling import positions, sample, token_logprobs

TEMPERATURE = 0.7
N, L = 3, 7  # sequences x completion tokens; the chunks below are smaller than N * L = 21


@pytest.fixture(scope="module")
def policy(random_model_dir):
    return load_policy(random_model_dir)  # float32, eval mode


@pytest.fixture(scope="module")
def rollout(policy):
    """Three prompts of different lengths (so the left padding differs per row), 7 sampled tokens each;
    the middle row is then cut after its 4th token as if it had sampled EOS there (pad tokens after it,
    masked out of attention and of the completion), so the completion mask holds zeros."""
    model, tok = policy
    prompts = [tok(q)["input_ids"] for q in ["7", "What is 1+2?\n", "What is 12+7-5+3?\n"]]
    assert len({len(p) for p in prompts}) == 3
    g = torch.Generator().manual_seed(0)
    r = sample(model, prompts, L, TEMPERATURE, eos_id=-1, pad_id=tok.pad_token_id, generator=g)  # no EOS: 7 tokens
    assert r.completion_ids.shape == (N, L) and (r.attention_mask[:, 0] == 0).sum() == 2
    P = r.prompt_len
    r.input_ids[1, P + 4 :] = tok.pad_token_id
    r.attention_mask[1, P + 4 :] = 0
    r.completion_mask[1, 4:] = 0
    return r


def plain_logprobs(model, r, temperature):
    """The straightforward computation: all logits of the sequence at once, no chunks, no checkpointing.
    Position ids are the same as token_logprobs uses (first real token at 0), so the two differ only in
    how the work is split."""
    logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask,
                   position_ids=positions(r.attention_mask)).logits  # fmt: skip
    logp = F.log_softmax(logits[:, r.prompt_len - 1 : -1].float() / temperature, -1)
    return logp.gather(-1, r.completion_ids[..., None]).squeeze(-1) * r.completion_mask


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_checkpointed_logprobs_match_plain_values_and_gradients(policy, rollout, chunk):
    """Same log-probs and the same gradient of sum(logp * w) (fixed random weights w) for every parameter,
    at T = 0.7, with chunks of 1 and of 5 positions (21 is not a multiple of 5, so the last chunk is short)
    and with a single chunk; masked positions are exactly 0. Without gradients (no checkpointing) the
    values are the same too."""
    model, _ = policy
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    w = torch.randn(N, L, generator=torch.Generator().manual_seed(1))

    want = plain_logprobs(model, rollout, TEMPERATURE)
    want_grads = torch.autograd.grad((want * w).sum(), params)
    got = token_logprobs(model, rollout, TEMPERATURE, chunk=chunk)
    got_grads = torch.autograd.grad((got * w).sum(), params)

    assert got.shape == (N, L) and (got[rollout.completion_mask == 0] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(got_grads) == len(params) > 0
    for name, g_got, g_want in zip(names, got_grads, want_grads):
        assert g_want.abs().max() > 0, name  # every parameter takes part, so each comparison means something
        scale = g_want.abs().max().item()
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(model, rollout, TEMPERATURE, chunk=chunk), got, rtol=1e-6, atol=0)


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_on_logits_sees_every_completion_position_once_with_raw_logits(policy, rollout, chunk):
    """`on_logits(start, logits)` is called with consecutive, non-overlapping chunks covering the N * L flat
    completion positions exactly once (masked ones included), in order; the logits are the model's raw ones
    at those positions (before the temperature) and carry no gradient, even while the log-probs do."""
    model, _ = policy
    seen = []
    token_logprobs(model, rollout, TEMPERATURE, chunk=chunk,
                   on_logits=lambda start, logits: seen.append((start, logits)))  # fmt: skip

    counts = torch.zeros(N * L, dtype=torch.long)
    for start, logits in seen:
        assert not logits.requires_grad and logits.dtype == next(model.parameters()).dtype
        counts[start : start + logits.shape[0]] += 1
    assert (counts == 1).all()
    assert [s for s, _ in seen] == list(range(0, N * L, chunk))
    with torch.no_grad():
        full = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                     position_ids=positions(rollout.attention_mask)).logits  # fmt: skip
    want = full[:, rollout.prompt_len - 1 : -1].reshape(N * L, -1)
    torch.testing.assert_close(torch.cat([x for _, x in seen]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_entropy_matches_the_full_distribution_and_leaves_logprobs_unchanged(policy, rollout, chunk):
    """`entropy=True` returns (log-probs, entropy): the log-probs (and their gradient) as without it, and the
    entropy of the tempered distribution at each completion position, without gradient, 0 where masked."""
    model, _ = policy
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    w = torch.randn(N, L, generator=torch.Generator().manual_seed(2))
    plain = token_logprobs(model, rollout, TEMPERATURE, chunk=chunk)
    plain_grads = torch.autograd.grad((plain * w).sum(), params)
    logprobs, entropy = token_logprobs(model, rollout, TEMPERATURE, chunk=chunk, entropy=True)
    grads = torch.autograd.grad((logprobs * w).sum(), params)
    torch.testing.assert_close(logprobs, plain, rtol=1e-6, atol=0)
    for name, g, g_plain in zip(names, grads, plain_grads):
        torch.testing.assert_close(g, g_plain, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    assert entropy.shape == (N, L) and not entropy.requires_grad
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                       position_ids=positions(rollout.attention_mask)).logits  # fmt: skip
        logp = F.log_softmax(logits[:, rollout.prompt_len - 1 : -1].float() / TEMPERATURE, -1)
        want = -(logp.exp() * logp).sum(-1) * rollout.completion_mask
    torch.testing.assert_close(entropy, want, rtol=1e-5, atol=1e-5)
    assert (entropy[rollout.completion_mask == 0] == 0).all() and (entropy[rollout.completion_mask == 1] > 0).all()


def test_a_completion_is_truncated_exactly_when_it_has_no_eos(coin_model_dir):
    """The coin model writes `1` or stops at every position, each with probability 1/2: in 3 positions a row is cut
    with probability 1/8, so of 256 rows some end and some are cut (none cut: p = (7/8)^256 < 1e-14). Truncated
    means no EOS among the completion's tokens, and then the whole length is kept."""
    model, tokenizer = load_policy(coin_model_dir)
    prompts = [tokenizer("What is 1-0?\n")["input_ids"]] * 256
    rollout = sample(model, prompts, 3, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    last = rollout.completion_mask.sum(1) - 1  # a completion's mask ends with its EOS, if it has one
    ended = rollout.completion_ids[torch.arange(256), last] == tokenizer.eos_token_id
    assert torch.equal(rollout.truncated, ~ended) and 0 < rollout.truncated.sum() < 256
    assert (rollout.completion_mask[rollout.truncated] == 1).all()
    assert torch.equal(rollout.select(torch.tensor([0, 5])).truncated, rollout.truncated[[0, 5]])
