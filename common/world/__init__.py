"""The built-in world: the `chain` task and the `tiny` model warmed up on it by a flawed teacher.

It exists so that every script runs by default offline, on a CPU, in minutes, under the conditions the
papers rely on (skills of different difficulty, a rare skill and a misconception, unfaithful chains that earn full
reward). A reader of the algorithms may skip this package: the scripts reach it only through
`load_task("chain")`, `resolve_model("tiny")` and `score`.
"""
