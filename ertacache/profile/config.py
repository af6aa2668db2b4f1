"""Calibration settings as a dataclass that validates itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from ertacache.errors import UserError
from ertacache.profile.predictor import PredictorConfig
from ertacache.profile.schedule import SCHEDULE_WEIGHTS

Loop = Literal["open", "closed"]
PhiRule = Literal["auto", "paper", "lsq"]
ScheduleWeight = Literal["auto", "none", "dt", "dt-late"]


@dataclass
class CalibrationConfig:
    """How to fit a profile. Exactly one of ``lam`` and ``speedup`` is set.

    lam: the reuse threshold lambda on the mean relative L1 residual error
        (DESIGN.md 1a). Larger reuses more; 0 reuses nothing.
    speedup: a target T / N_full; lambda is then solved by bisection so the
        mask has about ``round(T / speedup)`` full steps.
    loop: "closed" measures the errors along the cached trajectory itself
        (accurate, one calibration pass per bisection probe); "open" compares
        residuals of the uncached trajectory pairwise (cheap: one pass, then
        any lambda is free), then fits phi and the correction along the mask.
    warmup_steps: leading steps that always compute (>= 1: step 0 has no cache). None: 1. A cached
        step before K full steps predicts from the slots filled so far (a lower order), so the
        schedule rule, not the predictor's K, decides the early steps (docs/predictor.md:
        +2.3 dB mean PSNR at 3x over warming up with K full steps).
    final_steps: trailing steps that always compute (>= 1: the last step
        lands the trajectory at sigma 0 with the true velocity).
    time_adjust: component (b), the trajectory-aware sigma table.
    rectify: component (c), the per-channel least-squares correction.
    predictor: what the cached step predicts the residual with (:mod:`ertacache.profile.predictor`).
    phi_rule: "paper": phi = 1 - |v^ - v| / |v_i - v_(i-1)| (the paper's eq.); "lsq": the scale
        of the used update that best matches the true one in least squares,
        <g_used, g_true> / <g_used, g_used> over every calibration element; "auto": the paper's with
        the reuse predictor (the paper's method), lsq with any other.
    phi_min, phi_max: clip of phi; keeps one bad estimate from stalling or racing the clock.
        phi_max None: 1 for the paper's rule (it only shrinks a step), 1.5 for lsq.
    phi_eps: relative guard on phi's denominator: where the step-to-step
        velocity change is below ``phi_eps * mean|v|`` the ratio carries no
        information and phi is left at 1 instead of being driven to phi_min.
    batch_size: calibration prompts per model call (memory vs speed).
    schedule_weight: what the mask rule compares with lambda: the calibration error as it is
        ("none", the paper's rule), or times the step's length over the mean length ("dt"), or
        times that length where it is above the mean ("dt-late": only long late steps weigh more)
        (:func:`ertacache.profile.schedule.step_weights`); "auto": the paper's with the reuse
        predictor (the paper's method), dt-late with any other (measured on 80 held-out samples in
        docs/predictor.md: +1.2 dB mean PSNR at 2x, +0.7 dB at 3x over "none").
    """

    lam: float | None = None
    speedup: float | None = None
    loop: Loop = "closed"
    warmup_steps: int | None = None
    final_steps: int = 1
    time_adjust: bool = True
    rectify: bool = True
    predictor: PredictorConfig = field(default_factory=lambda: PredictorConfig(kind="reuse", order=0))
    phi_rule: PhiRule = "auto"
    phi_min: float = 0.5
    phi_max: float | None = None
    phi_eps: float = 1e-3
    batch_size: int = 8
    schedule_weight: ScheduleWeight = "auto"

    def __post_init__(self):
        if (self.lam is None) == (self.speedup is None):
            raise UserError("give exactly one of --lambda and --speedup (e.g. --speedup 2.0)")
        if self.lam is not None and not self.lam >= 0:
            raise UserError(f"--lambda must be >= 0 (0 disables reuse), got {self.lam}")
        if self.speedup is not None and not self.speedup >= 1.0:
            raise UserError(f"--speedup must be >= 1.0 (1.0 means no caching), got {self.speedup}")
        if self.loop not in ("open", "closed"):
            raise UserError(f"loop must be 'open' or 'closed', got {self.loop!r}")
        if isinstance(self.predictor, dict):  # from a profile's JSON
            self.predictor = PredictorConfig(**self.predictor)
        if self.warmup_steps is None:
            self.warmup_steps = 1
        if self.warmup_steps < 1 or self.final_steps < 1:
            raise UserError("warmup_steps and final_steps must be >= 1: the first and last steps always compute")
        if self.schedule_weight == "auto":
            self.schedule_weight = "none" if self.predictor.kind == "reuse" else "dt-late"
        if self.schedule_weight not in SCHEDULE_WEIGHTS:
            raise UserError(f"--schedule-weight must be one of {', '.join(SCHEDULE_WEIGHTS)}, "
                            f"got {self.schedule_weight!r}")
        if self.phi_rule not in ("auto", "paper", "lsq"):
            raise UserError(f"phi rule must be 'auto', 'paper' or 'lsq', got {self.phi_rule!r}")
        if self.phi_rule == "auto":
            self.phi_rule = "paper" if self.predictor.kind == "reuse" else "lsq"
        if self.phi_max is None:
            self.phi_max = 1.5 if self.phi_rule == "lsq" else 1.0
        if not 0.0 < self.phi_min <= 1.0 <= self.phi_max <= 1.5:
            raise UserError(f"phi bounds must satisfy 0 < phi_min <= 1 <= phi_max <= 1.5, got "
                            f"[{self.phi_min}, {self.phi_max}]")
        if self.phi_eps <= 0:
            raise UserError(f"phi_eps must be > 0, got {self.phi_eps}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")

    def max_speedup(self, steps: int) -> float:
        """The largest speedup a mask can reach: only the forced steps compute."""
        return steps / min(steps, self.warmup_steps + self.final_steps)

    def target_full_steps(self, steps: int) -> int:
        """Full-step budget for the requested speedup on ``steps`` steps."""
        if self.speedup is None:
            raise ValueError("no target speedup set")
        limit = self.max_speedup(steps)
        forced = min(steps, self.warmup_steps + self.final_steps)
        if round(steps / self.speedup) < forced:  # the budget cannot hold the steps that always compute
            raise UserError(
                f"--speedup {self.speedup} is above what {steps} steps allow ({limit:.2f}: the first "
                f"{self.warmup_steps} and last {self.final_steps} steps always compute"
                + (f", the first {self.predictor.history} because the order-{self.predictor.order} predictor reads "
                   f"{self.predictor.history} full residuals" if self.predictor.history > 1 else "")
                + "); lower it or add steps" + (", or lower --predictor-order" if self.predictor.history > 1 else "")
            )
        return max(self.warmup_steps + self.final_steps, round(steps / self.speedup))

    def to_dict(self) -> dict:
        return asdict(self)
