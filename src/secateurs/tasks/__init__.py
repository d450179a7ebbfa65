"""Tasks: a data set split for training, and the factory of the model trained on it.

A task is a :class:`ClassificationTask`, built by a function registered under a name
(:func:`register_task`) and obtained with :func:`get_task`. The built-in tasks are
imported on first use, since their data may come from optional packages.

Example:
    >>> task = get_task("digits", seed=0)
    >>> model = task.model(seed=0)            # same seed, same initial weights
    >>> len(task.data.train), len(task.data.test)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..train import Splits

__all__ = ["ClassificationTask", "available_tasks", "get_task", "register_task"]

F = TypeVar("F", bound=Callable[..., "ClassificationTask"])

_REGISTRY: dict[str, Callable[..., ClassificationTask]] = {}
#: Built-in task name -> module that registers it when imported.
_BUILTIN = {"digits": "secateurs.tasks.digits"}


@dataclass(frozen=True)
class ClassificationTask:
    """A classification data set, split, with the model to train on it.

    Attributes:
        name: The task's registered name.
        data: Train, validation and test splits (inputs as float tensors, labels as int64).
        build_model: Returns a freshly initialised model (uses torch's global generator).
        num_classes: Number of classes.
    """

    name: str
    data: Splits
    build_model: Callable[[], nn.Module]
    num_classes: int

    def model(self, seed: int) -> nn.Module:
        """A new model whose initial weights depend on ``seed`` alone."""
        torch.manual_seed(seed)
        return self.build_model()


def register_task(name: str) -> Callable[[F], F]:
    """Decorator registering a task factory ``(**options) -> ClassificationTask`` as ``name``."""

    def deco(factory: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"task name {name!r} is already registered to "
                             f"{_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_tasks() -> list[str]:
    """Names of the registered and built-in tasks, sorted."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def get_task(name: str, **options: Any) -> ClassificationTask:
    """Build the task registered as ``name`` with ``options`` (e.g. ``seed=0``).

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available tasks: "
                         f"{', '.join(available_tasks())}")
    return _REGISTRY[name](**options)
