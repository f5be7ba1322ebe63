"""Shared plumbing for the tinyrlvr scripts: loading, data, rewards, sampling, logging. No algorithm logic.

The built-in world (the `chain` task, the `tiny` model) is the subpackage `common/world/`.
"""
