"""The export fixtures live in tests/export/fixtures.py (registered suite-wide by tests/conftest.py)."""

from tests.export.fixtures import GUIDANCE, LATENT, STEPS, TEXT, Tiny, make_profile, pixel_decoder  # noqa: F401
