"""The task of the SmolLM2 learning run (docs/real-models.md): one addition or subtraction of numbers up to 20,
'What is 14+7?', posed with the instruction every chat prompt of `chain` gets. Writes a .jsonl for --task.

    python -m experiments.sums_task runs/sums.jsonl

Every sum a+b and difference a-b >= 0 with 1 <= a, b <= 20 occurs once: 610 questions, so the 10% test split
(61 prompts) holds questions the policy never trains on.
"""

import json
import os
import sys

from common.world.chain import CHAIN_INSTRUCTION


def examples(top: int = 20) -> list[dict]:
    rows = []
    for a in range(1, top + 1):
        for b in range(1, top + 1):
            for op, value in (("+", a + b), ("-", a - b)):
                if value >= 0:
                    question = f"What is {a}{op}{b}?"
                    rows.append({"question": question + CHAIN_INSTRUCTION, "answer": str(value),
                                 "solution": f"{a}{op}{b}={value} #### {value}", "skill": op})  # fmt: skip
    return rows


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "sums.jsonl")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in examples())
    print(f"wrote {path} ({len(examples())} questions)")
