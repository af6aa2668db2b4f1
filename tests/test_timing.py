"""ertacache.timing: the one clock every benchmark, export and runtime figure goes through."""

from __future__ import annotations

import time

import pytest
import torch

from ertacache.timing import StepClock, ideal_speedup, interleaved_medians, median_seconds, time_call

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA event timing)")


def test_interleaved_order_and_warmup():
    calls = []
    med = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5  # two warm-up rounds, then A B A B A B: load drift hits both alike
    assert set(med) == {"a", "b"} and all(v >= 0 for v in med.values())


def test_median_is_of_the_timed_calls_only():
    delays = iter([0.05, 0.05, 0.0, 0.02, 0.02])  # two slow warm-ups must not count

    def fn():
        time.sleep(next(delays))

    got = median_seconds(fn, repeats=3, warmup=2)
    assert 0.02 <= got < 0.05  # sleep sleeps at least as long as asked; the median is the 0.02 call


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats"):
        interleaved_medians({"a": lambda: None}, repeats=0)


def test_step_clock_cpu_reads_each_step():
    clock = StepClock("cpu", 3)
    clock.start()
    for i, d in enumerate((0.0, 0.02, 0.0)):
        time.sleep(d)
        clock.mark(i)
    got = clock.read()
    assert len(got) == 3 and got[1] >= 0.02 and all(s >= 0 for s in got)
    assert clock.read(2) == got[:2]


def test_ideal_speedup():
    assert ideal_speedup(50, 25, 0.0) == 2.0 and ideal_speedup(50, 25, 1.0) == 1.0
    assert ideal_speedup(50, 25, 0.1) == pytest.approx(50 / 27.5)


@needs_cuda
@pytest.mark.gpu
def test_cuda_time_includes_the_device_work():
    """A launch returns at once; the helper must bill the kernel's run time (CUDA events + sync)."""
    dev = torch.device("cuda")
    torch.cuda._sleep(1000)  # initialise the context outside the timed call
    torch.cuda.synchronize(dev)
    cycles = int(torch.cuda.get_device_properties(dev).clock_rate * 1e3 * 0.05)  # ~50 ms of spinning
    start = time.perf_counter()
    torch.cuda._sleep(cycles)
    launch_s = time.perf_counter() - start
    got = time_call(lambda: torch.cuda._sleep(cycles), dev)
    assert got > 10 * launch_s and got > 0.01


@needs_cuda
@pytest.mark.gpu
def test_step_clock_cuda_marks_do_not_sync():
    dev = torch.device("cuda")
    cycles = int(torch.cuda.get_device_properties(dev).clock_rate * 1e3 * 0.02)
    clock = StepClock(dev, 2)
    torch.cuda.synchronize(dev)
    clock.start()
    for i in range(2):
        torch.cuda._sleep(cycles)
        clock.mark(i)
    got = clock.read()
    assert len(got) == 2 and all(s > 0.005 for s in got)
