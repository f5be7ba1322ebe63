"""Seeding, torchrun helpers, the run folder (args, metrics.jsonl, TensorBoard, samples), progress, checkpoints."""

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist


def fail(message: str):
    """Stop with a one-line error for a user mistake (no traceback, exit status 1)."""
    raise SystemExit(f"error: {message}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def creation_problem(folder: str) -> str | None:
    """Why `folder` could not be created, or None: a probe folder is made (and removed) in its nearest existing
    parent, so nothing is left behind when a run stops at a later error."""
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent))
    except OSError as e:
        return e.strerror
    return None


def check_flags(args, positive=(), non_negative=(), may_be_infinite=()):
    """One-line errors for a flag that must be > 0 (or >= 0), and for any float flag that is not finite (NaN,
    or infinite unless listed in `may_be_infinite`): `--lr -1.0: must be positive`, `--lr inf: must be finite`."""
    for field in fields(args):
        value = getattr(args, field.name)
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value) and field.name not in may_be_infinite):
            fail(f"{flag(field.name)} {value}: must be finite")
    for names, ok, word in ((positive, lambda v: v > 0, "positive"), (non_negative, lambda v: v >= 0, "non-negative")):
        for name in names:
            if not ok(getattr(args, name)):
                fail(f"{flag(name)} {getattr(args, name)}: must be {word}")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seeded_generator(*keys, device="cpu") -> torch.Generator:
    """A torch generator of its own for each random stream of a run, seeded by its keys, e.g.
    (seed, "sample", step, rank): streams never share draws, and a resumed run draws what it would have."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ---- torchrun ---------------------------------------------------------------------------------------


def setup_distributed(device: str = "auto"):
    """(rank, world_size, device). Under torchrun: one process per rank, gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        fail(f"--device {device}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: this machine has no CUDA device (PyTorch sees none); use --device cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a list of numbers over ranks (e.g. correct counts and totals, so every rank sees global means)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather_strided(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rank r holds rows r, r + world, r + 2 world, ... of a [total, ...] tensor: return all of it, on every
    rank (padded to equal shards for all_gather, then interleaved back)."""
    world = world_size()
    if world == 1:
        return local
    shard = -(-total // world)
    padded = torch.zeros(shard, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).flatten(0, 1)[:total]


def all_reduce_mean(metrics: dict) -> dict:
    """Average per-rank metrics (same keys on every rank) so rank 0 logs the global value."""
    if not dist.is_initialized():
        return metrics
    keys = sorted(metrics)
    means = all_reduce_sum([float(metrics[k]) for k in keys])
    return {k: v / world_size() for k, v in zip(keys, means)}


def optimizer_step(model, optimizer, max_grad_norm: float) -> float:
    """Average gradients over ranks, clip their norm, and step; returns the norm before clipping. A gradient
    that is not finite (NaN or inf) is dropped instead of stepped on: the parameters stay the last good ones,
    and the NaN norm returned lets the caller count the skip. Every rank sees the same norm, so all agree."""
    average_gradients(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm).item()
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad()
    return norm if math.isfinite(norm) else math.nan


def average_gradients(model):
    """Average gradients over ranks: the same result as one process holding every rank's batch. A parameter
    with no gradient on this rank (its share of the batch was empty) joins as zeros: every rank must take
    part in every all-reduce."""
    if not dist.is_initialized():
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size()


# ---- run folder, logging, checkpoints ------------------------------------------------------------------


class RunLogger:
    """`runs/<name>/`: args.json, metrics.jsonl, TensorBoard events, samples.jsonl; progress bar on rank 0.

    On ranks other than 0 every method does nothing, so callers need no rank checks.
    """

    def __init__(self, run_dir: str, args, total_steps: int, start_step: int = 0):
        self.run_dir, self.enabled = run_dir, is_main()
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        os.makedirs(run_dir, exist_ok=True)
        record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(), "args": asdict(args)}
        if start_step == 0:
            with open(os.path.join(run_dir, "args.json"), "w") as f:
                json.dump(asdict(args), f, indent=1)
            with open(os.path.join(run_dir, "versions.json"), "w") as f:
                json.dump(record["versions"], f, indent=1)
        else:  # a resume: the run's own args.json stays; the resume is recorded beside it
            with open(os.path.join(run_dir, "resumes.jsonl"), "a") as f:
                f.write(json.dumps({"from_step": start_step, **record}) + "\n")
            for name in ("metrics.jsonl", "samples.jsonl"):  # rows logged after the checkpoint are logged again
                keep_rows_up_to(os.path.join(run_dir, name), start_step)
        self.metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self.samples_file = open(os.path.join(run_dir, "samples.jsonl"), "a")
        self.tb = SummaryWriter(run_dir, purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=os.path.basename(run_dir), dynamic_ncols=True)

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def print(self, line: str):
        if self.enabled:
            self.bar.write(line)

    def progress(self, **shown):
        if self.enabled:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(1)

    def samples(self, step: int, rows: list[dict]):
        if self.enabled:
            for row in rows:
                self.samples_file.write(json.dumps({"step": step, **row}) + "\n")
            self.samples_file.flush()

    def close(self):
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.metrics_file.close()
            self.samples_file.close()


def versions() -> dict:
    """The versions a run was made with, written into its folder."""
    import platform
    from importlib.metadata import version  # reads the installed versions without importing the packages

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
            "datasets": version("datasets")}  # fmt: skip


def keep_rows_up_to(path: str, step: int):
    """Drop the rows of a .jsonl log whose step is past `step` (rewritten atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def run_folder(output_dir: str, run_name: str | None, script: str, seed: int) -> str:
    return os.path.join(output_dir, run_name or f"{script}__s{seed}__{time.strftime('%Y%m%d-%H%M%S')}")


def save_checkpoint(run_dir: str, step: int, model, tokenizer, optimizer, state: dict) -> str:
    """`checkpoints/step_<N>/`: the model in save_pretrained format (loadable with transformers) plus
    `trainer_state.pt` (optimizer, step, random states) for --resume. Rank 0 writes, into a temporary folder
    renamed when complete, so a kill during a save never leaves a checkpoint that looks complete."""
    folder = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    if not is_main():
        return folder
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng, **state}, f"{partial}/trainer_state.pt")
    shutil.rmtree(folder, ignore_errors=True)  # the same step saved by an earlier attempt of this run
    os.replace(partial, folder)
    return folder


def is_complete(checkpoint: str) -> bool:
    return all(os.path.exists(os.path.join(checkpoint, f)) for f in ("config.json", "trainer_state.pt"))


def latest_checkpoint(run_dir: str, warn=print) -> str:
    """The newest complete checkpoint of a run, for --resume; incomplete ones (a save that was cut off) are
    skipped with a warning. A clear error when there is none."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(os.listdir(folder), reverse=True) if os.path.isdir(folder) else []
    for name in names:
        if not name.startswith("step_"):
            continue
        if name.endswith(".partial") or not is_complete(os.path.join(folder, name)):
            warn(f"warning: skipping the incomplete checkpoint {os.path.join(folder, name)}")
            continue
        return os.path.join(folder, name)
    fail(f"--resume {run_dir}: no complete checkpoint under {folder}")


def load_trainer_state(checkpoint: str, optimizer) -> dict:
    """Restore optimizer and random states from a checkpoint; returns the saved state (step, ...)."""
    state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state


class Timer:
    """Accumulates wall-clock seconds per phase: `with timer("generate"): ...`."""

    def __init__(self):
        self.totals, self._phase = {}, None

    def __call__(self, phase: str):
        self._phase = phase
        return self

    def __enter__(self):
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        self.totals[self._phase] = self.totals.get(self._phase, 0.0) + time.perf_counter() - self._start

    def pop(self) -> dict:
        totals, self.totals = self.totals, {}
        return totals
