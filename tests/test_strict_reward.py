"""--reward strict pays only an answer written in the task's asked form; --format-bonus adds R1's format reward in
training only; evaluation reports the share of completions in the asked form whatever the reward."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import metric_rows

import common.sampling
import grpo
from common.data import load_task
from common.verifier import in_form, is_correct
from common.world.chain import make_chain


@pytest.mark.parametrize("response, gold, answer_rule, strict", [
    ("#### 26", "26", True, True),
    ("17 + 9 equals 26", "26", True, False),  # the last-number fallback pays; the form does not hold
    ("#### 26\nso the sum is 26", "26", True, True),  # the rest of the `####` line is the answer
    ("26 is my guess\n#### 25", "26", False, False),
    ("#### 4 or 5", "4", False, False),  # a hedge is no answer in either rule
    ("\\boxed{26}", "26", True, False),  # another form than the one asked
    ("####", "26", False, False),
])  # fmt: skip
def test_strict_reads_only_the_asked_form(response, gold, answer_rule, strict):
    assert is_correct(response, gold) is answer_rule
    assert is_correct(response, gold, "####") is strict


def test_the_boxed_form_and_what_counts_as_in_form():
    assert is_correct("so \\boxed{26}", "26", "\\boxed{}") and not is_correct("#### 26", "26", "\\boxed{}")
    answers = ("#### 26", "#### 25 apples", "#### ders", "#### 4 + 6 = 10", "#### 4 or 5", "####  ", "26", "")
    assert [in_form(t, "####") for t in answers] == [1, 1, 0, 0, 0, 0, 0, 0]
    assert in_form("\\boxed{7}", "\\boxed{}") and not in_form("#### 26", None)


@pytest.mark.parametrize("question, form", [("What is 2+2? Answer after ####.", "####"),
                                            ("What is 2+2? Put it in \\boxed{}.", "\\boxed{}"),
                                            ("What is 2+2?", None)])  # fmt: skip
def test_a_file_s_asked_form_is_the_one_every_question_names(question, form, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"question": f"{question} ({i})", "answer": "4"}) + "\n" for i in range(30)))
    assert load_task(str(path)).asked_form == form
    assert make_chain().asked_form == "####"


@pytest.fixture
def asked_coin_task(tmp_path):
    """The coin questions, each naming the `####` form: the coin model writes `1` (right, but never in the form)
    or nothing."""
    path = tmp_path / "asked.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {a}-{a - 1}? Answer after ####.", "answer": "1"}) + "\n"
                            for a in range(1, 101)))  # fmt: skip
    return str(path)


SMALL = dict(steps=2, batch_prompts=4, n=4, eval_prompts=8, eval_every=2, log_every=1, max_new_tokens=4)


def test_strict_pays_nothing_for_an_answer_outside_the_form(coin_model_dir, asked_coin_task, tmp_path):
    for rule in ("answer", "strict"):
        grpo.main(grpo.Args(model=coin_model_dir, task=asked_coin_task, output_dir=str(tmp_path), run_name=rule,
                            reward=rule, **SMALL))  # fmt: skip
    lenient, strict = metric_rows(tmp_path / "answer"), metric_rows(tmp_path / "strict")
    assert sum(r.get("reward/mean", 0) for r in lenient) > 0  # a bare `1` is right 1 time in 4
    assert all(r.get(key, 0) == 0 for r in strict for key in ("reward/mean", "eval/acc_sampled", "eval/acc_greedy"))
    assert all(r["eval/format_frac_sampled"] == 0 for r in strict if "eval/format_frac_sampled" in r)


def test_the_format_bonus_is_added_in_training_and_never_in_evaluation(coin_model_dir, asked_coin_task, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    """Every completion counted in the form (as if the model wrote `#### ...`): the training reward is the answer
    reward plus the bonus; a bonus every completion of a group gets leaves its advantages as they were, so the two
    runs train alike and evaluate alike."""
    monkeypatch.setattr(common.sampling, "in_form", lambda text, form: True)
    for bonus in (0.0, 0.5):
        grpo.main(grpo.Args(model=coin_model_dir, task=asked_coin_task, output_dir=str(tmp_path),
                            run_name=f"b{bonus}", format_bonus=bonus, **SMALL))  # fmt: skip
    plain, shaped = metric_rows(tmp_path / "b0.0"), metric_rows(tmp_path / "b0.5")
    column = lambda rows, key: [r[key] for r in rows if key in r]  # noqa: E731
    assert column(shaped, "reward/shaped_mean") == [r + 0.5 for r in column(plain, "reward/mean")]
    assert column(shaped, "reward/mean") == column(plain, "reward/mean") and max(column(plain, "reward/mean")) > 0
    for key in ("eval/acc_sampled", "eval/reward_sampled"):  # the bonus is the training signal's alone
        assert column(shaped, key) == column(plain, key)


def test_the_answer_credit_pays_a_right_answer_outside_the_form_only(coin_model_dir, asked_coin_task, tmp_path):
    """The coin model's `1` is right but never in the form: strict pays it 0, --answer-credit 0.5 pays it half of
    what --reward answer pays, in training only (the first step draws the same completions in all three runs)."""
    flags = dict(model=coin_model_dir, task=asked_coin_task, output_dir=str(tmp_path), **SMALL | dict(batch_prompts=8,
                 n=8))  # fmt: skip
    for name, rule in (("answer", dict(reward="answer")), ("strict", dict(reward="strict")),
                       ("credit", dict(reward="strict", answer_credit=0.5))):  # fmt: skip
        grpo.main(grpo.Args(**flags, run_name=name, **rule))
    first = {name: metric_rows(tmp_path / name, "reward/mean")[0] for name in ("answer", "strict", "credit")}
    assert first["answer"]["reward/mean"] > 0 and first["strict"]["reward/shaped_mean"] == 0
    assert first["credit"]["reward/shaped_mean"] == first["answer"]["reward/mean"] / 2
    assert first["credit"]["reward/mean"] == 0  # the reward strict pays; the credit is shaping
    assert all(r["eval/acc_sampled"] == 0 for r in metric_rows(tmp_path / "credit", "eval/acc_sampled"))


@pytest.mark.parametrize("needs_right, bonus", [(False, [[0.2, 0.0, 0.2], [0.2, 0.2, 0.0]]),
                                                (True, [[0.2, 0.0, 0.2], [0.0, 0.0, 0.0]])])  # fmt: skip
def test_the_format_bonus_by_hand_and_where_it_needs_a_right_answer(needs_right, bonus):
    """Two groups of three: the first holds a right answer (written outside the form), the second none. The bonus
    goes to every completion in the form; with --bonus-needs-right only in the first group. The credit goes to the
    right answer outside the form alone, in either case."""
    examples = [{"question": "a", "answer": "7"}, {"question": "b", "answer": "3"}]
    texts = ["#### 8", "so 7", "#### 9", "#### 4", "#### 5", "so 6"]
    args = SimpleNamespace(format_bonus=0.2, bonus_needs_right=needs_right, answer_credit=0.5)
    added = common.sampling.shaping(examples, texts, make_chain(), args).view(2, 3)
    credit = torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(added, torch.tensor(bonus) + credit)
