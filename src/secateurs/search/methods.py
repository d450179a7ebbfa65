"""Methods: how one configuration is fine-tuned from the dense weights, and measured.

A method is a function ``(setting, config) -> (model, metrics, extra)`` registered in
:data:`METHODS` under the name a configuration gives as its ``method``:

- ``dense``: the dense model itself (the baseline);
- ``gradual``: the cubic schedule of Zhu & Gupta (2017) to ``sparsity``, uniform layers;
- ``oneshot``: ``sparsity`` at once, then fine-tuning with the masks fixed;
- ``clipping``: dynamic weight clipping, the threshold rising to ``threshold``;
- ``budget``: :class:`~secateurs.controllers.Budget`, per-layer sparsities from the
  sensitivity analysis (``allocation="sensitivity"``, the default) or uniform;
- ``adaptive-clipping``: :class:`~secateurs.controllers.ThresholdAdapter`.

Every method starts from the same :class:`Setting` (dense weights, budget, recipe) and
fine-tunes for the same number of epochs with the same learning rate schedule. A
controller's rollback restores weights, masks and optimizer state but not the learning rate
schedule, which keeps decaying: the run's length stays what the recipe says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .. import validation as check
from ..controllers import Budget, ThresholdAdapter, read_metric
from ..controllers.level import LevelController
from ..controllers.sensitivity import Sensitivity
from ..criteria import Clipping
from ..lr import ScheduledLR
from ..pruner import Pruner
from ..schedules import Cosine, Cubic, Linear
from ..targets import resolve_targets
from ..tasks import Task
from .trials import Config

__all__ = ["METHODS", "Recipe", "Setting", "finetune", "measure", "register_method",
           "run_method", "sparse_macs"]


@dataclass(frozen=True)
class Recipe:
    """Fine-tuning settings shared by every trial of a search.

    Attributes:
        epochs: Fine-tuning epochs of every trial, from the dense weights.
        lr_scale: Fine-tuning learning rate as a share of the task's, decayed to 0 along a
            half cosine over the trial.
        update_every: Steps between mask updates.
        ramp: Share of the trial's steps over which sparsity (or the threshold) rises.
        patience: Recovery evaluations a :class:`~secateurs.controllers.Budget` allows.
        final: Highest overall sparsity a budget-controlled trial may reach.
        seed: Seed of the dense model's initial weights.
    """

    epochs: int = 20
    lr_scale: float = 0.5
    update_every: int = 10
    ramp: float = 0.5
    patience: int = 2
    final: float = 0.98
    seed: int = 0

    def __post_init__(self) -> None:
        check.integer("Recipe.epochs", self.epochs, low=1)
        check.integer("Recipe.update_every", self.update_every, low=1)
        check.integer("Recipe.patience", self.patience, low=0)
        check.integer("Recipe.seed", self.seed)
        check.number("Recipe.lr_scale", self.lr_scale, low=0.0, low_open=True)
        check.number("Recipe.ramp", self.ramp, low=0.0, high=1.0, low_open=True)
        check.number("Recipe.final", self.final, low=0.0, high=1.0, low_open=True,
                     high_open=True)


@dataclass
class Setting:
    """Where every trial of one fold starts: the task, the dense weights and the budget.

    Attributes:
        task: The task, split for this fold.
        dense: The dense model's trained weights.
        baseline: The dense model's validation metric.
        tolerance: The budget (see :class:`~secateurs.controllers.Budget`).
        relative: Whether ``tolerance`` is a fraction of the baseline.
        recipe: The fine-tuning recipe.
        sensitivity: Returns the dense model's per-layer sensitivity (computed once).
    """

    task: Task
    dense: dict[str, torch.Tensor]
    baseline: float
    tolerance: float
    relative: bool
    recipe: Recipe
    sensitivity: Callable[[], Sensitivity]
    dense_seconds: float = 0.0

    def model(self) -> nn.Module:
        """A copy of the dense model."""
        model = self.task.model(self.recipe.seed)
        model.load_state_dict(self.dense)
        return model

    @property
    def limit(self) -> float:
        """The worst validation metric within budget."""
        amount = self.tolerance * abs(self.baseline) if self.relative else self.tolerance
        return self.baseline - amount if self.task.higher_is_better else self.baseline + amount

    @property
    def total_steps(self) -> int:
        """Optimizer steps of one trial."""
        return self.recipe.epochs * self.task.steps_per_epoch

    @property
    def update_every(self) -> int:
        """Steps between mask updates: the recipe's, at most a quarter of the trial."""
        return min(self.recipe.update_every, max(1, self.total_steps // 4))

    def ramp_end(self) -> int:
        """Last step of the sparsity ramp: a mask update step the trial reaches."""
        every = self.update_every
        last = (self.total_steps - 1) // every * every
        return max(every, min(int(self.recipe.ramp * self.total_steps) // every * every, last))


@torch.no_grad()
def sparse_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of the linear and convolution layers on ``example``.

    Returns ``(dense, nonzero)``: all of them, and those with a non-zero weight (what a
    kernel that skips zeros would do): each output position of a layer costs one MAC per
    weight, so a layer costs ``positions * numel(W)`` dense and ``positions * nnz(W)``.
    """
    counts = [0, 0]

    def hook(module: nn.Module, _: Any, out: torch.Tensor) -> None:
        weight = module.get_parameter("weight")
        positions = out.numel() // out.shape[1] if out.dim() > 1 else 1
        counts[0] += positions * weight.numel()
        counts[1] += positions * int(torch.count_nonzero(weight))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    was = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was)
        for handle in handles:
            handle.remove()
    return counts[0], counts[1]


def measure(setting: Setting, model: nn.Module) -> dict[str, float]:
    """Validation and test metric, sparsity of the default targets, MACs of one example."""
    task = setting.task
    weights = [t.param for t in resolve_targets(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    data = getattr(task, "data", None)
    dense, nonzero = (0, 0) if data is None else sparse_macs(model, data.val.x[:1])
    return {"val": read_metric(task.evaluate(model, "val"), task.metric),
            "test": read_metric(task.evaluate(model, "test"), task.metric),
            "sparsity": zeros / sum(w.numel() for w in weights),
            "macs": float(nonzero), "dense_macs": float(dense)}


def finetune(setting: Setting, model: nn.Module, optimizer: torch.optim.Optimizer,
             step: Callable[[int], Any], observe: Callable[[float], Any] | None = None
             ) -> dict[str, list[float]]:
    """Train ``recipe.epochs`` epochs with a cosine-decayed learning rate.

    ``step`` runs right after each ``optimizer.step()``; ``observe`` gets the validation
    metric after each epoch. Returns per-epoch ``val`` and ``sparsity``.
    """
    task = setting.task
    total = setting.total_steps
    lr = ScheduledLR(optimizer, Cosine(1.0, 0.0, end_step=max(1, total)))
    history: dict[str, list[float]] = {"val": [], "sparsity": []}
    targets = resolve_targets(model)
    for epoch in range(setting.recipe.epochs):
        task.train_epoch(model, optimizer, epoch=epoch, callbacks=[step, lambda _: lr.step()])
        value = read_metric(task.evaluate(model, "val"), task.metric)
        history["val"].append(value)
        history["sparsity"].append(sum(int((t.param == 0).sum()) for t in targets)
                                   / sum(t.param.numel() for t in targets))
        if observe is not None:
            observe(value)
    return history


Method = Callable[[Setting, Config], tuple[nn.Module, dict[str, float], dict[str, Any]]]
#: Method name -> how a configuration with that ``method`` is trained.
METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    """Decorator adding a method ``(setting, config) -> (model, metrics, extra)``."""

    def deco(method: Method) -> Method:
        METHODS[name] = method
        return method

    return deco


def run_method(setting: Setting, config: Config) -> tuple[nn.Module, dict[str, float],
                                                            dict[str, Any]]:
    """Train ``config`` (its ``method`` names an entry of :data:`METHODS`) and measure it.

    Raises:
        ValueError: for an unknown method, listing the known ones.
    """
    name = config.get("method")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    start = time.perf_counter()
    model, metrics, extra = METHODS[name](setting, config)
    return model, {"seconds": time.perf_counter() - start, **measure(setting, model),
                   **metrics}, extra


def _stepper(pruner: Pruner) -> Callable[[int], None]:
    def step(_: int) -> None:
        pruner.step()

    return step


def _start(setting: Setting) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = setting.model()
    lr = setting.recipe.lr_scale * float(getattr(setting.task, "lr", 1.0))
    return model, setting.task.optimizer(model, lr)


@register_method("dense")
def _dense(setting: Setting, config: Config) -> tuple[nn.Module, dict[str, float], dict]:
    """The dense model, as trained."""
    return setting.model(), {"seconds": setting.dense_seconds}, {}


@register_method("gradual")
def _gradual(setting: Setting, config: Config) -> tuple[nn.Module, dict[str, float], dict]:
    """Cubic schedule (Zhu & Gupta 2017) to ``sparsity``, uniform over targets."""
    model, opt = _start(setting)
    every = setting.update_every
    schedule = Cubic(0.0, float(config["sparsity"]), 0, setting.ramp_end(), frequency=every)
    pruner = Pruner(model, schedule, config.get("criterion", "magnitude"),
                    scope=config.get("scope", "layer"), update_every=every, optimizer=opt)
    history = finetune(setting, model, opt, _stepper(pruner))
    return model, {}, {"history": history}


@register_method("oneshot")
def _oneshot(setting: Setting, config: Config) -> tuple[nn.Module, dict[str, float], dict]:
    """Prune to ``sparsity`` at once, then fine-tune with the masks fixed."""
    model, opt = _start(setting)
    pruner = Pruner(model, float(config["sparsity"]), config.get("criterion", "magnitude"),
                    scope=config.get("scope", "layer"), optimizer=opt)
    pruner.update()
    history = finetune(setting, model, opt, _stepper(pruner))
    return model, {}, {"history": history}


@register_method("clipping")
def _clipping(setting: Setting, config: Config) -> tuple[nn.Module, dict[str, float], dict]:
    """Dynamic weight clipping, the threshold rising linearly to ``threshold``."""
    model, opt = _start(setting)
    threshold = Linear(0.0, float(config["threshold"]), end_step=setting.ramp_end())
    pruner = Pruner(model, None, Clipping(threshold=threshold),
                    update_every=setting.update_every, optimizer=opt)
    history = finetune(setting, model, opt, _stepper(pruner))
    return model, {}, {"history": history}


def _controlled(setting: Setting, controller: LevelController, pruner: Pruner,
                model: nn.Module, opt: torch.optim.Optimizer
                ) -> tuple[nn.Module, dict[str, float], dict]:
    controller.attach(pruner)
    history = finetune(setting, model, opt, _stepper(pruner), controller.observe)
    outcome = controller.finish()
    extra = {"history": history, "message": outcome.message,
             "decisions": [asdict(o) for o in controller.history]}
    return model, {"level": outcome.level, "rollbacks": float(outcome.rollbacks)}, extra


def _budget_options(setting: Setting) -> dict[str, Any]:
    task = setting.task
    return {"baseline": setting.baseline, "tolerance": setting.tolerance,
            "relative": setting.relative, "metric": task.metric,
            "higher_is_better": task.higher_is_better, "patience": setting.recipe.patience}


@register_method("budget")
def _budget(setting: Setting, config: Config) -> tuple[nn.Module, dict[str, float], dict]:
    """:class:`~secateurs.controllers.Budget` on a cubic schedule, per-layer sparsities
    from the sensitivity analysis (``allocation="sensitivity"``) or uniform."""
    model, opt = _start(setting)
    every, final = setting.update_every, setting.recipe.final
    allocation = None
    if config.get("allocation", "sensitivity") == "sensitivity":
        sens = setting.sensitivity()
        final = min(final, sens.max_overall() - 1e-6)
        allocation = sens.allocate
    budget = Budget(Cubic(0.0, final, 0, setting.ramp_end(), frequency=every),
                    allocation=allocation, **_budget_options(setting))
    pruner = Pruner(model, budget.sparsity, config.get("criterion", "magnitude"),
                    update_every=every, optimizer=opt)
    return _controlled(setting, budget, pruner, model, opt)


@register_method("adaptive-clipping")
def _adaptive_clipping(setting: Setting, config: Config
                       ) -> tuple[nn.Module, dict[str, float], dict]:
    """:class:`~secateurs.controllers.ThresholdAdapter` raising the clipping threshold
    linearly towards ``threshold``."""
    model, opt = _start(setting)
    adapter = ThresholdAdapter(Linear(0.0, float(config["threshold"]),
                                      end_step=setting.ramp_end()), **_budget_options(setting))
    pruner = Pruner(model, None, Clipping(threshold=adapter.threshold),
                    update_every=setting.update_every, optimizer=opt)
    return _controlled(setting, adapter, pruner, model, opt)
