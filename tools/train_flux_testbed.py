#!/usr/bin/env python
"""Train the ``flux-tiny`` image testbed from scratch (about 30 minutes on one CPU core).

A tiny diffusers ``FluxTransformer2DModel`` learns flow matching (v = noise - x0) on
"red digit 3"-style images over photographs (``ertacache.testbed.image_data``), with the
word-level text encoder trained alongside (FLUX's two inputs: its states and their pooled
mean) and the parameter-free pixel VAE. Seeded, resumable (``--resume`` continues from the
checkpoint written every ``--checkpoint-every`` steps). At the end it samples 50-step uncached
images on held-out seeds, prompts, handwriting and photo strips, judges digit and colour, and
writes ``testbed.json``.

    python tools/train_flux_testbed.py                         # writes ertacache/assets/flux-tiny
    python tools/train_flux_testbed.py --out /tmp/ft --steps 100 --eval-samples 16
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from train_testbed import TrainConfig, folder_megabytes, optimizer_step, shifted_sigmas  # noqa: E402

from ertacache.io import atomic_write_bytes  # noqa: E402
from ertacache.testbed import image_data  # noqa: E402
from ertacache.testbed.flux_tiny import (  # noqa: E402
    FLUX_TINY_DIR, FLUX_TINY_ID, FluxSpec, build_flux_tiny, flux_sigmas, flux_velocity, sample_images, spec_facts,
)
from ertacache.testbed.image_judge import attribute_accuracy  # noqa: E402
from ertacache.testbed.text_encoder import PooledPromptEncoder  # noqa: E402

def train_shift(spec: FluxSpec, images: image_data.ImageSpec) -> float:
    """exp(mu) of the FLUX family's dynamic shift at this model's token count (1.58 at 16 tokens): training
    sigmas then follow the density the sampler queries (the shift is static at one resolution)."""
    from ertacache.models.flux import FLUX_T2I

    tokens = (images.height // (2 * spec.spatial_factor)) * (images.width // (2 * spec.spatial_factor))
    return float(np.exp(FLUX_T2I.sigma_schedule.mu(tokens)))


TRAIN_SHIFT = train_shift(FluxSpec(), image_data.ImageSpec())


def checkpoint_path(out: Path) -> Path:
    """Beside the model folder, not in it: the folder ships, the resume state (optimizer, EMA, RNG) does not,
    and it survives the run so training can be extended with --resume --steps N."""
    return out.parent / f"{out.name}.checkpoint.pt"


def train(cfg: TrainConfig, spec: FluxSpec, out: Path, resume: bool, checkpoint_every: int,
          images: image_data.ImageSpec | None = None):
    """The flow-matching loop; returns the EMA transformer and text encoder, the VAE and a log dict."""
    transformer, text_encoder, vae = build_flux_tiny(cfg.seed, spec)
    ema_tr, ema_te = copy.deepcopy(transformer).eval(), copy.deepcopy(text_encoder).eval()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    sampler = image_data.DigitImageSampler("train", spec=images, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses: list[float] = []
    start, elapsed_before = 0, 0.0
    ckpt = checkpoint_path(out)
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        for module, key in ((transformer, "transformer"), (text_encoder, "text_encoder"), (ema_tr, "ema_transformer"),
                            (ema_te, "ema_text_encoder"), (opt, "optimizer")):
            module.load_state_dict(state[key])
        sampler.rng, gen = state["sampler_rng"], state["generator"]
        losses, start, elapsed_before = state["losses"], state["step"], state["elapsed"]
        print(f"resumed from {ckpt} at step {start}", flush=True)
    encode = PooledPromptEncoder(text_encoder)
    t0 = time.time() - elapsed_before
    bar = tqdm(range(start, cfg.steps), desc="train", mininterval=5.0, file=sys.stdout)
    for step in bar:
        images, prompts = sampler.batch(cfg.batch_size)  # (B, 3, H, W) in [-1, 1]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.prompt_dropout  # the unconditional branch of CFG
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        x0 = vae.encode_images(images)  # (B, C, H', W')
        noise = torch.randn(x0.shape, generator=gen)
        sigma = shifted_sigmas(torch.rand(cfg.batch_size, generator=gen), cfg.shift)  # (B,)
        s = sigma.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        v = flux_velocity(transformer, (1 - s) * x0 + s * noise, sigma, encode(prompts))
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        optimizer_step(opt, params, loss, step, cfg, ((ema_tr, transformer), (ema_te, text_encoder)))
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            recent = float(np.mean(losses[-50:]))
            tqdm.write(f"step {step:5d}  loss(avg50) {recent:.4f}  elapsed {time.time() - t0:6.1f}s", file=sys.stdout)
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            state = {"transformer": transformer.state_dict(), "text_encoder": text_encoder.state_dict(),
                     "ema_transformer": ema_tr.state_dict(), "ema_text_encoder": ema_te.state_dict(),
                     "optimizer": opt.state_dict(), "sampler_rng": sampler.rng, "generator": gen,
                     "losses": losses, "step": step + 1, "elapsed": time.time() - t0}
            tmp = ckpt.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(ckpt)  # atomic: a killed run leaves the previous checkpoint whole
        if time.time() - t0 > cfg.minutes * 60:
            tqdm.write(f"stopping early at step {step + 1}: --minutes {cfg.minutes} reached", file=sys.stdout)
            break
    log = {"steps_done": len(losses), "train_seconds": round(time.time() - t0, 1),
           "final_loss_avg100": round(float(np.mean(losses[-100:])), 4), "first_loss": round(losses[0], 4),
           "loss_curve": [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)]}
    return ema_tr, ema_te, vae, log


def judge(transformer, text_encoder, vae, prompts, seeds, g: float, steps: int = 50, batch: int = 40) -> dict:
    """Uncached 50-step samples, judged for digit and colour."""
    frames = []
    for i in range(0, len(prompts), batch):
        lat = sample_images(transformer, text_encoder, prompts[i:i + batch], seeds[i:i + batch], steps=steps,
                            guidance_scale=g)
        frames.append(vae.decode(lat))  # (b, 1, H, W, 3)
    acc = attribute_accuracy(torch.cat(frames).numpy(), prompts)
    return {**{f"{k}_accuracy": round(v, 4) for k, v in acc.items()}, "samples": len(prompts)}


def evaluate(transformer, text_encoder, vae, n: int, guidances: list[float]) -> dict:
    """Pick the CFG scale on calibration prompts and seeds, then report on held-out ones (never used to choose)."""
    calib_prompts, calib_seeds = image_data.calibration_prompts(n), list(image_data.CALIBRATION_SEEDS[:n])
    sweep = {}
    for g in guidances:
        sweep[str(g)] = judge(transformer, text_encoder, vae, calib_prompts, calib_seeds, g)
        print(f"calibration  g={g}: {sweep[str(g)]}", flush=True)
    best = max(guidances, key=lambda g: (sweep[str(g)]["digit_accuracy"] + sweep[str(g)]["colour_accuracy"], -g))
    prompts, seeds = image_data.held_out_prompts(n), list(image_data.HELD_OUT_SEEDS[:n])
    held = judge(transformer, text_encoder, vae, prompts, seeds, best)
    print(f"held-out     g={best}: {held}", flush=True)
    return {"guidance_scale": best, "guidance_sweep_calibration": sweep, "held_out": held,
            "held_out_seeds": seeds, "held_out_prompts": prompts}


def samples_png(transformer, text_encoder, vae, g: float, path: Path, steps: int = 50) -> None:
    """One held-out seed per digit (colours in turn), uncached, side by side, enlarged 4x: the docs' figure."""
    from PIL import Image

    prompts = [image_data.make_prompt(image_data.COLOUR_NAMES[d % 4], d) for d in image_data.DIGITS]
    seeds = list(image_data.HELD_OUT_SEEDS[:len(prompts)])
    frames = vae.decode(sample_images(transformer, text_encoder, prompts, seeds, steps=steps, guidance_scale=g))
    strip = np.concatenate(list(frames[:, 0].numpy()), axis=1)  # (H, 10 W, 3)
    Image.fromarray(strip).resize((strip.shape[1] * 4, strip.shape[0] * 4), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=FLUX_TINY_DIR, help="model folder to write (default: shipped one)")
    ap.add_argument("--steps", type=int, default=5500)
    ap.add_argument("--minutes", type=float, default=31.0, help="wall-clock cap for training")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-samples", type=int, default=80)
    ap.add_argument("--prompt-dropout", type=float, default=0.1, help="fraction of empty prompts (CFG's uncond)")
    ap.add_argument("--guidances", type=float, nargs="+", default=[3.0, 5.0], help="CFG scales to choose from")
    ap.add_argument("--eval-only", action="store_true", help="skip training: re-evaluate the weights in --out")
    ap.add_argument("--train-shift", type=float, default=3.0,
                    help="static shift of the training sigmas (0: the sampler's, 1.58 at 16 tokens; 3 weights the "
                         "high noise where the digit's shape is decided, as wan2.1-tiny trains)")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "testbed_flux_samples.png",
                    help="where to write the samples figure")
    ap.add_argument("--head-dim", type=int, default=FluxSpec.attention_head_dim,
                    help="attention head width (4 heads); the model width must exceed a token's 3 (2s)^2 values")
    ap.add_argument("--spatial-factor", type=int, default=FluxSpec.spatial_factor,
                    help="pixel VAE space-to-depth factor (a token is 2s x 2s pixels)")
    ap.add_argument("--background-level", type=float, default=image_data.ImageSpec.background_level,
                    help="brightest value of the dimmed photograph behind the digit (0: black)")
    ap.add_argument("--checkpoint-every", type=int, default=250, help="steps between resumable checkpoints (0: none)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint.pt (beside --out)")
    args = ap.parse_args(argv)

    hd = args.head_dim
    spec = FluxSpec(spatial_factor=args.spatial_factor, attention_head_dim=hd,
                    axes_dims_rope=(hd - 2 * (3 * hd // 8), 3 * hd // 8, 3 * hd // 8))
    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      threads=args.threads, prompt_dropout=args.prompt_dropout,
                      shift=args.train_shift or train_shift(spec, image_data.ImageSpec(
                          background_level=args.background_level)))
    torch.set_num_threads(cfg.threads)
    out: Path = args.out
    if args.eval_only:
        from diffusers import FluxTransformer2DModel

        from ertacache.testbed.pixel_vae import PixelVAE
        from ertacache.testbed.text_encoder import TinyTextEncoder

        transformer = FluxTransformer2DModel.from_pretrained(out, subfolder="transformer")
        text_encoder = TinyTextEncoder.from_pretrained(out, subfolder="text_encoder")
        vae = PixelVAE.from_pretrained(out, subfolder="vae")
        old = json.loads((out / "testbed.json").read_text())
        log = {k: v for k, v in old["training"].items() if k not in asdict(cfg) and k not in ("torch", "command")}
    else:
        print(f"train config: {cfg}\nmodel: {spec}\nimages: {image_data.ImageSpec(background_level=args.background_level)}", flush=True)
        transformer, text_encoder, vae, log = train(cfg, spec, out, args.resume, args.checkpoint_every,
                                                    image_data.ImageSpec(background_level=args.background_level))
        print(f"training done: { {k: v for k, v in log.items() if k != 'loss_curve'} }", flush=True)
        transformer.save_pretrained(out / "transformer", safe_serialization=True)
        text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        vae.save_pretrained(out / "vae", safe_serialization=True)
    img = image_data.ImageSpec(background_level=args.background_level)
    facts = {
        "name": FLUX_TINY_ID, "height": img.height, "width": img.width,
        "latent_shape": [vae.config.latent_channels, img.height // spec.spatial_factor,
                         img.width // spec.spatial_factor],
        "tokens": (img.height // (2 * spec.spatial_factor)) * (img.width // (2 * spec.spatial_factor)),
        "guidance_scale": None, "recommended_steps": 50,
        "prompt_template": image_data.PROMPT_TEMPLATE,
        "sigmas_50": [round(float(s), 6) for s in flux_sigmas(50, img.height, img.width, spec.spatial_factor)],
        "training": {**asdict(cfg), **log, "torch": torch.__version__,
                     "command": "python tools/train_flux_testbed.py " + " ".join(argv or sys.argv[1:])},
        "model": spec_facts(spec), "images": asdict(img),
        "parameters": sum(p.numel() for p in transformer.parameters()),
    }
    t_eval = time.time()
    facts["eval"] = evaluate(transformer.eval(), text_encoder.eval(), vae.eval(), args.eval_samples, args.guidances)
    facts["guidance_scale"] = facts["eval"]["guidance_scale"]
    samples_png(transformer, text_encoder, vae, facts["guidance_scale"], args.plot)
    facts["eval"]["eval_seconds"] = round(time.time() - t_eval, 1)
    facts["size_mb"] = round(folder_megabytes(out), 2)
    atomic_write_bytes(out / "testbed.json", (json.dumps(facts, indent=2) + "\n").encode())
    held = facts["eval"]["held_out"]
    print(f"ACCURACY held-out ({held['samples']} samples, 50 steps, g={facts['guidance_scale']}): "
          f"digit {held['digit_accuracy']:.3f}  "
          f"colour {held['colour_accuracy']:.3f}  size {facts['size_mb']} MB  params {facts['parameters']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
