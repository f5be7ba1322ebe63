"""The one-line messages every file uses: `fail` for a user's mistake, `warn` for a legal but suspicious value,
printed by rank 0 alone (`is_main`), and the probe that says why a folder cannot be made."""

import os
import tempfile


def is_main() -> bool:
    """Whether this process is rank 0, the one that prints and writes: torchrun sets RANK before the script starts,
    so the answer holds from the first line on; a plain `python` run is rank 0."""
    return os.environ.get("RANK", "0") == "0"


def fail(message: str):
    """Stop with a one-line error for a user mistake (no traceback, exit status 1). Under torchrun rank 0 prints
    it; every rank stops (the mistakes are the same on every rank, and rank 0 reports for them all)."""
    raise SystemExit(f"error: {message}" if is_main() else 1)


def warn(message: str):
    """A one-line warning, printed once (by rank 0 under torchrun)."""
    if is_main():
        print(f"warning: {message}", flush=True)


def first_line(error: Exception, width: int = 160) -> str:
    return (str(error).strip().splitlines() or [""])[0][:width]


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
