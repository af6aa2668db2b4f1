"""Bounds on user input shared by the CLIs, the runtime and the Triton model (one definition each).

Plain Python, no torch: the CLIs check these before importing anything heavy.
"""

from __future__ import annotations

from ertacache.errors import UserError, brief

#: the most denoising steps a run or an export folder has (a bound on buffers and on a mistyped 10000000)
MAX_STEPS = 10_000
#: seeds are int64 on the wire and torch generators take < 2**63; sample k of a batch uses seed + k
MAX_SEED = 2**63 - 1
#: the longest prompt (characters); far above any text encoder's token limit
MAX_PROMPT_CHARS = 10_000
#: the most full-step residuals a cached step reads (K; each is a residual buffer of the runtime)
MAX_HISTORY = 4


def check_prompt(prompt: object, flag: str = "--prompt") -> str:
    """A non-empty prompt of at most :data:`MAX_PROMPT_CHARS` characters without NUL characters."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"empty prompt: give a non-empty {flag}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"{flag} is {len(prompt)} characters long; give at most {MAX_PROMPT_CHARS}")
    if "\x00" in prompt:
        raise UserError(f"{flag} {brief(prompt)} contains a NUL character")
    return prompt


def check_seed(seed: object, batch: int = 1, flag: str = "--seed") -> int:
    """0 <= seed and seed + batch - 1 <= 2**63 - 1 (the batch's last sample uses seed + batch - 1)."""
    top = MAX_SEED - (batch - 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= top:
        raise UserError(f"{flag} {brief(seed, 40)} is out of range: give an integer in [0, {top}]"
                        + (f" (sample k of the batch of {batch} uses seed + k)" if batch > 1 else ""))
    return seed
