"""The built-in world: the `chain` task and the `tiny` model warmed up on it by a flawed teacher.

It exists so that every script runs by default offline, on a CPU, in minutes, under the conditions the
papers rely on (skills of different difficulty, a rare skill and a misconception, unfaithful chains that earn full
reward). A reader of the algorithms may skip this package: it plugs in from above, at one place only, the run's
start-up (`common/run.py`), which asks it for the `chain` task and the `tiny` model; nothing below imports it.
"""

from common.data import load_task
from common.model import resolve_model


def task_named(args):
    """The task of --task: the world's `chain` (one fixed split, whatever the seed: the tiny model was warmed up on
    its train split), `gsm8k` or a data file."""
    if args.task == "chain":
        from common.world.chain import make_chain

        return make_chain()
    return load_task(args.task, args.seed, args.question_field, args.answer_field,
                     getattr(args, "solution_field", "solution"))  # fmt: skip


def model_folder(name: str) -> str:
    """The folder of --model: the world's `tiny` (shipped in the repository), a converted GGUF, or the name."""
    if name == "tiny":
        from common.world.tiny import shipped_model

        return shipped_model()
    return resolve_model(name)
