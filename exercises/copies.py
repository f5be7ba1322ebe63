"""The student's working copy of a script, written under work/ and read back for a check.

`start` copies the script with the exercise's function body replaced by its docstring and a stop that names the
exercise; an open exercise instead gets a new stub function, the flag that turns it on and the lines that call
it. The copy finds common/ and kernels/ through two lines put after its docstring, which add the repository's
root to sys.path relative to the copy's own folder: `python work/grpo.py` runs from the repository's root."""

import ast
import importlib.util
import os
import sys

from common.errors import fail, first_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIND_ROOT = """import os as _os, sys as _sys  # this copy lives outside the repository's root: find common/ and kernels/
_sys.path.insert(0, _os.path.normpath(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), {root!r})))
from common.errors import fail  # noqa: E402  (the exercise's stop)
"""


def script_source(script: str) -> str:
    with open(os.path.join(ROOT, f"{script}.py"), encoding="utf-8") as f:
        return f.read()


def function_node(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def signature(node: ast.FunctionDef) -> str:
    """`name(a, b, c=1.0)`: the argument names and defaults (annotations may differ)."""
    args = node.args.args
    defaults = [None] * (len(args) - len(node.args.defaults)) + node.args.defaults
    shown = [a.arg if d is None else f"{a.arg}={ast.unparse(d)}" for a, d in zip(args, defaults)]
    return f"{node.name}({', '.join(shown)})"


def not_done(exercise, copy_path: str, indent: str) -> list[str]:
    """The body a student replaces: a stop that says which exercise is not done yet."""
    return [f"{indent}# your code here: replace the next line with the body of {exercise.function}",
            f'{indent}fail("exercise {exercise.id} is not done yet: write {exercise.function} in {copy_path}")']


def blank(lines: list[str], node: ast.FunctionDef, exercise, copy_path: str) -> list[str]:
    """The function keeps its `def` line(s) and docstring; the rest of its body becomes the stop."""
    first, indent = node.body[0], " " * node.body[0].col_offset
    has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    keep_to = first.end_lineno if has_docstring else first.lineno - 1
    return lines[:keep_to] + not_done(exercise, copy_path, indent) + lines[node.end_lineno :]


def hook(lines: list[str], line: str, replacement: str, script: str) -> list[str]:
    """Replace the one line of the script equal to `line` (stripped) by `replacement`, at its indentation."""
    found = [i for i, text in enumerate(lines) if text.strip() == line.strip()]
    if len(found) != 1:
        fail(f"{script}.py no longer has the line `{line.strip()}` that the exercise hooks into")
    i = found[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    return lines[:i] + [indent + r if r else r for r in replacement.splitlines()] + lines[i + 1 :]


def add_open_parts(lines: list[str], tree: ast.Module, exercise, function_source: str) -> list[str]:
    """An open exercise's flag at the end of Args, its function before `exercise.before`, then its hooks (from the
    bottom of the file up, so that earlier line numbers stay right)."""
    args_end = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args").end_lineno
    before = function_node(tree, exercise.before).lineno - 1
    function = ["", "", f"# ---- open exercise {exercise.id}: {exercise.what} ----", "", ""]
    lines = lines[:before] + function[:-2] + function_source.splitlines() + ["", ""] + lines[before:]
    lines = lines[:args_end] + ["    " + f for f in exercise.flag.splitlines()] + lines[args_end:]
    for line, replacement in exercise.hooks:
        lines = hook(lines, line, replacement, exercise.script)
    return lines


def copy_source(exercise, copy_path: str, solution: bool = False) -> str:
    """The text of the student's copy (with `solution`: the teacher's, the function written)."""
    source = script_source(exercise.script)
    tree, lines = ast.parse(source), source.splitlines()
    if exercise.open:
        function = exercise.solution_source() if solution else exercise.stub_source(copy_path)
        lines = add_open_parts(lines, tree, exercise, function)
    elif not solution:
        lines = blank(lines, function_node(tree, exercise.function), exercise, copy_path)
    docstring_end = tree.body[0].end_lineno
    root = os.path.relpath(ROOT, os.path.dirname(os.path.abspath(copy_path)))
    return "\n".join(lines[:docstring_end] + ["", FIND_ROOT.format(root=root).rstrip()] + lines[docstring_end:]) + "\n"


def expected_signature(exercise) -> str:
    if exercise.open:
        return signature(function_node(ast.parse(exercise.stub_source("")), exercise.function))
    return signature(function_node(ast.parse(script_source(exercise.script)), exercise.function))


def load_function(exercise, copy_path: str):
    """The student's function, imported from their copy, after the checks that give a clear message: the copy
    exists, parses, has the function, with the signature the exercise needs."""
    if not os.path.exists(copy_path):
        fail(f"{copy_path} does not exist: run `python -m exercises start {exercise.id}` first")
    with open(copy_path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        fail(f"{copy_path} line {e.lineno}: syntax error ({e.msg})")
    node = function_node(tree, exercise.function)
    if node is None:
        fail(f"{copy_path} has no function {exercise.function}: the exercise checks it")
    got, want = signature(node), expected_signature(exercise)
    if got != want:
        fail(f"{copy_path} line {node.lineno}: the signature changed to {got}; the exercise needs {want}")
    found = importlib.util.spec_from_file_location(f"work_{exercise.script}", copy_path)
    module = importlib.util.module_from_spec(found)
    try:
        found.loader.exec_module(module)
    except SystemExit:
        raise
    except Exception as e:  # the student's copy failed on import: say where, not a traceback
        line = getattr(e, "lineno", None) or _line_in(e, copy_path)
        fail(f"{copy_path}{f' line {line}' if line else ''}: importing it failed ({type(e).__name__}: {first_line(e)})")
    return getattr(module, exercise.function)


def _line_in(error: Exception, path: str) -> int | None:
    """The last line of `path` in the error's traceback."""
    tb, line = error.__traceback__, None
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def reference_function(exercise):
    """The project's own function, which a core exercise is checked against."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return getattr(importlib.import_module(exercise.script), exercise.function)
