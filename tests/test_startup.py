"""Start-up in one order: the task and its defaults first, then the script's `check_args` on the settled flags;
`Run` hands the settled flags back as `run.args` and leaves the caller's `args` as given."""

import os
from dataclasses import replace

import pytest

import grpo
from common.flags import parse_args
from common.run import Run

SMALL = dict(steps=1, batch_prompts=2, n=2, eval_prompts=2, eval_every=1, log_every=1)


def test_check_args_sees_the_task_s_own_length_limit(random_model_dir, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(grpo, "check_args", lambda args, world: seen.append(args.max_new_tokens))
    args = grpo.Args(model=random_model_dir, output_dir=str(tmp_path), run_name="r", **SMALL)  # --max-new-tokens 0
    run = Run(args, grpo.__file__, grpo.check_args)
    assert seen == [48] and run.args.max_new_tokens == 48  # `chain`'s own limit, settled before the check
    assert args.max_new_tokens == 0, "the caller's flags are left as given"
    assert not os.path.exists(tmp_path / "r"), "start-up writes nothing"


def test_a_resumed_run_s_folder_is_settled_in_run_args_alone(random_model_dir, tmp_path, monkeypatch):
    grpo.main(grpo.Args(model=random_model_dir, output_dir=str(tmp_path), run_name="r", max_new_tokens=4, **SMALL))
    monkeypatch.setenv("HOME", str(tmp_path))
    args = parse_args(grpo.Args, ["--resume", "~/r", "--steps", "2"])
    run = Run(args, grpo.__file__, grpo.check_args)
    assert args.resume == "~/r" and run.args.resume == str(tmp_path / "r") == run.run_dir
    assert run.start == 1 and run.args.steps == 2


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "-3"], "--max-new-tokens -3: must be non-negative"),
    (["--max-new-tokens", "100000"], "--max-new-tokens 100000: the model's positions end at"),
])  # fmt: skip
def test_the_length_limit_is_checked_on_its_settled_value(flags, message, random_model_dir, tmp_path):
    with pytest.raises(SystemExit) as error:
        grpo.main(parse_args(grpo.Args, ["--model", random_model_dir, "--output-dir", str(tmp_path), *flags]))
    assert str(error.value.code).startswith(f"error: {message}")
    assert not list(tmp_path.iterdir()), "nothing written"


def test_the_task_s_default_limit_is_named_as_such_when_refused(random_model_dir, tmp_path, monkeypatch):
    """A limit the user left at 0 becomes the task's own; an error about it says it was the task's default."""
    import common.world.chain

    real = common.world.chain.make_chain
    monkeypatch.setattr(common.world.chain, "make_chain", lambda *a, **k: replace(real(*a, **k), max_new_tokens=100000))
    with pytest.raises(SystemExit, match=r"^error: --max-new-tokens 100000 \(the default for this task\)"):
        grpo.main(grpo.Args(model=random_model_dir, output_dir=str(tmp_path), **SMALL))
