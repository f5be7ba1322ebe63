"""Optional Triton kernels for the hot paths, each beside its PyTorch reference."""

import importlib.util
import os


def triton_usable(device) -> bool:
    """The kernels run on CUDA, or anywhere under TRITON_INTERPRET=1 (how CI tests them on a CPU)."""
    has_triton = importlib.util.find_spec("triton") is not None
    return has_triton and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
