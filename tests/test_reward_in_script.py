"""The reward is a function of each script: changing it there changes the training signal, the logged reward
and the samples' reward, never the accuracy, which is the verifier's verdict. And a resumed run's flags: the
command line is parsed with the run's own values as the defaults."""

import json

import pytest
from conftest import metric_rows

import grpo
import pods
from common.flags import parse_args
from common.run import eval_line
from common.sampling import verdicts
from common.verifier import is_correct
from common.world.chain import make_chain

SMALL = dict(steps=2, batch_prompts=2, n=4, eval_prompts=6, eval_every=1, log_every=1, max_new_tokens=6)


def test_a_changed_reward_changes_the_reward_figures_and_never_the_accuracy(random_model_dir, tmp_path, monkeypatch):
    grpo.main(grpo.Args(model=random_model_dir, output_dir=str(tmp_path), run_name="own", **SMALL))
    monkeypatch.setattr(grpo, "reward", lambda example, completion, form=None: 0.25)  # a partial-credit edit
    grpo.main(grpo.Args(model=random_model_dir, output_dir=str(tmp_path), run_name="r", **SMALL))
    train, evals = metric_rows(tmp_path / "r", "reward/mean"), metric_rows(tmp_path / "r", "eval/acc_greedy")
    assert [r["reward/mean"] for r in train] == [r["reward/shaped_mean"] for r in train] == [0.25, 0.25]
    assert {r["eval/reward_greedy"] for r in evals} == {r["eval/reward_sampled"] for r in evals} == {0.25}
    own = metric_rows(tmp_path / "own", "eval/acc_greedy")
    for key in ("eval/acc_greedy", "eval/acc_sampled"):  # step 0: the same policy, so the same verdicts
        assert evals[0][key] == own[0][key] and all(r[key] * 6 == round(r[key] * 6) for r in evals)
    samples = [json.loads(line) for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    assert samples and {s["reward"] for s in samples} == {s["shaped"] for s in samples} == {0.25}
    gold = {e["question"]: e["answer"] for e in make_chain().train}
    assert all(s["correct"] is is_correct(s["completion"], gold[s["question"]]) for s in samples)
    assert pods.reward({"answer": "7"}, "#### 7") == 1.0 and pods.reward({"answer": "7"}, "#### 8") == 0.0


@pytest.fixture
def finished(random_model_dir, tmp_path):
    """A grpo run of 2 steps at --lr 1e-3 (not the default)."""
    grpo.main(grpo.Args(model=random_model_dir, output_dir=str(tmp_path), run_name="r", lr=1e-3, **SMALL))
    return str(tmp_path / "r")


def test_resume_takes_the_run_s_flags_and_a_steps_flag_at_its_default(finished):
    args = parse_args(grpo.Args, ["--resume", finished, "--steps", "200"])  # 200 is the default: still given
    assert args.steps == 200 and args.lr == 1e-3 and args.n == 4 and args.eval_prompts == 6
    assert parse_args(grpo.Args, ["--resume", finished]).steps == 2  # left out: the run's own value


def test_resume_accepts_a_flag_at_the_run_s_value_and_refuses_a_changed_one(finished):
    grpo.main(parse_args(grpo.Args, ["--resume", finished, "--steps", "3", "--lr", "0.001", "--n", "4"]))
    assert [r["step"] for r in metric_rows(finished, "reward/mean")] == [1, 2, 3]
    with pytest.raises(SystemExit, match="--lr 0.0002: the resumed run has 0.001; on --resume only --steps"):
        grpo.main(parse_args(grpo.Args, ["--resume", finished, "--steps", "4", "--lr", "2e-4"]))  # the default


def test_the_verdict_is_the_verifier_s_under_the_reward_s_form():
    examples = [{"question": "a", "answer": "7"}, {"question": "b", "answer": "3"}]
    texts = ["#### 7", "so it is 7", "#### 3", "#### 4"]  # two completions per prompt, side by side
    assert verdicts(examples, texts, None).tolist() == [[True, True], [True, False]]
    assert verdicts(examples, texts, "####").tolist() == [[True, False], [True, False]]  # --reward strict


def test_the_console_shows_the_reward_only_where_it_differs_from_the_accuracy():
    line = eval_line(20, {"eval/acc_greedy": 0.5, "eval/reward_greedy": 0.5, "eval/acc_sampled": 0.25,
                          "eval/reward_sampled": 0.4})  # fmt: skip
    assert "acc_greedy 0.500" in line and "reward_greedy" not in line
    assert "acc_sampled 0.250" in line and "reward_sampled 0.400" in line
