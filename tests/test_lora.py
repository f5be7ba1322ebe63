"""LoRA (--lora-rank): the adapter starts as the base model and only the adapter trains; the KL reference is the
base (the policy with its adapter off, no second copy); a checkpoint is an ordinary transformers folder with the
adapter folded in, beside the adapter alone, from which --resume goes on exactly; cropi.py and ippo.py score the
adapter's gradients. On the suite's 2-layer Qwen2 and on a 2-layer llama."""

import pytest
import torch
from conftest import metric_rows, per_script
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import cropi
import dppo
import grpo
import ippo
import pods
from common.flags import parse_args
from common.lora import AdapterOff, add_lora, load_adapter, merged_state_dict, save_adapter
from common.model import load_policy, matching_parameters, trainable_parameters

SCRIPTS = {"grpo": grpo, "pods": pods, "dppo": dppo, "cropi": cropi, "ippo": ippo}
SMALL = dict(steps=2, batch_prompts=2, n=2, eval_prompts=2, eval_every=2, max_new_tokens=4)
SCRIPT_SMALL = per_script(SMALL, steps_per_stage=1)
LORA = dict(lora_rank=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def llama_model_dir(tmp_path_factory, random_model_dir):
    """A random 2-layer llama with the suite's tiny tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("llama_model"))
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(params=["qwen2", "llama"])
def model_dir(request, random_model_dir, llama_model_dir):
    return random_model_dir if request.param == "qwen2" else llama_model_dir


def moved_adapter(model_dir):
    """The model with a rank-4 adapter whose B is no longer 0, as after some training; and the base model."""
    base, _ = load_policy(model_dir)
    model = add_lora(load_policy(model_dir)[0], 4, 8.0, "q_proj,v_proj,down_proj")
    generator = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.1
    return model, base


def varying_reward(example, text, form=None):
    """A random model rarely answers right; a reward by the parity of the text's length varies within a group."""
    return float(len(text) % 2)


IDS = torch.tensor([[5, 9, 2, 7, 11, 3]])


def test_the_adapter_starts_as_the_base_model_and_only_the_adapter_trains(model_dir):
    base, _ = load_policy(model_dir)
    model = add_lora(load_policy(model_dir)[0], 4, 8.0, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    assert torch.equal(model(IDS).logits, base(IDS).logits)  # B = 0
    trained = {id(p) for p in trainable_parameters(model, "")}
    names = [name for name, p in model.named_parameters() if id(p) in trained]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert len(names) == 2 * 7 * 2  # A and B of 7 projections in each of 2 layers
    assert [name for name, _ in matching_parameters(model, "")] == names  # what cropi.py and ippo.py score


def test_a_pattern_adapts_only_the_layers_it_names(random_model_dir):
    """`--lora-modules` as a regular expression over full names: here the top layer of two, so the backward pass
    stops there."""
    model = add_lora(load_policy(random_model_dir)[0], 4, 8.0, r".*layers\.1\..*_proj")
    names = [name for name, _ in matching_parameters(model, "")]
    assert len(names) == 2 * 7 and all(".layers.1." in name for name in names)


def test_the_reference_is_the_base_model_with_the_adapter_off(model_dir):
    model, base = moved_adapter(model_dir)
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, base(IDS).logits)
        assert torch.equal(AdapterOff(model)(IDS).logits, base(IDS).logits)
        adapted = model(IDS).logits  # switched back on afterwards
    assert torch.equal(adapted, model(IDS).logits)


def test_merged_weights_load_as_an_ordinary_model_and_the_adapter_reloads_exactly(model_dir, tmp_path):
    model, base = moved_adapter(model_dir)
    model.save_pretrained(tmp_path / "merged", state_dict=merged_state_dict(model))
    args = type("Args", (), dict(lora_rank=4, lora_alpha=8.0, lora_modules="q_proj,v_proj,down_proj"))
    save_adapter(model, str(tmp_path / "merged" / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, model(IDS).logits, atol=1e-5)  # W + (alpha / r) B A
        reloaded = load_adapter(load_policy(model_dir)[0], str(tmp_path / "merged" / "adapter"), args)
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    unadapted = {k: v for k, v in base.state_dict().items() if not any(m in k for m in ("q_proj", "v_proj", "down"))}
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in unadapted.items())


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.slow] * (s != "grpo")) for s in SCRIPTS])
def test_every_script_trains_the_adapter_with_the_base_as_reference_and_saves_a_model(script, model_dir, tmp_path,
                                                                                        monkeypatch):  # fmt: skip
    """--beta > 0: the KL to the reference starts at 0 (the adapter starts at B = 0) and grows; the saved model
    differs from the base only in the adapted layers."""
    module = SCRIPTS[script]
    monkeypatch.setattr(module, "reward", varying_reward)
    args = dict(model=model_dir, output_dir=str(tmp_path), run_name="r", beta=0.1, lr=1e-2, **LORA,
                **SCRIPT_SMALL[script] | dict(steps=3))  # fmt: skip
    module.main(module.Args(**args))
    checkpoint = next((tmp_path / "r" / "checkpoints").iterdir())
    assert (checkpoint / "adapter" / "adapter_model.safetensors").exists()
    saved, base = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict(), load_policy(model_dir)[0].state_dict()
    assert saved.keys() == base.keys()
    changed = {k for k in saved if not torch.equal(saved[k], base[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    kl = [r["policy/kl_ref"] for r in metric_rows(tmp_path / "r", "policy/kl_ref")]
    assert 0 <= kl[0] < kl[-1]  # 0 before the first optimizer step of step 1


def test_a_resumed_lora_run_logs_what_the_straight_run_logs(random_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "reward", varying_reward)
    base = dict(model=random_model_dir, output_dir=str(tmp_path), batch_prompts=2, n=4, eval_prompts=4, eval_every=2,
                log_every=1, max_new_tokens=6, lr=1e-2, beta=0.1, **LORA)  # fmt: skip
    grpo.main(grpo.Args(**base, steps=4, run_name="straight"))
    grpo.main(grpo.Args(**base, steps=2, run_name="stopped"))
    grpo.main(parse_args(grpo.Args, ["--resume", str(tmp_path / "stopped"), "--steps", "4"]))
    timeless = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]  # noqa: E731
    assert timeless(metric_rows(tmp_path / "stopped")) == timeless(metric_rows(tmp_path / "straight"))
