"""The MNIST-1D task: Greydanus (2020)'s one-dimensional digits and the paper's small CNN.

MNIST-1D ("Scaling down deep learning", Greydanus 2020, arXiv:2011.14439) turns ten
hand-made 1-D digit templates into sequences of 40 values by random padding, translation,
scaling, shear and correlated and i.i.d. noise. It is much harder than its size suggests:
logistic regression reaches about 32%, an MLP about 68% and the paper's three-layer CNN
about 94% (4,000 training examples).

The data are *generated* here by the ``mnist1d`` package's ``make_dataset`` (the optional
extra ``secateurs[tasks]``), never downloaded: its ``get_dataset`` fetches a pickle over
the network by default, so it is not used. Generating 5,000 examples takes a few seconds;
the arrays are cached as a small ``.npz`` file (under ``$SECATEURS_CACHE``, else
``~/.cache/secateurs``) when that folder is writable, and in memory for the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import validation as check
from ..train import Split, Splits
from . import ClassificationTask, register_task

__all__ = ["MNIST1DCNN", "load_mnist1d_splits", "mnist1d_arrays", "mnist1d_task"]

#: Length of every generated sequence (the package's ``final_seq_length``).
LENGTH = 40


def _cache_dir() -> Path:
    root = os.environ.get("SECATEURS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "secateurs"


def _generate(options: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run ``mnist1d``'s generator with ``options`` over its defaults, offline.

    ``make_dataset`` seeds the global ``random`` and ``numpy`` generators: their states are
    restored afterwards, so generating the data changes nothing else in the process.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:  # the package is an optional extra
        raise ImportError("the mnist1d task needs the 'mnist1d' package: "
                          "pip install 'secateurs[tasks]'") from error
    args = get_dataset_args()
    for key, value in options.items():
        setattr(args, key, value)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


@lru_cache(maxsize=4)
def _arrays(key: str) -> dict[str, np.ndarray]:
    options = json.loads(key)
    path = _cache_dir() / f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return {k: stored[k] for k in stored.files}
    arrays = _generate(options)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, x=arrays["x"], y=arrays["y"], x_test=arrays["x_test"],
                            y_test=arrays["y_test"])
    except OSError:  # a read-only home only costs the regeneration next time
        pass
    return arrays


def mnist1d_arrays(num_samples: int = 5000, seed: int = 42) -> dict[str, np.ndarray]:
    """The generated data: ``x``, ``y`` (first 80%) and ``x_test``, ``y_test`` (last 20%).

    Args:
        num_samples: Examples generated, split into equal numbers per class.
        seed: Seed of the generator (42 is the paper's data set).

    Raises:
        ArgumentTypeError: if ``num_samples`` or ``seed`` is not an integer.
        ValueError: if ``num_samples`` is below 100.
    """
    num_samples = check.integer("num_samples", num_samples, low=100)
    seed = check.integer("seed", seed)
    return _arrays(json.dumps({"num_samples": num_samples, "seed": seed}, sort_keys=True))


def load_mnist1d_splits(seed: int = 0, *, num_samples: int = 5000, val_fraction: float = 0.1,
                        data_seed: int = 42) -> Splits:
    """MNIST-1D as ``(N, 1, 40)`` float32 sequences and int64 labels, split three ways.

    The test split is the generator's own (the last 20% of ``num_samples``); validation
    examples are a stratified ``val_fraction`` of its training part, drawn with ``seed``.

    Raises:
        ArgumentTypeError: if ``val_fraction`` is not a number.
        ValueError: if ``val_fraction`` is not in ``(0, 1)``.
    """
    from sklearn.model_selection import train_test_split  # scikit-learn loads in ~1 s

    val_fraction = check.number("val_fraction", val_fraction, low=0.0, high=1.0,
                                low_open=True, high_open=True)
    arrays = mnist1d_arrays(num_samples, data_seed)
    labels = arrays["y"]
    train, val = train_test_split(np.arange(len(labels)), test_size=val_fraction,
                                  random_state=seed, stratify=labels)

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(torch.tensor(x, dtype=torch.float32).reshape(len(x), 1, -1),
                     torch.tensor(y, dtype=torch.int64))

    x, y = arrays["x"], labels
    return Splits(split(x[np.sort(train)], y[np.sort(train)]),
                  split(x[np.sort(val)], y[np.sort(val)]),
                  split(arrays["x_test"], arrays["y_test"]))


class MNIST1DCNN(nn.Module):
    """The CNN of the MNIST-1D paper: three strided 1-D convolutions and a linear layer.

    ``conv(1->c, k5, s2) -> ReLU -> conv(c->c, k3, s2) -> ReLU -> conv(c->c, k3, s2) -> ReLU
    -> linear(5c -> classes)`` on sequences of 40 (lengths 19, 10, 5); with ``c = 25``, the
    paper's width, 5,210 parameters.

    Args:
        channels: Channels of every convolution.
        num_classes: Number of outputs.
    """

    def __init__(self, channels: int = 25, num_classes: int = 10) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv1d(1, c, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(c * 5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` for sequences ``(batch, 1, 40)``."""
        return self.classifier(self.features(x))


def _adam(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


@register_task("mnist1d")
def mnist1d_task(seed: int = 0, *, num_samples: int = 5000, channels: int = 25,
                 val_fraction: float = 0.1, epochs: int = 60) -> ClassificationTask:
    """The MNIST-1D task: :func:`load_mnist1d_splits` and :class:`MNIST1DCNN`.

    Recipe as in the paper: Adam at learning rate 0.01, batches of 100.

    Args:
        seed: Seed of the validation split and of the batch order.
        num_samples: Examples generated (80% for training and validation, 20% for test).
        channels: Width of the CNN (25 in the paper).
        val_fraction: Share of the training part held out for validation.
        epochs: Epochs of dense training.

    Raises:
        ArgumentTypeError: if an option has the wrong type.
        ValueError: if an option is out of range (``channels``, ``epochs`` >= 1).
    """
    channels = check.integer("channels", channels, low=1)
    epochs = check.integer("epochs", epochs, low=1)
    data = load_mnist1d_splits(seed, num_samples=num_samples, val_fraction=val_fraction)
    return ClassificationTask("mnist1d", data, lambda: MNIST1DCNN(channels), num_classes=10,
                              lr=0.01, batch_size=100, epochs=epochs, make_optimizer=_adam,
                              seed=seed)
