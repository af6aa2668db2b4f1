"""measure_allocations: a per-step leak shows in every trial, a one-off growth in at most one."""

import torch

from ertacache.runtime import measure_allocations


def test_a_python_leak_per_step_is_reported():
    """A 4 KiB leak per step reads as more than half of it (a 200-byte leak once read as 199 bytes: other
    objects freed inside a measured window shift the estimate by tens of bytes, so the leak is large)."""
    kept = []
    report = measure_allocations(lambda n: kept.extend(bytearray(4096) for _ in range(n)), short=2, long=10)
    assert report.python_bytes_per_step > 2048


def _grows_once():
    calls, cache = [], {}

    def run(n):
        calls.append(n)
        if len(calls) == 3:  # warm-up, short, then the first long run: grow once, inside a measured window
            cache["once"] = [bytearray(4000)]
    return run


def test_a_one_off_growth_is_not_a_per_step_leak():
    """A cache that grows once, during the first measured long run, adds nothing per step."""
    assert measure_allocations(_grows_once(), short=2, long=10, python_trials=1).python_bytes_per_step > 400
    report = measure_allocations(_grows_once(), short=2, long=10)
    assert abs(report.python_bytes_per_step) < 16, report


def test_torch_allocations_per_step_are_counted():
    kept = []
    report = measure_allocations(lambda n: kept.extend(torch.empty(1024) for _ in range(n)), short=2, long=6)
    assert report.torch_allocs_per_step >= 1 and report.torch_bytes_per_step >= 4096
