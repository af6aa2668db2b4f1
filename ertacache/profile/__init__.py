"""Offline calibration: the reuse mask, the adjusted sigma table and the residual correction.

    config       CalibrationConfig: which components, lambda or target speedup
    schedule     reuse masks from an error matrix, lambda bisection for a speedup
    timeadjust   phi per reused step and the adjusted sigma table
    correction   per-channel least squares of the cached-output error
    calibrate    the lockstep passes over calibration prompts that fit all of it
    artifact     the profile folder: profile.json + correction.safetensors + plot
"""

from ertacache.profile.config import CalibrationConfig
from ertacache.profile.artifact import Profile, load_profile

__all__ = ["CalibrationConfig", "Profile", "load_profile"]
