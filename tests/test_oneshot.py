"""One-shot pruning (prune_) on small models: the same path as the real-model benchmark."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SmallCNN
from secateurs import Pruner
from secateurs.criteria import Contribution, Taylor
from secateurs.oneshot import PruneReport, block_of, prune_
from secateurs.reconstruction import Reconstruction


class Block(nn.Module):
    """A transformer encoder block with the layer names of BERT."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        bias = (1.0 - attention_mask[:, None, :].float()) * -1e4
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]) + bias, -1)
        x = self.norm1(x + self.out(att @ v))
        return self.norm2(x + self.down(F.gelu(self.up(x))))


class TinyEncoder(nn.Module):
    """Takes ``input_ids`` and ``attention_mask`` keyword arguments, as BERT does."""

    def __init__(self, vocab: int = 40, d: int = 16, hidden: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, hidden) for _ in range(depth))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, attention_mask)
        return x


def encoder_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 40, (4, 7), generator=g)
        mask = torch.ones(4, 7, dtype=torch.long)
        mask[:2, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def in_layers(name: str, module: nn.Module) -> bool:
    return name.startswith("layers.") and isinstance(module, nn.Linear)


@pytest.fixture
def encoder() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder().eval()


@torch.no_grad()
def distance(model: nn.Module, dense: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    return sum(float((model(**b) - dense(**b)).square().mean()) for b in batches)


def test_tiny_encoder_sequential_reconstruction(encoder):
    dense = copy.deepcopy(encoder)
    calib, held = encoder_batches(6, 0), encoder_batches(3, 1)
    keys = list(encoder.state_dict())
    plain = copy.deepcopy(encoder)
    prune_(plain, 0.5, "contribution", calib, targets=in_layers, progress=False)
    report = prune_(encoder, 0.5, Contribution(p=2), calib, scope="row", targets=in_layers,
                    reconstruct=True, sequential=True, progress=False)
    assert isinstance(report, PruneReport) and list(encoder.state_dict()) == keys
    assert len(report.targets) == 18 and report.passes == 3
    assert [r.stage for r in report.targets[::6]] == ["layers.0", "layers.1", "layers.2"]
    assert all(r.sparsity == 0.5 and 0 < r.relative_error < 1 for r in report.targets)
    assert report.sparsity() == 0.5 and report.seconds > 0
    assert not any(m._forward_pre_hooks for m in encoder.modules())
    assert distance(encoder, dense, held) < distance(plain, dense, held)
    assert "total sparsity 50.0%" in str(report)


def test_masks_and_weights_agree_and_keys_stay(encoder):
    report = prune_(encoder, 0.6, "contribution", encoder_batches(2, 0), scope="layer",
                    targets=in_layers, progress=False)
    for name, mask in report.masks.items():
        w = encoder.get_parameter(name)
        assert bool((w[~mask] == 0).all())
        assert abs((~mask).sum().item() - round(0.6 * mask.numel())) == 0


def count_block_calls(encoder: TinyEncoder) -> dict[int, int]:
    calls = {i: 0 for i in range(len(encoder.layers))}
    for i, block in enumerate(encoder.layers):
        block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_sequential_runs_each_block_twice_per_batch(encoder):
    calls = count_block_calls(encoder)
    report = prune_(encoder, 0.5, "contribution", encoder_batches(4, 0), targets=in_layers,
                    sequential=True, progress=False)
    # One probe call; then per block its statistics and its pruned outputs on the 4
    # batches (the last block's outputs feed nothing).
    assert calls == {0: 1 + 2 * 4, 1: 1 + 2 * 4, 2: 1 + 1 * 4}
    assert report.mode == "blocks" and report.block_calls == 5 * 4 and report.passes == 3


def test_custom_stages_run_whole_model_passes_that_stop_before_the_next_stage(encoder):
    calls = count_block_calls(encoder)
    report = prune_(encoder, 0.5, "contribution", encoder_batches(4, 0), targets=in_layers,
                    sequential=True, stages=block_of, progress=False)
    # One probe call, then stage k completes blocks 0..k on the 4 batches and stops.
    assert calls == {0: 1 + 3 * 4, 1: 1 + 2 * 4, 2: 1 + 1 * 4}
    assert report.mode == "stages" and "custom stages" in report.notes[0]


def test_one_pass_iterator_is_replayed_for_sequential_stages(encoder):
    twin = copy.deepcopy(encoder)
    batches = encoder_batches(3, 0)
    prune_(encoder, 0.5, "contribution", batches, targets=in_layers, reconstruct=True,
           sequential=True, progress=False)
    prune_(twin, 0.5, "contribution", iter(batches), targets=in_layers, reconstruct=True,
           sequential=True, progress=False)
    for a, b in zip(encoder.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_custom_stages_and_global_scope(encoder):
    report = prune_(encoder, 0.5, "contribution", encoder_batches(2, 0), targets=in_layers,
                    scope="global", sequential=False, progress=False)
    assert report.passes == 1 and report.sparsity() == pytest.approx(0.5, abs=1e-3)
    report = prune_(encoder, 0.5, "contribution", encoder_batches(2, 0), targets=in_layers,
                    sequential=True, stages=lambda name: "all", progress=False)
    assert report.passes == 1 and {r.stage for r in report.targets} == {"all"}


def test_cnn_with_conv_and_linear_targets():
    torch.manual_seed(0)
    cnn = SmallCNN().eval()
    calib = [torch.rand(16, 1, 8, 8) for _ in range(2)]
    dense, plain = copy.deepcopy(cnn), copy.deepcopy(cnn)
    measured = prune_(plain, 0.5, "contribution", calib, measure_error=True, progress=False)
    report = prune_(cnn, 0.5, "contribution", calib, reconstruct=True, sequential=False,
                    progress=False)
    assert [r.stage for r in report.targets] == [""] * 4
    for rec, base in zip(report.targets, measured.targets, strict=True):
        assert rec.relative_error <= base.relative_error + 1e-6
        features = math.prod(rec.shape[1:])
        # Row scope removes round(s * F) per row, dead inputs (ReLU zeros) included.
        assert rec.sparsity == base.sparsity == round(0.5 * features) / features
    staged = prune_(dense, 0.5, "contribution", calib, reconstruct=True,
                    sequential=True, progress=False)
    assert [r.stage for r in staged.targets] == ["features.0", "features.2", "head.1", "head.3"]
    assert staged.passes == 4


def test_magnitude_needs_no_calibration_and_matches_the_pruner(mlp):
    twin = copy.deepcopy(mlp)
    report = prune_(mlp, 0.5, "magnitude", scope="layer", progress=False)
    pruner = Pruner(twin, 0.5, "magnitude", scope="layer")
    pruner.step()
    for name, mask in pruner.masks.items():
        assert torch.equal(report.masks[name], mask)


def test_taylor_one_shot(mlp):
    xs = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(2)]
    loss = lambda model, b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    report = prune_(mlp, 0.5, Taylor(loss=loss), xs, progress=False)
    assert report.sparsity() == pytest.approx(0.5, abs=0.01) and report.passes == 1


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, r"\[0, 1\)"),
    ({"sparsity": -0.1}, r"\[0, 1\)"),
    ({"sparsity": True}, r"\[0, 1\)"),
    ({"sparsity": 0.8, "granularity": "2:4"}, r"\[0, 0.5\]"),
    ({"granularity": "4:4"}, "N < M"),
    ({"granularity": "2:3"}, "not divisible by M=3"),
    ({"calibration": []}, "no batches"),
    ({"calibration": None}, "need calibration batches"),
    ({"calibration": [{"input_ids": torch.zeros(2, 3, dtype=torch.long)}]},
     "raised on calibration batch 0"),
    ({"scope": "global", "sequential": True}, "sequential"),
    ({"scope": "diagonal"}, "unknown scope"),
    ({"criterion": "taylor"}, "needs a loss"),
    ({"criterion": "nope"}, "registered criteria"),
])
def test_bad_input_raises_before_any_weight_changes(encoder, kwargs, message):
    before = state(encoder)
    args = {"sparsity": 0.5, "criterion": "contribution", "calibration": encoder_batches(2, 0),
            "targets": in_layers, "reconstruct": True, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        prune_(encoder, **args)
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_reconstruction_options(encoder):
    with pytest.raises(ValueError, match="percdamp"):
        Reconstruction(percdamp=-1.0)
    with pytest.raises(TypeError, match="bool or a Reconstruction"):
        prune_(encoder, 0.5, "contribution", encoder_batches(1, 0), reconstruct="yes")
    with pytest.raises(TypeError, match="stages must be a callable"):
        prune_(encoder, 0.5, "contribution", encoder_batches(1, 0), stages="layers")
    report = prune_(encoder, 0.5, "contribution", encoder_batches(2, 0), targets=in_layers,
                    reconstruct=Reconstruction(refine=0, block_size=4), progress=False)
    assert report.reconstruction_seconds > 0 and report.passes == 1


def test_nan_weights_raise_before_any_weight_changes(encoder):
    with torch.no_grad():
        encoder.layers[2].up.weight[0, 0] = float("nan")
    before = state(encoder)
    with pytest.raises(ValueError, match=r"'layers.2.up.weight' holds NaN"):
        prune_(encoder, 0.5, "contribution", encoder_batches(1, 0), targets=in_layers,
               progress=False)
    assert all(torch.equal(v, before[k]) or k == "layers.2.up.weight"
               for k, v in encoder.state_dict().items())


class Flaky:
    """Batches that turn bad on a later pass, after some stages were written."""

    def __init__(self, bad_pass: int) -> None:
        self.bad_pass, self.passes = bad_pass, 0

    def __iter__(self):
        self.passes += 1
        batches = encoder_batches(2, 0)
        if self.passes >= self.bad_pass:
            batches[1] = {"input_ids": batches[1]["input_ids"]}
        return iter(batches)


def test_a_failing_later_stage_restores_the_stages_already_written(encoder):
    before = state(encoder)
    flaky = Flaky(bad_pass=4)  # probe, stage 0, stage 1, then stage 2 fails
    with pytest.raises(ValueError, match="batch 1"):
        prune_(encoder, 0.5, "contribution", flaky, targets=in_layers, reconstruct=True,
               sequential=True, stages=block_of, progress=False)
    assert flaky.passes == 4
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_failing_later_block_restores_the_blocks_already_written(encoder):
    before = state(encoder)
    seen = []

    def fail_after_the_probe(module, args):
        seen.append(1)
        if len(seen) > 1:  # the probe's call passes; the block's statistics pass fails
            raise RuntimeError("out of memory")

    encoder.layers[2].register_forward_pre_hook(fail_after_the_probe)
    with pytest.raises(ValueError, match="RuntimeError: out of memory"):
        prune_(encoder, 0.5, "contribution", encoder_batches(2, 0), targets=in_layers,
               reconstruct=True, sequential=True, progress=False)
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_block_of():
    assert block_of("encoder.layer.3.attention.self.query") == "encoder.layer.3"
    assert block_of("features.0") == "features.0"
    assert block_of("fc1") == "fc1"


def dead_inputs(n: int, dead: slice) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(32, 16, generator=g)
        x[:, dead] = 0.0  # features never active on the calibration data
        out.append(x)
    return out


@pytest.mark.parametrize("criterion", ["magnitude", "contribution"])
def test_dead_input_features_never_push_sparsity_past_the_request(mlp, criterion):
    report = prune_(mlp, 0.1, criterion, dead_inputs(3, slice(0, 9)), reconstruct=True,
                    progress=False)
    first = report.targets[0]
    assert first.dead_features == 9
    # Row scope: round(0.1 * 16) = 2 of 16 per row, not the 9 dead columns on top.
    assert first.sparsity == 2 / 16
    assert all(r.sparsity == round(0.1 * r.shape[1]) / r.shape[1] for r in report.targets)
    assert bool((mlp[0].weight != 0).sum(1).eq(14).all())
    assert "zero on every calibration input" in str(report)


def test_all_zero_calibration_is_refused_before_any_weight_changes(mlp):
    before = state(mlp)
    with pytest.raises(ValueError, match=r"'0.weight' received only zeros"):
        prune_(mlp, 0.5, "contribution", dead_inputs(2, slice(None)), reconstruct=True,
               progress=False)
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_all_zero_inputs_leave_the_error_unmeasured_not_zero(mlp):
    report = prune_(mlp, 0.5, "magnitude", dead_inputs(2, slice(None)), measure_error=True,
                    progress=False)
    assert report.targets[0].relative_error is None
    assert report.targets[0].dead_features == 16 and report.sparsity() == pytest.approx(0.5)
