"""ERTACache: error-aware feature caching for diffusion transformers.

The data flow reads off the subpackages:

    models    adapters (pre / blocks / head split) and model loading, as data
    sampling  flow-matching Euler with CFG, the full and cached step modules
    profile   offline calibration: reuse mask, adjusted sigmas, residual correction
    cli       thin command-line wiring over the above
"""

__version__ = "0.1.0"

from ertacache.errors import ErtaCacheError, UserError  # noqa: F401
