"""Peer figures on SmolLM2-135M-Instruct (`--model smollm2`): the project's sampler against transformers'
`model.generate`, and the update (token log-probs, forward and backward), in fp32 and bf16. With --updates: one
whole update (with AdamW's step) of all parameters, of the top 8 layers and of LoRA adapters.

    OMP_NUM_THREADS=1 python -m experiments.real_model_bench [--tokens 32] [--batches 16 64]
    OMP_NUM_THREADS=1 python -m experiments.real_model_bench --updates [--tokens 24] [--batches 32]

Sampler: greedy decoding of `chain` test questions through the chat template, both sides from the same
prompts, stopping at the turn's end; tokens/s counts generated tokens (up to and including the end), and
`same` is the share of rows whose tokens are identical. Update: token_logprobs(...).sum().backward() on those
completions, all parameters and the top 8 of 30 layers (as the learning run in docs/real-models.md trains);
peak is the rise of the process's resident memory (Linux) during the step. Numbers depend on the machine
and on what else runs on it; compare the ratios.
"""

import argparse
import ctypes
import time

import torch

from common.lora import add_lora
from common.model import load_policy, resolve_model, trainable_parameters
from common.sampling import left_pad, prompt_ids, sample, token_logprobs
from common.world.chain import make_chain

TOP_LAYERS = r"layers\.2[2-9]\.|^model\.norm"
# What one update trains: (name, --train-params, LoRA rank, --lora-modules) as the scripts take them.
UPDATES = [("all parameters", "", 0, ""), ("top 8 layers", TOP_LAYERS, 0, ""),
           ("LoRA r=16, every layer", "", 16, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
           ("LoRA r=16, top 8 layers", "", 16, r".*layers\.2[2-9]\..*_proj")]  # fmt: skip


def resident_peak(work) -> tuple[float, int]:
    """(seconds, bytes): how long `work()` takes and how far the resident memory rises above where it started."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand memory freed by earlier steps back, or it hides this one's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the high-water mark
    except OSError:
        pass
    status = lambda key: int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])
    start, t = status("VmRSS:"), time.perf_counter()
    work()
    return time.perf_counter() - t, (status("VmHWM:") - start) * 1024


def bench_sampler(model, tokenizer, prompts, tokens):
    rollout = {}
    seconds, _ = resident_peak(lambda: rollout.setdefault("r", sample(
        model, prompts, tokens, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)))  # fmt: skip
    ours = rollout["r"]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    generated = {}
    with torch.no_grad():
        hf_seconds, _ = resident_peak(lambda: generated.setdefault("g", model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)))  # fmt: skip
    theirs = generated["g"][:, ids.shape[1] :]
    same = 0
    for row, (ours_row, keep) in enumerate(zip(ours.completion_ids, ours.completion_mask)):
        a = ours_row[keep.bool()].tolist()
        b = theirs[row].tolist()
        b = b[: b.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in b else b
        same += a == b
    generated_tokens = int(ours.completion_mask.sum())
    hf_tokens = sum(min(len(r), (r.index(tokenizer.eos_token_id) + 1) if tokenizer.eos_token_id in r else len(r))
                    for r in theirs.tolist())  # fmt: skip
    return ours, generated_tokens / seconds, hf_tokens / hf_seconds, same / len(prompts)


def bench_update(model, rollout, pattern):
    trainable_parameters(model, pattern)
    model.train()
    seconds, peak = resident_peak(lambda: token_logprobs(model, rollout).sum().backward())
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return int(rollout.completion_mask.sum()) / seconds, peak


def one_update(folder, rollout, pattern, rank, modules) -> tuple[int, float, int]:
    """(trained parameters, seconds, resident memory rise) of one update on a freshly loaded model: token log-probs,
    backward, and AdamW's step (whose first step makes its state, as every step of a run holds it)."""
    model = load_policy(folder)[0]
    if rank:
        add_lora(model, rank, 2.0 * rank, modules)
    params = trainable_parameters(model, pattern)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def update():
        token_logprobs(model, rollout).sum().backward()
        optimizer.step()

    seconds, peak = resident_peak(update)
    return sum(p.numel() for p in params), seconds, peak


def updates_table(a, folder):
    model, tokenizer = load_policy(folder)
    questions = [e["question"] for e in make_chain().test]
    print(f"threads {torch.get_num_threads()}, {a.tokens} new tokens, sampled at T = 1, fp32\n")
    print("| batch | trains | parameters | s per update | tok/s | peak |\n|---|---|---|---|---|---|")
    for batch in a.batches:
        prompts = prompt_ids(tokenizer, questions[:batch], make_chain().instruction)
        rollout = sample(model, prompts, a.tokens, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
        rollout.completion_mask[:] = 1  # the update sees every position, as a run whose rows all run long
        for name, pattern, rank, modules in UPDATES:
            one_update(folder, rollout, pattern, rank, modules)  # a first update pays one-time set-up costs
            count, seconds, peak = one_update(folder, rollout, pattern, rank, modules)
            tokens = int(rollout.completion_mask.sum())
            print(f"| {batch} | {name} | {count / 1e6:.2f}M | {seconds:.2f} | {tokens / seconds:.0f}"
                  f" | {peak / 2**20:.0f} MiB |", flush=True)  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--bf16-batches", type=int, nargs="+", default=[16])
    parser.add_argument("--updates", action="store_true", help="one whole update: all, top 8 layers, LoRA")
    a = parser.parse_args()
    folder = resolve_model("smollm2")
    if a.updates:
        return updates_table(a, folder)
    questions = [e["question"] for e in make_chain().test]
    print(f"threads {torch.get_num_threads()}, {a.tokens} new tokens, greedy, chain test questions\n")
    print("| dtype | batch | sampler tok/s | generate tok/s | ratio | same tokens | update tok/s (all) | peak (all) "
          "| update tok/s (top 8 layers) | peak (top 8) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype, batches in (("float32", a.batches), ("bfloat16", a.bf16_batches)):
        model, tokenizer = load_policy(folder, getattr(torch, dtype))
        model.eval()
        sample(model, prompt_ids(tokenizer, questions[:2]), 4)  # one-time set-up costs stay out of the timings
        for batch in batches:
            prompts = prompt_ids(tokenizer, questions[:batch], make_chain().instruction)
            rollout, ours, theirs, same = bench_sampler(model, tokenizer, prompts, a.tokens)
            rollout.completion_mask[:] = 1  # the update sees every position, as a run whose rows all run long
            full, full_peak = bench_update(model, rollout, "")
            top, top_peak = bench_update(model, rollout, TOP_LAYERS)
            print(f"| {dtype} | {batch} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} | {same:.2f} | {full:.0f} "
                  f"| {full_peak / 2**20:.0f} MiB | {top:.0f} | {top_peak / 2**20:.0f} MiB |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
