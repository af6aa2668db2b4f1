"""Per-sample static profile (calibrated on the held-out sample itself): does per-sample adaptivity explain the 3x gap?"""
import sys, json, time
import numpy as np, torch
from ertacache.cli.eval import parser, build_config
from ertacache.cli.validate import check_args
from ertacache.models.loading import load_bundle
from ertacache.models.recipes import load_recipe
from ertacache.sampling.settings import SampleSettings
from ertacache.eval.harness import EvalContext
from ertacache.eval.methods import erta_config, erta_candidate
from ertacache.metrics import psnr

seed0 = int(sys.argv[1]); out = sys.argv[2]
torch.set_num_threads(1)
args = check_args(parser().parse_args(["--model", "wan2.1-tiny", "--steps", "50", "--speedups", "2,3",
                                       "--methods", "erta-t2-closed-full", "--seeds", f"{seed0}-{seed0+15}", "--quiet"]))
recipe = load_recipe("wan2.1-tiny")
settings = SampleSettings.from_recipe(recipe, height=args.height, width=args.width, frames=args.frames, steps=args.steps,
                                      shift=args.shift, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt)
bundle = load_bundle("wan2.1-tiny", None, torch.device("cpu"), args.dtype)
config = build_config(args, bundle)
ctx = EvalContext(bundle, settings, config, progress=False, log=lambda s: None)
ref = ctx.reference
res = {}
for s in (2.0, 3.0):
    ps = []
    for j in range(len(ctx.held_out)):
        cal = ctx.calibration_for([ctx.held_out.prompts[j]], seed=ctx.held_out.seeds[j])
        cand = erta_candidate(ctx, cal, erta_config(ctx, "erta-t2-closed-full", s))
        run = ctx.run(cand.plan, ctx.held_out.subset(j + 1))
        ps.append(psnr(ref.frames[j], run.frames[j]))
        print(s, j, round(ps[-1], 2), ''.join('#' if m else '.' for m in cand.plan.mask), flush=True)
    res[s] = ps
json.dump(res, open(out, "w"))
