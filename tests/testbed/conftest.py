import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def _two_threads():
    """The project's CI machines have 2 cores; pin torch to them for stable timings."""
    torch.set_num_threads(2)
