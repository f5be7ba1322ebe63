"""python -m exercises list | start ID [--force] [--solution] | check ID [--no-train]   (docs/course.md)

list    every exercise: its script, the function to write, what to read, the expected time
start   write the working copy work/<script>.py with the exercise's function to write (--force: over a copy that
        exists; --solution: with the function written, for teachers)
check   test the function in the copy against the project's (or, for an open exercise, against the properties it
        must have), then train with the copy for under a minute and print the number that shows the idea at work
--work DIR puts the copies somewhere else than work/ (they must stay on the same disk as the repository)."""

import argparse
import os
import sys
import time

from common.errors import fail
from exercises.catalog import BY_ID, EXERCISES
from exercises.checks import Mismatch, check_all
from exercises.copies import ROOT, copy_source, load_function, reference_function
from exercises.training import train


def exercise(exercise_id: str):
    if exercise_id not in BY_ID:
        fail(f"no exercise {exercise_id!r}; the exercises are: {', '.join(BY_ID)}")
    return BY_ID[exercise_id]


def copy_path(ex, work: str) -> str:
    return os.path.join(work, f"{ex.script}.py")


def show_list():
    print(f"{'id':<24}{'script':<10}{'write':<28}{'minutes':>8}  read")
    for ex in EXERCISES:
        print(f"{ex.id:<24}{ex.script + '.py':<10}{ex.function:<28}{ex.minutes:>8}  {ex.page}")
        print(f"{'':<24}{'(open) ' if ex.open else ''}{ex.what}")


def start(ex, work: str, force: bool, solution: bool):
    path = copy_path(ex, work)
    if os.path.exists(path) and not force:
        fail(f"{path} exists (work of yours?); add --force to overwrite it, or move it away first")
    os.makedirs(work, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(copy_source(ex, path, solution))
    print(f"wrote {path}: {'the solution of ' if solution else 'write '}{ex.function} ({ex.what})")
    print(f"read {ex.page}; then: python -m exercises check {ex.id}")


def check(ex, work: str, with_training: bool = True) -> float:
    """The checks, then the training run; the seconds it all took."""
    began, path = time.perf_counter(), copy_path(ex, work)
    student = load_function(ex, path)
    kind = "the properties it must have" if ex.open else f"{ex.script}.py's own {ex.function}"
    print(f"checking {ex.function} in {path} against {kind}")
    try:
        passed = check_cases(ex, student)
    except Mismatch as e:
        print(f"FAILED {e}")
        fail(f"exercise {ex.id}: case {e.case.name!r} fails: {e.what}")
    print("\n".join(f"  ok  {name}" for name in passed))
    if with_training:
        rows = train(ex, path, os.path.join(work, "runs"))
        print(f"result: {ex.report(rows)}")
    print(f"exercise {ex.id} done ({time.perf_counter() - began:.0f} s)")
    return time.perf_counter() - began


def check_cases(ex, student) -> list[str]:
    """The names of the cases passed; the first that fails raises Mismatch. A stop in the student's function (the
    exercise's own `fail`, not done yet) ends the check with its message."""
    if ex.open:
        ex.properties(student)
        return ["every property"]
    return check_all(student, reference_function(ex), ex.cases(), ex.compare)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m exercises", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("list", "start", "check"))
    parser.add_argument("id", nargs="?")
    parser.add_argument("--force", action="store_true", help="start: overwrite a working copy that exists")
    parser.add_argument("--solution", action="store_true", help="start: write the solution in (for teachers)")
    parser.add_argument("--no-train", action="store_true", help="check: the function's checks only")
    parser.add_argument("--work", default=os.path.join(ROOT, "work"), help="the folder of the working copies")
    args = parser.parse_args(argv)
    if args.command == "list":
        return show_list()
    if args.id is None:
        fail(f"`{args.command}` needs an exercise id; the exercises are: {', '.join(BY_ID)}")
    work = os.path.relpath(args.work)
    if args.command == "start":
        return start(exercise(args.id), work, args.force, args.solution)
    check(exercise(args.id), work, not args.no_train)


if __name__ == "__main__":
    sys.exit(main())
