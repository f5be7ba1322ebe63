"""Before and after a run on a real model: held-out accuracy (greedy and one sample at T = 1) under the answer rule
and under --reward strict, the share of completions in the asked answer form (one number after `####`), and a few
completions side by side.

    python -m experiments.real_model_eval runs/sums.jsonl 1 24 smollm2 runs/real/smollm2-sums/checkpoints/step_000056

Arguments: the task (as --task), the run's --seed (a data file is split by it), the completion limit (as
--max-new-tokens), then the models (as --model). Every model sees the same test prompts (the whole test split)
and the same sampling seed.
"""

import os
import sys
from types import SimpleNamespace

import torch

from common.model import load_policy
from common.sampling import rollout_texts
from common.verifier import in_form, is_correct
from common.world import model_folder, task_named


def figures(model, tokenizer, task, max_new_tokens: int) -> tuple[dict, list[str]]:
    questions = [e["question"] for e in task.test]
    result, shown = {}, []
    for mode in ("greedy", "sampled"):
        texts = rollout_texts(model, tokenizer, questions, task.instruction, max_new_tokens, 1.0, mode == "greedy",
                              torch.Generator().manual_seed(0))  # fmt: skip
        for rule, form in (("acc", None), ("strict", task.asked_form)):  # the scripts' reward under each --reward
            right = [is_correct(t, e["answer"], form) for e, t in zip(task.test, texts)]
            result[f"{rule}_{mode}"] = sum(right) / len(texts)
        result[f"form_{mode}"] = sum(in_form(t, task.asked_form) for t in texts) / len(texts)
        if mode == "sampled":
            shown = texts
    return result, shown


def main(task_name: str, seed: str, max_new_tokens: str, *models: str):
    task = task_named(SimpleNamespace(task=task_name, seed=int(seed), question_field="question", answer_field="answer"))
    table, examples = [], []
    for name in models:
        model, tokenizer = load_policy(model_folder(name))
        result, texts = figures(model.eval(), tokenizer, task, int(max_new_tokens))
        table.append((name, result))
        examples.append(texts)
    print(f"{len(task.test)} test prompts of {task.name}, {max_new_tokens} new tokens\n")
    print("| model | greedy acc | sampled acc | greedy strict | sampled strict | greedy in form | sampled in form |")
    print("|---|---|---|---|---|---|---|")
    for name, r in table:
        print(f"| {name} | {r['acc_greedy']:.3f} | {r['acc_sampled']:.3f} | {r['strict_greedy']:.3f} | "
              f"{r['strict_sampled']:.3f} | {r['form_greedy']:.2f} | {r['form_sampled']:.2f} |")  # fmt: skip
    for i in range(4):
        print(f"\n{task.test[i]['question'].splitlines()[0]}  (answer {task.test[i]['answer']})")
        for name, texts in zip(models, examples):
            print(f"  {os.path.basename(name)}: {texts[i]!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
