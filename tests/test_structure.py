"""The shape of the project, checked: `common/` in layers (no import circle; the world plugged in at one place),
its size, the skeleton the scripts share with grpo.py kept identical, the flags they share with grpo.py explained
alike, and the diffs that show each idea.

Marked `shape`: a student who edits a script may change the project's shape, so plain `pytest` (behaviour) leaves
these out; the full suite (`pytest -m "slow or not slow"`) runs them, and `pytest -m shape` runs them alone."""

import ast
import difflib
import os

import pytest

pytestmark = pytest.mark.shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("grpo", "pods", "dppo", "cropi", "ippo")
BUILT_ON_GRPO = SCRIPTS[1:]  # each copies grpo.py and adds one idea


def source(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def common_files(with_world=False) -> list[str]:
    files = []
    for folder, _, names in os.walk(os.path.join(ROOT, "common")):
        if "__pycache__" in folder or (not with_world and os.path.basename(folder) == "world"):
            continue
        files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names if n.endswith(".py")]
    return sorted(files)


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def project_imports(path: str) -> set[str]:
    """Every `common...` module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(source(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("common"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("common")}
    return found


def test_common_has_no_import_circle():
    graph = {module_name(p): project_imports(p) for p in common_files(with_world=True)}
    done, path = set(), []

    def visit(module):
        circle = " -> ".join(path[path.index(module):] + [module]) if module in path else ""
        assert not circle, (f"common/ imports in a circle ({circle}): its layers let each module be read without the "
                            "ones above it; move what both need down into a module that neither of them imports")
        if module in done:
            return
        path.append(module)
        for imported in graph.get(module, ()):
            visit(imported)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_world_plugs_in_at_one_place():
    importers = [p for p in common_files() if any(m.startswith("common.world") for m in project_imports(p))]
    assert importers == ["common/run.py"], (
        f"common.world is imported by {importers}, not by common/run.py alone: the world (the tasks, the tiny model) "
        "plugs in at one place so that the plumbing reads and swaps without it; reach it through common/run.py")


# Lines of common/ without world/: lower it when common/ shrinks; raise it only in the change that needs the lines,
# saying why (1553 -> 1693: stopping on SIGTERM/SIGHUP, a full disk, the strict verifier, data checks, schedules,
# the truncated completions, no SIGHUP or `resource` on Windows; 1693 -> 1915: LoRA in lora.py, the strict reward's
# answer form and the training reward's shaping, Weights & Biases, a one-line error for a flag's unknown choice).
COMMON_BUDGET = 1915


def test_common_stays_small():
    lines = sum(source(p).count("\n") for p in common_files())
    assert lines <= COMMON_BUDGET, (
        f"common/ without world/ has {lines} lines, over its budget of {COMMON_BUDGET}: a student reads it beside "
        "every script; shrink the change, or raise COMMON_BUDGET in tests/test_structure.py in the change that needs "
        "the lines, saying why in the comment above it")


def test_fsdp_is_imported_only_by_a_sharding_run():
    for path in [*common_files(), *(f"{s}.py" for s in SCRIPTS)]:
        if path == "common/fsdp.py":
            continue
        tree = ast.parse(source(path))
        top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)} | {
            a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        sharding = sorted(m for m in top if m and ("fsdp" in m or m.startswith("torch.distributed.tensor")))
        assert not sharding, (f"{path} imports {sharding} at its top: FSDP is loaded only when a run shards (--fsdp), "
                              "so a plain run neither pays for it nor breaks with it; import it inside the function "
                              "that shards")


# ---- the skeleton pods.py, dppo.py and cropi.py share with grpo.py --------------------------------------------

# Compared in every script that has one; every script has its own `reward`, so that changing it changes one script.
SHARED = ("reward", "group_advantages", "clipped_surrogate", "kl_k3", "loss_normaliser", "aggregate")
# Compared only in the scripts named: dppo.py and ippo.py update the policy their own way.
SHARED_BY = {"policy_update": ("pods", "cropi")}


def functions(script: str) -> dict[str, str]:
    text = source(f"{script}.py")
    return {n.name: ast.get_source_segment(text, n) for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}


def copied_names(script: str, own: dict[str, str]) -> list[str]:
    """The functions `script` copies from grpo.py: the SHARED ones it has, and those SHARED_BY names it for."""
    return [name for name in SHARED if name in own] + [name for name, by in SHARED_BY.items() if script in by]


@pytest.mark.parametrize("script", BUILT_ON_GRPO)
def test_shared_functions_are_still_grpo_s(script):
    """A fix to one of these in grpo.py must reach every script that copies it (and the reverse)."""
    grpo, own = functions("grpo"), functions(script)
    assert "reward" in own, (f"{script}.py has no reward function: each script keeps its own copy of grpo.py's, so "
                             "that a student changes one script's reward without touching the others; put it back")
    for name in copied_names(script, own):
        assert name in own, (f"{script}.py has no {name}, though SHARED_BY says it copies grpo.py's: put the copy "
                             f"back, or drop {script!r} from SHARED_BY[{name!r}] in tests/test_structure.py")
        assert own[name] == grpo[name], (
            f"{script}.py's {name} differs from grpo.py's, and a fix to grpo.py's {name} must reach {script}.py's "
            f"copy: make the two identical again, or, if {script}.py's idea needs its own {name}, drop {script!r} "
            f"from SHARED_BY[{name!r}] (for a SHARED name: move it from SHARED to SHARED_BY, naming the scripts that "
            "still copy it) in tests/test_structure.py, saying why")


# ---- the flags a script shares with grpo.py, explained alike in --help -------------------------------------------

# (script, flag) whose help differs from grpo.py's on purpose, and why.
DELIBERATE_VARIANTS = {
    ("cropi", "fsdp"): "cropi.py cannot shard yet",
    ("cropi", "resume"): "cropi.py's resume reuses its offline store",
    ("cropi", "steps"): "cropi.py trains in stages of --steps-per-stage",
    ("cropi", "max_time"): "cropi.py's clock counts its influence scoring too",
    ("ippo", "dtype"): "ippo.py also has a critic",
    ("ippo", "fsdp"): "ippo.py cannot shard yet",
    ("ippo", "steps"): "a PPO iteration: one scored buffer, --epochs passes over it",
    ("ippo", "log_every"): "ippo.py counts PPO iterations, not steps",
    ("ippo", "eval_every"): "ippo.py counts PPO iterations, not steps",
    ("ippo", "save_every"): "ippo.py counts PPO iterations, not steps",
    ("ippo", "batch_prompts"): "ippo.py counts PPO iterations, not steps",
    ("ippo", "n"): "no group: ippo.py's baseline is its critic",
    ("ippo", "minibatches"): "per PPO epoch, one actor and one critic step each",
    ("ippo", "micro_batch"): "ippo.py calls a rollout an episode",
    ("ippo", "lr"): "the actor's rate, with its own default tuned for `tiny`",
    ("ippo", "max_grad_norm"): "clips the actor and the critic each",
    ("ippo", "beta"): "the KL is a per-token penalty in the reward, not a loss term",
}


def is_text(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def flag_help(script: str) -> dict[str, str | None]:
    """{field: its help} of the script's Args: tyro shows the string under a field as that flag's --help text.
    Spaces are collapsed, since --help rewraps the text and a line break says nothing there."""
    tree = ast.parse(source(f"{script}.py"))
    args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    helps = {}
    for field, after in zip(args.body, [*args.body[1:], None]):
        if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name):
            helps[field.target.id] = " ".join(after.value.value.split()) if after and is_text(after) else None
    return helps


@pytest.mark.parametrize("script", BUILT_ON_GRPO)
def test_a_flag_shared_with_grpo_has_grpo_s_help(script):
    grpo, own = flag_help("grpo"), flag_help(script)
    shared = [f for f in own if f in grpo and (script, f) not in DELIBERATE_VARIANTS]
    drift = {f: (grpo[f], own[f]) for f in shared if own[f] != grpo[f]}
    texts = "; ".join(f"{f}: grpo.py says {g!r}, {script}.py says {o!r}" for f, (g, o) in drift.items())
    assert not drift, (
        f"{script}.py explains {sorted(drift)} unlike grpo.py, and a flag they share should read the same in both "
        f"--help: copy one text to the other, or, if {script}.py's says what is true only there, add ({script!r}, "
        f"field) and why to DELIBERATE_VARIANTS in tests/test_structure.py ({texts})")


@pytest.mark.parametrize("script, field", DELIBERATE_VARIANTS)
def test_every_deliberate_variant_still_differs(script, field):
    grpo, own = flag_help("grpo"), flag_help(script)
    assert field in grpo and field in own, (
        f"DELIBERATE_VARIANTS lists ({script!r}, {field!r}), but grpo.py or {script}.py no longer has {field}: "
        "remove the entry from tests/test_structure.py")
    assert own[field] != grpo[field], (
        f"DELIBERATE_VARIANTS lists ({script!r}, {field!r}), but {script}.py's help for {field} now reads as "
        "grpo.py's: remove the entry from tests/test_structure.py")


# Changed lines of `diff grpo.py X.py`: what the idea costs to read. Raise a budget only with the idea (cropi 402: its
# offline store's rewards take the --format-bonus too).
DIFF_BUDGET = {"pods": 100, "dppo": 293, "cropi": 402}


def changed_lines(a: str, b: str) -> int:
    """Lines removed plus lines added, as `diff a b` counts them (a minimal diff, no line treated as junk)."""
    matcher = difflib.SequenceMatcher(None, source(a).splitlines(), source(b).splitlines(), autojunk=False)
    return sum(i2 - i1 + j2 - j1 for op, i1, i2, j1, j2 in matcher.get_opcodes() if op != "equal")


@pytest.mark.parametrize("script", DIFF_BUDGET)
def test_the_diff_from_grpo_shows_the_idea(script):
    n, budget = changed_lines("grpo.py", f"{script}.py"), DIFF_BUDGET[script]
    assert n <= budget, (
        f"diff grpo.py {script}.py changes {n} lines, over its budget of {budget}: the diff is what a reader reads to "
        f"see the idea; shrink the change, or raise DIFF_BUDGET[{script!r}] in tests/test_structure.py in the change "
        "that needs the lines, saying why")
