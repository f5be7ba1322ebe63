"""--fsdp changes where the weights live, not what is computed: one update sharded over 2 ranks equals the update of
one process holding the whole batch (grpo, pods), a sharded run's checkpoints are ordinary transformers folders, and
a sharded run stopped at a checkpoint and resumed logs and saves what the run straight through does."""

import sys

import pytest
import torch
from conftest import metric_rows, run_command
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def parameters_after_one_step(mode, model_dir, out, launcher, *sharding):
    result = run_command([*launcher, "tests/one_step.py", mode, model_dir, str(out), "seq-mean-token-mean", *sharding])
    assert result.returncode == 0, result.stderr[-3000:]
    before = load_file(f"{model_dir}/model.safetensors")
    change = torch.load(out)
    return {name: before.get(name, before["model.embed_tokens.weight"]) + d for name, d in change.items()}, change


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["grpo", "pods"])
def test_a_sharded_step_equals_one_process_holding_the_whole_batch(mode, random_model_dir, tmp_path):
    whole, change = parameters_after_one_step(mode, random_model_dir, tmp_path / "whole.pt", [sys.executable])
    sharded, _ = parameters_after_one_step(mode, random_model_dir, tmp_path / "sharded.pt", TORCHRUN, "fsdp")
    assert sum(d.abs().sum().item() for d in change.values()) > 0, "the step must change the parameters"
    assert set(sharded) == set(whole)
    for name in whole:  # the same up to the order of float sums: relative difference <= 1e-6 per tensor
        assert (sharded[name] - whole[name]).norm() <= 1e-6 * whole[name].norm(), name


def sharded_run(coin_model_dir, coin_task, out, name, steps, *more):
    flags = ["--model", coin_model_dir, "--task", coin_task, "--output-dir", str(out), "--batch-prompts", "8",
             "--n", "8", "--max-new-tokens", "4", "--eval-prompts", "4", "--eval-every", "2", "--save-every", "2"]
    result = run_command([*TORCHRUN, "--", "grpo.py", *flags, "--fsdp", "--run-name", name, "--steps", str(steps),
                          *more])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


@pytest.mark.slow
def test_a_sharded_run_saves_transformers_folders_and_resumes_exactly(coin_model_dir, coin_task, tmp_path):
    sharded_run(coin_model_dir, coin_task, tmp_path, "straight", 4)
    sharded_run(coin_model_dir, coin_task, tmp_path, "stopped", 2)
    sharded_run(coin_model_dir, coin_task, tmp_path, "stopped", 4, "--resume", str(tmp_path / "stopped"))
    straight, resumed = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "stopped")
    assert [r["step"] for r in resumed] == [0, 1, 2, 2, 3, 4, 4]
    assert without_times(resumed) == without_times(straight)
    assert any(r.get("grad_norm", 0) > 0 for r in straight), "some step had a learning signal"
    first, second = (AutoModelForCausalLM.from_pretrained(tmp_path / run / "checkpoints" / "step_000004")
                     for run in ("straight", "stopped"))  # fmt: skip
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
