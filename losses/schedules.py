"""Loss-weight schedules: w_hard(t) and w_soft(t) over a run.

A schedule is a small frozen dataclass; calling it as `sched(step, total_steps)` gives a float.
Steps are 0-based: `step = 0` gives `start` (after any warmup) and the last step,
`step = total_steps - 1`, gives `end` (or `end_step`, when set, after which it holds `end`).
Going hard -> soft or soft -> hard is only a matter of swapping `start` and `end`.

Warmup (`warmup_steps` > 0) runs before the transition begins:
  "hold": stay at `start` during warmup;
  "ramp": rise linearly from 0 to `start` (step 0 gives 0, step `warmup_steps` gives `start`).

Config form (e.g. YAML): `{"kind": "cosine", "start": 0.9, "end": 0.1, "warmup_steps": 0}`;
see `build_schedule` and `WeightSchedule.from_config`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Union

WARMUPS = ("hold", "ramp")


def _check_weight(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_warmup(warmup_steps: int, warmup: str) -> None:
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if warmup not in WARMUPS:
        raise ValueError(f"warmup must be one of {WARMUPS}, got {warmup!r}")


def _check_step(step: int, total_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def _warmup_value(start: float, step: int, warmup_steps: int, warmup: str) -> float:
    return start if warmup == "hold" else start * step / warmup_steps


@dataclass(frozen=True)
class ConstantSchedule:
    """The same value every step (after an optional warmup)."""

    value: float
    warmup_steps: int = 0
    warmup: str = "hold"

    def __post_init__(self) -> None:
        _check_weight("value", self.value)
        _check_warmup(self.warmup_steps, self.warmup)

    @property
    def max_value(self) -> float:
        return float(self.value)

    def __call__(self, step: int, total_steps: int) -> float:
        _check_step(step, total_steps)
        if step < self.warmup_steps:
            return _warmup_value(self.value, step, self.warmup_steps, self.warmup)
        return float(self.value)


@dataclass(frozen=True)
class _Transition(ABC):
    """Shared part of the schedules that move from `start` to `end`.

    The transition spans [warmup_steps, last] with last = end_step or total_steps - 1;
    `_shape(p)` maps progress p in [0, 1] to the fraction of the way from start to end.
    """

    start: float
    end: float
    warmup_steps: int = 0
    warmup: str = "hold"
    end_step: int | None = None

    def __post_init__(self) -> None:
        _check_weight("start", self.start)
        _check_weight("end", self.end)
        _check_warmup(self.warmup_steps, self.warmup)
        if self.end_step is not None and (
            not isinstance(self.end_step, int) or self.end_step <= self.warmup_steps
        ):
            raise ValueError(
                f"end_step ({self.end_step!r}) must be an integer after warmup_steps "
                f"({self.warmup_steps})"
            )

    @property
    def max_value(self) -> float:
        return float(max(self.start, self.end))

    @abstractmethod
    def _shape(self, p: float) -> float:
        """Fraction of the way from start to end at progress p in [0, 1]; 0 -> 0, 1 -> 1."""

    def __call__(self, step: int, total_steps: int) -> float:
        _check_step(step, total_steps)
        if step < self.warmup_steps:
            return _warmup_value(self.start, step, self.warmup_steps, self.warmup)
        last = self.end_step if self.end_step is not None else total_steps - 1
        span = last - self.warmup_steps
        p = 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)
        return float(self.start + (self.end - self.start) * self._shape(p))


@dataclass(frozen=True)
class LinearSchedule(_Transition):
    """Straight line from `start` to `end`."""

    def _shape(self, p: float) -> float:
        return p


@dataclass(frozen=True)
class CosineSchedule(_Transition):
    """Half-cosine from `start` to `end`: flat at both ends, steepest in the middle."""

    def _shape(self, p: float) -> float:
        return 0.5 * (1.0 - math.cos(math.pi * p))


@dataclass(frozen=True)
class StepSchedule(_Transition):
    """Piecewise constant: len(boundaries) + 1 evenly spaced levels from `start` to `end`.

    boundaries: strictly increasing fractions of the transition, each in (0, 1); the value
    jumps one level at each.  E.g. start=1, end=0, boundaries=(0.25, 0.5, 0.75) gives
    1, 2/3, 1/3, 0 over four quarters (and exactly `end` at the last step).
    """

    boundaries: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        super().__post_init__()
        b = tuple(self.boundaries)
        if not b or any(not 0.0 < x < 1.0 for x in b) or any(x >= y for x, y in zip(b, b[1:])):
            raise ValueError(
                f"boundaries must be a non-empty, strictly increasing list of fractions in "
                f"(0, 1), got {self.boundaries!r}"
            )
        object.__setattr__(self, "boundaries", b)

    def _shape(self, p: float) -> float:
        if p >= 1.0:
            return 1.0
        return sum(p >= x for x in self.boundaries) / len(self.boundaries)


Schedule = Union[ConstantSchedule, LinearSchedule, CosineSchedule, StepSchedule]

SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": ConstantSchedule,
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "step": StepSchedule,
}


def build_schedule(cfg: dict[str, Any] | float) -> Schedule:
    """A schedule from its config dict (`{"kind": ..., **fields}`); a bare number is constant."""
    if isinstance(cfg, (int, float)):
        return ConstantSchedule(float(cfg))
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise ValueError(f"a schedule config needs a 'kind' key, got {cfg!r}")
    fields = dict(cfg)
    kind = fields.pop("kind")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {sorted(SCHEDULES)}")
    if "boundaries" in fields:
        fields["boundaries"] = tuple(fields["boundaries"])
    try:
        return SCHEDULES[kind](**fields)
    except TypeError as err:  # unknown or missing field names
        raise ValueError(f"bad fields for schedule kind {kind!r}: {err}") from None


@dataclass(frozen=True)
class WeightSchedule:
    """Pairs the hard and soft loss weights: `ws(step, total_steps) -> (w_hard, w_soft)`.

    hard=None ("soft fraction" mode): w_soft = soft(t), w_hard = 1 - w_soft; `soft` must then
    stay within [0, 1].  Otherwise the two schedules are independent.
    """

    soft: Schedule
    hard: Schedule | None = None

    def __post_init__(self) -> None:
        if self.hard is None and self.soft.max_value > 1.0:
            raise ValueError(
                f"a soft-fraction schedule must stay within [0, 1] (w_hard = 1 - w_soft), "
                f"but it reaches {self.soft.max_value}"
            )

    def __call__(self, step: int, total_steps: int) -> tuple[float, float]:
        w_soft = self.soft(step, total_steps)
        w_hard = 1.0 - w_soft if self.hard is None else self.hard(step, total_steps)
        return w_hard, w_soft

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "WeightSchedule":
        """Accepts a bare schedule (`{"kind": ...}`: the soft fraction), `{"soft": ...}`
        (soft fraction), or `{"soft": ..., "hard": ...}` (independent weights)."""
        if not isinstance(cfg, dict):
            raise ValueError(f"a weight schedule config must be a mapping, got {cfg!r}")
        if "kind" in cfg:
            return cls(build_schedule(cfg))
        unknown = set(cfg) - {"soft", "hard"}
        if unknown or "soft" not in cfg:
            raise ValueError(
                f"a weight schedule config needs 'soft' (and optionally 'hard'), "
                f"got keys {sorted(cfg)}"
            )
        hard = None if cfg.get("hard") is None else build_schedule(cfg["hard"])
        return cls(build_schedule(cfg["soft"]), hard)
