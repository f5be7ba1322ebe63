"""The run folder: its name checked, claimed atomically and locked while its run is alive, its logs cut back to a
checkpoint on --resume, the checkpoints it holds; a full disk while writing in it is a one-line error."""

import contextlib
import errno
import glob
import json
import os
import re
import shlex
import shutil
import tempfile

try:
    import fcntl  # Linux and macOS: a run folder is locked while its run is alive (Windows: not locked)
except ImportError:
    fcntl = None

from common.errors import fail, warn


def check_run_name(output_dir: str, run_name: str | None):
    """A run folder is a plain folder inside --output-dir: no empty --output-dir, no --run-name that climbs or nests."""
    if not output_dir.strip():
        fail("--output-dir '': give a folder (e.g. runs, or . for the current folder)")
    if run_name is not None and (not run_name.strip() or run_name in (".", "..") or "/" in run_name
                                 or os.sep in run_name or run_name.startswith(".")):  # fmt: skip
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
            fail(f"--run-name: {folder} exists and is not a folder; choose another name")
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
    found = []
    for name in sorted(os.listdir(folder), reverse=True) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if not name.startswith("step_"):
            continue
        if name.endswith(".partial") or not all(os.path.exists(os.path.join(path, f))
                                                for f in ("config.json", "trainer_state.pt")):  # fmt: skip
            warn(f"warning: skipping the incomplete checkpoint {path}")
            continue
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


WRITE_ERROR = r"No space|quota|too large|iostream|unexpected pos|failed writing|write"  # as OSError and torch say it
