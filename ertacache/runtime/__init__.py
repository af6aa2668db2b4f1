"""The lightweight alternating runtime over an export folder (see docs/engines.md).

    Runtime           open a folder with one backend; sample(noise, text_embeds) -> latents; decode()
    RuntimeState      the buffers, allocated once
    open_folder       every check of a folder against this machine
    measure_allocations   what a loop allocates per step
"""

from ertacache.runtime.alloc import AllocationReport, measure_allocations
from ertacache.runtime.checks import check_inputs, open_folder
from ertacache.runtime.runtime import Runtime, RuntimeState, StepTimes, make_engine

__all__ = ["Runtime", "RuntimeState", "StepTimes", "make_engine", "open_folder", "check_inputs",
           "AllocationReport", "measure_allocations"]
