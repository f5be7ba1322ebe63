"""Sampling: the step's prompts, batched sampling with a KV cache that records the sampler's log-probs (mu),
and the token log-probs (and entropy) every loss is built on."""

import hashlib
import inspect
from collections import namedtuple
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recomputed  # activations recomputed in the backward pass

from common.model import prompt_text
from common.torchrun import gathered
from common.verifier import in_form, is_correct

LOGITS_PER_CHUNK = 2**24  # logits of one chunk of positions: 64 MB in fp32, whatever the vocabulary


def seeded_generator(*keys, device="cpu") -> torch.Generator:
    """A torch generator of its own for each random stream of a run, seeded by its keys, e.g.
    (seed, "sample", step, rank): streams never share draws, and a resumed run draws what it would have."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def prompt_ids(tokenizer, questions, instruction: str = "") -> list[list[int]]:
    """Token ids of each question as the model sees it (chat template for instruct models)."""
    return [tokenizer(prompt_text(tokenizer, q, instruction))["input_ids"] for q in questions]


def draw_prompts(task, tokenizer, seed: int, step: int, batch_prompts: int, rank: int, world: int, pool=None):
    """The step's prompts: the same draw of `batch_prompts` from `pool` (default: the train split) on every
    rank, with replacement, each rank taking its slice. Returns this rank's examples and their token ids."""
    pool = task.train if pool is None else pool
    draw = torch.randint(len(pool), (batch_prompts,), generator=seeded_generator(seed, "prompts", step))
    B = batch_prompts // world
    examples = [pool[i] for i in draw[rank * B : (rank + 1) * B].tolist()]
    return examples, prompt_ids(tokenizer, [e["question"] for e in examples], task.instruction)


@dataclass
class Rollout:
    """N sequences = left-padded prompt [N, P] followed by the completion [N, L]. `sampler_logprobs` is log mu of
    each token, mu the distribution actually sampled from (logits / T), recorded while sampling (pi_old of a ratio
    where no script recomputes it). `topk_*` [N, L, K]: mu's most likely tokens, where a script records them."""

    input_ids: torch.Tensor  # [N, P + L]
    attention_mask: torch.Tensor  # [N, P + L]
    completion_mask: torch.Tensor  # [N, L] 1 up to and including the first EOS
    sampler_logprobs: torch.Tensor  # [N, L] fp32
    prompt_len: int
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    truncated: torch.Tensor | None = None  # [N] bool: cut at max_new_tokens before its EOS

    @property
    def completion_ids(self):
        return self.input_ids[:, self.prompt_len :]

    def without_truncated(self) -> "Rollout":
        """The completions cut at max_new_tokens masked out of the loss; the sequences stay (attention unchanged)."""
        return replace(self, completion_mask=self.completion_mask * ~self.truncated[:, None])

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The sub-batch of the given rows (e.g. the sequences a down-sampling rule keeps)."""
        pick = lambda x: x[rows] if torch.is_tensor(x) else x  # every tensor field; prompt_len and None stay
        return Rollout(*(pick(getattr(self, field.name)) for field in fields(self)))


def left_pad(prompts: list[list[int]], pad_id: int):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def positions(attention_mask):
    """Position ids that start at 0 on the first real token of each left-padded row."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(model, prompts, max_new_tokens, temperature=1.0, eos_id=0, pad_id=0, greedy=False, generator=None,
           on_token=None) -> Rollout:  # fmt: skip
    """Sample one completion per prompt (token id lists): a prefill, then one forward pass per token with the KV
    cache; a row stops at its first EOS. `on_token(logp, token)`, if given, sees each position's log-probability
    rows [N, V] and the tokens drawn (pad where a row has ended): a script records there what it needs beyond
    the sampled token. A sharded model's weights are gathered once for the whole generation."""
    device = next(model.parameters()).device
    ids, mask = (x.to(device) for x in left_pad(prompts, pad_id))
    prompt_mask, tokens, logps, alive = mask, [], [], []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5
    with gathered(model):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True, logits_to_keep=1)
        for t in range(max_new_tokens):
            logp = F.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)
            token = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            alive.append(~done)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            logps.append(logp.gather(-1, token[:, None]).squeeze(-1))
            if on_token is not None:
                on_token(logp, token)
            tokens.append(token)
            done = done | (token == eos_id)
            if done.all() or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions(mask)[:, -1:],
                        use_cache=True, **{cache: out[cache]})  # fmt: skip
    completion, completion_mask = torch.stack(tokens, 1), torch.stack(alive, 1).long()
    return Rollout(torch.cat([ids, completion], 1), torch.cat([prompt_mask, completion_mask], 1), completion_mask,
                   torch.stack(logps, 1) * completion_mask, ids.shape[1], truncated=~done)  # fmt: skip


def chunk_logprobs(lm_head, hidden, targets, temperature, entropy: bool):
    """One chunk's token log-probs and (with `entropy`, no gradient) each position's entropy at the temperature."""
    logits = lm_head(hidden).float() / temperature
    logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
    if not entropy:
        return logprobs, None
    with torch.no_grad():
        logp = F.log_softmax(logits, dim=-1)
        return logprobs, -(logp.exp() * logp).sum(-1)


def chunk_positions(vocab_size: int) -> int:
    """Completion positions per chunk of token_logprobs: 4096, fewer where the vocabulary is large (about 110
    at Qwen's 151,669 tokens), so that a chunk's logits stay near LOGITS_PER_CHUNK values."""
    return max(1, min(4096, LOGITS_PER_CHUNK // vocab_size))


def token_logprobs(model, rollout: Rollout, temperature=1.0, chunk=0, on_logits=None, entropy=False):
    """log pi(completion token) [N, L] under `model` (differentiable), for every loss in the project; with
    `entropy`, (logprobs, the entropy of pi at each completion position [N, L], at the temperature, no gradient).
    Memory-lean: the backbone runs once; the [tokens, vocabulary] logits exist for one chunk of completion
    positions at a time (`chunk_positions(V)` unless `chunk` is given) and are recomputed in the backward pass,
    so a 152k vocabulary costs O(chunk x V), not O(N x L x V). `on_logits(start, logits)`, if given, sees each
    chunk's raw logits (model dtype, no gradient) for the flat completion positions start, start + 1, ..."""
    # The model's own forward (a sharded model gathers its weights there), the backbone's output kept by a hook:
    kept = []
    hook = model.base_model.register_forward_hook(lambda module, args, out: kept.append(out.last_hidden_state))
    try:
        model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
              position_ids=positions(rollout.attention_mask), logits_to_keep=1)  # fmt: skip
    finally:
        hook.remove()
    hidden = kept[0][:, rollout.prompt_len - 1 : -1]  # the state before each completion token predicts it
    targets = rollout.completion_ids
    lm_head = model.get_output_embeddings()
    chunk = chunk or chunk_positions(lm_head.weight.shape[0])
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    parts, entropies = [], []
    for s in range(0, flat_t.numel(), chunk):
        h, tg = flat_h[s : s + chunk], flat_t[s : s + chunk]
        if on_logits is not None:  # one extra no-grad lm_head product per chunk, only for callers that ask
            with torch.no_grad():
                on_logits(s, lm_head(h))
        if torch.is_grad_enabled():
            part, H = recomputed(chunk_logprobs, lm_head, h, tg, temperature, entropy, use_reentrant=False)
        else:
            part, H = chunk_logprobs(lm_head, h, tg, temperature, entropy)
        parts.append(part)
        entropies.append(H)
    logprobs = torch.cat(parts).view_as(targets) * rollout.completion_mask
    return (logprobs, torch.cat(entropies).view_as(targets) * rollout.completion_mask) if entropy else logprobs


# A step's completions, scored: `examples` one per prompt, `texts` n per prompt side by side, and three values per
# completion [prompts, n] kept apart: `rewards` (what the script's `reward` returned), `shaped` (the reward plus
# `shaping`: the training signal, which advantages read) and `correct` (the verifier's verdict: every accuracy's).
Scored = namedtuple("Scored", "examples texts rewards shaped correct")


def verdicts(examples: list, texts: list[str], form: str | None) -> torch.Tensor:
    """[prompts, n]: whether the verifier judges each completion right (in `form`, the run's reward form, if given)."""
    n = len(texts) // max(1, len(examples))
    return torch.tensor([is_correct(t, examples[i // n]["answer"], form) for i, t in enumerate(texts)]).view(-1, n)


def unfaithful(task, examples, texts, correct) -> list[bool]:
    """Per completion: right, though its written steps are not its question's (where the task checks steps)."""
    n = len(texts) // max(1, len(examples))
    return [bool(task.faithful and right and not task.faithful(examples[i // n]["question"], t))
            for i, (t, right) in enumerate(zip(texts, correct))]  # fmt: skip


def shaping(examples: list, texts: list[str], task, args) -> torch.Tensor:
    """What training adds to the script's reward per completion (`examples` one per prompt, `texts` n per prompt side by
    side); 0 by default, unseen by evaluation. --format-bonus: for one number in the asked form, right or wrong (R1's
    format reward; --bonus-needs-right: only in a group holding a right answer, in any form). --answer-credit: for a
    right answer outside that form, which --reward strict pays nothing."""
    right, right_in_form = verdicts(examples, texts, None), verdicts(examples, texts, task.asked_form)
    bonus = torch.tensor([in_form(t, task.asked_form) for t in texts]).view_as(right)
    if args.bonus_needs_right:
        bonus &= right.any(1, keepdim=True)
    return (args.format_bonus * bonus + args.answer_credit * (right & ~right_in_form)).flatten().float()


def frac_zero_std(rewards: torch.Tensor) -> float:
    """Share of groups (rows) whose rewards are all equal: their group advantages are 0, no learning signal."""
    return (rewards.max(1).values == rewards.min(1).values).float().mean().item()


def rollout_metrics(task, scored: Scored, rollout: Rollout) -> dict:
    """The metrics of a step's rollouts that mean the same in every script."""
    correct = scored.correct.flatten().tolist()
    sampled = rollout.attention_mask[:, rollout.prompt_len :]  # every sampled token, masked from the loss or not
    return {
        "reward/mean": scored.rewards.float().mean().item(),  # what the script's reward returned
        "reward/shaped_mean": scored.shaped.float().mean().item(),  # what training read
        "reward/zero_std_frac": frac_zero_std(scored.shaped),
        "train/acc": sum(correct) / len(correct),
        **({"reward/format_frac": sum(in_form(t, task.asked_form) for t in scored.texts) / len(scored.texts)}
           if task.asked_form else {}),  # fmt: skip
        "train/completion_len": sampled.sum(1).float().mean().item(),
        "train/gen_tokens": sampled.sum().item(),
        "train/truncated_frac": rollout.truncated.float().mean().item(),  # cut at --max-new-tokens before an EOS
        **({"train/unfaithful": sum(unfaithful(task, scored.examples, scored.texts, correct)) / max(1, sum(correct))}
           if task.faithful else {}),  # fmt: skip
    }


def rollout_texts(model, tokenizer, questions, instruction, max_new_tokens, temperature, greedy, generator,
                  chunk=256) -> list[str]:  # fmt: skip
    """One completion (text) per question, sampled (or greedy) in chunks."""
    texts = []
    for s in range(0, len(questions), chunk):
        r = sample(model, prompt_ids(tokenizer, questions[s : s + chunk], instruction), max_new_tokens, temperature,
                   tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=greedy, generator=generator)  # fmt: skip
        texts += tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
    return texts
