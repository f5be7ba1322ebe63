"""--lr-schedule and --warmup-steps: each step's learning rate by hand, logged as train/lr, and a resumed run that
goes on with exactly the straight run's rates."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import metric_rows

import grpo
from common.flags import parse_args
from common.run import Run


def rates(schedule: str, lr: float, steps: int, warmup: int) -> list[float]:
    run = object.__new__(Run)  # only the schedule: no start-up
    run.args = SimpleNamespace(lr=lr, steps=steps, warmup_steps=warmup, lr_schedule=schedule)
    run.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    out = []
    for done in range(1, steps + 1):  # the step about to run, counted from 1 as the logs count
        run.set_learning_rate(done)
        assert run.optimizer.param_groups[0]["lr"] == run.lr
        out.append(run.lr)
    return out


def test_the_schedules_by_hand():
    assert rates("constant", 0.1, 4, 0) == [0.1] * 4
    assert rates("constant", 0.1, 5, 2) == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1])
    assert rates("linear", 0.1, 4, 0) == pytest.approx([0.1, 0.075, 0.05, 0.025])  # (4 - s) / 4
    assert rates("linear", 0.1, 6, 2) == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025])
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]  # 0.1, 0.0854, 0.05, 0.0146
    assert rates("cosine", 0.1, 4, 0) == pytest.approx(cosine)
    assert rates("cosine", 0.1, 5, 1) == pytest.approx([0.1, *cosine])


def test_a_resumed_run_goes_on_with_the_straight_runs_rates(random_model_dir, tmp_path):
    args = dict(model=random_model_dir, output_dir=str(tmp_path), batch_prompts=2, n=2, eval_prompts=2, eval_every=2,
                max_new_tokens=4, lr_schedule="cosine", warmup_steps=2)  # fmt: skip
    grpo.main(grpo.Args(**args, steps=5, run_name="straight"))
    grpo.main(grpo.Args(**args, steps=3, run_name="stopped"))
    grpo.main(parse_args(grpo.Args, ["--resume", str(tmp_path / "stopped"), "--steps", "5"]))
    straight = [r["train/lr"] for r in metric_rows(tmp_path / "straight", "train/lr")]
    assert straight == pytest.approx([1e-4, 2e-4, *(2e-4 * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in range(3))])
    assert [r["train/lr"] for r in metric_rows(tmp_path / "stopped", "train/lr")] == straight


@pytest.mark.parametrize("flags, message", [(["--warmup-steps", "200"], "--warmup-steps 200: must be at least 0 and"
                                              " below --steps 200"),
                                             (["--warmup-steps", "-1"], "--warmup-steps -1: must be at least 0")])
def test_a_warm_up_as_long_as_the_run_is_refused(flags, message, random_model_dir, tmp_path):
    with pytest.raises(SystemExit) as error:
        grpo.main(parse_args(grpo.Args, ["--model", random_model_dir, "--output-dir", str(tmp_path), *flags]))
    assert str(error.value.code).startswith(f"error: {message}")
    assert not list(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("argv", [["--lr-schedule", "step"], ["--lr-schedule=step"]])
def test_an_unknown_schedule_is_a_one_line_error(argv):
    with pytest.raises(SystemExit, match=r"^error: --lr-schedule step: expected constant, linear or cosine$"):
        parse_args(grpo.Args, argv)
