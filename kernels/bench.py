"""Benchmarks of the Triton kernels against their PyTorch references, on a GPU.

    python -m kernels.bench

Times are medians over many runs after warm-up, measured with CUDA events. Bandwidth is the bytes the
kernel must read once (the logits) divided by its time, compared with this device's measured copy
bandwidth. Peak extra memory is the allocator's peak above what was allocated before the call.
On a machine without a CUDA GPU it says so and exits 0.
"""

import statistics
import sys
from functools import partial

import torch

from kernels.topk_divergence import topk_divergence_reference, topk_divergence_triton


def median_ms(fn, warmup=3, reps=20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(size_bytes=2**31) -> float:
    """Device-to-device copy: reads and writes `size_bytes` each, so 2 x size moved."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    ms = median_ms(partial(torch.empty_like(src).copy_, src))
    return 2 * size_bytes / ms / 1e6


def peak_extra_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def topk_inputs(N, V, K, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(N, V, device="cuda", dtype=dtype, generator=g) * 2
    topk_ids = torch.randint(V, (N, K), device="cuda", generator=g)
    topk_logprobs = -torch.rand(N, K, device="cuda", generator=g) * 5 - 3
    sampled = topk_ids[:, -1].clone()
    return logits, topk_ids, topk_logprobs, sampled


def bench_topk_divergence(copy_gbs: float):
    V, K, T = 151936, 20, 0.7
    print(f"\nTop-K divergence (V = {V}, K = {K}, temperature {T}); bandwidth = logits bytes / time")
    print("| logits | N | kernel ms | reference ms | speed-up | kernel GB/s | % of copy bw | kernel extra MB "
          "| reference extra MB | extra memory ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for N in (4096, 16384):
            inputs = topk_inputs(N, V, K, dtype)
            kernel = partial(topk_divergence_triton, *inputs, temperature=T)
            reference = partial(topk_divergence_reference, *inputs, temperature=T)
            got, want = kernel(), reference()
            worst = max((got[k] - want[k].float()).abs().max().item() for k in ("tv", "kl", "log_z"))
            k_ms, r_ms = median_ms(kernel), median_ms(reference, warmup=1, reps=5)
            k_mb, r_mb = peak_extra_mb(kernel), peak_extra_mb(reference)
            gbs = inputs[0].numel() * inputs[0].element_size() / k_ms / 1e6
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {N} | {k_ms:.3f} | {r_ms:.3f} | {r_ms / k_ms:.1f}x | {gbs:.0f}"
                  f" | {100 * gbs / copy_gbs:.0f}% | {k_mb:.1f} | {r_mb:.1f} | {100 * k_mb / r_mb:.2f}% |"
                  f"{'' if worst < 1e-3 else f' (max abs difference {worst:.2e})'}")  # fmt: skip
            del inputs, kernel, reference, got, want  # free the logits before the next size


def main():
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the kernel benchmarks need one (pytest checks the kernels' correctness on a CPU "
              "under TRITON_INTERPRET=1)")  # fmt: skip
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    copy_gbs = copy_bandwidth_gbs()
    print(f"measured device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    bench_topk_divergence(copy_gbs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
