"""Seeding, torchrun helpers, the run folder (args, metrics.jsonl, TensorBoard, samples), progress, checkpoints."""

import atexit
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import asdict, fields

try:
    import fcntl  # Linux and macOS: a run folder is locked while its run is alive
except ImportError:  # Windows: run folders are still created atomically, but not locked
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def fail(message: str):
    """Stop with a one-line error for a user mistake (no traceback, exit status 1)."""
    raise SystemExit(f"error: {message}")


def warn(message: str):
    """A one-line warning for a value that is legal but almost surely a mistake (rank 0 prints it)."""
    if is_main():
        print(f"warning: {message}", flush=True)


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


def check_flags(args, positive=(), non_negative=(), below_one=(), may_be_infinite=()):
    """One-line errors for a flag that must be > 0, >= 0 or < 1, for any float flag that is not finite (NaN, or
    infinite unless listed in `may_be_infinite`), and for a `*_params` pattern that is not a regular expression:
    `--lr -1.0: must be positive`, `--lr inf: must be finite`."""
    for field in fields(args):
        value = getattr(args, field.name)
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value) and field.name not in may_be_infinite):
            fail(f"{flag(field.name)} {value}: must be finite")
        if field.name.endswith("_params") and isinstance(value, str):  # --grad-params, --train-params: patterns
            try:
                re.compile(value)
            except re.error as e:
                fail(f"{flag(field.name)} {value!r}: not a regular expression ({e})")
    rules = ((positive, lambda v: v > 0, "positive"), (non_negative, lambda v: v >= 0, "non-negative"),
             (below_one, lambda v: v < 1, "below 1"))  # fmt: skip
    for names, ok, word in rules:
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
        atexit.register(dist.destroy_process_group)  # a group left alive can abort the process as it exits
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


def from_main_rank(make):
    """`make()` run on rank 0 only, its result sent to every rank. A one-line error on rank 0 stops every rank
    with it, rather than leaving the others waiting."""
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
    and the NaN norm returned lets the caller count the skip. Every rank sees the same norm, so all agree.
    A sharded model's gradients were averaged by the backward pass; their norm is over all the shards."""
    if not isinstance(model, FSDPModule):
        average_gradients(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad()
    return norm if math.isfinite(norm) else math.nan


def grad_norm_metrics(norms: list[float]) -> dict:
    """The mean gradient norm of a step's optimizer steps, and how many were skipped (NaN: not finite)."""
    finite = [g for g in norms if math.isfinite(g)]
    return {"grad_norm": sum(finite) / max(1, len(finite)), "train/skipped_steps": len(norms) - len(finite)}


class Totals:
    """Sums of a step's figures over its micro-batches, then over ranks: `Totals("tokens", "loss")`, then
    `totals.add(tokens=mask, loss=loss)` adds each tensor's sum; `totals.over_ranks()` returns the global sums.
    The names are declared first, so that a rank with nothing to add still joins the all-reduce with zeros."""

    def __init__(self, *names: str):
        self.sums = dict.fromkeys(names, 0.0)

    def add(self, **values):
        for name, value in values.items():
            self.sums[name] += value.sum().item() if torch.is_tensor(value) else value

    def over_ranks(self) -> dict:
        return dict(zip(self.sums, all_reduce_sum(list(self.sums.values()))))


def all_reduce_tensors(tensors):
    """Sum tensors over ranks, in place (nothing to do in one process)."""
    if dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


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


def shard(model, args):
    """--fsdp under torchrun: FSDP2 (`fully_shard`) splits the weights, and with them the gradients and AdamW's
    moments, over the ranks. Each decoder layer is one unit and the root holds the rest (embeddings, final norm,
    output layer); a unit's full weights are gathered for its forward and backward and freed after, and the
    backward's reduce-scatter leaves each rank the average gradient of its shard. The shards stay float32 (the
    policy is loaded so); with --dtype bfloat16 each unit computes in bfloat16 and reduces in float32. Returns
    the model (sharded in place); without --fsdp, or in one process, unchanged."""
    if model is None or not getattr(args, "fsdp", False):
        return model
    kinds = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    if not layers:
        fail(f"--fsdp: found no decoder layers in {type(model).__name__} (none of the classes its _no_split_modules"
             " names), so it cannot be sharded per layer")  # fmt: skip
    if world_size() == 1:
        return model
    mesh = dist.device_mesh.init_device_mesh(next(model.parameters()).device.type, (world_size(),))
    bf16 = args.dtype == "bfloat16"
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for unit in [*layers, model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def gathered(model):
    """Every rank holds a sharded model's full weights for the whole block: one all-gather per unit, then no
    communication at all, however many forward passes each rank makes (sampling makes one per token, and ranks
    stop at different lengths). Nothing to do for a model that is not sharded, or is gathered already."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
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


# ---- run folder, logging, checkpoints ------------------------------------------------------------------


def check_run_name(output_dir: str, run_name: str | None):
    """A run folder is a plain folder inside --output-dir: no empty --output-dir (it would write into the
    current folder unannounced), no --run-name that climbs out of it or nests."""
    if not output_dir.strip():
        fail("--output-dir '': give a folder (e.g. runs, or . for the current folder)")
    if run_name is not None and (not run_name.strip() or run_name in (".", "..") or "/" in run_name
                                 or os.sep in run_name or run_name.startswith(".")):  # fmt: skip
        fail(f"--run-name {run_name!r}: must be a plain folder name (no path separators, not starting with .)")


def run_folder(output_dir: str, run_name: str | None, script: str, seed: int) -> str:
    """The run folder: --run-name, or <script>__s<seed>__<time> (a number is added when that exists)."""
    name = run_name or f"{script}__s{seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    return os.path.join(os.path.expanduser(output_dir), name)


def refuse_existing(folder: str):
    """The one-line error for a --run-name whose folder holds a run (or anything else) already."""
    fail(f"--run-name: {folder} already exists; choose another name, or continue it with"
         f" --resume {shlex.quote(folder)}")  # fmt: skip


def lock_folder(path: str) -> int | None:
    """An open descriptor of `path` holding an exclusive lock on it, or None when another process holds one.
    The operating system drops the lock when its process ends, however it ends (kill -9 included)."""
    fd = os.open(path, os.O_RDONLY)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def stopped_before_saving(run_dir: str) -> bool:
    """A run folder whose run started (args.json) but never completed a checkpoint: it cannot be resumed,
    so a new run of the same name may replace it (once no process holds it)."""
    return os.path.exists(os.path.join(run_dir, "args.json")) and not complete_checkpoints(run_dir)


def claim_run_folder(run_dir: str, first_files: dict, numbered: bool) -> tuple[str, int]:
    """Create `run_dir` atomically with `first_files` ({name: text}) in it and lock it: the files are written
    into a fresh hidden folder that is then renamed into place, and a rename never replaces a folder that
    holds files. So of two runs given one name, concurrently or not, exactly one gets it; the other stops
    with a one-line error having written nothing. `numbered` (a default name): take <run_dir>_2, _3, ...
    instead. A folder left by a run that stopped before its first checkpoint is replaced, with a warning.
    Returns the folder and the descriptor holding its lock (held until the process ends)."""
    parent = os.path.dirname(os.path.abspath(run_dir))
    os.makedirs(parent, exist_ok=True)
    for attempt in range(1, 1000):
        folder = run_dir if attempt == 1 else f"{run_dir}_{attempt}"
        staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.")
        os.chmod(staging, 0o777 & ~current_umask())  # as os.mkdir would make it, not mkdtemp's private 0o700
        for name, text in first_files.items():
            with open(os.path.join(staging, name), "w") as f:
                f.write(text)
        lock = lock_folder(staging)
        try:
            os.rename(staging, folder)
            return folder, lock
        except OSError:  # the folder exists (and is not empty)
            os.close(lock)
            shutil.rmtree(staging)
        if numbered:
            continue
        if not os.path.isdir(folder):
            fail(f"--run-name: {folder} exists and is not a folder; choose another name")
        lock = lock_folder(folder)
        if lock is None:
            fail(f"--run-name: {folder} is in use by another run right now; choose another name")
        if not stopped_before_saving(folder):
            os.close(lock)
            refuse_existing(folder)
        warn(f"replacing {folder}: its run stopped before its first checkpoint, so it cannot be resumed")
        for entry in os.listdir(folder):
            path = os.path.join(folder, entry)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        for name, text in first_files.items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
        return folder, lock
    fail(f"--output-dir: could not find a free run folder name near {run_dir}")


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


class RunLogger:
    """`runs/<name>/`: args.json, metrics.jsonl, TensorBoard events, samples.jsonl; progress bar on rank 0.

    Nothing is written until `open()`, which claims the folder (`claim_run_folder`, or the lock of the run
    being resumed): every start-up check runs before it, so a run that fails at start-up leaves nothing.
    On ranks other than 0 every method does nothing, so callers need no rank checks.
    """

    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0):
        self.run_dir, self.total, self.start_step, self.enabled = run_dir, total_steps, start_step, is_main()
        self.lock = self.bar = None

    def open(self, args, script: str, numbered: bool) -> str:
        """Claim the run folder and open its logs; returns the folder (the same on every rank)."""
        self.run_dir = from_main_rank(lambda: self.claim(args, script, numbered))
        if not self.enabled:
            return self.run_dir
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=self.start_step, desc=os.path.basename(self.run_dir),
                        dynamic_ncols=True)  # fmt: skip
        self.metrics_file = open(os.path.join(self.run_dir, "metrics.jsonl"), "a")
        self.samples_file = open(os.path.join(self.run_dir, "samples.jsonl"), "a")
        self.tb = SummaryWriter(self.run_dir, purge_step=self.start_step + 1 if self.start_step else None)
        return self.run_dir

    def claim(self, args, script: str, numbered: bool) -> str:
        record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(), "args": asdict(args)}
        if self.start_step == 0:
            files = {"args.json": json.dumps({"script": script, **asdict(args)}, indent=1),
                     "versions.json": json.dumps(record["versions"], indent=1)}  # fmt: skip
            run_dir, self.lock = claim_run_folder(self.run_dir, files, numbered)
            return run_dir
        self.lock = lock_folder(self.run_dir)  # a resume: the run's own args.json stays
        if self.lock is None:
            fail(f"--resume {self.run_dir}: another process is running this run right now")
        logs = [os.path.join(self.run_dir, name) for name in ("metrics.jsonl", "samples.jsonl")]
        try:
            kept = [rows_up_to(path, self.start_step) for path in logs]  # checked before anything is changed
        except SystemExit:
            os.close(self.lock)
            raise
        for path, rows in zip(logs, kept):  # rows logged after the checkpoint will be logged again
            if rows is not None:
                with open(path + ".tmp", "w") as f:
                    f.writelines(rows)
                os.replace(path + ".tmp", path)
        with open(os.path.join(self.run_dir, "resumes.jsonl"), "a") as f:
            f.write(json.dumps({"from_step": self.start_step, **record}) + "\n")
        return self.run_dir

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def print(self, line: str):
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(line)  # above the progress bar, once there is one

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
        if self.bar is None:  # never opened, or not rank 0
            return
        self.bar.close()
        self.tb.close()
        self.metrics_file.close()
        self.samples_file.close()
        os.close(self.lock)  # the run is over: another process may resume it
        self.bar = None


def versions() -> dict:
    """The versions a run was made with, written into its folder."""
    import platform
    from importlib.metadata import version  # reads the installed versions without importing the packages

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
            "datasets": version("datasets")}  # fmt: skip


def rows_up_to(path: str, step: int) -> list[str] | None:
    """The rows of a .jsonl log up to `step` (None if there is no such file). A torn last line (a kill during a
    write) is dropped with a warning; a damaged line before it is a one-line error."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if number < len(lines):
                fail(f"--resume {os.path.dirname(path)}: line {number} of {os.path.basename(path)} is damaged (not a"
                     " row with a step); repair or delete that line")  # fmt: skip
            warn(f"dropping the torn last line of {path} (line {number}: {line.strip()[:60]!r})")
            break
        if row["step"] <= step:
            rows.append(line if line.endswith("\n") else line + "\n")
    return rows


def save_checkpoint(run_dir: str, step: int, model, tokenizer, optimizer, state: dict) -> str:
    """`checkpoints/step_<N>/`: the model in save_pretrained format (loadable with transformers) plus
    `trainer_state.pt` (optimizer, step, random states) for --resume. Rank 0 writes, into a temporary folder
    renamed when complete, so a kill during a save never leaves a checkpoint that looks complete."""
    folder = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    weights = optimizer_state = None  # unsharded: the model's and the optimizer's own state_dict(), on rank 0
    if isinstance(model, FSDPModule):  # every rank sends its shards; rank 0 gets the whole of each
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=whole)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=whole)
        own = {name for name, _ in [*model.named_parameters(), *model.named_buffers()]}  # a tied weight once
        weights = {name: w for name, w in weights.items() if name in own}
    if not is_main():
        return folder
    optimizer_state = optimizer_state or optimizer.state_dict()
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, state_dict=weights)
    tokenizer.save_pretrained(partial)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"step": step, "optimizer": optimizer_state, "rng": rng, **state}, f"{partial}/trainer_state.pt")
    shutil.rmtree(folder, ignore_errors=True)  # the same step saved by an earlier attempt of this run
    os.replace(partial, folder)
    return folder


def is_complete(checkpoint: str) -> bool:
    return all(os.path.exists(os.path.join(checkpoint, f)) for f in ("config.json", "trainer_state.pt"))


def complete_checkpoints(run_dir: str, warn=lambda line: None) -> list[str]:
    """A run's checkpoints that finished saving, newest first; incomplete ones (a save that was cut off) are
    passed over with a warning."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(os.listdir(folder), reverse=True) if os.path.isdir(folder) else []
    found = []
    for name in names:
        if not name.startswith("step_"):
            continue
        if name.endswith(".partial") or not is_complete(os.path.join(folder, name)):
            warn(f"warning: skipping the incomplete checkpoint {os.path.join(folder, name)}")
            continue
        found.append(os.path.join(folder, name))
    return found


def read_trainer_state(checkpoint: str) -> dict:
    """A checkpoint's trainer_state.pt (optimizer, step, random states, the script's own state)."""
    state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
    if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= set(state):
        raise ValueError("trainer_state.pt lacks the step, optimizer or random states")
    return state


def restore_trainer_state(state: dict, model, optimizer):
    """Put a checkpoint's optimizer and random states back (a sharded model's optimizer takes its shard)."""
    if isinstance(model, FSDPModule):
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])


class PhaseTimer:
    """Wall-clock seconds per phase of a step: `with timer("generate"): ...`; `pop()` gives {"time/generate": s}
    and starts the next step afresh."""

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
        return {f"time/{phase}": seconds for phase, seconds in totals.items()}
