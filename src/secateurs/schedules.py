"""Schedules: closed-form, pure functions ``step -> value``, for sparsity and learning rate.

Each schedule is a frozen dataclass whose value depends on nothing but the step,
as nanoGPT's ``get_lr(it)`` and torch's ``_get_closed_form_lr``: nothing to
checkpoint but the step. :meth:`Schedule.bounds` gives the infimum and supremum
over all steps, so a caller can check that a sparsity stays in ``[0, 1)`` first.
"""

from __future__ import annotations

import abc
import itertools
import math
import numbers
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field

from . import validation as check

__all__ = [
    "Constant",
    "Cosine",
    "Cubic",
    "Exponential",
    "Join",
    "Linear",
    "Polynomial",
    "Schedule",
    "Step",
    "Warmup",
    "as_schedule",
]


def _clamp(value: float, a: float, b: float) -> float:
    """Clamp into ``[min(a, b), max(a, b)]``: interpolation can overshoot by an ulp."""
    return min(max(value, min(a, b)), max(a, b))


def _scaled_power(initial: float, rate: float, exponent: float) -> float:
    """Return ``initial * rate ** exponent``, saturating to ``±inf`` on overflow."""
    if initial == 0.0:
        return 0.0
    try:
        return initial * rate**exponent
    except OverflowError:
        return math.copysign(math.inf, initial)


def _power_bounds(initial: float, rate: float, max_exponent: float | None) -> tuple[float, float]:
    """Bounds of ``initial * rate ** e`` for ``e`` in ``[0, max_exponent]`` (None: unbounded)."""
    if initial == 0.0 or rate == 1.0:
        return (initial, initial)
    if max_exponent is not None:
        end = _scaled_power(initial, rate, max_exponent)
    elif rate < 1.0:
        end = 0.0
    else:
        end = math.copysign(math.inf, initial)
    return (min(initial, end), max(initial, end))


class Schedule(abc.ABC):
    """A pure function of the step: ``schedule(step) -> float``.

    Subclasses implement :meth:`_value` (the formula, for a validated step) and :meth:`bounds`.
    """

    def __call__(self, step: int) -> float:
        """Return the value at ``step``, an integer ``>= 0``.

        Raises:
            ArgumentTypeError: If ``step`` is not an integer.
            ValueError: If ``step`` is negative.
        """
        return self._value(check.integer("step", step, low=0))

    @abc.abstractmethod
    def _value(self, step: int) -> float:
        """Return the value at a validated, non-negative ``step``."""

    @abc.abstractmethod
    def bounds(self) -> tuple[float, float]:
        """Return ``(low, high)``: the infimum and supremum over all steps.

        A limit that is approached but never reached (e.g. ``0`` for an
        exponential decay) is reported as the bound; it may be ``±inf``.
        """


class _Ramp(Schedule):
    """Base of schedules from ``initial`` (to ``begin_step``) to ``final`` (from ``end_step``)."""

    initial: float
    final: float
    begin_step: int
    end_step: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", check.number("initial", self.initial))
        object.__setattr__(self, "final", check.number("final", self.final))
        object.__setattr__(self, "begin_step", check.integer("begin_step", self.begin_step,
                                                             low=0))
        object.__setattr__(self, "end_step", check.integer("end_step", self.end_step, low=1))
        if self.end_step <= self.begin_step:
            raise ValueError(
                f"end_step must be greater than begin_step ({self.begin_step}), "
                f"got {self.end_step!r}"
            )

    def bounds(self) -> tuple[float, float]:
        return (min(self.initial, self.final), max(self.initial, self.final))


@dataclass(frozen=True)
class Constant(Schedule):
    """The same value at every step: ``v_t = value``.

    Args:
        value: The value.
    """

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", check.number("value", self.value))

    def _value(self, step: int) -> float:
        return self.value

    def bounds(self) -> tuple[float, float]:
        return (self.value, self.value)


@dataclass(frozen=True)
class Linear(_Ramp):
    """Linear interpolation from ``initial`` to ``final``.

    ``v_t = initial + (final - initial) * (t - begin_step) / (end_step - begin_step)``
    for ``begin_step <= t <= end_step``; ``initial`` before, ``final`` after.

    Args:
        initial: Value at and before ``begin_step``.
        final: Value at and after ``end_step``.
        begin_step: First step of the ramp (keyword only).
        end_step: Last step of the ramp, ``> begin_step`` (keyword only).
    """

    initial: float
    final: float
    _: KW_ONLY
    begin_step: int = 0
    end_step: int

    def _value(self, step: int) -> float:
        if step <= self.begin_step:
            return self.initial
        if step >= self.end_step:
            return self.final
        frac = (step - self.begin_step) / (self.end_step - self.begin_step)
        return _clamp(self.initial + (self.final - self.initial) * frac, self.initial, self.final)


@dataclass(frozen=True)
class Exponential(Schedule):
    """Exponential decay (or growth), as TensorFlow's ``ExponentialDecay``.

    ``v_t = initial * decay_rate ** ((t - begin_step) / decay_steps)``, with the
    exponent floored when ``staircase``; ``initial`` before ``begin_step``. The
    recursive form ``lr_t = lr_{t-1} * decay_rate`` is ``decay_steps=1``.

    Args:
        initial: Value at and before ``begin_step``.
        decay_rate: Factor per ``decay_steps`` steps, ``> 0``.
        decay_steps: Steps over which the value is multiplied by ``decay_rate``.
        staircase: Decay in discrete jumps every ``decay_steps`` steps.
        begin_step: Step at which the decay starts.
    """

    initial: float
    decay_rate: float
    decay_steps: int = 1
    staircase: bool = False
    begin_step: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", check.number("initial", self.initial))
        object.__setattr__(self, "decay_rate", _positive("decay_rate", self.decay_rate))
        object.__setattr__(self, "decay_steps", check.integer("decay_steps", self.decay_steps,
                                                              low=1))
        object.__setattr__(self, "begin_step", check.integer("begin_step", self.begin_step,
                                                             low=0))
        check.boolean("staircase", self.staircase)

    def _value(self, step: int) -> float:
        if step <= self.begin_step:
            return self.initial
        exponent = (step - self.begin_step) / self.decay_steps
        if self.staircase:
            exponent = float(math.floor(exponent))
        return _scaled_power(self.initial, self.decay_rate, exponent)

    def bounds(self) -> tuple[float, float]:
        return _power_bounds(self.initial, self.decay_rate, None)


@dataclass(frozen=True)
class Step(Schedule):
    """Multiply by ``gamma`` every ``step_size`` steps, or at each milestone.

    ``v_t = initial * gamma ** (t // step_size)`` (torch ``StepLR``) or
    ``v_t = initial * gamma ** #{m in milestones : m <= t}`` (torch ``MultiStepLR``).
    Exactly one of ``step_size`` and ``milestones`` is given.

    Args:
        initial: Value at step 0.
        gamma: Multiplicative factor, ``> 0``.
        step_size: Period of the decay, ``>= 1``.
        milestones: Strictly increasing steps ``>= 1`` at which to multiply.
    """

    initial: float
    gamma: float
    step_size: int | None = None
    milestones: Sequence[int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", check.number("initial", self.initial))
        object.__setattr__(self, "gamma", _positive("gamma", self.gamma))
        if (self.step_size is None) == (self.milestones is None):
            raise ValueError(
                "exactly one of step_size and milestones must be given, got "
                f"step_size={self.step_size!r}, milestones={self.milestones!r}"
            )
        if self.step_size is not None:
            object.__setattr__(self, "step_size", check.integer("step_size", self.step_size,
                                                                low=1))
        else:
            object.__setattr__(self, "milestones", _increasing("milestones", self.milestones))

    def _value(self, step: int) -> float:
        if self.milestones is not None:
            return _scaled_power(self.initial, self.gamma, bisect_right(self.milestones, step))
        assert self.step_size is not None
        return _scaled_power(self.initial, self.gamma, step // self.step_size)

    def bounds(self) -> tuple[float, float]:
        count = None if self.milestones is None else len(self.milestones)
        return _power_bounds(self.initial, self.gamma, count)


def _increasing(name: str, values: object) -> tuple[int, ...]:
    """Validate a non-empty, strictly increasing sequence of integers ``>= 1``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise check.ArgumentTypeError(f"{name} must be a non-empty sequence of integers, got "
                                      f"{type(values).__name__} {values!r}")
    if not values:
        raise ValueError(f"{name} must be a non-empty sequence of integers, got {values!r}")
    out = tuple(check.integer(f"{name}[{i}]", v, low=1) for i, v in enumerate(values))
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ValueError(f"{name} must be strictly increasing, got {values!r}")
    return out


@dataclass(frozen=True)
class Cosine(_Ramp):
    """Half-cosine annealing from ``initial`` to ``final``.

    ``v_t = final + (initial - final) * (1 + cos(pi * (t - t0) / (t1 - t0))) / 2``
    for ``t0 <= t <= t1``; ``initial`` before, ``final`` after. This is the
    closed form of torch's ``CosineAnnealingLR`` over one half period
    (Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm
    Restarts"), held constant outside it.

    Args:
        initial: Value at and before ``begin_step`` (``t0``).
        final: Value at and after ``end_step`` (``t1``).
        begin_step: Start of the annealing (keyword only).
        end_step: End of the annealing, ``> begin_step`` (keyword only).
    """

    initial: float
    final: float = 0.0
    _: KW_ONLY
    begin_step: int = 0
    end_step: int

    def _value(self, step: int) -> float:
        if step <= self.begin_step:
            return self.initial
        if step >= self.end_step:
            return self.final
        frac = (step - self.begin_step) / (self.end_step - self.begin_step)
        value = self.final + (self.initial - self.final) * (1.0 + math.cos(math.pi * frac)) / 2.0
        return _clamp(value, self.initial, self.final)


@dataclass(frozen=True)
class Polynomial(_Ramp):
    """Polynomial interpolation of Zhu & Gupta (2017), the gradual pruning schedule.

    ``s_t = s_f + (s_i - s_f) * (1 - (t' - t0) / (t1 - t0)) ** power`` where
    ``t' = t0 + floor((t - t0) / frequency) * frequency`` is the step quantised
    down to the last update (the update frequency ``Δt``); ``s_i`` before
    ``t0``, ``s_f`` at and after ``t1``. From "To prune, or not to prune:
    exploring the efficacy of pruning for model compression", arXiv:1710.01878.

    Args:
        initial: Value ``s_i`` at and before ``begin_step``.
        final: Value ``s_f`` at and after ``end_step``.
        begin_step: ``t0``, the first update step.
        end_step: ``t1``, the step at which ``final`` is reached, ``> begin_step``.
        power: Exponent, ``> 0``; 3 is the cubic schedule of the paper.
        frequency: ``Δt``, steps between value changes, ``>= 1``.
    """

    initial: float
    final: float
    begin_step: int
    end_step: int
    power: float = 3.0
    frequency: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "power", _positive("power", self.power))
        object.__setattr__(self, "frequency", check.integer("frequency", self.frequency, low=1))

    def _value(self, step: int) -> float:
        if step >= self.end_step:
            return self.final
        elapsed = step - self.begin_step
        elapsed -= elapsed % self.frequency
        if elapsed <= 0:
            return self.initial
        remaining = 1.0 - elapsed / (self.end_step - self.begin_step)
        value = self.final + (self.initial - self.final) * remaining**self.power
        return _clamp(value, self.initial, self.final)


@dataclass(frozen=True)
class Cubic(Polynomial):
    """The cubic gradual pruning schedule of Zhu & Gupta (2017).

    ``s_t = s_f + (s_i - s_f) * (1 - (t' - t0) / (t1 - t0)) ** 3``: a
    :class:`Polynomial` with ``power=3``, pruning fast early on while
    redundancy is high and slowly as ``s_f`` nears.

    Args:
        initial: Value ``s_i`` at and before ``begin_step``.
        final: Value ``s_f`` at and after ``end_step``.
        begin_step: ``t0``, the first update step.
        end_step: ``t1``, the step at which ``final`` is reached.
        frequency: ``Δt``, steps between value changes, ``>= 1``.
    """

    power: float = field(default=3.0, init=False, repr=False)


@dataclass(frozen=True)
class Warmup(Schedule):
    """Linear warm-up in front of another schedule.

    ``v_t = initial + (schedule(0) - initial) * t / warmup_steps`` for
    ``t < warmup_steps``, then ``v_t = schedule(t - warmup_steps)``: the ramp
    meets the schedule's first value continuously (Goyal et al. 2017,
    "Accurate, Large Minibatch SGD").

    Args:
        schedule: The schedule that follows.
        warmup_steps: Length of the ramp, ``>= 0`` (0 disables it).
        initial: Value at step 0.
    """

    schedule: Schedule
    warmup_steps: int
    initial: float = 0.0

    def __post_init__(self) -> None:
        _require_schedule("schedule", self.schedule)
        object.__setattr__(self, "warmup_steps", check.integer("warmup_steps", self.warmup_steps,
                                                               low=0))
        object.__setattr__(self, "initial", check.number("initial", self.initial))

    def _value(self, step: int) -> float:
        if step >= self.warmup_steps:
            return self.schedule(step - self.warmup_steps)
        target = self.schedule(0)
        value = self.initial + (target - self.initial) * step / self.warmup_steps
        return _clamp(value, self.initial, target)

    def bounds(self) -> tuple[float, float]:
        low, high = self.schedule.bounds()
        if self.warmup_steps == 0:
            return (low, high)
        return (min(low, self.initial), max(high, self.initial))


@dataclass(frozen=True)
class Join(Schedule):
    """Schedules in sequence, as ``optax.join_schedules``.

    Schedule ``i`` is used for ``boundaries[i-1] <= t < boundaries[i]`` and
    receives the local step ``t - boundaries[i-1]`` (``t`` for the first).

    Args:
        schedules: The schedules, at least one.
        boundaries: Strictly increasing steps ``>= 1``, one fewer than ``schedules``.
    """

    schedules: Sequence[Schedule]
    boundaries: Sequence[int] = ()

    def __post_init__(self) -> None:
        check.instance("schedules", self.schedules, Sequence, "a non-empty sequence of Schedules")
        if not self.schedules:
            raise ValueError(f"schedules must be a non-empty sequence of Schedules, got "
                             f"{self.schedules!r}")
        for i, schedule in enumerate(self.schedules):
            _require_schedule(f"schedules[{i}]", schedule)
        object.__setattr__(self, "schedules", tuple(self.schedules))
        if len(self.schedules) == 1 and not self.boundaries:
            object.__setattr__(self, "boundaries", ())
            return
        boundaries = _increasing("boundaries", self.boundaries)
        if len(boundaries) != len(self.schedules) - 1:
            raise ValueError(
                f"boundaries must have len(schedules) - 1 = {len(self.schedules) - 1} "
                f"entries, got {len(boundaries)}: {self.boundaries!r}"
            )
        object.__setattr__(self, "boundaries", boundaries)

    def _value(self, step: int) -> float:
        index = bisect_right(self.boundaries, step)
        offset = self.boundaries[index - 1] if index > 0 else 0
        return self.schedules[index](step - offset)

    def bounds(self) -> tuple[float, float]:
        """Return the union of the children's bounds.

        This is conservative: each child but the last is only used over a
        window of steps, which may not reach the child's extremes.
        """
        pairs = [s.bounds() for s in self.schedules]
        return (min(low for low, _ in pairs), max(high for _, high in pairs))


def _positive(name: str, value: object) -> float:
    """``value`` as a finite float ``> 0``."""
    return check.number(name, value, low=0.0, low_open=True)


def _require_schedule(name: str, value: object) -> None:
    check.instance(name, value, Schedule, "a Schedule (use Constant(x) for a number)")


def as_schedule(value: float | Schedule, *, name: str = "value") -> Schedule:
    """Return ``value`` as a schedule: schedules pass through, numbers become :class:`Constant`.

    Args:
        value: A schedule or a finite real number.
        name: What the caller calls ``value``, for the error message.

    Raises:
        ArgumentTypeError: If ``value`` is neither a schedule nor a real number.
        ValueError: If ``value`` is a number that is not finite.
    """
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise check.ArgumentTypeError(f"{name} must be a Schedule or a finite real number, got "
                                      f"{type(value).__name__} {value!r}")
    return Constant(check.number(name, value))
