"""Held-out evaluation shared by every script: greedy and sampled accuracy, unfaithful rate (`chain`)."""

from common.model import prompt_text
from common.reward import count_correct_unfaithful, score
from common.rollout import sample
from common.run import all_reduce_sum


def rollout_texts(model, tokenizer, questions, instruction, max_new_tokens, temperature, greedy, generator,
                  chunk=256):  # fmt: skip
    """Completions (text) and generated-token count for a list of questions, sampled in chunks."""
    texts, tokens = [], 0
    for s in range(0, len(questions), chunk):
        prompts = [tokenizer(prompt_text(tokenizer, q, instruction))["input_ids"] for q in questions[s : s + chunk]]
        r = sample(model, prompts, max_new_tokens, temperature, tokenizer.eos_token_id, tokenizer.pad_token_id,
                   greedy=greedy, generator=generator)  # fmt: skip
        texts += tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
        tokens += int(r.completion_mask.sum())
    return texts, tokens


def evaluate(model, tokenizer, task, n_prompts, max_new_tokens, temperature, rank, world, generator) -> dict:
    """`eval/acc_greedy` and `eval/acc_sampled` (one sample at `temperature`) on the first `n_prompts` test
    prompts, sharded over ranks, and for `chain` the unfaithful share of the correct answers."""
    examples = task.test[:n_prompts][rank::world]
    metrics = {}
    for mode in ("greedy", "sampled"):
        questions = [e["question"] for e in examples]
        texts, _ = rollout_texts(model, tokenizer, questions, task.instruction, max_new_tokens, temperature,
                                 mode == "greedy", generator)  # fmt: skip
        scores = [score(task.name, e, t) for e, t in zip(examples, texts)]
        correct, unfaithful, total = all_reduce_sum([*count_correct_unfaithful(scores), len(scores)])
        metrics[f"eval/acc_{mode}"] = correct / max(1, total)
        if task.name == "chain":
            metrics[f"eval/unfaithful_{mode}"] = unfaithful / max(1, correct)
    return metrics
