"""ertacache-eval: ERTACache against caching baselines at equal full-step budgets.

Calibrates every method on the calibration prompts, samples a separate held-out
set (other prompts where the model's prompt space allows, always other seeds)
and scores each (method, speedup) against the uncached sample of the same seed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from ertacache.cli.common import add_model_args, add_shape_args, apply_threads, new_parser, pick_device, run_cli
from ertacache.cli.validate import check_args, loading_model
from ertacache.errors import UserError

DEFAULT_HELD_OUT = 16
#: as ertacache.eval.config.ALL_METHODS / METHOD_GROUPS and ertacache.eval.studies.STUDIES (tests/cli checks
#: they agree), spelled here because importing those loads torch, and --help should answer at once
_STAGES = ("policy", "time", "full")
_ERTA = tuple(f"erta-{loop}-{stage}" for loop in ("open", "closed") for stage in _STAGES)
_PREDICTORS = tuple(f"erta-{code}-{loop}-{stage}" for code in ("t1", "t2", "t3", "a2", "f1", "f2") for loop in ("open", "closed")
                    for stage in _STAGES)
ALL_METHODS = ("fewer-steps", "uniform", "teacache", *_ERTA, *_PREDICTORS, "diffusers-taylorseer-o1",
               "diffusers-taylorseer-o2", "diffusers-taylorseer-lite", "diffusers-fbcache", "diffusers-magcache",
               "cachedit-dbcache", "cachedit-dbcache-taylorseer")
METHOD_GROUPS = ("all", "builtin", "baselines", "erta", "predictors", "peers")
_METHODS_HELP = ("fewer-steps, uniform, teacache; ERTACache erta-{open,closed}-{policy,time,full} (the paper's reuse) "
                 "and erta-{t1,t2,t3,a2,f1,f2}-{open,closed}-{policy,time,full} (Taylor order 1/2/3, adaptive order <= 2 "
                 "or fitted K=2/3 "
                 "predictor); the real peers diffusers-taylorseer-{o1,o2,lite}, diffusers-fbcache, diffusers-magcache, "
                 "cachedit-dbcache, cachedit-dbcache-taylorseer")
STUDIES = ("cal-size", "lambda", "transfer", "batch")


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{what} must be a comma list of numbers, e.g. 1.5,2,2.5,3; got {text!r}") from None


def parse_ints(text: str, what: str) -> list[int]:
    """'1000-1015' (inclusive range) and/or comma lists of non-negative ints: '1000,1003,1010-1012'."""
    out: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise UserError(f"{what} must be integers or ranges like 1000-1015, got {text!r}") from None
    if not out:
        raise UserError(f"{what} is empty")
    return out


def parser() -> argparse.ArgumentParser:
    p = new_parser(prog="ertacache-eval", description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--steps", type=int, default=None, help="denoising steps of every method's reference (default: recipe)")
    p.add_argument("--speedups", default="1.5,2,2.5,3",
                   help="target speedups; each sets the full-step budget round(T / speedup) (default: 1.5,2,2.5,3)")
    p.add_argument("--methods", default="all",
                   help=f"comma list of {_METHODS_HELP}, or groups {', '.join(METHOD_GROUPS)} (default: all)")
    p.add_argument("--seeds", default=None,
                   help=f"held-out seeds, e.g. 1000-1015 (default: {DEFAULT_HELD_OUT} seeds from 1000, or one per prompt)")
    p.add_argument("--prompts", default=None,
                   help="held-out prompts, one per line, cycled to the seed count (default for the testbed: "
                        "testbed prompts not in the calibration set)")
    p.add_argument("--calibration-prompts", default=None, help="calibration prompts file (default: the recipe's)")
    p.add_argument("--calibration-seed", type=int, default=0, help="calibration prompt k uses this seed + k")
    add_shape_args(p)
    p.add_argument("--batch-size", type=int, default=16, help="held-out samples per model call")
    p.add_argument("--warmup-steps", type=int, default=1,
                   help="leading full steps of every ERTACache method (before K full steps a predictor "
                        "extrapolates from the residuals there are)")
    p.add_argument("--predictor-curvature", type=float, default=None,
                   help="scale on the extrapolation's terms of order >= 2 of every predictor method (1 = the exact "
                        "polynomial, 0 = the line through the newest two full steps); docs/predictor.md (default: the "
                        "model recipe's)")
    p.add_argument("--phi-rule", choices=["auto", "paper", "lsq"], default="auto",
                   help="ERTACache's step scale phi: the paper's ratio or the least-squares scale; auto = the "
                        "paper's for the reuse methods (erta-{loop}-{stage}), lsq for the predictor ones")
    p.add_argument("--schedule-weight", choices=["auto", "none", "dt", "dt-late"], default="auto",
                   help="ERTACache's mask rule: each step's calibration error as it is (none), times the step's "
                        "length over the mean (dt), or only where that is above 1 (dt-late); auto = none for the "
                        "reuse methods (erta-{loop}-{stage}), dt-late for the predictor ones; docs/predictor.md")
    p.add_argument("--studies", default="",
                   help=f"comma list of {', '.join(STUDIES)} (default: none)")
    p.add_argument("--study-method", default="erta-t2-closed-full",
                   help="ERTACache variant the studies and --wallclock use (default: the product's)")
    p.add_argument("--study-speedup", type=float, default=2.0, help="speedup the studies use")
    p.add_argument("--cal-sizes", default="1,4,16,64", help="calibration-set sizes of the cal-size study")
    p.add_argument("--wallclock", action="store_true",
                   help="also time cached vs uncached end to end at each speedup (study method, batch 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per wall-clock entry")
    p.add_argument("--json", default=None, help="write the result rows (and studies, timings) to this JSON file")
    p.add_argument("--out", default=None, help="folder for the plots and the GIF strip")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def held_out_set(args, bundle, calibration: list[str]) -> tuple[list[str], list[int]]:
    """Held-out prompts and seeds: --prompts cycled to --seeds, or testbed prompts unseen in calibration."""
    from ertacache.eval.fidelity import prompt_judge
    from ertacache.profile.build import read_prompts_file

    seeds = parse_ints(args.seeds, "--seeds") if args.seeds else None
    judge = prompt_judge(calibration)
    if args.prompts:
        prompts = read_prompts_file(args.prompts)
        seeds = seeds or list(range(1000, 1000 + len(prompts)))
    elif judge is not None:
        seeds = seeds or list(range(1000, 1000 + DEFAULT_HELD_OUT))
        pool = list(dict.fromkeys(judge.held_out_prompts(40)))  # 40 testbed prompts in held-out order
        prompts = [q for q in pool if q not in set(calibration)] or pool
    else:
        raise UserError(f"no default held-out prompts for {bundle.model_id}: pass --prompts FILE")
    return (prompts * (len(seeds) // len(prompts) + 1))[: len(seeds)], seeds


def build_config(args, bundle):
    from ertacache.eval.config import EvalConfig, parse_methods
    from ertacache.profile.build import read_prompts_file

    calibration = (read_prompts_file(args.calibration_prompts) if args.calibration_prompts
                   else list(bundle.recipe.calibration_prompts))
    prompts, seeds = held_out_set(args, bundle, calibration)
    return EvalConfig(
        speedups=parse_floats(args.speedups, "--speedups"),
        methods=parse_methods(args.methods),
        calibration_prompts=calibration,
        held_out_prompts=prompts,
        held_out_seeds=seeds,
        calibration_seed=args.calibration_seed,
        batch_size=args.batch_size,
        calibration_batch_size=bundle.recipe.defaults.calibration_batch_size,
        warmup_steps=args.warmup_steps,
        curvature=(bundle.recipe.defaults.predictor_curvature if args.predictor_curvature is None
                   else args.predictor_curvature),
        phi_rule=args.phi_rule,
        schedule_weight=args.schedule_weight,
    )


def _check_study_args(args) -> list[str]:
    from ertacache.eval.config import ERTA_METHODS, PREDICTOR_METHODS
    from ertacache.eval.studies import STUDIES

    names = [s.strip() for s in args.studies.split(",") if s.strip()]
    unknown = [s for s in names if s not in STUDIES]
    if unknown:
        raise UserError(f"unknown studies {unknown}; choose from {', '.join(STUDIES)}")
    if (names or args.wallclock) and args.study_method not in ERTA_METHODS + PREDICTOR_METHODS:
        raise UserError(f"--study-method must be an ERTACache variant (erta-{{open,closed}}-{{policy,time,full}} or "
                        f"erta-{{t1,t2,t3,a2,f1,f2}}-{{open,closed}}-{{policy,time,full}}), got {args.study_method!r}")
    if args.repeats < 1:
        raise UserError("--repeats must be >= 1")
    return names


def _main(argv: list[str] | None) -> int:
    args = check_args(parser().parse_args(argv))
    apply_threads(args.threads)
    from ertacache.eval.config import full_step_budget
    from ertacache.models.loading import load_bundle
    from ertacache.sampling.settings import SampleSettings

    studies = _check_study_args(args)
    start = time.perf_counter()
    from ertacache.models.recipes import load_recipe, refuse_two_experts

    recipe = load_recipe(args.model)
    refuse_two_experts(recipe, "ertacache-eval")
    settings = SampleSettings.from_recipe(  # refuses flags the model cannot take before it loads
        recipe, height=args.height, width=args.width, frames=args.frames, steps=args.steps,
        shift=args.shift, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
    )
    with loading_model(args.model, args.model_path):
        bundle = load_bundle(args.model, args.model_path, pick_device(args.device), args.dtype)
    config = build_config(args, bundle)
    for s in config.speedups:
        budget = full_step_budget(settings.steps, s)  # refuse an impossible speedup before any compute
        if "fewer-steps" in config.methods:
            try:  # a schedule that takes only some step counts (CogVideoX's DDIM) cannot run every fewer-steps row
                bundle.family.sigma_schedule.check_steps(budget)
            except UserError as e:
                raise UserError(f"the fewer-steps row at {s:g}x samples {budget} steps, which {args.model} cannot: "
                                f"{e}. Choose other --speedups or drop fewer-steps from --methods") from None
    command = " ".join(["ertacache-eval"] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    return _evaluate(args, bundle, settings, config, studies, start, command)


def _evaluate(args, bundle, settings, config, studies, start, command: str) -> int:
    """Main table first, then studies and wall clock; the JSON is rewritten after each, so a late failure
    keeps what was measured."""
    from ertacache.eval import report
    from ertacache.eval.harness import EvalContext, run_eval
    from ertacache.eval.studies import run_studies
    from ertacache.eval.timing import machine_info

    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    print(f"evaluating {bundle.model_id} ({bundle.fingerprint}): {len(config.methods)} methods x "
          f"{len(config.speedups)} speedups, {settings.steps} steps, {len(config.calibration_prompts)} calibration / "
          f"{len(config.held_out_prompts)} held-out samples")
    ctx = EvalContext(bundle, settings, config, progress=not args.quiet, log=log)
    result = run_eval(ctx)
    print(report.summary_table(result.rows))
    if args.out:
        for path in report.write_figures(result, config.speedups, args.out):
            log(f"wrote {path}")
    extra: dict = {"studies": {}, "wallclock": None}

    def save() -> None:
        if args.json:
            doc = report.document(ctx, result, extra["studies"], extra["wallclock"], command,
                                  machine_info(bundle.device), time.perf_counter() - start)
            report.write_json(doc, args.json)

    save()
    if studies:
        extra["studies"] = run_studies(ctx, studies, args.study_method, args.study_speedup,
                                       parse_ints(args.cal_sizes, "--cal-sizes"))
        save()
    if args.wallclock:
        extra["wallclock"] = _wallclock(ctx, args, log)
        save()
    if args.json:
        print(f"results written to {args.json}")
    return 0


def _wallclock(ctx, args, log) -> dict:
    from ertacache.eval.methods import build_candidate
    from ertacache.eval.timing import wallclock_table

    log("wall clock")
    plans = {s: build_candidate(ctx, args.study_method, s).plan for s in ctx.config.speedups}
    table = {"method": args.study_method, **wallclock_table(ctx, plans, args.repeats)}
    for r in table["rows"]:
        print(f"wall clock {r['speedup_target']:g}x: measured {r['speedup_measured']:.3f}, ideal "
              f"{r['speedup_ideal']:.3f} (c = {table['c']:.3f}), ratio {r['measured_over_ideal']:.3f}")
    return table


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
