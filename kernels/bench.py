"""Benchmarks of the Triton kernels against their PyTorch references, on a GPU.

    python -m kernels.bench [--full-reference]

Times are medians over several runs after warm-up, measured with CUDA events. Bandwidth is the bytes the
kernel must read once (the logits; the gradient vectors) divided by its time, compared with this device's
measured copy bandwidth. Peak extra memory is the allocator's peak above what was allocated before the call.
The projection reference takes about a minute per call at full size, so by default it is timed once on
the first tenth of the coordinates and scaled by 10 (its block loop is linear in n); --full-reference
times it on all of them. On a machine without a CUDA GPU it says so and exits 0.
"""

import argparse
import statistics
import sys
from functools import partial

import torch

from kernels.projection import MODES, projection_reference, projection_triton
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


def timed_once(fn):
    """(milliseconds, result) of one call, for the slow reference."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), result


def bench_projection(copy_gbs: float, full_reference: bool):
    """The benchmark case: B = 8 fp32 vectors of n = 1e8 coordinates, k = 8192. At p = 1 all 1e8 are kept
    (the 1e8 kept coordinates of the target); p = 0.1 keeps 1e7 of the same input, and costs the kernel
    nearly as much (it masks dropped coordinates but still hashes R for all n), the reference 10x less."""
    B, n, k = 8, 10**8, 8192
    n_ref = n if full_reference else n // 10
    x = torch.randn(B, n, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    scaled = "" if n_ref == n else " and scaled to n"
    print(f"\nSparse random projection (B = {B}, n = {n:.0e} fp32 coordinates, k = {k}); bandwidth = input bytes"
          f" / time; multiply-adds = B p n k / time (dense modes); reference timed on {n_ref:.0e} coordinates"
          f"{scaled}; difference = max |kernel - reference| / max |reference|")  # fmt: skip
    print("| mode | p | kernel ms | reference ms | speed-up | kernel GB/s | % of copy bw | T multiply-adds/s "
          "| difference |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    projection_reference(x[:, :4096], 0, k)  # warm-up: cuBLAS and allocator set-up are not the reference's cost
    for mode in MODES:
        for p in (1.0, 0.1):
            k_ms = median_ms(partial(projection_triton, x, 0, k, p, 0, mode), warmup=2, reps=5)
            r_ms, want = timed_once(partial(projection_reference, x[:, :n_ref], 0, k, p, 0, mode))
            r_ms *= n / n_ref
            got = projection_triton(x[:, :n_ref], 0, k, p, 0, mode)
            difference = ((got - want).abs().max() / want.abs().max()).item()
            gbs = x.numel() * x.element_size() / k_ms / 1e6
            macs = "-" if mode == "sjlt" else f"{B * p * n * k / k_ms / 1e9:.1f}"
            print(f"| {mode} | {p} | {k_ms:.1f} | {r_ms:.0f} | {r_ms / k_ms:.1f}x | {gbs:.0f}"
                  f" | {100 * gbs / copy_gbs:.0f}% | {macs} | {difference:.1e} |")  # fmt: skip
            del got, want


def main():
    parser = argparse.ArgumentParser(description="Triton kernels against their PyTorch references, on a GPU.")
    parser.add_argument("--full-reference", action="store_true", help="time the projection reference on all 1e8 "
                        "coordinates (minutes) instead of a tenth scaled by 10")  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the kernel benchmarks need one (pytest checks the kernels' correctness on a CPU "
              "under TRITON_INTERPRET=1)")  # fmt: skip
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    copy_gbs = copy_bandwidth_gbs()
    print(f"measured device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    bench_topk_divergence(copy_gbs)
    bench_projection(copy_gbs, args.full_reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
