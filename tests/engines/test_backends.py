"""Backend registry, engine lifetime, the ONNX Runtime IOBinding and the TensorRT compatibility rules."""

import importlib.util

import pytest
import torch

from ertacache.engines import (
    BackendNotInstalledError,
    EngineInactiveError,
    EngineMismatchError,
    UnknownBackendError,
    require_backend,
)
from ertacache.engines import base
from ertacache.engines.tensorrt import check_engine_entry, engine_file_name
from ertacache.export import CACHED_STEP, FULL_STEP

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def test_unknown_backend_is_refused_with_the_valid_names():
    with pytest.raises(UnknownBackendError, match=r"unknown backend 'tvm'.*onnxruntime.*tensorrt.*aoti.*torch"):
        require_backend("tvm")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT and a GPU are present here")
def test_tensorrt_absent_names_the_pip_extra():
    with pytest.raises(BackendNotInstalledError, match=r"ertacache\[tensorrt\]|CUDA GPU"):
        require_backend("tensorrt")


def test_onnxruntime_absent_names_the_pip_extra(monkeypatch):
    monkeypatch.setattr(base, "_module_present", lambda name: name != "onnxruntime")
    with pytest.raises(BackendNotInstalledError, match=r"needs onnxruntime.*pip install 'ertacache\[onnx\]'"):
        require_backend("onnxruntime")


def test_missing_onnxruntime_provider_names_the_gpu_wheel(onnx_export):
    import onnxruntime

    from ertacache.engines.onnxruntime import OnnxRuntimeEngine

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    with pytest.raises(BackendNotInstalledError, match="onnxruntime-gpu"):
        OnnxRuntimeEngine({FULL_STEP: onnx_export.out / "onnx" / "full_step.onnx"}, ["CUDAExecutionProvider"])


def test_engine_used_inactive_is_a_clear_error(onnx_export):
    from ertacache.engines.onnxruntime import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine({CACHED_STEP: onnx_export.out / "onnx" / "cached_step.onnx"})
    with pytest.raises(EngineInactiveError, match="inside `with engine:`"):
        engine.bind(CACHED_STEP, {}, {})
    with engine:
        assert engine.active and "residual" in engine.input_names(CACHED_STEP)
    assert not engine.active and engine.sessions == {}


def test_onnxruntime_bind_checks_shapes_against_the_file(onnx_export):
    from ertacache.engines.onnxruntime import OnnxRuntimeEngine

    spec = {s["name"]: s for s in onnx_export.manifest["graphs"][CACHED_STEP]["inputs"]}
    inputs = {n: torch.zeros(s["shape"], dtype=torch.int64 if n == "step" else torch.float32) for n, s in spec.items()}
    inputs["residual"] = torch.zeros(1, 2, 3)
    with OnnxRuntimeEngine({CACHED_STEP: onnx_export.out / "onnx" / "cached_step.onnx"}) as engine:
        with pytest.raises(EngineMismatchError, match=r"residual is \[[0-9, ]+\] in the .onnx file but \[1, 2, 3\]"):
            engine.bind(CACHED_STEP, inputs, {"latents_out": torch.zeros(spec["latents"]["shape"])})


# ---- TensorRT: the compatibility rules on fabricated manifest entries (no TensorRT needed) --------------------

ENTRY = {"version": "10.8.0", "gpu": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7",
         "hardware_compatibility": "none", "version_compatible": False}
ORIN = {"name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"}


def test_engine_of_another_tensorrt_version_is_refused_naming_both():
    with pytest.raises(EngineMismatchError, match=r"built with TensorRT 10\.8\.0, this machine has TensorRT 10\.13\.0"):
        check_engine_entry(ENTRY, "10.13.0", ORIN)
    check_engine_entry(ENTRY, "10.8.0", ORIN)  # same version, same GPU: accepted


def test_engine_for_another_gpu_is_refused_naming_both():
    with pytest.raises(EngineMismatchError, match=r"built for NVIDIA Jetson AGX Orin \(compute capability 8\.7\), "
                                                  r"this GPU is NVIDIA H100 \(compute capability 9\.0\)"):
        check_engine_entry(ENTRY, "10.8.0", {"name": "NVIDIA H100", "compute_capability": "9.0"})


def test_version_and_hardware_compatible_engines_follow_tensorrt_rules():
    portable = dict(ENTRY, version_compatible=True, hardware_compatibility="ampere+")
    check_engine_entry(portable, "10.13.0", {"name": "NVIDIA A10", "compute_capability": "8.6"})  # later TRT, Ampere
    with pytest.raises(EngineMismatchError, match=r"from TensorRT 10\.8\.0 on, but this machine has TensorRT 10\.3"):
        check_engine_entry(portable, "10.3.0", ORIN)
    with pytest.raises(EngineMismatchError, match=r"Ampere and later.*sm 7\.5"):
        check_engine_entry(portable, "10.8.0", {"name": "Tesla T4", "compute_capability": "7.5"})


def test_engine_entry_without_tensorrt_or_gpu_here():
    with pytest.raises(BackendNotInstalledError, match="TensorRT is not installed here"):
        check_engine_entry(ENTRY, None, ORIN)
    with pytest.raises(BackendNotInstalledError, match="no CUDA GPU"):
        check_engine_entry(ENTRY, "10.8.0", None)


def test_engine_file_names_carry_version_and_compute_capability():
    assert engine_file_name("full_step", "10.8.0", "8.7") == "full_step.trt10.8.0.sm87.engine"
    assert engine_file_name("cached_step", "10.8.0", "8.7", "ampere+") == "cached_step.trt10.8.0.sm80+.engine"


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU (neither is installable on CI)")
def test_tensorrt_engines_build_and_match_eager(onnx_export, tiny, tmp_path):
    import shutil

    from ertacache.cli import build
    from ertacache.runtime import Runtime
    from ertacache.sampling import CachedSampler
    from ertacache.export.runners import relative_l2
    from tests.export.conftest import TEXT

    folder = tmp_path / "trt"
    shutil.copytree(onnx_export.out, folder)
    assert build.main(["--engines", str(folder)]) == 0
    gen = torch.Generator().manual_seed(5)
    noise, text = torch.randn(1, 4, 2, 4, 4, generator=gen), torch.randn(2, *TEXT, generator=gen)
    ref = CachedSampler(tiny.adapter, tiny.profile.tables(), tiny.profile.mask)(noise, text, 4.0).latents
    with Runtime(folder, "tensorrt") as rt:
        got = rt.sample(noise.cuda(), text.cuda()).cpu()
    assert relative_l2(got, ref) <= 1e-4
