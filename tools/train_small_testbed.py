#!/usr/bin/env python
"""Train the ``wan2.1-small`` testbed on CPU (about 100 minutes on 2 cores), resumably.

A diffusers ``WanTransformer3DModel`` (8 blocks, width 256, 512 tokens per sample) learns
flow matching (v = noise - x0) on coloured-shape scenes over panning photo backgrounds
(``ertacache.testbed.scene_data``), with the tiny testbed's word-level text encoder
(trained alongside) and its parameter-free space-to-depth "VAE" on RGB. The flow-matching
helpers are the tiny trainer's (``tools/train_testbed.py``); what is new here is what a
run of hours needs: a checkpoint every ``--checkpoint-every`` steps, ``--resume`` from it
(also to *extend* a finished run: the learning rate is constant after warm-up, so more
steps need no schedule surgery), a log of every invocation's command, times and losses,
and an evaluation of each attribute judge on held-out prompts and seeds.

    python tools/train_small_testbed.py --minutes 100            # then evaluates, writes the asset folder
    python tools/train_small_testbed.py --resume --steps 3000    # continue (or extend) the same run
    python tools/train_small_testbed.py --out /tmp/s --work /tmp/w --steps 20 --eval-samples 2 --eval-steps 4

The asset folder (``--out``, default ``ertacache/assets/wan2.1-small``) is written only at
the end, atomically, with ``transformer/``, ``text_encoder/``, ``vae/`` and ``testbed.json``,
so ``ertacache.testbed.load_testbed(folder)`` loads it with ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_testbed import ema_update, folder_megabytes, shifted_sigmas  # noqa: E402

from ertacache.errors import UserError  # noqa: E402
from ertacache.testbed import scene_data as sd  # noqa: E402
from ertacache.testbed import scene_judge  # noqa: E402
from ertacache.testbed.model import Testbed, TransformerSpec, sample_latents  # noqa: E402
from ertacache.testbed.residuals import plot_residual_change, residual_change_curve  # noqa: E402
from ertacache.testbed.small import (  # noqa: E402
    SMALL_ASSET_DIR, SMALL_MODEL_ID, SMALL_SCENE, SMALL_TRANSFORMER, build_small_models, small_tokens,
)

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.json"


@dataclass(frozen=True)
class SmallTrainConfig:
    """Hyper-parameters of one training run; validated so a typo fails before hours are spent.

    The learning rate warms up then stays constant: the shipped weights are the EMA, which
    smooths the end of training as a decay would, and a constant rate lets ``--resume
    --steps N`` extend a run without changing what the first steps did.
    """

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    prompt_dropout: float = 0.1
    shift: float = 3.0
    seed: int = 0
    # Loss weight of latent pixels covered by the prompted object's box, on top of 1 (0 = plain
    # MSE). With the first runs' 16 px object (~6 % of the canvas) plain MSE let the photo texture
    # dominate the gradient; the 32 px object covers ~25 %, and 2 gives its box half of the loss.
    object_weight: float = 2.0
    # Mixed precision: matmuls in bfloat16 under torch.autocast, weights, optimiser and EMA in
    # float32. On CPUs with AMX/AVX-512 bf16 a step took 1.67 s instead of 2.5 s (2 threads,
    # batch 16), i.e. ~1.5x the steps in the same two hours; elsewhere it may be slower.
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.object_weight < 0:
            raise UserError(f"--object-weight must be >= 0, got {self.object_weight}")
        if self.steps <= 0 or self.batch_size <= 0 or self.warmup < 0:
            raise UserError("--steps and --batch-size must be positive (warmup >= 0)")
        if not 0 < self.lr < 1:
            raise UserError(f"--lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.prompt_dropout < 1 or not 0 < self.ema_decay < 1:
            raise UserError("prompt_dropout must be in [0, 1) and ema_decay in (0, 1)")
        if self.shift <= 0:
            raise UserError("shift must be positive")


def lr_at(step: int, cfg: SmallTrainConfig) -> float:
    """Linear warm-up, then constant (see SmallTrainConfig)."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class Run:
    """Models, optimiser, EMA copies, data stream and losses: everything a checkpoint holds."""

    def __init__(self, cfg: SmallTrainConfig, spec: TransformerSpec, scene: sd.SceneSpec, device: str = "cpu"):
        self.cfg, self.spec, self.scene, self.device = cfg, spec, scene, torch.device(device)
        # Built on the CPU (same initial weights on every device), then moved.
        self.transformer, self.text_encoder, self.vae = (m.to(self.device) for m in build_small_models(cfg.seed, spec))
        self.ema_tr = copy.deepcopy(self.transformer).eval()
        self.ema_te = copy.deepcopy(self.text_encoder).eval()
        self.params = list(self.transformer.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.sampler = sd.SceneSampler("train", spec=scene, seed=cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.losses: list[float] = []
        self.train_seconds = 0.0
        self.cpu_seconds = 0.0  # process CPU time: on a shared machine the honest cost of the steps

    def state(self) -> dict:
        return {
            "config": asdict(self.cfg), "model": asdict(self.spec), "scene": asdict(self.scene),
            "step": self.step, "losses": self.losses, "train_seconds": self.train_seconds,
            "cpu_seconds": self.cpu_seconds,
            "transformer": self.transformer.state_dict(), "text_encoder": self.text_encoder.state_dict(),
            "ema_transformer": self.ema_tr.state_dict(), "ema_text_encoder": self.ema_te.state_dict(),
            "optimizer": self.opt.state_dict(), "sampler_rng": self.sampler.rng.bit_generator.state,
            "torch_rng": self.gen.get_state(),
        }

    @classmethod
    def from_checkpoint(cls, path: Path, steps: int | None, device: str = "cpu") -> "Run":
        """Rebuild a run from ``path``; ``steps`` (if given) replaces the planned total (extend or shorten)."""
        try:
            # weights_only: tensors, numbers, strings and containers are all a checkpoint holds.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which and what to do
            raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); "
                            "delete it to start over") from None
        cfg_dict = dict(state["config"])
        cfg_dict.setdefault("object_weight", 0.0)  # checkpoints from before the weighted loss trained without it
        if steps is not None:
            cfg_dict["steps"] = steps
        run = cls(SmallTrainConfig(**cfg_dict), TransformerSpec(**state["model"]), sd.SceneSpec(**state["scene"]),
                  device)
        run.transformer.load_state_dict(state["transformer"])
        run.text_encoder.load_state_dict(state["text_encoder"])
        run.ema_tr.load_state_dict(state["ema_transformer"])
        run.ema_te.load_state_dict(state["ema_text_encoder"])
        run.opt.load_state_dict(state["optimizer"])
        run.sampler.rng.bit_generator.state = state["sampler_rng"]
        run.gen.set_state(state["torch_rng"])
        run.step, run.losses, run.train_seconds = state["step"], list(state["losses"]), state["train_seconds"]
        run.cpu_seconds = state.get("cpu_seconds", 0.0)
        return run

    def train_step(self) -> float:
        cfg = self.cfg
        clips, prompts, scenes = self.sampler.batch(cfg.batch_size)  # (B, 3, F, H, W) in [-1, 1]
        drop = torch.rand(cfg.batch_size, generator=self.gen) < cfg.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        x0 = self.vae.encode(clips.to(self.device))  # (B, 48, F, H/4, W/4)
        # Noise from a CPU generator: the same stream (and checkpoint state) on every device.
        noise = torch.randn(x0.shape, generator=self.gen).to(self.device)
        sigma = shifted_sigmas(torch.rand(cfg.batch_size, generator=self.gen), cfg.shift).to(self.device)  # (B,)
        s = sigma.view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        text = self.text_encoder.encode(prompts)  # (B, L, D_text)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            v = self.transformer(hidden_states=xt, timestep=sigma * 1000.0, encoder_hidden_states=text,
                                 return_dict=False)[0]  # (B, 48, F, h, w)
        err = (v.float() - (noise - x0)).square()  # (B, 48, F, h, w)
        if cfg.object_weight > 0:
            w = 1.0 + cfg.object_weight * object_coverage(scenes, self.scene).to(self.device)  # (B, 1, F, h, w)
            loss = (err * w).mean() / w.mean()  # normalised: the same scale as plain MSE
        else:
            loss = err.mean()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        ema_update(self.ema_tr, self.transformer, decay)
        ema_update(self.ema_te, self.text_encoder, decay)
        self.step += 1
        self.losses.append(round(loss.item(), 5))
        return self.losses[-1]


def object_coverage(scenes: list, scene: sd.SceneSpec, factor: int = 4) -> torch.Tensor:
    """(B, 1, F, H/factor, W/factor) fraction of each latent pixel inside the prompted object's box.

    The box (not the shape's own mask) so the pixels around the shape, which tell a circle
    from a square, weigh as much as the shape; ``factor`` is the pixel VAE's space-to-depth.
    """
    b, n_f, s = len(scenes), scene.frames, scene.object_size
    m = torch.zeros(b, n_f, scene.height, scene.width)  # (B, F, H, W)
    for i, sc in enumerate(scenes):
        dy, dx = sd._DIRECTION_STEP[sc.direction]
        for f in range(n_f):
            y, x = sc.start[0] + dy * scene.speed * f, sc.start[1] + dx * scene.speed * f
            m[i, f, y:y + s, x:x + s] = 1.0
    m = torch.nn.functional.avg_pool2d(m.view(b * n_f, 1, scene.height, scene.width), factor)  # (B*F, 1, h, w)
    return m.view(b, n_f, 1, scene.height // factor, scene.width // factor).transpose(1, 2)  # (B, 1, F, h, w)


def train(run: Run, work: Path, minutes: float, checkpoint_every: int) -> str:
    """Train until the planned steps or the wall-clock cap; checkpoint as it goes. Returns why it stopped."""
    t0, done0 = time.time(), run.train_seconds
    c0, cpu0 = time.process_time(), run.cpu_seconds
    bar = tqdm(total=run.cfg.steps, initial=run.step, desc="train wan2.1-small", unit="step",
               mininterval=10.0, file=sys.stdout, dynamic_ncols=True)
    why = "planned steps done"
    while run.step < run.cfg.steps:
        loss = run.train_step()
        run.train_seconds = done0 + time.time() - t0
        run.cpu_seconds = cpu0 + time.process_time() - c0
        bar.update(1)
        if run.step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(run.losses[-50:]):.4f}", lr=f"{lr_at(run.step, run.cfg):.1e}")
        if run.step % 50 == 0:
            tqdm.write(f"step {run.step:5d}  loss(avg50) {np.mean(run.losses[-50:]):.4f}  last {loss:.4f}  "
                       f"{run.train_seconds / run.step:.2f} s/step wall, {run.cpu_seconds / run.step:.2f} CPU s/step "
                       f"(this run {time.time() - t0:.0f} s)", file=sys.stdout)
        if run.step % checkpoint_every == 0:
            _atomic_torch_save(run.state(), work / CHECKPOINT)
        if time.time() - t0 > minutes * 60:
            why = f"--minutes {minutes} reached at step {run.step}"
            break
    bar.close()
    _atomic_torch_save(run.state(), work / CHECKPOINT)
    print(f"training stopped: {why}; checkpoint {work / CHECKPOINT}", flush=True)
    return why


def judge_samples(testbed: Testbed, prompts: list[str], seeds: list[int], steps: int, g: float,
                  batch: int = 8) -> dict:
    """Sample uncached, decode and judge every attribute."""
    frames = []
    for i in tqdm(range(0, len(prompts), batch), desc=f"sample g={g}", file=sys.stdout, mininterval=10.0):
        lat = sample_latents(testbed.transformer, testbed.text_encoder, prompts[i:i + batch], seeds[i:i + batch],
                             testbed.latent_shape, steps=steps, shift=testbed.facts["shift"], guidance_scale=g)
        frames.append(testbed.vae.decode(lat).cpu())
    frames = torch.cat(frames)  # (B, F, H, W, 3) uint8
    acc = scene_judge.attribute_accuracy(frames, prompts)
    return {**{k: round(v, 4) for k, v in acc.items()}, "samples": len(prompts)}


def evaluate(testbed: Testbed, n_cal: int, n_eval: int, guidances: list[float], steps: int) -> dict:
    """Pick CFG on calibration seeds (if more than one is offered), then judge held-out prompts and seeds."""
    sweep = {}
    if len(guidances) > 1 and n_cal > 0:
        prompts, seeds = sd.calibration_prompts(n_cal), list(sd.CALIBRATION_SEEDS[:n_cal])
        for g in guidances:
            sweep[str(g)] = judge_samples(testbed, prompts, seeds, steps, g)
            print(f"calibration  g={g}: {sweep[str(g)]}", flush=True)
        best = max(guidances, key=lambda g: (min(sweep[str(g)][a] for a in scene_judge.ATTRIBUTES),
                                             sum(sweep[str(g)][a] for a in scene_judge.ATTRIBUTES), -g))
    else:
        best = guidances[0]
    testbed.facts["guidance_scale"] = best
    prompts, seeds = sd.held_out_prompts(n_eval), list(sd.HELD_OUT_SEEDS[:n_eval])
    held = judge_samples(testbed, prompts, seeds, steps, best)
    print(f"held-out     g={best}: {held}", flush=True)
    return {"steps": steps, "guidance_sweep_calibration": sweep, "held_out": held, "held_out_seeds": seeds,
            "held_out_prompts": prompts}


def seconds_per_sample(testbed: Testbed, steps: int = 50) -> float:
    """Wall time of one uncached sample (batch 1, CFG) at the current thread count."""
    t0 = time.perf_counter()
    sample_latents(testbed.transformer, testbed.text_encoder, sd.held_out_prompts(1), [sd.HELD_OUT_SEEDS[0]],
                   testbed.latent_shape, steps=steps, shift=testbed.facts["shift"],
                   guidance_scale=testbed.facts["guidance_scale"])
    return time.perf_counter() - t0


def plot_loss(losses: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.arange(1, len(losses) + 1)
    k = max(1, min(50, len(losses) // 10))
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")  # (S - k + 1,)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.plot(x, losses, alpha=0.3, label="loss")
    ax.plot(x[k - 1:], smooth, label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title("wan2.1-small training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_folder(out: Path, testbed: Testbed) -> None:
    """Write the from_pretrained folder next to ``out`` and swap it in, so ``out`` is never half-written."""
    tmp = out.with_name(out.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    testbed.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    testbed.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    testbed.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    testbed.facts["size_mb"] = round(folder_megabytes(tmp), 2)
    (tmp / "testbed.json").write_text(json.dumps(testbed.facts, indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _curve(losses: list[float], every: int = 25) -> list[float]:
    """Mean loss per block of ``every`` steps (what testbed.json keeps of the curve)."""
    return [round(float(np.mean(losses[i:i + every])), 4) for i in range(0, len(losses), every)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=SMALL_ASSET_DIR, help="asset folder to write at the end")
    ap.add_argument("--work", type=Path, default=ROOT / "engines" / "wan2.1-small-train",
                    help="checkpoint and log folder (git-ignored by default)")
    ap.add_argument("--resume", action="store_true", help=f"continue from <work>/{CHECKPOINT} (its config wins)")
    ap.add_argument("--steps", type=int, default=None, help=f"planned total steps (default {SmallTrainConfig.steps}; "
                    "with --resume: extend or shorten the run)")
    ap.add_argument("--minutes", type=float, default=100.0, help="wall-clock cap on training in this invocation")
    ap.add_argument("--batch-size", type=int, default=SmallTrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=SmallTrainConfig.lr)
    ap.add_argument("--warmup", type=int, default=SmallTrainConfig.warmup)
    ap.add_argument("--seed", type=int, default=SmallTrainConfig.seed)
    ap.add_argument("--object-weight", type=float, default=SmallTrainConfig.object_weight,
                    help="extra loss weight on the prompted object's box (0 = plain MSE)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the transformer (faster on AMX CPUs)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2 = both cores of the project's VM)")
    ap.add_argument("--device", default="cpu", help="torch device (the recipe runs on CPU; a GPU is faster)")
    ap.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    ap.add_argument("--eval-samples", type=int, default=48, help="held-out samples judged at the end (0 = skip)")
    ap.add_argument("--calibration-samples", type=int, default=16, help="samples per CFG value of the sweep")
    ap.add_argument("--guidances", type=float, nargs="+", default=[3.0, 5.0], help="CFG values (one = no sweep)")
    ap.add_argument("--eval-steps", type=int, default=50, help="sampling steps of the evaluation")
    ap.add_argument("--plots", type=Path, default=ROOT / "docs", help="where the loss and residual plots go")
    ap.add_argument("--no-write", action="store_true", help="train (and checkpoint) only; no evaluation or folder")
    args = ap.parse_args(argv)
    try:
        return _main(args, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args, argv) -> int:
    if args.threads <= 0 or args.checkpoint_every <= 0 or args.minutes <= 0:
        raise UserError("--threads, --checkpoint-every and --minutes must be positive")
    if args.eval_samples < 0 or args.calibration_samples < 0 or args.eval_steps <= 0:
        raise UserError("--eval-samples and --calibration-samples must be >= 0, --eval-steps > 0")
    torch.set_num_threads(args.threads)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / CHECKPOINT
    if args.resume:
        if not ckpt.exists():
            raise UserError(f"--resume: no checkpoint at {ckpt}; run without --resume to start, or pass --work")
        run = Run.from_checkpoint(ckpt, args.steps, args.device)
        print(f"resumed at step {run.step} of {run.cfg.steps} ({run.train_seconds:.0f} s trained so far); "
              f"config from the checkpoint: {run.cfg}", flush=True)
    else:
        if ckpt.exists():
            raise UserError(f"{ckpt} exists: pass --resume to continue it, or another --work to start afresh")
        cfg = SmallTrainConfig(steps=args.steps or SmallTrainConfig.steps, batch_size=args.batch_size, lr=args.lr,
                               warmup=args.warmup, seed=args.seed, object_weight=args.object_weight,
                               bf16=args.bf16)
        run = Run(cfg, SMALL_TRANSFORMER, SMALL_SCENE, args.device)
    n_params = sum(p.numel() for p in run.transformer.parameters())
    print(f"model: {run.spec} ({n_params / 1e6:.2f} M parameters), {small_tokens(run.scene)} tokens/sample\n"
          f"scene: {run.scene}\ntrain: {run.cfg}, threads {args.threads}", flush=True)

    log_path = work / LOG
    log = json.loads(log_path.read_text()) if log_path.exists() else {"invocations": []}
    entry = {"argv": [sys.executable, *sys.argv] if argv is None else ["train_small_testbed.py", *argv],
             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "from_step": run.step,
             "threads": args.threads, "cpus": os.cpu_count(), "device": args.device, "torch": torch.__version__}
    log["invocations"].append(entry)
    _atomic_json(log, log_path)
    stop = train(run, work, args.minutes, args.checkpoint_every)
    entry.update(ended=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), to_step=run.step, stopped=stop)
    log.update(losses=run.losses, train_seconds=round(run.train_seconds, 1), cpu_seconds=round(run.cpu_seconds, 1),
               config=asdict(run.cfg))
    _atomic_json(log, log_path)
    plot_loss(run.losses, args.plots / "testbed_small_loss.png")
    if args.no_write:
        return 0

    facts = {
        "name": SMALL_MODEL_ID, "frames": run.scene.frames, "height": run.scene.height, "width": run.scene.width,
        "latent_shape": [run.spec.in_channels, run.scene.frames, run.scene.height // 4, run.scene.width // 4],
        "tokens": small_tokens(run.scene), "shift": run.cfg.shift, "guidance_scale": None,
        "recommended_steps": 50, "negative_prompt": "", "prompt_template": sd.PROMPT_TEMPLATE,
        "vocabulary": list(sd.VOCABULARY),
        "training": {**asdict(run.cfg), "steps_done": run.step, "train_seconds": round(run.train_seconds, 1),
                     "cpu_seconds": round(run.cpu_seconds, 1),
                     "first_loss": run.losses[0], "final_loss_avg100": round(float(np.mean(run.losses[-100:])), 4),
                     "loss_curve_per25": _curve(run.losses), "invocations": log["invocations"],
                     "torch": torch.__version__},
        "model": asdict(run.spec), "scene": asdict(run.scene), "parameters": n_params,
    }
    testbed = Testbed(run.ema_tr.eval(), run.ema_te.eval(), run.vae.eval(), facts)
    t_eval = time.time()
    if args.eval_samples:
        facts["eval"] = evaluate(testbed, args.calibration_samples, args.eval_samples, args.guidances, args.eval_steps)
    else:
        facts["guidance_scale"] = args.guidances[0]
    facts["seconds_per_50_step_sample"] = round(seconds_per_sample(testbed), 2)
    facts["seconds_per_50_step_sample_threads"] = args.threads
    n_curve = min(4, max(1, args.eval_samples))
    curves = residual_change_curve(testbed, sd.held_out_prompts(n_curve), list(sd.HELD_OUT_SEEDS[:n_curve]),
                                   steps=args.eval_steps)
    facts["residual_change"] = {k: [round(float(x), 4) for x in v] for k, v in curves.items()}
    plot_residual_change(curves, args.plots / "testbed_small_residual_change.png",
                         title="wan2.1-small: block-stack residual change per step")
    facts["eval_seconds"] = round(time.time() - t_eval, 1)
    write_folder(args.out, testbed)
    held = facts.get("eval", {}).get("held_out", {})
    print(f"wrote {args.out} ({facts['size_mb']} MB); one 50-step sample {facts['seconds_per_50_step_sample']} s "
          f"on {args.threads} thread(s); held-out accuracy {held}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
