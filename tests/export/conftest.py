"""The export fixtures live in tests/export/fixtures.py (registered suite-wide by tests/conftest.py)."""

from tests.export.fixtures import (GUIDANCE, K3_MASK, LATENT, STEPS, TEXT, Tiny, TinyK3, k3_profile,  # noqa: F401
                                  make_profile, pixel_decoder)
