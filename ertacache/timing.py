"""The one timing helper of the package: wall time that is right on a CPU and on a GPU.

Every figure the project reports (export's c, eval's wall-clock table, the runtime's per-step
times, the benches and the GPU check) is measured here, so they all follow the same rules:

* **CUDA work is asynchronous.** ``time.perf_counter()`` around a kernel launch measures the launch
  (microseconds), not the work. On a CUDA device a measurement records a CUDA event before and
  after the call on the current stream and reads ``elapsed_time`` after one synchronisation; the
  device is synchronised once before the first timed call so earlier queued work is not billed to
  it. On the CPU the same calls fall back to ``perf_counter``.
* **These machines are noisy** (shared VMs, 2 cores). Figures are medians after warm-up, and
  comparisons are ratios measured in one run with the contenders *interleaved*
  (:func:`interleaved_medians`), so load drift hits every column alike.

    median_seconds(fn, repeats, device=...)            one callable
    interleaved_medians({"a": f, "b": g}, repeats)     several, A B A B ...
    StepClock(device, n)                               per-step times inside a loop, read after it
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Mapping

import torch

DeviceLike = torch.device | str | None


def _device(device: DeviceLike) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def synchronize(device: DeviceLike) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: DeviceLike = None) -> float:
    """Seconds of one call of ``fn`` including the device work it queued.

    On CUDA: events around the call on the current stream, then one synchronisation. The caller
    synchronises before the first call (:func:`median_seconds` does) so earlier work is not counted.
    """
    device = _device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def interleaved_medians(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        device: DeviceLike = None) -> dict[str, float]:
    """Median seconds of each callable over ``repeats`` rounds of A, B, C, ... after ``warmup`` rounds.

    Interleaving is what makes the ratios of a noisy machine trustworthy: a burst of load from
    another process slows the calls of one round alike instead of one contender's whole series.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2, device: DeviceLike = None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    return interleaved_medians({"fn": fn}, repeats, warmup, device)["fn"]


class StepClock:
    """Per-step wall time of a loop without a host synchronisation inside the loop.

        clock = StepClock(device, steps)
        clock.start()
        for i in ...: run step i; clock.mark(i)
        seconds = clock.read()            # one sync, after the loop

    On CUDA each mark records an event (asynchronous, no allocation); on the CPU a
    ``perf_counter`` stamp. Events are created up front so marking allocates nothing.
    """

    def __init__(self, device: DeviceLike, steps: int):
        self.device = _device(device)
        self.steps = steps
        if self.device.type == "cuda":
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        else:
            self._stamps = [0.0] * (steps + 1)

    def start(self) -> None:
        self.mark(-1)

    def mark(self, step: int) -> None:
        """Record the end of ``step`` (``-1``: the start of the loop)."""
        if self.device.type == "cuda":
            self._events[step + 1].record()
        else:
            self._stamps[step + 1] = time.perf_counter()

    def read(self, steps: int | None = None) -> list[float]:
        """Seconds of each of the first ``steps`` steps (all by default); synchronises once."""
        n = self.steps if steps is None else steps
        if self.device.type == "cuda":
            self._events[n].synchronize()
            return [self._events[i].elapsed_time(self._events[i + 1]) / 1e3 for i in range(n)]
        return [self._stamps[i + 1] - self._stamps[i] for i in range(n)]


def ideal_speedup(steps: int, full_steps: float, c: float) -> float:
    """T / (N_full + N_cached * c): the speedup if nothing but the step costs mattered."""
    return steps / (full_steps + (steps - full_steps) * c)


def machine_info(device: DeviceLike = "cpu") -> dict:
    """What produced a timing: CPU model, core count, OS, torch build, threads, and the GPU if used."""
    device = _device(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
                     "gpu_memory_gib": round(props.total_memory / 2**30, 1)})
    return info
