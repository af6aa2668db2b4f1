"""Replay a bound call from a captured CUDA graph: one launch per step, no allocation, no host sync.

Used by the TensorRT and torch.compile backends on CUDA. The call must read and
write only tensors that live as long as the graph (the runtime's buffers), which
is what :meth:`ertacache.engines.base.Engine.bind` guarantees.
"""

from __future__ import annotations

import torch

from ertacache.engines.base import BoundCall


class CudaGraphCall:
    """Capture ``call`` once (after ``warmup`` eager runs on a side stream); calling replays it.

    ``pool`` is a ``torch.cuda.graph_pool_handle()`` shared by every graph of one runtime: the
    full-step and cached-step graphs never run at once, so their temporaries can share memory.
    """

    def __init__(self, call: BoundCall, device: torch.device, warmup: int = 2, pool=None):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            # warm-up on a side stream: lazy initialisation (cuBLAS handles, TensorRT's first enqueue,
            # Triton autotuning) must happen before capture, where it is illegal
            for _ in range(warmup):
                call()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            call()

    def __call__(self) -> None:
        self.graph.replay()
