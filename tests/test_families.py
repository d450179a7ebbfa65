"""The model-family conformance suite: every family through element, 2:4 and channel pruning.

Each family is a small random-init instance of its real ``transformers`` class
(:mod:`families`); 2:4 is checked along the reduction dimension each layer really has
(``(in, out)`` for GPT-2's ``Conv1D``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.targets import Target, is_transposed_linear, resolve_targets

pytest.importorskip("transformers")

from families import NAMES, family, main_output


def _dense_convs(name: str, module: nn.Module) -> bool:
    # The default targets, less grouped convolutions: input statistics need groups=1 (a
    # depthwise convolution's patches differ per group).
    layer = isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) \
        or is_transposed_linear(module)
    return layer and getattr(module, "groups", 1) == 1


def _nm_ready(name: str, module: nn.Module) -> bool:
    t = Target(f"{name}.weight", name, module, "weight")
    return _dense_convs(name, module) and t.row_shape[1] % 4 == 0


@pytest.mark.parametrize("name", NAMES)
def test_element_pruning_with_contribution_hits_the_sparsity_of_every_row(name):
    fam = family(name)
    model = fam.build()
    batches = fam.batches()
    report = sc.prune_(model, 0.5, "contribution", batches, targets=_dense_convs,
                       progress=False)
    assert report.targets
    for t in resolve_targets(model, _dense_convs):
        rows = t.rows(t.param.detach()).flatten(1)
        zeros = (rows == 0).sum(1)
        half = rows.shape[1] * 0.5
        assert bool(((zeros - half).abs() <= 1).all()), t.name
    with torch.no_grad():
        out = main_output(model(**batches[0]))
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", NAMES)
def test_two_four_runs_along_each_layers_reduction_dimension(name):
    fam = family(name)
    model = fam.build()
    sc.prune_(model, None, "magnitude", granularity="2:4", targets=_nm_ready, progress=False)
    targets = resolve_targets(model, _nm_ready)
    assert targets
    for t in targets:
        rows = t.rows(t.param.detach())  # (out, in, *kernel)
        groups = rows.movedim(1, -1).reshape(*rows.shape[:1], *rows.shape[2:], -1, 4)
        assert bool(((groups != 0).sum(-1) <= 2).all()), t.name
        assert float((rows == 0).float().mean()) == pytest.approx(0.5, abs=0.01), t.name


def _compacted(name: str) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """The family pruned at 50% of every channel group that can go, compacted; its inputs
    and the masked model's output."""
    fam = family(name)
    model = fam.build()
    example, batch = fam.inputs(2, 0), fam.inputs(4, 1)
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=example)
    pruner.update()
    pruner.close()
    with torch.no_grad():
        masked = main_output(model(**batch))
    before = sum(p.numel() for p in model.parameters())
    sc.compact_(model, example, masks=pruner.masks)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * before
    return model, batch, masked


@pytest.mark.parametrize("name", NAMES)
def test_channel_pruning_compacts_to_the_masked_models_outputs(name):
    model, batch, masked = _compacted(name)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**batch)), masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_compacted_model_saves_and_reloads_to_the_same_outputs(name, tmp_path):
    from secateurs.export import load_compacted, save_compacted

    model, batch, masked = _compacted(name)
    save_compacted(model, tmp_path / name)
    loaded = load_compacted(tmp_path / name).eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**batch)), masked, atol=1e-5, rtol=0)
