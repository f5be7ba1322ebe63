"""pods.py end to end: --help, smoke runs (plain and torchrun), resume, learning signal, B*m, bad input."""

import json
import os
import sys

import pytest
import torch
from conftest import check_help, check_per_skill_eval, metric_rows, run_command

import pods
from common.flags import parse_args
from common.model import load_policy

SMALL = ["--steps", "2", "--batch-prompts", "2", "--n", "4", "--m", "2", "--eval-prompts", "6",
         "--eval-every", "1", "--log-every", "1", "--max-new-tokens", "12"]  # fmt: skip


def run(args, cmd=(sys.executable, "pods.py")):
    return run_command([*cmd, *args])


read_metrics = metric_rows


def test_help_documents_every_flag():
    check_help("pods.py", pods.Args)


def test_smoke_run_checkpoint_and_resume(random_model_dir, tmp_path):
    out = run(["--model", random_model_dir, "--output-dir", str(tmp_path), "--run-name", "smoke", *SMALL])
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = tmp_path / "smoke"
    rows = read_metrics(run_dir)
    train = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward/kept_mean", "reward/zero_std_frac", "reward/zero_std_frac_kept", "time/generate", "time/select",
                "time/update", "throughput/generate_tokens_per_s", "throughput/update_tokens_per_s",
                "loss/clipped_surrogate", "policy/entropy"):  # fmt: skip
        assert key in train[0]
    assert {"eval/acc_greedy", "eval/acc_sampled", "eval/unfaithful_greedy"} <= set(rows[0])
    check_per_skill_eval(rows[0], 6)
    assert (run_dir / "args.json").exists() and (run_dir / "samples.jsonl").exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    model, _ = load_policy(str(run_dir / "checkpoints" / "step_000002"))  # loadable with transformers
    # resume continues at step 3 in the same folder
    pods.main(parse_args(pods.Args, ["--resume", str(run_dir), "--steps", "3"]))  # in-process: the launch is above
    assert [r["step"] for r in read_metrics(run_dir) if "reward/mean" in r] == [1, 2, 3]


@pytest.mark.slow
def test_torchrun_two_processes(random_model_dir, tmp_path):
    # `--` stops torchrun from reading `--n`/`--m` as abbreviations of its own options
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--", "pods.py"]
    out = run(["--model", random_model_dir, "--output-dir", str(tmp_path), "--run-name", "ddp", *SMALL], torchrun)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(tmp_path / "ddp")  # rank 0 alone writes
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]


def _args(model_dir, tmp_path, **kw):
    base = dict(model=model_dir, output_dir=str(tmp_path), steps=1, batch_prompts=2, n=6, m=3, eval_prompts=4,
                eval_every=100, max_new_tokens=10)  # fmt: skip
    return pods.Args(**{**base, **kw})


def test_only_kept_sequences_are_trained_and_parameters_change(random_model_dir, tmp_path, monkeypatch):
    rows_trained = []
    real = pods.token_logprobs

    def counting(model, rollout, *a, **k):
        rows_trained.append(rollout.input_ids.shape[0])
        return real(model, rollout, *a, **k)

    monkeypatch.setattr(pods, "token_logprobs", counting)
    before = {k: v.clone() for k, v in load_policy(random_model_dir)[0].state_dict().items()}
    # a random model rarely answers right; a reward that varies within each group guarantees a nonzero gradient
    monkeypatch.setattr(pods, "reward", lambda example, text, form=None: float(len(text) % 2))
    pods.main(_args(random_model_dir, tmp_path, run_name="count", micro_batch=4, steps=2))
    assert rows_trained == [4, 2, 4, 2], "B*m = 6 sequences per step, in micro-batches of 4, never B*n = 12"
    after, _ = load_policy(str(tmp_path / "count" / "checkpoints" / "step_000002"))
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "a training step must change the parameters"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(m=5, n=4), "--m 5 is larger than --n 4"),
        (dict(m=1), "--m 1"),
        (dict(n=1, m=1), "--n 1"),
        (dict(temperature=0.0), "--temperature 0.0"),
        (dict(temperature=-1.0), "--temperature -1.0"),
        (dict(batch_prompts=0), "--batch-prompts 0"),
        (dict(batch_prompts=-2), "--batch-prompts -2"),
        (dict(task="chian"), "--task 'chian': unknown task"),
        (dict(model="./missing/model"), "--model ./missing/model: no such folder"),
        (dict(beta=-0.1), "--beta -0.1"),
        (dict(eval_prompts=500), "--eval-prompts 500: the test split of chain has only 300 prompts"),
    ],
)
def test_bad_input(random_model_dir, tmp_path, overrides, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(".", r"\.")):
        pods.main(_args(random_model_dir, tmp_path, **overrides))


def test_batch_must_divide_by_world_size():
    with pytest.raises(SystemExit, match="--batch-prompts 3 does not divide by the 2 processes"):
        pods.check_args(pods.Args(batch_prompts=3), world=2)


def test_data_file_without_fields(random_model_dir, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"problem": "1+1", "solution": "2"}\n' * 5)
    with pytest.raises(SystemExit, match="--question-field 'question'"):
        pods.main(_args(random_model_dir, tmp_path, task=str(path)))


def test_bad_input_is_one_line_and_nonzero_exit(random_model_dir):
    out = run(["--model", random_model_dir, "--n", "4", "--m", "8"])
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    expected = "error: --m 8 is larger than --n 4: cannot keep more rollouts than are generated"
    assert out.stderr.strip().splitlines()[-1] == expected


def test_same_seed_same_metrics(random_model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        pods.main(_args(random_model_dir, tmp_path, run_name=name, steps=2, eval_every=1))
        rows = read_metrics(tmp_path / name)
        runs.append([{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows])
    assert runs[0] == runs[1]


def test_instruct_model_on_a_data_file(random_model_dir, tiny_tokenizer, tmp_path):
    """The real-model path offline: a chat template, a local jsonl file with GSM8K-style answers."""
    import shutil

    folder = tmp_path / "instruct"
    shutil.copytree(random_model_dir, folder)
    tok = load_policy(str(folder))[1]
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    tok.save_pretrained(folder)
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"{i} apples and 2 more?", "solution": f"so #### {i + 2}"})
                              for i in range(40)))  # fmt: skip
    args = _args(str(folder), tmp_path, run_name="instruct_run", task=str(data), question_field="problem",
                 answer_field="solution", eval_every=1)  # fmt: skip
    pods.main(args)
    rows = read_metrics(tmp_path / "instruct_run")
    assert "eval/acc_greedy" in rows[0] and "eval/unfaithful_greedy" not in rows[0]  # steps checkable on chain only
    assert any("reward/mean" in r for r in rows)


def test_existing_run_folder_is_refused(random_model_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="already exists; choose another name, or continue it with --resume"):
        pods.main(_args(random_model_dir, tmp_path, run_name="taken"))
