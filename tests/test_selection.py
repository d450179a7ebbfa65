from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secateurs.selection import (
    Granularity,
    nm_layout,
    nm_unlayout,
    parse_granularity,
    select,
    select_by_threshold,
)

ELEMENT = Granularity("element")
CHANNEL = Granularity("channel")
sparsities = st.floats(0.0, 0.99, allow_nan=False)


@st.composite
def weight(draw, min_dim=2, max_dim=4, m=1):
    out = draw(st.integers(1, 12))
    inp = draw(st.integers(1, 6)) * m
    k = draw(st.sampled_from([(), (1,), (3, 3)])) if max_dim > 2 else ()
    seed = draw(st.integers(0, 2**16))
    return torch.randn((out, inp, *k), generator=torch.Generator().manual_seed(seed))


def zeros(mask: torch.Tensor) -> int:
    return int((~mask).sum())


@given(weight(), sparsities)
def test_layer_scope_prunes_exactly_round_s_n(w, s):
    mask = select({"w": w.abs()}, {"w": s}, ELEMENT, "layer")["w"]
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert zeros(mask) == round(s * w.numel())
    if 0 < zeros(mask) < w.numel():  # kept scores dominate pruned ones
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


@given(weight(), sparsities)
def test_row_scope_prunes_the_same_count_in_every_row(w, s):
    mask = select({"w": w.abs()}, {"w": s}, ELEMENT, "row")["w"].reshape(w.shape[0], -1)
    per_row = (~mask).sum(1)
    assert torch.all(per_row == round(s * mask.shape[1]))


@given(st.lists(weight(), min_size=1, max_size=4), sparsities)
def test_global_scope_prunes_exactly_round_s_total(ws, s):
    scores = {f"w{i}": w.abs() for i, w in enumerate(ws)}
    masks = select(scores, dict.fromkeys(scores, s), ELEMENT, "global")
    total = sum(w.numel() for w in ws)
    assert sum(zeros(m) for m in masks.values()) == round(s * total)
    kept = torch.cat([scores[k][m] for k, m in masks.items()])
    pruned = torch.cat([scores[k][~m] for k, m in masks.items()])
    if kept.numel() and pruned.numel():
        assert kept.min() >= pruned.max()


def test_global_scope_needs_one_sparsity():
    scores = {"a": torch.rand(4, 4), "b": torch.rand(4, 4)}
    with pytest.raises(ValueError, match="one sparsity"):
        select(scores, {"a": 0.1, "b": 0.2}, ELEMENT, "global")


@given(st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 8)]), st.data())
def test_nm_masks_are_nm_in_every_group(nm, data):
    n, m = nm
    w = data.draw(weight(m=m))
    g = Granularity("nm", n, m)
    mask = select({"w": w.abs()}, {"w": g.max_sparsity}, g, "layer")["w"]
    groups = nm_layout(mask, m)
    assert torch.all(groups.sum(1) == n)
    # The kept N of each group are the N largest scores of that group.
    scores = nm_layout(w.abs(), m)
    kept_min = scores.masked_fill(~groups, float("inf")).min(1).values
    pruned_max = scores.masked_fill(groups, -float("inf")).max(1).values
    assert torch.all(kept_min >= pruned_max)


@given(st.sampled_from([(2, 4), (1, 4)]), st.floats(0.0, 1.0), st.data())
def test_gradual_nm_is_exact_and_never_breaks_the_pattern(nm, frac, data):
    n, m = nm
    w = data.draw(weight(m=m))
    g = Granularity("nm", n, m)
    s = frac * g.max_sparsity
    mask = select({"w": w.abs()}, {"w": s}, g, "layer")["w"]
    assert zeros(mask) == round(s * w.numel())
    assert torch.all(nm_layout(mask, m).sum(1) >= n)


@given(weight(), sparsities, st.sampled_from(["layer", "global"]))
def test_channel_masks_remove_whole_output_channels(w, s, scope):
    mask = select({"w": w.abs()}, {"w": s}, CHANNEL, scope)["w"]
    rows = mask.reshape(w.shape[0], -1)
    assert torch.all(rows.all(1) | (~rows).all(1))
    assert int((~rows.all(1)).sum()) == round(s * w.shape[0])


@given(weight(), st.floats(0.0, 0.5), st.floats(0.0, 0.49),
       st.sampled_from(["row", "layer", "global"]))
def test_masks_nest_under_growing_sparsity(w, s1, ds, scope):
    first = select({"w": w.abs()}, {"w": s1}, ELEMENT, scope)
    # Perturb scores so an unconstrained ranking would differ.
    other = torch.rand(w.shape, generator=torch.Generator().manual_seed(1))
    second = select({"w": other}, {"w": s1 + ds}, ELEMENT, scope, previous=first)
    assert not torch.any(second["w"] & ~first["w"])


def test_sparsity_never_falls_below_what_previous_pruned():
    w = torch.arange(1.0, 17.0).reshape(4, 4)
    first = select({"w": w}, {"w": 0.5}, ELEMENT, "layer")
    second = select({"w": w}, {"w": 0.25}, ELEMENT, "layer", previous=first)
    assert torch.equal(first["w"], second["w"])


@given(weight(), st.integers(0, 2**16))
def test_nm_layout_round_trips(w, seed):
    gen = torch.Generator().manual_seed(seed)
    # A group size M drawn among the divisors of the input width, and a fresh tensor of
    # distinct values from the same generator, so a layout mixing up positions shows.
    divisors = [d for d in range(1, w.shape[1] + 1) if w.shape[1] % d == 0]
    m = divisors[int(torch.randint(len(divisors), (), generator=gen))]
    x = torch.randperm(w.numel(), generator=gen).reshape(w.shape).float()
    groups = nm_layout(x, m)
    assert groups.shape == (x.numel() // m, m)
    assert torch.equal(nm_unlayout(groups, x.shape), x)
    # Each group holds M consecutive inputs, in order, of one output row and kernel position.
    coords = torch.stack(torch.unravel_index(torch.arange(x.numel()), x.shape), -1)
    where = coords[nm_layout(torch.arange(x.numel()).reshape(x.shape), m)]  # (groups, m, ndim)
    others = [d for d in range(x.dim()) if d != 1]
    assert torch.all(where[:, :, others] == where[:, :1, others])
    assert torch.all(where[:, :, 1] == where[:, :1, 1] + torch.arange(m))
    assert torch.all(where[:, 0, 1] % m == 0)
    assert torch.equal(nm_unlayout(nm_layout(w, m), w.shape), w)


def test_threshold_selection_has_hysteresis():
    scores = {"w": torch.tensor([0.05, 0.10, 0.105, 0.2])}
    previous = {"w": torch.tensor([True, True, False, False])}
    mask = select_by_threshold(scores, previous, low=0.1, high=0.11)["w"]
    # below low: pruned; kept and above low: kept; pruned in the band: stays pruned;
    # pruned above high: comes back.
    assert mask.tolist() == [False, True, False, True]


@pytest.mark.parametrize("spec", ["4:4", "0:4", "5:4", "2-4", "elements", "2:x"])
def test_bad_granularity_is_a_clear_error(spec):
    with pytest.raises(ValueError, match=repr(spec).replace("'", ".")):
        parse_granularity(spec)


def test_granularity_parses():
    assert parse_granularity("2:4") == Granularity("nm", 2, 4)
    assert parse_granularity(" 4 : 8 ").max_sparsity == 0.5
    assert str(parse_granularity("channel")) == "channel"
