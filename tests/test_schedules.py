"""Tests for secateurs.schedules: golden values, properties, validation."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secateurs.schedules import (
    Constant,
    Cosine,
    Cubic,
    Exponential,
    Join,
    Linear,
    Polynomial,
    Schedule,
    Step,
    Warmup,
    as_schedule,
)

PROPERTY = settings(max_examples=60, deadline=None)
approx = pytest.approx


# ---------------------------------------------------------------- golden values


def test_constant_golden() -> None:
    s = Constant(0.3)
    assert s(0) == 0.3
    assert s(10**9) == 0.3
    assert s.bounds() == (0.3, 0.3)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # before begin_step: initial
        (10, 0.0),  # at begin_step: initial
        (12, 0.2),  # 0 + (1 - 0) * (12 - 10) / (20 - 10) = 0.2
        (15, 0.5),  # 5 / 10
        (20, 1.0),  # at end_step: final
        (100, 1.0),  # after end_step: final
    ],
)
def test_linear_golden(step: int, expected: float) -> None:
    assert Linear(0.0, 1.0, begin_step=10, end_step=20)(step) == approx(expected, abs=1e-15)


def test_linear_decreasing_golden() -> None:
    s = Linear(1.0, 0.5, end_step=4)
    # 1 + (0.5 - 1) * t / 4: t=1 -> 0.875, t=2 -> 0.75, t=3 -> 0.625 (all exact in binary)
    assert [s(t) for t in range(6)] == [1.0, 0.875, 0.75, 0.625, 0.5, 0.5]
    assert s.bounds() == (0.5, 1.0)


def test_exponential_golden() -> None:
    s = Exponential(2.0, 0.5)
    # 2 * 0.5**t
    assert [s(t) for t in range(4)] == [2.0, 1.0, 0.5, 0.25]
    smooth = Exponential(1.0, 0.5, decay_steps=2)
    assert smooth(1) == approx(math.sqrt(0.5), rel=1e-15)  # 0.5 ** (1/2) = 0.70710678...
    assert smooth(2) == 0.5  # 0.5 ** (2/2)
    stairs = Exponential(1.0, 0.5, decay_steps=2, staircase=True)
    # 0.5 ** floor(t / 2): 1, 1, 0.5, 0.5, 0.25
    assert [stairs(t) for t in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    late = Exponential(1.0, 0.25, begin_step=5)
    # initial up to begin_step, then 0.25 ** (t - 5)
    assert [late(t) for t in (0, 5, 6, 7)] == [1.0, 1.0, 0.25, 0.0625]
    tf = Exponential(0.1, 0.96, decay_steps=100)
    # 0.1 * 0.96 ** 2.5 = 0.1 * exp(2.5 * ln 0.96) = 0.1 * exp(-0.1020550) = 0.0902980
    assert tf(250) == approx(0.09029798987795908, rel=1e-12)


def test_exponential_bounds() -> None:
    assert Exponential(2.0, 0.5).bounds() == (0.0, 2.0)  # decays towards 0
    assert Exponential(2.0, 1.5).bounds() == (2.0, math.inf)  # grows without bound
    assert Exponential(-1.0, 0.5).bounds() == (-1.0, 0.0)
    assert Exponential(0.7, 1.0).bounds() == (0.7, 0.7)
    assert Exponential(2.0, 1.5)(10**6) == math.inf  # overflow saturates, no OverflowError


def test_step_golden() -> None:
    periodic = Step(1.0, 0.5, step_size=3)
    # 0.5 ** (t // 3)
    assert [periodic(t) for t in range(7)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    assert periodic.bounds() == (0.0, 1.0)
    milestones = Step(1.0, 0.5, milestones=[2, 5])
    # 0.5 ** #{m <= t}: t=1 -> 0, t=2 -> 1, t=4 -> 1, t=5 -> 2, t=100 -> 2
    assert [milestones(t) for t in (0, 1, 2, 4, 5, 100)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert milestones.milestones == (2, 5)
    assert milestones.bounds() == (0.25, 1.0)
    assert Step(1.0, 2.0, milestones=(1,)).bounds() == (1.0, 2.0)


def test_cosine_golden() -> None:
    s = Cosine(1.0, 0.0, end_step=4)
    # (1 + cos(pi * t / 4)) / 2: t=1 -> (1 + 0.7071068) / 2, t=2 -> 0.5, t=3 -> (1 - 0.7071068) / 2
    expected = [1.0, 0.8535533905932737, 0.5, 0.1464466094067262, 0.0, 0.0]
    assert [s(t) for t in range(6)] == approx(expected, abs=1e-15)
    shifted = Cosine(1.0, 0.1, begin_step=2, end_step=6)
    # t=4 is half way: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.1 + 0.45 = 0.55
    assert shifted(4) == approx(0.55, abs=1e-15)
    assert shifted(1) == 1.0
    assert shifted(6) == 0.1
    assert shifted.bounds() == (0.1, 1.0)


def test_cubic_golden() -> None:
    s = Cubic(0.0, 0.8, begin_step=10, end_step=20)
    # 0.8 + (0 - 0.8) * (1 - (t - 10) / 10) ** 3
    assert s(5) == 0.0
    assert s(10) == 0.0
    assert s(12) == approx(0.3904, abs=1e-15)  # 0.8 - 0.8 * 0.8**3 = 0.8 - 0.4096
    assert s(15) == approx(0.7, abs=1e-15)  # 0.8 - 0.8 * 0.5**3 = 0.8 - 0.1
    assert s(20) == 0.8
    assert s(21) == 0.8
    assert s.power == 3.0
    assert isinstance(s, Polynomial)


def test_cubic_design_example() -> None:
    s = Cubic(initial=0.0, final=0.9, begin_step=100, end_step=2000)
    # 0.9 * (1 - (1 - 400 / 1900) ** 3) = 0.9 * (1 - (15/19) ** 3) = 0.9 * 3484 / 6859
    assert s(500) == approx(0.9 * 3484 / 6859, rel=1e-14)


def test_cubic_frequency_golden() -> None:
    s = Cubic(0.0, 0.8, begin_step=10, end_step=20, frequency=4)
    # t is quantised down to 10 + 4k: {10, 11, 12, 13} -> 10, {14..17} -> 14, {18, 19} -> 18
    assert s(11) == 0.0
    assert s(13) == 0.0
    assert s(14) == approx(0.6272, abs=1e-15)  # 0.8 - 0.8 * 0.6**3 = 0.8 - 0.1728
    assert s(17) == approx(0.6272, abs=1e-15)
    assert s(18) == approx(0.7936, abs=1e-15)  # 0.8 - 0.8 * 0.2**3 = 0.8 - 0.0064
    assert s(19) == approx(0.7936, abs=1e-15)
    assert s(20) == 0.8  # end_step is always final


def test_polynomial_golden() -> None:
    s = Polynomial(1.0, 0.0, 0, 10, power=2.0)
    # (1 - t / 10) ** 2: t=1 -> 0.81, t=5 -> 0.25, t=9 -> 0.01
    assert s(1) == approx(0.81, abs=1e-15)
    assert s(5) == 0.25
    assert s(9) == approx(0.01, abs=1e-15)
    assert s(10) == 0.0


def test_warmup_golden() -> None:
    s = Warmup(Constant(1.0), 4)
    # 0 + (1 - 0) * t / 4 for t < 4, then 1
    assert [s(t) for t in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = Warmup(Cosine(1.0, 0.0, end_step=4), warmup_steps=2, initial=0.2)
    # t=1: 0.2 + (1.0 - 0.2) * 1 / 2 = 0.6; t=2+k: cosine(k)
    assert cosine(0) == 0.2
    assert cosine(1) == approx(0.6, abs=1e-15)
    assert cosine(2) == 1.0
    assert cosine(4) == approx(0.5, abs=1e-15)
    assert cosine(6) == 0.0
    assert cosine.bounds() == (0.0, 1.0)
    assert Warmup(Constant(0.5), 0)(0) == 0.5  # no ramp


def test_join_golden() -> None:
    s = Join([Linear(0.0, 1.0, end_step=4), Constant(1.0), Exponential(1.0, 0.5)], [4, 10])
    # [0, 4): linear(t); [4, 10): constant; [10, inf): 0.5 ** (t - 10)
    assert s(2) == 0.5
    assert s(4) == 1.0
    assert s(9) == 1.0
    assert s(10) == 1.0
    assert s(12) == 0.25
    assert s.bounds() == (0.0, 1.0)
    assert Join([Constant(0.25)])(7) == 0.25


def test_as_schedule() -> None:
    assert as_schedule(0.5) == Constant(0.5)
    assert as_schedule(1) == Constant(1.0)
    cosine = Cosine(1.0, end_step=3)
    assert as_schedule(cosine) is cosine
    with pytest.raises(TypeError, match="str"):
        as_schedule("0.5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool"):
        as_schedule(True)


def test_schedules_are_frozen_hashable_and_picklable() -> None:
    s = Warmup(Cubic(0.0, 0.5, 0, 10), 3)
    assert pickle.loads(pickle.dumps(s)) == s
    assert hash(s) == hash(Warmup(Cubic(0.0, 0.5, 0, 10), 3))
    with pytest.raises(AttributeError):
        s.warmup_steps = 4  # type: ignore[misc]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: Constant(math.nan), "nan"),
        (lambda: Linear(0.0, 1.0, begin_step=10, end_step=5), r"begin_step \(10\), got 5"),
        (lambda: Linear(0.0, 1.0, begin_step=-1, end_step=5), "begin_step.*got -1"),
        (lambda: Cosine(1.0, 0.0, end_step=0), "end_step.*got 0"),
        (lambda: Exponential(1.0, -0.5), "decay_rate.*got -0.5"),
        (lambda: Exponential(1.0, 0.5, decay_steps=0), "decay_steps.*got 0"),
        (lambda: Step(1.0, 0.5), "exactly one"),
        (lambda: Step(1.0, 0.5, step_size=2, milestones=[3]), "exactly one"),
        (lambda: Step(1.0, 0.5, milestones=[3, 2]), r"strictly increasing, got \[3, 2\]"),
        (lambda: Step(1.0, 0.5, milestones=[]), "non-empty"),
        (lambda: Step(1.0, 0.0, step_size=2), "gamma.*got 0.0"),
        (lambda: Polynomial(0.0, 0.5, 0, 10, power=0.0), "power.*got 0.0"),
        (lambda: Cubic(0.0, 0.5, 0, 10, frequency=0), "frequency.*got 0"),
        (lambda: Cubic(0.0, math.inf, 0, 10), "final.*inf"),
        (lambda: Warmup(Constant(1.0), -2), "warmup_steps.*got -2"),
        (lambda: Join([Constant(1.0), Constant(2.0)], [3, 5]), "len.*1 entries, got 2"),
        (lambda: Join([Constant(1.0), Constant(2.0)], [0]), r"boundaries\[0\].*got 0"),
        (lambda: Join([], []), "non-empty"),
    ],
)
def test_bad_input_raises_value_error(make: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()  # type: ignore[operator]


def test_bad_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match="str"):
        Linear(0.0, "1", end_step=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float"):
        Step(1.0, 0.5, step_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Join"):
        Warmup(Join, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"schedules\[1\].*Constant.*float 0.5"):
        Join([Constant(1.0), 0.5], [3])  # type: ignore[list-item]


def test_bad_step_raises() -> None:
    s = Linear(0.0, 1.0, end_step=3)
    with pytest.raises(ValueError, match=r"step.*got -1"):
        s(-1)
    with pytest.raises(TypeError, match="float"):
        s(1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- properties

values = st.floats(-10.0, 10.0, allow_nan=False)
begins = st.integers(0, 1_000)
lengths = st.integers(1, 1_000)
steps = st.integers(0, 5_000)


@st.composite
def ramps(draw: st.DrawFn) -> Linear | Cosine | Polynomial:
    """Linear, Cosine, Polynomial or Cubic schedules with random endpoints."""
    initial, final, begin, length = draw(values), draw(values), draw(begins), draw(lengths)
    kind = draw(st.sampled_from(["linear", "cosine", "polynomial", "cubic"]))
    if kind == "linear":
        return Linear(initial, final, begin_step=begin, end_step=begin + length)
    if kind == "cosine":
        return Cosine(initial, final, begin_step=begin, end_step=begin + length)
    frequency = draw(st.integers(1, 50))
    if kind == "cubic":
        return Cubic(initial, final, begin, begin + length, frequency=frequency)
    power = draw(st.floats(0.1, 5.0))
    return Polynomial(initial, final, begin, begin + length, power=power, frequency=frequency)


@st.composite
def any_schedule(draw: st.DrawFn, depth: int = 2) -> Schedule:
    """Any schedule, nesting Warmup and Join up to ``depth`` levels."""
    leaves = st.one_of(
        ramps(),
        st.builds(Constant, values),
        st.builds(Exponential, values, st.floats(0.5, 1.5), st.integers(1, 20), st.booleans()),
        st.builds(Step, values, st.floats(0.1, 1.0), st.integers(1, 50)),
        st.builds(Step, values, st.floats(0.1, 3.0), milestones=st.just([3, 40, 700])),
    )
    if depth == 0 or draw(st.booleans()):
        return draw(leaves)
    if draw(st.booleans()):
        return Warmup(draw(any_schedule(depth - 1)), draw(st.integers(0, 100)), draw(values))
    children = draw(st.lists(any_schedule(depth - 1), min_size=1, max_size=3))
    gaps = draw(st.lists(st.integers(1, 500), min_size=len(children) - 1, max_size=3))
    boundaries = [sum(gaps[: i + 1]) for i in range(len(children) - 1)]
    return Join(children, boundaries)


@PROPERTY
@given(any_schedule(), steps)
def test_values_lie_within_bounds(schedule: Schedule, step: int) -> None:
    low, high = schedule.bounds()
    assert low <= high
    assert low <= schedule(step) <= high


@PROPERTY
@given(any_schedule(), steps)
def test_schedules_are_pure(schedule: Schedule, step: int) -> None:
    assert schedule(step) == schedule(step)
    assert pickle.loads(pickle.dumps(schedule))(step) == schedule(step)


@PROPERTY
@given(ramps(), steps, steps)
def test_ramps_are_monotone(ramp: Linear | Cosine | Polynomial, a: int, b: int) -> None:
    early, late = min(a, b), max(a, b)
    if ramp.initial >= ramp.final:
        assert ramp(early) >= ramp(late)
    else:
        assert ramp(early) <= ramp(late)


@PROPERTY
@given(ramps(), st.integers(0, 100))
def test_ramps_hit_their_endpoints(ramp: Linear | Cosine | Polynomial, offset: int) -> None:
    assert ramp(ramp.begin_step) == ramp.initial
    assert ramp(max(ramp.begin_step - offset, 0)) == ramp.initial
    assert ramp(ramp.end_step) == ramp.final
    assert ramp(ramp.end_step + offset) == ramp.final
    assert ramp.bounds() == (min(ramp.initial, ramp.final), max(ramp.initial, ramp.final))


@PROPERTY
@given(st.floats(0.0, 10.0), st.floats(0.01, 2.0), st.integers(1, 20), st.booleans(), steps, steps)
def test_exponential_is_monotone(
    initial: float, rate: float, decay_steps: int, staircase: bool, a: int, b: int
) -> None:
    s = Exponential(initial, rate, decay_steps, staircase)
    early, late = min(a, b), max(a, b)
    assert s(0) == initial
    if rate <= 1.0:
        assert s(early) >= s(late)
    else:
        assert s(early) <= s(late)


@PROPERTY
@given(st.floats(0.0, 0.5), st.floats(0.5, 0.99), begins, lengths, st.integers(1, 50), steps)
def test_frequency_quantises_the_step(
    initial: float, final: float, begin: int, length: int, frequency: int, step: int
) -> None:
    s = Cubic(initial, final, begin, begin + length, frequency=frequency)
    if begin <= step < begin + length:
        quantised = begin + (step - begin) // frequency * frequency
        assert s(step) == s(quantised)
        assert s(step) == Cubic(initial, final, begin, begin + length)(quantised)


@PROPERTY
@given(values, values, values, lengths, lengths)
def test_join_of_matching_ramps_is_continuous(
    a: float, b: float, c: float, first_length: int, second_length: int
) -> None:
    first = Linear(a, b, end_step=first_length)
    second = Cosine(b, c, end_step=second_length)
    joined = Join([first, second], [first_length])
    assert joined(first_length) == first(first_length) == b
    assert joined(first_length - 1) == first(first_length - 1)
    assert joined(first_length + second_length) == c


@PROPERTY
@given(any_schedule(depth=1), st.integers(1, 100), values, steps)
def test_warmup_meets_its_schedule(
    inner: Schedule, warmup_steps: int, initial: float, step: int
) -> None:
    s = Warmup(inner, warmup_steps, initial)
    assert s(0) == initial
    assert s(warmup_steps) == inner(0)
    assert s(warmup_steps + step) == inner(step)
    if step < warmup_steps:
        low, high = sorted((initial, inner(0)))
        assert low <= s(step) <= high
