"""Tasks: what a user implements once so that secateurs can train and measure their model.

A :class:`Task` says how to build the model, how to train it for one epoch (calling the
step callbacks right after each ``optimizer.step()``), how to evaluate it on a split, and
which metric the controllers read, with its direction. :class:`ClassificationTask` is the
implementation for in-memory classification data; a task that can also be re-split
(:class:`Resplittable`) supports k-fold cross-validation.

Tasks are built by functions registered under a name (:func:`register_task`) and obtained
with :func:`get_task`; a user's own task is named ``module:function`` (the function is
called with the same options and must return a :class:`Task`). The built-in tasks
(``digits``, ``mnist1d``) are imported on first use, since their data may come from
optional packages.

Example:
    >>> task = get_task("digits", seed=0)
    >>> model = task.model(seed=0)            # same seed, same initial weights
    >>> task.train_epoch(model, task.optimizer(model), epoch=0)
    >>> task.evaluate(model, "val")           # {"accuracy": ...}
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from .. import validation as check
from ..train import Split, Splits, StepCallback, evaluate, run_epoch, steps_per_epoch

__all__ = [
    "ClassificationTask",
    "OptimizerFactory",
    "Resplittable",
    "Task",
    "available_tasks",
    "get_task",
    "register_task",
    "sgd",
]

F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: dict[str, Callable[..., Any]] = {}
#: Built-in task name -> module that registers it when imported.
_BUILTIN = {"digits": "secateurs.tasks.digits", "mnist1d": "secateurs.tasks.mnist1d"}

#: ``(parameters, lr) -> optimizer``.
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


@runtime_checkable
class Task(Protocol):
    """What secateurs needs to know about a model and its data.

    Attributes:
        name: Short name, used in reports.
        metric: Key of :meth:`evaluate`'s result that controllers and searches read.
        higher_is_better: Direction of ``metric`` (``True`` for accuracy, ``False`` for loss).
        epochs: Epochs of dense training from scratch.
        steps_per_epoch: Optimizer steps in one epoch.
    """

    name: str
    metric: str
    higher_is_better: bool
    epochs: int

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one call of :meth:`train_epoch` (pruning schedules need it)."""
        ...

    def model(self, seed: int) -> nn.Module:
        """A freshly initialised model whose weights depend on ``seed`` alone."""
        ...

    def optimizer(self, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        """The optimizer of ``model`` (at learning rate ``lr``, or the task's own)."""
        ...

    def train_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int,
                    callbacks: Sequence[StepCallback] = ()) -> Mapping[str, float]:
        """Train one epoch; each callback runs right after each ``optimizer.step()``."""
        ...

    def evaluate(self, model: nn.Module, split: str = "val") -> Mapping[str, float]:
        """Metrics of ``model`` on ``split`` (``"val"`` or ``"test"``), ``metric`` among them."""
        ...


@runtime_checkable
class Resplittable(Protocol):
    """A task whose training and validation examples can be re-split (cross-validation)."""

    def pool_labels(self) -> torch.Tensor:
        """Labels of the pooled training and validation examples (training ones first)."""
        ...

    def resplit(self, train: Sequence[int], val: Sequence[int]) -> Task:
        """The same task trained on ``train`` and validated on ``val`` (pool indices)."""
        ...


def sgd(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9, the default optimizer of classification tasks."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)


@dataclass(frozen=True)
class ClassificationTask:
    """A classification data set, split, with the model to train on it and its recipe.

    Implements :class:`Task` (metric ``accuracy``, higher is better) and
    :class:`Resplittable`.

    Attributes:
        name: The task's registered name.
        data: Train, validation and test splits (inputs as float tensors, labels as int64).
        build_model: Returns a freshly initialised model (uses torch's global generator).
        num_classes: Number of classes.
        lr: Learning rate of dense training.
        batch_size: Examples per step.
        epochs: Epochs of dense training from scratch.
        make_optimizer: ``(parameters, lr) -> optimizer``.
        seed: Seed of the batch order (epoch ``e`` draws with ``seed + e``).
    """

    name: str
    data: Splits
    build_model: Callable[[], nn.Module]
    num_classes: int
    lr: float = 0.1
    batch_size: int = 64
    epochs: int = 30
    make_optimizer: OptimizerFactory = sgd
    seed: int = 0
    metric: str = "accuracy"
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        check.instance("data", self.data, Splits, "a secateurs.train.Splits")
        check.callable_("build_model", self.build_model, "a function returning a model")
        check.callable_("make_optimizer", self.make_optimizer,
                        "a function (parameters, lr) -> optimizer")
        for name in ("num_classes", "batch_size", "epochs"):
            check.integer(name, getattr(self, name), low=1)
        check.integer("seed", self.seed)
        check.number("lr", self.lr, low=0.0, low_open=True)
        check.boolean("higher_is_better", self.higher_is_better)

    def model(self, seed: int) -> nn.Module:
        """A new model whose initial weights depend on ``seed`` alone."""
        torch.manual_seed(seed)
        return self.build_model()

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch: ``ceil(len(train) / batch_size)``."""
        return steps_per_epoch(len(self.data.train), self.batch_size)

    def optimizer(self, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        """The task's optimizer over ``model``'s parameters, at ``lr`` or the task's ``lr``."""
        return self.make_optimizer(model.parameters(), self.lr if lr is None else lr)

    def train_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int,
                    callbacks: Sequence[StepCallback] = ()) -> dict[str, float]:
        """One epoch of minibatch cross-entropy training; returns ``{"train_loss": ...}``."""
        history = _one_epoch(model, optimizer, self.data.train, self.batch_size,
                             self.seed + epoch, callbacks)
        return {"train_loss": sum(history) / len(history)}

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        """``{"accuracy": top-1 accuracy}`` on the ``"val"``, ``"test"`` or ``"train"`` split.

        Raises:
            ValueError: for another split name.
        """
        check.choice("split", split, ("train", "val", "test"))
        return {"accuracy": evaluate(model, getattr(self.data, split))}

    def pool_labels(self) -> torch.Tensor:
        """Labels of the training then the validation examples."""
        return torch.cat([self.data.train.y, self.data.val.y])

    def resplit(self, train: Sequence[int], val: Sequence[int]) -> ClassificationTask:
        """The task with training and validation examples re-drawn from their pool.

        Raises:
            ValueError: if ``train`` and ``val`` overlap or index outside the pool.
        """
        x = torch.cat([self.data.train.x, self.data.val.x])
        y = self.pool_labels()
        a, b = torch.as_tensor(list(train), dtype=torch.long), \
            torch.as_tensor(list(val), dtype=torch.long)
        both = torch.cat([a, b])
        if len(both) and (int(both.min()) < 0 or int(both.max()) >= len(y)):
            raise ValueError(f"indices must lie in [0, {len(y)}), got {int(both.min())} .. "
                             f"{int(both.max())}")
        if len(set(a.tolist()) & set(b.tolist())):
            raise ValueError("train and val indices must be disjoint")
        data = Splits(Split(x[a], y[a]), Split(x[b], y[b]), self.data.test)
        return dataclasses.replace(self, data=data)


def _one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, split: Split,
               batch_size: int, seed: int, callbacks: Sequence[StepCallback]) -> list[float]:
    """Per-step losses of one epoch whose batch order depends on ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    return run_epoch(model, optimizer, split, batch_size=batch_size, generator=generator,
                     callbacks=callbacks)


def register_task(name: str) -> Callable[[F], F]:
    """Decorator registering a task factory ``(**options) -> Task`` as ``name``."""

    check.instance("name", name, str, "a task name")

    def deco(factory: F) -> F:
        check.callable_("factory", factory, "a function (**options) -> Task")
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"task name {name!r} is already registered to "
                             f"{_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_tasks() -> list[str]:
    """Names of the registered and built-in tasks, sorted."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def _import_factory(spec: str) -> Callable[..., Any]:
    """The function named by ``module:function``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a user task is named 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} of task {spec!r}: "
                         f"{error}") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"module {module_name!r} has no function {attr!r} (task {spec!r})")
    return factory


def get_task(name: str, **options: Any) -> Any:
    """Build the task registered as ``name``, or named ``module:function``, with ``options``.

    Args:
        name: A registered name (see :func:`available_tasks`) or ``module:function``.
        options: Passed to the factory (e.g. ``seed=0``).

    Returns:
        The task (a :class:`Task`).

    Raises:
        ValueError: for an unknown name (the message lists the valid ones), a
            ``module:function`` that cannot be imported, or a factory whose result is not
            a :class:`Task`.
    """
    check.instance("name", name, str, "a task name or 'module:function'")
    if ":" in name:
        factory = _import_factory(name)
    else:
        if name not in _REGISTRY and name in _BUILTIN:
            importlib.import_module(_BUILTIN[name])
        if name not in _REGISTRY:
            raise ValueError(f"unknown task {name!r}; available tasks: "
                             f"{', '.join(available_tasks())}, or 'module:function'")
        factory = _REGISTRY[name]
    task = factory(**options)
    if not isinstance(task, Task):
        raise ValueError(f"task {name!r} returned {type(task).__name__}, which lacks what a "
                         f"Task needs: name, metric, higher_is_better, epochs, model(), "
                         f"optimizer(), train_epoch(), evaluate()")
    return task
