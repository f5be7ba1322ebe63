"""Ranks under torchrun, the collectives every script uses, and the optimizer step; in one process each is its
plain meaning. FSDP sharding itself is in `common/fsdp.py`, imported only under --fsdp."""

import atexit
import contextlib
import gc
import math
import os

import torch
import torch.distributed as dist

from common.errors import fail, is_main


def setup_distributed(device: str = "auto"):
    """(rank, world_size, device). Under torchrun: one process per rank, gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device not in ("cpu", "cuda"):
        fail(f"--device {device}: expected auto, cpu or cuda")
    if device == "cuda":
        if not torch.cuda.is_available():
            fail("--device cuda: this machine has no CUDA device (PyTorch sees none); use --device cpu")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        atexit.register(close_group)
    return rank, world, torch.device(device)


def close_group():
    """Closed while Python runs: a group freed with the interpreter can abort a run that succeeded ("terminate
    called without an active exception"); FSDP's device mesh holds it in reference cycles, hence the collection."""
    dist.destroy_process_group()
    gc.collect()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(values, op: str = "sum"):
    """`values` summed, averaged (`mean`) or maximised (`max`) over ranks, the same on every rank: a number, a
    list of numbers, a dict of numbers (the same keys on every rank), or a tuple of tensors (summed in place)."""
    if not dist.is_initialized():
        return values
    if isinstance(values, tuple):
        for t in values:
            dist.all_reduce(t)
        return values
    keys = sorted(values) if isinstance(values, dict) else None
    flat = [values[k] for k in keys] if keys else values if isinstance(values, list) else [values]
    t = torch.tensor([float(v) for v in flat], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    out = (t / world_size() if op == "mean" else t).tolist()
    return dict(zip(keys, out)) if keys else out if isinstance(values, list) else out[0]


def from_main_rank(make):
    """`make()` on rank 0 alone, its result sent to all; a one-line error there stops every rank (none left waiting)."""
    result, error = None, None
    if is_main():
        try:
            result = make()
        except SystemExit as e:
            error = e.code
    if dist.is_initialized():
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise SystemExit(error)
    return result


def gather_strided(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rank r holds rows r, r + world, r + 2 world, ... of a [total, ...] tensor: return all of it, on every
    rank (padded to equal parts for all_gather, then interleaved back)."""
    if world_size() == 1:
        return local
    padded = local.new_zeros(-(-total // world_size()), *local.shape[1:])
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).flatten(0, 1)[:total]


class Totals:
    """A step's sums over micro-batches, then ranks: `Totals("tokens", "loss")`, `add(tokens=mask, loss=loss)`
    (a tensor adds its sum), `over_ranks()`. Names come first, so a rank with nothing to add joins with zeros."""

    def __init__(self, *names: str):
        self.sums = dict.fromkeys(names, 0.0)

    def add(self, **values):
        for name, value in values.items():
            self.sums[name] += value.sum().item() if torch.is_tensor(value) else value

    def over_ranks(self) -> dict:
        return dict(zip(self.sums, all_reduce(list(self.sums.values()))))


def optimizer_step(model, optimizer, max_grad_norm: float) -> float:
    """Average gradients over ranks (a sharded model's backward did), clip their norm and step; returns the norm
    before clipping. A gradient that is not finite is dropped instead: the parameters stay the last good ones,
    and the NaN returned lets the caller count the skip. Every rank sees the same norm, so all agree."""
    if dist.is_initialized() and not is_sharded(model):
        for p in (p for p in model.parameters() if p.requires_grad):  # one this rank gave no gradient joins as zeros
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            dist.all_reduce(p.grad)
            p.grad /= world_size()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # a sharded norm is a DTensor
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad()
    return norm if math.isfinite(norm) else math.nan


def grad_norm_metrics(norms: list[float]) -> dict:
    """The mean gradient norm of a step's optimizer steps, and how many were skipped (NaN: not finite)."""
    finite = [g for g in norms if math.isfinite(g)]
    return {"grad_norm": sum(finite) / max(1, len(finite)), "train/skipped_steps": len(norms) - len(finite)}


def peak_memory_gb(device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource  # Unix only
    except ImportError:
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ---- a sharded model (--fsdp), seen from outside -------------------------------------------------------------


def is_sharded(model) -> bool:
    return hasattr(model, "set_reshard_after_forward")  # what FSDP2's `fully_shard` gives a module


def shard(model, args):
    """--fsdp under torchrun: the model sharded over the ranks (`common/fsdp.py`); otherwise the model as it is."""
    if model is None or not getattr(args, "fsdp", False):
        return model
    from common.fsdp import fully_shard_layers

    return fully_shard_layers(model, args.dtype)


@contextlib.contextmanager
def gathered(model):
    """Every rank holds a sharded model's full weights for the whole block: one all-gather per unit, then no
    communication, however many forward passes each rank makes (sampling makes one per token, and ranks stop at
    different lengths). Nothing to do for a model that is not sharded, or is gathered already."""
    units = [m for m in model.modules() if is_sharded(m)]
    if not units or getattr(model, "is_gathered", False):
        yield
        return
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False)  # the forward passes find the weights gathered and leave them so
    model.is_gathered = True
    try:
        yield
    finally:
        model.is_gathered = False
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP's default: the root keeps its weights
        for unit in units:
            unit.reshard()
