"""The built-in world: the `chain` task and the `tiny` model warmed up on it by a flawed teacher.

It exists so that every script runs by default offline, on a CPU, in minutes, under the conditions the
papers rely on (skills of different difficulty, a rare skill and a misconception, unfaithful chains that earn full
reward). A reader of the algorithms may skip this package: it plugs in from above, at one place only, the run's
start-up (`common/run.py`), which asks it for the `chain` task and the `tiny` model; nothing below imports it.
"""
