"""The public surface: a small top level, subpackages loaded on first use, former top-level
names still working with a warning that names their new home, and nothing heavy imported by
``import secateurs`` or by ``secateurs --help``."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.validation import ArgumentTypeError

KEPT = {"Pruner", "prune_", "PruneReport", "compact_", "prune_channels_", "clip_", "calibrate",
        "save", "load", "CheckpointError", "Criterion", "register_criterion",
        "available_criteria", "schedules", "criteria", "controllers", "__version__"}

#: Former top-level name -> the module that holds it now.
DEPRECATED = {
    "Budget": "secateurs.controllers", "Plateau": "secateurs.controllers",
    "ThresholdAdapter": "secateurs.controllers", "Sensitivity": "secateurs.controllers",
    "measure_sensitivity": "secateurs.controllers", "MaskSet": "secateurs.masks",
    "Summary": "secateurs.pruner", "TargetSummary": "secateurs.pruner",
    "Target": "secateurs.targets", "resolve_targets": "secateurs.targets",
    "Reconstruction": "secateurs.reconstruction", "count": "secateurs.structured",
    "save_pruned": "secateurs.export", "load_pruned": "secateurs.export",
    "sparsify_": "secateurs.export",
}

SUBPACKAGES = ("calibration", "checkpoint", "controllers", "criteria", "distributed", "export",
               "graph", "lr", "masks", "oneshot", "pruner", "reconstruction", "report",
               "schedules", "search", "selection", "structured", "tables", "targets", "tasks",
               "train", "validation")

#: What ``import secateurs`` must leave unimported.
HEAVY = ("sklearn", "matplotlib", "secateurs.search", "secateurs.tasks", "secateurs.report",
         "secateurs.demo", "secateurs.export", "secateurs.distributed", "secateurs.structured",
         "secateurs.integrations", "secateurs.recipes", "secateurs.hub", "transformers",
         "lightning", "accelerate")


def loaded_in_fresh_process(code: str, prefixes: tuple[str, ...]) -> list[str]:
    """Run ``code`` in a new interpreter; the modules of ``prefixes`` it left imported."""
    probe = (f"import json, sys\n{code}\n"
             f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             f"{sorted({p.split('.')[0] for p in prefixes})!r})))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    modules = json.loads(out.splitlines()[-1])
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_all_is_the_small_set_and_every_name_resolves_without_warning() -> None:
    assert set(sc.__all__) == KEPT and len(sc.__all__) == len(KEPT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in sc.__all__:
            assert getattr(sc, name) is not None
    assert isinstance(sc.schedules, types.ModuleType) and sc.__version__ == "0.1.0"


@pytest.mark.parametrize(("name", "home"), sorted(DEPRECATED.items()))
def test_former_top_level_names_warn_and_name_their_home(name: str, home: str) -> None:
    expected = re.escape(f"secateurs.{name} is deprecated") + ".*" + re.escape(f"{home}.{name}")
    with pytest.warns(DeprecationWarning, match=expected):
        value = getattr(sc, name)
    assert value is getattr(importlib.import_module(home), name)
    assert name not in sc.__all__ and name not in dir(sc)


def test_former_names_warn_at_the_callers_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sc.MaskSet  # noqa: B018
    assert [w.filename for w in caught] == [__file__]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackages_are_attributes_loaded_on_first_use(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = getattr(sc, name)
    assert module is importlib.import_module(f"secateurs.{name}")
    assert name in dir(sc)


def test_unknown_names_raise_attribute_error() -> None:
    for name in ("nothing_here", "_private", "__wrapped__"):
        assert not hasattr(sc, name)
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        sc.nothing_here  # noqa: B018
    with pytest.raises(ImportError, match="cannot import name 'nothing_here'"):
        exec("from secateurs import nothing_here", {})


def test_kept_names_import_by_name() -> None:
    namespace: dict[str, object] = {}
    exec("from secateurs import Pruner, compact_, controllers, save", namespace)
    assert namespace["Pruner"] is importlib.import_module("secateurs.pruner").Pruner
    assert namespace["compact_"] is importlib.import_module("secateurs.structured").compact_


def test_import_secateurs_loads_nothing_heavy() -> None:
    assert loaded_in_fresh_process("import secateurs", (*HEAVY, "torch")) == []


def test_first_use_of_the_core_loads_no_plotting_or_scikit_learn() -> None:
    code = "import secateurs as sc\nsc.Pruner, sc.prune_, sc.save, sc.controllers.Budget"
    assert loaded_in_fresh_process(code, ("sklearn", "matplotlib", "secateurs.search",
                                          "secateurs.tasks", "secateurs.demo")) == []


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["tune", "--help"],
                                  ["sensitivity", "--help"], ["--version"]])
def test_help_loads_neither_torch_nor_scikit_learn_nor_matplotlib(argv: list[str]) -> None:
    code = ("import contextlib, io\nfrom secateurs.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), "
            "contextlib.suppress(SystemExit):\n"
            f"    main({argv!r})")
    assert loaded_in_fresh_process(code, ("sklearn", "matplotlib", "torch", "secateurs.search",
                                          "secateurs.tasks", "secateurs.report")) == []


# -- argument checks: a wrong type is an ArgumentTypeError (a TypeError and a ValueError) ----


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)


WRONG_TYPES = {
    "step_size": lambda: sc.schedules.Step(1, 0.5, step_size="3"),
    "patience": lambda: sc.controllers.Plateau(_opt(), patience="3"),
    "staircase": lambda: sc.schedules.Exponential(1.0, 0.5, staircase=1),
    "milestones": lambda: sc.schedules.Step(1.0, 0.5, milestones=5),
    "schedules": lambda: sc.schedules.Join(5),
    "schedule": lambda: sc.lr.ScheduledLR(_opt(), "cosine"),
    "to_step": lambda: sc.lr.ScheduledLR(_opt(), 1.0).rewind(1.0),
    "mode": lambda: sc.lr.ScheduledLR(_opt(), 1.0, mode=None),
    "value": lambda: sc.clip_(nn.Linear(2, 2), value="1"),
    "epochs": lambda: sc.train.train(nn.Linear(2, 2), _opt(), None, epochs="3"),
    "batch_size": lambda: sc.demo.DemoConfig(batch_size="64"),
    "k": lambda: sc.search.kfold(10, "3"),
    "Recipe.epochs": lambda: sc.search.Recipe(epochs=2.5),
    "p": lambda: sc.calibration.check_power("2"),
    "num_samples": lambda: importlib.import_module("secateurs.tasks.mnist1d").mnist1d_arrays(
        num_samples="5000"),
    "val_fraction": lambda: importlib.import_module("secateurs.tasks.digits").split_indices(
        [0, 1], val_fraction="0.1"),
    "name": lambda: sc.tasks.get_task(3),
}


@pytest.mark.parametrize("argument", sorted(WRONG_TYPES))
def test_wrong_types_raise_argument_type_error_naming_the_argument(argument: str) -> None:
    with pytest.raises(ArgumentTypeError) as info:
        WRONG_TYPES[argument]()
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{argument} must be"), info.value


OUT_OF_RANGE = {
    "step_size": (lambda: sc.schedules.Step(1, 0.5, step_size=0), ">= 1"),
    "scale": (lambda: setattr(sc.lr.ScheduledLR(_opt(), 1.0), "scale", -1.0), "[0, inf)"),
    "max_norm": (lambda: sc.clip_(nn.Linear(2, 2), max_norm=0.0), "(0, inf)"),
    "momentum": (lambda: sc.demo.DemoConfig(momentum=1.0), "[0, 1)"),
    "Recipe.ramp": (lambda: sc.search.Recipe(ramp=0.0), "(0, 1]"),
    "folds": (lambda: sc.search.tune(None, [], tolerance=0.01, folds=0), ">= 1"),
    "tolerance": (lambda: sc.search.tune(None, [], tolerance=-1.0), "[0, inf)"),
}


@pytest.mark.parametrize("argument", sorted(OUT_OF_RANGE))
def test_values_out_of_range_raise_value_error_naming_what_is_valid(argument: str) -> None:
    make, valid = OUT_OF_RANGE[argument]
    with pytest.raises(ValueError) as info:
        make()
    assert not isinstance(info.value, TypeError)
    message = str(info.value)
    assert message.startswith(f"{argument} must be") and valid in message, message
