"""Optional Triton kernels for the hot paths, each beside its PyTorch reference (added by later issues)."""
