"""CROPI: POPI gradient, selection rules, and cropi.py end to end."""

import json
import sys

import pytest
import torch
from conftest import RANDOM_SPEC, check_help, metric_rows, run_command

import cropi
from common.data import of_skills
from common.model import matching_parameters
from common.world.chain import make_chain


def logits_case(K=4, L=5, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(K, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(V, (K, L), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    return logits, logp, mask


def test_popi_at_behaviour_equals_on_policy_grpo_gradient():
    """theta = beta (rho = 1): grad J = (1/K) sum_j A_j (1/|y_j|) sum_t grad log pi, REINFORCE with the
    group baseline and std normalisation, written by hand."""
    logits, logp, mask = logits_case()
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    (grad,) = torch.autograd.grad(cropi.popi_objective(logp, logp.detach(), rewards, mask), logits, retain_graph=True)
    A = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    hand = sum(A[j] * (logp[j] * mask[j]).sum() / mask[j].sum() for j in range(4)) / 4
    (want,) = torch.autograd.grad(hand, logits)
    torch.testing.assert_close(grad, want)


def test_popi_equal_rewards_give_exactly_zero():
    logits, logp, mask = logits_case()
    behaviour = logp.detach() + 0.3
    (grad,) = torch.autograd.grad(cropi.popi_objective(logp, behaviour, torch.ones(4), mask), logits)
    assert (grad == 0).all()


def test_popi_clipping_drops_out_of_range_improving_tokens():
    logp = torch.tensor([[-0.1, -0.1], [-0.1, -0.1]], requires_grad=True)
    behaviour = torch.tensor([[-1.0, -0.1], [-0.1, -1.0]])  # rho = e^0.9 (out of range) or 1
    rewards, mask = torch.tensor([1.0, 0.0]), torch.ones(2, 2)
    (grad,) = torch.autograd.grad(cropi.popi_objective(logp, behaviour, rewards, mask, clip=0.2), logp)
    assert grad[0, 0] == 0  # A > 0, rho > 1.2: clipped, contributes nothing
    assert grad[0, 1] != 0 and grad[1, 0] != 0
    assert grad[1, 1] != 0  # A < 0 with rho > 1.2: min keeps the unclipped term


def test_popi_matches_finite_differences_on_a_model(random_model_dir):
    from common.model import load_policy
    from common.sampling import sample, token_logprobs

    model, tok = load_policy(random_model_dir)
    model = model.double()
    prompts = [tok("What is 1+2?\n")["input_ids"]] * 4
    rollout = sample(
        model, prompts, 6, 0.5, tok.eos_token_id, tok.pad_token_id, generator=torch.Generator().manual_seed(0)
    )
    rewards, mask = torch.tensor([1.0, 0.0, 0.0, 1.0]), rollout.completion_mask.double()
    weight = model.get_output_embeddings().weight
    objective = lambda: cropi.popi_objective(
        token_logprobs(model, rollout, 0.5), rollout.sampler_logprobs.double(), rewards, mask
    )
    (grad,) = torch.autograd.grad(objective(), weight)
    h = 1e-3  # token_logprobs works in fp32: a larger step keeps rounding below the tolerance

    def slope(direction):  # central finite difference of the objective along `direction`
        with torch.no_grad():
            weight.add_(h * direction)
            up = objective()
            weight.sub_(2 * h * direction)
            down = objective()
            weight.add_(h * direction)
        return (up - down).item() / (2 * h)

    # Along the gradient the slope is |grad|^2, large: a relative check. Along a fixed random direction the
    # slope may be near 0, so the check there is absolute, against the largest slope possible, |grad| |d|.
    assert slope(grad) == pytest.approx(grad.square().sum().item(), rel=5e-4)
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=weight.dtype)
    assert abs(slope(direction) - (grad * direction).sum().item()) <= 5e-4 * (grad.norm() * direction.norm()).item()


def test_reciprocal_rank_fusion_by_hand():
    inf = -torch.inf
    tables = torch.tensor([[0.9, 0.8, 0.1, 0.5, inf], [0.1, 0.9, 0.8, 0.2, inf]])
    # top-2 lists: set 0 -> [0, 1], set 1 -> [1, 2]; fused: 0: 1, 1: 1/2 + 1 = 1.5, 2: 1/2
    assert cropi.reciprocal_rank_fusion(tables, 2).tolist() == [1, 0]
    assert cropi.reciprocal_rank_fusion(tables[:1], 3).tolist() == [0, 1, 3]  # one set: top-n by score
    ties = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    assert cropi.reciprocal_rank_fusion(ties, 2).tolist() == [0, 1]  # ties go to the lower index
    assert 4 not in cropi.reciprocal_rank_fusion(tables, 4).tolist()  # zero gradient: never picked


def test_selection_count_is_floor_rho_n():
    scores = torch.randn(2, 97, generator=torch.Generator().manual_seed(1))
    assert len(cropi.reciprocal_rank_fusion(scores, int(0.1 * 97))) == 9


def test_cosine_scores_mark_zero_vectors():
    z = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    s = cropi.cosine_scores(z, torch.tensor([1.0, 0.0]))
    assert s[0] == pytest.approx(1.0) and s[1] == -torch.inf and s[2] == pytest.approx(0.5**0.5)


def test_pass_rate_selection_prefers_half_solved():
    rewards = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    assert cropi.pass_rate_selection(rewards, 2).tolist() == [1, 3]


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(select_ratio=0.0), "--select-ratio"),
        (dict(select_ratio=1.5), "--select-ratio"),
        (dict(proj_ratio=0.0), "--proj-ratio"),
        (dict(proj_ratio=2.0), "--proj-ratio"),
        (dict(proj_dim=0), "--proj-dim"),
        (dict(steps=0), "--steps"),
        (dict(steps_per_stage=0), "--steps-per-stage"),
        (dict(grad_params="("), "--grad-params"),
    ],
)
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(SystemExit, match=message):
        cropi.check_args(cropi.Args(**kw), world=1)


def test_target_defaults_to_the_learnable_weak_skill_and_bad_targets_are_refused():
    task = make_chain(seed=0)
    skills = cropi.target_skills(task, cropi.Args())
    assert skills == ["times"]
    (times,) = cropi.validation_sets(task, skills, world=1)
    assert times and {e["skill"] for e in times} == {"times"}
    two = cropi.validation_sets(task, cropi.target_skills(task, cropi.Args(target_skills=("words", "times"))), 1)
    assert [{e["skill"] for e in v} for v in two] == [{"words"}, {"times"}]  # one set each, fused by RRF
    with pytest.raises(SystemExit, match="'word': unknown skill; the skills of chain are long, short, times, words"):
        cropi.target_skills(task, cropi.Args(target_skills=("word",)))
    few = type(task)(**{**task.__dict__, "validation": of_skills(task.validation, ["words"])[:5]})
    with pytest.raises(SystemExit, match="--target-skills words: only 5 validation prompts of that skill"):
        cropi.validation_sets(few, ["words"], world=1)
    bare = lambda split: [{"question": e["question"], "answer": e["answer"]} for e in split]  # noqa: E731
    plain = type(task)("file.jsonl", bare(task.train), bare(task.validation[:20]), bare(task.test))
    assert cropi.validation_sets(plain, cropi.target_skills(plain, cropi.Args()), 1) == [plain.validation]
    with pytest.raises(SystemExit, match="have no `skill` field"):
        cropi.target_skills(plain, cropi.Args(target_skills=("words",)))


def test_target_evaluation_samples_each_prompt_k_times(monkeypatch):
    """--target-samples k: greedy answers each prompt once, sampling answers it k times, and the accuracy is
    the share of every sample the verifier judges right (here prompt a is always right, b right in 1 of 3
    samples: (3 + 1) / 6)."""
    import common.run

    seen = []

    def answers(model, tokenizer, questions, instruction, max_new_tokens, temperature, greedy, generator):
        seen.append((greedy, list(questions)))
        right = {"a": iter(["#### 1"] * 3), "b": iter(["#### 2", "#### 0", "#### 0"])}
        return [next(right[q]) if not greedy else "#### 1" for q in questions]

    monkeypatch.setattr(common.run, "rollout_texts", answers)
    task = type(make_chain(seed=0))("file.jsonl", [], [], [{"question": "a", "answer": "1", "skill": "x"},
                                                          {"question": "b", "answer": "2", "skill": "y"}])
    metrics = common.run.held_out_metrics(None, None, task, cropi.reward, None, 2, 8, 1.0, None, samples=3)
    assert seen == [(True, ["a", "b"]), (False, ["a", "a", "a", "b", "b", "b"])]
    assert metrics["eval/acc_greedy"] == 0.5 and metrics["eval/acc_sampled"] == pytest.approx(4 / 6)
    assert metrics["eval/acc_sampled/x"] == 1.0 and metrics["eval/acc_sampled/y"] == pytest.approx(1 / 3)


# ---- end to end -----------------------------------------------------------------------------------------


def test_help_documents_every_flag():
    check_help("cropi.py", cropi.Args)


SMALL = ["--steps", "2", "--steps-per-stage", "1", "--batch-prompts", "2", "--n", "2", "--pool-responses", "2",
         "--val-responses", "4", "--eval-prompts", "4", "--eval-every", "1", "--max-new-tokens", "16",
         "--proj-dim", "32", "--score-batch", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def warm_model_dir(tmp_path_factory):
    """A tiny model given a short warm-up, so that some stored groups have mixed rewards."""
    from dataclasses import replace

    from common.world.tiny import build_tiny

    folder = str(tmp_path_factory.mktemp("warm") / "model")
    build_tiny(folder, replace(RANDOM_SPEC, sft_steps=250, sft_batch=32), log=lambda *a: None)
    return folder


@pytest.fixture(scope="module")
def coin_file(tmp_path_factory):
    """100 questions whose answer is 1 (10 held out for validation, 10 for test), for `coin_model_dir`: each
    stored response is right (exactly `1`) with probability 1/4, so a validation group of 8 has equal
    rewards with probability (3/4)^8 + (1/4)^8 < 0.101, and all 10 groups with probability < 1e-9."""
    rows = [{"question": f"What is {a}-{a - 1}?", "answer": "1"} for a in range(1, 101)]
    path = tmp_path_factory.mktemp("data") / "coin.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run(args):
    return run_command([sys.executable, "cropi.py", *args], timeout=600)


def train_rows(run_dir):
    return metric_rows(run_dir, "reward/mean")


@pytest.mark.parametrize("selection", ["cropi", "full", "random", "pass-rate"])
def test_smoke_run_each_selection(selection, coin_model_dir, coin_file, tmp_path):
    out = run(["--model", coin_model_dir, "--task", coin_file, "--output-dir", str(tmp_path), "--run-name", "r",
               "--selection", selection, *SMALL, "--val-responses", "8"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    stage_rows = [r for r in rows if "select/count" in r]
    assert [r["stage"] for r in stage_rows] == [0, 1]
    assert (tmp_path / "r" / "store_rank0_of_1.pt").exists()
    if selection == "cropi":
        assert "score/zero_gradient_prompts" in stage_rows[0] and stage_rows[0]["score/abs_log_ratio"] < 1e-4


@pytest.mark.slow
def test_torchrun_two_processes(coin_model_dir, coin_file, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--", "cropi.py"]
    out = run_command([*torchrun, "--model", coin_model_dir, "--task", coin_file, "--output-dir", str(tmp_path),
                       "--run-name", "ddp", *SMALL, "--val-responses", "8"],
                      timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in train_rows(tmp_path / "ddp")] == [1, 2]


def test_a_target_skill_is_evaluated_with_the_script_s_reward(coin_model_dir, tmp_path):
    """With a target skill (here a file's one skill), every evaluation also logs the target's accuracy
    (`eval_target/*`: greedy, and --target-samples samples per target test prompt), through the run's evaluation
    and cropi.py's reward; a stage's line reports how long its scoring took."""
    path = tmp_path / "ones.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {a}-{a - 1}?", "answer": "1", "skill": "ones"}) + "\n"
                            for a in range(1, 101)))  # fmt: skip
    cropi.main(cropi.Args(model=coin_model_dir, task=str(path), output_dir=str(tmp_path), run_name="r", steps=1,
                          steps_per_stage=1, batch_prompts=2, n=2, pool_responses=2, val_responses=8, eval_prompts=4,
                          eval_every=1, max_new_tokens=16, proj_dim=32, score_batch=8, target_skills=("ones",),
                          target_samples=2))  # fmt: skip
    evals = metric_rows(tmp_path / "r", "eval_target/acc_sampled")
    assert [r["step"] for r in evals] == [0, 1]
    assert all(0 <= r[f"eval_target/acc_{mode}"] <= 1 for r in evals for mode in ("greedy", "sampled"))


def test_validation_without_usable_prompt_is_a_clear_error(random_model_dir, tmp_path):
    """Answers no model guesses: every stored group has equal (zero) rewards."""
    path = tmp_path / "impossible.jsonl"
    path.write_text(
        "".join(json.dumps({"question": f"What is {i}+1?", "answer": "987654321"}) + "\n" for i in range(60))
    )
    out = run(["--model", random_model_dir, "--task", str(path), "--output-dir", str(tmp_path), *SMALL])
    assert out.returncode != 0 and "no validation gradient exists" in out.stderr and "Traceback" not in out.stderr


def precision_at(projected: torch.Tensor, exact: torch.Tensor, share: float = 0.1) -> float:
    """Share of the exact top `share` of prompts that the projected top `share` finds."""
    n = max(1, int(share * len(exact)))
    top = lambda s: set(torch.sort(s, descending=True, stable=True).indices[:n].tolist())
    return len(top(projected) & top(exact)) / n


@pytest.fixture(scope="module")
def pool_and_target_gradients(warm_model_dir):
    """Real POPI gradients of a briefly warmed tiny model: 100 pool prompts and a target (the mean of 20
    more), 4 sampled responses each. The rewards are drawn at random: the gradient does not care."""
    from common.model import load_policy
    from common.sampling import sample

    model, tok = load_policy(warm_model_dir)
    g = torch.Generator().manual_seed(0)
    questions = [e["question"] for e in make_chain(seed=0).train[:120]]
    prompts = [tok(q + "\n")["input_ids"] for q in questions for _ in range(4)]
    rollout = sample(model, prompts, 24, 1.0, tok.eos_token_id, tok.pad_token_id, generator=g)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])[torch.stack([torch.randperm(4, generator=g) for _ in questions])]
    groups = [{"rollout": rollout.select(torch.arange(4 * i, 4 * i + 4)), "shaped": r} for i, r in enumerate(rewards)]
    params = matching_parameters(model, "")
    grads = cropi.popi_gradients(model, groups, params, cropi.Args(store_temperature=1.0))[0]
    return grads[:100], grads[100:].mean(0)


@pytest.mark.parametrize("mode", ["sjlt", "rademacher"])
def test_ranking_fidelity_on_a_tiny_model(pool_and_target_gradients, mode):
    """Spec test 4: projected cosines find the exact top 10% about as well as the projection's error allows.

    A k-dimensional random projection estimates a cosine with an error of sd at most 1/sqrt(k) (exactly
    (1 - cos^2)/sqrt(k) for a Gaussian map). How much precision@10% such an error costs depends on how the
    exact cosines crowd around the top-10% threshold, which differs from one pool of gradients to another
    (and so from one processor's samples to another's). So the bar is computed from this pool: the precision
    the exact cosines keep under independent N(0, 1/k) errors (400 simulated draws; an upper bound on the
    error, so a conservative bar), less 0.15 (a map's precision, counted in tenths, has an sd of about 0.07,
    so the mean over 5 maps has one of about 0.03: the margin is 4-5 sd). k is the smallest power of 2 with
    spread x sqrt(k) >= 8, where the expected loss is about 0.7 / 8 ~ 0.1 (for normal cosines the expected
    misses are N f(t) sd / sqrt(2 pi) = 100 x 0.175 x 0.4 / 8 ~ 0.9 of the 10). Measured over 9 pools x 2
    modes with 10 maps each, the mean precision was within -0.02 and +0.07 of the bar before the margin.
    All coordinates kept (p = 1): a coordinate subset adds an error that depends on how the gradient's energy
    is spread over coordinates, not only on k; `python -m experiments.projection_fidelity` measures it."""
    from kernels.projection import project

    pool, target = pool_and_target_gradients
    exact = torch.nn.functional.cosine_similarity(pool, target[None], dim=1)
    k = 2 ** int(torch.log2((8 / exact.std()) ** 2).ceil())
    assert k <= 4096, f"spread {exact.std():.3g} would need k = {k}: the case is too flat to test cheaply"
    noise = torch.Generator().manual_seed(0)
    simulated = sum(precision_at(exact + torch.randn(exact.shape, generator=noise) / k**0.5, exact)
                    for _ in range(400)) / 400  # fmt: skip
    precisions = []
    for seed in range(5):  # the claim is about a typical projection, so average over maps
        projected = project(torch.cat([pool, target[None]]), 0, k, 1.0, seed=seed, mode=mode)
        precisions.append(precision_at(cropi.cosine_scores(projected[:-1], projected[-1]), exact))
    measured = sum(precisions) / 5
    assert measured >= simulated - 0.15, f"k {k}: precision@10% {measured:.2f} against {simulated:.2f} {precisions}"


@pytest.mark.parametrize("mode", ["sjlt", "gaussian"])
def test_kernels_flag_reaches_the_projection(random_model_dir, mode):
    """--kernels triton (the interpreter on a CPU) and --kernels torch score the same; a small parameter set
    keeps the interpreted kernel fast."""
    from common.model import load_policy
    from common.sampling import sample
    from kernels.projection import triton_usable

    if not triton_usable(torch.device("cpu")) and not torch.cuda.is_available():
        pytest.skip("neither CUDA nor TRITON_INTERPRET=1: the Triton kernel cannot run here")
    model, tok = load_policy(random_model_dir)
    prompts = [tok(q + "\n")["input_ids"] for q in ["What is 1+2?", "What is 3-1?"] for _ in range(2)]
    rollout = sample(model, prompts, 6, 1.0, tok.eos_token_id, tok.pad_token_id,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    groups = [{"rollout": rollout.select(torch.arange(2 * i, 2 * i + 2)), "shaped": torch.tensor([1.0, 0.0])}
              for i in range(2)]  # fmt: skip
    params = matching_parameters(model, r"^model\.norm\.")
    z = {backend: cropi.projected_gradients(model, groups, params, cropi.Args(proj_dim=16, proj_ratio=0.5,
                                                                              proj_mode=mode, kernels=backend))[0]
         for backend in ("torch", "triton")}  # fmt: skip
    assert z["torch"].abs().sum() > 0
    torch.testing.assert_close(z["triton"], z["torch"], rtol=1e-4, atol=1e-6)
