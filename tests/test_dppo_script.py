"""dppo.py end to end: --help, a smoke run per trust region, torchrun, mu is the recorded one, bad input."""

import os
import sys
from typing import get_args

import pytest
import torch
from conftest import ROOT, check_help, check_per_skill_eval, metric_rows, run_command

import dppo
from common.flags import parse_args
from common.model import load_policy
from common.sampling import sample, token_logprobs

SMALL = ["--steps", "2", "--batch-prompts", "2", "--n", "4", "--minibatches", "2", "--eval-prompts", "4",
         "--eval-every", "1", "--log-every", "1", "--max-new-tokens", "10"]  # fmt: skip


def run(args, cmd=(sys.executable, "dppo.py")):
    return run_command([*cmd, *args])


def train_rows(run_dir):
    return metric_rows(run_dir, "reward/mean")


def test_help_documents_every_flag():
    check_help("dppo.py", dppo.Args)


@pytest.mark.parametrize("trust_region", get_args(dppo.TrustRegion))
def test_smoke_run_each_trust_region(trust_region, random_model_dir, tmp_path):
    extra = ["--sampler-temperature", "1.3", "--top-k", "5", "--aggregation", "token-mean"]
    extra = extra if trust_region.startswith("topk") else []
    extra += ["--micro-batch", "2"] if trust_region == "binary-kl" else []  # gradient accumulation path
    out = run(["--model", random_model_dir, "--output-dir", str(tmp_path), "--run-name", "r",
               "--trust-region", trust_region, *SMALL, *extra])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = train_rows(tmp_path / "r")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss/masked_surrogate", "trust_region/masked_frac", "trust_region/masked_frac_pos",
                "trust_region/masked_frac_neg", "trust_region/divergence_mean", "trust_region/divergence_max",
                "trust_region/abs_pi_mu", "policy/entropy", "time/generate", "time/update"):  # fmt: skip
        assert key in rows[0]
    if trust_region == "none":
        assert all(r["trust_region/masked_frac"] == 0 for r in rows)
        check_per_skill_eval(metric_rows(tmp_path / "r", "eval/acc_sampled")[0], 4)
    load_policy(str(tmp_path / "r" / "checkpoints" / "step_000002"))  # loadable with transformers


@pytest.mark.slow
def test_torchrun_two_processes(random_model_dir, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--", "dppo.py"]
    out = run(["--model", random_model_dir, "--output-dir", str(tmp_path), "--run-name", "ddp", *SMALL], torchrun)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in train_rows(tmp_path / "ddp")] == [1, 2]


@pytest.mark.slow
def test_torchrun_fsdp_with_the_recomputed_anchor_and_a_noisy_sampler(random_model_dir, tmp_path):
    """The extra forward pass of --anchor recomputed is the loss's own path, so it runs sharded as well."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--", "dppo.py"]
    out = run(["--model", random_model_dir, "--output-dir", str(tmp_path), "--run-name", "f", *SMALL, "--fsdp",
               "--anchor", "recomputed", "--sampler-noise", "1", "--trust-region", "topk-tv", "--top-k", "3"],
              torchrun)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(r["trust_region/abs_pi_mu"] > 0 for r in train_rows(tmp_path / "f"))


def _rollout(model_dir, sampler_temperature, top_k=0):
    model, tok = load_policy(model_dir)
    prompts = [tok("What is 1+2?\n")["input_ids"]] * 8
    g = torch.Generator().manual_seed(0)
    record = dppo.TopKRecord(top_k) if top_k else None
    r = sample(model, prompts, 8, sampler_temperature, tok.eos_token_id, tok.pad_token_id, generator=g, on_token=record)
    if record:
        r.topk_ids, r.topk_logprobs = torch.stack(record.ids, 1), torch.stack(record.logprobs, 1)
    return model, r


def test_every_minibatch_is_measured_against_the_recorded_mu(random_model_dir, monkeypatch):
    model, rollout = _rollout(random_model_dir, sampler_temperature=1.5)
    seen = []
    real = dppo.trust_region_mask

    def spy(D, logprobs, old_logprobs, *a):
        seen.append(old_logprobs.clone())
        return real(D, logprobs, old_logprobs, *a)

    monkeypatch.setattr(dppo, "trust_region_mask", spy)
    args = dppo.Args(minibatches=4, max_new_tokens=8, lr=1e-2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    advantages = torch.tensor([1.0, -1.0] * 4)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    stats = dppo.policy_update(model, None, optimizer, rollout, advantages, args, torch.Generator().manual_seed(5))
    assert len(seen) == 4
    for rows, old_logprobs in zip(order.chunk(4), seen):
        assert torch.equal(old_logprobs, rollout.sampler_logprobs[rows])  # the sampler's record, not a recomputed copy
    assert stats["trust_region/abs_pi_mu"] > 1e-4  # sampler at T=1.5, trainer at T=1: pi != mu from the start
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_mismatch_means_pi_equals_mu_before_the_first_step(random_model_dir):
    model, rollout = _rollout(random_model_dir, sampler_temperature=1.0)
    args = dppo.Args(minibatches=1, max_new_tokens=8, lr=1e-9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    stats = dppo.policy_update(model, None, optimizer, rollout, torch.zeros(8), args, torch.Generator().manual_seed(0))
    assert stats["trust_region/abs_pi_mu"] < 1e-5 and stats["trust_region/masked_frac"] == 0


def test_topk_divergence_in_training_matches_the_reference(random_model_dir):
    """The per-token Top-K TV that the update uses equals the reference on full logits."""
    from kernels.topk_divergence import topk_divergence_reference

    model, rollout = _rollout(random_model_dir, sampler_temperature=1.3, top_k=4)
    with torch.no_grad():
        _, extra = dppo.current_policy(model, rollout, dppo.Args(trust_region="topk-tv", temperature=1.0))
        logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits
    P, valid = rollout.prompt_len, rollout.completion_mask.bool()
    logits = logits[:, P - 1 : -1][valid]
    ref = topk_divergence_reference(logits, rollout.topk_ids[valid], rollout.topk_logprobs[valid],
                                    rollout.completion_ids[valid], 1.0)  # fmt: skip
    torch.testing.assert_close(extra["tv"][valid], ref["tv"], atol=1e-4, rtol=1e-4)
    assert (extra["tv"][~valid] == 0).all()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--delta-low", "0"], "--delta-low 0.0: must be positive"),
        (["--delta-high", "-0.1"], "--delta-high -0.1: must be positive"),
        (["--trust-region", "topk-tv", "--top-k", "0"], "--top-k 0"),
        (["--trust-region", "topk-kl", "--top-k", "100000"], "larger than the vocabulary"),
        (["--minibatches", "3"], "--minibatches 3 does not divide"),
        (["--sampler-bits", "1"], "--sampler-bits 1: must be between 2 and 16"),
        (["--sampler-noise", "-0.5"], "--sampler-noise -0.5: must be non-negative"),
        (["--is-cap", "0"], "--is-cap 0.0: must be positive"),
        (["--anchor", "recomputed", "--is-cap", "-2"], "--is-cap -2.0: must be positive"),
    ],
)
def test_bad_input_gets_a_one_line_error(flags, message, random_model_dir, tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as error:
        dppo.main(parse_args(dppo.Args, ["--model", random_model_dir, "--output-dir", str(out), *SMALL, *flags]))
    assert str(error.value.code).startswith("error: ") and message in str(error.value.code)
    assert "\n" not in str(error.value.code) and not out.exists(), "one line, nothing written"


@pytest.mark.parametrize("flag,value,choices", [("--trust-region", "clip", get_args(dppo.TrustRegion)),
                                                ("--anchor", "pi", ("mu", "recomputed"))])  # fmt: skip
def test_unknown_choice_is_refused_by_the_cli(flag, value, choices):
    """A flag that takes one of a few names gets a one-line error naming the flag, the value and every choice."""
    with pytest.raises(SystemExit) as error:
        parse_args(dppo.Args, [flag, value])
    message = str(error.value.code)
    assert message.startswith(f"error: {flag} {value}: expected ") and "\n" not in message
    assert all(name in message for name in choices)


def test_topk_run_with_the_triton_kernel(random_model_dir, tmp_path):
    """--kernels triton end to end (in the interpreter on a CPU: conftest sets TRITON_INTERPRET=1)."""
    out = run(["--model", random_model_dir, "--output-dir", str(tmp_path), "--run-name", "k", *SMALL,
               "--trust-region", "topk-kl", "--top-k", "4", "--kernels", "triton"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["step"] for r in train_rows(tmp_path / "k")] == [1, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_triton_kernels_without_gpu_or_interpreter_is_refused(random_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": ROOT}
    out = run_command([sys.executable, "dppo.py", "--model", random_model_dir, "--output-dir", str(tmp_path),
                       *SMALL, "--trust-region", "topk-tv", "--kernels", "triton"], env=env)  # fmt: skip
    assert out.returncode != 0 and "--kernels triton" in out.stderr and "Traceback" not in out.stderr


def test_kernel_benchmark_without_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run for minutes")
    out = run_command([sys.executable, "-m", "kernels.bench"])
    assert out.returncode == 0 and "no CUDA GPU" in out.stdout


# ---- --sampler-bits: a sampler whose weights are rounded, as a quantized rollout engine has them ------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_per_channel_is_a_per_row_grid_within_half_a_step(bits):
    row_scales = torch.tensor([[0.01], [1], [3], [0.2], [5], [1e-3]])
    weight = torch.randn(6, 50, generator=torch.Generator().manual_seed(bits)) * row_scales
    rounded = dppo.round_per_channel(weight, bits)
    scale = weight.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
    levels = rounded / scale
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # every weight on its row's grid
    assert (levels.abs() <= 2 ** (bits - 1) - 1 + 1e-4).all()
    assert ((rounded - weight).abs() <= scale / 2 + 1e-6).all()  # round to nearest: at most half a step
    assert torch.equal(dppo.round_per_channel(rounded, bits), rounded)  # rounding twice changes nothing


def test_the_quantized_sampler_records_its_own_mu_and_differs_from_pi(random_model_dir):
    model, tok = load_policy(random_model_dir)
    sampler = load_policy(random_model_dir)[0]
    dppo.mismatched(sampler, model, dppo.Args(sampler_bits=4), None)  # rounds the sampler's weights
    for (name, p), q in zip(model.named_parameters(), sampler.parameters()):
        assert torch.equal(q, dppo.round_per_channel(p, 4) if p.dim() == 2 else p), name
    prompts = [tok("What is 1+2?\n")["input_ids"]] * 8
    rollout = sample(sampler, prompts, 8, 1.0, tok.eos_token_id, tok.pad_token_id,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        mu, pi = token_logprobs(sampler, rollout), token_logprobs(model, rollout)
    torch.testing.assert_close(rollout.sampler_logprobs, mu, atol=1e-5, rtol=0)  # mu is the sampler's own
    assert (pi - mu).abs().max() > 1e-3, "4-bit weights compute other probabilities than the trainer's"


def test_smoke_run_with_a_quantized_sampler(random_model_dir, tmp_path):
    out = run(["--model", random_model_dir, "--output-dir", str(tmp_path), "--run-name", "r", *SMALL,
               "--sampler-bits", "4"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["step"] for r in train_rows(tmp_path / "r")] == [1, 2]
    assert "4 weight bits" in out.stdout + out.stderr
