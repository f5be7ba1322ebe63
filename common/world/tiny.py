"""The `tiny` model: a small Qwen2-architecture causal LM with a byte-level BPE tokenizer, both made here, then
warmed up with a short supervised run on `chain` solutions from a deliberately flawed teacher:
- it meets the skills in other shares than the pool has them (the rare skill `words` barely at all);
- most of its solutions *slip* out of habit: one step's result is written one too high but the chain goes
  on from the true value, so the answer is right and only the steps are unfaithful (the outcome reward
  cannot see it);
- a few carry a wrong result to a wrong answer, some misread an operand, and over half of its `times`
  solutions read the opening a*b as a+b, a misconception the outcome reward does see and can correct.
So the base model starts well below its ceiling, greedy decoding included, differs widely by skill, and
writes unfaithful chains that still earn full reward.
"""

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from common.errors import fail
from common.world.chain import (
    SKILLS,
    carried_solution,
    make_chain,
    misread_solution,
    plus_for_times_solution,
    slipped_solution,
)

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines the tiny model; the shipped model records the settings it was built with."""

    vocab_size: int = 320
    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    sft_steps: int = 1200
    sft_batch: int = 64
    sft_lr: float = 3e-3
    # Share of each skill in the warm-up data: the rare skill `words` is nearly absent (1.5%), so the base
    # model is weak on it but not blind to it; `times` is under-represented and often misread (below).
    warmup_shares: tuple = (("short", 0.33), ("long", 0.45), ("times", 0.205), ("words", 0.015))
    slip_fraction: float = 0.7  # one step result written one too high, the chain goes on from the true value
    carry_fraction: float = 0.02  # one wrong step result carried through to a wrong answer
    misread_fraction: float = 0.2  # one operand misread, every step consistent with it: a wrong answer
    plus_for_times: float = 0.55  # share of `times` solutions that read the opening a*b as a+b (a misconception)
    seed: int = 0
    recipe: int = 7  # bump when the warm-up data or training code changes, so old caches are not reused


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_model")
MANIFEST = "tiny_spec.json"  # the settings and warm-up data it was built from, and its weights' checksum
REBUILD = "python -m common.world.tiny"


def data_fingerprint(spec: TinySpec = TinySpec()) -> str:
    """sha1 of the warm-up texts: it changes when the settings or the `chain` task change."""
    return hashlib.sha1(json.dumps(warmup_texts(spec)).encode()).hexdigest()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shipped_model(folder: str | None = None) -> str:
    """The tiny model shipped in the repository (so every machine starts from the same one), or a one-line error
    that says how to rebuild it when it is missing or damaged."""
    folder = folder or SHIPPED
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            weights = json.load(f)["weights_sha256"]
        damaged = file_sha256(os.path.join(folder, "model.safetensors")) != weights
    except (OSError, ValueError, KeyError) as e:
        damaged = f"{type(e).__name__}: {e}"
    if damaged:
        why = damaged if isinstance(damaged, str) else "model.safetensors does not match its checksum"
        fail(f"--model tiny: the model in {folder} is missing or damaged ({why}); rebuild it with {REBUILD}"
             " (about 2-3 minutes on 2 cores), or restore it with git checkout")  # fmt: skip
    return folder


def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (round-trips any text, spaces included) with digits kept as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its progress bars print blank lines when the output is not a terminal
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def tiny_config(tokenizer, spec: TinySpec) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=4 * spec.hidden_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def random_model(tokenizer, spec: TinySpec = TinySpec()):
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(tiny_config(tokenizer, spec))


def warmup_texts(spec: TinySpec):
    """(prompt, completion) pairs from the chain train split, drawn by the spec's skill shares, with its
    shares of flawed solutions: slipped (unfaithful, right answer), carried and misread (wrong answers),
    and for `times` the plus-for-times misconception."""
    rng = random.Random(spec.seed)
    train = make_chain().train
    by_skill = {name: [e for e in train if e["skill"] == name] for name in SKILLS}
    names, shares = zip(*spec.warmup_shares)
    pairs = []
    for name in rng.choices(names, weights=shares, k=len(train)):
        ex = rng.choice(by_skill[name])
        u = rng.random()
        if ex["skill"] == "times" and rng.random() < spec.plus_for_times:
            solution = plus_for_times_solution(ex)
        elif u < spec.slip_fraction:
            solution = slipped_solution(ex, rng)
        elif u < spec.slip_fraction + spec.carry_fraction:
            solution = carried_solution(ex, rng)
        elif u < spec.slip_fraction + spec.carry_fraction + spec.misread_fraction:
            solution = misread_solution(ex, rng)
        else:
            solution = ex["solution"]
        pairs.append((ex["question"] + "\n", solution + EOS))
    return pairs


def supervised_warmup(model, tokenizer, pairs, spec: TinySpec, log=print):
    """Next-token loss on completion tokens only, AdamW with cosine decay."""
    g = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    encoded = [(tokenizer(p)["input_ids"], tokenizer(c)["input_ids"]) for p, c in pairs]
    model.train()
    for step in range(spec.sft_steps):
        idx = torch.randint(len(encoded), (spec.sft_batch,), generator=g).tolist()
        seqs = [encoded[i][0] + encoded[i][1] for i in idx]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        labels, attention = torch.full_like(ids, -100), torch.zeros_like(ids)
        for row, i in enumerate(idx):
            p, c = encoded[i]
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            labels[row, len(p) : len(p) + len(c)] = torch.tensor(c)  # loss on the completion only
            attention[row, : len(p) + len(c)] = 1
        for group in opt.param_groups:
            group["lr"] = spec.sft_lr * 0.5 * (1 + math.cos(math.pi * step / spec.sft_steps))
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == spec.sft_steps - 1:
            log(f"  warm-up step {step:4d}/{spec.sft_steps}  loss {loss.item():.3f}")
    model.eval()


def build_tiny(folder: str, spec: TinySpec = TinySpec(), log=print):
    """Tokenizer + random Qwen2 + supervised warm-up, saved with save_pretrained into `folder`."""
    start = time.time()
    torch.manual_seed(spec.seed)
    pairs = warmup_texts(spec)
    tokenizer = train_tokenizer((p + c for p, c in pairs), spec.vocab_size)
    model = random_model(tokenizer, spec)
    log(f"building the tiny model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) in {folder}")
    supervised_warmup(model, tokenizer, pairs, spec, log)
    tmp = folder + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    manifest = {"spec": asdict(spec), "warmup_sha1": data_fingerprint(spec),
                "weights_sha256": file_sha256(os.path.join(tmp, "model.safetensors"))}  # fmt: skip
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    replace_folder(tmp, folder)
    log(f"tiny model built in {time.time() - start:.0f}s")


def replace_folder(new: str, folder: str):
    """`new` renamed to `folder`; an old `folder` is moved aside first and then removed, so a reader finds the
    old model or a new one, never half of one, however many builds run at once."""
    old = folder + f".old{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):  # none yet, or another build moved it aside first
        os.replace(folder, old)
    try:
        os.replace(new, folder)
    except OSError:  # another build put its model there in between: keep that one, it is as good
        shutil.rmtree(new)
    shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":  # python -m common.world.tiny [FOLDER]: rebuild the shipped model (or build elsewhere)
    build_tiny(sys.argv[1] if len(sys.argv) > 1 else SHIPPED)
