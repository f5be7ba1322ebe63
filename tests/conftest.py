"""Test session setup: no network, a private model cache, and a tiny random model saved to a temp folder."""

import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download fails loudly
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if not os.path.exists("/dev/nvidia0"):  # no GPU: Triton kernels run in the interpreter, on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before a kernel module is imported

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.model import TinySpec  # noqa: E402

# Small enough that a forward pass costs milliseconds; the same architecture as the real `tiny`.
RANDOM_SPEC = TinySpec(hidden_size=32, layers=2, heads=2, sft_steps=0)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Never read or write the user's tiny-model cache from tests."""
    os.environ["TINYRLVR_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from common.model import train_tokenizer, warmup_texts

    return train_tokenizer((p + c for p, c in warmup_texts(RANDOM_SPEC)), RANDOM_SPEC.vocab_size)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory, tiny_tokenizer):
    """A randomly initialised tiny Qwen2 + tokenizer saved with save_pretrained (what --model accepts)."""
    from common.model import random_model

    folder = str(tmp_path_factory.mktemp("random_model"))
    random_model(tiny_tokenizer, RANDOM_SPEC).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def run_command(cmd, env=None, timeout=300):
    """Run a command (a script, torchrun, a module) from the repository root, output captured as text."""
    env = env if env is not None else {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metric_rows(run_dir, key=None):
    """The rows of a run folder's metrics.jsonl: all of them, or those holding `key`."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if key is None or key in row]


def check_per_skill_eval(row, n_prompts):
    """An evaluation row on `chain` holds accuracy per skill of the first `n_prompts` test prompts, and the
    overall accuracy is their prompt-weighted mean."""
    from collections import Counter

    from common.data import make_chain

    counts = Counter(e["skill"] for e in make_chain().test[:n_prompts])
    for mode in ("greedy", "sampled"):
        per_skill = {k.split("/")[-1]: v for k, v in row.items() if k.startswith(f"eval/acc_{mode}/")}
        assert set(per_skill) == set(counts), (mode, per_skill, counts)
        weighted = sum(per_skill[s] * c for s, c in counts.items()) / n_prompts
        assert abs(weighted - row[f"eval/acc_{mode}"]) < 1e-9
