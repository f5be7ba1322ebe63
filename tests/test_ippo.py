"""I-PPO: the PPO math, the influence scores, and ippo.py end to end."""

import copy
import os
import sys

import pytest
import torch
from conftest import ROOT, check_help, check_per_skill_eval, metric_rows, run_command

import ippo
from common.flags import parse_args
from common.model import load_policy, matching_parameters
from common.sampling import Rollout, token_logprobs

# Gold pairs of different question and solution lengths: laid out as a buffer they need left padding
# (prompts) and right padding (completions), like sampled episodes.
EXAMPLES = [
    {"question": "What is 1+2?", "solution": "1+2=3 #### 3"},
    {"question": "What is 12+7-5?", "solution": "12+7=19 19-5=14 #### 14"},
    {"question": "What is 3-1?", "solution": "#### 2"},
    {"question": "What is 5+5+5+1?", "solution": "5+5=10 10+5=15 15+1=16 #### 16"},
]
# Responses (right, wrong, unfaithful) used as episodes against a validation set drawn from EXAMPLES.
RESPONSES = [
    {"question": "What is 2+2?", "solution": "2+2=4 #### 4"},
    {"question": "What is 9-3+1?", "solution": "9-3=5 5+1=6 #### 6"},
    {"question": "What is 4+4?", "solution": "#### 9"},
]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny test models' operations are too small for two threads: on a shared 2-core CPU, OpenMP's
    synchronisation then costs far more than it saves (a 2-iteration main() takes 40 s instead of 2 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(cmd):
    """A subprocess from the repository root, one thread per process (see one_thread)."""
    return run_command(cmd, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def policy(random_model_dir):
    model, tokenizer = load_policy(random_model_dir)
    return model.double().eval(), tokenizer


def buffer(tokenizer, examples=EXAMPLES) -> Rollout:
    return ippo.gold_rollout(tokenizer, examples, "", "cpu")


def random_advantages(rollout, seed=0):
    mask = rollout.completion_mask.double()
    raw = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ippo.whiten(raw * mask, mask)


def no_grad_logprobs(model, rollout):
    with torch.no_grad():
        return token_logprobs(model, rollout)


def separate_gradient(model, rollout, i, advantages, logp_old, names, eps=0.2) -> dict:
    """Episode i cut out of the buffer without any padding, then one ordinary backward pass through the
    model's own forward (its attention kernel and 2D mask): the reference the batched method must match."""
    keep = rollout.attention_mask[i].bool()
    prompt = int(rollout.attention_mask[i, : rollout.prompt_len].sum())
    L = int(rollout.completion_mask[i].sum())
    ids = rollout.input_ids[i][keep][None]
    alone = Rollout(ids, torch.ones_like(ids), torch.ones(1, L, dtype=torch.long), torch.zeros(1, L), prompt)
    logp = token_logprobs(model, alone)[0]
    loss = ippo.ppo_policy_loss(logp, logp_old[i, :L], advantages[i, :L], torch.ones(L), eps, eps)
    params = dict(model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names])))


def all_names(model):
    return [k for k, _ in model.named_parameters()]


# ---- 1, 2, 6: per-episode gradients ----------------------------------------------------------------------


def test_batched_episode_gradients_equal_separate_backward_passes(policy):
    model, tok = policy
    rollout = buffer(tok)
    lengths = rollout.completion_mask.sum(1).tolist()
    assert len(set(lengths)) == len(lengths) and rollout.attention_mask[:, 0].min() == 0, "padded, variable lengths"
    advantages = random_advantages(rollout)
    mask = rollout.completion_mask.double()
    noise = 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * mask
    logp_old = no_grad_logprobs(model, rollout) + noise  # off-policy: some ratios leave [0.8, 1.2] and clip
    assert (((-noise).exp() - 1).abs() * mask > 0.2).any()
    names = all_names(model)
    batched = ippo.episode_gradients(model, names, rollout, advantages, logp_old, ippo.Args())
    for i in range(len(EXAMPLES)):
        alone = separate_gradient(model, rollout, i, advantages, logp_old, names)
        for k in names:
            torch.testing.assert_close(batched[k][i], alone[k], rtol=1e-4, atol=1e-7)


def test_at_collection_parameters_ratio_is_one_and_gradient_is_the_policy_gradient(policy):
    model, tok = policy
    rollout = buffer(tok)
    advantages, mask = random_advantages(rollout), rollout.completion_mask.double()
    logp_old = no_grad_logprobs(model, rollout)
    params = {k: p.detach() for k, p in model.named_parameters()}
    with ippo.eager_attention(model):  # the influence pass's own forward reproduces pi_old: ratio 1
        logp = torch.func.vmap(ippo.episode_logprobs, in_dims=(None, None, 0, 0, None, None))(
            model, params, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, 1.0
        )
    torch.testing.assert_close(((logp - logp_old) * mask).exp(), torch.ones_like(mask), atol=1e-5, rtol=0)
    names = all_names(model)
    batched = ippo.episode_gradients(model, names, rollout, advantages, logp_old, ippo.Args())
    for i in range(len(EXAMPLES)):  # g_i = -(1/|y_i|) sum_t A_it grad log pi(y_it), written by hand
        logp_i = token_logprobs(model, rollout)[i]
        hand = -(advantages[i] * logp_i * mask[i]).sum() / mask[i].sum()
        want = torch.autograd.grad(hand, [dict(model.named_parameters())[k] for k in names])
        for k, w in zip(names, want):
            torch.testing.assert_close(batched[k][i], w, rtol=1e-4, atol=1e-7)


def test_episode_gradient_uses_the_buffer_advantages(policy):
    model, tok = policy
    rollout = buffer(tok)
    mask = rollout.completion_mask.double()
    raw = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * mask + mask
    advantages = ippo.whiten(raw, mask)  # once, over the whole buffer
    logp_old, names = no_grad_logprobs(model, rollout), all_names(model)
    batched = ippo.episode_gradients(model, names, rollout, advantages, logp_old, ippo.Args())
    alone = separate_gradient(model, rollout, 3, advantages, logp_old, names)  # the buffer's advantages, sliced
    for k in names:
        torch.testing.assert_close(batched[k][3], alone[k], rtol=1e-4, atol=1e-7)
    own = ippo.whiten(raw[3:], mask[3:])  # re-whitening one episode on its own would be a different gradient
    assert not torch.allclose(own, advantages[3:], atol=1e-3)
    g_val = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    scores = [ippo.influence_scores(model, names, rollout, advantages, logp_old, g_val, ippo.Args(score_batch=b))
              for b in (1, 3, 64)]  # fmt: skip
    torch.testing.assert_close(scores[0], scores[2], rtol=1e-6, atol=1e-9)  # chunking changes nothing
    torch.testing.assert_close(scores[1], scores[2], rtol=1e-6, atol=1e-9)


def test_whitening_is_over_the_valid_tokens_of_the_buffer():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = ippo.whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().abs() < 1e-6 and valid.var(unbiased=False) == pytest.approx(1.0, abs=1e-5)
    assert (w[~mask.bool()] == 0).all()


# ---- 3, 4: what the score means --------------------------------------------------------------------------


@pytest.mark.parametrize("a", [1.0, 0.5, -1.0])
def test_sign_of_the_score(policy, a):
    """Validation set = one gold sequence; an episode with the same tokens and advantage a on every token has
    g_i = a * g_val, so Score_i = a ||g_val||^2: kept for a > 0, dropped for a < 0."""
    model, tok = policy
    gold = buffer(tok, EXAMPLES[1:2])
    names = all_names(model)
    g_val, _ = ippo.validation_gradient(model, names, gold)
    advantages = a * gold.completion_mask.double()
    scores = ippo.influence_scores(model, names, gold, advantages, no_grad_logprobs(model, gold), g_val, ippo.Args())
    norm2 = sum((g * g).sum() for g in g_val.values()).item()
    assert norm2 > 0 and scores[0].item() == pytest.approx(a * norm2, rel=1e-4)
    keep, weights = ippo.influence_weights(scores)
    assert keep.tolist() == [a > 0] and weights.tolist() == [1.0 if a > 0 else 0.0]


def validation_loss(model, gold) -> float:
    """The SFT loss in float64 all the way (the model's own forward), independent of the code under test."""
    with torch.no_grad():
        out = model(input_ids=gold.input_ids, attention_mask=gold.attention_mask,
                    position_ids=(gold.attention_mask.cumsum(-1) - 1).clamp(min=0))  # fmt: skip
        logits = out.logits[:, gold.prompt_len - 1 : -1].double()
        logp = logits.log_softmax(-1).gather(-1, gold.completion_ids[..., None]).squeeze(-1)
        return -(logp * gold.completion_mask).sum().item() / gold.completion_mask.sum().item()


def test_score_is_the_first_order_change_of_the_validation_loss(policy):
    """A small SGD step of size eta on episode i's loss changes the validation loss by about -eta * Score_i."""
    model, tok = policy
    model = copy.deepcopy(model)
    gold, episodes = buffer(tok, EXAMPLES), buffer(tok, RESPONSES)
    names = all_names(model)
    advantages = random_advantages(episodes, seed=3)
    logp_old = no_grad_logprobs(model, episodes)
    g_val, _ = ippo.validation_gradient(model, names, gold)
    scores = ippo.influence_scores(model, names, episodes, advantages, logp_old, g_val, ippo.Args())
    grads = ippo.episode_gradients(model, names, episodes, advantages, logp_old, ippo.Args())
    params = dict(model.named_parameters())
    before = validation_loss(model, gold)
    for i in range(len(RESPONSES)):
        eta = 1e-4 / sum((grads[k][i] ** 2).sum() for k in names).sqrt().item()  # a step of length 1e-4 (fp64)
        with torch.no_grad():
            for k in names:
                params[k] -= eta * grads[k][i]
        change = validation_loss(model, gold) - before
        with torch.no_grad():
            for k in names:
                params[k] += eta * grads[k][i]
        assert change == pytest.approx(-eta * scores[i].item(), rel=0.02)


# ---- 5: weights, the weighted loss, the stop ---------------------------------------------------------------


def test_kept_weights_average_one():
    scores = torch.tensor([2.0, -1.0, 0.0, 1.0, 3.0])
    keep, weights = ippo.influence_weights(scores)
    assert keep.tolist() == [True, False, False, True, True]  # a score of exactly 0 is dropped too
    assert weights.tolist() == [1.0, 0.0, 0.0, 0.5, 1.5] and weights[keep].mean() == 1.0
    keep, weights = ippo.influence_weights(scores, reweight=False)
    assert weights.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    keep, weights = ippo.influence_weights(-scores.abs() - 1)
    assert not keep.any() and (weights == 0).all()


def test_weighted_loss_by_hand():
    ratios = torch.tensor([[1.5, 1.0, 0.5], [0.9, 1.5, 7.0]])
    A = torch.tensor([[1.0, -1.0, 2.0], [-2.0, -0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # episode 1 has 2 tokens; its padding counts for nothing
    losses = ippo.ppo_policy_loss(ratios.log(), torch.zeros(2, 3), A, mask, eps_low=0.2, eps_high=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)): (-1.2, 1, -1.0) -> -0.4 ; (1.8, 0.75) -> 1.275
    torch.testing.assert_close(losses, torch.tensor([-0.4, 1.275]))
    total = ippo.weighted_mean(losses, torch.tensor([1.5, 0.5]), size=2)
    assert total.item() == pytest.approx((1.5 * -0.4 + 0.5 * 1.275) / 2)  # 0.01875
    value = ippo.value_loss(torch.tensor([[0.5, 0.9]]), torch.tensor([[0.4, 0.4]]), torch.tensor([[1.0, 0.0]]),
                            torch.ones(1, 2), clip=0.2)  # fmt: skip
    # t0: max((0.5-1)^2, (0.5-1)^2) = 0.25; t1: max(0.9^2, (0.4+0.2)^2) = 0.81; 1/2 mean = 0.265
    assert value.item() == pytest.approx(0.265)


def _args(model_dir, tmp_path, **kw):
    base = dict(model=model_dir, output_dir=str(tmp_path), steps=1, batch_prompts=2, n=4, epochs=2, minibatches=2,
                eval_prompts=4, eval_every=100, max_new_tokens=8, val_prompts=8, score_batch=4)  # fmt: skip
    return ippo.Args(**{**base, **kw})


def varying_reward(example, text, form=None):
    """A random model rarely answers right; a reward by the parity of the text's length mostly varies within
    a group (and with a critic the advantages are non-zero even where it does not)."""
    return float(len(text) % 2)


def same_parameters(folder, reference) -> bool:
    model = load_policy(folder)[0]
    return all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_all_negative_buffer_takes_no_step_and_stops(random_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ippo, "reward", varying_reward)
    monkeypatch.setattr(ippo, "influence_scores", lambda model, names, rollout, adv, *a: -torch.ones(len(adv)))
    ippo.main(_args(random_model_dir, tmp_path, run_name="neg", steps=5))
    train = metric_rows(tmp_path / "neg", "reward/mean")
    assert [r["step"] for r in train] == [1], "training ends at the first iteration"
    assert train[0]["influence/early_stop"] == 1 and train[0]["influence/kept_frac"] == 0
    assert "time/update" not in train[0]
    assert "0 of 8 episodes scored positive, fewer than --min-keep 1; no update taken" in capsys.readouterr().out
    initial = load_policy(random_model_dir)[0].state_dict()
    assert same_parameters(tmp_path / "neg" / "checkpoints" / "step_000001", initial)


def test_update_changes_parameters_and_resumes(random_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ippo, "reward", varying_reward)
    # every episode scored positive, so an update is certain whatever the draw (the filter has its own tests)
    monkeypatch.setattr(ippo, "influence_scores", lambda model, names, rollout, adv, *a: torch.ones(len(adv)))
    ippo.main(_args(random_model_dir, tmp_path, run_name="r", steps=1))
    initial = load_policy(random_model_dir)[0].state_dict()
    assert not same_parameters(tmp_path / "r" / "checkpoints" / "step_000001", initial)
    ippo.main(parse_args(ippo.Args, ["--resume", str(tmp_path / "r"), "--steps", "2"]))  # the run's own flags
    assert [r["step"] for r in metric_rows(tmp_path / "r", "reward/mean")] == [1, 2]


def test_same_seed_same_metrics(random_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ippo, "reward", varying_reward)
    runs = []
    for name in ("a", "b"):
        ippo.main(_args(random_model_dir, tmp_path, run_name=name, steps=2))
        runs.append([{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
                     for r in metric_rows(tmp_path / name)])  # fmt: skip
    assert runs[0] == runs[1]


# ---- 7: rewards and GAE by hand ----------------------------------------------------------------------------


def test_rewards_and_gae_on_a_hand_computed_example():
    outcome = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logp_old = torch.tensor([[-0.5, -1.0, -0.2], [-0.3, -0.3, 0.0]])
    logp_ref = torch.tensor([[-0.7, -0.9, -0.2], [-0.3, -0.3, -5.0]])
    rewards = ippo.token_rewards(outcome, logp_old, logp_ref, mask, beta=0.1)
    # -0.1 (log pi_old - log pi_ref) on every token, R on the last real one, nothing on padding
    torch.testing.assert_close(rewards, torch.tensor([[-0.02, 0.01, 1.0], [0.0, 0.0, 0.0]]))
    values = torch.tensor([[0.5, 0.6, 0.8], [0.3, 0.1, 9.0]])  # 9.0 sits on padding and must be ignored
    advantages, returns = ippo.gae(rewards, values, mask, lam=0.9)
    # deltas (gamma 1, V after the last token = 0): row 0: 0.08, 0.21, 0.2 ; row 1: -0.2, -0.1
    # A_t = delta_t + 0.9 A_{t+1}: row 0: 0.431, 0.39, 0.2 ; row 1: -0.29, -0.1
    torch.testing.assert_close(advantages, torch.tensor([[0.431, 0.39, 0.2], [-0.29, -0.1, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.931, 0.99, 1.0], [0.01, 0.0, 0.0]]))
    advantages, _ = ippo.gae(rewards, values, mask, lam=1.0)  # lambda 1: A_t = sum of rewards from t on - V_t
    torch.testing.assert_close(advantages[0], torch.tensor([0.99 - 0.5, 1.01 - 0.6, 1.0 - 0.8]))


# ---- options: parameter subset, projection -----------------------------------------------------------------


def test_parameter_subset_and_projection(policy):
    model, tok = policy
    gold, episodes = buffer(tok, EXAMPLES), buffer(tok, RESPONSES + EXAMPLES)
    advantages, logp_old = random_advantages(episodes, seed=4), no_grad_logprobs(model, episodes)
    subset = [name for name, _ in matching_parameters(model, r"layers\.1\.mlp")]
    assert subset and all("layers.1.mlp" in k for k in subset)
    g_val, _ = ippo.validation_gradient(model, subset, gold)
    scores = ippo.influence_scores(model, subset, episodes, advantages, logp_old, g_val, ippo.Args())
    full = ippo.episode_gradients(model, all_names(model), episodes, advantages, logp_old, ippo.Args())
    by_hand = sum(full[k].flatten(1) @ g_val[k].flatten() for k in subset)
    torch.testing.assert_close(scores, by_hand, rtol=1e-5, atol=1e-9)
    projected = ippo.influence_scores(model, subset, episodes, advantages, logp_old, g_val,
                                      ippo.Args(proj_dim=4096, proj_mode="sjlt"))  # fmt: skip
    assert torch.corrcoef(torch.stack([scores, projected]))[0, 1] > 0.95
    with pytest.raises(SystemExit, match="--grad-params 'no_such_layer' matches no parameter"):
        matching_parameters(model, "no_such_layer")


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_prompts=0), "--batch-prompts 0: must be positive"),
        (dict(n=0), "--n 0: must be positive"),
        (dict(epochs=0), "--epochs 0: must be positive"),
        (dict(epochs=-1), "--epochs -1: must be positive"),
        (dict(minibatches=0), "--minibatches 0: must be positive"),
        (dict(val_prompts=0), "--val-prompts 0: must be positive"),
        (dict(score_batch=0), "--score-batch 0: must be positive"),
        (dict(gae_lambda=1.5), r"--gae-lambda 1.5: must be in \[0, 1\]"),
        (dict(gae_lambda=-0.1), r"--gae-lambda -0.1: must be in \[0, 1\]"),
        (dict(eps_low=0.0), "--eps-low 0.0: must be positive"),
        (dict(eps_low=1.0), "--eps-low 1.0: must be below 1"),
        (dict(value_clip=-0.2), "--value-clip -0.2: must be positive"),
        (dict(beta=-1e-3), "--beta -0.001: must be non-negative"),
        (dict(proj_ratio=0.0), r"--proj-ratio 0.0: must be in \(0, 1\]"),
        (dict(grad_params="("), r"--grad-params '\(': not a regular expression"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(SystemExit, match=message):
        ippo.check_args(ippo.Args(**overrides), world=1)


def test_batch_must_divide_by_world_size():
    with pytest.raises(SystemExit, match="--batch-prompts 3 does not divide by the 2 processes"):
        ippo.check_args(ippo.Args(batch_prompts=3), world=2)
    with pytest.raises(SystemExit, match="--val-prompts 1: fewer validation examples than the 2 processes"):
        ippo.check_args(ippo.Args(val_prompts=1), world=2)


def test_parameter_subset_matching_nothing(random_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="--grad-params 'lm_head' matches no parameter"):  # tied to the embedding
        ippo.main(_args(random_model_dir, tmp_path, grad_params="lm_head"))


def test_validation_split_without_gold_solutions(random_model_dir, tmp_path):
    path = tmp_path / "answers_only.jsonl"
    path.write_text("".join(f'{{"question": "What is {i}+1?", "answer": "{i + 1}"}}\n' for i in range(60)))
    with pytest.raises(SystemExit, match="the validation split has no gold solutions .*use --no-influence"):
        ippo.main(_args(random_model_dir, tmp_path, task=str(path), eval_prompts=2))
    with pytest.raises(SystemExit, match="--val-prompts 7: the validation split of answers_only.jsonl has 6"):
        ippo.main(_args(random_model_dir, tmp_path, task=str(path), eval_prompts=2, solution_field="answer",
                        val_prompts=7))  # fmt: skip


def test_bad_input_is_one_line_and_nonzero_exit():
    out = run([sys.executable, "ippo.py", "--gae-lambda", "2"])
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "error: --gae-lambda 2.0: must be in [0, 1]"


# ---- end to end ------------------------------------------------------------------------------------------

SMALL = ["--steps", "2", "--batch-prompts", "2", "--n", "4", "--epochs", "1", "--minibatches", "2", "--eval-prompts",
         "4", "--eval-every", "1", "--log-every", "1", "--max-new-tokens", "8", "--val-prompts", "8",
         "--score-batch", "4"]  # fmt: skip
# ippo.py with a reward that varies within each group, so that a random model gets advantages of both
# signs, episodes are both kept and dropped, and the update runs (the script itself is unchanged).
WRAPPER = """import ippo
from common.flags import parse_args
ippo.reward = lambda example, text, form=None: float(len(text) % 2)
ippo.main(parse_args(ippo.Args))
"""


def test_help_documents_every_flag():
    check_help("ippo.py", ippo.Args)


@pytest.mark.parametrize("mode", ["influence", "no-influence"])
def test_smoke_run(mode, random_model_dir, tmp_path):
    wrapper = tmp_path / "run_ippo.py"
    wrapper.write_text(WRAPPER)
    out = run([sys.executable, str(wrapper), "--model", random_model_dir, "--output-dir", str(tmp_path),
                       "--run-name", "smoke", f"--{mode}", *SMALL])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metric_rows(tmp_path / "smoke")
    train = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert {"eval/acc_sampled", "eval/unfaithful_sampled", "eval/acc_greedy"} <= set(rows[0])
    check_per_skill_eval(rows[0], 4)
    expected = {"train/unfaithful", "loss/clipped_surrogate_per_episode", "loss/value", "policy/clip_frac",
                "policy/entropy", "value/mean", "policy/kl_ref", "time/generate", "time/advantage", "time/update",
                "throughput/generate_tokens_per_s", "throughput/update_tokens_per_s"}  # fmt: skip
    influence = {"influence/kept_frac", "influence/dropped_correct", "influence/mean_pos_score",
                 "influence/dropped_correct_unfaithful", "time/influence", "reward/zero_std_frac"}  # fmt: skip
    assert expected <= set(train[0])
    if mode == "influence":
        assert influence <= set(train[0]) and 0 < train[0]["influence/kept_frac"] < 1
    else:
        assert not any(k.startswith("influence/") for k in train[0])
    assert not same_parameters(tmp_path / "smoke" / "checkpoints" / "step_000002",
                               load_policy(random_model_dir)[0].state_dict())  # fmt: skip


@pytest.mark.slow
def test_torchrun_two_processes(random_model_dir, tmp_path):
    wrapper = tmp_path / "run_ippo.py"
    wrapper.write_text(WRAPPER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--", str(wrapper)]
    out = run([*torchrun, "--model", random_model_dir, "--output-dir", str(tmp_path), "--run-name", "ddp",
                       *SMALL])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    train = metric_rows(tmp_path / "ddp", "reward/mean")  # rank 0 alone writes
    assert [r["step"] for r in train] == [1, 2] and "influence/kept_frac" in train[0]
