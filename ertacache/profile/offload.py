"""Where calibration keeps each prompt's trajectory state: off the compute device.

Closed-loop calibration advances every calibration trajectory in lockstep (each decision at
step i is a mean over all prompts), so per prompt it must carry state from one step to the next:
the latents, the cached residual of the last full step, the previous step's residual and
velocity. The residual is the large one, (nb, N, D) per prompt: about 200 MB in bf16 for
Wan2.1-1.3B at 480p x 81 frames (N = 32,760 tokens, D = 1536), 670 MB for the 14B (D = 5120).
Kept on the GPU for 20 prompts, three of those per prompt are 12 GB (1.3B) and 40 GB (14B)
before the model runs at all.

:class:`HostStore` keeps all of it in host memory (pinned on CUDA, so the copies are
asynchronous and overlap the next micro-batch's compute) and hands one micro-batch at a time
back to the device. Device memory is then the model, one micro-batch's working set and O(1)
per-step statistics, whatever the number of prompts or steps; host memory holds
``prompts x (3 residuals + a few latents)``. On the CPU the "host" is the device itself and the
store only holds references (no copies), which keeps the CPU path exactly as fast as before.
"""

from __future__ import annotations

from typing import Hashable

import torch


class HostStore:
    """Named tensors parked in host memory between uses on ``device``.

        store = HostStore(device)
        store.put((k, "residual"), r)        # device -> host (asynchronous on CUDA)
        r = store.get((k, "residual"))       # host -> device, or None when absent
        store.nbytes                          # host bytes held (what scales with the prompts)

    A key's old tensor is released when it is overwritten, so a trajectory holds one copy of each
    named state. The stream order keeps asynchronous copies correct: a device->host copy and the
    later host->device copy of the same tensor are queued on the same stream.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.host = torch.device("cpu")
        self.pin = self.device.type == "cuda"
        self._held: dict[Hashable, torch.Tensor] = {}

    def put(self, key: Hashable, t: torch.Tensor | None) -> None:
        if t is None:
            self._held.pop(key, None)
            return
        if t.device == self.host:
            self._held[key] = t  # the CPU path: a reference, no copy
            return
        host = torch.empty(t.shape, dtype=t.dtype, device=self.host, pin_memory=self.pin)
        host.copy_(t, non_blocking=self.pin)
        self._held[key] = host

    def get(self, key: Hashable) -> torch.Tensor | None:
        t = self._held.get(key)
        return None if t is None else t.to(self.device, non_blocking=self.pin)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` holds a tensor (without copying it to the device as :meth:`get` would)."""
        return key in self._held

    def alias(self, dst: Hashable, src: Hashable) -> None:
        """Make ``dst`` name the same host tensor as ``src`` (no copy)."""
        self._held[dst] = self._held[src]

    def tensors(self) -> list[torch.Tensor]:
        """The host tensors held (for memory accounting)."""
        return list(self._held.values())

    def clear(self) -> None:
        self._held.clear()

    @property
    def nbytes(self) -> int:
        """Host bytes held, each storage counted once."""
        seen: dict[int, int] = {}
        for t in self._held.values():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())
