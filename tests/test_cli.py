"""The command line's arguments, and the digits task it trains on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secateurs import cli
from secateurs.cli import COMMANDS, build_parser, main
from secateurs.controllers.sensitivity import DEFAULT_SPARSITIES
from secateurs.tasks import ClassificationTask, available_tasks, get_task
from secateurs.tasks.digits import DigitsCNN, load_digits_splits, split_indices

# -- arguments ---------------------------------------------------------------------------


def test_demo_help_exits_zero_and_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--epochs", "--seed", "--out", "--no-progress"):
        assert option in out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["prune-everything"], "invalid choice"),
        (["demo", "--epochs", "0"], "expected an integer >= 1, got 0"),
        (["demo", "--epochs", "many"], "expected an integer, got 'many'"),
        (["demo", "--seed", "-1"], "expected an integer >= 0, got -1"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_non_zero_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_demo_arguments_parse_to_their_values() -> None:
    args = build_parser().parse_args(
        ["demo", "--quick", "--epochs", "3", "--seed", "7", "--out", "x", "--no-progress"])
    assert (args.command, args.quick, args.epochs, args.seed, args.out, args.no_progress) == \
        ("demo", True, 3, 7, "x", True)
    defaults = build_parser().parse_args(["demo"])
    assert (defaults.quick, defaults.epochs, defaults.seed, defaults.out) == \
        (False, None, 0, "runs")


def test_help_constants_match_the_library() -> None:
    """``--help`` names tasks and defaults without importing them: they must agree."""
    assert set(cli.BUILTIN_TASKS) <= set(available_tasks())
    assert cli.SENSITIVITY_SPARSITIES == DEFAULT_SPARSITIES
    args = build_parser().parse_args(["sensitivity"])
    assert args.sparsities == list(DEFAULT_SPARSITIES)


# -- the digits split ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    splits = load_digits_splits(0)
    return torch.cat([splits.train.y, splits.val.y, splits.test.y]).numpy()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), val=st.floats(0.05, 0.4), test=st.floats(0.05, 0.4))
def test_split_is_deterministic_disjoint_covering_and_stratified(
    labels: np.ndarray, seed: int, val: float, test: float
) -> None:
    parts = split_indices(labels, seed, val_fraction=val, test_fraction=test)
    again = split_indices(labels, seed, val_fraction=val, test_fraction=test)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) == len(np.unique(joined))
    classes, totals = np.unique(labels, return_counts=True)
    for part, share in zip(parts, (1 - val - test, val, test), strict=True):
        counts = np.array([(labels[part] == c).sum() for c in classes])
        # Two successive stratified draws: each class within 2 of its exact share.
        assert np.all(np.abs(counts - share * totals) <= 2), (counts, share * totals)


def test_split_depends_on_the_seed(labels: np.ndarray) -> None:
    first = split_indices(labels, 0)[2]
    second = split_indices(labels, 1)[2]
    assert len(first) == len(second) and not np.array_equal(first, second)


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.2), (0.1, 1.0), (0.6, 0.4), (-0.1, 0.2)])
def test_split_rejects_fractions_that_leave_nothing(labels: np.ndarray, val: float,
                                                    test: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        split_indices(labels, 0, val_fraction=val, test_fraction=test)


def test_digits_tensors_are_scaled_images_with_integer_labels() -> None:
    splits = load_digits_splits(3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1257, 180, 360)
    for split in (splits.train, splits.val, splits.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (1, 8, 8)
        assert split.y.dtype == torch.int64
    x = torch.cat([splits.train.x, splits.val.x, splits.test.x])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(torch.cat([splits.train.y, splits.test.y]).tolist()) == set(range(10))


# -- the task registry and the model ------------------------------------------------------


def test_get_task_builds_digits_and_the_same_seed_gives_the_same_model() -> None:
    task = get_task("digits", seed=0)
    assert isinstance(task, ClassificationTask) and task.num_classes == 10
    a, b, c = task.model(5), task.model(5), task.model(6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    assert a(task.data.test.x[:7]).shape == (7, 10)


def test_unknown_task_lists_the_available_ones() -> None:
    assert "digits" in available_tasks()
    with pytest.raises(ValueError, match="unknown task 'cifar'.*digits"):
        get_task("cifar")


def test_digits_cnn_size_matches_its_docstring() -> None:
    model = DigitsCNN()
    assert sum(p.numel() for p in model.parameters()) == 38_282
