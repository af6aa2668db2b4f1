"""What an evaluation run compares, as dataclasses that validate themselves."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ertacache.errors import UserError
from ertacache.profile.config import CalibrationConfig

BASELINES: tuple[str, ...] = ("fewer-steps", "uniform", "teacache", "magcache")
#: ERTACache ablation ladder: policy = offline mask only; time = + timestep adjustment;
#: full = + error rectification (the whole method). Each in open- and closed-loop calibration.
ERTA_STAGES: dict[str, tuple[bool, bool]] = {"policy": (False, False), "time": (True, False), "full": (True, True)}
ERTA_METHODS: tuple[str, ...] = tuple(f"erta-{loop}-{stage}" for loop in ("open", "closed") for stage in ERTA_STAGES)
ALL_METHODS: tuple[str, ...] = BASELINES + ERTA_METHODS
METHOD_GROUPS: dict[str, tuple[str, ...]] = {"all": ALL_METHODS, "baselines": BASELINES, "erta": ERTA_METHODS}


def parse_methods(spec: str) -> tuple[str, ...]:
    """'all', 'baselines', 'erta' or a comma list of method names, in the order given, without repeats."""
    out: list[str] = []
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        names = METHOD_GROUPS.get(name, (name,))
        for n in names:
            if n not in ALL_METHODS:
                raise UserError(f"unknown method {n!r}; choose from {', '.join(ALL_METHODS)} or a group "
                                f"({', '.join(METHOD_GROUPS)})")
            if n not in out:
                out.append(n)
    if not out:
        raise UserError("--methods is empty; give e.g. --methods all or --methods uniform,erta-closed-full")
    return tuple(out)


def erta_flags(method: str) -> tuple[str, bool, bool]:
    """'erta-closed-time' -> (loop, time_adjust, rectify)."""
    _, loop, stage = method.split("-")
    time_adjust, rectify = ERTA_STAGES[stage]
    return loop, time_adjust, rectify


def full_step_budget(steps: int, speedup: float) -> int:
    """The equal-compute budget round(T / speedup): the same rule ertacache-profile uses."""
    return CalibrationConfig(speedup=speedup).target_full_steps(steps)


@dataclass
class TeaCacheConfig:
    """TeaCache-style run-time reuse (accumulated, rescaled change of the modulated input).

    poly_degree: degree of the polynomial that maps the modulated input's
        relative L1 change to the model output's (fitted on calibration);
        TeaCache publishes degree 4.
    max_probes: closed-loop sampling runs on the calibration set allowed for
        the threshold search; each costs about one cached sampling of the
        calibration set, more probes land closer to the budget.
    tolerance: stop once the calibration mean full-step count is within this
        many steps of the budget.
    """

    poly_degree: int = 4
    warmup_steps: int = 1
    final_steps: int = 1
    max_probes: int = 6
    tolerance: float = 0.25

    def __post_init__(self):
        if not 1 <= self.poly_degree <= 8:
            raise UserError(f"TeaCache poly_degree must be in 1..8, got {self.poly_degree}")
        if self.warmup_steps < 1 or self.final_steps < 1:
            raise UserError("TeaCache warmup_steps and final_steps must be >= 1 (first and last steps compute)")
        if self.max_probes < 1:
            raise UserError(f"TeaCache max_probes must be >= 1, got {self.max_probes}")
        if self.tolerance < 0:
            raise UserError(f"TeaCache tolerance must be >= 0, got {self.tolerance}")


@dataclass
class MagCacheConfig:
    """MagCache-style static reuse from calibrated residual magnitude ratios.

    retention_ratio: leading fraction of the steps that always computes
        (MagCache publishes 0.2); shrunk when the budget cannot afford it.
    max_skip: K, the most consecutive reused steps. MagCache publishes K = 2,
        which caps the speedup (with a 20 % retention window about 2.1x at 50
        steps), so K is raised to the smallest value that reaches the budget;
        the K used is reported with each row.
    final_steps: trailing steps that compute, as for every other method here.
    """

    retention_ratio: float = 0.2
    max_skip: int = 2
    final_steps: int = 1

    def __post_init__(self):
        if not 0.0 <= self.retention_ratio < 1.0:
            raise UserError(f"MagCache retention_ratio must be in [0, 1), got {self.retention_ratio}")
        if self.max_skip < 1:
            raise UserError(f"MagCache max_skip (K) must be >= 1, got {self.max_skip}")
        if self.final_steps < 1:
            raise UserError("MagCache final_steps must be >= 1: the last step computes")


@dataclass
class EvalConfig:
    """One evaluation: methods x speedups, calibrated on one prompt set, scored on another.

    calibration_prompts / calibration_seed: the calibration set (prompt k uses
        seed calibration_seed + k, as ertacache-profile does).
    held_out_prompts / held_out_seeds: the evaluation set, one sample per pair.
    batch_size: samples per model call during evaluation (memory vs speed;
        results do not depend on it beyond float rounding).
    calibration_batch_size: calibration prompts per model call.
    """

    speedups: tuple[float, ...]
    methods: tuple[str, ...]
    calibration_prompts: list[str]
    held_out_prompts: list[str]
    held_out_seeds: list[int]
    calibration_seed: int = 0
    batch_size: int = 16
    calibration_batch_size: int = 16
    warmup_steps: int = 1
    teacache: TeaCacheConfig = field(default_factory=TeaCacheConfig)
    magcache: MagCacheConfig = field(default_factory=MagCacheConfig)

    def __post_init__(self):
        self.speedups = tuple(float(s) for s in self.speedups)
        if not self.speedups:
            raise UserError("--speedups is empty; give e.g. --speedups 1.5,2,2.5,3")
        for s in self.speedups:
            if not (math.isfinite(s) and s > 1.0):
                raise UserError(f"every speedup must be > 1 (1 means no caching), got {s}")
        self.methods = parse_methods(",".join(self.methods))
        if not self.calibration_prompts:
            raise UserError("no calibration prompts: pass --calibration-prompts FILE")
        if not self.held_out_prompts:
            raise UserError("no held-out prompts: pass --prompts FILE")
        if len(self.held_out_prompts) != len(self.held_out_seeds):
            raise UserError(f"{len(self.held_out_prompts)} held-out prompts but {len(self.held_out_seeds)} seeds; "
                            "give one seed per prompt")
        cal_seeds = set(range(self.calibration_seed, self.calibration_seed + len(self.calibration_prompts)))
        if cal_seeds & set(self.held_out_seeds):
            raise UserError(f"held-out seeds {sorted(cal_seeds & set(self.held_out_seeds))} are calibration seeds; "
                            "evaluate on seeds the calibration did not see (e.g. --seeds 1000-1015)")
        if self.batch_size < 1 or self.calibration_batch_size < 1:
            raise UserError("batch sizes must be >= 1")
        if self.warmup_steps < 1:
            raise UserError("warmup_steps must be >= 1: step 0 has no cache to reuse")

    def to_dict(self) -> dict:
        return asdict(self)
