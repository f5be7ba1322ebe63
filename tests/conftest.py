"""Test session setup: no network, a private model cache, and a tiny random model saved to a temp folder."""

import json
import os
import signal
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download fails loudly
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process: the tests' tensors are tiny, and the
# subprocesses (torchrun ranks, command-line runs) then do not fight over the cores
if not os.path.exists("/dev/nvidia0"):  # no GPU: Triton kernels run in the interpreter, on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before a kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.world.tiny import TinySpec  # noqa: E402

# Small enough that a forward pass costs milliseconds; the same architecture as the real `tiny`.
RANDOM_SPEC = TinySpec(hidden_size=32, layers=2, heads=2, sft_steps=0)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Never read or write the user's tiny-model cache from tests."""
    os.environ["TINYRLVR_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """A run started in the test process installs its own handlers for Ctrl-C, SIGTERM and SIGHUP (and a run that
    stops with an error leaves them): the test session gets its own back after every test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from common.world.tiny import train_tokenizer, warmup_texts

    return train_tokenizer((p + c for p, c in warmup_texts(RANDOM_SPEC)), RANDOM_SPEC.vocab_size)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory, tiny_tokenizer):
    """A randomly initialised tiny Qwen2 + tokenizer saved with save_pretrained (what --model accepts)."""
    from common.world.tiny import random_model

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

    from common.world.chain import make_chain

    counts = Counter(e["skill"] for e in make_chain().test[:n_prompts])
    for mode in ("greedy", "sampled"):
        per_skill = {k.split("/")[-1]: v for k, v in row.items() if k.startswith(f"eval/acc_{mode}/")}
        assert set(per_skill) == set(counts), (mode, per_skill, counts)
        weighted = sum(per_skill[s] * c for s, c in counts.items()) / n_prompts
        assert abs(weighted - row[f"eval/acc_{mode}"]) < 1e-9


def help_entries(script) -> dict[str, str]:
    """`python <script> --help`, as {flag: its help text} (the flag's first name; the text joined into one line)."""
    out = run_command([sys.executable, script, "--help"], env={**os.environ, "PYTHONPATH": ROOT, "COLUMNS": "400"})
    assert out.returncode == 0, out.stderr[-2000:]
    entries, flag = {}, None
    for line in out.stdout.splitlines():
        starts_a_flag = line.lstrip("│").startswith(" --")  # a continuation line is indented to the text column
        line = line.strip(" │╭╮╰╯─")
        if starts_a_flag:
            head, _, text = line.partition("  ")  # the flag and its metavar, then (after 2+ spaces) the text
            flag = head.split(",")[0].split()[0]
            entries[flag] = text.strip()
        elif flag and line:
            entries[flag] = f"{entries[flag]} {line.strip()}".strip()
    return entries


def shown_default(value) -> str:
    """A default as tyro prints it in --help."""
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "''" if value == "" else str(value)


def check_help(script, args_class):
    """Every field of Args is a flag in --help, with a sentence of help and the default Args really has."""
    import dataclasses

    entries = help_entries(script)
    for field in dataclasses.fields(args_class):
        flag = "--" + field.name.replace("_", "-")
        assert flag in entries, f"{script} --help does not list {flag}"
        text = entries[flag]
        default = f"(default: {shown_default(field.default)})"
        assert default in text, f"{script} --help: {flag} shows {text!r}, but Args has {default}"
        assert text.replace(default, "").strip(), f"{script} --help: {flag} has no help line: {text!r}"


COIN_LOGIT = 40.0  # the two coin tokens' logit; every other token's is 1, so each has probability < e^-26 at T <= 1.5


def make_coin_flip(model, coin_ids):
    """Set a tied-embedding Qwen2's weights so that it flips the same fair coin between the two `coin_ids` at
    every position, whatever the input: each has probability 1/2 at any temperature.

    How: every layer's output projections (o_proj, down_proj) are zero, so the residual stream is the last
    token's embedding (the layers' other weights stay random, so their gradients are not all zero); every
    embedding row is a positive multiple s_v of the all-ones vector, so the final RMSNorm maps it to the same
    h = ones for every token; with tied embeddings the logits are <s_v ones, h> = s_v x hidden: 40 for the
    two coin tokens and 1 for every other."""
    assert model.config.tie_word_embeddings
    hidden = model.config.hidden_size
    scale = torch.full((model.config.vocab_size,), 1.0 / hidden)  # >> sqrt(RMSNorm eps): the norm is exact
    scale[list(coin_ids)] = COIN_LOGIT / hidden
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
            elif name == "model.norm.weight":
                p.fill_(1.0)
        model.get_input_embeddings().weight.copy_(scale[:, None].expand(-1, hidden))
    return model


@pytest.fixture(scope="session")
def coin_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny tokenizer with a model that flips a fair coin between `1` and EOS at every position
    (`make_coin_flip`): a completion is exactly `1` with probability 1/4, on every processor (the draws come
    from the seeded generator; no rounding decides them), so tests can rely on mixed rewards with a bound
    computed from that 1/4 instead of on a lucky draw."""
    from common.world.tiny import random_model

    coin = [tiny_tokenizer.convert_tokens_to_ids("1"), tiny_tokenizer.eos_token_id]
    model = make_coin_flip(random_model(tiny_tokenizer, RANDOM_SPEC), coin)
    folder = str(tmp_path_factory.mktemp("coin_model"))
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def coin_task(tmp_path_factory):
    """Questions whose answer is 1 (with a gold solution, for ippo.py), for `coin_model_dir`: a completion is right
    with probability 1/4, so a group of 8 has equal rewards with probability (3/4)^8 + (1/4)^8 < 0.101, and the 8
    groups of a step with p < 1e-8."""
    path = tmp_path_factory.mktemp("data") / "coin.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {a}-{a - 1}?", "answer": "1", "solution": "1"}) + "\n"
                            for a in range(1, 101)))  # fmt: skip
    return str(path)


def per_script(small: dict, steps_per_stage: int = 1) -> dict:
    """Each script's smallest settings: `small` (the flags every script has) and what its own idea needs."""
    return {"grpo": small, "pods": {**small, "m": 2}, "dppo": small,
            "ippo": {**small, "val_prompts": 2, "score_batch": 2},
            "cropi": {**small, "steps_per_stage": steps_per_stage, "pool_responses": 2, "val_responses": 2,
                      "val_prompts": 2, "score_batch": 4}}  # fmt: skip
