"""Per-rank bytes of a policy's weights, gradients and AdamW state without sharding (1 process) and under --fsdp at
2 and 4 ranks (gloo, CPU), against the formula: 16 bytes per parameter in fp32 AdamW (weights 4, gradient 4, two
moments 8), divided by the ranks when sharded. The model is a random 57M-parameter Qwen2 built here (no download).

    python -m experiments.fsdp_memory              # launches 1, 2 and 4 processes and prints the table
    python -m experiments.fsdp_memory --ranks 1 2  # fewer
"""

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor
from transformers import Qwen2Config, Qwen2ForCausalLM

from common.torchrun import all_reduce, setup_distributed, shard
from experiments.helpers import ROOT

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
MB = 2**20


def local_bytes(tensors) -> int:
    """Bytes this rank holds of the tensors (its shard of a sharded one)."""
    parts = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in parts)


def measure():
    """One rank: build, shard, one AdamW step; print this rank's largest figures as JSON (rank 0)."""
    rank, world, _ = setup_distributed("cpu")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG))
    count = sum(p.numel() for p in model.parameters())
    shard(model, SimpleNamespace(fsdp=True, dtype="float32"))  # in one process: the model as it is
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(CONFIG["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = local_bytes(p.grad for p in model.parameters())
    optimizer.step()
    params = local_bytes(model.parameters())
    states = local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    figures = all_reduce(dict(params=params, grads=grads, states=states), "max")
    if rank == 0:
        print(json.dumps({"ranks": world, "count": count, **figures}))


def main(ranks):
    rows = []
    for world in ranks:
        launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--nproc_per_node", str(world)]  # fmt: skip
        start = time.perf_counter()
        out = subprocess.run([*launcher, "-m", "experiments.fsdp_memory", "--worker"], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        if out.returncode:
            sys.exit(f"error: {world} rank(s) failed:\n{out.stderr[-2000:]}")
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - start})
    count, one = rows[0]["count"], rows[0]
    print(f"random Qwen2, {count / 1e6:.1f}M parameters, fp32, AdamW; per-rank MiB (the largest rank)\n")
    print("| ranks | weights | gradients | AdamW state | total | 16 B x params / ranks | AdamW state vs 1 rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        total = r["params"] + r["grads"] + r["states"]
        print(f"| {r['ranks']}{' (--fsdp)' if r['ranks'] > 1 else ''} | {r['params'] / MB:.1f} | {r['grads'] / MB:.1f}"
              f" | {r['states'] / MB:.1f} | {total / MB:.1f} | {16 * count / r['ranks'] / MB:.1f}"
              f" | {r['states'] / one['states']:.3f} |")  # fmt: skip
    print("\nseconds per launch: " + ", ".join(f"{r['ranks']} rank(s) {r['seconds']:.0f}" for r in rows))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        measure()
    else:
        main([int(a) for a in sys.argv[sys.argv.index("--ranks") + 1 :]] if "--ranks" in sys.argv else [1, 2, 4])
