"""The course (exercises/): every check passes the project's own function (or the teacher's solution),
stops a blank copy with a one-line message naming the exercise, and catches planted wrong answers; bad input gets a
one-line error. The training run that ends each check is marked slow."""

import ast
import os
import sys

import pytest
from conftest import run_command

from exercises.__main__ import check, main
from exercises.catalog import BY_ID, EXERCISES

IDS = [e.id for e in EXERCISES]

# Each exercise's planted wrong answers: (the bug, the function as a student might write it).
PLANTED = {
    "grpo-advantages": [
        ("population std (a wrong normaliser)", """
def group_advantages(rewards, scale=True, eps=1e-4):
    centred = rewards - rewards.mean(1, keepdim=True)
    return centred / (rewards.std(1, keepdim=True, unbiased=False) + eps) if scale else centred"""),
        ("the batch's mean, not the group's", """
def group_advantages(rewards, scale=True, eps=1e-4):
    centred = rewards - rewards.mean()
    return centred / (rewards.std(1, keepdim=True) + eps) if scale else centred"""),
        ("the sign flipped", """
def group_advantages(rewards, scale=True, eps=1e-4):
    centred = rewards.mean(1, keepdim=True) - rewards
    return centred / (rewards.std(1, keepdim=True) + eps) if scale else centred"""),
    ],
    "grpo-clip": [
        ("max instead of min", """
def clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high):
    ratio = torch.exp(logprobs - old_logprobs)
    A = advantages[:, None]
    unclipped, clipped = ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A
    return -torch.max(unclipped, clipped), (clipped > unclipped).detach()"""),
        ("eps_low on both sides", """
def clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high):
    ratio = torch.exp(logprobs - old_logprobs)
    A = advantages[:, None]
    unclipped, clipped = ratio * A, ratio.clamp(1 - eps_low, 1 + eps_low) * A
    return -torch.min(unclipped, clipped), (clipped < unclipped).detach()"""),
        ("clipped = ratio outside the range, whatever the sign of A", """
def clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high):
    ratio = torch.exp(logprobs - old_logprobs)
    A = advantages[:, None]
    unclipped, clipped = ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A
    return -torch.min(unclipped, clipped), (ratio < 1 - eps_low) | (ratio > 1 + eps_high)"""),
    ],
    "grpo-aggregate": [
        ("a sequence's mean over the padded width", """
def aggregate(per_token, completion_mask, aggregation, horizon, normaliser):
    per_token = per_token * completion_mask
    if aggregation == "seq-mean-token-mean":
        return (per_token.sum(1) / completion_mask.shape[1]).sum() / normaliser
    if aggregation == "seq-mean-token-sum-norm":
        return per_token.sum() / horizon / normaliser
    return per_token.sum() / normaliser"""),
        ("padding not masked", """
def aggregate(per_token, completion_mask, aggregation, horizon, normaliser):
    if aggregation == "seq-mean-token-mean":
        return (per_token.sum(1) / completion_mask.sum(1).clamp(min=1)).sum() / normaliser
    if aggregation == "seq-mean-token-sum-norm":
        return per_token.sum() / horizon / normaliser
    return per_token.sum() / normaliser"""),
        ("Dr. GRPO divided by the lengths, not the horizon", """
def aggregate(per_token, completion_mask, aggregation, horizon, normaliser):
    per_token = per_token * completion_mask
    if aggregation == "seq-mean-token-sum-norm":
        return (per_token.sum(1) / completion_mask.sum(1).clamp(min=1)).sum() / normaliser
    if aggregation == "seq-mean-token-mean":
        return (per_token.sum(1) / completion_mask.sum(1).clamp(min=1)).sum() / normaliser
    return per_token.sum() / normaliser"""),
    ],
    "grpo-kl": [
        ("k1: log pi - log pi_ref", """
def kl_k3(logprobs, ref_logprobs):
    return logprobs - ref_logprobs"""),
        ("the ratio inverted (pi / pi_ref)", """
def kl_k3(logprobs, ref_logprobs):
    log_r = logprobs - ref_logprobs
    return torch.exp(log_r) - log_r - 1"""),
    ],
    "pods-max-variance": [
        ("the m highest rewards", """
def select_max_variance(rewards, m, generator=None):
    return rewards.sort(dim=1, descending=True, stable=True).indices[:, :m]"""),
        ("always half from the top, half from the bottom", """
def select_max_variance(rewards, m, generator=None):
    B, n = rewards.shape
    if m >= n:
        return torch.arange(n).expand(B, n)
    order = rewards.sort(dim=1, descending=True, stable=True).indices
    k = m // 2
    return torch.cat([order[:, :k], order[:, n - (m - k):]], 1)"""),
    ],
    "dppo-binary-kl": [
        ("the direction swapped: KL(pi || mu)", """
def binary_kl(logprobs, old_logprobs):
    one_minus_pi = -torch.expm1(logprobs.clamp(max=0))
    kl = logprobs.exp() * (logprobs - old_logprobs) + one_minus_pi * (log1m_exp(logprobs) - log1m_exp(old_logprobs))
    return kl.clamp(min=0)"""),
        ("the 'everything else' term left out", """
def binary_kl(logprobs, old_logprobs):
    return (old_logprobs.exp() * (old_logprobs - logprobs)).clamp(min=0)"""),
    ],
    "dppo-mask": [
        ("masks whatever the direction pi moved", """
def trust_region_mask(divergence, logprobs, old_logprobs, advantages, delta_low, delta_high):
    A = advantages[:, None]
    blocked = ((A > 0) & (divergence > delta_high)) | ((A < 0) & (divergence > delta_low))
    return (~blocked).float()"""),
        ("the two thresholds swapped", """
def trust_region_mask(divergence, logprobs, old_logprobs, advantages, delta_low, delta_high):
    logprobs, A = logprobs.detach(), advantages[:, None]
    blocked = ((A > 0) & (logprobs > old_logprobs) & (divergence > delta_low)) | (
        (A < 0) & (logprobs < old_logprobs) & (divergence > delta_high))
    return (~blocked).float()"""),
    ],
    "dppo-loss": [
        ("no stop-gradient on the importance weight", """
def dppo_token_loss(logprobs, old_logprobs, advantages, mask, is_cap=math.inf):
    weight = (logprobs - old_logprobs).exp().clamp(max=is_cap) * mask
    return -advantages[:, None] * weight * logprobs"""),
        ("the mask left out", """
def dppo_token_loss(logprobs, old_logprobs, advantages, mask, is_cap=math.inf):
    with torch.no_grad():
        weight = (logprobs - old_logprobs).exp().clamp(max=is_cap)
    return -advantages[:, None] * weight * logprobs"""),
        ("the cap as a floor", """
def dppo_token_loss(logprobs, old_logprobs, advantages, mask, is_cap=math.inf):
    with torch.no_grad():
        weight = (logprobs - old_logprobs).exp().clamp(min=min(is_cap, 1.0)) * mask
    return -advantages[:, None] * weight * logprobs"""),
    ],
    "cropi-popi": [
        ("raw rewards, not group-normalised advantages", """
def popi_objective(logprobs, old_logprobs, rewards, completion_mask, clip=0.0):
    A = rewards.to(logprobs.device)[:, None]
    rho = torch.exp(logprobs - old_logprobs)
    surrogate = rho * A
    if clip > 0:
        surrogate = torch.min(surrogate, rho.clamp(1 - clip, 1 + clip) * A)
    return ((surrogate * completion_mask).sum(1) / completion_mask.sum(1).clamp(min=1)).mean()"""),
        ("one mean over all tokens, not per response", """
def popi_objective(logprobs, old_logprobs, rewards, completion_mask, clip=0.0):
    A = group_advantages(rewards[None])[0].to(logprobs.device)[:, None]
    rho = torch.exp(logprobs - old_logprobs)
    surrogate = rho * A
    if clip > 0:
        surrogate = torch.min(surrogate, rho.clamp(1 - clip, 1 + clip) * A)
    return (surrogate * completion_mask).sum() / completion_mask.sum()"""),
    ],
    "cropi-fusion": [
        ("raw scores summed instead of reciprocal ranks", """
def reciprocal_rank_fusion(score_tables, n):
    fused = torch.zeros(score_tables.shape[1], dtype=torch.float64)
    for scores in score_tables:
        order = torch.sort(scores, descending=True, stable=True).indices[:n]
        order = order[scores[order] > -torch.inf]
        fused[order] += scores[order].double() + 10
    ranked = torch.sort(fused, descending=True, stable=True).indices
    return ranked[fused[ranked] > 0][:n]"""),
        ("zero-gradient prompts (-inf) not left out", """
def reciprocal_rank_fusion(score_tables, n):
    fused = torch.zeros(score_tables.shape[1], dtype=torch.float64)
    for scores in score_tables:
        order = torch.sort(scores, descending=True, stable=True).indices[:n]
        fused[order] += 1.0 / torch.arange(1, len(order) + 1, dtype=torch.float64)
    ranked = torch.sort(fused, descending=True, stable=True).indices
    return ranked[fused[ranked] > 0][:n]"""),
    ],
    "ippo-gae": [
        ("V after the last token not 0 (padding's values leak in)", """
def gae(rewards, values, mask, lam, gamma=1.0):
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t], next_value = next_advantage, values[:, t]
    return advantages, (advantages + values) * mask"""),
        ("lambda left out of the recursion", """
def gae(rewards, values, mask, lam, gamma=1.0):
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * next_advantage) * mask[:, t]
        advantages[:, t], next_value = next_advantage, values[:, t]
    return advantages, (advantages + values) * mask"""),
    ],
    "ippo-influence-weights": [
        ("keeps scores >= 0", """
def influence_weights(scores, reweight=True):
    kept = scores >= 0
    total, count = scores[kept].sum().item(), kept.sum().item()
    if not reweight or count == 0:
        return kept, kept.float()
    return kept, torch.where(kept, scores / (total / count), torch.zeros_like(scores))"""),
        ("weights over the mean of every episode, not of the kept ones", """
def influence_weights(scores, reweight=True):
    kept = scores > 0
    total, count = scores[kept].sum().item(), len(scores)
    if not reweight or count == 0:
        return kept, kept.float()
    return kept, torch.where(kept, scores / (total / count), torch.zeros_like(scores))"""),
    ],
    "open-gspo": [
        ("the arithmetic mean of the token ratios", """
def sequence_clipped_surrogate(logprobs, old_logprobs, advantages, completion_mask, eps_low, eps_high):
    lengths = completion_mask.sum(1).clamp(min=1)
    ratio = ((logprobs - old_logprobs).exp() * completion_mask).sum(1) / lengths
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    loss, binds = -torch.min(unclipped, clipped), (clipped < unclipped).detach()
    return loss[:, None].expand_as(logprobs), binds[:, None].expand_as(logprobs)"""),
        ("padding counted in the sequence ratio", """
def sequence_clipped_surrogate(logprobs, old_logprobs, advantages, completion_mask, eps_low, eps_high):
    ratio = torch.exp((logprobs - old_logprobs).mean(1))
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    loss, binds = -torch.min(unclipped, clipped), (clipped < unclipped).detach()
    return loss[:, None].expand_as(logprobs), binds[:, None].expand_as(logprobs)"""),
        ("token ratios (GRPO's clip)", """
def sequence_clipped_surrogate(logprobs, old_logprobs, advantages, completion_mask, eps_low, eps_high):
    return clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high)"""),
    ],
    "open-kl-k2": [
        ("without the 1/2", """
def kl_k2(logprobs, ref_logprobs):
    return (logprobs - ref_logprobs) ** 2"""),
        ("k1: log pi - log pi_ref", """
def kl_k2(logprobs, ref_logprobs):
    return logprobs - ref_logprobs"""),
    ],
    "open-rloo": [
        ("r_i left in its own baseline", """
def leave_one_out_advantages(rewards):
    return rewards - rewards.mean(1, keepdim=True)"""),
        ("divided by the group's std (GRPO's)", """
def leave_one_out_advantages(rewards):
    n = rewards.shape[1]
    others = (rewards.sum(1, keepdim=True) - rewards) / (n - 1)
    return (rewards - others) / (rewards.std(1, keepdim=True) + 1e-4)"""),
    ],
    "open-dynamic-sampling": [
        ("a group mean strictly between 0 and 1 (right for 0/1 rewards only)", """
def groups_with_signal(rewards):
    mean = rewards.mean(1)
    return (mean > 0) & (mean < 1)"""),
        ("only the first two rollouts compared", """
def groups_with_signal(rewards):
    return rewards[:, 0] != rewards[:, 1]"""),
    ],
}


def start(exercise_id, work, *flags):
    main(["start", exercise_id, "--work", str(work), *flags])
    return os.path.join(os.path.relpath(str(work)), f"{BY_ID[exercise_id].script}.py")


def replace_function(path, source):
    """The copy with its exercise function replaced by `source` (as a student would have written it)."""
    text = open(path, encoding="utf-8").read()
    name = source.strip().removeprefix("def ").split("(")[0]
    node = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == name)
    lines = text.splitlines()
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines[: node.lineno - 1] + source.strip("\n").splitlines() + lines[node.end_lineno :]))


def error_of(capsys, *argv) -> str:
    """The one-line error a command stops with (exit status 1)."""
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    capsys.readouterr()
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("exercise_id", IDS)
def test_the_project_s_function_passes(exercise_id, tmp_path, capsys):
    start(exercise_id, tmp_path, "--solution")
    check(BY_ID[exercise_id], os.path.relpath(str(tmp_path)), with_training=False)
    assert f"exercise {exercise_id} done" in capsys.readouterr().out


@pytest.mark.parametrize("exercise_id", IDS)
def test_a_blank_copy_stops_with_the_exercise_s_name(exercise_id, tmp_path, capsys):
    path = start(exercise_id, tmp_path)
    message = error_of(capsys, "check", exercise_id, "--work", str(tmp_path), "--no-train")
    function = BY_ID[exercise_id].function
    assert message == f"error: exercise {exercise_id} is not done yet: write {function} in {path}"


@pytest.mark.parametrize("exercise_id,bug,source", [(i, bug, s) for i, plants in PLANTED.items() for bug, s in plants],
                         ids=[f"{i}: {bug}" for i, plants in PLANTED.items() for bug, _ in plants])
def test_a_planted_bug_is_caught(exercise_id, bug, source, tmp_path, capsys):
    path = start(exercise_id, tmp_path, "--solution")
    replace_function(path, source)
    with pytest.raises(SystemExit) as stop:
        check(BY_ID[exercise_id], os.path.relpath(str(tmp_path)), with_training=False)
    out = capsys.readouterr().out
    assert str(stop.value.code).startswith(f"error: exercise {exercise_id}: case "), stop.value.code
    assert "FAILED case" in out and "expected:" in out and "got:" in out, out


def test_every_exercise_has_two_planted_bugs():
    assert set(PLANTED) == set(IDS)
    assert all(len(plants) >= 2 for plants in PLANTED.values())
    assert len(IDS) >= 12 and sum(e.open for e in EXERCISES) >= 4 and {e.script for e in EXERCISES} == {
        "grpo", "pods", "dppo", "cropi", "ippo"}


# ---- bad input -------------------------------------------------------------------------------------------------


def test_an_unknown_exercise_lists_the_ids(tmp_path, capsys):
    for command in ("start", "check"):
        message = error_of(capsys, command, "grpo-nope", "--work", str(tmp_path))
        assert "no exercise 'grpo-nope'" in message and ", ".join(IDS) in message


def test_check_before_start(tmp_path, capsys):
    message = error_of(capsys, "check", "grpo-kl", "--work", str(tmp_path))
    assert "does not exist: run `python -m exercises start grpo-kl` first" in message


def test_a_syntax_error_is_named_with_its_line(tmp_path, capsys):
    path = start("grpo-kl", tmp_path)
    replace_function(path, "def kl_k3(logprobs, ref_logprobs):\n    return (logprobs -")
    node_line = open(path).read().splitlines().index("def kl_k3(logprobs, ref_logprobs):") + 2
    message = error_of(capsys, "check", "grpo-kl", "--work", str(tmp_path))
    assert message.startswith(f"error: {path} line {node_line}: syntax error"), message


def test_a_changed_signature_is_named_with_its_line(tmp_path, capsys):
    path = start("grpo-advantages", tmp_path)
    replace_function(path, "def group_advantages(rewards, scale=True):\n    return rewards")
    line = open(path).read().splitlines().index("def group_advantages(rewards, scale=True):") + 1
    message = error_of(capsys, "check", "grpo-advantages", "--work", str(tmp_path))
    assert message == (f"error: {path} line {line}: the signature changed to group_advantages(rewards, scale=True);"
                       " the exercise needs group_advantages(rewards, scale=True, eps=0.0001)")  # fmt: skip


def test_start_never_overwrites_a_copy_unless_forced(tmp_path, capsys):
    path = start("grpo-clip", tmp_path)
    with open(path, "a") as f:
        f.write("# my work\n")
    assert "add --force" in error_of(capsys, "start", "grpo-clip", "--work", str(tmp_path))
    assert open(path).read().endswith("# my work\n")
    start("grpo-clip", tmp_path, "--force")
    assert "# my work" not in open(path).read()


def test_the_command_line_error_has_no_traceback():
    out = run_command([sys.executable, "-m", "exercises", "check", "nope"])
    assert out.returncode == 1 and out.stderr.strip().startswith("error: no exercise 'nope'"), out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_copy_runs_from_the_repository_root_and_stops_with_one_line(tmp_path):
    path = os.path.join(str(tmp_path), "grpo.py")
    main(["start", "grpo-kl", "--work", str(tmp_path)])
    out = run_command([sys.executable, path, "--steps", "1", "--eval-prompts", "1", "--beta", "0.1", "--output-dir",
                       str(tmp_path / "runs")])  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"error: exercise grpo-kl is not done yet: write kl_k3 in {os.path.relpath(path)}" in out.stderr


# ---- the training run each check ends with -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("exercise_id", IDS)
def test_a_check_ends_with_a_training_run_of_the_solution_and_its_number(exercise_id, tmp_path, capsys):
    start(exercise_id, tmp_path, "--solution")
    check(BY_ID[exercise_id], os.path.relpath(str(tmp_path)))
    out = capsys.readouterr().out
    assert "result: " in out, out
