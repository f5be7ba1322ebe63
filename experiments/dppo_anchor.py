"""DPPO's anchor under a training/inference mismatch: is the trust region better anchored at mu, the sampler's record
(the paper), or at pi_old, the trainer's own log-probs recomputed before the batch's first step, with the sampler
corrected by the truncated importance weight min(pi_old / mu, C)?

Arms: `none` (PG-IS), `ratio` (clip-higher 0.2 / 0.28), `binary-tv`, `topk-tv` (K = 20), each with `--anchor mu` and
`--anchor recomputed`; seeds 1-10; under two mismatches, each into its own folder of runs:
- noise (runs/dppo_anchor_noise): the sampler adds N(0, sigma^2) to every logit (`--sampler-noise SIGMA`);
- bits (runs/dppo_anchor_bits): the sampler's weights rounded to 3 bits (`--sampler-bits 3`).
The paper's advantage and loss (mean-centred advantages, the fixed-horizon token sum, clip-higher for `ratio`),
4 optimizer steps per rollout batch at lr 1e-4, 60 steps, a held-out evaluation every 10 steps. Anchored at mu,
C = infinity (the paper's stability setting: pi / mu is not capped); anchored at pi_old, C = 2 (the truncated
importance weight min(pi_old / mu, 2), as frameworks that recompute pi_old use it). So the pair compares the paper's
update with the decoupled one a practitioner would otherwise reach for; with `none` the two differ only by the
truncation, since pi / pi_old * pi_old / mu = pi / mu. To tell the anchor from the truncation, a control
(`--arms none,binary-tv --anchors mu+cap2`, 40 runs, added after the first seeds showed `none` differing between the
two anchors) keeps the mu anchor and truncates its weight, min(pi / mu, 2).

The collapse rule, fixed before any run: a run collapses when its held-out sampled accuracy falls below 0.35 at any
evaluation. The base model's is 0.550 on the 200 test prompts (0.51-0.60 over evaluation seeds); its sampling
spread is sqrt(0.55 * 0.45 / 200) = 0.035, so 0.35 is 5.7 spreads below: a policy that did not lose accuracy falls
under it with odds below 1e-8 per evaluation, and the collapsed runs of the 3-bit comparison in docs/dppo.md ended
at 0.04-0.11, far under it.

The pilot (`--pilot`) chooses sigma before the comparison, on seeds 101-103, which the comparison does not use:
`none` anchored at mu at sigma 1, 1.5, 1.75, 2 and 3, to find where it collapses in about half the runs. It
collapsed in 0, 0, 2, 3 and 3 of 3, so the comparison runs at sigma 1.75 (the default of `--sigma`).

    python -m experiments.dppo_anchor --pilot           # 15 runs: about 7 minutes on 2 CPU cores
    python -m experiments.dppo_anchor                   # 160 runs: about 74 minutes on 2 CPU cores, then the report
    python -m experiments.dppo_anchor --arms none,binary-tv --anchors mu+cap2   # the control: 40 runs, 19 minutes
    python -m experiments.dppo_anchor --arms none,binary-tv --anchors mu --mismatch none  # no mismatch: 20 runs, 10 min
    python -m experiments.dppo_anchor --report          # the report alone, from the finished runs

Runs go two at a time with one core each (experiments.helpers.run_all); a finished run is not run again. The report:
a markdown table, docs/dppo_anchor.png (held-out accuracy, mean |pi - mu|, mean |pi - pi_old| and the share of kept
updates that move pi towards mu, per step, for both anchors).
"""

import argparse
import os

import numpy as np

from experiments.helpers import ROOT, finished_runs, load, run_all, save, subplots

PAPER = ["--no-scale-rewards", "--aggregation", "seq-mean-token-sum-norm", "--eps-high", "0.28"]
TRUST_REGIONS = ("none", "ratio", "binary-tv", "topk-tv")
ANCHORS = {"mu": ["--anchor", "mu"],  # C = infinity, the paper's
           "recomputed": ["--anchor", "recomputed", "--is-cap", "2"],  # pi_old, the importance weight truncated at 2
           "mu+cap2": ["--anchor", "mu", "--is-cap", "2"]}  # the control: mu's weight pi / mu truncated at 2
LINE = {"mu": "-", "recomputed": "--", "mu+cap2": ":"}
TITLE = {"dppo_anchor_noise": "noisy sampler, sigma = {sigma:g}", "dppo_anchor_bits": "3-bit sampler"}
SETTINGS = ["--lr", "1e-4", "--eval-every", "10", "--log-every", "20"]  # 4 mini-batches: dppo.py's default
STEPS, SEEDS, PILOT_SEEDS, PILOT_SIGMAS = 60, range(1, 11), range(101, 104), (1.0, 1.5, 1.75, 2.0, 3.0)
COLLAPSE_BELOW = 0.35
MECHANISM = {"trust_region/abs_pi_mu": "mean |pi - mu|", "trust_region/abs_pi_old": "mean |pi - pi_old|",
             "trust_region/towards_mu_frac": "kept updates moving pi towards mu"}  # fmt: skip
COST = "time/update"  # seconds of one step's update (the extra forward pass of pi_old included)


def arms(trust_regions=TRUST_REGIONS, anchors=tuple(ANCHORS)) -> dict:
    """<trust region>-<anchor> -> its command."""
    return {f"{tr}-{anchor}": ["dppo.py", "--trust-region", tr, *ANCHORS[anchor], "--top-k", "20", *PAPER]
            for tr in trust_regions for anchor in anchors}  # fmt: skip


RUNS = os.path.join(ROOT, "runs")  # where the folders of runs go (--runs)


def mismatches(sigma: float) -> dict:
    """folder name -> the flags of its mismatch."""
    return {"dppo_anchor_noise": ["--sampler-noise", str(sigma)], "dppo_anchor_bits": ["--sampler-bits", "3"]}


CLEAN = "dppo_anchor_none"  # the reference without a mismatch (--mismatch none), drawn in black


def first_below(evals):
    """The first evaluation step whose held-out sampled accuracy is under the collapse line, or None."""
    return next((e["step"] for e in evals if e["eval/acc_sampled"] < COLLAPSE_BELOW), None)


def table(folder, names):
    rows = []
    for name in names:
        runs = [load(d) for d in finished_runs(folder, name)]
        if not runs:
            continue
        below = [first_below(evals) for _, evals in runs]
        finals = [evals[-1]["eval/acc_sampled"] for _, evals in runs]
        means = [np.mean([np.mean([r[k] for r in train if k in r]) for train, _ in runs]) for k in [*MECHANISM, COST]]
        tr, anchor = name.rsplit("-", 1)
        mismatch = os.path.basename(folder).removeprefix("dppo_anchor_").replace("none", "no mismatch")
        rows.append(f"| {tr} | {anchor} | {mismatch}"
                    f" | {sum(s is not None for s in below)} of {len(runs)} | {', '.join(str(s or '-') for s in below)}"
                    f" | {np.mean(finals):.3f} +- {np.std(finals):.3f} ({', '.join(f'{f:.2f}' for f in finals)})"
                    f" | {means[0]:.4f} | {means[1]:.4f} | {means[2]:.3f} | {means[3]:.3f} |")  # fmt: skip
    if rows:  # a folder not run yet prints nothing
        print("| trust region | anchor | mismatch | collapsed runs | first step below 0.35 (per seed) | final acc,"
              " sampled, mean +- sd (per seed) | mean abs(pi - mu) | mean abs(pi - pi_old) | kept updates towards mu"
              " | update s/step |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")  # fmt: skip


def curves(ax, folder, names, key, evals=False, clean=False):
    """Mean over seeds of a per-step (or, with `evals`, per-evaluation) metric, one line per arm: colour by trust
    region, line by anchor (LINE); band: one standard deviation. `clean`: the runs without a mismatch, in black and
    without a band (solid for binary-tv, dash-dot for none)."""
    for name in names:
        runs = [load(d)[1 if evals else 0] for d in finished_runs(folder, name)]
        if not runs:
            continue
        longest = max(runs, key=len)  # a run stopped early (non-finite gradients) is shorter: nan after its end
        values = np.full((len(runs), len(longest)), np.nan)
        for i, rows in enumerate(runs):
            values[i, : len(rows)] = [r.get(key, np.nan) for r in rows]
        mean, sd = np.nanmean(values, 0), np.nanstd(values, 0)
        steps = [r["step"] for r in longest]
        tr, anchor = name.rsplit("-", 1)
        if clean:
            ax.plot(steps, mean, color="black", ls="-." if tr == "none" else "-", lw=1, label=f"{name}, no mismatch")
            continue
        colour = f"C{TRUST_REGIONS.index(tr)}"
        ax.plot(steps, mean, color=colour, ls=LINE[anchor], lw=1.5, label=f"{tr}, {anchor}")
        ax.fill_between(steps, mean - sd, mean + sd, color=colour, alpha=0.07)
    ax.grid(alpha=0.3)


def cost(folders, names):
    """Seconds per step by anchor, over every run of both mismatches: the update, and the whole step."""
    for anchor in ANCHORS:
        runs = [load(d)[0] for f in folders for n in names if n.endswith(f"-{anchor}") for d in finished_runs(f, n)]
        steps = [r for train in runs for r in train]
        if steps:
            print(f"{anchor}: update {np.mean([r[COST] for r in steps]):.3f} s/step, whole step"
                  f" {np.mean([r[COST] + r['time/generate'] for r in steps]):.3f} s ({len(runs)} runs)")


def report(sigma: float, names):
    folders = [os.path.join(RUNS, f) for f in mismatches(sigma)]
    for folder in [*folders, os.path.join(RUNS, CLEAN)]:
        table(folder, names)
    cost(folders, names)
    made = [f for f in folders if any(finished_runs(f, n) for n in names)]
    if not made:
        print("no finished runs yet")
        return
    fig, axes = subplots(len(made), 4, figsize=(20, 4.5 * len(made)), squeeze=False)
    for row, folder in zip(axes, made):
        curves(row[0], folder, names, "eval/acc_sampled", evals=True)
        curves(row[0], os.path.join(RUNS, CLEAN), names, "eval/acc_sampled", evals=True, clean=True)
        row[0].axhline(COLLAPSE_BELOW, color="gray", ls=":", label="collapse line")
        title = TITLE[os.path.basename(folder)].format(sigma=sigma)
        row[0].set(ylabel="held-out accuracy, sampled", ylim=(0, 1.6), yticks=np.arange(0, 1.01, 0.2), title=title)
        for ax, (key, label) in zip(row[1:], MECHANISM.items()):
            curves(ax, folder, names, key)
            ax.set(ylabel=label, xlabel="training step")
        key = "mean over seeds, band: one sd;\ndashed: pi_old, C = 2; dotted: mu, C = 2"
        row[0].legend(title=key, title_fontsize=7, fontsize=7, ncol=2, loc="upper center")  # above the curves
    save(fig, "dppo_anchor.png")


def pilot(steps, seeds):
    """`none` anchored at mu under the noisy sampler at each sigma: how many runs collapse."""
    for sigma in PILOT_SIGMAS:
        folder = os.path.join(RUNS, f"dppo_anchor_pilot_sigma{sigma:g}")
        run_all(folder, arms(("none",), ("mu",)), seeds, steps, [*SETTINGS, "--sampler-noise", str(sigma)])
    print("| sigma | collapsed runs | first step below 0.35 | final acc, sampled |\n|---|---|---|---|")
    for sigma in PILOT_SIGMAS:
        runs = [load(d)[1] for d in finished_runs(os.path.join(RUNS, f"dppo_anchor_pilot_sigma{sigma:g}"),
                                                  "none-mu")]  # fmt: skip
        below = [first_below(e) for e in runs]
        print(f"| {sigma:g} | {sum(b is not None for b in below)} of {len(runs)} | {below}"
              f" | {[round(e[-1]['eval/acc_sampled'], 2) for e in runs]} |")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pilot", action="store_true", help="choose sigma on seeds 101-103 (no report)")
    parser.add_argument("--report", action="store_true", help="only the report, from the finished runs")
    parser.add_argument("--sigma", type=float, default=1.75, help="the noise scale of the noisy sampler")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per run (a toy size to try it)")
    parser.add_argument("--seeds", type=int, default=None, help="the first N seeds only (a toy size to try it)")
    parser.add_argument("--arms", default=",".join(TRUST_REGIONS), help="comma-separated trust regions")
    parser.add_argument("--anchors", default="mu,recomputed", help=f"comma-separated, of {', '.join(ANCHORS)}")
    parser.add_argument("--mismatch", choices=("noise", "bits", "both", "none"), default="both",
                        help="both: noise and bits; none: the reference without a mismatch")
    parser.add_argument("--runs", default=RUNS, help="the folder that holds the folders of runs")
    a = parser.parse_args()
    RUNS = a.runs
    if a.pilot:
        pilot(a.steps, PILOT_SEEDS if a.seeds is None else PILOT_SEEDS[: a.seeds])
        raise SystemExit
    chosen = arms(tuple(a.arms.split(",")), tuple(a.anchors.split(",")))
    if not a.report:
        for folder, flags in {**mismatches(a.sigma), CLEAN: []}.items():
            if a.mismatch == folder.removeprefix("dppo_anchor_") or (a.mismatch == "both" and folder != CLEAN):
                seeds = SEEDS if a.seeds is None else SEEDS[: a.seeds]
                run_all(os.path.join(RUNS, folder), chosen, seeds, a.steps, [*SETTINGS, *flags])
    report(a.sigma, tuple(arms()))  # every arm that has finished runs
