"""--mask-truncated (DAPO's overlong filtering): a completion cut at --max-new-tokens before its EOS carries no
gradient, in every script; train/truncated_frac counts them whether or not they are masked."""

from dataclasses import replace

import pytest
import torch
from conftest import metric_rows, per_script

import cropi
import dppo
import grpo
import ippo
import pods
from common.sampling import Rollout

SCRIPTS = {"grpo": grpo, "pods": pods, "dppo": dppo, "cropi": cropi, "ippo": ippo}
SMALL = dict(steps=1, batch_prompts=2, n=4, eval_prompts=2, max_new_tokens=3)
SCRIPT_SMALL = per_script(SMALL)


def test_only_the_truncated_rows_leave_the_loss():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    rollout = Rollout(torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 5), mask, torch.zeros(3, 3), 2,
                      truncated=torch.tensor([False, True, False]))  # fmt: skip
    kept = rollout.without_truncated()
    assert kept.completion_mask.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    assert torch.equal(kept.attention_mask, rollout.attention_mask) and kept.truncated is rollout.truncated


def all_cut(sample):
    """`sample`, with every completion marked cut short."""
    return lambda *args, **kwargs: replace(r := sample(*args, **kwargs), truncated=torch.ones_like(r.truncated))


def test_with_every_completion_cut_the_update_changes_nothing(coin_model_dir, coin_task, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "sample", all_cut(grpo.sample))
    args = dict(model=coin_model_dir, task=coin_task, output_dir=str(tmp_path), **SMALL)
    grpo.main(grpo.Args(**args, run_name="masked", mask_truncated=True))
    grpo.main(grpo.Args(**args, run_name="trained"))
    masked, trained = (metric_rows(tmp_path / name, "train/truncated_frac")[0] for name in ("masked", "trained"))
    assert masked["train/truncated_frac"] == trained["train/truncated_frac"] == 1.0
    assert masked["train/update_tokens"] == 0 and masked["grad_norm"] == 0
    assert trained["train/update_tokens"] > 0 and trained["grad_norm"] > 0
    assert masked["train/completion_len"] == trained["train/completion_len"], "what was sampled is still counted"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_runs_with_it_and_logs_the_truncated_share(script, coin_model_dir, coin_task, tmp_path):
    module = SCRIPTS[script]
    module.main(module.Args(model=coin_model_dir, task=coin_task, output_dir=str(tmp_path), run_name="r",
                            mask_truncated=True, **SCRIPT_SMALL[script]))  # fmt: skip
    row = metric_rows(tmp_path / "r", "train/truncated_frac")[0]
    assert 0 <= row["train/truncated_frac"] <= 1
