"""The layer-wise pipeline of sequential one-shot pruning: cost linear in depth.

A transformer is a stem (embeddings), a stack of repeated blocks (``encoder.layer.N``,
``model.layers.N``, ``transformer.h.N``) each feeding the next, and a head. Pruning block
``k`` on the outputs of the blocks already pruned does not need the whole model for each
block (that costs the square of the depth); as SparseGPT and Wanda do (their
``inps``/``outs``), :class:`BlockPipeline`

1. runs the stem once per calibration batch and records the call of block 0: the hidden
   states and every other argument it receives (attention masks, position ids, rotary
   ``position_embeddings``; caches switched off);
2. for block ``k``: runs the block alone on the recorded inputs to collect its targets'
   statistics (:meth:`BlockPipeline.observe`); the caller prunes it; then runs the pruned
   block once more on the same inputs, whose outputs become block ``k + 1``'s inputs
   (:meth:`BlockPipeline.advance`). The other arguments are replayed unchanged.

Each block runs twice per batch, the stem once: the calibration cost of the whole model
is about that of two forward passes, whatever the depth.

Peak memory, on the model's device: the weights, plus the hidden states of one block's
inputs for every calibration batch (``samples x tokens x hidden`` values in the model's
dtype; a block's outputs replace its inputs batch by batch), plus one block's activations
for one batch, plus the statistics of one block's targets (``F x F`` float64 per target
when ``X^T X`` is collected). The other recorded arguments (masks, position embeddings) are
kept once per batch and shared by every block, as the model shares them.

:func:`plan_blocks` finds the blocks from the model's structure and checks, on one
batch, that the pipeline computes what the model computes (blocks called once each, in
order, each on its predecessor's output, with the same other arguments); where it does
not, it says why, and the caller falls back to whole-model passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..targets import Target
from .collect import (
    Batch,
    Call,
    _run_all,
    _Stop,
    calibrate,
    check_batches,
    eval_mode,
    run_batch,
)
from .observe import Observed, Request

__all__ = ["BlockPipeline", "BlockPlan", "Blocks", "plan_blocks", "repeated_blocks"]

#: Where a block receives its hidden states: ``("arg", index)`` or ``("kwarg", name)``.
Slot = tuple[str, Any]


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks of a model, in the order their container holds them.

    Attributes:
        container: Name of the ``nn.ModuleList`` / ``nn.Sequential`` holding them.
        names: Full module names of the blocks (``encoder.layer.0``, ...).
        modules: The blocks.
    """

    container: str
    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def repeated_blocks(model: nn.Module) -> Blocks | None:
    """The model's stack of repeated blocks: the ``nn.ModuleList`` (or ``nn.Sequential`` of
    two or more) whose children are all of one class and hold the most parameters.

    ``None`` when the model has no such container with parameters.
    """
    best: tuple[int, Blocks] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        if not children or (isinstance(module, nn.Sequential) and len(children) < 2):
            continue
        if len({type(m) for _, m in children}) != 1:
            continue
        size = sum(_size(m) for _, m in children)
        if size and (best is None or size > best[0]):
            prefix = f"{name}." if name else ""
            best = (size, Blocks(name, tuple(prefix + n for n, _ in children),
                                 tuple(m for _, m in children)))
    return None if best is None else best[1]


def _inside(module_name: str, block: str) -> bool:
    return module_name == block or module_name.startswith(block + ".")


@dataclass
class BlockPlan:
    """How sequential pruning runs over one model.

    Attributes:
        blocks: The repeated blocks.
        groups: Per block (same order), the targets inside it.
        stem: Targets outside the blocks, called before block 0.
        tail: Targets outside the blocks, called after the last block (or not at all on
            the probe batch).
        slot: Where the blocks receive their hidden states.
    """

    blocks: Blocks
    groups: list[list[Target]]
    stem: list[Target] = field(default_factory=list)
    tail: list[Target] = field(default_factory=list)
    slot: Slot = ("arg", 0)


def _slot(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Slot | None:
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return ("kwarg", "hidden_states")
    for i, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            return ("arg", i)
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return ("kwarg", key)
    return None


def _get(call: Call, slot: Slot) -> Any:
    kind, key = slot
    if kind == "arg":
        return call.args[key] if key < len(call.args) else None
    return call.kwargs.get(key)


def _put(call: Call, slot: Slot, value: Any) -> Call:
    kind, key = slot
    if kind == "arg":
        return replace(call, args=(*call.args[:key], value, *call.args[key + 1:]))
    return replace(call, kwargs={**call.kwargs, key: value})


def _same(a: Any, b: Any) -> bool:
    """Whether two recorded arguments are the same value (tensors compared by content)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
            and a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a truth value are not the same argument
        return False


def _hidden(output: Any) -> torch.Tensor | None:
    """A block's output hidden states: the output, or its first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    first = getattr(output, "to_tuple", None)
    if callable(first):  # a transformers ModelOutput
        return _hidden(first())
    return None


class _Probe:
    """Hooks that check, on one batch, how the model calls its blocks and other targets.

    Only block 0's call and the latest block output are kept: each later call is compared
    as it happens, so the probe holds one block's inputs at a time.
    """

    def __init__(self, plan: BlockPlan, outside: Sequence[Target]) -> None:
        self.plan = plan
        self.started = 0
        self.finished = 0
        self.first: Call | None = None
        self.previous: torch.Tensor | None = None
        self.problem: str | None = None
        self.when: dict[str, tuple[int, int]] = {}
        self.handles = []
        for i, block in enumerate(plan.blocks.modules):
            self.handles.append(block.register_forward_pre_hook(self._enter(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._leave()))
        for t in outside:
            self.handles.append(t.module.register_forward_pre_hook(self._outside(t.name)))

    def _fail(self, problem: str) -> None:
        self.problem = self.problem or problem

    def _enter(self, index: int) -> Callable[..., None]:
        names = self.plan.blocks.names

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            call = Call(args, kwargs)
            if index != self.started:
                self._fail(f"the blocks of {self.plan.blocks.container!r} are not called once "
                           f"each in order ({names[index]!r} was call {self.started + 1})")
            self.started += 1
            if index == 0:
                slot = _slot(args, kwargs)
                if slot is None:
                    self._fail(f"block {names[0]!r} receives no tensor")
                    return
                self.plan.slot = slot
                self.first = _put(call, slot, None)
            elif self.first is not None and self.problem is None:
                self._check(index, call)
        return hook

    def _check(self, index: int, call: Call) -> None:
        names = self.plan.blocks.names
        assert self.first is not None
        if not _same(_get(call, self.plan.slot), self.previous):
            self._fail(f"block {names[index]!r} does not receive the output of "
                       f"{names[index - 1]!r} (the model computes something between them)")
        elif not _same(_put(call, self.plan.slot, None), self.first):
            self._fail(f"block {names[index]!r} receives other arguments than {names[0]!r} "
                       "(per-block arguments cannot be replayed)")

    def _leave(self) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.finished += 1
            self.previous = _hidden(output)
        return hook

    def _outside(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.when.setdefault(name, (self.started, self.finished))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.first = self.previous = None

    def verdict(self) -> str | None:
        """Why the calls cannot be replayed block by block; ``None`` if they can."""
        n = len(self.plan.blocks.names)
        if self.problem is None and self.started != n:
            self._fail(f"the {n} blocks of {self.plan.blocks.container!r} were called "
                       f"{self.started} times on one batch")
        return self.problem


def plan_blocks(model: nn.Module, targets: Sequence[Target], batches: Iterable[Batch]
                ) -> BlockPlan | str:
    """Plan the layer-wise pipeline for ``targets``, checked on the first batch.

    Returns:
        A :class:`BlockPlan`, or a sentence saying why the pipeline cannot run on this
        model (no repeated blocks, no target inside them, blocks not chained, a target
        called between blocks).

    Raises:
        ValueError: if there is no batch, or the model raises on it.
    """
    blocks = repeated_blocks(model)
    if blocks is None:
        return "the model has no stack of repeated blocks (a ModuleList of one module class)"
    groups: list[list[Target]] = [[] for _ in blocks.names]
    outside: list[Target] = []
    for t in targets:
        hit = [i for i, b in enumerate(blocks.names) if _inside(t.module_name, b)]
        (groups[hit[0]] if hit else outside).append(t)
    if not any(groups):
        return f"no target lies inside the repeated blocks of {blocks.container!r}"
    plan = BlockPlan(blocks, groups)
    probe = _Probe(plan, outside)
    try:
        with torch.no_grad(), eval_mode(model):
            _run_all(model, _first(batches), False, "probe", lambda b: run_batch(model, b))
    finally:
        probe.remove()
    problem = probe.verdict()
    if problem is not None:
        return problem
    n = len(blocks.names)
    for t in outside:
        started, finished = probe.when.get(t.name, (n, n))
        if started == 0:
            plan.stem.append(t)
        elif finished == n:
            plan.tail.append(t)
        else:
            return f"target {t.name!r} lies outside the blocks but is called between them"
    return plan


def _first(batches: Iterable[Batch]) -> Iterable[Batch]:
    for batch in check_batches(batches):
        return [batch]
    return []


def _offline(value: Any) -> Any:
    """A cache object becomes ``None``: replayed calls must not write to one."""
    cls = type(value)
    if cls.__name__.endswith("Cache") and cls.__module__.startswith("transformers."):
        return None
    return value


def _uncached(call: Call) -> Call:
    kwargs = {k: _offline(v) for k, v in call.kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return Call(tuple(_offline(v) for v in call.args), kwargs)


class BlockPipeline:
    """Block-by-block calibration over recorded block inputs (see the module docstring).

    Args:
        model: The model; its weights are read as they are when each block runs.
        batches: Calibration batches (read once, by :meth:`capture`).
        plan: From :func:`plan_blocks`.
        progress: Show progress bars.

    Attributes:
        block_calls: Calls of single blocks made so far (one per batch per
            :meth:`observe` and per :meth:`advance`).
    """

    def __init__(self, model: nn.Module, batches: Iterable[Batch], plan: BlockPlan, *,
                 progress: bool = True) -> None:
        self.model = model
        self.batches = batches
        self.plan = plan
        self.progress = progress
        self.calls: list[Call] = []
        self.block_calls = 0

    def capture(self) -> None:
        """Run the stem once per batch and record block 0's call (the rest is skipped)."""
        calls: list[Call] = []

        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.append(_uncached(Call(args, kwargs)))
            raise _Stop

        handle = self.plan.blocks.modules[0].register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad(), eval_mode(self.model):
                _run_all(self.model, self.batches, self.progress, "capture",
                         lambda b: run_batch(self.model, b))
        finally:
            handle.remove()
        self.calls = calls

    def observe(self, index: int, targets: Sequence[Target], request: Request) -> Observed:
        """Statistics of ``targets`` (inside block ``index``) from running that block on its
        recorded inputs. Gradient requests need the whole model: not supported here.

        Raises:
            ValueError: as :func:`~secateurs.calibration.calibrate` does, or for a request
                with a loss.
        """
        if request.loss is not None:
            raise ValueError("gradients of a loss need whole-model passes; the layer-wise "
                             "pipeline runs one block at a time")
        out = Observed()
        if request.inputs and targets:
            out.inputs = calibrate(self.plan.blocks.modules[index], self.calls, targets,
                                   hessian=request.hessian, powers=request.powers,
                                   progress=False)
            out.passes = 1
            self.block_calls += len(self.calls)
        return out

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Run block ``index`` as it is now on its inputs; its outputs become the inputs of
        block ``index + 1``."""
        block = self.plan.blocks.modules[index]
        slot = self.plan.slot
        with eval_mode(block):
            for i, call in enumerate(tqdm(self.calls, desc=self.plan.blocks.names[index],
                                          disable=not self.progress, leave=False)):
                hidden = _hidden(run_batch(block, call))
                if hidden is None:
                    raise ValueError(f"block {self.plan.blocks.names[index]!r} returned no "
                                     "tensor (its hidden states are the output or its first "
                                     "element)")
                self.calls[i] = _put(call, slot, hidden)
        self.block_calls += len(self.calls)
