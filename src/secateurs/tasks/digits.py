"""The digits task: scikit-learn's 8x8 handwritten digits and a small CNN.

The data are the 1,797 images of ``sklearn.datasets.load_digits`` (the test part of the
UCI "Optical Recognition of Handwritten Digits" set, 10 classes, pixel values 0..16),
shipped inside scikit-learn, so nothing is downloaded. Training the CNN takes seconds
on a CPU, which is what a demonstration and an end-to-end test need.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from .. import validation as check
from ..train import Split, Splits
from . import ClassificationTask, register_task

__all__ = ["DigitsCNN", "digits_task", "load_digits_splits", "split_indices"]

#: Largest pixel value of the digits images; dividing by it scales inputs to [0, 1].
PIXEL_MAX = 16.0


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # scikit-learn loads in ~1 s: only when used

    images, labels = load_digits(return_X_y=True)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_indices(
    labels: np.ndarray, seed: int = 0, *, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified train / validation / test indices into ``labels``.

    Test examples are drawn first (``test_fraction`` of all), then validation examples
    (``val_fraction`` of all) from the rest; each split keeps the class proportions.

    Args:
        labels: Class label of every example.
        seed: Seed of the draw; the same seed gives the same indices.
        val_fraction: Share of all examples held out for validation.
        test_fraction: Share of all examples held out for the test.

    Returns:
        Sorted ``(train, val, test)`` index arrays: disjoint, covering every example.

    Raises:
        ArgumentTypeError: if a fraction is not a number.
        ValueError: if a fraction is outside ``(0, 1)`` or they sum to 1 or more.
    """
    from sklearn.model_selection import train_test_split

    val_fraction = check.number("val_fraction", val_fraction, low=0.0, high=1.0,
                                low_open=True, high_open=True)
    test_fraction = check.number("test_fraction", test_fraction, low=0.0, high=1.0,
                                 low_open=True, high_open=True)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1 to leave training "
                         f"examples, got {val_fraction} + {test_fraction}")
    everything = np.arange(len(labels))
    rest, test = train_test_split(everything, test_size=test_fraction, random_state=seed,
                                  stratify=labels)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                  random_state=seed, stratify=labels[rest])
    return np.sort(train), np.sort(val), np.sort(test)


def load_digits_splits(
    seed: int = 0, *, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> Splits:
    """The digits as ``(N, 1, 8, 8)`` float32 images in ``[0, 1]`` and int64 labels, split.

    Args:
        seed: Seed of the stratified split (see :func:`split_indices`).
        val_fraction: Share of all examples held out for validation.
        test_fraction: Share of all examples held out for the test.
    """
    images, labels = _raw()
    parts = split_indices(labels, seed, val_fraction=val_fraction, test_fraction=test_fraction)
    x = torch.tensor(images / PIXEL_MAX, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels, dtype=torch.int64)
    train, val, test = (Split(x[torch.from_numpy(i)], y[torch.from_numpy(i)]) for i in parts)
    return Splits(train, val, test)


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: two 3x3 convolutions, a 2x2 max-pool, two linear layers.

    ``conv(1->c1) -> ReLU -> conv(c1->c2) -> ReLU -> maxpool 2 -> linear(16*c2 -> hidden)
    -> ReLU -> linear(hidden -> classes)``; with the defaults, 38,282 parameters.

    Args:
        channels: Output channels of the two convolutions.
        hidden: Width of the hidden linear layer.
        num_classes: Number of outputs.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64,
                 num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` for images ``(batch, 1, 8, 8)``."""
        return self.classifier(self.features(x))


@register_task("digits")
def digits_task(
    seed: int = 0, *, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> ClassificationTask:
    """The digits task: splits from :func:`load_digits_splits`, model :class:`DigitsCNN`.

    Recipe: SGD with Nesterov momentum at learning rate 0.1, batches of 64, 30 epochs.
    """
    data = load_digits_splits(seed, val_fraction=val_fraction, test_fraction=test_fraction)
    return ClassificationTask("digits", data, DigitsCNN, num_classes=10, lr=0.1, batch_size=64,
                              epochs=30, seed=seed)
