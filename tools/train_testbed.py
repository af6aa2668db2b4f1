#!/usr/bin/env python
"""Train the ``wan2.1-tiny`` testbed from scratch (about 24 minutes on one CPU core).

A tiny diffusers ``WanTransformer3DModel`` learns flow matching (v = noise - x0) on
synthetic videos of moving load_digits digits, with a word-level text encoder trained
alongside and a parameter-free space-to-depth "VAE". Everything is seeded, so the
same command reproduces the shipped weights (up to CPU floating-point differences).
At the end it samples 50-step uncached videos, judges them, writes ``testbed.json``
and the residual-change plot.

    python tools/train_testbed.py                      # writes ertacache/assets/wan2.1-tiny
    python tools/train_testbed.py --out /tmp/tb --steps 200 --eval-samples 16
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ertacache.testbed import data as tb_data  # noqa: E402
from ertacache.testbed import judge  # noqa: E402
from ertacache.testbed.model import ASSET_DIR, Testbed, TransformerSpec, sample_latents  # noqa: E402
from ertacache.testbed.pixel_vae import PixelVAE  # noqa: E402
from ertacache.testbed.residuals import plot_residual_change, residual_change_curve  # noqa: E402
from ertacache.testbed.text_encoder import TinyTextEncoder  # noqa: E402


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; validated so a typo fails before minutes are spent."""

    steps: int = 3000
    minutes: float = 28.0  # wall-clock cap; the run stops early (and says so) if reached
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    prompt_dropout: float = 0.1
    shift: float = 3.0
    seed: int = 0
    threads: int = 1  # one core: two threads stall each other whenever anything else runs

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.minutes <= 0:
            raise ValueError("steps, batch_size and minutes must be positive")
        if not 0 <= self.prompt_dropout < 1 or not 0 < self.ema_decay < 1:
            raise ValueError("prompt_dropout must be in [0, 1) and ema_decay in (0, 1)")
        if self.shift <= 0:
            raise ValueError("shift must be positive")


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma = S u / (1 + (S - 1) u): uniform u through the sampler's own time shift.

    FlowMatchEulerDiscreteScheduler(shift=S) places its 50 sigmas at uniformly spaced u
    mapped through this same function, so training sigmas drawn this way follow the
    density of the sigmas the model is actually queried at (more weight on high noise,
    where layout and digit identity are decided).
    """
    return shift * u / (1 + (shift - 1) * u)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 10 % of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Exponential moving average of the weights (what gets shipped: smoother samples)."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def optimizer_step(opt, params, loss, step: int, cfg: TrainConfig, ema_pairs) -> None:
    """One AdamW step at the scheduled learning rate, gradients clipped at norm 1; then the EMA copies follow
    (their decay ramps up over the first steps, so early weights are not averaged in for long)."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
    for ema, model in ema_pairs:
        ema_update(ema, model, decay)


def build_models(spec: TransformerSpec, seed: int):
    """Fresh, seeded transformer, text encoder and pixel VAE."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**spec.to_diffusers())
    text_encoder = TinyTextEncoder(embed_dim=spec.text_dim, seed=seed)
    vae = PixelVAE(latent_channels=spec.in_channels, spatial_factor=4, temporal_factor=1, image_channels=1)
    return transformer, text_encoder, vae


def train(cfg: TrainConfig, spec: TransformerSpec, video: tb_data.VideoSpec):
    """The flow-matching loop; returns EMA modules, the VAE and a log dict."""
    transformer, text_encoder, vae = build_models(spec, cfg.seed)
    ema_tr, ema_te = copy.deepcopy(transformer).eval(), copy.deepcopy(text_encoder).eval()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    sampler = tb_data.DigitVideoSampler("train", spec=video, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="train", mininterval=5.0, file=sys.stdout)
    for step in bar:
        videos, prompts, _, _ = sampler.batch(cfg.batch_size)  # (B, F, H, W)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        x0 = vae.encode(videos)  # (B, C, F, h, w)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = shifted_sigmas(torch.rand(cfg.batch_size, generator=gen), cfg.shift)  # (B,)
        s = sigma.view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        text = text_encoder.encode(prompts)  # (B, L, D)
        v = transformer(hidden_states=xt, timestep=sigma * 1000.0, encoder_hidden_states=text,
                        return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        optimizer_step(opt, params, loss, step, cfg, ((ema_tr, transformer), (ema_te, text_encoder)))
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            recent = float(np.mean(losses[-50:]))
            bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr_at(step, cfg):.2e}")
            tqdm.write(f"step {step:5d}  loss(avg50) {recent:.4f}  elapsed {time.time() - t0:6.1f}s", file=sys.stdout)
        if time.time() - t0 > cfg.minutes * 60:
            tqdm.write(f"stopping early at step {step + 1}: --minutes {cfg.minutes} reached", file=sys.stdout)
            break
    log = {"steps_done": len(losses), "train_seconds": round(time.time() - t0, 1),
           "final_loss_avg100": round(float(np.mean(losses[-100:])), 4), "first_loss": round(losses[0], 4)}
    return ema_tr, ema_te, vae, log


def judge_samples(testbed: Testbed, prompts: list[str], seeds: list[int], steps: int, g: float,
                  batch: int = 40) -> dict:
    """Sample uncached, decode and judge; returns digit and motion accuracy."""
    frames = []
    for i in range(0, len(prompts), batch):
        lat = sample_latents(testbed.transformer, testbed.text_encoder, prompts[i:i + batch], seeds[i:i + batch],
                             testbed.latent_shape, steps=steps, shift=testbed.facts["shift"], guidance_scale=g)
        frames.append(testbed.vae.decode(lat))
    frames = torch.cat(frames)  # (B, F, H, W, 3)
    parsed = [tb_data.parse_prompt(p) for p in prompts]
    return {"digit_accuracy": round(judge.frame_digit_accuracy(frames, [d for d, _ in parsed]), 4),
            "motion_accuracy": round(judge.motion_accuracy(frames, [r for _, r in parsed]), 4),
            "samples": len(prompts)}


def evaluate(testbed: Testbed, n: int, guidances: list[float]) -> dict:
    """Pick CFG on calibration seeds, then report on held-out seeds (never used for the choice)."""
    steps = testbed.facts["recommended_steps"]
    calib_prompts = tb_data.calibration_prompts(n)
    calib_seeds = list(tb_data.CALIBRATION_SEEDS[:n])
    sweep = {}
    for g in guidances:
        sweep[str(g)] = judge_samples(testbed, calib_prompts, calib_seeds, steps, g)
        print(f"calibration  g={g}: {sweep[str(g)]}", flush=True)
    best = max(guidances, key=lambda g: (sweep[str(g)]["digit_accuracy"] + sweep[str(g)]["motion_accuracy"], -g))
    testbed.facts["guidance_scale"] = best
    held_prompts = tb_data.held_out_prompts(n)
    held_seeds = list(tb_data.HELD_OUT_SEEDS[:n])
    held = judge_samples(testbed, held_prompts, held_seeds, steps, best)
    print(f"held-out     g={best}: {held}", flush=True)
    return {"guidance_sweep_calibration": sweep, "held_out": held, "held_out_seeds": held_seeds,
            "held_out_prompts": held_prompts, "calibration_seeds": calib_seeds}


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ASSET_DIR, help="model folder to write (default: shipped one)")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--minutes", type=float, default=TrainConfig.minutes, help="wall-clock cap for training")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--threads", type=int, default=TrainConfig.threads)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--frames", type=int, default=tb_data.VideoSpec.frames)
    ap.add_argument("--images-per-class", type=int, default=tb_data.VideoSpec.images_per_class)
    ap.add_argument("--grid", type=int, default=tb_data.VideoSpec.grid, help="start-corner grid in px")
    ap.add_argument("--eval-samples", type=int, default=80, help="samples per evaluation (calibration and held-out)")
    ap.add_argument("--guidances", type=float, nargs="+", default=[3.0, 5.0])
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "testbed_residual_change.png")
    ap.add_argument("--eval-only", action="store_true",
                    help="skip training: re-evaluate the weights in --out, keeping testbed.json's training facts")
    args = ap.parse_args(argv)

    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, seed=args.seed,
                      threads=args.threads, lr=args.lr)
    spec, video = TransformerSpec(), tb_data.VideoSpec(frames=args.frames, grid=args.grid,
                                                          images_per_class=args.images_per_class)
    torch.set_num_threads(cfg.threads)
    out: Path = args.out
    if args.eval_only:
        from ertacache.testbed.model import load_testbed

        old = load_testbed(out)
        transformer, text_encoder, vae = old.transformer, old.text_encoder, old.vae
        log = {k: old.facts.get("training", {}).get(k) for k in
               ("steps_done", "train_seconds", "final_loss_avg100", "first_loss")}
    else:
        print(f"train config: {cfg}\nmodel: {spec}\nvideo: {video}", flush=True)
        transformer, text_encoder, vae, log = train(cfg, spec, video)
        print(f"training done: {log}", flush=True)
        transformer.save_pretrained(out / "transformer", safe_serialization=True)
        text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        vae.save_pretrained(out / "vae", safe_serialization=True)
    facts = {
        "name": "wan2.1-tiny", "frames": video.frames, "height": video.height, "width": video.width,
        "latent_shape": [spec.in_channels, video.frames, video.height // 4, video.width // 4],
        "tokens": video.frames * (video.height // 8) * (video.width // 8),
        "shift": cfg.shift, "guidance_scale": None, "recommended_steps": 50,
        "negative_prompt": "", "prompt_template": "digit {digit} moving {direction}",
        "training": {**asdict(cfg), **log, "torch": torch.__version__},
        "model": asdict(spec), "video": asdict(video),
        "parameters": sum(p.numel() for p in transformer.parameters()),
    }
    testbed = Testbed(transformer.eval(), text_encoder.eval(), vae.eval(), facts)
    t_eval = time.time()
    facts["eval"] = evaluate(testbed, args.eval_samples, args.guidances)
    curves = residual_change_curve(testbed, tb_data.held_out_prompts(4), list(tb_data.HELD_OUT_SEEDS[:4]))
    facts["residual_change"] = {k: [round(float(x), 4) for x in v] for k, v in curves.items()}
    plot_residual_change(curves, args.plot)
    facts["eval"]["eval_seconds"] = round(time.time() - t_eval, 1)
    facts["size_mb"] = round(folder_megabytes(out), 2)
    (out / "testbed.json").write_text(json.dumps(facts, indent=2) + "\n")
    c = curves["cond"]
    print(f"residual change (cond): min {c.min():.4f} @ {c.argmin() + 1}, median {np.median(c):.4f}, "
          f"max {c.max():.4f} @ {c.argmax() + 1}")
    held = facts["eval"]["held_out"]
    print(f"ACCURACY held-out ({held['samples']} samples, 50 steps, g={facts['guidance_scale']}): "
          f"digit {held['digit_accuracy']:.3f}  motion {held['motion_accuracy']:.3f}  size {facts['size_mb']} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
