"""Ranks and resumes change nothing: one update on 2 ranks equals the update on 1 rank holding the same global
batch (grpo, pods, ippo), and a run stopped at a checkpoint and resumed logs what one run straight through logs
(grpo, ippo)."""

import sys

import pytest
import torch
from conftest import metric_rows, run_command

import grpo
import ippo
from common.flags import parse_args


def parameter_change(mode, model_dir, out, world, aggregation):
    script = ["tests/one_step.py", mode, model_dir, str(out), aggregation]
    launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(world)]  # fmt: skip
    result = run_command([*launcher, *script])
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("mode, aggregation", [("grpo", "seq-mean-token-mean"), ("grpo", "token-mean"),
                                               ("pods", "seq-mean-token-mean"), ("ippo", "")])  # fmt: skip
def test_two_ranks_take_the_same_step_as_one(mode, aggregation, random_model_dir, tmp_path):
    one = parameter_change(mode, random_model_dir, tmp_path / "one.pt", 1, aggregation or "seq-mean-token-mean")
    two = parameter_change(mode, random_model_dir, tmp_path / "two.pt", 2, aggregation or "seq-mean-token-mean")
    assert sum(d.abs().sum().item() for d in one.values()) > 0, "the step must change the parameters"
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-7, msg=name)


def without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def varying_reward(example, text, form=None):
    """A random model rarely answers right; a reward that varies within a group gives every step a signal."""
    return float(len(text) % 2)


@pytest.mark.parametrize("script", [grpo, ippo])
def test_resume_equals_uninterrupted(script, random_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(script, "reward", varying_reward)
    base = dict(model=random_model_dir, output_dir=str(tmp_path), batch_prompts=2, n=4, eval_prompts=4,
                eval_every=2, log_every=1, max_new_tokens=10)  # fmt: skip
    if script is ippo:
        base |= dict(epochs=2, minibatches=2, val_prompts=8)
    script.main(script.Args(**base, steps=4, run_name="straight"))
    script.main(script.Args(**base, steps=2, run_name="stopped"))  # ends with a checkpoint at step 2
    script.main(parse_args(script.Args, ["--resume", str(tmp_path / "stopped"), "--steps", "4"]))  # the run's flags
    straight, resumed = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "stopped")
    assert [r["step"] for r in resumed] == [0, 1, 2, 2, 3, 4, 4]  # eval, steps, eval, ...: each once
    assert without_times(resumed) == without_times(straight)
