"""Calibration passes: batch kinds, statistics against direct computation, hook hygiene."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import SmallCNN
from secateurs.calibration import (
    InputStats,
    calibrate,
    call_order,
    feature_map,
    gradient_sums,
    run_batch,
)
from secateurs.targets import resolve_targets


class KwargsNet(nn.Module):
    """Takes keyword arguments, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h if scale is None else h * scale)


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_power_sums_and_xtx_match_direct_computation():
    torch.manual_seed(0)
    net = KwargsNet()
    xs = [torch.randn(5, 4), torch.randn(7, 4)]
    stats = calibrate(net, xs, ["a"], hessian=True, progress=False)["a.weight"]
    x = torch.cat(xs).double()
    assert stats.count == 12
    torch.testing.assert_close(stats.power_sums[1.0], x.abs().sum(0))
    torch.testing.assert_close(stats.power_sums[2.0], x.square().sum(0))
    torch.testing.assert_close(stats.norm(2.0), x.norm(dim=0))
    torch.testing.assert_close(stats.xtx, x.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.hessian(), x.T @ x / 12, rtol=1e-5, atol=1e-5)


def test_tensor_tuple_and_dict_batches_give_the_same_statistics():
    torch.manual_seed(0)
    net = KwargsNet()
    xs = [torch.randn(3, 4) for _ in range(3)]
    scale = torch.full((6,), 2.0)
    as_tuple = calibrate(net, [(x, scale) for x in xs], progress=False)
    as_dict = calibrate(net, [{"x": x, "scale": scale} for x in xs], progress=False)
    as_list = calibrate(net, [[x, scale] for x in xs], progress=False)
    plain = calibrate(net, xs, progress=False)
    for name in ("a.weight", "b.weight"):
        torch.testing.assert_close(as_tuple[name].power_sums[2.0], as_dict[name].power_sums[2.0])
        torch.testing.assert_close(as_list[name].power_sums[1.0], as_dict[name].power_sums[1.0])
    # The scale reaches layer b only: the tensor batch sees half its inputs there.
    torch.testing.assert_close(plain["a.weight"].power_sums[1.0],
                               as_dict["a.weight"].power_sums[1.0])
    torch.testing.assert_close(2 * plain["b.weight"].power_sums[1.0],
                               as_dict["b.weight"].power_sums[1.0])


def test_unsupported_batch_kind_is_a_type_error():
    with pytest.raises(TypeError, match="tensor, a tuple/list"):
        run_batch(KwargsNet(), "not a batch")


def test_empty_calibration_is_a_clear_error():
    with pytest.raises(ValueError, match="no batches"):
        calibrate(KwargsNet(), [], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        calibrate(KwargsNet(), iter(()), progress=False)


def test_a_single_tensor_is_not_taken_for_an_iterable_of_batches():
    with pytest.raises(TypeError, match="iterable of batches"):
        calibrate(KwargsNet(), torch.randn(3, 4), progress=False)


def test_hooks_are_removed_after_the_model_raises_and_mode_is_restored():
    net = KwargsNet().train()
    net.b.eval()
    good = torch.randn(2, 4)
    before = hooks(net)
    with pytest.raises(ValueError, match=r"batch 1 \(tensor \(2, 5\)\)"):
        calibrate(net, [good, torch.randn(2, 5)], progress=False)
    assert hooks(net) == before
    assert net.training and net.a.training and not net.b.training
    calibrate(net, [good], progress=False)
    assert hooks(net) == before


def test_target_whose_forward_never_runs_is_named():
    net = KwargsNet()
    net.forward = lambda x: net.a(x)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"\['b.weight'\] received no input"):
        calibrate(net, [torch.randn(2, 4)], progress=False)


def test_memory_is_bounded_by_the_statistics():
    net = KwargsNet()

    def stream():
        for _ in range(50):
            yield torch.randn(16, 4)

    stats = calibrate(net, stream(), hessian=True, progress=False)
    assert stats["a.weight"].count == 800
    tensors = [*stats["a.weight"].power_sums.values(), stats["a.weight"].xtx]
    assert sum(t.numel() for t in tensors) == 4 + 4 + 4 * 4


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 5, 3, padding=1),
    nn.Conv2d(3, 5, (3, 2), stride=2, dilation=(1, 2), padding=(2, 0)),
    nn.Conv2d(3, 5, 3, padding="same", padding_mode="reflect"),
    nn.Conv1d(3, 5, 4, stride=2, padding=1, padding_mode="circular"),
])
def test_conv_features_are_the_unfolded_patches_the_weight_multiplies(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9) if isinstance(conv, nn.Conv2d) else torch.randn(2, 3, 11)
    fmap = feature_map("conv.weight", conv)
    patches = fmap.patches(conv, x)
    out = conv(x) - conv.bias.view(1, -1, *([1] * (x.dim() - 2)))
    direct = out.movedim(1, -1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(patches @ conv.weight.flatten(1).T, direct, rtol=1e-4, atol=1e-4)
    sums, n = fmap.power_sums(conv, x, (1.0, 2.0, 3.0))
    assert n == patches.shape[0]
    for p, s in sums.items():
        torch.testing.assert_close(s, patches.double().abs().pow(p).sum(0), rtol=1e-5, atol=1e-5)


def test_grouped_and_unknown_layers_are_refused_by_name():
    with pytest.raises(ValueError, match="groups=2"):
        feature_map("g.weight", nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match="Embedding"):
        feature_map("e.weight", nn.Embedding(4, 3))


def test_cnn_calibration_counts_patches(cnn):
    stats = calibrate(cnn, [torch.randn(4, 1, 8, 8)], progress=False)
    assert stats["features.0.weight"].count == 4 * 8 * 8
    assert stats["head.1.weight"].count == 4
    assert stats["features.2.weight"].features == 8 * 9


def test_non_finite_inputs_are_reported():
    with pytest.raises(ValueError, match="NaN or Inf inputs"):
        calibrate(KwargsNet(), [torch.full((2, 4), float("inf"))], progress=False)


@given(st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_streaming_equals_one_big_batch(sizes):
    torch.manual_seed(len(sizes))
    net = KwargsNet()
    xs = [torch.randn(n, 4) for n in sizes]
    parts = calibrate(net, xs, hessian=True, progress=False)["b.weight"]
    whole = calibrate(net, [torch.cat(xs)], hessian=True, progress=False)["b.weight"]
    assert parts.count == whole.count == sum(sizes)
    torch.testing.assert_close(parts.power_sums[2.0], whole.power_sums[2.0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.xtx, whole.xtx, rtol=1e-5, atol=1e-5)


def test_empty_stats_hold_requested_powers():
    s = InputStats.empty(3, powers=(3.0,), hessian=False)
    assert sorted(s.power_sums) == [1.0, 2.0, 3.0] and s.xtx is None
    with pytest.raises(ValueError, match="hessian=True"):
        s.hessian()


def test_gradient_sums_are_absolute_per_batch_gradients():
    net = nn.Linear(3, 1, bias=False)
    xs = [torch.tensor([[1.0, -2.0, 0.0]]), torch.tensor([[-1.0, -1.0, 3.0]])]
    net.weight.grad = torch.full_like(net.weight, 7.0)
    sums, n = gradient_sums(net, xs, resolve_targets(net), lambda m, b: m(b).sum(),
                            progress=False)
    assert n == 2
    torch.testing.assert_close(sums["weight"], torch.tensor([[2.0, 3.0, 3.0]]))
    assert bool((net.weight.grad == 7.0).all())  # .grad untouched


def test_call_order_follows_execution_not_registration():
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.second = nn.Linear(4, 4)
            self.first = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x))

    net = Backwards()
    order = call_order(net, resolve_targets(net), [torch.randn(1, 4), "never read"])
    assert order == ["first.weight", "second.weight"]


def test_conv_stats_match_unfold_reference():
    torch.manual_seed(0)
    cnn = SmallCNN()
    x = torch.randn(3, 1, 8, 8)
    stats = calibrate(cnn, [x], ["features.0"], hessian=True, progress=False)
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 9).double()
    torch.testing.assert_close(stats["features.0.weight"].xtx, cols.T @ cols,
                               rtol=1e-5, atol=1e-5)
