"""A (compacted) model to ONNX, with an onnxruntime parity check.

Uses ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter (the
TorchScript one is deprecated since PyTorch 2.9); it runs offline. Needs the optional
extra ``pip install secateurs[export]`` (onnx, onnxscript, onnxruntime).

A compacted model (:func:`secateurs.structured.compact_`) is an ordinary, smaller
``nn.Module``, so it exports like any other; an unstructured-sparse model exports too,
with its zeros stored densely.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from ..checkpoint import write_atomic

__all__ = ["OnnxExport", "ParityError", "check_onnx", "export_onnx"]


class ParityError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: The ``.onnx`` file.
        opset: The ONNX opset version.
        max_abs_diff: Largest ``|onnxruntime - torch|`` over the checked outputs, or
            ``None`` when not checked.
    """

    path: Path
    opset: int
    max_abs_diff: float | None


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is needed for ONNX export; install the extra: "
                          "pip install 'secateurs[export]'") from None


def _as_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments from a tensor, a tuple/list, or a dict."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise TypeError("example_inputs must be a tensor, a tuple of positional arguments or a "
                    f"dict of keyword arguments, got {type(example_inputs).__name__}")


def _inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The first dimension of every tensor input is one shared dynamic ``batch``."""
    batch = torch.export.Dim("batch")

    def spec(x: Any) -> Any:
        return {0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    return pytree.tree_map(spec, kwargs) if kwargs else pytree.tree_map(spec, args)


def _doubled(x: Any) -> Any:
    return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    opset: int = 18,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> OnnxExport:
    """Export ``model`` (in eval mode) to ONNX and, by default, check it with onnxruntime.

    Args:
        model: Any ``nn.Module``, e.g. a compacted one. Its training flags are restored.
        example_inputs: A tensor, a tuple of positional arguments, or a dict of keyword
            arguments.
        path: Destination ``.onnx`` file (written atomically).
        dynamic_batch: Let the first dimension of every input vary (the examples need a
            batch of 2 or more, as ``torch.export`` specialises sizes 0 and 1).
        opset: ONNX opset version.
        check: Run :func:`check_onnx` on the examples (and, with ``dynamic_batch``, on a
            batch twice as large).
        rtol: Relative tolerance of the parity check.
        atol: Absolute tolerance of the parity check.

    Returns:
        The path, opset and the measured largest difference.

    Raises:
        ImportError: without the ``export`` extra.
        TypeError: for examples of an unsupported type.
        ValueError: for a batch of 1 with ``dynamic_batch``.
        ParityError: if onnxruntime's outputs differ beyond the tolerance (the file stays,
            for inspection).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _as_args(example_inputs)
    tensors = _inputs(args, kwargs)
    if not tensors:
        raise ValueError("example_inputs hold no tensor to export with")
    if dynamic_batch and any(x.dim() == 0 or x.shape[0] < 2 for x in tensors):
        raise ValueError(f"dynamic_batch needs example inputs with a batch of 2 or more, got "
                         f"shapes {[tuple(x.shape) for x in tensors]}; pass a larger batch "
                         "or dynamic_batch=False")
    _require("onnxscript")
    with _eval(model), torch.no_grad(), warnings.catch_warnings():
        # torch.export's own deprecation notices, not the caller's to act on.
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
            dynamic_shapes=_dynamic_shapes(args, kwargs) if dynamic_batch else None,
            verbose=False, report=False)
    assert program is not None
    out = write_atomic(path, lambda tmp: program.save(str(tmp)))
    diff = None
    if check:
        diff = check_onnx(out, model, example_inputs, rtol=rtol, atol=atol)
        if dynamic_batch:
            doubled = pytree.tree_map(_doubled, example_inputs)
            diff = max(diff, check_onnx(out, model, doubled, rtol=rtol, atol=atol))
    return OnnxExport(out, opset, diff)


def check_onnx(path: str | os.PathLike[str], model: nn.Module, example_inputs: Any, *,
               rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Run the ONNX file with onnxruntime (CPU) and compare with ``model`` in eval mode.

    Returns:
        The largest absolute difference over every output element.

    Raises:
        ParityError: unless ``|ort - torch| <= atol + rtol * |torch|`` everywhere (and the
            output structure matches).
    """
    ort = _require("onnxruntime")
    args, kwargs = _as_args(example_inputs)
    tensors = _inputs(args, kwargs)
    with _eval(model), torch.no_grad():
        expected = [x.detach().cpu().numpy() for x in pytree.tree_leaves(model(*args, **kwargs))
                    if isinstance(x, torch.Tensor)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ParityError(f"{str(path)!r} takes {len(names)} inputs ({names}), the examples "
                          f"hold {len(tensors)} tensors")
    feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, tensors, strict=True)}
    got = session.run(None, feeds)
    if len(got) != len(expected):
        raise ParityError(f"onnxruntime gave {len(got)} outputs, PyTorch {len(expected)}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a.shape != b.shape:
            raise ParityError(f"output {i}: shape {a.shape} from onnxruntime, {b.shape} from "
                              "PyTorch")
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        worst = max(worst, float(diff.max(initial=0.0)))
        if not bool(np.all(diff <= atol + rtol * np.abs(b.astype(np.float64)))):
            raise ParityError(f"output {i} of {str(path)!r} differs from PyTorch by up to "
                              f"{float(diff.max()):.3g} (atol={atol}, rtol={rtol})")
    return worst
