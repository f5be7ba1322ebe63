"""--track: Weights & Biases gets what metrics.jsonl gets, and the run's flags; a resumed run logs into the W&B run
it started. Tested offline (WANDB_MODE=offline): nothing leaves the machine."""

import importlib.util

import pytest
from conftest import metric_rows

import grpo
from common.flags import parse_args

wandb = pytest.importorskip("wandb", reason="--track needs wandb (requirements-real.txt)")
SMALL = dict(steps=2, batch_prompts=2, n=2, eval_prompts=2, eval_every=1, max_new_tokens=4)


@pytest.fixture
def logged(monkeypatch):
    """Every (step, metrics) the W&B run is given, and the config it starts with."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls, init = {"rows": [], "configs": [], "ids": []}, wandb.init

    def recording_init(*args, **kwargs):
        run = init(*args, **kwargs)
        calls["configs"].append(dict(run.config))
        calls["ids"].append(run.id)
        log = run.log
        run.log = lambda metrics, step: calls["rows"].append({"step": step, **metrics}) or log(metrics, step=step)
        return run

    monkeypatch.setattr(wandb, "init", recording_init)
    return calls


def test_w_and_b_gets_the_metrics_and_the_flags_and_a_resume_continues_its_run(logged, random_model_dir, tmp_path):
    args = dict(model=random_model_dir, output_dir=str(tmp_path), run_name="r", track=True, wandb_project="p")
    grpo.main(grpo.Args(**args, **SMALL))
    run_dir = tmp_path / "r"
    assert logged["rows"] == metric_rows(run_dir)
    assert logged["configs"][0]["lr"] == 2e-4 and logged["configs"][0]["wandb_project"] == "p"
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and b"eval/acc_sampled" in files[0].read_bytes()
    grpo.main(parse_args(grpo.Args, ["--resume", str(run_dir), "--steps", "3"]))
    assert logged["ids"][1] == logged["ids"][0] == (run_dir / "wandb_id").read_text()
    assert logged["rows"] == metric_rows(run_dir) and logged["rows"][-1]["step"] == 3


def test_track_without_wandb_is_a_one_line_error_naming_the_install(random_model_dir, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r"^error: --track: Weights & Biases is not installed; install it with: pip"):
        grpo.main(grpo.Args(model=random_model_dir, output_dir=str(tmp_path), run_name="r", track=True, **SMALL))
    assert not (tmp_path / "r").exists()
