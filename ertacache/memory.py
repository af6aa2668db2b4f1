"""Peak tensor memory of a block of work, on a GPU and on the CPU alike.

    with PeakMemory(device) as mem:
        calibrate(...)
    mem.peak_bytes      # the most tensor bytes live at once, above what was live at entry

On CUDA this is the caching allocator's own account (``max_memory_allocated`` after
``reset_peak_memory_stats``). The CPU allocator keeps no such account, so on the CPU a
``TorchDispatchMode`` watches every op's outputs and counts each storage from its creation until
its last tensor is freed. That is what lets a CPU test show a property the GPU figure depends
on (e.g. that calibration's device memory does not grow with the number of prompts).

``exclude`` names tensors not to bill to the block: on the CPU, where a calibration "host store"
and the compute device are the same memory, the store's tensors (what is *meant* to grow with
the prompts) are subtracted from the live bytes each time the peak is updated.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveStorages(TorchDispatchMode):
    """Bytes of the storages created by ops under this mode and still referenced by a tensor."""

    def __init__(self, exclude: Callable[[], Iterable[torch.Tensor]] | None = None):
        super().__init__()
        self.exclude = exclude
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage data_ptr -> [tensors alive, nbytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or in-place result of a tensor made before the block is memory the block did not add
        pre_existing = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t, pre_existing)
        return out

    def _track(self, t: torch.Tensor, pre_existing: set[int]) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        entry = self._refs.get(key)
        if entry is None:
            if key in pre_existing:
                return
            entry = self._refs[key] = [0, nbytes]
            self.live += nbytes
        entry[0] += 1
        weakref.finalize(t, self._release, key)
        self._update_peak()

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._refs[key]
            self.live -= entry[1]

    def _update_peak(self) -> None:
        live = self.live
        if self.exclude is not None:
            held = {t.untyped_storage().data_ptr() for t in self.exclude()}
            live -= sum(self._refs[k][1] for k in held if k in self._refs)
        self.peak = max(self.peak, live)


class PeakMemory:
    """Context manager: ``peak_bytes`` of tensor memory on ``device`` while the block ran."""

    def __init__(self, device: torch.device | str = "cpu",
                 exclude: Callable[[], Iterable[torch.Tensor]] | None = None):
        self.device = torch.device(device)
        self.exclude = exclude
        self.peak_bytes = 0
        self._mode: _LiveStorages | None = None
        self._base = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _LiveStorages(self.exclude)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
