"""Calibration's device memory is flat in the number of prompts: per-prompt state lives in the host store.

On the CPU the host store and the "device" are the same memory, so the check subtracts what the
store holds (ertacache.memory.PeakMemory's ``exclude``) and asserts that everything else, the working
set the GPU would have to hold, does not grow with the prompts, while the store itself does.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from ertacache.memory import PeakMemory
from ertacache.models.adapter import adapter_for
from ertacache.profile.calibrate import CalibrationSet, cached_pass, error_matrix
from ertacache.profile.config import CalibrationConfig
from ertacache.profile.offload import HostStore
from ertacache.sampling import initial_latents, nominal_sigmas


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    model = WanTransformer3DModel(in_channels=4, out_channels=4, num_layers=2, num_attention_heads=4,
                                  attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=128, patch_size=(1, 2, 2),
                                  cross_attn_norm=True, rope_max_seq_len=64).eval()
    return adapter_for(model)  # width 64, 128 tokens per sample


def _measure(adapter, prompts: int, run) -> tuple[int, int, int]:
    """(working-set peak, store peak, peak without excluding the store) of ``run(cal)``."""
    cal = CalibrationSet(adapter, initial_latents((4, 2, 16, 16), range(prompts)), torch.randn(2 * prompts, 8, 32),
                         4.0, nominal_sigmas(8, 3.0))
    store_peak = [0]

    def held():
        store_peak[0] = max(store_peak[0], cal.store.nbytes)
        return cal.store.tensors()

    with PeakMemory("cpu", exclude=held) as working:
        run(cal)
    with PeakMemory("cpu") as everything:
        run(cal)
    return working.peak_bytes, store_peak[0], everything.peak_bytes


@pytest.mark.parametrize("loop", ["closed", "open"])
def test_working_memory_is_flat_in_the_number_of_prompts(adapter, loop):
    if loop == "closed":
        def run(cal):
            cached_pass(cal, CalibrationConfig(lam=0.05, batch_size=2), lam=0.05, progress=False)
    else:
        def run(cal):
            error_matrix(cal, CalibrationConfig(lam=0.0, loop="open", batch_size=2), progress=False)
    few = _measure(adapter, 2, run)
    many = _measure(adapter, 6, run)
    assert many[0] <= 1.02 * few[0], f"working set grew with the prompts: {few[0]} -> {many[0]} bytes"
    assert few[0] > 0
    if loop == "closed":  # the closed loop carries every trajectory: that state is in the store
        assert many[1] > 2 * few[1]
        assert many[2] > few[2] + (many[1] - few[1]) // 2  # and it is what grows when nothing is excluded


def test_host_store_on_cpu_keeps_references():
    store = HostStore("cpu")
    t = torch.ones(4)
    store.put("a", t)
    assert store.get("a") is t and store.nbytes == 16
    store.alias("b", "a")
    assert store.nbytes == 16  # one storage, counted once
    store.put("a", None)
    assert store.get("a") is None and store.get("b") is t
    store.clear()
    assert store.nbytes == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned host copies)")
@pytest.mark.gpu
def test_host_store_moves_cuda_tensors_to_pinned_host_memory():
    store = HostStore("cuda")
    t = torch.arange(6.0, device="cuda")
    store.put("a", t)
    held = store.tensors()[0]
    assert held.device.type == "cpu" and held.is_pinned()
    torch.testing.assert_close(store.get("a"), t)
