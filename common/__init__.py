"""Shared plumbing for the tinyrlvr scripts, in layers whose imports only run down: run (the run's life) on
sampling, data, model and verifier, on torchrun (fsdp only under --fsdp), on errors. The world plugs in at run."""
