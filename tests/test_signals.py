"""Ctrl-C, SIGTERM (what Slurm and Kubernetes send before they kill a job) and SIGHUP (a closed terminal) stop a run
the same way, in every script, at any step: the step finishes, a checkpoint is saved, the command that continues
the run is printed, and that command logs exactly what the run straight through logs, evaluations included."""

import errno
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, metric_rows, per_script, run_command

import cropi
import dppo
import grpo
import ippo
import pods
from common.flags import parse_args
from common.run import Run

SCRIPTS = {"grpo": grpo, "pods": pods, "dppo": dppo, "cropi": cropi, "ippo": ippo}
SMALL = dict(steps=4, batch_prompts=2, n=2, eval_prompts=2, eval_every=2, max_new_tokens=4)
SCRIPT_SMALL = per_script(SMALL, steps_per_stage=2)


def without_times(rows):
    """The rows without the figures a machine measures (seconds, memory), which differ from run to run."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/", "memory/"))} for r in rows]


def signalled_at(monkeypatch, step: int, signum: int):
    """Deliver `signum` to this process as the loop logs `step`, as a scheduler would in the middle of it."""
    log = Run.log

    def log_then_signal(self, done, *args, **kwargs):
        log(self, done, *args, **kwargs)
        if done == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Run, "log", log_then_signal)


CASES = [("grpo", signal.SIGTERM, 4)] + [(s, sig, step) for s in SCRIPTS for sig, step in
                                         ((signal.SIGHUP, 2), (signal.SIGINT, 4), (signal.SIGTERM, 1))]  # fmt: skip


@pytest.mark.parametrize("script, signum, step", [pytest.param(*c, marks=[pytest.mark.slow] * (i > 0))
                                                  for i, c in enumerate(dict.fromkeys(CASES))])  # fmt: skip
def test_a_signal_at_any_step_saves_and_the_resume_logs_what_the_straight_run_logs(
    script, signum, step, coin_model_dir, coin_task, tmp_path, monkeypatch, capsys
):
    """Step 2 evaluates (--eval-every 2) and step 4 is the last: a signal there skips that evaluation to stop
    soon, and the resume makes it up before its first step."""
    module = SCRIPTS[script]
    args = dict(model=coin_model_dir, task=coin_task, output_dir=str(tmp_path), **SCRIPT_SMALL[script])
    module.main(module.Args(**args, run_name="straight"))
    with monkeypatch.context() as m:
        signalled_at(m, step, signum)
        with pytest.raises(SystemExit) as stopped:
            module.main(module.Args(**args, run_name="stopped"))
    assert stopped.value.code == 128 + signum
    out = capsys.readouterr().out
    run_dir = tmp_path / "stopped"
    assert (run_dir / "checkpoints" / f"step_{step:06d}" / "trainer_state.pt").exists()
    assert f"saved {run_dir}/checkpoints/step_{step:06d}; continue with: python {script}.py --resume {run_dir}" in out
    module.main(parse_args(module.Args, ["--resume", str(run_dir)]))  # the printed command, no other flag
    assert without_times(metric_rows(run_dir)) == without_times(metric_rows(tmp_path / "straight"))


def test_a_signal_after_the_ranks_agreed_on_a_step_is_acted_on_at_the_next_one(coin_model_dir, coin_task, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    """Under torchrun each rank gets the signal at its own moment: one may get it just after every rank agreed to go
    on. That rank must still evaluate with the others (an evaluation one rank skips leaves the others waiting in
    its collectives); the stop comes one step later, on every rank."""
    stop_reason = Run.stop_reason

    def agreed_then_signalled(self, done, *args, **kwargs):
        reason = stop_reason(self, done, *args, **kwargs)
        if done == 2:  # --eval-every 2: this step evaluates
            self.on_interrupt(signal.SIGTERM, None)
        return reason

    monkeypatch.setattr(Run, "stop_reason", agreed_then_signalled)
    args = dict(model=coin_model_dir, task=coin_task, output_dir=str(tmp_path), run_name="late", **SMALL)
    with pytest.raises(SystemExit) as stopped:
        grpo.main(grpo.Args(**args))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert [r["step"] for r in metric_rows(tmp_path / "late", "eval/acc_sampled")] == [0, 2]
    assert os.listdir(tmp_path / "late" / "checkpoints") == ["step_000003"]


def test_a_signal_during_start_up_stops_with_one_line_and_writes_nothing(random_model_dir, tmp_path, monkeypatch):
    """Here SIGINT arrives while the policy loads: before the run folder exists, a signal stops at once."""
    import common.run

    load = common.run.load_policy

    def interrupted_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return load(*args, **kwargs)

    monkeypatch.setattr(common.run, "load_policy", interrupted_load)
    with pytest.raises(SystemExit) as stopped:
        grpo.main(grpo.Args(model=random_model_dir, output_dir=str(tmp_path), run_name="r", **SMALL))
    assert str(stopped.value.code).startswith("error: stopped during start-up by Ctrl-C; the run folder was not made")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_and_prints_the_torchrun_command_that_continues_exactly(coin_model_dir, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    flags = ["--model", coin_model_dir, "--output-dir", str(tmp_path), "--batch-prompts", "4", "--n", "4",
             "--max-new-tokens", "4", "--eval-prompts", "4", "--eval-every", "3", "--steps", "60"]  # fmt: skip
    straight = run_command([*torchrun, "--", "grpo.py", *flags, "--run-name", "straight"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    run_dir = tmp_path / "stopped"
    process = subprocess.Popen([*torchrun, "--", "grpo.py", *flags, "--run-name", "stopped"], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    deadline = time.time() + 120
    while not ((run_dir / "metrics.jsonl").exists() and len(metric_rows(run_dir, "reward/mean")) >= 2):
        assert process.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to every rank
    stdout, stderr = process.communicate(timeout=120)
    assert "Traceback (most recent call last):\n  File \"" + ROOT not in stderr
    command = f"continue with: torchrun --nproc_per_node 2 -- grpo.py --resume {run_dir}"
    assert command in stdout + stderr, (stdout + stderr)[-3000:]
    last = max(r["step"] for r in metric_rows(run_dir, "reward/mean"))
    assert last < 60 and (run_dir / "checkpoints" / f"step_{last:06d}" / "trainer_state.pt").exists()
    resumed = run_command([*torchrun, "--", "grpo.py", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert without_times(metric_rows(run_dir)) == without_times(metric_rows(tmp_path / "straight"))


# ---- a full disk, or a file-size limit -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_at_a_save_is_one_line_leaves_no_partial_folder_and_the_run_resumes(
    random_model_dir, tmp_path, monkeypatch
):
    args = dict(model=random_model_dir, output_dir=str(tmp_path), save_every=2, **SMALL)
    grpo.main(grpo.Args(**args, run_name="straight"))
    save = torch.save

    def full_at_step_4(obj, path, *a, **k):
        if "step_000004" in str(path):  # what torch says when the disk fills during a save
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 119040 vs 118936")
        return save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_at_step_4)
    with pytest.raises(SystemExit) as error:
        grpo.main(grpo.Args(**args, run_name="full"))
    run_dir = tmp_path / "full"
    message = str(error.value.code)
    assert message.startswith(f"error: cannot write in {run_dir}: the disk is full") and "\n" not in message
    assert f"--resume {run_dir}" in message
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_000002"], "no half-written checkpoint is left"
    resumed = run_command([sys.executable, "grpo.py", "--resume", str(run_dir)])  # a new process: the lock is free
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert without_times(metric_rows(run_dir)) == without_times(metric_rows(tmp_path / "straight"))


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_and_leaves_nothing_half_written(random_model_dir, tmp_path):
    """ulimit -f 256 KB: the model's weights fit, the optimizer state does not."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (256_000, 256_000))  # noqa: E731
    result = subprocess.run([sys.executable, "grpo.py", "--model", random_model_dir, "--output-dir", str(tmp_path),
                             "--run-name", "r", "--steps", "2"] + [f"--{k.replace('_', '-')}={v}" for k, v in
                            SMALL.items() if k != "steps"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, preexec_fn=limit, timeout=300)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], lines[-3:]
    assert errors[0].startswith(f"error: cannot write in {tmp_path / 'r'}: the disk is full, or a file reached the"
                                " file-size limit (ulimit -f)")
    assert not (tmp_path / "r" / "checkpoints").exists() or not os.listdir(tmp_path / "r" / "checkpoints")
    assert [r["step"] for r in metric_rows(tmp_path / "r", "reward/mean")] == [1, 2], "the logs are intact"


def test_a_full_disk_when_the_run_folder_is_made_leaves_no_staging_folder(random_model_dir, tmp_path, monkeypatch):
    import common.folder

    def no_space(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.folder, "lock_folder", no_space)  # the staging folder's first files are written
    with pytest.raises(SystemExit, match="cannot write in .*: the disk is full; make room"):
        grpo.main(grpo.Args(model=random_model_dir, output_dir=str(tmp_path / "runs"), run_name="r", **SMALL))
    assert os.listdir(tmp_path / "runs") == [], "no run folder, no hidden staging folder"
