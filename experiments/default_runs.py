"""The default run of every script, one after another: `python <script>.py` with no flags but the run folder.

    python -m experiments.default_runs [grpo pods ...]      # all five by default; about 14 minutes on 2 CPU cores

Writes runs/default/<script>/ (with console.txt, what the run printed, and wall_clock.txt), the plot
docs/<script>_default.png, and prints the table of start and end figures that the docs pages show.
"""

import os
import subprocess
import sys
import time

from experiments.helpers import ROOT, load, plot_run

SCRIPTS = ("grpo", "pods", "dppo", "cropi", "ippo")
OUT = os.path.join(ROOT, "runs", "default")


def run(script: str) -> float:
    """Run the script's default (a folder from an earlier run is reused) and return its wall clock."""
    folder = os.path.join(OUT, script)
    if os.path.exists(os.path.join(folder, "wall_clock.txt")):
        return float(open(os.path.join(folder, "wall_clock.txt")).read())
    start = time.perf_counter()
    result = subprocess.run([sys.executable, f"{script}.py", "--output-dir", OUT, "--run-name", script], cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{script}.py failed:\n{result.stderr[-3000:]}")
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() + result.stdout.splitlines()
             if line.strip() and line.startswith(("run folder", "step", "stage", "offline", "stopping", "done",
                                                   "    "))]  # fmt: skip
    open(os.path.join(folder, "console.txt"), "w").write("\n".join(lines) + "\n")
    open(os.path.join(folder, "wall_clock.txt"), "w").write(f"{seconds:.1f}")
    return seconds


def main(scripts):
    print("| script | wall clock | sampled acc | greedy acc | unfaithful among correct (sampled) | per skill, sampled |"
          )  # fmt: skip
    print("|---|---|---|---|---|---|")
    for script in scripts:
        seconds = run(script)
        _, evals = load(os.path.join(OUT, script))
        plot_run(os.path.join(OUT, script), os.path.join(ROOT, "docs", f"{script}_default.png"), f"python {script}.py")
        first, last = evals[0], evals[-1]
        skills = sorted(k.split("/")[-1] for k in first if k.startswith("eval/acc_sampled/"))
        per_skill = ", ".join(f"{s} {first[f'eval/acc_sampled/{s}']:.2f}->{last[f'eval/acc_sampled/{s}']:.2f}"
                              for s in skills)  # fmt: skip
        spans = [f"{first[k]:.3f} -> {last[k]:.3f}" for k in ("eval/acc_sampled", "eval/acc_greedy",
                                                                   "eval/unfaithful_sampled")]  # fmt: skip
        print(f"| `{script}.py` | {seconds:.0f} s | {' | '.join(spans)} | {per_skill} |")


if __name__ == "__main__":
    main(sys.argv[1:] or SCRIPTS)
