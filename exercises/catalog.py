"""Every exercise: which script and function, what to read, how long it takes, how it is checked, and the short
training run that ends a passed check. Core exercises re-write a function of a script; open ones add a function
the repository does not have, with a flag that turns it on."""

import ast
import os
from collections.abc import Callable
from dataclasses import dataclass

from exercises import cases, properties, training
from exercises.copies import not_done

SOLUTIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "solutions")


@dataclass(frozen=True)
class Exercise:
    id: str
    script: str  # grpo, pods, dppo, cropi or ippo: the copy is work/<script>.py
    function: str  # the function the student writes
    what: str  # one line, for `list`
    page: str  # what to read first
    minutes: int  # the expected time
    train: tuple  # the flags of the short training run
    report: Callable  # metrics rows -> the one line that shows the idea at work
    cases: Callable | None = None  # core: () -> the cases, compared with the project's function
    compare: Callable | None = None  # core: how outputs are compared, when not value by value
    properties: Callable | None = None  # open: fn -> None, or raises Mismatch
    solution_file: str = ""  # open: the teacher's solution, in exercises/solutions/
    flag: str = ""  # open: the Args field (with its docstring) that turns it on
    hooks: tuple = ()  # open: (a line of the script, the lines that replace it)
    before: str = "policy_update"  # open: the function is put before this one

    @property
    def open(self) -> bool:
        return self.properties is not None

    def solution_source(self) -> str:
        with open(os.path.join(SOLUTIONS, self.solution_file), encoding="utf-8") as f:
            text = f.read()
        node = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == self.function)
        return ast.get_source_segment(text, node)

    def stub_source(self, copy_path: str) -> str:
        """The signature and docstring of the solution, and the stop that names the exercise."""
        text = self.solution_source()
        docstring = ast.parse(text).body[0].body[0]
        head = text.splitlines()[: docstring.end_lineno]
        return "\n".join(head + not_done(self, copy_path, "    "))


SMALL = training.SMALL
CROPI_SMALL = ("--steps", "8", "--steps-per-stage", "8", "--pool-responses", "2", "--val-responses", "8",
               "--val-prompts", "20", "--eval-every", "8", "--eval-prompts", "100",
               "--target-samples", "2")  # fmt: skip
IPPO_SMALL = ("--steps", "10", "--eval-every", "10", "--eval-prompts", "100", "--val-prompts", "32")

ADVANTAGES = "advantages = group_advantages(scored.shaped, args.scale_rewards).flatten().to(device)"

EXERCISES = [
    # ---- grpo.py -------------------------------------------------------------------------------------------
    Exercise("grpo-advantages", "grpo", "group_advantages", "each completion's advantage within its group",
             "docs/grpo.md, The idea", 20, SMALL, training.accuracy, cases.group_advantages),
    Exercise("grpo-clip", "grpo", "clipped_surrogate", "PPO's clipped surrogate per token, and where the clip binds",
             "docs/grpo.md, The idea", 30, (*SMALL, "--minibatches", "4"), training.clip_fraction,
             cases.clipped_surrogate),
    Exercise("grpo-aggregate", "grpo", "aggregate", "token losses -> one loss: GRPO's, DAPO's and Dr. GRPO's modes",
             "docs/grpo.md, Implementation details", 30, (*SMALL, "--aggregation", "token-mean"), training.accuracy,
             cases.aggregate),
    Exercise("grpo-kl", "grpo", "kl_k3", "the k3 estimator of KL(pi || pi_ref) per token",
             "docs/grpo.md, The idea", 15, (*SMALL, "--beta", "0.1"), training.kl_to_reference, cases.kl_k3),
    # ---- pods.py -------------------------------------------------------------------------------------------
    Exercise("pods-max-variance", "pods", "select_max_variance", "keep the m of n rollouts whose rewards vary most",
             "docs/pods.md, The idea", 40, SMALL, training.kept_groups, cases.select_max_variance,
             compare=cases.same_variance),
    # ---- dppo.py -------------------------------------------------------------------------------------------
    Exercise("dppo-binary-kl", "dppo", "binary_kl", "KL(mu || pi) over {sampled token, everything else}",
             "docs/dppo.md, The idea", 25, (*SMALL, "--minibatches", "4", "--trust-region", "binary-kl"),
             training.masked_fraction, cases.binary_kl),
    Exercise("dppo-mask", "dppo", "trust_region_mask", "mask a token's update once pi has drifted past the threshold",
             "docs/dppo.md, The idea", 25, (*SMALL, "--minibatches", "4"), training.masked_fraction,
             cases.trust_region_mask),
    Exercise("dppo-loss", "dppo", "dppo_token_loss", "the masked, importance-weighted policy-gradient loss",
             "docs/dppo.md, Implementation details", 25, SMALL, training.accuracy, cases.dppo_token_loss),
    # ---- cropi.py ------------------------------------------------------------------------------------------
    Exercise("cropi-popi", "cropi", "popi_objective", "POPI: the off-policy objective whose gradient scores a prompt",
             "docs/cropi.md, The idea", 35, CROPI_SMALL, training.target_share, cases.popi_objective),
    Exercise("cropi-fusion", "cropi", "reciprocal_rank_fusion", "fuse the rankings of several validation sets",
             "docs/cropi.md, Implementation details", 30, CROPI_SMALL, training.target_share,
             cases.reciprocal_rank_fusion),
    # ---- ippo.py -------------------------------------------------------------------------------------------
    Exercise("ippo-gae", "ippo", "gae", "generalised advantage estimation, backwards in time",
             "docs/ippo.md, The idea, step by step", 35, (*IPPO_SMALL, "--no-influence"), training.accuracy,
             cases.gae),
    Exercise("ippo-influence-weights", "ippo", "influence_weights", "drop anti-aligned episodes, reweight the rest",
             "docs/ippo.md, The idea, step by step", 20, IPPO_SMALL, training.influence_kept,
             cases.influence_weights),
    # ---- open: beyond the repository -----------------------------------------------------------------------
    Exercise("open-gspo", "grpo", "sequence_clipped_surrogate", "GSPO: one clipped ratio per sequence",
             "docs/course.md, Lesson 7", 45, (*SMALL, "--minibatches", "4", "--ratio-level", "sequence"),
             training.clip_fraction, properties=properties.check_gspo, solution_file="gspo.py",
             flag='ratio_level: Literal["token", "sequence"] = "token"\n'
                  '"""open exercise open-gspo: `sequence` clips one ratio per sequence (GSPO)"""',
             hooks=(("per_token, clipped = clipped_surrogate(logprobs, micro.sampler_logprobs, A, args.eps_low, "
                     "args.eps_high)",
                     'if args.ratio_level == "sequence":  # open exercise open-gspo\n'
                     "    per_token, clipped = sequence_clipped_surrogate(logprobs, micro.sampler_logprobs, A, valid,\n"
                     "                                                    args.eps_low, args.eps_high)\n"
                     "else:\n"
                     "    per_token, clipped = clipped_surrogate(logprobs, micro.sampler_logprobs, A, args.eps_low,"
                     " args.eps_high)"),)),  # fmt: skip
    Exercise("open-kl-k2", "grpo", "kl_k2", "the k2 estimator of the KL penalty", "docs/course.md, Lesson 2", 20,
             (*SMALL, "--beta", "0.1", "--kl-estimator", "k2"), training.kl_to_reference,
             properties=properties.check_k2, solution_file="kl_k2.py",
             flag='kl_estimator: Literal["k3", "k2"] = "k3"\n'
                  '"""open exercise open-kl-k2: the estimator of the KL penalty (--beta)"""',
             hooks=(("kl = kl_k3(logprobs, ref_logprobs)",
                     'kl = kl_k2(logprobs, ref_logprobs) if args.kl_estimator == "k2" else kl_k3(logprobs,'
                     " ref_logprobs)"),)),  # fmt: skip
    Exercise("open-rloo", "grpo", "leave_one_out_advantages", "RLOO: a leave-one-out baseline for the advantage",
             "docs/course.md, Lesson 1", 20, (*SMALL, "--advantage", "rloo"), training.accuracy,
             properties=properties.check_rloo, solution_file="rloo.py",
             flag='advantage: Literal["group", "rloo"] = "group"\n'
                  '"""open exercise open-rloo: `rloo` uses the leave-one-out baseline"""',
             hooks=((ADVANTAGES, 'if args.advantage == "rloo":  # open exercise open-rloo\n'
                                 "    advantages = leave_one_out_advantages(scored.shaped).flatten().to(device)\n"
                                 "else:\n"
                                 f"    {ADVANTAGES}"),)),  # fmt: skip
    Exercise("open-dynamic-sampling", "grpo", "groups_with_signal", "DAPO: leave out groups whose rewards are equal",
             "docs/course.md, Lesson 3", 30, (*SMALL, "--dynamic-sampling"), training.signal_groups,
             properties=properties.check_dynamic_sampling, solution_file="dynamic_sampling.py",
             flag='dynamic_sampling: bool = False\n'
                  '"""open exercise open-dynamic-sampling: train only on the groups whose rewards differ (DAPO)"""',
             hooks=(('with run.timer("update"):',
                     "trained, trained_advantages = rollout, advantages\n"
                     "if args.dynamic_sampling:  # open exercise open-dynamic-sampling\n"
                     "    keep = groups_with_signal(scored.shaped)\n"
                     "    if keep.any():  # with none kept, all train: their advantages are 0, only a KL term moves\n"
                     "        rows = keep.repeat_interleave(n).nonzero().squeeze(-1).to(device)\n"
                     "        trained, trained_advantages = rollout.select(rows), advantages[rows]\n"
                     'with run.timer("update"):'),
                    ("stats = policy_update(model, ref_model, optimizer, rollout, advantages, args,",
                     "stats = policy_update(model, ref_model, optimizer, trained, trained_advantages, args,"))),
]

BY_ID = {e.id: e for e in EXERCISES}
