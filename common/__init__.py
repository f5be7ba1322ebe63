"""Shared plumbing for the tinyrlvr scripts: loading, data, rewards, sampling, logging. No algorithm logic."""
