"""LoRA (peft): a low-rank adapter on the policy's linear layers, the base weights frozen. The adapter switched off
is the base model (a LoRA run's KL reference, with no second copy); a checkpoint holds the adapter folded in (an
ordinary model) and the adapter alone (what --resume puts back on the base)."""

import os
import re

import torch

from common.errors import fail
from common.model import load_policy

LORA_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # llama's and qwen2's attention and MLP


def add_lora(model, rank: int, alpha: float, modules: str):
    """W x + (alpha / rank) B A x on the linear layers `modules` names, B = 0 at the start so the policy starts as
    the base model; only A and B train. `modules`: comma-separated names (`q_proj,v_proj`: in every layer) or a
    regular expression over the layers' full names (`.*layers\\.2[2-9]\\..*_proj`: the top 8 of 30 layers)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        fail("--lora-rank: LoRA needs peft; install it with: pip install -r requirements-real.txt")
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    names = [m.strip() for m in modules.split(",") if m.strip()]
    target = names if re.fullmatch(r"[\w,\s]*", modules) else modules  # peft reads a string as a pattern
    try:
        unmatched = ([n for n in names if not any(full.endswith("." + n) for full in linear)] or ["it"] * (not names)
                     if target is names else ["it"] * (not any(re.fullmatch(target, full) for full in linear)))
    except re.error as e:
        fail(f"--lora-modules {modules!r}: not a regular expression ({e})")
    if unmatched:
        fail(f"--lora-modules {modules!r}: {', '.join(unmatched)} matches no linear layer of the model; its linear"
             f" layers are {', '.join(sorted({full.rsplit('.', 1)[-1] for full in linear}))}")  # fmt: skip
    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=target, lora_dropout=0.0), model)


def lora_layers(model) -> list:
    """The layers that carry an adapter: none without LoRA."""
    return [m for m in model.modules() if hasattr(m, "lora_A")]


class AdapterOff:
    """The policy with its adapter switched off, called like a model: the base model."""

    def __init__(self, policy):
        self.policy, self.layers = policy, lora_layers(policy)  # found once: the adapter's layers do not change

    def __getattr__(self, name):  # parameters, base_model, get_output_embeddings: the policy's own
        return getattr(self.policy, name)

    def __call__(self, *args, **kwargs):
        switch = lambda on: [layer.enable_adapters(on) for layer in self.layers]  # noqa: E731
        switch(False)
        try:
            return self.policy(*args, **kwargs)
        finally:
            switch(True)


def reference_policy(model, path: str):
    """The KL reference, the initial policy: with LoRA the policy with its adapter off, else a copy from `path`."""
    if lora_layers(model):
        return AdapterOff(model)
    return load_policy(path, model.dtype, next(model.parameters()).device)[0].eval()


def merged_state_dict(model) -> dict:
    """The weights with the adapter folded in, W + (alpha / rank) B A, under the base model's own names: an
    ordinary model that `from_pretrained` loads. The model itself is left as it is."""
    deltas = {name: m.get_delta_weight("default") for name, m in model.named_modules() if hasattr(m, "lora_A")}
    merged = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".base_layer.")  # `...q_proj.base_layer.weight`: an adapted layer's own
        if owner and leaf == "weight":
            value = (value + deltas[owner]).to(value.dtype)
        if ".lora_" not in key:
            merged[f"{owner}.{leaf}" if owner else key] = value
    return merged


def save_adapter(model, folder: str):
    """The adapter alone, in peft's layout (`PeftModel.from_pretrained` reads it): --resume puts it back on the base."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    model.peft_config["default"].save_pretrained(folder)
    weights = {f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(weights, os.path.join(folder, "adapter_model.safetensors"))


def load_adapter(model, folder: str, args):
    """The base model with the saved adapter of a LoRA run on it (--lora-* as the run had them), to train on."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    add_lora(model, args.lora_rank, args.lora_alpha, args.lora_modules)
    weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, {k.removeprefix("base_model.model."): v for k, v in weights.items()})
    if result.unexpected_keys:
        raise ValueError(f"the adapter has weights the model lacks ({result.unexpected_keys[0]}, ...)")
    return model
