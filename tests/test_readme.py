"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _namespace() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
              for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    import secateurs as sc

    return {"sc": sc, "model": model, "loader": loader, "loss_fn": nn.functional.cross_entropy,
            "opt": opt, "torch": torch, "nn": nn}


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _namespace()
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), namespace)
    # Whatever the example built is still a working model.
    out = namespace["model"](torch.randn(2, 16))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
