#!/usr/bin/env bash
# Update cost follows m, not n: time/update at n=32, m=8 against n=m=32 (mean over 10 steps, same seed).
set -euo pipefail
rm -rf runs/cost_m8 runs/cost_m32  # a run folder that exists is refused
python pods.py --n 32 --m 8 --steps 10 --eval-prompts 20 --run-name cost_m8 > /dev/null
python pods.py --n 32 --m 32 --steps 10 --eval-prompts 20 --run-name cost_m32 > /dev/null
python - <<'PY'
import json
t = {}
for name in ("cost_m8", "cost_m32"):
    rows = [json.loads(l) for l in open(f"runs/{name}/metrics.jsonl") if "time/update" in l]
    t[name] = sum(r["time/update"] for r in rows) / len(rows)
    gen = sum(r["time/generate"] for r in rows) / len(rows)
    print(f"{name}: update {t[name]:.3f}s/step, generation {gen:.3f}s/step")
print(f"update time ratio n=m=32 / (n=32, m=8): {t['cost_m32'] / t['cost_m8']:.2f}x")
PY
