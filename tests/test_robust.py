"""Runs survive crashes, interrupts and mistakes: kill -9 then --resume alone continues the run exactly, an
incomplete checkpoint is skipped, Ctrl-C saves, non-finite steps are skipped, a run without learning signal
is warned about, and the console is clean. (Bad input: tests/test_bad_input.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, metric_rows, run_command

import grpo
from common.flags import parse_args
from common.folder import complete_checkpoints
from common.model import load_policy

SMALL = ["--batch-prompts", "2", "--n", "4", "--eval-prompts", "4", "--eval-every", "3", "--log-every", "1",
         "--max-new-tokens", "10"]  # fmt: skip
TRACKED = ("reward/mean", "loss/clipped_surrogate", "grad_norm", "eval/acc_sampled", "eval/acc_greedy")


def start(args, script="grpo.py"):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for(condition, process, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the moment the test waits for"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def comparable(rows):
    """The rows with the figures that must repeat exactly (time keys aside)."""
    return [(r["step"], tuple(r.get(k) for k in TRACKED)) for r in rows]


@pytest.mark.slow
def test_kill_then_resume_alone_continues_the_run(random_model_dir, tmp_path):
    base = ["--model", random_model_dir, "--output-dir", str(tmp_path), "--steps", "12", "--save-every", "3", *SMALL]
    straight = run_command([sys.executable, "grpo.py", *base, "--run-name", "straight"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    run_dir = tmp_path / "killed"
    process = start([*base, "--run-name", "killed"])
    wait_for(lambda: (run_dir / "checkpoints" / "step_000003").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = metric_rows(run_dir)
    assert max(r["step"] for r in before) < 12, "the kill came after the run had finished"
    resumed = run_command([sys.executable, "grpo.py", "--resume", str(run_dir)])  # no other flag
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = metric_rows(run_dir)
    assert comparable(rows) == comparable(metric_rows(tmp_path / "straight"))  # every step once, same figures
    assert json.loads((run_dir / "args.json").read_text())["steps"] == 12  # the run's own arguments, kept
    assert json.loads((run_dir / "resumes.jsonl").read_text().splitlines()[0])["from_step"] in (3, 6, 9)
    assert {"torch", "transformers", "datasets"} <= set(json.loads((run_dir / "versions.json").read_text()))


def test_resume_refuses_a_changed_algorithm_flag_and_takes_new_cadence(random_model_dir, tmp_path):
    base = dict(model=random_model_dir, output_dir=str(tmp_path), batch_prompts=2, n=4, eval_prompts=4, steps=2,
                max_new_tokens=10, lr=1e-3)  # fmt: skip
    grpo.main(grpo.Args(**base, run_name="r"))
    resume = str(tmp_path / "r")
    with pytest.raises(SystemExit, match="--lr 0.01: the resumed run has 0.001; on --resume only --steps"):
        grpo.main(parse_args(grpo.Args, ["--resume", resume, "--lr", "0.01"]))
    grpo.main(parse_args(grpo.Args, ["--resume", resume, "--steps", "3", "--eval-every", "1"]))  # allowed
    assert [r["step"] for r in metric_rows(resume, "reward/mean")] == [1, 2, 3]


def test_incomplete_newest_checkpoint_is_skipped(random_model_dir, tmp_path, capsys):
    grpo.main(grpo.Args(model=random_model_dir, output_dir=str(tmp_path), run_name="r", batch_prompts=2, n=4,
                        eval_prompts=4, steps=2, max_new_tokens=10))  # fmt: skip
    checkpoints = tmp_path / "r" / "checkpoints"
    (checkpoints / "step_000003").mkdir()  # cut off before anything was written
    (checkpoints / "step_000004.partial").mkdir()  # a save in progress
    warnings = []
    assert complete_checkpoints(str(tmp_path / "r"), warnings.append)[0].endswith("step_000002")
    assert len(warnings) == 2 and all(w.startswith("warning: skipping the incomplete checkpoint") for w in warnings)
    capsys.readouterr()
    grpo.main(parse_args(grpo.Args, ["--resume", str(tmp_path / "r"), "--steps", "3"]))
    out = capsys.readouterr().out
    assert "skipping the incomplete checkpoint" in out and "resuming" in out and "from step_000002" in out


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_exits_without_traceback(random_model_dir, tmp_path):
    run_dir = tmp_path / "r"
    process = start(["--model", random_model_dir, "--output-dir", str(tmp_path), "--run-name", "r", "--steps", "200",
                     *SMALL])  # fmt: skip
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(metric_rows(run_dir, "reward/mean")) >= 2, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr
    last = max(r["step"] for r in metric_rows(run_dir, "reward/mean"))
    assert 2 <= last < 200 and (run_dir / "checkpoints" / f"step_{last:06d}" / "trainer_state.pt").exists()
    assert f"continue with: python grpo.py --resume {run_dir}" in stdout + stderr


def test_non_finite_steps_are_skipped_then_stop_the_run(random_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grpo, "aggregate", lambda *a: torch.tensor(float("nan"), requires_grad=True) * a[0].sum())
    before = load_policy(random_model_dir)[0].state_dict()
    grpo.main(grpo.Args(model=random_model_dir, output_dir=str(tmp_path), run_name="r", batch_prompts=2, n=4,
                        eval_prompts=4, steps=10, max_new_tokens=10))  # fmt: skip
    train = metric_rows(tmp_path / "r", "reward/mean")
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["train/skipped_steps"] == 1 for r in train)
    after = load_policy(str(tmp_path / "r" / "checkpoints" / "step_000003"))[0].state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before), "a skipped step changes no parameter"
    out = capsys.readouterr()
    assert "3 steps in a row had a non-finite gradient" in out.out + out.err


def test_no_learning_signal_is_warned_about(random_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grpo, "reward", lambda example, text, form=None: 0.0)
    grpo.main(grpo.Args(model=random_model_dir, output_dir=str(tmp_path), run_name="r", batch_prompts=2, n=4,
                        eval_prompts=4, steps=10, eval_every=10, max_new_tokens=6))  # fmt: skip
    out = capsys.readouterr()
    assert "warning: for 10 steps every group's rewards were equal (mean reward 0.00)" in out.out + out.err


@pytest.mark.slow
def test_console_is_clean(random_model_dir, tmp_path):
    out = run_command([sys.executable, "grpo.py", "--model", random_model_dir, "--output-dir", str(tmp_path),
                       "--steps", "2", "--save-every", "1", *SMALL])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    for noise in ("Loading weights", "Writing model shards", "Warning", "deprecated"):
        assert noise not in text, noise
    lines = [line.replace(str(tmp_path), "RUNS") for line in text.replace("\r", "\n").splitlines()  # a path is
             if line.strip() and "it/s" not in line and "?it" not in line and "s/it" not in line]  # as long as it is
    assert lines and all(len(line) <= 120 for line in lines), max(lines, key=len)
    assert not text.replace("\r", "\n").lstrip(" ").startswith("\n"), "no blank lines at the start"
