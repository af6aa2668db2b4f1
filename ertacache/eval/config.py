"""What an evaluation run compares, as dataclasses that validate themselves."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ertacache.errors import UserError
from ertacache.profile.config import CalibrationConfig

#: hand-written baselines, kept only where no library has the method (MagCache is diffusers' now)
BASELINES: tuple[str, ...] = ("fewer-steps", "uniform", "teacache")
#: ERTACache ablation ladder: policy = offline mask only; time = + timestep adjustment;
#: full = + error rectification (the whole method). Each in open- and closed-loop calibration.
ERTA_STAGES: dict[str, tuple[bool, bool]] = {"policy": (False, False), "time": (True, False), "full": (True, True)}
ERTA_METHODS: tuple[str, ...] = tuple(f"erta-{loop}-{stage}" for loop in ("open", "closed") for stage in ERTA_STAGES)
#: the residual predictor of the cached step (ertacache.profile.predictor): code -> (kind, order). The
#: plain "erta-..." names are the paper's reuse; "erta-t2-..." a Taylor (Lagrange) order-2 prediction
#: from the last 3 full residuals; "erta-f2-..." the ridge fit shrunk toward it.
PREDICTOR_CODES: dict[str, tuple[str, int]] = {"t1": ("taylor", 1), "t2": ("taylor", 2), "t3": ("taylor", 3),
                                               "a2": ("adaptive", 2), "f1": ("fitted", 1), "f2": ("fitted", 2)}
PREDICTOR_METHODS: tuple[str, ...] = tuple(f"erta-{code}-{loop}-{stage}" for code in PREDICTOR_CODES
                                           for loop in ("open", "closed") for stage in ERTA_STAGES)
BUILTIN_METHODS: tuple[str, ...] = BASELINES + ERTA_METHODS + PREDICTOR_METHODS
#: real peer libraries (ertacache.eval.peers): method -> (the module it imports, what it runs)
PEERS: dict[str, tuple[str, str]] = {
    "diffusers-taylorseer-o1": ("diffusers", "TaylorSeer o1"),
    "diffusers-taylorseer-o2": ("diffusers", "TaylorSeer o2"),
    "diffusers-taylorseer-lite": ("diffusers", "TaylorSeer lite o1"),
    "diffusers-fbcache": ("diffusers", "FirstBlockCache"),
    "diffusers-magcache": ("diffusers", "MagCache"),
    "cachedit-dbcache": ("cache_dit", "DBCache F1B0"),
    "cachedit-dbcache-taylorseer": ("cache_dit", "DBCache F1B0 + TaylorSeer o1"),
}
PEER_METHODS: tuple[str, ...] = tuple(PEERS)
ALL_METHODS: tuple[str, ...] = BUILTIN_METHODS + PEER_METHODS
METHOD_GROUPS: dict[str, tuple[str, ...]] = {"all": ALL_METHODS, "builtin": BUILTIN_METHODS, "baselines": BASELINES,
                                             "erta": ERTA_METHODS, "predictors": PREDICTOR_METHODS,
                                             "peers": PEER_METHODS}
#: what implements each built-in method, for the tables (peers are labelled with their library's version)
BUILTIN_LABELS: dict[str, str] = {
    "fewer-steps": "ertacache (hand-written) fewer-step Euler",
    "uniform": "ertacache (hand-written) uniform reuse, FORA-style",
    "teacache": "ertacache (hand-written) TeaCache-style",
    **{m: f"ertacache ERTACache {m.split('-')[1]}-loop {m.split('-')[2]}" for m in ERTA_METHODS},
    **{m: f"ertacache ERTACache {m.split('-')[2]}-loop {m.split('-')[3]}, {PREDICTOR_CODES[m.split('-')[1]][0]} "
          f"order-{PREDICTOR_CODES[m.split('-')[1]][1]} predictor" for m in PREDICTOR_METHODS},
}


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
    """'erta-closed-time' or 'erta-t2-closed-time' -> (loop, time_adjust, rectify)."""
    loop, stage = method.split("-")[-2:]
    time_adjust, rectify = ERTA_STAGES[stage]
    return loop, time_adjust, rectify


def erta_predictor(method: str) -> tuple[str, int]:
    """'erta-t2-open-full' -> ("taylor", 2); the plain 'erta-...' names -> ("reuse", 0)."""
    parts = method.split("-")
    return PREDICTOR_CODES[parts[1]] if len(parts) == 4 else ("reuse", 0)


def method_label(method: str) -> str:
    """What implements ``method``: 'diffusers 0.42.1 TaylorSeer o1', 'ertacache (hand-written) TeaCache-style'."""
    if method in PEERS:
        from ertacache.eval.peers import peer_label

        return peer_label(method)
    return BUILTIN_LABELS.get(method, method)


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
class PeerConfig:
    """How the real peers (ertacache.eval.peers) are tuned to the full-step budget.

    max_probes: closed-loop runs over the calibration prompts allowed for a
        dynamic peer's threshold search (FirstBlockCache, DBCache).
    tolerance: stop once a dynamic peer's calibration mean is this close to the budget.
    tune_prompts: calibration prompts that rank TaylorSeer's schedules when
        several hit the budget exactly (latent error against uncached).
    taylorseer_candidates: exact-budget TaylorSeer schedules compared per
        cool-down setting (shortest cache intervals first).
    magcache_retention / magcache_max_skip: the library defaults (0.2 and K = 3);
        the window is halved when the budget cannot afford it and K raised only
        as far as the budget needs.
    """

    max_probes: int = 8
    tolerance: float = 0.25
    tune_prompts: int = 4
    taylorseer_candidates: int = 3
    magcache_retention: float = 0.2
    magcache_max_skip: int = 3

    def __post_init__(self):
        if self.max_probes < 2:
            raise UserError(f"peer max_probes must be >= 2 (one to bracket, one to refine), got {self.max_probes}")
        if self.tolerance < 0:
            raise UserError(f"peer tolerance must be >= 0, got {self.tolerance}")
        if self.tune_prompts < 1 or self.taylorseer_candidates < 1:
            raise UserError("peer tune_prompts and taylorseer_candidates must be >= 1")
        if not 0.0 <= self.magcache_retention < 1.0:
            raise UserError(f"MagCache retention ratio must be in [0, 1), got {self.magcache_retention}")
        if self.magcache_max_skip < 1:
            raise UserError(f"MagCache max_skip_steps must be >= 1, got {self.magcache_max_skip}")


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
    curvature: float = 1.0  # PredictorConfig.curvature of every predictor method (the CLI's default: the recipe's)
    phi_rule: str = "auto"  # "auto": the paper's for the reuse methods, least squares for the predictors
    schedule_weight: str = "auto"  # CalibrationConfig.schedule_weight of every ERTACache method ("auto": per predictor)
    teacache: TeaCacheConfig = field(default_factory=TeaCacheConfig)
    peers: PeerConfig = field(default_factory=PeerConfig)

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
        if not 0.0 <= self.curvature <= 1.0:
            raise UserError(f"--predictor-curvature must be in [0, 1] (1 = the exact polynomial), got {self.curvature}")
        if any(m in PEERS for m in self.methods):
            from ertacache.eval.peers import require_peers

            require_peers(self.methods)  # a missing extra is refused here, before any compute

    def to_dict(self) -> dict:
        return asdict(self)
