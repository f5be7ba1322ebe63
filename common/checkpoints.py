"""Checkpoints: a step's policy (as transformers saves it), optimizer and random states written into the run
folder, and the newest that loads found and restored for --resume."""

import os
import random
import shutil

import numpy as np
import torch

from common.errors import fail, first_line, is_main, warn
from common.folder import complete_checkpoints, never_saved, removed_on_error
from common.lora import load_adapter, lora_layers, merged_state_dict, save_adapter
from common.model import load_policy
from common.torchrun import is_sharded


def save_checkpoint(run_dir: str, step: int, model, tokenizer, optimizer, state: dict) -> str:
    """`checkpoints/step_<N>/`: the model as transformers saves it (with LoRA: merged, and the adapter alone in
    `adapter/`), and `trainer_state.pt` (optimizer, step, random states) for --resume. Rank 0 writes into a folder
    renamed when complete: a kill never leaves one that looks so."""
    folder = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    weights = optimizer_state = None  # unsharded: the model's and the optimizer's own state_dict(), on rank 0
    if is_sharded(model):  # every rank sends its shards; rank 0 gets the whole of each
        from common.fsdp import whole_state_dicts

        weights, optimizer_state = whole_state_dicts(model, optimizer)
    if not is_main():
        return folder
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    with removed_on_error(partial):  # a full disk leaves no half-written folder behind
        if lora_layers(model):  # the adapter folded in, as an ordinary model; and the adapter alone, for --resume
            weights = merged_state_dict(model)
            save_adapter(model, os.path.join(partial, "adapter"))
        model.save_pretrained(partial, state_dict=weights)
        tokenizer.save_pretrained(partial)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        torch.save({"step": step, "optimizer": optimizer_state or optimizer.state_dict(), "rng": rng, **state},
                   f"{partial}/trainer_state.pt")  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)  # the same step saved by an earlier attempt of this run
    os.replace(partial, folder)
    return folder




def last_checkpoint(run_dir: str, dtype, device, args, base: str):
    """(checkpoint, model, tokenizer, trainer state) of the newest complete checkpoint that loads; a damaged one
    is passed over with a warning. A LoRA run's adapter goes back on its `base` model."""
    say = lambda line: print(line, flush=True) if is_main() else None  # noqa: E731
    for checkpoint in complete_checkpoints(run_dir, warn=say):
        try:
            model, tokenizer = load_policy(base if args.lora_rank else checkpoint, dtype, device, raise_errors=True)
            if args.lora_rank:
                load_adapter(model, os.path.join(checkpoint, "adapter"), args)
            state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
            if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= set(state):
                raise ValueError("trainer_state.pt lacks the step, optimizer or random states")
        except Exception as e:  # a damaged file raises one of many exception types, from several libraries
            warn(f"skipping the damaged checkpoint {checkpoint} ({type(e).__name__}: {first_line(e, 100)})")
            continue
        say(f"resuming {run_dir} from {os.path.basename(checkpoint)}, with the run's own settings")
        return checkpoint, model, tokenizer, state
    if never_saved(run_dir):
        fail(f"--resume {run_dir}: the run stopped before its first complete checkpoint, so it cannot be resumed;"
             f" start it again with the same --run-name, which replaces it")  # fmt: skip
    fail(f"--resume {run_dir}: no checkpoint there loads")


def restore_trainer_state(state: dict, model, optimizer):
    """Put a checkpoint's optimizer and random states back (a sharded model's optimizer takes its shard)."""
    if is_sharded(model):
        from common.fsdp import load_optimizer_state

        load_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
