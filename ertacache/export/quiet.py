"""Filter three known messages of the exporters, by message and at their source, for the length of an export.

Each is harmless for this project and would otherwise print on every export, where users learn to skip
warnings (and then miss the ones that matter). Nothing else is filtered: other warnings and log records
of the same modules still show.

1. ``torch.onnx``'s op registry logs "torchvision is not installed. Skipping torchvision::<op>" once per
   torchvision op when it builds its table (logger ``torch.onnx._internal.exporter._registration``); the
   step graphs use no torchvision op, so the project does not depend on torchvision.
2. ``torch.utils._pytree`` deprecates ``LeafSpec`` with a ``FutureWarning`` raised whenever one is built,
   which torch's own code does when it copies an ``ExportedProgram`` (ONNX export, AOTInductor); the
   message is addressed to torch's code, not to ours.
3. onnxscript's constant folding (``ONNXProgram.optimize``) logs "Skipping constant folding for op
   Split with multiple outputs." for each constant Split it leaves as it is: the graph stays
   correct (ONNX Runtime and TensorRT run Split), the export only folds a little less.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

ONNX_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
TORCHVISION_SKIPPED = "torchvision is not installed. Skipping "
LEAFSPEC_DEPRECATED = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
ONNXSCRIPT_FOLDING_LOGGER = "onnxscript.optimizer._constant_folding"
FOLDING_SKIPPED = "Skipping constant folding for op "


class _DropPrefix(logging.Filter):
    """Drop the records whose formatted message starts with ``prefix``; pass every other record."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def known_exporter_messages_filtered() -> Iterator[None]:
    """Within the block, drop the three messages of the module docstring (and only those)."""
    drops = [(logging.getLogger(ONNX_REGISTRY_LOGGER), _DropPrefix(TORCHVISION_SKIPPED)),
             (logging.getLogger(ONNXSCRIPT_FOLDING_LOGGER), _DropPrefix(FOLDING_SKIPPED))]
    for logger, drop in drops:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LEAFSPEC_DEPRECATED, category=FutureWarning)
            yield
    finally:
        for logger, drop in drops:
            logger.removeFilter(drop)
