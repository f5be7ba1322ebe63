"""common/: the chain task and faithfulness, tokenizer round trip, sampling records."""

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_command
from transformers import AutoTokenizer

from common.data import Task, check_skills, load_task, of_skills
from common.model import load_policy, prompt_text
from common.sampling import sample, token_logprobs, unfaithful
from common.verifier import is_correct
from common.world import task_named
from common.world.chain import (
    CHAIN_SKILLS,
    DEFAULT_TARGET,
    RARE_SKILL,
    SKILLS,
    carried_solution,
    chain_question,
    chain_steps,
    faithful,
    format_solution,
    has_wrong_step,
    make_chain,
    misread_solution,
    parse_chain_question,
    plus_for_times_solution,
    slipped_solution,
)
from common.world.tiny import (
    EOS,
    SHIPPED,
    TinySpec,
    build_tiny,
    data_fingerprint,
    shipped_model,
    tiny_config,
    train_tokenizer,
    warmup_texts,
)

QUESTION = "What is 12+7-5+3?"


@pytest.mark.parametrize(
    "response, correct, steps_faithful",
    [
        ("12+7=19 19-5=14 14+3=17 #### 17", True, True),
        ("12+7=19 19-5=15 14+3=17 #### 17", True, False),  # wrong step not carried forward
        ("12+7=19 19-5=14 14+3=18 #### 17", True, False),  # last step wrong, answer right
        ("12+7=19 19-5=14 #### 17", True, False),  # a step missing
        ("12+7=19 19-5=14 14-3=11 #### 17", True, False),  # wrong operator
        ("12+7=19 19-5=15 15+3=18 #### 18", False, False),  # wrong step carried to a wrong answer
        ("12+7=19 19-5=14 14+3=17 #### 18", False, False),
    ],
)
def test_chain_faithfulness_checker(response, correct, steps_faithful):
    assert is_correct(response, "17") is correct
    assert faithful(QUESTION, response) is steps_faithful
    task = make_chain()
    assert task.faithful(QUESTION, response) is steps_faithful  # the world's step check, as the scripts read it
    example = {"question": QUESTION, "answer": "17"}
    assert unfaithful(task, [example], [response], [correct]) == [correct and not steps_faithful]


def test_chain_generator():
    assert parse_chain_question(QUESTION) == ([12, 7, 5, 3], ["+", "-", "+"])
    assert format_solution(chain_steps([12, 7, 5, 3], ["+", "-", "+"]), 17) == "12+7=19 19-5=14 14+3=17 #### 17"
    assert chain_question([4, 2, 1], ["*", "-"]) == "What is 4*2-1?"
    assert chain_question([4, 2, 1], ["+", "-"], in_words=True) == "What is four plus two minus one?"
    assert parse_chain_question("What is four plus two minus one?") == ([4, 2, 1], ["+", "-"])
    assert format_solution(chain_steps([4, 3, 5], ["*", "-"]), 7) == "4*3=12 12-5=7 #### 7"


def test_chain_splits_fixed_disjoint_and_mixed():
    task, again = make_chain(0), make_chain(0)
    assert task.test == again.test and task.train == again.train, "splits are fixed by the seed"
    assert make_chain(1).test != task.test
    questions = [[e["question"] for e in split] for split in (task.train, task.validation, task.test)]
    assert len(set().union(*map(set, questions))) == sum(map(len, questions)), "splits are disjoint"
    pool = len(task.train) + len(task.validation) + len(task.test)
    for split in (task.train, task.validation, task.test):  # every split carries the pool's skill mix
        for skill in CHAIN_SKILLS:
            share = len(of_skills(split, [skill.name])) / len(split)
            assert abs(share - skill.pool_share) < 0.01, (skill.name, share)
    assert SKILLS[RARE_SKILL].pool_share <= 0.15, "the rare skill is a minority of the pool"
    assert pool == sum(round(s.pool_share * pool) for s in CHAIN_SKILLS)


def test_task_names_its_target_skills():
    """A script reads the default target from the task; `chain` names its weak, learnable skill, others none."""
    assert make_chain().target_skills == (DEFAULT_TARGET,) == ("times",)
    assert Task("file", [], [], []).target_skills == ()


@pytest.mark.shape  # the import graph: run by the full suite
def test_plumbing_imports_without_the_world():
    """The world is built on the plumbing, never the reverse: loading data, models, rewards and samples imports
    no part of `common.world`; the run (the one place the world plugs in) imports neither `chain` nor `tiny`
    until one is asked for, so no import can go round in a circle. Nor is `common.fsdp` imported before a run
    shards (--fsdp)."""
    show = "print(sorted(m for m in sys.modules if m.startswith(('common.world', 'common.fsdp'))))"
    code = ("import sys, common.errors, common.flags, common.torchrun, common.verifier, common.data, common.model, "
            f"common.lora, common.sampling, common.folder; {show}; import common.run; {show}")  # fmt: skip
    out = run_command([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr[-2000:]
    plumbing, run = out.stdout.strip().splitlines()
    assert plumbing == "[]" and not any(f"'{m}'" in run for m in ("common.world.chain", "common.world.tiny",
                                                                   "common.fsdp")), run  # fmt: skip


def test_warmup_never_sees_a_held_out_question():
    named = lambda seed: task_named(SimpleNamespace(task="chain", seed=seed))  # noqa: E731
    task = named(1)
    assert task.test == named(7).test == make_chain(0).test, "one world for every run seed"
    held_out = {e["question"] for e in task.validation + task.test}
    assert not held_out & {p.rstrip("\n") for p, _ in warmup_texts(TinySpec())}


@pytest.mark.parametrize("skill", [s.name for s in CHAIN_SKILLS])
def test_every_skill_gold_accepted_and_corruptions_rejected(skill):
    rng = random.Random(0)
    examples = of_skills(make_chain(0).train, [skill])[:150]
    spec = SKILLS[skill]
    for ex in examples:
        operands, ops = parse_chain_question(ex["question"])
        assert spec.ops[0] <= len(ops) <= spec.ops[1] and ("*" in ops) == spec.times_first
        assert all(c >= 0 for *_, c in chain_steps(operands, ops)), "running values stay non-negative"
        assert is_correct(ex["solution"], ex["answer"]) and faithful(ex["question"], ex["solution"])
        assert not has_wrong_step(ex["solution"])
        slipped = slipped_solution(ex, rng)  # right answer, one wrong step: unfaithful
        assert is_correct(slipped, ex["answer"]) and not faithful(ex["question"], slipped)
        assert has_wrong_step(slipped)
        carried = carried_solution(ex, rng)  # wrong answer
        assert not is_correct(carried, ex["answer"]) and not faithful(ex["question"], carried)
        assert has_wrong_step(carried)
        misread = misread_solution(ex, rng)  # wrong answer, every step consistent with the misread operand
        assert not is_correct(misread, ex["answer"]) and not faithful(ex["question"], misread)
        assert not has_wrong_step(misread)


def test_skill_selection_and_errors(tmp_path):
    task = make_chain(0)
    words = of_skills(task.validation, ["words"])
    assert words and all(e["skill"] == "words" for e in words)
    assert check_skills(task, ["words", "times"], "--target-skills") == ["words", "times"]
    with pytest.raises(SystemExit, match="'wrods': unknown skill; the skills of chain are long, short, times, words"):
        check_skills(task, ["wrods"], "--target-skills")
    path = tmp_path / "plain.jsonl"
    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(30)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SystemExit, match="have no `skill` field"):
        check_skills(load_task(str(path)), ["words"], "--target-skills")
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": "1", "skill": "ab"[i % 2]}) + "\n"
                            for i in range(40)))  # fmt: skip
    assert {e["skill"] for e in load_task(str(path)).train} == {"a", "b"}, "a file's `skill` field is kept"


def test_warmup_flaw_kinds_in_configured_shares():
    spec = TinySpec(slip_fraction=0.3, carry_fraction=0.2, misread_fraction=0.1, plus_for_times=0.0)
    pairs = warmup_texts(spec)
    by_question = {e["question"]: e for e in make_chain(0).train}
    kinds = {"faithful": 0, "slipped": 0, "carried": 0, "misread": 0}
    skills = dict.fromkeys(SKILLS, 0)
    for prompt, completion in pairs:
        ex, solution = by_question[prompt.rstrip("\n")], completion.removesuffix(EOS)
        skills[ex["skill"]] += 1
        if faithful(ex["question"], solution):
            kinds["faithful"] += 1
        elif is_correct(solution, ex["answer"]):
            kinds["slipped"] += 1
        else:
            kinds["carried" if has_wrong_step(solution) else "misread"] += 1
    n = len(pairs)
    for kind, share in (("slipped", 0.3), ("carried", 0.2), ("misread", 0.1)):
        assert abs(kinds[kind] / n - share) < 0.03, (kind, kinds[kind] / n)
    for name, share in spec.warmup_shares:
        assert abs(skills[name] / n - share) < 0.02, (name, skills[name] / n)


def test_plus_for_times_misconception_share():
    skill, make = "times", plus_for_times_solution
    spec = TinySpec(plus_for_times=0.4, slip_fraction=0.0, carry_fraction=0.0, misread_fraction=0.0)
    by_question = {e["question"]: e for e in make_chain(0).train}
    pairs = [(by_question[p.rstrip("\n")], c.removesuffix(EOS)) for p, c in warmup_texts(spec)]
    own = [(e, c) for e, c in pairs if e["skill"] == skill]
    wrong = [c for e, c in own if c == make(e)]
    assert abs(len(wrong) / len(own) - 0.4) < 0.04
    assert all(e["solution"] == c for e, c in pairs if e["skill"] != skill), "other skills are untouched"
    assert all(not has_wrong_step(c) for c in wrong), "a consistent chain: the error is in the reading, not a step"
    assert plus_for_times_solution({"question": "What is 3*4-2?"}) == "3+4=7 7-2=5 #### 5"


def test_data_file_task(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"q": f"What is {i}+1?", "a": f"so #### {i + 1}"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(str(path), question_field="q", answer_field="a")
    assert len(task.train) + len(task.validation) + len(task.test) == 30
    assert all(e["answer"] == str(int(e["question"][8:-3]) + 1) for e in task.train)
    with pytest.raises(SystemExit, match="--question-field 'question'"):
        load_task(str(path))


def test_unknown_task_and_missing_file():
    with pytest.raises(SystemExit, match="--task 'chian': unknown task"):
        load_task("chian")
    with pytest.raises(SystemExit, match="--task 'chian': unknown task"):
        task_named(SimpleNamespace(task="chian", seed=0, question_field="question", answer_field="answer"))
    with pytest.raises(SystemExit, match="no such file"):
        load_task("missing.jsonl")


def test_tokenizer_round_trip(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["What is 12+7-5+3?\n", "12+7=19 19-5=14 #### 14", "  two  spaces, tabs\tand ünïcödé ✓"]:
        ids = reloaded(text)["input_ids"]
        assert reloaded.decode(ids) == text
        assert ids == tiny_tokenizer(text)["input_ids"]
    assert [reloaded.decode([i]) for i in reloaded("123")["input_ids"]] == ["1", "2", "3"], "digits stay single"


def test_tiny_build_is_deterministic_and_loadable(tmp_path):
    spec = TinySpec(hidden_size=32, layers=1, heads=2, sft_steps=3, sft_batch=4)
    build_tiny(str(tmp_path / "a"), spec, log=lambda *_: None)
    build_tiny(str(tmp_path / "b"), spec, log=lambda *_: None)
    (ma, ta), (mb, _) = load_policy(str(tmp_path / "a")), load_policy(str(tmp_path / "b"))
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert ta.eos_token == "<|endoftext|>" and ta.padding_side == "left"


def test_the_shipped_tiny_model_was_built_from_todays_settings_and_data():
    """Change a TinySpec setting or the `chain` task and this fails until the model is rebuilt
    (python -m common.world.tiny); a change to the warm-up code itself bumps TinySpec.recipe."""
    manifest = json.loads((Path(SHIPPED) / "tiny_spec.json").read_text())
    assert manifest["spec"] == json.loads(json.dumps(asdict(TinySpec()))), "settings changed: rebuild the model"
    assert manifest["warmup_sha1"] == data_fingerprint(), "the warm-up data changed: rebuild the model"
    shipped = AutoTokenizer.from_pretrained(SHIPPED)
    rebuilt = train_tokenizer((p + c for p, c in warmup_texts(TinySpec())), TinySpec().vocab_size)
    assert shipped.get_vocab() == rebuilt.get_vocab()
    config = tiny_config(rebuilt, TinySpec()).to_dict()
    saved = json.loads((Path(SHIPPED) / "config.json").read_text())
    assert {k: saved[k] for k in KEYS_OF_CONFIG} == {k: config[k] for k in KEYS_OF_CONFIG}
    assert shipped_model() == SHIPPED  # the weights match their checksum


KEYS_OF_CONFIG = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "eos_token_id"]  # fmt: skip


def test_load_policy_errors(tmp_path):
    with pytest.raises(SystemExit, match="--model ./no/such/folder: no such folder"):
        load_policy("./no/such/folder")
    with pytest.raises(SystemExit, match="could not load a model"):
        load_policy(str(tmp_path))  # a folder without a model


@pytest.fixture(scope="module")
def policy(random_model_dir):
    return load_policy(random_model_dir)


def _rollout(policy, temperature, n=6, on_token=None):
    model, tok = policy
    prompts = [tok(prompt_text(tok, q))["input_ids"] for q in ["What is 1+2?", "What is 12+7-5+3?"] * (n // 2)]
    g = torch.Generator().manual_seed(0)
    return sample(model, prompts, 12, temperature, tok.eos_token_id, tok.pad_token_id, generator=g, on_token=on_token)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_recomputation(policy, temperature):
    """Behaviour log-probs recorded at sampling time (KV cache, left padding) = a fresh forward pass."""
    r = _rollout(policy, temperature)
    with torch.no_grad():
        recomputed = token_logprobs(policy[0], r, temperature, chunk=7)  # chunks that do not divide
    assert torch.allclose(r.sampler_logprobs, recomputed, atol=1e-5)
    assert (r.sampler_logprobs[r.completion_mask == 0] == 0).all()


def test_completion_mask_stops_after_first_eos(policy):
    r = _rollout(policy, 1.5)
    eos = policy[1].eos_token_id
    for ids, mask in zip(r.completion_ids, r.completion_mask):
        hits = (ids == eos).nonzero()
        length = hits[0].item() + 1 if len(hits) else len(ids)
        assert mask[:length].all() and not mask[length:].any()


def test_topk_capture(policy):
    """dppo.py's record of mu's top-K, taken through the sampler's `on_token` hook."""
    import dppo

    model, _ = policy
    temperature, K = 0.7, 5
    record = dppo.TopKRecord(K)
    r = _rollout(policy, temperature, on_token=record)
    r.topk_ids, r.topk_logprobs = record.tensors()
    assert r.topk_ids.shape == (*r.sampler_logprobs.shape, K)
    real = r.completion_mask.bool()
    tokens = r.completion_ids
    assert (r.topk_ids == tokens[..., None]).any(-1)[real].all(), "the sampled token is always in the set"
    with torch.no_grad():
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, r.prompt_len - 1 : -1]
    # default position ids are shifted by the left padding; RoPE only sees relative positions, so logits match
    logp = F.log_softmax(logits.float() / temperature, -1)
    assert torch.allclose(logp.gather(-1, r.topk_ids)[real], r.topk_logprobs[real], atol=1e-4)


def test_token_logprobs_gradient_flows(policy):
    model, _ = policy
    r = _rollout(policy, 1.0)
    logp = token_logprobs(model, r, chunk=5)
    (logp.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


def test_chat_template_is_applied_for_instruct_models(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    assert prompt_text(tok, "What is 1+2?") == "What is 1+2?\n"  # no template: the bare question
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert prompt_text(tok, "What is 1+2?", " Be brief.") == "<user>What is 1+2? Be brief.<assistant>"


def test_gsm8k_offline_gives_a_clear_error():
    with pytest.raises(SystemExit, match="--task gsm8k: could not load openai/gsm8k"):
        load_task("gsm8k")


def test_unfaithful_is_right_with_wrong_steps():
    """`unfaithful`: right (the verifier's verdict), yet the written steps are not the question's; wrong responses
    never are, and a task that cannot check steps (no `faithful`) has none."""
    example = {"question": QUESTION, "answer": "17"}
    texts = ["12+7=19 19-5=14 14+3=17 #### 17", "12+7=19 19-5=15 14+3=17 #### 17",
             "12+7=19 19-5=15 15+3=18 #### 18", "12+7=19 19-5=15 14+3=17 #### 17"]  # fmt: skip
    correct = [True, True, False, False]  # the last: unfaithful steps, but judged wrong
    assert unfaithful(make_chain(), [example] * 4, texts, correct) == [False, True, False, False]
    assert unfaithful(make_chain(), [example], texts, correct) == [False, True, False, False]  # 4 completions of 1
    assert unfaithful(Task("file", [], [], []), [example] * 4, texts, correct) == [False] * 4


@pytest.mark.slow
def test_rebuilds_at_once_leave_one_whole_model_and_nothing_else(tmp_path):
    """Four rebuilds of the tiny model (small settings) into one folder at the same time: every one succeeds, the
    folder holds a model that loads, and no temporary or moved-aside folder is left."""
    code = ("import sys; from common.world.tiny import TinySpec, build_tiny; build_tiny(sys.argv[1], TinySpec("
            "hidden_size=32, layers=1, heads=2, sft_steps=3, sft_batch=4), log=lambda *_: None)")  # fmt: skip
    folder = tmp_path / "tiny_model"
    builds = [subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": ROOT}) for _ in range(4)]  # fmt: skip
    for build in builds:
        assert build.wait(timeout=300) == 0, build.stderr.read()[-2000:]
    assert os.listdir(tmp_path) == ["tiny_model"]
    assert shipped_model(str(folder)) == str(folder) and load_policy(str(folder))[0] is not None


def test_an_unreachable_hub_is_not_a_line_per_retry():
    """Without a network, huggingface_hub logs each of its retries as a warning before the one-line error."""
    import logging

    import common.model  # noqa: F401  (sets the hub's logging)

    assert logging.getLogger("huggingface_hub").getEffectiveLevel() >= logging.ERROR
