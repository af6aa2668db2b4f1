"""Measure what a loop allocates per step after warm-up: Python objects, torch tensors, the C heap.

Three views, because the backends allocate in different places:

- ``python``: bytes and blocks of Python objects (``tracemalloc``): net growth and the transient
  peak during the measured steps;
- ``torch``: every allocation through torch's CPU allocator (``torch.profiler`` with
  ``profile_memory``; on CUDA, the caching allocator's ``allocation.all.allocated`` counter), e.g.
  the fresh outputs of an AOTInductor or torch.compile call;
- ``heap``: net growth of the C heap (glibc ``mallinfo2``), where ONNX Runtime's arena lives.

Per-step figures are differences between a short and a long run divided by the extra steps, so
fixed costs (profiler start, the first call) cancel. The Python figure is the smallest of a few
such differences: a leak grows the same in every trial, while a one-off growth that happens to
fall inside one long run (a dict or free-list resize, an interned string) is not per-step
growth and would otherwise show as a few bytes per step in that one trial.
"""

from __future__ import annotations

import ctypes
import gc
import tracemalloc
from dataclasses import asdict, dataclass
from typing import Callable

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_bytes() -> int | None:
    """Bytes in use on the C heap (glibc only; None elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return None
    return int(info.uordblks + info.hblkhd)


@dataclass
class AllocationReport:
    steps: int  # extra steps the per-step figures are averaged over
    python_bytes_per_step: float  # net growth of Python objects
    python_peak_bytes: int  # transient peak above the start during the long run
    torch_bytes_per_step: float  # bytes handed out by torch's allocator
    torch_allocs_per_step: float
    heap_bytes_per_step: float | None  # net C-heap growth (ONNX Runtime's arena, malloc)

    def to_json(self) -> dict:
        return asdict(self)


def _torch_allocations(run: Callable[[], None], device: torch.device) -> tuple[int, int]:
    """(bytes, count) torch allocated while ``run`` ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        after = torch.cuda.memory_stats(device)
        return (after["allocated_bytes.all.allocated"] - before["allocated_bytes.all.allocated"],
                after["allocation.all.allocated"] - before["allocation.all.allocated"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    return sum(sizes), len(sizes)


def measure_allocations(run_steps: Callable[[int], None], device: torch.device | str = "cpu", short: int = 2,
                        long: int = 8, python_trials: int = 3) -> AllocationReport:
    """Allocation per step of ``run_steps(n)`` (runs n steps of the loop), after one warm-up call.

    ``python_trials`` short/long pairs measure Python growth; the report keeps the smallest
    (see the module docstring) and the largest transient peak.
    """
    if python_trials < 1:
        raise ValueError(f"python_trials must be >= 1, got {python_trials}")
    device = torch.device(device)
    run_steps(long)  # warm-up: arenas, lazy initialisation, caches
    extra = long - short

    def python(n):
        gc.collect()
        tracemalloc.start()
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        run_steps(n)
        end, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return end - start, peak - start

    py_growth, py_peak = None, 0
    for _ in range(python_trials):
        py_short, _ = python(short)
        py_long, peak = python(long)
        growth = (py_long - py_short) / extra
        py_growth = growth if py_growth is None or abs(growth) < abs(py_growth) else py_growth
        py_peak = max(py_peak, peak)
    t_short = _torch_allocations(lambda: run_steps(short), device)
    t_long = _torch_allocations(lambda: run_steps(long), device)
    h0 = _heap_bytes()
    run_steps(short)
    h1 = _heap_bytes()
    run_steps(long)
    h2 = _heap_bytes()
    heap = None if h0 is None else ((h2 - h1) - (h1 - h0)) / extra
    return AllocationReport(extra, py_growth, py_peak, (t_long[0] - t_short[0]) / extra,
                            (t_long[1] - t_short[1]) / extra, heap)
