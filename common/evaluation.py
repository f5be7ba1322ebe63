"""Held-out evaluation: accuracy as the verifier judges it (under the run's reward form), the script's reward
beside it, per skill, the share in the task's asked form, the unfaithful share of the right answers; its line."""

from common.sampling import rollout_texts, unfaithful
from common.torchrun import all_reduce
from common.verifier import in_form, is_correct


def held_out_metrics(model, tokenizer, task, reward, form, n_prompts, max_new_tokens, temperature, generator,
                     rank=0, world=1, samples=1) -> dict:  # fmt: skip
    """`eval/acc_greedy` and `eval/acc_sampled` (`samples` per prompt): the share of the first `n_prompts` test
    prompts that the verifier judges right (under the run's reward `form`), sharded over ranks; the same per skill.
    Beside them, whatever the reward pays: the mean of the script's `reward` (`eval/reward_*`), the share written in
    the task's asked form (`eval/format_frac_*`) and, where the task checks steps, the unfaithful share of the
    right answers (`eval/unfaithful_*`)."""
    skills = sorted({e["skill"] for e in task.test[:n_prompts] if "skill" in e})  # the same on every rank
    metrics = {}
    for mode in ("greedy", "sampled"):
        repeats = samples if mode == "sampled" else 1  # greedy decoding gives the same answer every time
        examples = [e for e in task.test[:n_prompts] for _ in range(repeats)][rank::world]
        texts = rollout_texts(model, tokenizer, [e["question"] for e in examples], task.instruction, max_new_tokens,
                              temperature, mode == "greedy", generator)  # fmt: skip
        correct = [is_correct(t, e["answer"], form) for e, t in zip(examples, texts)]  # the verifier's verdict
        rewards = [reward(e, t, form) for e, t in zip(examples, texts)]  # the script's reward, as in training
        steps_wrong, formed = unfaithful(task, examples, texts, correct), [in_form(t, task.asked_form) for t in texts]
        sums = []
        for skill in [None, *skills]:
            rows = [i for i, e in enumerate(examples) if skill is None or e.get("skill") == skill]
            sums += [sum(correct[i] for i in rows), sum(rewards[i] for i in rows), sum(steps_wrong[i] for i in rows),
                     sum(formed[i] for i in rows), len(rows)]  # fmt: skip
        sums = all_reduce(sums)
        for j, skill in enumerate([None, *skills]):
            right, total_reward, unfaithful_count, in_form_count, total = sums[5 * j : 5 * j + 5]
            metrics[f"eval/acc_{mode}" + (f"/{skill}" if skill else "")] = right / max(1, total)
            if skill is None:
                metrics[f"eval/reward_{mode}"] = total_reward / max(1, total)
            if task.asked_form and skill is None:
                metrics[f"eval/format_frac_{mode}"] = in_form_count / max(1, total)
            if task.faithful and skill is None:
                metrics[f"eval/unfaithful_{mode}"] = unfaithful_count / max(1, right)
    return metrics


def eval_line(step: int, metrics: dict) -> str:
    """The console line of an evaluation: overall figures (the reward only where it differs from the accuracy), the
    asked form's share, accuracy per skill, a target's."""

    def figures(prefix: str) -> str:
        own = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix) and "/" not in k[len(prefix) :]}
        return " ".join(f"{k} {v:.3f}" for k, v in own.items() if "format" not in k
                        and not (k.startswith("reward_") and v == own.get("acc_" + k[7:])))  # fmt: skip

    form = " ".join(f"{k[17:]} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/format_frac_"))
    skills = " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in metrics.items() if k.startswith("eval/acc_sampled/"))
    target = figures("eval_target/")
    return (f"step {step:4d} | eval {figures('eval/')}" + (f" | in the asked form: {form}" if form else "")
            + (f" | sampled by skill: {skills}" if skills else "") + (f" | target {target}" if target else ""))
