"""The run folder and what it holds: its name checked, claimed atomically, locked while its run lives, its checkpoints
saved and the newest that loads found for --resume, its logs cut back to it; a full disk is a one-line error."""

import contextlib
import errno
import glob
import json
import os
import random
import re
import shlex
import shutil
import tempfile
import time

import numpy as np
import torch

try:
    import fcntl  # Linux and macOS: a run folder is locked while its run is alive (Windows: not locked)
except ImportError:
    fcntl = None

from common.errors import creation_problem, fail, first_line, is_main, warn
from common.lora import load_adapter, lora_layers, merged_state_dict, save_adapter
from common.model import load_policy
from common.torchrun import is_sharded

WRITE_ERROR = r"No space|quota|too large|iostream|unexpected pos|failed writing|write"  # as OSError and torch say it


def run_folder_of(args, script: str, resume: str | None) -> str:
    """The run's folder: --resume's, or --output-dir/--run-name (default <script>__s<seed>__<time>, numbered by the
    claim if taken), checked at once: a plain folder name, not a run that saved a checkpoint, a place to write."""
    run_dir = resume or os.path.join(os.path.expanduser(args.output_dir), args.run_name or
                                     f"{script}__s{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")  # fmt: skip
    if not resume:
        check_run_name(args.output_dir, args.run_name)
    if args.run_name and not resume and os.path.exists(run_dir) and not never_saved(run_dir):
        refuse_existing(run_dir)  # early; the claim decides (a default name never collides: it is numbered)
    problem = creation_problem(os.path.join(run_dir, "checkpoints", "step"))  # probes checkpoints/ on resume
    if problem:
        fail(f"{'--resume' if resume else '--output-dir'}: cannot {'write in' if resume else 'create'} {run_dir}"
             f" ({problem})")  # fmt: skip
    return run_dir


def check_run_name(output_dir: str, run_name: str | None):
    """A run folder is a plain folder inside --output-dir: no empty --output-dir, no --run-name that climbs or nests."""
    if not output_dir.strip():
        fail("--output-dir '': give a folder (e.g. runs, or . for the current folder)")
    if run_name is not None and (not run_name.strip() or "/" in run_name or os.sep in run_name or run_name[0] == "."):
        fail(f"--run-name {run_name!r}: must be a plain folder name (no path separators, not starting with .)")
    if run_name is not None and len(run_name.encode()) > 240:  # file systems allow 255; staging adds a suffix
        fail(f"--run-name: {len(run_name.encode())} bytes long; at most 240")


def refuse_existing(folder: str):
    if not os.path.isdir(folder):
        fail(f"--run-name: {folder} exists and is not a folder; choose another name")
    fail(f"--run-name: {folder} already exists; choose another name, or continue it with"
         f" --resume {shlex.quote(folder)}")  # fmt: skip


def lock_folder(path: str) -> int | None:
    """An open descriptor of `path` holding an exclusive lock on it, or None when another process holds one (the
    system drops a lock when its process ends, however it ends)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def never_saved(run_dir: str) -> bool:
    """A run folder whose run started (args.json) but never completed a checkpoint: it cannot be resumed."""
    return os.path.exists(os.path.join(run_dir, "args.json")) and not complete_checkpoints(run_dir)


def claim_run_folder(run_dir: str, first_files: dict, numbered: bool) -> tuple[str, int]:
    """Create `run_dir` with `first_files` ({name: text}) in it, locked (until the process ends): they are written
    into a hidden folder renamed into place, and a rename never replaces a folder that holds files, so of two runs
    given one name exactly one gets it; the other stops with a one-line error. `numbered` (a default name): take
    <run_dir>_2, _3, ... instead. A folder whose run never saved a checkpoint is replaced, with a warning."""
    parent = os.path.dirname(os.path.abspath(run_dir))
    os.makedirs(parent, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    names = [f"{run_dir}_{i}" if i > 1 else run_dir for i in range(1, 1000)] if numbered else [run_dir, run_dir]
    for folder in names:
        staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.")
        with removed_on_error(staging):
            os.chmod(staging, 0o777 & ~umask)  # as os.mkdir would make it, not mkdtemp's private 0o700
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
            refuse_existing(folder)  # a file of that name: "not a folder"
        lock = lock_folder(folder)
        if lock is None:
            fail(f"--run-name: {folder} is in use by another run right now; choose another name")
        if not never_saved(folder):
            os.close(lock)
            refuse_existing(folder)
        warn(f"replacing {folder}: its run stopped before its first checkpoint, so it cannot be resumed")
        shutil.rmtree(folder)  # under its lock; the next pass renames this run's folder into its place
        os.close(lock)
    fail(f"--output-dir: could not claim a run folder near {run_dir}")


@contextlib.contextmanager
def removed_on_error(path: str):
    """`path` (a file or a folder) removed if the block fails: a full disk leaves no half-written copy."""
    try:
        yield
    except BaseException:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        raise


def rows_up_to(path: str, step: int, warn=warn) -> list[str] | None:
    """The rows of a .jsonl log up to `step` (None without the file). A torn last line (a kill during a write) is
    dropped with a warning (`warn`); a damaged line before it is a one-line error."""
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


def reopen_run_folder(run_dir: str, step: int, record: dict) -> int:
    """A resumed run's folder, locked (the descriptor is returned): its logs cut back to `step`, the checkpoint's,
    checkpoints half-saved by a kill or a full disk removed, the resume appended to resumes.jsonl (`record`)."""
    lock = lock_folder(run_dir)
    if lock is None:
        fail(f"--resume {run_dir}: another process is running this run right now")
    logs = [os.path.join(run_dir, name) for name in ("metrics.jsonl", "samples.jsonl")]
    try:
        kept = [rows_up_to(path, step) for path in logs]  # checked before anything is changed
    except SystemExit:
        os.close(lock)
        raise
    for path, rows in zip(logs, kept):
        if rows is not None:
            with open(path + ".tmp", "w") as f, removed_on_error(path + ".tmp"):
                f.writelines(rows)
            os.replace(path + ".tmp", path)
    for partial in glob.glob(os.path.join(run_dir, "checkpoints", "*.partial")):
        shutil.rmtree(partial)
    with open(os.path.join(run_dir, "resumes.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    return lock


def complete_checkpoints(run_dir: str, warn=lambda line: None) -> list[str]:
    """A run's checkpoints that finished saving, newest first; one cut off while saving is passed over (`warn`)."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(os.listdir(folder), reverse=True) if os.path.isdir(folder) else []
    found = []
    for path in [os.path.join(folder, name) for name in names if name.startswith("step_")]:
        files = [os.path.join(path, f) for f in ("config.json", "trainer_state.pt")]
        if path.endswith(".partial") or not all(map(os.path.exists, files)):
            warn(f"warning: skipping the incomplete checkpoint {path}")
        else:
            found.append(path)
    return found


def evaluated(run_dir: str, step: int) -> bool:
    """Whether metrics.jsonl holds an evaluation of `step` (a signal during that step skips it, to stop soon)."""
    rows = map(json.loads, rows_up_to(os.path.join(run_dir, "metrics.jsonl"), step, warn=lambda line: None) or [])
    return any(row["step"] == step and any(key.startswith("eval/") for key in row) for row in rows)


def when_disk_full(method):
    """A Run method that writes, with a full disk or a file-size limit turned into a one-line error that says so
    (torch reports either as an obscure stream error). What was complete stays: the newest checkpoint, the logs."""

    def writing(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (OSError, RuntimeError) as e:
            code = getattr(e, "errno", None)
            if code not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, None) or not re.search(WRITE_ERROR, str(e)):
                raise
            full, limit = "the disk is full", "a file reached the file-size limit (ulimit -f)"
            why = {errno.EFBIG: limit, errno.ENOSPC: full, errno.EDQUOT: "the disk quota is used up"}.get(code)
            if self.files:  # the run is over: end the progress bar's line, free the folder
                self.bar.close()
                os.close(self.lock)
            fail(f"cannot write in {self.run_dir}: {why or full + ', or ' + limit}; make room, then start again (a run"
                 f" with a checkpoint continues with --resume {shlex.quote(self.run_dir)})")  # fmt: skip

    return writing


def save_checkpoint(run_dir: str, step: int, model, tokenizer, optimizer, state: dict) -> str:
    """`checkpoints/step_<N>/`: the model as transformers saves it (LoRA: merged, plus the adapter in `adapter/`) and
    `trainer_state.pt` (optimizer, step, random states); rank 0 writes `.partial`, renamed once complete."""
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
