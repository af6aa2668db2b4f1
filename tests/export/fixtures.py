"""Session-scoped exports of one tiny random Wan2.1 model: each target is built once per test run.

Registered for the whole suite by ``pytest_plugins`` in tests/conftest.py, so tests/export,
tests/engines, tests/runtime and tests/serving share one ONNX and one AOTInductor export, and one
CLI export of the tiny diffusers-format Wan2.1 folder (``wan_folder_export``, with a text encoder).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ertacache.export import ExportConfig, ExportPackage, ModelIdentity
from ertacache.models.adapter import adapter_for
from ertacache.models.components import PixelLatentDecoder
from ertacache.models.loading import fingerprint_module
from ertacache.profile.artifact import Profile
from ertacache.profile.calibrate import CalibrationSet, calibrate
from ertacache.profile.config import CalibrationConfig
from ertacache.sampling import initial_latents, nominal_sigmas
from ertacache.testbed.pixel_vae import PixelVAE
from tests.conftest import tiny_wan

STEPS = 8
LATENT = (4, 2, 4, 4)  # (C, F', H', W'): 2 frames of 8 x 8 pixels through a 2x2 space-to-depth "VAE"
TEXT = (5, 16)  # (L, D_text) of one prompt
GUIDANCE = 4.0


def make_profile(model, adapter) -> Profile:
    """A real (open-loop) calibration on 2 random prompts: mask, adjusted sigmas and a/b tables."""
    text = torch.randn(4, *TEXT, generator=torch.Generator().manual_seed(1))
    cal = CalibrationSet(adapter, initial_latents(LATENT, range(2)), text, GUIDANCE, nominal_sigmas(STEPS, 3.0))
    res = calibrate(cal, CalibrationConfig(speedup=2.0, loop="open"), progress=False, log=lambda s: None).result
    return Profile("tiny", fingerprint_module(model), STEPS, 3.0, 8, 8, 2, list(LATENT), GUIDANCE, 2, 0.1,
                   [bool(m) for m in res.mask], list(cal.nominal_sigmas), list(res.sigmas), list(res.phi),
                   res.corr_a, res.corr_b, {}, {"prompts": ["a", "b"]})


def pixel_decoder() -> PixelLatentDecoder:
    return PixelLatentDecoder(PixelVAE(latent_channels=4, spatial_factor=2, image_channels=1).eval())


class Tiny:
    """The model, its profile and everything an export call needs."""

    def __init__(self):
        self.model = tiny_wan()
        self.adapter = adapter_for(self.model)
        self.profile = make_profile(self.model, self.adapter)
        self.identity = ModelIdentity("tiny", self.profile.model_fingerprint, "WanTransformer3DModel",
                                      text_encoder={"kind": "random", "embed_shape": list(TEXT)})
        self.decoder = pixel_decoder()

    def export(self, out, log=lambda s: None, **config):
        config.setdefault("timing_repeats", 2)
        return ExportPackage(ExportConfig(out=out, **config), log)(
            self.adapter, self.profile, self.identity, TEXT, self.decoder)


#: the K = 3 test schedule: three full steps before the first cached one, and a wrap of the residual ring
#: (full steps 0, 1, 2, 5, 7 write ring buffers 0, 1, 2, 0, 1; step 6 reads buffers 0, 2, 1)
K3_MASK = [True, True, True, False, False, True, False, True]


def lagrange_weights(at: float, nodes) -> list[float]:
    """Weights w_k with p(at) = sum_k w_k p(nodes[k]) for every polynomial p of degree < len(nodes)."""
    out = []
    for k, xk in enumerate(nodes):
        w = 1.0
        for m, xm in enumerate(nodes):
            if m != k:
                w *= (at - xm) / (xk - xm)
        out.append(w)
    return out


def k3_profile(profile: Profile, residual_dim: int, mask=K3_MASK, seed: int = 3) -> Profile:
    """``profile`` with an order-2 Lagrange predictor over the last 3 full steps (in step index) and a small bias.

    pred_w (T, 3, 1): at a cached step i, the extrapolation weights from the last three full steps
    j1 > j2 > j3 (newest first) to i (from the one or two there are before the third full step, 0 on
    the empty slots); at a full step, (1, 0, 0) (unused). pred_b (T, D) small random.
    """
    steps = profile.steps
    pred_w = torch.zeros(steps, 3, 1)
    full: list[int] = []
    for i, m in enumerate(mask):
        if m:
            full.insert(0, i)
            pred_w[i, 0, 0] = 1.0
        else:
            pred_w[i, : len(full[:3]), 0] = torch.tensor(lagrange_weights(float(i), full[:3]))
    pred_b = 0.01 * torch.randn(steps, residual_dim, generator=torch.Generator().manual_seed(seed))
    return dataclasses.replace(profile, mask=list(mask), pred_w=pred_w, pred_b=pred_b,
                               predictor={"kind": "lagrange", "order": 2, "history": 3})


class TinyK3(Tiny):
    """The same model as ``Tiny`` with a K = 3 predictor profile (:func:`k3_profile`)."""

    def __init__(self, base: Tiny):
        self.model, self.adapter, self.identity, self.decoder = base.model, base.adapter, base.identity, base.decoder
        cfg = base.model.config
        self.profile = k3_profile(base.profile, cfg.num_attention_heads * cfg.attention_head_dim)


@pytest.fixture(scope="session")
def tiny():
    return Tiny()


@pytest.fixture(scope="session")
def tiny_k3(tiny):
    return TinyK3(tiny)


@pytest.fixture(scope="session")
def onnx_export_k3(tiny_k3, tmp_path_factory):
    """An ONNX export of the K = 3 profile (validated over the whole schedule against the eager sampler)."""
    out = tmp_path_factory.mktemp("onnx-export-k3") / "out"
    return tiny_k3.export(out, targets="onnx", timing_repeats=0)


@pytest.fixture(scope="session")
def aoti_export_k3(tiny_k3, tmp_path_factory):
    """The K = 3 profile as AOTInductor packages (no decoder: two graphs, ~15 s on 2 cores)."""
    out = tmp_path_factory.mktemp("aoti-export-k3") / "out"
    return tiny_k3.export(out, targets="aoti", timing_repeats=0, decode_graph=False)


@pytest.fixture(scope="session")
def onnx_export(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-export") / "out"
    return tiny.export(out, targets="onnx")


@pytest.fixture(scope="session")
def aoti_export(tiny, tmp_path_factory):
    """AOTInductor compiles 3 graphs (~20-30 s on 2 cores): the only AOTI build of the suite."""
    out = tmp_path_factory.mktemp("aoti-export") / "out"
    return tiny.export(out, targets="aoti")


@pytest.fixture(scope="session")
def wan_folder_export(tiny_wan_folder, tmp_path_factory):
    """One ONNX export of the tiny Wan2.1 folder through the CLI (no AOTInductor: one AOTI build per suite)."""
    root = tmp_path_factory.mktemp("runtime-cli")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat walks on the grass\na dog runs\n")
    return cli_export("wan2.1", tiny_wan_folder, root / "engine", "--prompts", str(prompts))


def cli_export(model: str, folder, out, *extra):
    """``ertacache-export`` of a tiny diffusers-format ``folder``: 5 x 32 x 32, 8 steps, a 2x open-loop profile,
    fp32 ONNX, no timing; returns ``out``."""
    from ertacache.cli import export as export_cli

    rc = export_cli.main(["--model", model, "--model-path", str(folder), "--height", "32", "--width", "32",
                          "--frames", "5", "--steps", "8", "--speedup", "2", "--loop", "open", "--dtype", "fp32",
                          "--targets", "onnx", "--timing-repeats", "0", "--engines", str(out), "--quiet", *extra])
    assert rc == 0
    return out


#: one prompt's FLUX conditioning shapes (without the batch axis) of the tiny FLUX model's exports
FLUX_SHAPES = {"prompt_embeds": (5, 32), "pooled_prompt_embeds": (12,)}


@pytest.fixture(scope="session")
def flux_onnx_export(tmp_path_factory):
    """An ONNX export folder of the tiny FLUX model (embedded guidance, K = 3 hand-written profile; with the
    torch.compile check and a tiny AutoencoderKL decode graph, 8x like FLUX's VAE: 8 x 8 latents ->
    64 x 64 pixels; ~45 s on 2 cores): .out, .model, .adapter, .profile, .decoder."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    from ertacache.export.config import ExportConfig
    from ertacache.export.package import ExportPackage, ModelIdentity
    from ertacache.models.adapter import adapter_for
    from ertacache.models.flux import FluxLatentDecoder
    from tests.integrations.test_flux_pipeline import flux_profile
    from tests.models.test_flux_adapter import tiny_flux

    model = tiny_flux(True).eval()
    profile = flux_profile(model, True)
    adapter = adapter_for(model)
    out = tmp_path_factory.mktemp("flux-onnx-export") / "out"
    identity = ModelIdentity("flux-tiny-test", profile.model_fingerprint, type(model).__name__)
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, layers_per_block=1, shift_factor=0.1, scaling_factor=0.5).eval()
    decoder = FluxLatentDecoder(vae)
    ExportPackage(ExportConfig(out=out, targets=("onnx",), timing_repeats=0), log=lambda s: None)(
        adapter, profile, identity, FLUX_SHAPES, decoder)
    return SimpleNamespace(out=out, model=model, adapter=adapter, profile=profile, decoder=decoder)


@pytest.fixture(scope="session")
def i2v_folder_export(tmp_path_factory):
    """A tiny random Wan2.1 I2V diffusers-format folder and one ONNX export of it through the CLI, calibrated on
    the built-in sample photographs (~10 s on 2 cores): .folder, .out, .image (a conditioning PNG)."""
    from types import SimpleNamespace

    from PIL import Image

    from ertacache.models.images import sample_images
    from tests.models.test_wan_i2v_recipe import write_i2v_folder

    root = tmp_path_factory.mktemp("wan-i2v-export")
    folder = write_i2v_folder(root / "folder")
    cli_export("wan2.1-i2v", folder, root / "out")
    Image.fromarray(sample_images(1, offset=7)[0]).save(root / "first.png")
    return SimpleNamespace(folder=folder, out=root / "out", image=root / "first.png")


@pytest.fixture(scope="session")
def a14b_folder_export(tmp_path_factory):
    """A Wan2.2 A14B-style folder (two tiny random experts, transformer_2/) and one ONNX export of it through the
    CLI: 16 steps so that both experts have cached steps (~30 s on 2 cores): .folder, .out."""
    from types import SimpleNamespace

    from tests.models.test_wan22_a14b import _a14b_folder

    root = tmp_path_factory.mktemp("a14b-export")
    folder = _a14b_folder(root)
    return SimpleNamespace(folder=folder, out=cli_export("wan2.2", folder, root / "out", "--steps", "16",
                                                         "--speedup", "1.6"))


def program_runner(programs):
    """The exported programs (``torch.export``, what AOTInductor and ONNX start from) run as modules."""
    from ertacache.export.runners import EagerRunner

    return EagerRunner({name: program.module() for name, program in programs.items()})


def onnx_runner(graphs, folder, names=("full_step", "cached_step")):
    """ONNX Runtime sessions of baked ``graphs`` (a :class:`~ertacache.export.graphs.StepGraphs`), written to
    ``folder``; returns (runner, {graph name: .onnx path})."""
    from ertacache.export.onnx_target import OnnxFromExportedProgram
    from ertacache.export.runners import OnnxRuntimeRunner

    target = OnnxFromExportedProgram()
    paths = {n: target(n, graphs.programs[n], graphs.example_inputs[n], graphs.specs[n], folder).path for n in names}
    return OnnxRuntimeRunner(paths, graphs.specs), paths


def aoti_runner(graphs, folder, names=("full_step", "cached_step")):
    """AOTInductor packages of baked ``graphs``, compiled into ``folder`` (a minute or two on 2 cores)."""
    from ertacache.export.aoti_target import AotiPackageFromExportedProgram
    from ertacache.export.runners import AotiRunner

    target = AotiPackageFromExportedProgram()
    return AotiRunner({n: target(n, graphs.programs[n], folder).path for n in names})


@pytest.fixture(scope="session")
def hunyuan_folder_export(tmp_path_factory):
    """A tiny random HunyuanVideo diffusers-format folder and one ONNX export of it through the CLI (~8 s on 2
    cores): .folder, .out."""
    from types import SimpleNamespace

    from tests.models.test_hunyuan_recipe import write_hunyuan_folder

    root = tmp_path_factory.mktemp("hunyuan-export")
    folder = write_hunyuan_folder(root / "folder")
    return SimpleNamespace(folder=folder, out=cli_export("hunyuanvideo", folder, root / "out"))
